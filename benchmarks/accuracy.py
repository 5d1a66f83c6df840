"""Accuracy benchmark (issue 4): M&N vs its ablations on a few-label task built from the real MNI152 T1.

Every arm trains with the same preset and the same number of steps; each (arm, labeled count, seed) is one
job in its own process with one thread. Results of finished jobs are kept under ``--out`` and skipped on a
re-run (resumable). At the end ``results.json`` is written and a markdown table is printed.

Task: ``MNSegmentLib.data.realdata.make_t1_task`` (white matter at 3 mm by default). A pool of ``--pool`` training
subjects (s000..) of which the first L are labeled and the rest unlabeled, plus ``--n-test`` held-out test
subjects whose images are also in the unlabeled pool (transductive, as in the reference protocol). The pool size
is fixed, so the 1-, 2- and 4-labeled tasks share exactly the same 12 subjects and the same test set; only how
many of the pool are labeled changes.

Arms (``--arms``):
    mn_lr         M&N, LRG mode ``lr`` (the engine's default)
    mn_linear     M&N, LRG mode ``linear`` (reference code's rule)
    mn_fixed      M&N, constant unlabeled share 0.5 (``lrg.mode=fixed``)
    sup3d         labeled-only (``lrg.mode=off``), 3D network
    sup2d         the 2D network of the *same* labeled-only run, predicted slice-wise (``network="2d"``);
                  no separate training -- produced by the sup3d job
    mn_scratch2d  M&N (LRG ``lr``) with a randomly initialised 2D model (``model2d.weights=none``)
    mn_lr_2d      extra: the 2D network of the mn_lr run, slice-wise (produced by the mn_lr job)
and ``--labeled 1 2 4``: the label sweep runs ``--sweep-arms`` (mn_lr, sup3d by default) at 1 and 4 labeled;
the main arms run at ``--main-labeled`` (2).

Example (the run reported in docs/BENCHMARKS.md)::

    python benchmarks/accuracy.py --out benchmarks/out --seeds 0 1 2 --steps 200 --jobs 2 --resolution 3 \
        --arms mn_lr mn_linear mn_fixed sup3d mn_scratch2d mn_lr_wu50 sup3d_wu50
"""

from __future__ import annotations

import os

# one thread per process, set before torch is imported (also inherited by the worker processes)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402

from machine_info import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

METRICS = ("dice", "jaccard", "hd95_mm", "asd_mm")

# arm -> (config overrides, extra networks predicted from the same run: {arm name: network})
TRAINED_ARMS: dict[str, tuple[dict, dict[str, str]]] = {
    "mn_lr": ({"lrg.mode": "lr"}, {"mn_lr": "3d", "mn_lr_2d": "2d"}),
    "mn_linear": ({"lrg.mode": "linear"}, {"mn_linear": "3d"}),
    "mn_fixed": ({"lrg.mode": "fixed", "lrg.share": 0.5}, {"mn_fixed": "3d"}),
    "sup3d": ({"lrg.mode": "off"}, {"sup3d": "3d", "sup2d": "2d"}),
    "mn_scratch2d": ({"lrg.mode": "lr", "model2d.weights": "none"}, {"mn_scratch2d": "3d"}),
    # diagnostic (not one of the issue's arms): stage 1 = half of the steps instead of 1/8, so the teachers are
    # better trained when co-training starts; paired with the labeled-only run under the same schedule
    "mn_lr_wu50": ({"lrg.mode": "lr", "train.warmup_fraction": 0.5}, {"mn_lr_wu50": "3d", "mn_lr_2d_wu50": "2d"}),
    "sup3d_wu50": ({"lrg.mode": "off", "train.warmup_fraction": 0.5}, {"sup3d_wu50": "3d", "sup2d_wu50": "2d"}),
    # control for lrg.unlabeled=add, whose stage-2 batches hold 4 labeled + up to 3 unlabeled patches: labeled-only
    # with 6 labeled patches every step sees at least as many patches, all of them labeled
    "sup3d_b6": ({"lrg.mode": "off", "sampling.batch_size": 6}, {"sup3d_b6": "3d", "sup2d_b6": "2d"}),
}
# reported arm -> the trained arm that produces it
PRODUCED_BY = {reported: trained for trained, (_, nets) in TRAINED_ARMS.items() for reported in nets}
ARM_LABELS = {
    "mn_lr": "M&N, LRG `lr`",
    "mn_linear": "M&N, LRG `linear`",
    "mn_fixed": "M&N, fixed share 0.5",
    "sup3d": "labeled-only 3D (`lrg.mode=off`)",
    "sup2d": "pretrained 2D alone (2D net of the labeled-only run, slice-wise)",
    "mn_scratch2d": "M&N, 2D from scratch (`model2d.weights=none`)",
    "mn_lr_2d": "(extra) 2D net of the M&N `lr` run, slice-wise",
    "otsu3": "(reference, no learning) 3-threshold multi-Otsu, brightest class",
    "mn_lr_wu50": "(diagnostic) M&N `lr`, `train.warmup_fraction=0.5`",
    "mn_lr_2d_wu50": "(diagnostic) its 2D net, slice-wise",
    "sup3d_wu50": "(diagnostic) labeled-only 3D, `train.warmup_fraction=0.5`",
    "sup2d_wu50": "(diagnostic) its 2D net, slice-wise",
    "sup3d_b6": "(control) labeled-only 3D, batch 6",
    "sup2d_b6": "(control) its 2D net, slice-wise",
}
MAIN_ORDER = ["mn_lr", "mn_linear", "mn_fixed", "sup3d", "sup2d", "mn_scratch2d", "mn_lr_2d", "otsu3",
              "mn_lr_wu50", "mn_lr_2d_wu50", "sup3d_wu50", "sup2d_wu50", "sup3d_b6", "sup2d_b6"]


def task_dir(out: Path, labeled: int, args: argparse.Namespace) -> Path:
    res = f"{args.resolution:g}".replace(".", "p")
    return out / "tasks" / f"{args.structure}_{res}mm_L{labeled}_pool{args.pool}_test{args.n_test}_seed{args.task_seed}"


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """The task's options (:func:`make_task`), shared by every benchmark built on it."""
    p.add_argument("--resolution", type=float, default=3.0, help="voxel size of the task in mm")
    p.add_argument("--structure", default="wm", choices=["brain", "gm", "wm"])
    p.add_argument("--pool", type=int, default=8, help="training subjects (labeled + unlabeled, test excluded)")
    p.add_argument("--n-test", type=int, default=4)
    p.add_argument("--task-seed", type=int, default=0, help="seed of the generated subjects")


def make_task(out: Path, labeled: int, args: argparse.Namespace) -> Path:
    from MNSegmentLib.data.realdata import make_t1_task

    return make_t1_task(task_dir(out, labeled, args), n_labeled=labeled, n_unlabeled=args.pool - labeled,
                        n_test=args.n_test, structure=args.structure, seed=args.task_seed,
                        resolution_mm=args.resolution, test_in_unlabeled=True)


def job_dir(out: Path, arm: str, labeled: int, seed: int) -> Path:
    return out / "jobs" / f"{arm}_L{labeled}_seed{seed}"


def result_path(out: Path, reported_arm: str, labeled: int, seed: int) -> Path:
    return out / "results" / f"{reported_arm}_L{labeled}_seed{seed}.json"


def _history_summary(run_dir: Path) -> dict:
    """A few numbers from the run's training history (checkpoint.pt)."""
    import numpy as np
    import torch

    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    hist = state["history"]
    co = [h for h in hist if h["stage"] == "cotrain"]
    out = {"steps": len(hist), "stage2_start": next((h["step"] for h in co), None),
           "mean_unlabeled_share_stage2": float(np.mean([h["unlabeled_share"] for h in co])) if co else 0.0}
    for key in ("loss_2d", "loss_3d"):
        vals = [h[key] for h in hist if h[key] is not None]
        out[f"final_{key}"] = float(np.mean(vals[-16:])) if vals else None
    return out


def run_job(arm: str, labeled: int, seed: int, steps: int, preset: str, datalist: str, out: str,
            extra_overrides: dict) -> dict:
    """Trains one (arm, labeled, seed), predicts the test images, evaluates; writes the per-arm result JSONs."""
    import torch

    torch.set_num_threads(1)
    from MNSegmentLib.evaluation.metrics import evaluate
    from MNSegmentLib.workflow import predict, train

    out_p = Path(out)
    jdir = job_dir(out_p, arm, labeled, seed)
    run_dir = jdir / "run"
    overrides, networks = TRAINED_ARMS[arm]
    overrides = {**overrides, "seed": seed, "train.steps": steps, **extra_overrides}
    t0 = time.time()
    if not (run_dir / "model.pt").exists():
        if jdir.exists():  # an interrupted job: start it again from scratch
            shutil.rmtree(jdir)
        jdir.mkdir(parents=True)
        train(datalist, run_dir, preset=preset, device="cpu", overrides=overrides)
    train_s = time.time() - t0
    task = Path(datalist).parent
    test = json.loads((task / "test.json").read_text())["test"]
    images = [str(task / t["image"]) for t in test]
    hist = _history_summary(run_dir)
    written = {}
    for reported, network in networks.items():
        t1 = time.time()
        pred_dir = jdir / f"pred_{network}"
        if pred_dir.exists():
            shutil.rmtree(pred_dir)
        predict(run_dir, images, pred_dir, network=network, device="cpu")
        predict_s = time.time() - t1
        ev = evaluate(pred_dir, task / "labelsTs")
        result = {
            "arm": reported, "trained_arm": arm, "network": network, "labeled": labeled, "seed": seed,
            "steps": steps, "preset": preset, "overrides": overrides, "run_dir": str(run_dir),
            "train_s": round(train_s, 1), "predict_s": round(predict_s, 1), "history": hist,
            "mean": ev["mean"].get("1", {}), "cases": {c: v.get("1") for c, v in ev["cases"].items()},
        }
        path = result_path(out_p, reported, labeled, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)
        written[reported] = result["mean"]
    return {"arm": arm, "labeled": labeled, "seed": seed, "train_s": round(train_s, 1), "means": written}


def otsu_reference(out: Path, labeled: int, datalist: str) -> None:
    """A no-learning reference on the same test images: SimpleITK multi-Otsu with 3 thresholds (4 classes:
    outside/CSF/grey/white in a T1) and the brightest class as the prediction. Deterministic (one 'seed')."""
    import SimpleITK as sitk

    from MNSegmentLib.evaluation.metrics import evaluate

    path = result_path(out, "otsu3", labeled, 0)
    if path.exists():
        return
    task = Path(datalist).parent
    pred_dir = out / "jobs" / f"otsu3_L{labeled}" / "pred"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for case in json.loads((task / "test.json").read_text())["test"]:
        image = sitk.ReadImage(str(task / case["image"]))
        classes = sitk.OtsuMultipleThresholds(image, numberOfThresholds=3, numberOfHistogramBins=256)
        sitk.WriteImage(sitk.Cast(classes == 3, sitk.sitkUInt8), str(pred_dir / Path(case["image"]).name))
    ev = evaluate(pred_dir, task / "labelsTs")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"arm": "otsu3", "trained_arm": None, "network": None, "labeled": labeled,
                                "seed": 0, "steps": 0, "preset": None, "train_s": 0.0,
                                "mean": ev["mean"].get("1", {}),
                                "cases": {c: v.get("1") for c, v in ev["cases"].items()}}, indent=1))


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return m, sd


def aggregate(out: Path) -> dict:
    rows: dict[str, dict] = {}
    for path in sorted((out / "results").glob("*.json")):
        r = json.loads(path.read_text())
        key = f"{r['arm']}|L{r['labeled']}"
        row = rows.setdefault(key, {"arm": r["arm"], "labeled": r["labeled"], "seeds": [], "per_seed": {},
                                    "train_s": []})
        row["seeds"].append(r["seed"])
        row["per_seed"][str(r["seed"])] = r["mean"]
        row["train_s"].append(r["train_s"])
        row.setdefault("steps", r["steps"])
        row.setdefault("preset", r["preset"])
    for row in rows.values():
        row["summary"] = {}
        for metric in METRICS:
            vals = [m[metric] for m in row["per_seed"].values() if m.get(metric) is not None]
            if vals:
                mu, sd = mean_sd(vals)
                row["summary"][metric] = {"mean": mu, "sd": sd, "n": len(vals)}
    return rows


def _fmt(stat: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    if not stat:
        return "–"
    sd = "n/a" if math.isnan(stat["sd"]) else f"{stat['sd'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {sd}"


def markdown_table(rows: dict) -> str:
    lines = ["| arm | labeled | seeds | Dice | Jaccard | HD95 (mm) | ASD (mm) |",
             "|---|---|---|---|---|---|---|"]

    def order(key: str) -> tuple:
        row = rows[key]
        return (row["labeled"] != 2, row["labeled"], MAIN_ORDER.index(row["arm"]) if row["arm"] in MAIN_ORDER
                else 99)

    for key in sorted(rows, key=order):
        row, s = rows[key], rows[key]["summary"]
        lines.append(
            f"| {ARM_LABELS.get(row['arm'], row['arm'])} | {row['labeled']} | {len(row['seeds'])} | "
            f"{_fmt(s.get('dice'))} | {_fmt(s.get('jaccard'))} | {_fmt(s.get('hd95_mm'), digits=2)} | "
            f"{_fmt(s.get('asd_mm'), digits=2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out", help="work folder (git-ignored); default benchmarks/out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--steps", type=int, default=200, help="training steps, identical for every arm")
    p.add_argument("--preset", default="quick")
    p.add_argument("--arms", nargs="+", default=["mn_lr", "mn_linear", "mn_fixed", "sup3d", "mn_scratch2d"],
                   choices=sorted(TRAINED_ARMS), help="trained arms at --main-labeled (sup3d also gives sup2d)")
    p.add_argument("--main-labeled", type=int, default=2)
    p.add_argument("--sweep-labeled", type=int, nargs="*", default=[1, 4],
                   help="extra labeled counts for the label sweep (empty: no sweep)")
    p.add_argument("--sweep-seeds", type=int, nargs="*", default=None,
                   help="seeds of the label sweep (default: --seeds)")
    p.add_argument("--sweep-arms", nargs="*", default=["mn_lr", "sup3d"], choices=sorted(TRAINED_ARMS))
    p.add_argument("--jobs", type=int, default=2, help="parallel processes, one thread each")
    add_task_arguments(p)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every arm (changes the meaning of the results: use a "
                        "separate --out)")
    p.add_argument("--table-only", action="store_true", help="aggregate existing results, train nothing")
    args = p.parse_args(argv)

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    from MNSegmentLib.config import parse_set_args

    extra = parse_set_args(args.set)
    started = time.time()

    labeled_counts = [args.main_labeled] + [n for n in args.sweep_labeled if n != args.main_labeled]
    datalists = {n: str(make_task(out, n, args)) for n in labeled_counts}  # existing tasks are reused
    otsu_reference(out, args.main_labeled, datalists[args.main_labeled])
    if not args.table_only:
        # main arms at main_labeled for every seed first, then the sweep (the order of the issue)
        jobs = []
        for seed in args.seeds:
            jobs += [(arm, args.main_labeled, seed) for arm in args.arms]
        for n in args.sweep_labeled:
            if n == args.main_labeled:
                continue
            for seed in (args.seeds if args.sweep_seeds is None else args.sweep_seeds):
                jobs += [(arm, n, seed) for arm in args.sweep_arms]
        todo = [j for j in jobs
                if not all(result_path(out, r, j[1], j[2]).exists() for r in TRAINED_ARMS[j[0]][1])]
        print(f"{len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run "
              f"({args.jobs} at a time)", flush=True)
        log_path = out / "jobs.log"
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"),
                                 initializer=_init_worker) as pool:
            pending = {}
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < args.jobs:
                    arm, n, seed = queue.pop(0)
                    fut = pool.submit(run_job, arm, n, seed, args.steps, args.preset, datalists[n], str(out),
                                      extra)
                    pending[fut] = (arm, n, seed, time.time())
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    arm, n, seed, t0 = pending.pop(fut)
                    try:
                        res = fut.result()
                        msg = (f"done {arm} L{n} seed{seed} in {time.time() - t0:.0f}s: "
                               + ", ".join(f"{k} dice {v.get('dice', float('nan')):.4f}"
                                           for k, v in res["means"].items()))
                    except Exception as exc:  # report and go on with the other jobs
                        msg = f"FAILED {arm} L{n} seed{seed}: {type(exc).__name__}: {exc}"
                    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
                    print(line, flush=True)
                    with log_path.open("a") as f:
                        f.write(line + "\n")

    rows = aggregate(out)
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine(), "elapsed_s_this_invocation": round(time.time() - started, 1),
        "task": {"structure": args.structure, "resolution_mm": args.resolution, "pool": args.pool,
                 "n_test": args.n_test, "task_seed": args.task_seed, "test_in_unlabeled": True},
        "steps": args.steps, "preset": args.preset, "seeds": args.seeds, "extra_overrides": extra,
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
