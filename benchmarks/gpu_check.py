"""GPU check (issue 9): one command, under 8 minutes on one GPU, that shows whether training is GPU-bound.

For ``default`` and ``paper`` (its true batch of 5), with mixed precision on and off, a fresh subprocess trains
the engine's real loop (``Trainer.run``: background prefetch, pseudo-mask refresh, both stages) on a synthetic
task (``MNSegmentLib.data.synthetic``, volumes 1.25x the patch) and records

    steps/s          over the timed steps (the first ``--skip`` steps, with cuDNN autotuning, are left out)
    data wait        share of step time spent waiting for the batch (the goal: under 10 %)
    peak GPU memory  ``torch.cuda.max_memory_allocated`` over the steps (the goal: ``default`` within 12 GB)

then trains ``default`` for ``--predict-steps`` steps and predicts an unlabeled volume, with its Dice against the
hidden ground truth (a smoke test of train -> predict on the GPU, not an accuracy measurement).
Half the steps are stage 1, half stage 2 (co-training, students alternating every 8 steps). 2D weights are
``none`` (nothing is downloaded; weights do not change speed or memory).

Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (the table for docs/BENCHMARKS.md).

On a GPU (what a maintainer runs)::

    python benchmarks/gpu_check.py --out benchmarks/out/gpu_check

Smoke test of the script's logic on a CPU (tiny patches; the numbers mean nothing)::

    python benchmarks/gpu_check.py --device cpu --steps 2 --skip 0 --predict-steps 4 \
        --set 'sampling.patch_size=[32,32,16]' sampling.batch_size=1 --out benchmarks/out/gpu_check_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine_info import machine  # benchmarks/ is on sys.path when run as a script

GOAL_MEMORY_GB = 12.0  # default preset
GOAL_DATA_WAIT = 0.10


def _overrides(items: list[str]) -> dict:
    from MNSegmentLib.config import parse_set_args

    return parse_set_args(items)


# ---------------------------------------------------------------------------------------------- worker side
def _setup(preset: str, overrides: dict, work: Path, steps: int):
    """A fresh run folder on the synthetic task, preprocessed; returns (config, plan, datalist)."""
    from MNSegmentLib import config as configuration
    from MNSegmentLib.data.datalist import load_datalist
    from MNSegmentLib.data.preprocess import preprocess_datalist
    from MNSegmentLib.data.synthetic import make_blob_dataset

    cfg = configuration.apply_overrides(configuration.preset(preset), {
        "model2d.weights": "none", "seed": 0, "train.steps": steps, "train.warmup_fraction": 0.5,
        "train.checkpoint_every": 10**6, "train.validate_every": 10**6, **overrides})
    cfg["preset"] = preset
    shape = tuple(int(round(p * 1.25)) for p in cfg["sampling"]["patch_size"])
    datalist = load_datalist(make_blob_dataset(work / "data", n_labeled=2, n_unlabeled=2, shape=shape,
                                               spacing=(1.0, 1.0, 1.0), seed=0))
    plan = preprocess_datalist(datalist, cfg, work / "run" / "cache")
    return cfg, plan, datalist


def timing_worker(args: argparse.Namespace) -> dict:
    import torch

    from MNSegmentLib.events import Events
    from MNSegmentLib.training.trainer import Trainer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    work = Path(args.out) / f"work_{args.preset}_amp{int(args.amp)}"
    overrides = {**_overrides(args.set), "train.amp": args.amp}
    cfg, plan, datalist = _setup(args.preset, overrides, work, args.skip + args.steps)
    trainer = Trainer(work / "run", cfg, plan, datalist, device, Events(False))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - started
    timed = trainer.timings[args.skip:]
    wait = sum(w for w, _ in timed)
    total = sum(t for _, t in timed)
    return {
        "preset": args.preset, "amp": args.amp, "amp_dtype": str(trainer.amp.dtype), "device": args.device,
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "batch_size": cfg["sampling"]["batch_size"], "patch_size": cfg["sampling"]["patch_size"],
        "model2d": cfg["model2d"]["name"], "steps_timed": len(timed), "steps_skipped": args.skip,
        "steps_per_s": len(timed) / total if total else None, "s_per_step": total / len(timed) if timed else None,
        "data_wait_share": wait / total if total else None,
        "gpu_peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "gpu_peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        "micro_batch_after": trainer.micro_batch, "run_wall_s": round(wall, 1),
        "losses_finite": all(v is None or v == v for r in trainer.history for v in (r["loss_2d"], r["loss_3d"])),
    }


def predict_worker(args: argparse.Namespace) -> dict:
    """Train ``default`` briefly through the public workflow, then predict one unlabeled volume."""
    from MNSegmentLib import workflow
    from MNSegmentLib.data.synthetic import make_blob_dataset
    from MNSegmentLib.evaluation.metrics import evaluate

    work = Path(args.out) / "work_train_predict"
    data = work / "data"
    datalist = make_blob_dataset(data, n_labeled=2, n_unlabeled=2, shape=(96, 96, 60), spacing=(1.0, 1.0, 1.0))
    started = time.perf_counter()
    run = workflow.train(datalist, work / "run", "default", args.device, {
        "model2d.weights": "none", "train.steps": args.predict_steps, "train.warmup_fraction": 0.5,
        **_overrides(args.set)})
    trained = time.perf_counter()
    image = data / "images" / "case03.nii.gz"
    written = workflow.predict(run, [image], work / "pred", device=args.device)
    predicted = time.perf_counter()
    dice = evaluate(written[0], data / "labels" / "case03.nii.gz")["mean"]["1"]["dice"]
    return {"steps": args.predict_steps, "train_s": round(trained - started, 1),
            "predict_s": round(predicted - trained, 1), "dice": dice}


# ---------------------------------------------------------------------------------------------- driver side
def table(result: dict) -> str:
    lines = ["| preset | AMP | batch | patch | steps/s | s/step | data wait | GPU peak allocated (GB) | "
             "GPU peak reserved (GB) |", "|---|---|---|---|---|---|---|---|---|"]

    def number(value, fmt):
        return format(value, fmt) if value is not None else "–"

    for r in result["timing"]:
        lines.append(
            f"| {r['preset']} | {_amp(r)} | {r['batch_size']} | "
            f"{'×'.join(map(str, r['patch_size']))} | {number(r['steps_per_s'], '.2f')} | "
            f"{number(r['s_per_step'], '.3f')} | {number(100 * r['data_wait_share'], '.1f')} % | "
            f"{number(r['gpu_peak_allocated_gb'], '.2f')} | {number(r['gpu_peak_reserved_gb'], '.2f')} |")
    p = result.get("train_predict")
    if p:
        lines.append("")
        lines.append(f"train → predict (`default`, {p['steps']} steps): train {p['train_s']} s, predict "
                     f"{p['predict_s']} s, Dice {p['dice']:.3f} (synthetic task; a smoke test, not accuracy)")
    lines.append("")
    lines += [f"- {goal}: {'met' if ok else 'NOT met'}" for goal, ok in result["goals"].items()]
    return "\n".join(lines)


def _amp(row: dict) -> str:
    if not row["amp"]:
        return "off"
    return row["amp_dtype"].removeprefix("torch.") if row["amp_dtype"] != "None" else "on (no effect on CPU)"


def goals(rows: list[dict], cuda: bool) -> dict[str, bool | None]:
    default = [r for r in rows if r["preset"] == "default"]
    out = {f"data wait under {GOAL_DATA_WAIT:.0%} of step time (every row)":
           bool(rows) and all(r["data_wait_share"] is not None and r["data_wait_share"] < GOAL_DATA_WAIT
                              for r in rows)}
    if cuda:
        out[f"default within {GOAL_MEMORY_GB:.0f} GB of GPU memory (peak allocated, AMP on and off)"] = (
            bool(default) and all(r["gpu_peak_allocated_gb"] < GOAL_MEMORY_GB for r in default))
    return out


def _run_worker(mode: str, extra: list[str], args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", mode, "--device", args.device, "--out", str(args.out),
           "--steps", str(args.steps), "--skip", str(args.skip), "--predict-steps", str(args.predict_steps),
           *extra, "--set", *args.set]
    print(f"[{time.strftime('%H:%M:%S')}] {mode} {' '.join(extra)} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(f"  FAILED (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None
    row = json.loads(line[len("RESULT "):])
    print("  " + json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (smoke test only)")
    p.add_argument("--presets", nargs="+", default=["default", "paper"])
    p.add_argument("--steps", type=int, default=40, help="timed steps per preset and AMP setting")
    p.add_argument("--skip", type=int, default=5, help="untimed first steps (cuDNN autotuning, allocator)")
    p.add_argument("--predict-steps", type=int, default=200, help="steps of the train -> predict check (0: skip)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu_check"))
    p.add_argument("--worker", choices=["timing", "predict"], help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--amp", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out.absolute()

    if args.worker:  # one measurement in this fresh process (its own peak memory)
        args.amp = bool(args.amp)
        result = timing_worker(args) if args.worker == "timing" else predict_worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = []
    for preset in args.presets:
        for amp in (1, 0):
            row = _run_worker("timing", ["--preset", preset, "--amp", str(amp)], args)
            if row:
                rows.append(row)
    predicted = _run_worker("predict", [], args) if args.predict_steps else None
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv), "machine": machine(),
              "timing": rows, "train_predict": predicted, "elapsed_s": round(time.time() - started, 1)}
    result["goals"] = goals(rows, args.device.startswith("cuda"))
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (args.out / "gpu_check.md").write_text(table(result) + "\n")
    print("\n" + table(result))
    print(f"\nwritten: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'} ({result['elapsed_s']} s)")
    failed = len(rows) < 2 * len(args.presets) or (args.predict_steps and predicted is None)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
