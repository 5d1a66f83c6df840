"""Speed / memory benchmark (issue 4): co-training step time, peak memory and where a step's time goes.

For each preset, a fresh subprocess (so peak RSS is per preset) builds the engine's ``Trainer`` on a tiny
synthetic task (``MNSegmentLib.data.synthetic.make_blob_dataset``, volumes 1.25x the patch size so crops are real
crops, not padding) and times ``Trainer.train_step`` at three kinds of step:

    stage1      both networks train on a labeled batch
    stage2_2d   co-training, the 2D network is the student, the 3D network the (no-grad) teacher
    stage2_3d   co-training, the 3D network is the student, the 2D network the teacher

Stage-2 steps use ``lrg.mode=fixed, lrg.share=0.5`` so that half of every batch is unlabeled (a mid-training
batch; with the default ``lr`` mode the share moves from 0 to the 0.8 cap). Each kind gets one untimed warm-up
step, then ``N`` timed steps (the training state moves on, as in training). The engine is not modified: the
benchmark wraps, on the Trainer *instance*, the patch samplers, ``_forward`` (teacher calls are recognised by
grad being disabled) and ``_train_student``; "loss+backward+optimizer" is the student time minus its forwards.

The 2D weights are ``none`` (random init; the weights do not change the speed and nothing is downloaded).
Peak host memory = ``ru_maxrss`` of the subprocess; GPU peak = ``torch.cuda.max_memory_allocated`` (CUDA only).

Usage (what docs/BENCHMARKS.md reports; CPU, one thread, paper batch reduced to 1)::

    python benchmarks/speed.py --device cpu --threads 1 --presets quick default paper \
        --steps quick=5 default=2 paper=1 --batch paper=1 --out benchmarks/out/speed

On a GPU (not measured in the session that wrote the doc)::

    python benchmarks/speed.py --device cuda --presets quick default paper --steps quick=20 default=10 paper=5 \
        --out benchmarks/out/speed_gpu
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

KINDS = ("stage1", "stage2_2d", "stage2_3d")
PARTS = ("sample_labeled", "sample_unlabeled", "fwd_student_2d", "fwd_student_3d", "teacher_2d", "teacher_3d",
         "bwd_opt_2d", "bwd_opt_3d")


def _kv(items: list[str], cast=int) -> dict[str, int]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = cast(value)
    return out


# ---------------------------------------------------------------------------------------------- worker side
class Timers:
    def __init__(self, sync):
        self.sync = sync
        self.acc: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.acc[key] = self.acc.get(key, 0.0) + seconds

    def reset(self) -> dict[str, float]:
        acc, self.acc = self.acc, {}
        return acc


def instrument(trainer, timers: Timers) -> None:
    """Wraps the trainer's pieces on the instance (the engine's code is unchanged)."""
    import torch

    sync = timers.sync

    def wrap_sampler(sampler, key):
        original = sampler.sample

        def sample(n, rng):
            t0 = time.perf_counter()
            out = original(n, rng)
            timers.add(key, time.perf_counter() - t0)
            return out

        sampler.sample = sample

    wrap_sampler(trainer.labeled, "sample_labeled")
    wrap_sampler(trainer.unlabeled, "sample_unlabeled")

    original_forward = trainer._forward
    forward_in_student: dict[str, float] = {}

    def forward(network, x):
        sync()
        t0 = time.perf_counter()
        out = original_forward(network, x)
        sync()
        dt = time.perf_counter() - t0
        key = f"fwd_student_{network}" if torch.is_grad_enabled() else f"teacher_{network}"
        timers.add(key, dt)
        forward_in_student["t"] = forward_in_student.get("t", 0.0) + dt
        return out

    trainer._forward = forward

    original_student = trainer._train_student

    def train_student(network, *batch):
        forward_in_student["t"] = 0.0
        sync()
        t0 = time.perf_counter()
        out = original_student(network, *batch)
        sync()
        timers.add(f"bwd_opt_{network}", time.perf_counter() - t0 - forward_in_student["t"])
        return out

    trainer._train_student = train_student


def steps_of_kind(trainer, kind: str, count: int) -> list[int]:
    """``count`` step indices of the given kind (stage 1 / stage-2 2D turn / stage-2 3D turn)."""
    want = {"stage1": (True, True), "stage2_2d": (True, False), "stage2_3d": (False, True)}[kind]
    start = max(trainer.warmup, 0) if kind == "stage1" else trainer.stage2
    found, s = [], start
    while len(found) < count:
        if trainer._students(s) == want and (kind != "stage1" or s < trainer.stage2):
            found.append(s)
        s += 1
    return found


def worker(args: argparse.Namespace) -> dict:
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from MNSegmentLib import config as configuration
    from MNSegmentLib.data.datalist import load_datalist
    from MNSegmentLib.data.preprocess import preprocess_datalist
    from MNSegmentLib.data.synthetic import make_blob_dataset
    from MNSegmentLib.events import Events
    from MNSegmentLib.training.trainer import Trainer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    overrides = {"lrg.mode": "fixed", "lrg.share": 0.5, "model2d.weights": "none", "seed": 0}
    if args.batch:
        overrides["sampling.batch_size"] = args.batch
    cfg = configuration.apply_overrides(configuration.preset(args.preset), overrides)
    cfg["preset"] = args.preset
    patch = cfg["sampling"]["patch_size"]
    work = Path(args.out) / f"work_{args.preset}_{args.device}_t{args.threads}_b{cfg['sampling']['batch_size']}"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    shape = tuple(int(round(p * 1.25)) for p in patch)
    t0 = time.time()
    datalist_path = make_blob_dataset(work / "data", n_labeled=2, n_unlabeled=2, shape=shape,
                                      spacing=(1.0, 1.0, 1.0), seed=0)
    datalist = load_datalist(datalist_path)
    run_dir = work / "run"
    plan = preprocess_datalist(datalist, cfg, run_dir / "cache")
    trainer = Trainer(run_dir, cfg, plan, datalist, device, Events(False))
    setup_s = time.time() - t0
    rss_after_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timers = Timers(sync)
    instrument(trainer, timers)
    results: dict = {}
    n = args.steps
    for kind in KINDS:
        indices = steps_of_kind(trainer, kind, n + (1 if args.warmup else 0))
        times, parts = [], []
        for i, step in enumerate(indices):
            trainer.step = step
            timers.reset()
            sync()
            t1 = time.perf_counter()
            record = trainer.train_step()
            sync()
            dt = time.perf_counter() - t1
            acc = timers.reset()
            if args.warmup and i == 0:
                continue
            times.append(dt)
            parts.append({**acc, "other": dt - sum(acc.values()), "unlabeled_share": record["unlabeled_share"]})
        mean = float(np.mean(times))
        results[kind] = {
            "steps_timed": len(times), "s_per_step": mean, "steps_per_s": 1.0 / mean,
            "s_per_step_all": [round(t, 4) for t in times],
            "parts_s": {k: float(np.mean([p.get(k, 0.0) for p in parts])) for k in (*PARTS, "other")},
            "mean_unlabeled_share": float(np.mean([p["unlabeled_share"] for p in parts])),
        }
    out = {
        "preset": args.preset, "device": args.device, "threads": args.threads,
        "batch_size": cfg["sampling"]["batch_size"], "preset_batch_size": configuration.preset(args.preset)[
            "sampling"]["batch_size"], "patch_size": patch, "model2d": cfg["model2d"]["name"],
        "model3d_channels": cfg["model3d"]["kwargs"]["channels"], "volume_shape": list(shape),
        "setup_s": round(setup_s, 1), "rss_after_setup_mb": round(rss_after_setup, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "params_2d": sum(p.numel() for p in trainer.model2d.parameters()),
        "params_2d_trainable": sum(p.numel() for p in trainer.model2d.parameters() if p.requires_grad),
        "params_3d": sum(p.numel() for p in trainer.model3d.parameters()),
        "kinds": results, "engine": engine_version(),
    }
    if args.loop:
        out["loop"] = loop(args, cfg, datalist, work, device)
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        trainer.step = steps_of_kind(trainer, "stage2_3d", 1)[0]
        with profile(activities=activities) as prof:
            trainer.train_step()
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                          row_limit=25)
        (Path(args.out) / f"torch_profile_{args.preset}_{args.device}_t{args.threads}.txt").write_text(table)
    return out


def loop(args: argparse.Namespace, cfg: dict, datalist, work: Path, device) -> dict:
    """``Trainer.run`` for ``--loop`` steps from scratch (half stage 1, half stage 2): the whole loop, batch
    preparation included, as a user runs it. The wall time includes one pseudo-mask refresh (at stage 2) and the
    final checkpoint and model saves; the same for any engine version, so runs of two versions compare."""
    import copy

    from MNSegmentLib.data.preprocess import preprocess_datalist
    from MNSegmentLib.events import Events
    from MNSegmentLib.training.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    cfg["train"].update(steps=args.loop, warmup_fraction=0.5, checkpoint_every=10**6, validate_every=10**6)
    run_dir = work / "loop_run"
    plan = preprocess_datalist(datalist, cfg, run_dir / "cache")
    trainer = Trainer(run_dir, cfg, plan, datalist, device, Events(False))
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0
    return {"steps": args.loop, "wall_s": round(wall, 2), "steps_per_s": args.loop / wall}


def engine_version() -> str:
    """Which MNSegmentLib the worker imported (PYTHONPATH decides), and its git commit."""
    import MNSegmentLib

    folder = Path(MNSegmentLib.__file__).parent
    commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return f"{folder} @ {commit or 'unknown'}"


# ---------------------------------------------------------------------------------------------- driver side
def table(rows: list[dict]) -> str:
    lines = ["| preset | device | threads | batch (preset) | patch | stage 1 s/step | stage 2, 2D student s/step | "
             "stage 2, 3D student s/step | peak RSS (GB) | GPU peak (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["kinds"]
        lines.append(
            f"| {r['preset']} | {r['device']} | {r['threads']} | {r['batch_size']} ({r['preset_batch_size']}) | "
            f"{'×'.join(map(str, r['patch_size']))} | "
            + " | ".join(f"{k[x]['s_per_step']:.2f} ({k[x]['steps_per_s']:.2f}/s, n={k[x]['steps_timed']})"
                         for x in KINDS)
            + f" | {r['peak_rss_mb'] / 1024:.2f} | "
            + (f"{r['gpu_peak_mb'] / 1024:.2f}" if r["gpu_peak_mb"] is not None else "not measured") + " |")
    return "\n".join(lines)


def breakdown(rows: list[dict]) -> str:
    lines = ["| preset | threads | step kind | total s | sampling (lab / unlab) | 2D fwd (student) | "
             "3D fwd (student) | teacher fwd (2D / 3D) | loss+bwd+opt (2D / 3D) | other |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for kind in KINDS:
            s = r["kinds"][kind]
            p, tot = s["parts_s"], s["s_per_step"]

            def f(v, tot=tot):
                return f"{v:.3f} ({100 * v / tot:.0f}%)"

            lines.append(
                f"| {r['preset']} | {r['threads']} | {kind} | {tot:.3f} | {p['sample_labeled']:.3f} / "
                f"{p['sample_unlabeled']:.3f} | {f(p['fwd_student_2d'])} | {f(p['fwd_student_3d'])} | "
                f"{p['teacher_2d']:.3f} / {p['teacher_3d']:.3f} | {p['bwd_opt_2d']:.3f} / {p['bwd_opt_3d']:.3f} | "
                f"{p['other']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["quick", "default", "paper"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads; each value is one run")
    p.add_argument("--steps", nargs="*", default=["quick=5", "default=2", "paper=1"],
                   help="timed steps per step kind, PRESET=N (after one untimed warm-up step)")
    p.add_argument("--batch", nargs="*", default=[], help="batch-size override PRESET=N (e.g. paper=1 on CPU)")
    p.add_argument("--threads-presets", nargs="*", default=["quick"],
                   help="presets run with every --threads value; the others only with the first")
    p.add_argument("--no-warmup", action="store_true", help="no untimed warm-up step per step kind")
    p.add_argument("--torch-profile", action="store_true", help="also write a torch.profiler table per preset")
    p.add_argument("--loop", type=int, default=0,
                   help="also time Trainer.run for this many steps (the whole loop, batch preparation included)")
    p.add_argument("--out", default="benchmarks/out/speed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:  # one preset, one thread count, in this (fresh) process
        args.threads = args.threads[0]
        args.steps = int(args.steps[0])
        args.batch = int(args.batch[0]) if args.batch else None
        res = worker(args)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    steps, batches = _kv(args.steps), _kv(args.batch)
    rows, started = [], time.time()
    for preset in args.presets:
        for threads in (args.threads if preset in args.threads_presets else args.threads[:1]):
            cmd = [sys.executable, __file__, "--worker", "--preset", preset, "--device", args.device,
                   "--threads", str(threads), "--steps", str(steps.get(preset, 2)), "--out", str(out),
                   "--warmup", "0" if args.no_warmup else "1"]
            if preset in batches:
                cmd += ["--batch", str(batches[preset])]
            if args.torch_profile:
                cmd.append("--torch-profile")
            if args.loop:
                cmd += ["--loop", str(args.loop)]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            t0 = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] {preset} threads={threads} ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"  FAILED (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
                continue
            row = json.loads(line[len("RESULT "):])
            row["wall_s"] = round(time.time() - t0, 1)
            rows.append(row)
            print(f"  done in {row['wall_s']} s: " + ", ".join(
                f"{k} {v['s_per_step']:.2f} s/step" for k, v in row["kinds"].items())
                + f", peak RSS {row['peak_rss_mb'] / 1024:.2f} GB"
                + (f", loop {row['loop']['steps_per_s']:.3f} steps/s" if "loop" in row else "")
                + f" [{row['engine']}]", flush=True)
            (out / "speed.json").write_text(json.dumps(
                {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
                 "machine": machine(), "rows": rows, "elapsed_s": round(time.time() - started, 1)}, indent=1))
    print()
    print(table(rows))
    print()
    print(breakdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
