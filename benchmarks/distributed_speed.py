"""Distributed training speed (issue 10): N CPU ranks (gloo) x 1 thread vs 1 process x N threads, or N GPUs vs 1.

Both train the same tiny synthetic task with the same global batch (``sampling.batch_size``): the N-rank run
splits it across ranks; the 1-process run computes all of it (on the CPU with N intra-op threads). Each run is a real
``mnsegment train --events`` subprocess; its speed is measured from its progress events (arrival time and step),
between the first event at or after ``--skip`` steps and the last one, so start-up (imports, preprocessing, the
first steps) is left out while pseudo-mask refreshes, checkpoints and all-reduces stay in.

The two configurations are run alternately (A B A B ...) and compared pair by pair, as ratios: the machine may be
shared, and alternation spreads slow periods over both.

Usage (CPU, what docs/BENCHMARKS.md reports; and on a machine with 4 GPUs)::

    python benchmarks/distributed_speed.py --pairs 3 --steps 60 --out benchmarks/out/distributed_speed
    python benchmarks/distributed_speed.py --device cuda --gpus 4 --preset default --batch 8 --steps 300 \
        --skip 50 --pairs 2 --out benchmarks/out/distributed_speed_gpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine_info import machine  # benchmarks/ is on sys.path when run as a script


def configs(device: str, n: int) -> dict[str, tuple[list[str], str | None]]:
    """name -> (extra CLI arguments, OMP_NUM_THREADS or None to leave it); the distributed one first."""
    if device == "cpu":
        return {f"{n} ranks x 1 thread": (["--gpus", str(n)], "1"), f"1 rank x {n} threads": ([], str(n))}
    return {f"{n} GPUs": (["--gpus", str(n)], None), "1 GPU": ([], None)}


def run_once(datalist: Path, output: Path, extra: list[str], threads: str | None, args: argparse.Namespace) -> dict:
    settings = {"train.steps": args.steps, "sampling.batch_size": args.batch, "model2d.weights": "none",
                "train.checkpoint_every": 100000}
    command = [sys.executable, "-m", "MNSegmentLib.cli", "train", str(datalist), "--output", str(output),
               "--preset", args.preset, "--device", args.device, "--events", *extra]
    for key, value in settings.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    points = []
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and "activity" not in event:
            points.append((time.monotonic(), event["step"]))
    code = proc.wait()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} ended with exit code {code}")
    measured = [(t, s) for t, s in points if s >= args.skip]
    (t0, s0), (t1, s1) = measured[0], measured[-1]
    return {"steps_per_s": (s1 - s0) / (t1 - t0), "measured_steps": s1 - s0, "measured_s": t1 - t0,
            "wall_s": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--skip", type=int, default=10, help="steps left out at the start of each run")
    parser.add_argument("--batch", type=int, default=4, help="global batch (patches per step, all ranks)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo ranks) or cuda (one rank per GPU)")
    parser.add_argument("--gpus", type=int, default=2, help="ranks of the distributed configuration")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/distributed_speed"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from MNSegmentLib.data.synthetic import make_blob_dataset

    datalist = make_blob_dataset(args.out / "data", n_labeled=4, n_unlabeled=4, shape=(60, 60, 40))
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "settings": vars(args) | {"out": str(args.out)}, "runs": []}
    compared = configs(args.device, args.gpus)
    distributed, single = list(compared)  # names: the distributed configuration first
    for pair in range(args.pairs):
        row = {}
        for name, (extra, threads) in compared.items():  # alternately: A B A B ...
            output = args.out / f"run-{pair}-{'ranks' if extra else 'single'}"
            shutil.rmtree(output, ignore_errors=True)
            row[name] = run_once(datalist, output, extra, threads, args)
            print(f"pair {pair} {name}: {row[name]['steps_per_s']:.3f} steps/s", flush=True)
        row["ratio"] = row[distributed]["steps_per_s"] / row[single]["steps_per_s"]
        results["runs"].append(row)
        print(f"pair {pair} ratio ({distributed} / {single}): {row['ratio']:.3f}", flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
