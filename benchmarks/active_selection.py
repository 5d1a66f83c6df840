"""Is the volume ``mnsegment suggest`` ranks first a better one to label next than a random one? (issue 12.1)

Protocol, on the accuracy benchmark's task (MNI152 white matter, accuracy.py): subjects s000-s007 form the pool
(all their labels are generated, but only those "labeled" are given to training), s008-s011 are the test set
(in the unlabeled list too, the transductive protocol). For each seed:

1. ``base``: train with ``--labeled`` labeled subjects (the first of the pool) for ``--base-steps``; training ends
   with its suggestions (the ``done`` event); the candidates are the pool's unlabeled subjects (never a test one).
2. ``top``: label the best-ranked candidate, ``train --init-from base`` for ``--more-steps`` (the annotate →
   suggest → train-more loop); ``random``: the same with a candidate drawn with ``random.Random(seed)``. Same
   seed, same steps: the arms differ only in which volume got its label. If the draw is the top-ranked volume
   the arms are the same run (difference 0).
3. Test Dice (white matter, mean over the 4 test subjects) of the 3D network and of the ensemble.

Also recorded, as a diagnostic: the base run's own ensemble Dice on each candidate (its labels exist) and the
Spearman correlation between the suggestion score and that error (1 − Dice): does the score find the volumes the
model gets wrong? Runs are kept under ``--out`` and finished ones skipped on a re-run.

With ``--shared-base`` one base run (``--base-seed``) serves every seed: the seeds then vary the continued runs
(patch sampling, augmentation) and the random draw, not the base model.

Examples (a base run per seed was not timed to the end here: at a load average of 15 on 2 cores its base run
alone took 32 min; docs/BENCHMARKS.md §11 used the second form, 693 s after the base run)::

    python benchmarks/active_selection.py --out benchmarks/out/active --seeds 0 1 2 --base-steps 200 \\
        --more-steps 100
    python benchmarks/active_selection.py --out benchmarks/out/active --seeds 0 1 2 --base-steps 150 \\
        --more-steps 24 --more-refresh-at 0.5 --shared-base
    python benchmarks/active_selection.py --out benchmarks/out/active_geometry --seeds 0 1 2 --vary-geometry
    python benchmarks/active_selection.py --out benchmarks/out/active_bias --seeds 0 1 2 --strong-bias \\
        --all-candidates
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread, set before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from machine_info import machine  # noqa: E402  (benchmarks/ is on sys.path)

POOL, TEST = [f"s{i:03d}" for i in range(8)], [f"s{i:03d}" for i in range(8, 12)]


def make_pool_task(out: Path, args: argparse.Namespace) -> Path:
    """The accuracy task's 12 subjects with every pool label written (subject i depends only on (seed, i))."""
    from MNSegmentLib.data.realdata import make_t1_task

    return make_t1_task(out / "task", n_labeled=len(POOL), n_unlabeled=0, n_test=len(TEST),
                        structure=args.structure, seed=args.task_seed, resolution_mm=args.resolution,
                        test_in_unlabeled=True, vary_geometry=args.vary_geometry,
                        strong_bias=args.strong_bias).parent


def write_datalist(task: Path, labeled: list[str], path: Path) -> Path:
    data = json.loads((task / "datalist.json").read_text())
    unlabeled = [f"imagesTr/{c}.nii.gz" for c in POOL if c not in labeled] + [f"imagesTs/{c}.nii.gz" for c in TEST]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "labeled": [{"image": str(task / f"imagesTr/{c}.nii.gz"), "label": str(task / f"labelsTr/{c}.nii.gz")}
                    for c in labeled],
        "unlabeled": [{"image": str(task / u)} for u in unlabeled], "classes": data["classes"]}, indent=1))
    return path


def train_run(datalist: Path, run: Path, steps: int, seed: int, init_from: Path | None,
              suggest: bool, refresh_at: list[float] | None = None) -> tuple[dict | None, float]:
    """Trains (unless finished); returns the done event (None for a run found finished) and seconds of training
    (after preprocessing)."""
    from MNSegmentLib.events import Events
    from MNSegmentLib.workflow import train

    if (run / "model.pt").exists():  # made by an earlier invocation: its wall time from the files' times
        return None, (run / "model.pt").stat().st_mtime - (run / "config.json").stat().st_mtime
    done: dict = {}
    events = Events(False)
    events.listeners.append(lambda event, fields: done.update(fields) if event == "done" else None)
    started = time.time()
    overrides = {"seed": seed, "train.steps": steps, "train.suggest": suggest}
    if refresh_at is not None:
        overrides["train.refresh_at"] = refresh_at
    train(datalist, run, "quick", "cpu", overrides, events=events, init_from=init_from)
    return done, time.time() - started


def test_dice(run: Path, task: Path, network: str, images: list[Path], labels: Path) -> dict[str, float]:
    from MNSegmentLib.evaluation.metrics import evaluate
    from MNSegmentLib.workflow import predict

    predict(run, images, run / f"pred_{network}", network=network, device="cpu")
    result = evaluate(run / f"pred_{network}", labels)
    return {case: per_class["1"]["dice"] for case, per_class in result["cases"].items()}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for position, i in enumerate(order):
            r[i] = float(position)
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    norm = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / norm if norm else float("nan")


def base_record(task: Path, out: Path, seed: int, args: argparse.Namespace) -> dict:
    """Trains the base run (L labeled) and reads its suggestions; cached in ``out/base_seed<seed>_record.json``."""
    path = out / f"base_seed{seed}_record.json"
    if path.exists():
        return json.loads(path.read_text())
    labeled = POOL[:args.labeled]
    candidates = [c for c in POOL if c not in labeled]
    base = out / f"base_seed{seed}"
    _, base_s = train_run(write_datalist(task, labeled, out / f"base_seed{seed}.json"), base, args.base_steps, seed,
                          None, suggest=True)
    ranking = json.loads((base / "suggestions" / "suggestions.json").read_text())
    scores = {v["name"]: v["score"] for v in ranking["volumes"]}
    # diagnostic: does the score follow the base model's error on the candidates?
    pool_dice = test_dice(base, task, "ensemble", [task / f"imagesTr/{c}.nii.gz" for c in candidates],
                          task / "labelsTr")
    test_images = [task / f"imagesTs/{c}.nii.gz" for c in TEST]
    record = {"base_seed": seed, "run": str(base), "ranked": sorted(candidates, key=lambda c: -scores[c]),
              "scores": {c: scores[c] for c in candidates}, "base_pool_dice": pool_dice,
              "base_train_s": round(base_s, 1), "suggest_s": ranking["seconds"], "n_scored": len(ranking["volumes"]),
              "spearman_score_vs_error": spearman([scores[c] for c in candidates],
                                                  [1 - pool_dice[c] for c in candidates]),
              "base": {net: test_dice(base, task, net, test_images, task / "labelsTs") for net in ("3d", "ensemble")}}
    path.write_text(json.dumps(record, indent=1))
    return record


def run_seed(task: Path, out: Path, seed: int, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    labeled = POOL[:args.labeled]
    candidates = [c for c in POOL if c not in labeled]
    base_info = base_record(task, out, args.base_seed if args.shared_base else seed, args)
    if args.all_candidates:
        return every_candidate(task, out, seed, args, base_info)
    chosen = {"top": base_info["ranked"][0], "random": random.Random(seed).choice(candidates)}
    record = {"seed": seed, "chosen": chosen, **base_info}
    for arm, case in chosen.items():
        if arm == "random" and case == chosen["top"]:
            record["random"] = record["top"]
            continue
        record[arm] = label_and_continue(task, out, f"{arm}_seed{seed}", case, seed, args, Path(base_info["run"]))
    return record


def label_and_continue(task: Path, out: Path, name: str, case: str, seed: int, args: argparse.Namespace,
                       base: Path) -> dict:
    """``case`` labeled too, ``train --init-from base`` for --more-steps in ``out/name``; its test Dice per case."""
    run = out / name
    _, more_s = train_run(write_datalist(task, POOL[:args.labeled] + [case], out / f"{name}.json"), run,
                          args.more_steps, seed, base, suggest=False, refresh_at=args.more_refresh_at)
    test_images = [task / f"imagesTs/{c}.nii.gz" for c in TEST]
    return {"case": case, "train_s": round(more_s, 1),
            **{net: test_dice(run, task, net, test_images, task / "labelsTs") for net in ("3d", "ensemble")}}


def every_candidate(task: Path, out: Path, seed: int, args: argparse.Namespace, base_info: dict) -> dict:
    """--all-candidates: one continued run per candidate; "random" is then the exact expectation of a random
    choice (the mean over candidates, per test case) instead of one draw, and the score can be compared with what
    labeling each candidate gained (Spearman over the candidates)."""
    ranked = base_info["ranked"]
    runs = {case: label_and_continue(task, out, f"cand_{case}_seed{seed}", case, seed, args, Path(base_info["run"]))
            for case in ranked}
    expected = {net: {c: mean([r[net][c] for r in runs.values()]) for c in TEST} for net in ("3d", "ensemble")}
    scores = [base_info["scores"][c] for c in ranked]
    gains = {net: spearman(scores, [mean(list(runs[c][net].values())) for c in ranked]) for net in ("3d", "ensemble")}
    return {"seed": seed, "chosen": {"top": ranked[0], "random": "mean over candidates"}, **base_info,
            "candidates": runs, "top": runs[ranked[0]], "random": expected, "spearman_score_vs_test_dice": gains}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/active"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--labeled", type=int, default=1)
    p.add_argument("--base-steps", type=int, default=200)
    p.add_argument("--more-steps", type=int, default=100)
    p.add_argument("--more-refresh-at", type=float, nargs="+", default=None,
                   help="train.refresh_at of the continued runs (default: the preset's)")
    p.add_argument("--shared-base", action="store_true",
                   help="one base run (--base-seed) for every seed: the seeds then vary the continued runs and the "
                        "random draw only (for a machine too busy for a base run per seed)")
    p.add_argument("--base-seed", type=int, default=0)
    p.add_argument("--resolution", type=float, default=3.0)
    p.add_argument("--structure", default="wm", choices=["brain", "gm", "wm"])
    p.add_argument("--task-seed", type=int, default=0)
    p.add_argument("--vary-geometry", action="store_true",
                   help="subjects 1, 2 (mod 3) acquired in another orientation with one axis 1.5x coarser: a pool "
                        "whose volumes differ in acquisition, not only in anatomy, contrast and noise")
    p.add_argument("--all-candidates", action="store_true",
                   help="a continued run for every candidate: 'random' is the mean over all of them (the exact "
                        "expectation of a random choice), and the score is also compared with each one's test Dice")
    p.add_argument("--strong-bias", action="store_true",
                   help="subjects 2 (mod 3) with a strong bias field (b 1-2 instead of 0.1-0.2): a kind of "
                        "volume the labeled subject s000 does not show, in the candidates (s002, s005) and in the "
                        "test set (s008, s011)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    task = make_pool_task(args.out, args)
    records = []
    for seed in args.seeds:
        path = args.out / f"seed{seed}.json"
        if not path.exists():
            path.write_text(json.dumps(run_seed(task, args.out / "jobs", seed, args), indent=1))
        records.append(json.loads(path.read_text()))
        print(f"seed {seed} done at {time.time() - started:.0f} s", flush=True)

    print("| seed | top-ranked | random | Dice 3D top | Dice 3D random | diff | Dice ens. top | Dice ens. random "
          "| diff | Spearman(score, base error) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    diffs: dict[str, list[float]] = {"3d": [], "ensemble": []}
    for r in records:
        cells = []
        for net in ("3d", "ensemble"):
            top, rnd = mean(list(r["top"][net].values())), mean(list(r["random"][net].values()))
            diffs[net].append(top - rnd)
            cells += [f"{top:.4f}", f"{rnd:.4f}", f"{top - rnd:+.4f}"]
        print(f"| {r['seed']} | {r['chosen']['top']} | {r['chosen']['random']} | {' | '.join(cells)} "
              f"| {r['spearman_score_vs_error']:+.2f} |")
        if "candidates" in r:
            print("  test Dice (ensemble) per candidate, best ranked first: " + ", ".join(
                f"{c} {mean(list(r['candidates'][c]['ensemble'].values())):.4f}" for c in r["ranked"])
                + f"; Spearman(score, test Dice) 3D {r['spearman_score_vs_test_dice']['3d']:+.2f}, ensemble "
                f"{r['spearman_score_vs_test_dice']['ensemble']:+.2f}")
    summary = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
               "wall_s": round(time.time() - started, 1),
               "mean_paired_diff": {net: mean(d) for net, d in diffs.items()},
               "top_wins": {net: sum(d > 0 for d in v) for net, v in diffs.items()}, "seeds": records}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"mean paired difference (top - random): 3D {summary['mean_paired_diff']['3d']:+.4f}, ensemble "
          f"{summary['mean_paired_diff']['ensemble']:+.4f}; top ahead on {summary['top_wins']['3d']}/"
          f"{len(records)} (3D), {summary['top_wins']['ensemble']}/{len(records)} (ensemble) seeds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
