"""How many steps ``train --init-from`` saves after adding labels (issue 12.3), on the accuracy benchmark's task.

Protocol: a source run trains ``--source-steps`` on the task with ``--from-labeled`` labeled subjects. Then
labels are added (the task with ``--to-labeled`` labeled subjects: the same pool, same test set, see
accuracy.py). A ``scratch`` run (from the pretrained 2D weights, as a new run does) trains ``--scratch-steps``
and ``init`` runs (``--init-from`` the source run) train each of ``--budgets``; each budget is its own complete
run because the learning-rate schedule spans the whole run. Score: test Dice of the 3D network.

Per seed, "steps saved" = scratch's steps minus the smallest ``init`` budget whose Dice reaches scratch's (None
when no budget does). Jobs run seed by seed, one at a time; each finished job's result is kept under
``--out/results`` and skipped on a re-run, and ``results.json`` is rewritten after every job, so a run stopped
early still reports the seeds it finished.

Example (the run in docs/BENCHMARKS.md §8)::

    python benchmarks/continue_training.py --out benchmarks/out/continue --seeds 0 1 2 --source-steps 200 \\
        --scratch-steps 200 --budgets 25 50 100
    # the same source and scratch runs, init runs with a tenth of the preset's learning rates
    python benchmarks/continue_training.py --out benchmarks/out/continue --seeds 0 1 2 --budgets 25 50 100 \\
        --init-set train.lr_2d=1e-4 train.lr_3d=2e-4 --init-tag lr10
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread, set before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from accuracy import _init_worker, add_task_arguments, make_task, mean_sd  # noqa: E402  (benchmarks/ is on sys.path)
from machine_info import machine  # noqa: E402


def train_and_score(datalist: Path, run: Path, steps: int, seed: int, init_from: Path | None,
                    extra: dict | None = None) -> dict:
    """Trains one run (resuming an interrupted one), predicts the task's test images with its 3D network."""
    from MNSegmentLib.evaluation.metrics import evaluate
    from MNSegmentLib.workflow import predict, resume, train

    task = datalist.parent
    started = time.time()
    if run.exists() and not (run / "model.pt").exists():  # interrupted by an earlier invocation
        resume(run, "cpu")
    elif not run.exists():
        train(datalist, run, "quick", "cpu", {"seed": seed, "train.steps": steps, **(extra or {})},
              init_from=init_from)
    train_s = time.time() - started
    test = json.loads((task / "test.json").read_text())["test"]
    predict(run, [str(task / t["image"]) for t in test], run / "pred", network="3d", device="cpu")
    dice = evaluate(run / "pred", task / "labelsTs")["mean"]["1"]["dice"]
    return {"steps": steps, "seed": seed, "init_from": str(init_from) if init_from else None, "dice": dice,
            "train_s": round(train_s, 1), "overrides": extra or {}}


def steps_saved(scratch: dict, init: dict[int, dict]) -> int | None:
    """Scratch's steps minus the smallest init budget whose Dice reaches scratch's."""
    reached = [b for b in sorted(init) if init[b]["dice"] >= scratch["dice"]]
    return scratch["steps"] - reached[0] if reached else None


def init_name(budget: int, seed: int, tag: str) -> str:
    return f"init_{budget}{'_' + tag if tag else ''}_seed{seed}"


def summarise(results: dict[str, dict], args: argparse.Namespace) -> dict:
    seeds = {}
    for seed in args.seeds:
        scratch = results.get(f"scratch_seed{seed}")
        names = {b: init_name(b, seed, args.init_tag) for b in args.budgets}
        init = {b: results[name] for b, name in names.items() if name in results}
        if scratch is None or len(init) < len(args.budgets):
            continue  # not finished
        seeds[seed] = {"source_dice": results[f"source_seed{seed}"]["dice"], "scratch_dice": scratch["dice"],
                       "init_dice": {str(b): r["dice"] for b, r in init.items()},
                       "steps_saved": steps_saved(scratch, init),
                       "init_minus_scratch": {str(b): r["dice"] - scratch["dice"] for b, r in init.items()}}
    mean = {}
    if seeds:
        mean["scratch"] = mean_sd([s["scratch_dice"] for s in seeds.values()])
        for b in args.budgets:
            mean[f"init@{b}"] = mean_sd([s["init_dice"][str(b)] for s in seeds.values()])
    return {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "seeds": seeds,
            "mean_sd": mean, "runs": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/continue"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--from-labeled", type=int, default=2)
    p.add_argument("--to-labeled", type=int, default=4)
    p.add_argument("--source-steps", type=int, default=200)
    p.add_argument("--scratch-steps", type=int, default=200)
    p.add_argument("--budgets", type=int, nargs="+", default=[25, 50, 100], help="steps of the init runs")
    p.add_argument("--init-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides of the init runs only (e.g. a lower learning rate); needs --init-tag")
    p.add_argument("--init-tag", default="", help="names the init runs made with --init-set (init_B_TAG_seedS), "
                   "so that they sit beside the plain ones and share their source and scratch runs")
    add_task_arguments(p)
    args = p.parse_args(argv)
    if args.init_set and not args.init_tag:
        p.error("--init-set needs --init-tag")
    from MNSegmentLib.config import parse_set_args

    init_extra = parse_set_args(args.init_set)
    _init_worker()
    before, after = make_task(args.out, args.from_labeled, args), make_task(args.out, args.to_labeled, args)
    jobs, done = args.out / "jobs", args.out / "results"
    done.mkdir(parents=True, exist_ok=True)
    results = {path.stem: json.loads(path.read_text()) for path in done.glob("*.json")}
    for seed in args.seeds:
        source = jobs / f"source_L{args.from_labeled}_{args.source_steps}_seed{seed}"
        plan = [(f"source_seed{seed}", before, source, args.source_steps, None),
                (f"scratch_seed{seed}", after, jobs / f"scratch_L{args.to_labeled}_{args.scratch_steps}_seed{seed}",
                 args.scratch_steps, None)]
        plan += [(init_name(b, seed, args.init_tag), after,
                  jobs / f"init_L{args.to_labeled}_{b}{'_' + args.init_tag if args.init_tag else ''}_seed{seed}",
                  b, source) for b in args.budgets]
        for name, datalist, run, steps, init_from in plan:
            if name not in results:
                results[name] = train_and_score(datalist, run, steps, seed, init_from,
                                                init_extra if init_from else None)
                (done / f"{name}.json").write_text(json.dumps(results[name], indent=1))
                print(f"{time.strftime('%H:%M:%S')} {name}: Dice {results[name]['dice']:.4f} "
                      f"({results[name]['train_s']:.0f} s)", flush=True)
            (args.out / "results.json").write_text(json.dumps(summarise(results, args), indent=1))
    summary = summarise(results, args)
    print(f"| seed | source (L={args.from_labeled}, {args.source_steps}) | scratch @{args.scratch_steps} | "
          + " | ".join(f"init @{b}" for b in args.budgets) + " | steps saved |")
    print("|---" * (4 + len(args.budgets)) + "|")
    for seed, s in summary["seeds"].items():
        print(f"| {seed} | {s['source_dice']:.4f} | {s['scratch_dice']:.4f} | "
              + " | ".join(f"{s['init_dice'][str(b)]:.4f}" for b in args.budgets) + f" | {s['steps_saved']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
