"""What the commands do: train, resume, predict, suggest, evaluate. Used by the CLI and usable from Python."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import SimpleITK as sitk
import torch

from MNSegmentLib import config as configuration
from MNSegmentLib.data.datalist import Datalist, load_datalist
from MNSegmentLib.data.io import writable_folder, write_failed, write_json_atomic
from MNSegmentLib.data.preprocess import Plan, preprocess_datalist
from MNSegmentLib.device import amp_for, resolve_device
from MNSegmentLib.errors import Cancelled, InputError
from MNSegmentLib.evaluation.network_choice import (
    MODEL_CHOICE,
    VALIDATION_STOPPED,
    choose_network,
    read_choice,
    validation_scores,
)
from MNSegmentLib.events import Events
from MNSegmentLib.inference.predict import predict_files, predictor
from MNSegmentLib.inference.suggestions import (
    SUGGESTIONS_DIR,
    SUGGESTIONS_FILE,
    Scorer,
    check_output,
    suggest_files,
    with_absolute_maps,
)
from MNSegmentLib.models.network2d import build_model2d
from MNSegmentLib.models.network3d import build_model3d, check_patch_size
from MNSegmentLib.models.slicing import network_axes
from MNSegmentLib.planning.fingerprint import Fingerprint, fingerprint_datalist
from MNSegmentLib.planning.planner import PLANNED_KEYS, budget_from_config, explicit_settings, plan_experiment
from MNSegmentLib.training import distributed
from MNSegmentLib.training.continuation import SourceRun, source_of
from MNSegmentLib.training.teachers import unlabeled_unused
from MNSegmentLib.training.trainer import CHECKPOINT, MODEL, Trainer

log = logging.getLogger("mnsegment")


def _fresh_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if (output / CHECKPOINT).exists():
            raise InputError(f"{output} already holds a training run; continue it with "
                             f"'mnsegment resume {output}' or choose another --output folder")
        raise InputError(f"{output} exists and is not empty; choose a new --output folder")


def train(datalist_path: str | Path, output: str | Path, preset: str = "quick", device: str = "auto",
          overrides: dict | None = None, events: Events | None = None,
          stop: threading.Event | None = None, init_from: str | Path | None = None) -> Path:
    """Checks and preprocesses everything into a new run folder, then trains. Returns the run folder.

    ``init_from``: a finished run folder whose networks the new run starts from (see :mod:`continuation`).
    Bad input raises InputError before anything is left in ``output``.
    """
    events = events or Events(False)
    output = Path(output).absolute()
    ranks = distributed.current()
    if not ranks.is_main:  # rank 0 checks the input and preprocesses alone; the others train from its run folder
        ranks.wait_for_main()
        return resume(output, device, events, stop)
    ranks.main_prepares()  # the CLI announces a failure until the run folder is ready (below)
    overrides = overrides or {}
    source = SourceRun.open(init_from) if init_from is not None else None
    if source is not None:
        overrides = source.inherited(overrides, steps_set="train.steps" in overrides)
    config = configuration.apply_overrides(configuration.preset(preset), overrides)
    if source is not None:
        source.fine_tune(config, overrides)
    config["preset"] = preset
    datalist = load_datalist(datalist_path)
    if config["preview"]:  # an absolute path in config.json, so a resumed run finds the image too
        config["preview"] = str(Path(config["preview"]).absolute())
        try:
            check_images([Path(config["preview"])])
        except InputError as error:
            raise InputError(f"--preview {error}; choose a readable 3D image (or drop --preview)") from None
    torch_device = ranks.place(resolve_device(device))
    ranks.check_batch(config["sampling"]["batch_size"])
    _fresh_output(output)
    writable_folder(output.parent, "--output")
    _warn_if_labeled_only(datalist, config, events)
    experiment, fingerprint = plan_settings(config, datalist, overrides)  # before the networks are checked
    if source is not None:
        source.check_config(config)
        if datalist.classes:  # known before reading any label map
            source.check_label_values([0, *sorted(datalist.classes)])
        initial, pretrained2d = source.check_networks(config), None
        config["init_from"] = source.record()
    else:
        initial, pretrained2d = None, check_networks(config)
    # Everything is prepared in a hidden sibling folder and renamed at the end: an error or a cancel during
    # preprocessing leaves no half-made run folder behind.
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        log.info("checking and preprocessing %d labeled, %d unlabeled volumes", len(datalist.labeled),
                 len(datalist.unlabeled))
        stop = stop or threading.Event()
        try:
            plan = preprocess_datalist(datalist, config, partial / "cache", stop.is_set)
        except OSError as err:  # inputs are read through SimpleITK (InputError); this is the cache's writing
            raise write_failed(output / "cache", err) from None
        if stop.is_set():
            raise Cancelled()
        if source is not None:
            source.check_label_values(plan.label_values)
        plan.experiment = {**experiment, "target_spacing": plan.target_spacing,
                           "patch_size": config["sampling"]["patch_size"], "slice_axis": config["data"]["slice_axis"]}
        config["device"] = device
        configuration.save(config, partial / "config.json")
        write_json_atomic(partial / "plan.json", plan.to_json())
        if fingerprint is not None:
            write_json_atomic(partial / "fingerprint.json", fingerprint.to_json())
        write_json_atomic(partial / "datalist.json", datalist.to_json())
        if output.exists():
            output.rmdir()
        os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("plan: spacing %s mm, %s normalisation, classes %s", plan.target_spacing, plan.normalization,
             plan.classes)
    ranks.announce(0)
    return _run(output, config, plan, torch_device, events, stop, pretrained2d=pretrained2d, initial=initial)


def plan_settings(config: dict, datalist: Datalist, overrides: dict) -> tuple[dict, Fingerprint | None]:
    """Settles target spacing, patch size and slice axis in ``config`` as ``data.planning`` says: as configured
    (preset) or planned from the dataset's fingerprint within the preset's patch budget (auto). Values given with
    ``--set`` always win, and so do those the preset keeps (``config.KEPT_BY_PRESET``: the paper's crop).

    Returns the record for plan.json (where each value came from; with auto, the plan and its reasons in "why")
    and, with auto, the fingerprint.
    """
    preset = config["preset"]
    explicit = explicit_settings(overrides)
    if config["data"]["planning"] == "preset":
        sources = {key: "--set" if key in explicit else f"{preset} preset" for key in PLANNED_KEYS}
        if config["data"]["target_spacing"] is None:
            sources["data.target_spacing"] = "median spacing of the labeled cases"
        return {"planning": "preset", "sources": sources, "why": []}, None
    kept = {}
    for key in configuration.KEPT_BY_PRESET.get(preset, ()):
        if key not in explicit:
            section, name = key.split(".")
            kept[key] = config[section][name]
    fingerprint = fingerprint_datalist(datalist)
    experiment = plan_experiment(fingerprint, budget_from_config(config), {**explicit, **kept},
                                 given_by={key: f"kept from the {preset} preset (--set {key}=... changes it)"
                                           for key in kept})
    config["data"]["target_spacing"] = experiment.target_spacing
    config["sampling"]["patch_size"] = experiment.patch_size
    config["data"]["slice_axis"] = experiment.slice_axis
    configuration.validate(config)
    for reason in experiment.why:
        log.info("plan: %s", reason)
    sources = {key: "--set" if key in explicit else f"{preset} preset" if key in kept else "planned"
               for key in PLANNED_KEYS}
    return {"planning": "auto", "sources": sources, **experiment.to_json()}, fingerprint


def _warn_if_labeled_only(datalist: Datalist, config: dict, events: Events) -> None:
    """Co-training needs unlabeled volumes; without any, training runs as the labeled-only baseline."""
    if datalist.unlabeled or config["lrg"]["mode"] == "off":
        return
    message = ("no unlabeled volumes: training both networks on the labeled volumes only (no co-training); "
               "add unlabeled images to the datalist to use M&N")
    log.warning(message)
    events.emit("warning", message=message)


def check_networks(config: dict) -> tuple[dict[str, torch.Tensor], str]:
    """Builds both networks once before any data is touched, so a wrong backbone, weights file, 3D network or
    patch size is refused at once, not after preprocessing, and leaves no run folder behind.

    Returns the 2D encoder's tensors and their description for the Trainer, so the pretrained weights are read
    once. Built under the run's seed, as the Trainer builds its networks, they are exactly the tensors the
    Trainer would have made itself (LoRA adapters included); the class head is not in them.
    """
    torch.manual_seed(int(config["seed"]))
    model2d, description = build_model2d(config["model2d"], 2)
    check_patch_size(build_model3d(config["model3d"], 2), config["model3d"], config["sampling"]["patch_size"])
    encoder = {k: v for k, v in model2d.state_dict().items() if k.startswith("encoder.")}
    return encoder, description


def resume(run_dir: str | Path, device: str | None = None, events: Events | None = None,
           stop: threading.Event | None = None) -> Path:
    """Continues a run from its last checkpoint (or from the start if it was stopped before the first one)."""
    run_dir = Path(run_dir).absolute()
    config = configuration.load_run_config(run_dir / "config.json")
    if (run_dir / MODEL).exists():
        raise InputError(f"{run_dir} has finished training already (model.pt exists); nothing to resume")
    plan = Plan.from_json(configuration.load(run_dir / "plan.json"))
    torch_device = distributed.current().place(resolve_device(device or config.get("device", "auto")))
    return _run(run_dir, config, plan, torch_device, events or Events(False), stop, resuming=True)


def _run(run_dir: Path, config: dict, plan: Plan, device: torch.device, events: Events,
         stop: threading.Event | None, resuming: bool = False,
         pretrained2d: tuple[dict[str, torch.Tensor], str] | None = None,
         initial: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    datalist = load_datalist(run_dir / "datalist.json", check_files=False)
    distributed.current().check_batch(config["sampling"]["batch_size"])  # a resume may bring more ranks
    if resuming:
        _warn_if_labeled_only(datalist, config, events)
        source = source_of(config)
        if source is not None and not (run_dir / CHECKPOINT).exists():  # stopped before its first checkpoint
            initial = source.load_state()
    trainer = Trainer(run_dir, config, plan, datalist, device, events, stop, pretrained2d, initial)
    trainer.run()
    if not trainer.ranks.is_main:  # what follows writes files and events: rank 0's part
        return run_dir
    _write_curves(run_dir, trainer.history, events)
    unused = unlabeled_unused(trainer.history, trainer.fit)
    if unused:
        log.warning(unused)
        events.emit("warning", message=unused)
    choice = _choose_network(trainer, events, stop)
    write_json_atomic(run_dir / MODEL_CHOICE, choice)
    log.info("output network: %s (%s)", choice["network"], choice["reason"])
    suggested = _suggest_after_training(trainer, datalist, events, stop)
    events.emit("done", model_dir=str(run_dir), network=choice["network"], network_reason=choice["reason"],
                **suggested)
    return run_dir


def _suggest_after_training(trainer: Trainer, datalist: Datalist, events: Events,
                            stop: threading.Event | None) -> dict:
    """Ranks the unlabeled volumes to label next (inference.suggestions) with the networks just trained; the ``done``
    event carries the ranking. Like curves.png it is an extra: a missing image or a stop costs the suggestions,
    never the model (``mnsegment suggest`` makes them later)."""
    if not trainer.config["train"]["suggest"] or not datalist.unlabeled:
        return {}
    output = trainer.run_dir / SUGGESTIONS_DIR

    def check_stop(i: int, path: Path, volume: dict) -> None:
        if stop is not None and stop.is_set():
            raise Cancelled()

    scorer = Scorer(trainer.model2d, trainer.model3d, trainer.config, trainer.axes_2d, trainer.device,
                    trainer.amp.dtype)
    try:
        record = suggest_files([c.image for c in datalist.unlabeled], output, trainer.plan, scorer,
                               trainer.run_dir, check_stop)
    except (InputError, Cancelled) as error:
        message = f"no suggestions of what to label next ({error or 'stopped'}); make them with 'mnsegment suggest'"
        log.warning(message)
        events.emit("warning", message=message)
        return {}
    log.info("suggestions of what to label next (%.1f s): %s", record["seconds"], output / SUGGESTIONS_FILE)
    return {"suggestions": with_absolute_maps(record, output), "suggestions_file": str(output / SUGGESTIONS_FILE),
            "suggestions_s": record["seconds"]}


def _choose_network(trainer: Trainer, events: Events, stop: threading.Event | None) -> dict:
    """3D, 2D or ensemble, by Dice on the validation cases (evaluation.network_choice); without any, the preset's
    choice unless the networks' fit on the labeled patches shows one has not learnt the structure. A stop asked
    for once training has ended skips the validation (minutes on large scans) and keeps the trained model."""
    preset = trainer.config["inference"]["network"]
    if not trainer.validation:
        return choose_network(None, 0, preset, trainer.fit.dice)
    try:
        scores = validation_scores(trainer.model2d, trainer.model3d, trainer.validation, trainer.config,
                                   trainer.axes_2d, trainer.num_classes, trainer.device, trainer.amp.dtype, stop)
    except Cancelled:
        choice = choose_network(None, 0, preset, trainer.fit.dice, no_scores=VALIDATION_STOPPED)
        message = (f"{VALIDATION_STOPPED}, so the output network is not chosen on the validation cases: "
                   f"{choice['network']}; 'mnsegment predict --network 3d|2d|ensemble' overrides it")
        log.warning(message)
        events.emit("warning", message=message)
        return choice
    return choose_network(scores, len(trainer.validation), preset, trainer.fit.dice)


def _write_curves(run_dir: Path, history: list[dict], events: Events) -> None:
    """curves.png is a picture of a finished training: failing to draw it (matplotlib is optional and absent
    from a stock 3D Slicer) costs the picture, never the model."""
    try:
        from MNSegmentLib.plots import plot_learning_curves

        path = plot_learning_curves(history, run_dir / "curves.png", title=run_dir.name)
    except Exception as error:
        message = f"learning curves not drawn ({error})"
        log.warning(message)
        events.emit("warning", message=message)
        return
    log.info("learning curves: %s", path)


def load_models(run_dir: Path, device: torch.device) -> tuple[dict, Plan, torch.nn.Module, torch.nn.Module]:
    """The trained networks of a run folder, in eval mode (no pretrained weights or network access needed)."""
    config = configuration.load_run_config(run_dir / "config.json")
    plan = Plan.from_json(configuration.load(run_dir / "plan.json"))
    weights = run_dir / MODEL
    if not weights.exists():
        raise InputError(f"{run_dir} has no trained model ({MODEL}); train it to the end first "
                         f"(or 'mnsegment resume {run_dir}')")
    num_classes = len(plan.label_values)
    model2d, _ = build_model2d(config["model2d"], num_classes, load_weights=False)
    model3d = build_model3d(config["model3d"], num_classes)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model2d.load_state_dict(state["model2d"])
    model3d.load_state_dict(state["model3d"])
    return config, plan, model2d.to(device).eval(), model3d.to(device).eval()


def check_images(paths: list[Path]) -> None:
    """Reads every header first: one bad file stops the command before any output is written."""
    reader = sitk.ImageFileReader()
    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: file not found")
        if path.is_dir():
            continue  # DICOM folders are checked when read
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise InputError(f"{path}: cannot be read as an image; use NIfTI, NRRD, MHA or a DICOM folder") from None
        if reader.GetDimension() not in (3, 4) or reader.GetNumberOfComponents() != 1:
            raise InputError(f"{path}: MNSegment needs a scalar 3D image")


def predict(model_dir: str | Path, images: list[str | Path], output_dir: str | Path, network: str | None = None,
            device: str = "auto", overlay: bool = False, events: Events | None = None,
            stop: threading.Event | None = None, references: str | Path | None = None) -> list[Path]:
    """Writes ``output_dir/<name>.nii.gz`` for each image, on that image's exact grid.

    With ``overlay``, also ``<name>_overlay.png``; ``references`` (a label map, or a folder of them matched by
    file name) adds the reference contour to the overlays. A set ``stop`` ends the command between two images
    (those written stay complete).
    """
    events = events or Events(False)
    paths = [Path(p).absolute() for p in images]
    check_images(paths)
    if overlay:  # before any work: a missing optional package is the user's to fix, not a crash after predicting
        try:
            import MNSegmentLib.plots  # noqa: F401
        except ImportError:
            raise InputError('--overlay draws its pictures with matplotlib, which is not installed: '
                             'pip install "mnsegment[plots]", or predict without --overlay') from None
    ranks = distributed.current()
    torch_device = ranks.place(resolve_device(device))
    config, plan, model2d, model3d = load_models(Path(model_dir), torch_device)
    writable_folder(Path(output_dir), "--output")
    network = network or _default_network(Path(model_dir), config)
    if network not in ("3d", "2d", "ensemble"):
        raise InputError(f"--network {network}: use 3d, 2d or ensemble")
    predict_fn = predictor(network, model2d, model3d, network_axes(config, plan.target_spacing),
                           config["model2d"]["chunk_slices"])
    amp = amp_for(torch_device, config["train"]["amp"])

    reference_files = _references(references, paths)
    names = {int(k): v for k, v in plan.classes.items()}

    def done(i: int, source: Path, written: Path) -> None:
        log.info("%s -> %s", source, written)
        if overlay:
            write_overlay(source, written, reference_files.get(source), names)
        if stop is not None and stop.is_set() and i + 1 < len(paths):
            raise Cancelled()
        events.emit("prediction", index=i, total=len(paths), image=str(source), path=str(written))

    if ranks.world > 1:
        def finish(source: Path, written: Path) -> None:
            if overlay:
                write_overlay(source, written, reference_files.get(source), names)

        return _predict_on_ranks(ranks, paths, Path(output_dir), plan, predict_fn, config, torch_device, amp.dtype,
                                 finish, events, stop)
    return predict_files(paths, Path(output_dir), plan, predict_fn, config, torch_device, amp.dtype, done)


def _predict_on_ranks(ranks: distributed.Ranks, paths: list[Path], output_dir: Path, plan: Plan, predict_fn,
                      config: dict, device: torch.device, autocast_dtype: torch.dtype | None, finish,
                      events: Events, stop: threading.Event | None) -> list[Path]:
    """One scan per rank at a time (rank r takes scans r, r + N, ...), each predicted exactly as one process
    would. After each round rank 0 reports the round's scans in order, and the ranks agree on a stop request:
    a stop ends the command between rounds, with every written file complete."""
    mine = list(range(ranks.rank, len(paths), ranks.world))
    rounds = -(-len(paths) // ranks.world)
    written: dict[int, Path] = {}
    for round_ in range(rounds):
        result = None
        if round_ < len(mine):
            i = mine[round_]
            out = predict_files([paths[i]], output_dir, plan, predict_fn, config, device, autocast_dtype)[0]
            finish(paths[i], out)
            result = (i, str(out))
        for item in ranks.gather(result):
            if item is not None:
                i, out = item
                written[i] = Path(out)
                log.info("%s -> %s", paths[i], out)
                events.emit("prediction", index=i, total=len(paths), image=str(paths[i]), path=out)
        if round_ + 1 < rounds and ranks.any(stop is not None and stop.is_set()):
            raise Cancelled()
    return [written[i] for i in sorted(written)]


def suggest(model_dir: str | Path, images: list[str | Path] | None = None, output_dir: str | Path | None = None,
            device: str = "auto", events: Events | None = None, stop: threading.Event | None = None) -> dict:
    """Ranks ``images`` (default: the run's unlabeled volumes) by what labeling them would teach the run's
    networks (inference.suggestions); writes ``suggestions.json`` and the disagreement maps into ``output_dir``
    (default ``RUN/suggestions``) and returns the record with absolute map paths."""
    events = events or Events(False)
    model_dir = Path(model_dir).absolute()
    if not (model_dir / MODEL).is_file():
        raise InputError(f"{model_dir} holds no trained model ({MODEL}); pass the run folder of a finished "
                         "'mnsegment train' to --model")
    if images:
        paths = [Path(p).absolute() for p in images]
    else:
        paths = [c.image for c in load_datalist(model_dir / "datalist.json", check_files=False).unlabeled]
        if not paths:
            raise InputError(f"{model_dir} was trained without unlabeled volumes; name the images to rank: "
                             f"'mnsegment suggest --model {model_dir} IMAGE ...'")
    check_images(paths)
    output = Path(output_dir).absolute() if output_dir else model_dir / SUGGESTIONS_DIR
    check_output(output)
    torch_device = resolve_device(device)
    config, plan, model2d, model3d = load_models(model_dir, torch_device)
    writable_folder(output.parent, "--output")
    scorer = Scorer(model2d, model3d, config, network_axes(config, plan.target_spacing), torch_device,
                    amp_for(torch_device, config["train"]["amp"]).dtype)

    def scored(i: int, path: Path, volume: dict) -> None:
        log.info("%s: score %.3f", path, volume["score"])
        if stop is not None and stop.is_set() and i + 1 < len(paths):
            raise Cancelled()
        events.emit("suggestion", index=i, total=len(paths), image=str(path), score=volume["score"])

    record = suggest_files(paths, output, plan, scorer, model_dir, scored)
    return {**record, "volumes": with_absolute_maps(record, output), "file": str(output / SUGGESTIONS_FILE)}


def _default_network(run_dir: Path, config: dict) -> str:
    """The network chosen after training (model.json); run folders from before that keep inference.network."""
    choice = read_choice(run_dir)
    if choice is None:
        log.info("network %s (inference.network of config.json)", config["inference"]["network"])
        return config["inference"]["network"]
    log.info("network %s (model.json: %s)", choice["network"], choice["reason"])
    return choice["network"]


def _references(references: str | Path | None, images: list[Path]) -> dict[Path, Path]:
    """Reference label map of each image, by file name, from a folder (or one file for one image)."""
    if references is None:
        return {}
    references = Path(references)
    if references.is_file():
        if len(images) != 1:
            raise InputError(f"--reference {references}: a single file fits one image; pass a folder of label "
                             "maps named like the images")
        return {images[0]: references}
    if not references.is_dir():
        raise InputError(f"--reference {references}: not found")
    from MNSegmentLib.data.io import case_name
    from MNSegmentLib.evaluation.metrics import image_files

    available = image_files(references)
    return {image: available[case_name(image)] for image in images if case_name(image) in available}


def write_overlay(image_path: Path, prediction_path: Path, reference_path: Path | None = None,
                  classes: dict[int, str] | None = None) -> Path:
    """A PNG next to the prediction: axial, coronal and sagittal slices with contours."""
    from MNSegmentLib.data.io import array_xyz, read_image
    from MNSegmentLib.data.preprocess import canonical
    from MNSegmentLib.plots import plot_overlay

    image = canonical(read_image(image_path))
    prediction = canonical(read_image(prediction_path))
    reference = array_xyz(canonical(read_image(reference_path)), dtype=None) if reference_path else None
    out = prediction_path.with_name(prediction_path.name.replace(".nii.gz", "") + "_overlay.png")
    return plot_overlay(array_xyz(image), array_xyz(prediction, dtype=None), image.GetSpacing(), out,
                        reference=reference, class_names=classes, title=prediction_path.name)
