"""Ablation of the stage-2 teacher settings (issue 11 part 3), paired over seeds, on several real-anatomy tasks.

Every arm is M&N as shipped (``quick`` preset, ``lrg.unlabeled=add``) plus one ``teacher.*`` setting, except
``sup3d`` (labeled-only, ``lrg.mode=off``) for reference. An arm and its baseline share task, seed and steps, so
the difference per seed is a paired one. Each (task, arm, seed) job is one process with one thread; finished jobs
are kept under ``--out`` and skipped on a re-run. Jobs run seed by seed, so a run cut short leaves complete
pairs. ``results.json`` and a markdown table of per-seed Dice/HD95 and paired differences are written at the end.

Tasks (``MNSegmentLib.data.realdata.make_t1_task``, ``--labeled`` labeled + 8 − L unlabeled training subjects, 4 test
subjects also in the unlabeled pool, as in benchmarks/accuracy.py):
    wm          white matter (one class), 3 mm
    tissue      grey and white matter (two classes; Dice and HD95 averaged over both), 3 mm
    ventricles  the lateral ventricles (one small, deep class, ~0.5 % of the volume), 2 mm

Each job reports three outputs of its run: the 3D network (``3d``), what the user gets (``delivered``: the
run's model.json choice; with no validation cases the preset's ``ensemble``) and the 2D network (``2d``; of the
``sup3d`` run it is "pretrained 2D alone").

Issue 11 part 5's arms: ``mn`` against ``sup3d`` (labeled-only, same steps), ``sup3d_more`` (labeled-only with as
many patches as M&N) and ``mn_replace`` (the reference's batch composition), at ``--labeled`` 1, 2 and 4 (one
``--out`` per label count).

Example (the run reported in docs/BENCHMARKS.md section 12b)::

    python benchmarks/cotraining_ablation.py --out benchmarks/out/ablation --tasks wm tissue --seeds 0 1 2 \
        --steps 200 --arms mn mn_all
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, also for the worker processes
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402

from accuracy import mean_sd  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from machine_info import machine  # noqa: E402

ARMS: dict[str, dict] = {
    "mn": {},  # M&N as shipped: the baseline every other arm is paired with
    "mn_ema": {"teacher.ema": 0.99},
    "mn_tri": {"teacher.triplanar": True},
    "mn_conf": {"teacher.weighting": "confidence"},
    "mn_all": {"teacher.ema": 0.99, "teacher.triplanar": True, "teacher.weighting": "confidence"},
    "sup3d": {"lrg.mode": "off"},  # labeled-only, same steps; its 2D output is "pretrained 2D alone"
    "sup3d_tri": {"lrg.mode": "off", "teacher.triplanar": True},  # labeled-only, 2D network on three slice axes
    # labeled-only with about as many patches per step as M&N (4 labeled + up to 3 unlabeled under `add`)
    "sup3d_more": {"lrg.mode": "off", "sampling.batch_size": 6},
    "mn_replace": {"lrg.unlabeled": "replace"},  # the reference's (`paper`) batch composition at `quick` size
    "mn_oneway": {"teacher.directions": "2d_to_3d"},  # the 2D network learns from labels only
    "mn_auto": {"teacher.directions": "auto"},  # 2d_to_3d, reversed while the 2D network fails on the labels
    "mn_xview": {"teacher.cross_view": True},  # quick + the 2D network's slice directions teach each other
}
# reported output -> predict(network=...); delivered = the run's model.json choice
OUTPUTS = {"3d": "3d", "delivered": None, "2d": "2d"}


# 3 mm unless a structure is too thin for it (the lateral ventricles are 2-3 voxels wide at 3 mm)
RESOLUTION_MM = {"ventricles": 2.0}


def task_datalist(out: Path, task: str, labeled: int, strong_bias: bool = False) -> Path:
    from MNSegmentLib.data.realdata import make_t1_task

    mm = RESOLUTION_MM.get(task, 3.0)
    name = f"{task}_{mm:g}mm_L{labeled}" + ("_strongbias" if strong_bias else "")
    return make_t1_task(out / "tasks" / name, n_labeled=labeled, n_unlabeled=8 - labeled, n_test=4, structure=task,
                        seed=0, resolution_mm=mm, test_in_unlabeled=True, strong_bias=strong_bias)


def result_path(out: Path, task: str, arm: str, seed: int) -> Path:
    return out / "results" / f"{task}_{arm}_seed{seed}.json"


def class_mean(mean: dict[str, dict]) -> dict[str, float | None]:
    """Foreground classes' metrics averaged (one class: its own values)."""
    out = {}
    for metric in ("dice", "hd95_mm"):
        values = [m[metric] for m in mean.values() if m.get(metric) is not None]
        out[metric] = sum(values) / len(values) if values else None
    return out


def run_job(task: str, arm: str, seed: int, steps: int, datalist: str, out: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from MNSegmentLib.evaluation.metrics import evaluate
    from MNSegmentLib.workflow import predict, train

    job = Path(out) / "jobs" / f"{task}_{arm}_seed{seed}"
    run_dir = job / "run"
    overrides = {**ARMS[arm], "seed": seed, "train.steps": steps}
    started, cpu = time.time(), time.process_time()  # CPU seconds: the cost without the machine's contention
    if job.exists():  # an interrupted job starts again from scratch
        shutil.rmtree(job)
    train(datalist, run_dir, preset="quick", device="cpu", overrides=overrides)
    train_s, train_cpu_s = time.time() - started, time.process_time() - cpu
    root = Path(datalist).parent
    images = [str(root / t["image"]) for t in json.loads((root / "test.json").read_text())["test"]]
    result = {"task": task, "arm": arm, "seed": seed, "steps": steps, "overrides": overrides,
              "train_s": round(train_s, 1),
              "train_cpu_s": round(train_cpu_s, 1), "outputs": {}}
    for name, network in OUTPUTS.items():
        predictions = job / f"pred_{name}"
        predict(run_dir, images, predictions, network=network, device="cpu")
        evaluation = evaluate(predictions, root / "labelsTs")
        result["outputs"][name] = {**class_mean(evaluation["mean"]), "per_class": evaluation["mean"]}
    choice = json.loads((run_dir / "model.json").read_text()) if (run_dir / "model.json").exists() else {}
    result["delivered_network"] = choice.get("network")
    history = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["history"]
    cotrain = [r for r in history if r["stage"] == "cotrain"]
    # each network's running Dice on its labeled patches at the end, and on how many co-training steps each network
    # learnt from the other's pseudo-labels (teacher.directions=auto decides that step by step)
    result["train_dice"] = {net: history[-1].get(f"train_dice_{net}") for net in ("2d", "3d")}
    result["cotrain_steps_taught"] = {net: sum(net in r.get("taught", ()) for r in cotrain) for net in ("2d", "3d")}
    result["cotrain_steps"] = len(cotrain)
    path = result_path(Path(out), task, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    shutil.rmtree(job / "run" / "cache", ignore_errors=True)  # the preprocessed arrays: large, re-creatable
    return result


def report(out: Path, tasks: list[str], arms: list[str], baseline: str = "mn") -> tuple[dict, str]:
    """Per-seed values, mean ± sd and paired differences against ``baseline`` for every task, arm and output."""
    rows, lines = {}, []
    for task in tasks:
        for output in OUTPUTS:
            lines += [f"\n**{task}, {output}** (Dice; HD95 mm)\n",
                      f"| arm | seeds | Dice mean ± sd | per seed | − {baseline}, paired per seed | HD95 mean |",
                      "|---|---|---|---|---|---|"]
            found = {arm: {} for arm in arms}
            for arm in arms:
                for path in sorted((out / "results").glob(f"{task}_{arm}_seed*.json")):
                    r = json.loads(path.read_text())
                    if output in r["outputs"]:  # results made before the 2d output existed lack it
                        found[arm][r["seed"]] = r["outputs"][output]
            base = found.get(baseline, {})
            for arm, by_seed in found.items():
                if not by_seed:
                    continue
                dice = [v["dice"] for v in by_seed.values()]
                hd95 = [v["hd95_mm"] for v in by_seed.values() if v["hd95_mm"] is not None]
                paired = {s: by_seed[s]["dice"] - base[s]["dice"] for s in by_seed if s in base and arm != baseline}
                m, sd = mean_sd(dice)
                rows[f"{task}|{output}|{arm}"] = {"per_seed": by_seed, f"paired_dice_vs_{baseline}": paired}
                diffs = "–"
                if paired:
                    ahead = sum(v > 0 for v in paired.values())
                    diffs = (" / ".join(f"{paired[s]:+.4f}" for s in sorted(paired))
                             + f" (mean {sum(paired.values()) / len(paired):+.4f}, ahead {ahead}/{len(paired)})")
                lines.append(
                    f"| {arm} | {len(by_seed)} | {m:.4f} ± {sd:.4f} | "
                    + " / ".join(f"{by_seed[s]['dice']:.4f}" for s in sorted(by_seed)) + f" | {diffs} | "
                    + (f"{sum(hd95) / len(hd95):.2f}" if hd95 else "–") + " |")
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out/ablation")
    p.add_argument("--tasks", nargs="+", default=["wm", "tissue"],
                   choices=["wm", "tissue", "ventricles", "gm", "brain"])
    p.add_argument("--arms", nargs="+", default=["mn", "mn_ema", "mn_tri", "mn_conf"], choices=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--labeled", type=int, default=2,
                   help="labeled subjects of the 8 in the pool; 8 = every pool subject labeled (the fully supervised "
                        "ceiling of labeled-only: the same test subjects, no unlabeled training subject)")
    p.add_argument("--strong-bias", action="store_true",
                   help="every third subject (s002, s005, s008, s011) has a strong bias field that the first two "
                        "labeled subjects do not show (realdata.make_t1_task(strong_bias=True))")
    p.add_argument("--table-only", action="store_true", help="aggregate existing results, train nothing")
    p.add_argument("--baseline", default="mn", help="the arm the paired differences are taken against")
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if not 1 <= args.labeled <= 8:
        p.error("--labeled must be within 1..8 (the pool has 8 subjects)")
    datalists = {task: str(task_datalist(out, task, args.labeled, args.strong_bias)) for task in args.tasks}
    jobs = [(task, arm, seed) for seed in args.seeds for task in args.tasks for arm in args.arms
            if not result_path(out, task, arm, seed).exists()]
    if not args.table_only:
        print(f"{len(jobs)} jobs to run", flush=True)
        # one job at a time, each in a fresh process (one thread; nothing carried between jobs)
        with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
            for task, arm, seed in jobs:
                t0 = time.time()
                try:
                    r = pool.submit(run_job, task, arm, seed, args.steps, datalists[task], str(out)).result()
                    msg = (f"done {task} {arm} seed{seed} in {time.time() - t0:.0f}s (train {r['train_s']:.0f}s, "
                           f"{r['train_cpu_s']:.0f} CPU s): "
                           + ", ".join(f"{k} Dice {v['dice']:.4f}" for k, v in r["outputs"].items()))
                except Exception as exc:  # report and go on with the other jobs
                    msg = f"FAILED {task} {arm} seed{seed}: {type(exc).__name__}: {exc}"
                print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
    rows, table = report(out, args.tasks, args.arms, args.baseline)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
               "machine": machine(), "elapsed_s": round(time.time() - started, 1), "steps": args.steps,
               "labeled": args.labeled, "strong_bias": args.strong_bias, "seeds": args.seeds, "baseline": args.baseline,
               "arms": {a: ARMS[a] for a in args.arms}, "rows": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
