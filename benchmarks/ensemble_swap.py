"""Post-hoc diagnostic for docs/BENCHMARKS.md section 13: what would the user get if co-training left the 2D network
alone? No training: for each (task, seed) of a finished ``cotraining_ablation.py`` run, the labeled-only run's 2D
network and the M&N run's 3D network are put in one ``model.pt`` (same plan: same task, same preset) and the
ensemble predicts the task's test subjects. Not a product setting: it needs two trainings.

Example (the numbers of section 13)::

    python benchmarks/ensemble_swap.py --ablation benchmarks/out/abl_L2 --labeled 2 --tasks wm tissue --seeds 0 1 2
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from cotraining_ablation import RESOLUTION_MM, class_mean  # noqa: E402  (benchmarks/ is on sys.path)


def swapped_ensemble(ablation: Path, task: str, labeled: int, seed: int) -> dict:
    """Test Dice/HD95 (class mean) of labeled-only's 2D + M&N's 3D; cached in ``ablation/swap``."""
    import torch

    from MNSegmentLib.evaluation.metrics import evaluate
    from MNSegmentLib.workflow import predict

    out = ablation / "swap" / f"{task}_seed{seed}"
    result = out / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    mn, sup = (ablation / "jobs" / f"{task}_{arm}_seed{seed}" / "run" for arm in ("mn", "sup3d"))
    run = out / "run"
    run.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "plan.json", "model.json"):
        shutil.copy(mn / name, run / name)
    weights = torch.load(mn / "model.pt", map_location="cpu", weights_only=True)
    weights["model2d"] = torch.load(sup / "model.pt", map_location="cpu", weights_only=True)["model2d"]
    torch.save(weights, run / "model.pt")
    task_dir = ablation / "tasks" / f"{task}_{RESOLUTION_MM.get(task, 3.0):g}mm_L{labeled}"
    images = [str(task_dir / t["image"]) for t in json.loads((task_dir / "test.json").read_text())["test"]]
    predict(run, images, out / "pred", network="ensemble", device="cpu")
    scores = class_mean(evaluate(out / "pred", task_dir / "labelsTs")["mean"])
    result.write_text(json.dumps(scores))
    return scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ablation", type=Path, required=True, help="an --out folder of cotraining_ablation.py")
    p.add_argument("--labeled", type=int, required=True, help="the --labeled it ran with")
    p.add_argument("--tasks", nargs="+", default=["wm", "tissue"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    for task in args.tasks:
        for seed in args.seeds:
            swap = swapped_ensemble(args.ablation.absolute(), task, args.labeled, seed)
            found = {arm: json.loads(path.read_text())["outputs"]["delivered"]["dice"]
                     for arm in ("mn", "sup3d", "sup3d_more")
                     if (path := args.ablation / "results" / f"{task}_{arm}_seed{seed}.json").exists()}
            print(f"{task} seed {seed}: swapped ensemble Dice {swap['dice']:.4f}; delivered "
                  + ", ".join(f"{arm} {dice:.4f} (swap − {arm} {swap['dice'] - dice:+.4f})"
                              for arm, dice in found.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
