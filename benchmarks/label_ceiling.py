"""How much could unlabeled scans gain at most? The same pool with every subject labeled, paired by seed.

M&N with L labeled volumes learns from the other 8 − L pool subjects without their labels. Labeling those
subjects too (L = 8, labeled-only) is the fully supervised ceiling of what they can teach: a semi-supervised
method is not expected to gain more from a subject than its label would. This script reads the results of
``cotraining_ablation.py`` runs made with ``--labeled L`` and ``--labeled 8`` (same task, steps, seeds and test
subjects: subject ``i`` of a task depends only on its seed and ``i``) and prints, per task and output, the per-seed
Dice of labeled-only at L, M&N (``mn_auto``) at L and labeled-only at 8, with the paired differences and the share
of the ceiling's gain that M&N captured.

Example (docs/BENCHMARKS.md section 13k)::

    python benchmarks/cotraining_ablation.py --out benchmarks/out/ceil_L2 --tasks wm tissue --steps 200 \\
        --labeled 2 --arms sup3d mn_auto
    python benchmarks/cotraining_ablation.py --out benchmarks/out/ceil_L8 --tasks wm tissue --steps 200 \\
        --labeled 8 --arms sup3d
    python benchmarks/label_ceiling.py --few benchmarks/out/ceil_L2 --all benchmarks/out/ceil_L8 --tasks wm tissue
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUTPUTS = ("delivered", "3d", "2d")


def dice(out: Path, task: str, arm: str) -> dict[str, dict[int, float]]:
    """Test Dice of every output of ``arm``'s finished seeds: {output: {seed: dice}}."""
    found: dict[str, dict[int, float]] = {o: {} for o in OUTPUTS}
    for path in sorted((out / "results").glob(f"{task}_{arm}_seed*.json")):
        r = json.loads(path.read_text())
        for output in OUTPUTS:
            found[output][r["seed"]] = r["outputs"][output]["dice"]
    return found


def row(values: dict[int, float], seeds: list[int]) -> str:
    mean = sum(values[s] for s in seeds) / len(seeds)
    return " / ".join(f"{values[s]:.4f}" for s in seeds) + f" ({mean:.4f})"


def paired(a: dict[int, float], b: dict[int, float], seeds: list[int]) -> str:
    diffs = [a[s] - b[s] for s in seeds]
    ahead = sum(d > 0 for d in diffs)
    return " / ".join(f"{d:+.4f}" for d in diffs) + f": **{sum(diffs) / len(diffs):+.4f}** ({ahead}/{len(seeds)})"


def table(few: Path, full: Path, task: str) -> str:
    low, mn, high = dice(few, task, "sup3d"), dice(few, task, "mn_auto"), dice(full, task, "sup3d")
    lines = [f"\n**{task}** (test Dice, seeds in order, mean in brackets)\n",
             "| output | labeled-only, few | M&N, few | labeled-only, all 8 | ceiling: all − few | M&N − few "
             "| M&N − all | share of the ceiling |",
             "|---|---|---|---|---|---|---|---|"]
    for output in OUTPUTS:
        seeds = sorted(set(low[output]) & set(high[output]))
        if not seeds:
            continue
        ceiling = sum(high[output][s] - low[output][s] for s in seeds) / len(seeds)
        cells = [row(low[output], seeds), "–", row(high[output], seeds), paired(high[output], low[output], seeds),
                 "–", "–", "–"]
        if set(seeds) <= set(mn[output]):  # M&N's columns where its run of every seed is there
            gain = sum(mn[output][s] - low[output][s] for s in seeds) / len(seeds)
            cells[1], cells[4:] = row(mn[output], seeds), [
                paired(mn[output], low[output], seeds), paired(mn[output], high[output], seeds),
                f"{gain / ceiling:.0%}" if ceiling > 1e-4 else "– (no gain to share)"]
        lines.append(f"| {output} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--few", type=Path, required=True, help="cotraining_ablation --out made with --labeled L < 8")
    p.add_argument("--all", type=Path, required=True, help="cotraining_ablation --out made with --labeled 8")
    p.add_argument("--tasks", nargs="+", default=["wm", "tissue"])
    args = p.parse_args(argv)
    for task in args.tasks:
        print(table(args.few, args.all, task))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
