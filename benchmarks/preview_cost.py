"""What the training preview (``train --preview IMAGE``, issue 12.2) costs: the same run with and without it.

The accuracy benchmark's task (accuracy.py; ``--labeled`` labeled subjects), ``quick`` preset, ``--steps`` steps
with a checkpoint every ``--checkpoint-every`` steps (so ``steps / checkpoint_every`` previews), preview of the
first test image. Runs alternate without (A) and with (B) preview, in the order A B, B A, A B, ... (``--repeats``
pairs), all with the same seed, one thread, one at a time. Reported per run: training time (from the engine's
``start`` event to the end of training, so preprocessing is left out) and the preview's own time (the ``seconds``
of its events); per pair: the ratio B / A, and the preview's share of B's training time.

Example (the run in docs/BENCHMARKS.md §9)::

    python benchmarks/preview_cost.py --out benchmarks/out/preview --steps 100 --checkpoint-every 25 --repeats 3
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread, set before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from accuracy import _init_worker, add_task_arguments, make_task  # noqa: E402  (benchmarks/ is on sys.path)
from machine_info import machine  # noqa: E402


def run_once(datalist: Path, run: Path, preview: Path | None, args: argparse.Namespace) -> dict:
    from MNSegmentLib.events import Events
    from MNSegmentLib.workflow import train

    shutil.rmtree(run, ignore_errors=True)
    seen: dict = {"previews": []}

    def listen(event: str, fields: dict) -> None:
        if event == "start":
            seen["start"] = time.monotonic()
        elif event == "preview":
            seen["previews"].append(fields["seconds"])

    events = Events(False)
    events.listeners.append(listen)
    overrides = {"seed": 0, "train.steps": args.steps, "train.checkpoint_every": args.checkpoint_every,
                 **({"preview": str(preview)} if preview else {})}
    train(datalist, run, "quick", "cpu", overrides, events)
    train_s = time.monotonic() - seen["start"]
    shutil.rmtree(run, ignore_errors=True)
    return {"preview": preview is not None, "train_s": round(train_s, 2), "previews": len(seen["previews"]),
            "preview_s": round(sum(seen["previews"]), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/preview"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3, help="pairs of runs (without, with preview)")
    p.add_argument("--labeled", type=int, default=2)
    add_task_arguments(p)
    args = p.parse_args(argv)
    _init_worker()
    datalist = make_task(args.out, args.labeled, args)
    test = json.loads((datalist.parent / "test.json").read_text())["test"]
    preview = datalist.parent / test[0]["image"]
    pairs = []
    for repeat in range(args.repeats):
        order = [None, preview] if repeat % 2 == 0 else [preview, None]
        runs = {}
        for chosen in order:
            r = run_once(datalist, args.out / "run", chosen, args)
            runs["with" if chosen else "without"] = r
            print(f"{time.strftime('%H:%M:%S')} pair {repeat}: {'with' if chosen else 'without'} preview: "
                  f"{r['train_s']:.1f} s ({r['previews']} previews, {r['preview_s']:.1f} s)", flush=True)
        pairs.append({**runs, "ratio": runs["with"]["train_s"] / runs["without"]["train_s"],
                      "preview_share": runs["with"]["preview_s"] / runs["with"]["train_s"]})
        summary = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "pairs": pairs,
                   "median_ratio": statistics.median(q["ratio"] for q in pairs),
                   "median_preview_share": statistics.median(q["preview_share"] for q in pairs)}
        (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"median ratio with/without: {summary['median_ratio']:.4f}; "
          f"median preview share of training time: {summary['median_preview_share']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
