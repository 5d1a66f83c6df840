"""Post-hoc diagnostic for docs/BENCHMARKS.md sections 13 and 13i: which networks would make the best output
ensemble? No training: the networks of a finished ``cotraining_ablation.py`` run are combined across its arms and
seeds, and each combination's averaged class probabilities predict the task's test subjects (what ``predict
--network ensemble`` does for the two networks of one run). Not a product setting: most combinations need several
trainings.

An ensemble is written ``MEMBER+MEMBER+...``, a member ``ARM:NET`` (the ``NET`` = 2d | 3d network of that arm's
run with the same seed; ``2d1``: its 2D network along its first slice axis only, as a ``teacher.triplanar`` run
predicted before it predicted along all three) or ``ARM@next:NET`` (the run of the next seed in ``--seeds``,
cyclically: an independently trained network of the same kind). The first ensemble is the reference of the paired
differences.

Example (the numbers of section 13i)::

    python benchmarks/ensemble_members.py --ablation benchmarks/out/long1000 --labeled 2 --task wm \\
        --ensembles sup3d:2d+sup3d:3d sup3d:2d+mn_auto:3d sup3d:2d+sup3d:3d+mn_auto:3d \\
        sup3d:2d+sup3d:3d+sup3d@next:3d sup3d:2d+mn_auto:3d+mn_auto@next:3d sup3d:3d+mn_auto:3d
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from accuracy import mean_sd  # noqa: E402  (benchmarks/ is on sys.path)
from cotraining_ablation import RESOLUTION_MM, class_mean  # noqa: E402


class Members:
    """Test-set class probabilities of one network of one run, computed once (the same plan for every run)."""

    def __init__(self, ablation: Path, task: str, labeled: int, seeds: list[int]) -> None:
        self.ablation, self.task, self.seeds = ablation, task, seeds
        self.task_dir = ablation / "tasks" / f"{task}_{RESOLUTION_MM.get(task, 3.0):g}mm_L{labeled}"
        test = json.loads((self.task_dir / "test.json").read_text())["test"]
        self.images = [self.task_dir / t["image"] for t in test]
        self._cache: dict[tuple[str, int, str], list] = {}

    def run(self, arm: str, seed: int) -> Path:
        return self.ablation / "jobs" / f"{self.task}_{arm}_seed{seed}" / "run"

    def resolve(self, member: str, seed: int) -> tuple[str, int, str]:
        arm, net = member.split(":")
        if arm.endswith("@next"):
            arm, seed = arm.removesuffix("@next"), self.seeds[(self.seeds.index(seed) + 1) % len(self.seeds)]
        if net not in ("2d", "2d1", "3d"):
            raise SystemExit(f"{member}: the network must be 2d, 2d1 or 3d")
        return arm, seed, net

    def probabilities(self, arm: str, seed: int, net: str) -> list:
        import torch

        from MNSegmentLib.data.io import read_image
        from MNSegmentLib.data.preprocess import preprocess_image
        from MNSegmentLib.inference.predict import predict_array, predictor
        from MNSegmentLib.models.slicing import network_axes
        from MNSegmentLib.workflow import load_models

        key = (arm, seed, net)
        if key not in self._cache:
            config, plan, model2d, model3d = load_models(self.run(arm, seed), torch.device("cpu"))
            axes = network_axes(config, plan.target_spacing)
            predict = predictor(net[:2], model2d, model3d, axes[:1] if net == "2d1" else axes,
                                config["model2d"]["chunk_slices"])
            inference = config["inference"]
            self._cache[key] = [
                predict_array(preprocess_image(read_image(path), plan)[0], predict, config["sampling"]["patch_size"],
                              torch.device("cpu"), inference["overlap"], inference["sw_batch_size"], inference["tta"])
                for path in self.images]
        return self._cache[key]

    def score(self, ensemble: str, seed: int) -> dict:
        """Dice/HD95 (class mean) of the ensemble's averaged probabilities on the test subjects."""
        from MNSegmentLib.data.io import read_image, write_image
        from MNSegmentLib.data.preprocess import Plan, preprocess_image
        from MNSegmentLib.evaluation.metrics import evaluate
        from MNSegmentLib.inference.predict import label_image, to_input_grid

        members = [self.resolve(m, seed) for m in ensemble.split("+")]
        first = self.run(*members[0][:2])
        plan = Plan.from_json(json.loads((first / "plan.json").read_text()))
        largest = json.loads((first / "config.json").read_text())["inference"]["largest_component"]
        out = self.ablation / "ensembles" / f"{self.task}_seed{seed}" / ensemble.replace(":", "-")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for i, path in enumerate(self.images):
            mean = sum(self.probabilities(*m)[i] for m in members) / len(members)
            original = read_image(path)
            indices = to_input_grid(mean, preprocess_image(original, plan)[1], original)
            write_image(label_image(indices, plan, original, largest), out / path.name)
        return class_mean(evaluate(out, self.task_dir / "labelsTs")["mean"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ablation", type=Path, required=True, help="an --out folder of cotraining_ablation.py")
    p.add_argument("--labeled", type=int, required=True, help="the --labeled it ran with")
    p.add_argument("--task", default="wm")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ensembles", nargs="+", required=True, help="MEMBER+MEMBER..., MEMBER = ARM[@next]:2d|2d1|3d")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    members = Members(args.ablation.absolute(), args.task, args.labeled, args.seeds)
    scores = {e: {s: members.score(e, s) for s in args.seeds} for e in args.ensembles}
    reference = args.ensembles[0]
    lines = [f"| ensemble | Dice mean ± sd | per seed | − {reference}, per seed (mean) | HD95 mean |",
             "|---|---|---|---|---|"]
    for e, by_seed in scores.items():
        dice = [by_seed[s]["dice"] for s in args.seeds]
        diff = [by_seed[s]["dice"] - scores[reference][s]["dice"] for s in args.seeds]
        m, sd = mean_sd(dice)
        hd = mean_sd([by_seed[s]["hd95_mm"] for s in args.seeds])[0]
        lines.append(f"| {e} | {m:.4f} ± {sd:.4f} | {' / '.join(f'{d:.4f}' for d in dice)} | "
                     f"{' / '.join(f'{d:+.4f}' for d in diff)} ({sum(diff) / len(diff):+.4f}) | {hd:.2f} |")
    (args.ablation / "ensembles" / f"{args.task}_results.json").write_text(json.dumps(
        {"command": "python benchmarks/ensemble_members.py " + " ".join(argv or sys.argv[1:]), "scores": scores},
        indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
