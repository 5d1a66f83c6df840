"""``MNSegmentLogic``: train / resume / segment / load predictions from a MRML scene.

Runs with ``slicer-core`` alone (no Qt, no ``slicer.app``); inside Slicer it uses ``slicer.mrmlScene`` and
``PythonSlicer``. The engine always runs in a child process (see :mod:`.job`).

Job folder layout (``output_dir``)::

    job.json                  what this module needs to load results later (classes, colours, cases)
    datalist.json             the engine's input (relative paths)
    data/images/<stem>.nrrd   exported volumes
    data/labels/<stem>.nrrd   exported segmentations (label maps on each volume's own grid)
    run/                      the engine's RUN_DIR (config.json, plan.json, checkpoints, model)
    run/predictions/<stem>.nii.gz
    run/suggestions/          what to label next (suggestions.json, <stem>_disagreement.nii.gz)
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import slicer

from . import export, suggestions
from .job import EngineError, EngineJob, Phase
from .livepreview import PREVIEW_ATTRIBUTE, LivePreview
from .scenenodes import nodes_by_class

JOB_FILE = "job.json"
DATALIST_FILE = "datalist.json"
RUN_DIR = "run"
PREDICTIONS_DIR = "predictions"
PREDICTION_ATTRIBUTE = "MNSegment.Prediction"

PRESETS = ("quick", "default", "paper")
NETWORKS = ("3d", "2d", "ensemble")

#: Friendly names of the settings the module exposes → dotted keys of the engine's ``config.json``.
OVERRIDE_KEYS = {
    "steps": "train.steps",
    "batch_size": "sampling.batch_size",
    "patch_size": "sampling.patch_size",
    "lrg_mode": "lrg.mode",
    "backbone_2d": "model2d.name",
    "weights_2d": "model2d.weights",
    "network_3d": "model3d.name",
}


def _scene_of(nodes, scene=None):
    if scene is not None:
        return scene
    for node in nodes:
        if node is not None and node.GetScene() is not None:
            return node.GetScene()
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise ValueError("No MRML scene: pass scene= to MNSegmentLogic")
    return scene


def _set_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _relative(path: Path, folder: Path) -> str:
    return Path(path).resolve().relative_to(folder.resolve()).as_posix()


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def gpu_info() -> list[dict]:
    """Detected NVIDIA GPUs as ``[{"index", "name", "memory_gb"}]`` (``nvidia-smi``; no torch import)."""
    # Slicer is a GUI process: on Windows a console child would flash its own window (the worker's Popen, and
    # slicer.util.launchConsoleProcess, hide it the same way).
    hidden = {"creationflags": subprocess.CREATE_NO_WINDOW} if sys.platform == "win32" else {}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True, **hidden,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            try:
                gpus.append({"index": int(parts[0]), "name": parts[1], "memory_gb": round(float(parts[2]) / 1024, 1)})
            except ValueError:
                continue
    return gpus


#: Device choice: every GPU of this machine, one training process (rank) each (``mnsegment --gpus all``).
ALL_GPUS = "all"


def device_choices(gpus: list[dict]) -> list[str]:
    """The device setting's choices for the GPUs :func:`gpu_info` found: "all" only when there are several."""
    return ["auto", "gpu", "cpu"] + ([ALL_GPUS] if len(gpus) > 1 else [])


def device_argument(device: str) -> str:
    """UI / user device choice → engine ``--device`` value (or :data:`ALL_GPUS`, see :func:`engine_device_args`)."""
    d = str(device or "auto").strip().lower()
    if d in ("gpu", "cuda"):
        return "cuda"
    if d in (ALL_GPUS, "all gpus"):
        return ALL_GPUS
    if d.startswith("cuda:") or d in ("cpu", "auto"):
        return d
    raise ValueError(f"Unknown device {device!r}: use auto, gpu, all, cpu or cuda:N")


def _gpus_args(device: str) -> list[str]:
    """All GPUs: the engine starts one rank per GPU itself; its events stay one stream (rank 0's)."""
    return ["--gpus", "all"] if device == ALL_GPUS else []


def engine_device_args(device: str) -> list[str]:
    """The engine's ``--device`` (and ``--gpus``) options for a :func:`device_argument` value."""
    return ["--device", "cuda", *_gpus_args(device)] if device == ALL_GPUS else ["--device", device]


def _device_env(device: str) -> dict[str, str]:
    """Environment for the predict step, which has no --device option: hide GPUs when CPU was chosen."""
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    if device.startswith("cuda:"):
        return {"CUDA_VISIBLE_DEVICES": device.split(":", 1)[1]}
    return {}


def engine_settings(overrides: dict) -> dict:
    """``train(**overrides)`` keywords → engine ``--set`` keys (friendly names mapped, None dropped)."""
    settings = {}
    for key, value in overrides.items():
        if value is None:
            continue
        settings[OVERRIDE_KEYS.get(key, key)] = value
    network_3d = str(settings.get("model3d.name", "UNet"))
    if network_3d.lower() != "unet" and "model3d.kwargs" not in settings:
        settings["model3d.kwargs"] = {}  # the presets' kwargs are UNet's; other networks use their defaults
    return settings


class Export:
    """What :meth:`MNSegmentLogic.prepare_cases` copied out of the scene, and where it goes."""

    def __init__(self, folder: Path, meta: dict, datalist: dict | None, files: list):
        self.folder, self.meta, self.datalist, self.files = folder, meta, datalist, files

    def write(self, stop: threading.Event) -> None:
        """Any thread: write the images, then ``datalist.json`` and ``job.json`` (last: a folder holding them
        holds every image). Returns early, writing no JSON, once ``stop`` is set."""
        for snapshot, path in self.files:
            if stop.is_set():
                return
            export.write_snapshot(snapshot, path)
        self.files = []  # the copies are not needed anymore
        if self.datalist is not None:
            _write_json(self.folder / DATALIST_FILE, self.datalist)
        _write_json(self.folder / JOB_FILE, self.meta)


def check_settings(settings: dict) -> None:
    """Refuse impossible training settings before anything is exported (one clear message)."""
    steps = settings.get("train.steps")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"Steps must be a whole number of at least 1 (got {steps!r}).")
    batch = settings.get("sampling.batch_size")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise ValueError(f"Batch size must be a whole number of at least 1 (got {batch!r}).")
    patch = settings.get("sampling.patch_size")
    if patch is not None and (not isinstance(patch, (list, tuple)) or len(patch) != 3
                              or not all(isinstance(v, int) and v >= 8 for v in patch)):
        raise ValueError(f"Patch size must be three voxel counts of at least 8, like [96, 96, 48] (got {patch!r}).")


class MNSegmentLogic:
    """Scene-level API of MNSegment (usable from Slicer's Python console).

    Example::

        logic = MNSegmentLogic()
        job = logic.train([(vol1, seg1), (vol2, seg2)], [vol3, vol4], preset="quick", wait=True)
        job.result            # segmentation nodes of vol3 and vol4
        logic.segment([vol5], job.folder / "run")
    """

    def __init__(self, scene=None, confirm_install=None, python: list[str] | None = None):
        self.scene = scene
        #: ``callable(message) -> bool`` asked before installing missing Python packages (Slicer only)
        self.confirm_install = confirm_install
        #: command that starts the worker's Python (default: ``PythonSlicer`` inside Slicer, else this Python)
        self.python = python
        #: running jobs and the last ones started (finished jobs are dropped when a new one starts)
        self.jobs: list[EngineJob] = []
        #: the preview of the last training started with ``preview=`` (its node: ``self.preview.node``)
        self.preview: LivePreview | None = None

    # -------------------------------------------------------------------------------- scene queries
    def _get_scene(self, nodes=()):
        return _scene_of(list(nodes), self.scene)

    def scalar_volumes(self) -> list:
        """Plain scalar volumes of the scene (no label maps, vector, DWI or DTI volumes), without the disagreement
        maps MNSegment shows (never a scan to train on or segment)."""
        return [n for n in nodes_by_class(self._get_scene(), "vtkMRMLScalarVolumeNode")
                if export.is_scalar_3d_volume(n) and n.GetAttribute(suggestions.OVERLAY_ATTRIBUTE) is None]

    def pair_segmentations(self, include_predictions: bool = False) -> list[tuple]:
        """(volume, segmentation) for every segmentation in the scene whose reference geometry is a volume.

        Segmentations produced by MNSegment are skipped unless ``include_predictions`` (e.g. after correcting
        them in the Segment Editor, to train again with more labels)."""
        pairs = []
        for seg in nodes_by_class(self._get_scene(), "vtkMRMLSegmentationNode"):
            if seg.GetAttribute(PREVIEW_ATTRIBUTE) is not None:  # replaced at every checkpoint: never a label
                continue
            if seg.GetAttribute(PREDICTION_ATTRIBUTE) and not include_predictions:
                continue
            if seg.GetSegmentation().GetNumberOfSegments() == 0:
                continue
            ref = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
            if export.is_scalar_3d_volume(ref):
                pairs.append((ref, seg))
        return pairs

    def unlabeled_candidates(self, labeled) -> list:
        """Scalar volumes not used by a labeled row (rows may be half filled: None)."""
        used = {vol.GetID() for vol, _seg in labeled if vol is not None}
        return [v for v in self.scalar_volumes() if v.GetID() not in used]

    # --------------------------------------------------------------------------------- dependencies
    def check_dependencies(self) -> None:
        """Inside Slicer, offer to install what the engine needs; raise if it is still missing."""
        from . import dependencies

        if getattr(slicer, "app", None) is not None:
            dependencies.ensure(confirm=self.confirm_install)
        missing = dependencies.missing_packages()
        if missing:
            names = ", ".join(r.name for r in missing)
            raise EngineError(f"Python packages needed by MNSegment are missing: {names}.")
        problem = dependencies.torch_problem()
        if problem:
            raise EngineError(problem)

    # --------------------------------------------------------------------------------------- export
    def prepare_cases(self, labeled, unlabeled, folder: Path, role_unlabeled: str = "unlabeled") -> Export:
        """Main thread: check the inputs and copy them out of the scene; nothing is written yet."""
        folder = Path(folder)
        labeled = [(v, s) for v, s in labeled]
        unlabeled = list(unlabeled)
        for vol, seg in labeled:
            export.check_volume(vol)
            if seg is None or not seg.IsA("vtkMRMLSegmentationNode"):
                raise ValueError(f"No segmentation for {vol.GetName()}")
        for vol in unlabeled:
            export.check_volume(vol)
        ids = [v.GetID() for v, _s in labeled] + [v.GetID() for v in unlabeled]
        if len(set(ids)) != len(ids):
            raise ValueError("A volume is listed twice (labeled volumes cannot also be unlabeled).")
        classes = export.build_classes([s for _v, s in labeled])
        images, labels = folder / "data" / "images", folder / "data" / "labels"
        cases, files, datalist = [], [], {"labeled": [], "unlabeled": []}
        for index, (vol, seg) in enumerate(labeled):
            stem = export.safe_stem(vol.GetName(), index)
            image, label = images / f"{stem}.nrrd", labels / f"{stem}.nrrd"
            snapshot, counts = export.snapshot_labelmap(seg, vol, classes)
            files += [(export.snapshot_volume(vol), image), (snapshot, label)]
            datalist["labeled"].append({"image": _relative(image, folder), "label": _relative(label, folder)})
            cases.append({
                "role": "labeled", "stem": stem, "volume_id": vol.GetID(), "volume_name": vol.GetName(),
                "segmentation_id": seg.GetID(), "segmentation_name": seg.GetName(),
                "image": _relative(image, folder), "label": _relative(label, folder), "voxels": counts,
            })
        for index, vol in enumerate(unlabeled, start=len(labeled)):
            stem = export.safe_stem(vol.GetName(), index)
            image = images / f"{stem}.nrrd"
            files.append((export.snapshot_volume(vol), image))
            datalist["unlabeled"].append({"image": _relative(image, folder)})
            cases.append({
                "role": role_unlabeled, "stem": stem, "volume_id": vol.GetID(), "volume_name": vol.GetName(),
                "image": _relative(image, folder),
            })
        datalist["classes"] = {str(c["value"]): c["name"] for c in classes}
        meta = {"version": 1, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "classes": classes, "cases": cases}
        return Export(folder, meta, datalist if labeled else None, files)

    def export_cases(self, labeled, unlabeled, folder: Path, role_unlabeled: str = "unlabeled") -> dict:
        """Export volumes/segmentations into ``folder`` and write ``datalist.json`` and ``job.json`` (blocking;
        :meth:`train` and :meth:`segment` write the files on a worker thread instead)."""
        prepared = self.prepare_cases(labeled, unlabeled, folder, role_unlabeled)
        prepared.write(threading.Event())
        return prepared.meta

    def default_output_dir(self) -> Path:
        return Path.home() / "MNSegment" / "jobs" / time.strftime("job-%Y%m%d-%H%M%S")

    # ---------------------------------------------------------------------------------------- train
    def train(self, labeled, unlabeled, output_dir=None, preset: str = "quick", wait: bool = False,
              device: str = "auto", network: str = "3d", on_progress=None, on_log=None, on_event=None,
              on_phase=None, on_finished=None, init_from=None, preview=None, **overrides) -> EngineJob:
        """Train on ``labeled`` [(volume, segmentation)] + ``unlabeled`` [volume], then segment ``unlabeled``.

        ``preview``: one of those volumes; at each checkpoint the engine predicts it and ``self.preview.node``, one
        segmentation node, shows that prediction (``mnsegment train --preview``).

        ``init_from`` ("Train more"): a finished job folder (or its run folder) whose networks the new training
        starts from instead of from scratch (``mnsegment train --init-from``); its structures must be the same.

        ``overrides``: engine configuration keys (``**{"train.steps": 50}``) or the friendly names in
        ``OVERRIDE_KEYS`` (``steps=50``, ``backbone_2d="resnet18"``, ...). Returns the job; its ``result`` is
        the list of segmentation nodes once done. With ``wait=True`` blocks until the end and raises
        :class:`EngineError` (message from the engine) on failure."""
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        labeled = list(labeled)
        if not labeled:
            raise ValueError("At least one labeled case (volume + segmentation) is needed.")
        device = device_argument(device)
        if network not in NETWORKS:
            raise ValueError(f"Unknown network {network!r}: use one of {', '.join(NETWORKS)}")
        settings = engine_settings(overrides)
        check_settings(settings)
        self.check_dependencies()
        source_run = finished_run(init_from) if init_from is not None else None
        scene = self._get_scene([v for v, _s in labeled])
        folder = Path(output_dir) if output_dir else self.default_output_dir()
        if (folder / RUN_DIR).exists():
            raise ValueError(f"{folder} already holds a training: choose a new output folder, or Resume it.")
        prepared = self.prepare_cases(labeled, unlabeled, folder)
        meta = prepared.meta
        previewed = self._case_of(meta, preview) if preview is not None else None  # checked before any folder
        meta.update({"run_dir": RUN_DIR, "preset": preset, "device": device, "network": network,
                     "overrides": settings})
        folder.mkdir(parents=True, exist_ok=True)
        args = ["train", str(folder / DATALIST_FILE), "--output", str(folder / RUN_DIR), "--preset", preset,
                *engine_device_args(device)]
        for key, value in settings.items():
            args += ["--set", f"{key}={_set_value(value)}"]
        if source_run is not None:
            args += ["--init-from", str(source_run)]
            meta["init_from"] = str(source_run)
        self.preview = None
        if previewed is not None:
            args += ["--preview", str(folder / previewed["image"])]
            meta["preview"] = previewed["stem"]  # so that Resume shows it too
            on_event = self._showing_preview(LivePreview(preview, meta["classes"]), on_event)
        args.append("--events")
        phases = [Phase("export", run=prepared.write), Phase("train", args),
                  self._predict_phase(folder, meta, device, network)]
        return self._run(phases, folder, scene, wait, on_progress, on_log, on_event, on_phase, on_finished)

    @staticmethod
    def _case_of(meta: dict, volume) -> dict:
        for case in meta["cases"]:
            if case["volume_id"] == volume.GetID():
                return case
        raise ValueError(f"The preview volume {volume.GetName()} is not one of this training's volumes: choose a "
                         "labeled or checked unlabeled volume.")

    def _showing_preview(self, preview: LivePreview, on_event):
        """``on_event`` that first shows each ``preview`` event's file in ``preview``'s node. Showing it may fail
        (a file removed by hand): that is logged and costs the picture, never the training."""
        self.preview = preview

        def handle(job: EngineJob, event: dict) -> None:
            if event.get("event") == "preview" and event.get("path"):
                try:
                    preview.update(event["path"], event.get("step"))
                except Exception as error:
                    logging.getLogger(__name__).warning("The training preview could not be shown: %s", error)
            if on_event is not None:
                on_event(job, event)

        return handle

    def resume(self, job_folder, wait: bool = False, on_progress=None, on_log=None, on_event=None,
               on_phase=None, on_finished=None) -> EngineJob:
        """Continue an interrupted training from its last checkpoint, then segment its unlabeled volumes."""
        folder = Path(job_folder)
        if not (folder / JOB_FILE).is_file() and (folder.parent / JOB_FILE).is_file():
            folder = folder.parent  # the run folder was given
        self.check_dependencies()
        if not (folder / JOB_FILE).is_file():
            phases = [Phase("train", ["resume", str(folder), "--events"])]
            return self._run(phases, folder, self._get_scene(), wait, on_progress, on_log, on_event, on_phase,
                             on_finished, load=False)
        meta = _read_json(folder / JOB_FILE)
        device = meta.get("device", "auto")
        self.preview = None
        previewed = [c for c in meta["cases"] if c["stem"] == meta.get("preview")]
        if previewed:  # the engine continues writing it (config.json): show it again
            volume = self._find_volume(self._get_scene(), previewed[0], folder)
            on_event = self._showing_preview(LivePreview(volume, meta["classes"]), on_event)
        phases = [Phase("train", ["resume", str(folder / meta.get("run_dir", RUN_DIR)), "--events",
                                  *_gpus_args(device)]),
                  self._predict_phase(folder, meta, device, meta.get("network", "3d"))]
        return self._run(phases, folder, self._get_scene(), wait, on_progress, on_log, on_event, on_phase,
                         on_finished)

    def _predict_phase(self, folder: Path, meta: dict, device: str, network: str, model_dir=None,
                       out_dir=None) -> Phase:
        run_dir = Path(model_dir) if model_dir else folder / meta.get("run_dir", RUN_DIR)
        out = Path(out_dir) if out_dir else run_dir / PREDICTIONS_DIR
        images = [str(folder / c["image"]) for c in meta["cases"] if c["role"] in ("unlabeled", "segment")]
        if network not in NETWORKS:
            raise ValueError(f"Unknown network {network!r}: use one of {', '.join(NETWORKS)}")

        def arguments():
            if not images:
                return None
            return ["predict", "--model", str(run_dir), "--output", str(out), "--network", network,
                    *_gpus_args(device), *images]

        return Phase("predict", [], before=arguments, env=_device_env(device))

    # -------------------------------------------------------------------------------------- segment
    def segment(self, volumes, model_dir, wait: bool = True, output_dir=None, network: str = "3d",
                device: str = "auto", on_log=None, on_event=None, on_finished=None):
        """Apply a trained model (its run folder, or the job folder that holds it) to ``volumes``.

        Returns the new segmentation nodes (``wait=True``) or the job (``wait=False``; nodes in
        ``job.result``)."""
        volumes = list(volumes)
        if not volumes:
            raise ValueError("Select at least one volume to segment.")
        model = self.resolve_model_dir(model_dir)
        device = device_argument(device)
        self.check_dependencies()
        folder = Path(output_dir) if output_dir else model.parent / "segment" / time.strftime("%Y%m%d-%H%M%S")
        prepared = self.prepare_cases([], volumes, folder, role_unlabeled="segment")
        meta = prepared.meta
        meta["classes"] = self.model_classes(model)
        meta.update({"model_dir": str(model), "predictions_dir": PREDICTIONS_DIR, "network": network})
        folder.mkdir(parents=True, exist_ok=True)
        phases = [Phase("export", run=prepared.write),
                  self._predict_phase(folder, meta, device, network, model_dir=model,
                                      out_dir=folder / PREDICTIONS_DIR)]
        job = self._run(phases, folder, self._get_scene(volumes), wait, None, on_log, on_event, None, on_finished)
        return job.result if wait else job

    @staticmethod
    def resolve_model_dir(model_dir) -> Path:
        path = Path(model_dir)
        if (path / JOB_FILE).is_file() and not (path / "config.json").is_file():
            path = path / _read_json(path / JOB_FILE).get("run_dir", RUN_DIR)
        if not (path / "config.json").is_file():
            raise EngineError(f"{model_dir} is not a trained MNSegment model folder (no config.json).")
        return path

    @staticmethod
    def model_classes(model_dir: Path) -> list[dict]:
        """Classes of a model: names from its ``plan.json``, colours from the job that trained it if any."""
        model_dir = Path(model_dir)
        mapping = {}
        if (model_dir / "plan.json").is_file():
            mapping = _read_json(model_dir / "plan.json").get("classes") or {}
        colors, job_classes = {}, []
        if (model_dir.parent / JOB_FILE).is_file():
            job_classes = _read_json(model_dir.parent / JOB_FILE).get("classes", [])
            colors = {export.class_key(c["name"]): c["color"] for c in job_classes}
        if mapping:
            return export.classes_from_mapping(mapping, colors)
        return job_classes

    # ---------------------------------------------------------------------------------- suggestions
    @staticmethod
    def suggestions(job_or_folder) -> list:
        """What to label next: the ranked :class:`suggestions.Suggestion` list of a finished training (its job
        or run folder; written by the engine after training or by ``mnsegment suggest``), best first."""
        return suggestions.read_suggestions(getattr(job_or_folder, "folder", job_or_folder))

    def show_suggestion(self, suggestion) -> tuple:
        """Its volume with the disagreement map as overlay, slice views centred on the most uncertain slice."""
        return suggestions.show(suggestion, self._get_scene())

    def label_next(self, suggestion, model_dir) -> tuple:
        """Shows ``suggestion`` and starts a new segmentation of its volume with ``model_dir``'s classes, set as
        the Segment Editor's segmentation. Returns (volume, segmentation)."""
        volume, _overlay = self.show_suggestion(suggestion)
        classes = self.model_classes(self.resolve_model_dir(model_dir))
        return volume, suggestions.start_segmentation(volume, classes)

    # ----------------------------------------------------------------------------------------- jobs
    def _run(self, phases, folder, scene, wait, on_progress, on_log, on_event, on_phase, on_finished,
             load: bool = True) -> EngineJob:
        from .job import worker_environment

        def load_results():  # one volume per poll: loading tens of predictions at once would freeze the GUI
            nodes = []
            for node in self.iter_predictions(job.folder, scene=scene):
                nodes.append(node)
                yield
            job.result = nodes

        phases = [*phases, Phase("load", steps=load_results)] if load else phases
        job = EngineJob(phases, folder=folder, on_progress=on_progress, on_log=on_log, on_event=on_event,
                        on_phase=on_phase, env=worker_environment(), python=self.python)
        job.add_finished_handler(_record_status)
        if on_finished is not None:
            job.add_finished_handler(on_finished)
        self.jobs = [j for j in self.jobs if j.running]
        self.jobs.append(job)
        job.start()
        if wait:
            try:
                job.wait()
            except BaseException:
                job.cancel()
                raise
            job.raise_for_status()
        return job

    def cancel_all(self, wait: bool = False) -> None:
        """Cancel every running job (scene close; application exit with ``wait=True``, so that the workers
        save their checkpoints before Slicer goes)."""
        for job in self.jobs:
            if job.running:
                job.cancel()
        if wait:
            for job in self.jobs:
                job.wait()

    # -------------------------------------------------------------------------------------- results
    def load_predictions(self, job_or_folder, scene=None) -> list:
        """Segmentation nodes for the predictions of a job (object or folder), one per predicted volume.

        Volumes are found in the scene (same node, else same name); a volume no longer in the scene is loaded
        from the job folder."""
        return list(self.iter_predictions(job_or_folder, scene))

    def iter_predictions(self, job_or_folder, scene=None) -> Iterator:
        """:meth:`load_predictions` one volume at a time, yielding each segmentation node as it is made. If one
        fails, or the iteration is closed early (a cancelled job), the nodes it made are removed again."""
        folder = Path(getattr(job_or_folder, "folder", job_or_folder))
        meta = _read_json(folder / JOB_FILE)
        scene = scene or self._get_scene()
        classes = meta.get("classes") or []
        if "model_dir" in meta:
            predictions = folder / meta.get("predictions_dir", PREDICTIONS_DIR)
        else:
            predictions = folder / meta.get("run_dir", RUN_DIR) / PREDICTIONS_DIR
            model_classes = self.model_classes(folder / meta.get("run_dir", RUN_DIR))
            if model_classes and not classes:
                classes = model_classes
        cases = [c for c in meta["cases"] if c["role"] in ("unlabeled", "segment")]
        for case in cases:  # all checked first, so a missing one leaves no segmentation half of the job made
            path = predictions / f"{case['stem']}.nii.gz"
            if not path.is_file():
                raise EngineError(f"No prediction for {case['volume_name']} ({path} is missing).")
        nodes = []
        try:
            for case in cases:
                volume = self._find_volume(scene, case, folder)
                node = export.load_labelmap_as_segmentation(predictions / f"{case['stem']}.nii.gz", volume, classes)
                node.SetAttribute(PREDICTION_ATTRIBUTE, str(folder))
                nodes.append(node)
                yield node
        except BaseException:  # GeneratorExit too: a job cancelled while loading keeps none of it
            for node in nodes:
                scene.RemoveNode(node)
            raise

    @staticmethod
    def _find_volume(scene, case: dict, folder: Path):
        node = scene.GetNodeByID(case.get("volume_id", ""))
        if node is not None and node.IsA("vtkMRMLScalarVolumeNode") and node.GetName() == case["volume_name"]:
            return node
        for candidate in nodes_by_class(scene, "vtkMRMLScalarVolumeNode", case["volume_name"]):
            if not candidate.IsA("vtkMRMLLabelMapVolumeNode"):
                return candidate
        try:
            volume = suggestions.read_volume(scene, folder / case["image"], case["volume_name"])
        except ValueError as error:
            raise EngineError(str(error)) from None
        volume.CreateDefaultDisplayNodes()
        return volume


def _record_status(job: EngineJob) -> None:
    """Keep the job's outcome in job.json (shown when the folder is opened later)."""
    path = Path(job.folder) / JOB_FILE if job.folder else None
    if path is None or not path.is_file():
        return
    meta = _read_json(path)
    meta["status"] = job.status
    meta["error"] = job.error
    if job.model_dir:
        meta["engine_model_dir"] = job.model_dir
    _write_json(path, meta)


def finished_run(job_or_run) -> Path:
    """The run folder of a finished training, from its job folder or the run folder itself."""
    folder = Path(job_or_run)
    run = folder / _read_json(folder / JOB_FILE).get("run_dir", RUN_DIR) if (folder / JOB_FILE).is_file() else folder
    if not (run / "model.pt").is_file():
        raise ValueError(f"{folder} holds no finished training (model.pt): train it to the end, or Resume it, "
                         "before training more from it.")
    return run.absolute()
