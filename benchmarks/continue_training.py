"""How many steps ``train --init-from`` saves after adding labels (issue 12.3), on the accuracy benchmark's task.

Protocol: a source run trains ``--source-steps`` on the task with ``--from-labeled`` labeled subjects. Then
labels are added (the task with ``--to-labeled`` labeled subjects: the same pool, same test set, see
accuracy.py) and, for every budget in ``--budgets``, two complete runs train with it: ``scratch`` (from the
pretrained 2D weights, as a new run does) and ``init`` (``--init-from`` the source run). Each budget is its own
run because the learning-rate schedule spans the whole run. Test Dice of the 3D network per (arm, budget,
seed); "steps saved" = the largest budget minus the smallest ``init`` budget whose mean Dice reaches
``scratch``'s at the largest budget. Finished jobs are kept under ``--out`` and skipped on a re-run.

Example::

    python benchmarks/continue_training.py --out benchmarks/out/continue --seeds 0 1 2 --source-steps 200 \\
        --budgets 25 50 100 200 --jobs 2
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process, set before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402

from accuracy import _init_worker, make_task, mean_sd  # noqa: E402  (benchmarks/ is on sys.path)
from machine_info import machine  # noqa: E402


def train_and_score(datalist: str, run_dir: str, steps: int, seed: int, init_from: str | None,
                    overrides: dict) -> dict:
    """Trains one run (unless finished), predicts the task's test images with its 3D network, returns Dice."""
    from MNSegmentLib.metrics import evaluate
    from MNSegmentLib.workflow import predict, resume, train

    run, task = Path(run_dir), Path(datalist).parent
    started = time.time()
    if run.exists() and not (run / "model.pt").exists():  # interrupted by an earlier invocation
        resume(run, "cpu")
    elif not run.exists():
        train(datalist, run, "quick", "cpu", {**overrides, "seed": seed, "train.steps": steps}, init_from=init_from)
    train_s = time.time() - started
    test = json.loads((task / "test.json").read_text())["test"]
    predict(run, [str(task / t["image"]) for t in test], run / "pred", network="3d", device="cpu")
    dice = evaluate(run / "pred", task / "labelsTs")["mean"]["1"]["dice"]
    return {"steps": steps, "seed": seed, "init_from": init_from, "dice": dice, "train_s": round(train_s, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/continue"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--from-labeled", type=int, default=2)
    p.add_argument("--to-labeled", type=int, default=4)
    p.add_argument("--source-steps", type=int, default=200)
    p.add_argument("--budgets", type=int, nargs="+", default=[25, 50, 100, 200])
    p.add_argument("--jobs", type=int, default=2)
    # the task, as in accuracy.py
    p.add_argument("--resolution", type=float, default=3.0)
    p.add_argument("--structure", default="wm", choices=["brain", "gm", "wm"])
    p.add_argument("--pool", type=int, default=8)
    p.add_argument("--n-test", type=int, default=4)
    p.add_argument("--task-seed", type=int, default=0)
    args = p.parse_args(argv)
    before, after = str(make_task(args.out, args.from_labeled, args)), str(make_task(args.out, args.to_labeled, args))
    jobs = args.out / "jobs"
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        sources = {s: jobs / f"source_L{args.from_labeled}_seed{s}" for s in args.seeds}
        for future in [pool.submit(train_and_score, before, str(d), args.source_steps, s, None, {})
                       for s, d in sources.items()]:
            future.result()
        futures = {(arm, b, s): pool.submit(train_and_score, after, str(jobs / f"{arm}_L{args.to_labeled}_{b}_seed{s}"),
                                            b, s, str(sources[s]) if arm == "init" else None, {})
                   for arm in ("scratch", "init") for b in args.budgets for s in args.seeds}
        results = {key: future.result() for key, future in futures.items()}
    mean = {(arm, b): mean_sd([results[arm, b, s]["dice"] for s in args.seeds])[0]
            for arm in ("scratch", "init") for b in args.budgets}
    full = max(args.budgets)
    reached = [b for b in sorted(args.budgets) if mean["init", b] >= mean["scratch", full]]
    summary = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
               "mean_dice": {f"{arm}@{b}": d for (arm, b), d in mean.items()},
               "steps_saved": full - reached[0] if reached else None,
               "runs": [{"arm": arm, **r} for (arm, _, _), r in results.items()]}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print("| budget | scratch Dice | init-from Dice |\n|---|---|---|")
    for b in sorted(args.budgets):
        print(f"| {b} | {mean['scratch', b]:.3f} | {mean['init', b]:.3f} |")
    print(f"steps saved to reach scratch's Dice at {full} steps: {summary['steps_saved']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
