"""Shared helpers for the engine tests (``test_engine_*.py``): tiny on-disk datasets, CLI subprocesses and one
tiny trained run reused by every module of a pytest session.

Import explicitly (``from engine_fixtures import ...``); this is not a conftest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

# The tiny configuration every training test starts from: quick preset, small patches and batches.
TINY_SET = {
    "sampling.batch_size": 2,
    "sampling.patch_size": [32, 32, 16],
    "model2d.weights": "none",
}
SHAPE = (32, 32, 20)  # voxels (x, y, z) of the tiny volumes
SPACING = (1.0, 1.0, 2.0)  # anisotropic, mm


def set_args(overrides: dict) -> list[str]:
    """``{"a.b": 1}`` -> ``["--set", "a.b=1"]`` (values as JSON)."""
    out = []
    for key, value in overrides.items():
        out += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return out


def sphere_arrays(rng: np.random.Generator, shape=SHAPE, spacing=SPACING) -> tuple[np.ndarray, np.ndarray]:
    """An easy case in (x, y, z) order: a bright ball (label 1) of random radius and position in mild noise."""
    spacing = np.asarray(spacing, float)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) * spacing
    extent = (np.asarray(shape) - 1) * spacing
    centre = extent * rng.uniform(0.35, 0.65, 3)
    radius = rng.uniform(5.0, 8.0)
    ball = np.linalg.norm(grid - centre, axis=-1) <= radius
    image = 100.0 + 250.0 * ball + rng.normal(0, 15, shape)
    return image.astype(np.float32), ball.astype(np.uint8)


def to_image(array_xyz: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    if direction is not None:
        image.SetDirection([float(v) for v in np.asarray(direction).ravel()])
    return image


def make_dataset(root: Path, n_labeled: int = 3, n_unlabeled: int = 2, seed: int = 0,
                 classes: dict | None = None) -> Path:
    """images/, labels/ and datalist.json of tiny sphere cases; returns the datalist path."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labeled, unlabeled = [], []
    for i in range(n_labeled + n_unlabeled):
        image, label = sphere_arrays(rng)
        origin = (-10.0 + i, 5.0, -20.0)
        sitk.WriteImage(to_image(image, origin=origin), str(root / "images" / f"case{i}.nii.gz"))
        sitk.WriteImage(to_image(label, origin=origin), str(root / "labels" / f"case{i}.nii.gz"))
        if i < n_labeled:
            labeled.append({"image": f"images/case{i}.nii.gz", "label": f"labels/case{i}.nii.gz"})
        else:
            unlabeled.append({"image": f"images/case{i}.nii.gz"})
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"labeled": labeled, "unlabeled": unlabeled,
                                    "classes": classes if classes is not None else {"1": "ball"}}))
    return datalist


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "MNSegmentLib.cli", *[str(a) for a in args]]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"  # events may hold non-ASCII text (the planner's "32×32×16"), as Slicer's job sets
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None,
            file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """``file_size_limit``: a full disk, simulated without privileges: the process may not write any file beyond
    that many bytes (RLIMIT_FSIZE; such writes fail with EFBIG, as on a full disk they fail with ENOSPC)."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, encoding="utf-8", timeout=timeout,
                          env=cli_env(),
                          cwd=cwd, preexec_fn=_limit_file_size(file_size_limit) if file_size_limit else None)


def _limit_file_size(limit: int):
    def apply() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def parse_events(stdout: str) -> list[dict]:
    """Every stdout line must be one JSON object with an "event" key."""
    events = []
    for line in stdout.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict) and "event" in record, line
        events.append(record)
    return events


def model_state(run_dir: Path, name: str = "model.pt") -> dict[str, torch.Tensor]:
    state = torch.load(Path(run_dir) / name, map_location="cpu", weights_only=True)
    return {f"{net}.{k}": v for net in ("model2d", "model3d") for k, v in state[net].items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the shared trained run -------------------------------------------------------------------------------------
# Trained once per pytest session with a real `mnsegment train` subprocess; the CLI tests also train an
# interrupted+resumed copy with exactly these arguments and compare the weights.
TRAINED_STEPS = 30
# Pseudo-masks are refreshed at steps 15 (start of stage 2) and 27; the 3D network trains in between (steps
# 23-26), so the two versions differ (the kill -9 resume test relies on that).
TRAINED_SET = {**TINY_SET, "train.steps": TRAINED_STEPS, "train.warmup_fraction": 0.5, "train.lr_3d": 0.005,
               "train.checkpoint_every": 1000, "sampling.foreground_fraction": 0.7, "train.refresh_at": [0.9]}

_lock = threading.Lock()
_cache: dict[str, object] = {}


class TrainedRun:
    def __init__(self, root: Path, datalist: Path, run_dir: Path, result: subprocess.CompletedProcess):
        self.root, self.datalist, self.run_dir, self.result = root, datalist, run_dir, result
        self.events = parse_events(result.stdout) if result.returncode == 0 else []


def train_args(datalist: Path, output: Path) -> list[str]:
    return ["train", str(datalist), "--output", str(output), "--preset", "quick", "--device", "cpu", "--events",
            *set_args(TRAINED_SET)]


def trained_run(tmp_path_factory) -> TrainedRun:
    """The session's tiny trained run (trained on first use)."""
    with _lock:
        if "run" not in _cache:
            root = tmp_path_factory.mktemp("trained")
            datalist = make_dataset(root / "data")
            run_dir = root / "run"
            result = run_cli(*train_args(datalist, run_dir), timeout=600)
            _cache["run"] = TrainedRun(root, datalist, run_dir, result)
        run = _cache["run"]
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    return run
