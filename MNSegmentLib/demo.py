"""``mnsegment demo``: an offline end-to-end run on a small dataset, M&N against the labeled-only baseline."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

from .metrics import evaluate
from .workflow import predict, train

log = logging.getLogger("mnsegment")
_MARKER = ".mnsegment-demo"


def demo_dataset(data_dir: Path) -> tuple[Path, list[dict], str]:
    """The real-anatomy T1 task when nilearn is installed, else synthetic blobs.

    Returns the datalist, the held-out test cases (image + hidden label) and a description.
    """
    try:
        from .realdata import make_t1_task

        datalist = make_t1_task(data_dir / "t1_wm", n_labeled=2, n_unlabeled=3, n_test=3, structure="wm",
                                seed=0, resolution_mm=3.0)
        tests = json.loads((datalist.parent / "test.json").read_text(encoding="utf-8"))["test"]
        tests = [{k: str(datalist.parent / v) for k, v in case.items()} for case in tests]
        return datalist, tests, "white matter in T1 MR volumes made from the real MNI152 template"
    except ImportError as err:
        log.info("%s; using synthetic data instead", err)
    from .synthetic import make_blob_dataset

    datalist = make_blob_dataset(data_dir / "blobs", n_labeled=3, n_unlabeled=5)
    entries = json.loads(datalist.read_text(encoding="utf-8"))["unlabeled"]
    tests = [{"image": str(datalist.parent / e["image"]),
              "label": str(datalist.parent / e["image"].replace("images/", "labels/"))} for e in entries]
    return datalist, tests, "synthetic bright ellipsoids in noisy volumes"


def run_demo(output: Path, device: str = "auto", stop: threading.Event | None = None) -> dict[str, float]:
    output = Path(output).absolute()
    if output.exists() and any(output.iterdir()) and not (output / _MARKER).exists():
        from .errors import InputError

        raise InputError(f"{output} exists and was not made by the demo; choose another --output folder")
    output.mkdir(parents=True, exist_ok=True)
    (output / _MARKER).touch()
    for old in ("runs", "predictions"):  # a new demo run replaces the last one's results (data is reused)
        shutil.rmtree(output / old, ignore_errors=True)
    datalist, tests, description = demo_dataset(output / "data")
    log.info("demo data: %s (%s)", description, datalist)
    images = [case["image"] for case in tests]
    results, timings = {}, {}
    for name, overrides in (("mn", {}), ("labeled_only", {"lrg.mode": "off"})):
        started = time.monotonic()
        run_dir = train(datalist, output / "runs" / name, "quick", device, overrides, stop=stop)
        timings[name] = time.monotonic() - started
        predictions = output / "predictions" / name
        reference_dir = Path(tests[0]["label"]).parent
        predict(run_dir, images, predictions, device=device, overlay=name == "mn", stop=stop,
                references=reference_dir)
        results[name] = evaluate(predictions, reference_dir)
    print(f"\nMNSegment demo: {description}")
    print(f"{len(json.loads(datalist.read_text())['labeled'])} labeled volumes; Dice on {len(tests)} held-out volumes")
    dice = {}
    for name, label in (("mn", "M&N co-training"), ("labeled_only", "labeled-only baseline")):
        means = results[name]["mean"]
        dice[name] = sum(m["dice"] for m in means.values()) / max(len(means), 1)
        print(f"  {label:<24} Dice {dice[name]:.3f}   (trained in {timings[name]:.0f} s)")
    print("\nOutputs:")
    print(f"  predictions     {output / 'predictions'}")
    print(f"  learning curves {output / 'runs' / 'mn' / 'curves.png'}")
    print(f"  overlays        {output / 'predictions' / 'mn'}/*_overlay.png")
    print(f"  model           {output / 'runs' / 'mn'}  (mnsegment predict --model {output / 'runs' / 'mn'} ...)")
    return dice
