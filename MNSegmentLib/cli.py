"""The ``mnsegment`` command: train, resume, predict, suggest, evaluate, demo.

Exit codes: 0 done; 2 bad input (one message, no traceback); 3 cancelled (after saving a checkpoint); 1 anything
else. With ``--events`` stdout carries only JSON events, one per line.

A stop request is SIGTERM or SIGINT, SIGBREAK on Windows (Ctrl+Break, what a console process group receives),
or the file named by the environment variable ``MNSEGMENT_STOP_FILE`` appearing: that one needs no console and
no signal, so it also reaches a worker behind a launcher that does not forward signals (Slicer on Windows).

``--gpus N`` (train, resume, predict) runs the command as N ranks on this machine; under ``torchrun`` each rank
runs this same command (:mod:`distributed`). Only rank 0 prints, logs below warnings and emits events.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from MNSegmentLib.errors import Cancelled, InputError
from MNSegmentLib.events import Events
from MNSegmentLib.progressbar import terminal_progress
from MNSegmentLib.training import distributed

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_CANCELLED = 0, 1, 2, 3
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGBREAK")  # those this platform has are handled
STOP_FILE_VARIABLE = "MNSEGMENT_STOP_FILE"
STOP_FILE_POLL_S = 0.5


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code 2 matches "bad input"
        self.print_usage(sys.stderr)
        print(f"mnsegment: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mnsegment", description="Few-label 3D segmentation by 2D/3D co-training (M&N).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a new model from a datalist")
    train.add_argument("datalist", type=Path)
    train.add_argument("--output", type=Path, required=True, help="new run folder")
    train.add_argument("--preset", default="default", choices=["quick", "default", "paper"])
    train.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a configuration value, e.g. --set train.steps=2000 (repeatable)")
    train.add_argument("--init-from", type=Path, default=None, metavar="RUN",
                       help="start from the networks of a finished run folder (e.g. after adding labels) "
                            "instead of from scratch; default train.steps: a quarter of RUN's")
    train.add_argument("--gpus", default="1", metavar="N",
                       help="run as N ranks on this machine, one per GPU (or 'all'); with --device cpu: N CPU "
                            "(gloo) ranks. Under torchrun, ranks come from torchrun instead")
    train.add_argument("--preview", type=Path, default=None, metavar="IMAGE",
                       help="at each checkpoint, write the current prediction of IMAGE to RUN/preview.nii.gz "
                            "(on IMAGE's grid) and emit a 'preview' event")
    train.add_argument("--events", action="store_true", help="JSON events on stdout, logs on stderr")

    resume = commands.add_parser("resume", help="continue an interrupted training run")
    resume.add_argument("run_dir", type=Path)
    resume.add_argument("--device", default=None, help="default: the device the run was started with")
    resume.add_argument("--gpus", default="1", metavar="N",
                       help="run as N ranks on this machine, one per GPU (or 'all'); with --device cpu: N CPU "
                            "(gloo) ranks. Under torchrun, ranks come from torchrun instead")
    resume.add_argument("--events", action="store_true")

    predict = commands.add_parser("predict", help="segment images with a trained run folder")
    predict.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    predict.add_argument("--model", type=Path, required=True, help="a run folder of 'mnsegment train'")
    predict.add_argument("--output", type=Path, required=True, help="folder for <name>.nii.gz label maps")
    predict.add_argument("--network", choices=["3d", "2d", "ensemble"], default=None)
    predict.add_argument("--device", default="auto")
    predict.add_argument("--gpus", default="1", metavar="N",
                       help="run as N ranks on this machine, one per GPU (or 'all'); with --device cpu: N CPU "
                            "(gloo) ranks. Under torchrun, ranks come from torchrun instead")
    predict.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png")
    predict.add_argument("--reference", type=Path, default=None,
                         help="label map (or folder, matched by file name) drawn as reference in the overlays")
    predict.add_argument("--events", action="store_true")

    suggest = commands.add_parser("suggest", help="rank unlabeled volumes by what labeling them would teach the model")
    suggest.add_argument("images", type=Path, nargs="*", metavar="IMAGE",
                         help="volumes to rank (default: the run's unlabeled volumes)")
    suggest.add_argument("--model", type=Path, required=True, help="a run folder of 'mnsegment train'")
    suggest.add_argument("--output", type=Path, default=None,
                         help="folder for suggestions.json and the disagreement maps (default: RUN/suggestions)")
    suggest.add_argument("--device", default="auto")
    suggest.add_argument("--events", action="store_true")

    evaluate = commands.add_parser("evaluate", help="Dice, Jaccard, HD95 and ASD (mm) against references")
    evaluate.add_argument("--prediction", type=Path, required=True, help="a label map or a folder of them")
    evaluate.add_argument("--reference", type=Path, required=True, help="a label map or a folder of them")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")

    demo = commands.add_parser("demo", help="offline demo: make data, train, predict, compare with baseline")
    demo.add_argument("--output", type=Path, default=Path("mnsegment_demo"))
    demo.add_argument("--device", default="auto")
    demo.add_argument("--steps", type=int, default=None, help="training steps per arm (default: the demo's 150)")
    return parser


def _install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, frame: object) -> None:
        logging.getLogger("mnsegment").warning("%s received: saving a checkpoint and stopping",
                                               signal.Signals(signum).name)
        stop.set()

    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handle)


def _watch_stop_file(stop: threading.Event) -> None:
    """Sets ``stop`` once the file named by ``MNSEGMENT_STOP_FILE`` exists (polled by a daemon thread)."""
    path = os.environ.get(STOP_FILE_VARIABLE)
    if not path:
        return

    def watch() -> None:
        while not stop.wait(STOP_FILE_POLL_S):
            if os.path.exists(path):
                logging.getLogger("mnsegment").warning("stop requested: saving a checkpoint and stopping")
                stop.set()

    threading.Thread(target=watch, name="mnsegment-stop-file", daemon=True).start()


def _print_metrics(result: dict) -> None:
    print(f"{'case':<24}{'class':>6}{'Dice':>8}{'Jaccard':>9}{'HD95 mm':>9}{'ASD mm':>8}")

    def row(name: str, value: str, m: dict) -> None:
        cells = [f"{m[k]:.3f}" if m[k] is not None else "-" for k in ("dice", "jaccard")]
        cells += [f"{m[k]:.2f}" if m[k] is not None else "-" for k in ("hd95_mm", "asd_mm")]
        print(f"{name:<24}{value:>6}{cells[0]:>8}{cells[1]:>9}{cells[2]:>9}{cells[3]:>8}")

    for name, per_class in result["cases"].items():
        for value, m in per_class.items():
            row(name, value, m)
    for value, m in result["mean"].items():
        row("mean", value, m)


def run(args: argparse.Namespace, events: Events, stop: threading.Event) -> int:
    from MNSegmentLib import workflow
    from MNSegmentLib.config import parse_set_args

    if args.command == "train":
        overrides = parse_set_args(args.overrides)
        if args.preview is not None:
            overrides["preview"] = str(args.preview)
        workflow.train(args.datalist, args.output, args.preset, args.device, overrides, events, stop,
                       init_from=args.init_from)
    elif args.command == "resume":
        workflow.resume(args.run_dir, args.device, events, stop)
    elif args.command == "predict":
        written = workflow.predict(args.model, args.images, args.output, args.network, args.device, args.overlay,
                                   events, stop, args.reference)
        events.emit("done", outputs=[str(p) for p in written])
    elif args.command == "suggest":
        from MNSegmentLib.inference.suggestions import ranked_table

        record = workflow.suggest(args.model, args.images, args.output, args.device, events, stop)
        print(ranked_table(record))
        print(f"written: {record['file']}")
        events.emit("done", suggestions=record["volumes"], suggestions_file=record["file"],
                    suggestions_s=record["seconds"])
    elif args.command == "evaluate":
        from MNSegmentLib.evaluation.metrics import evaluate

        result = evaluate(args.prediction, args.reference)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            _print_metrics(result)
    elif args.command == "demo":
        from MNSegmentLib.demo import run_demo

        run_demo(args.output, args.device, stop, **({"steps": args.steps} if args.steps else {}))
    return EXIT_OK


def _launch_ranks(args: argparse.Namespace, argv: list[str], events: Events, stop: threading.Event) -> int | None:
    """With ``--gpus`` above one (outside torchrun): runs the command as that many ranks and returns its exit
    code; None when the command runs in this process."""
    if distributed.in_launched_rank() or getattr(args, "gpus", "1") == "1":
        return None
    device = args.device
    if args.command == "resume" and device is None:
        device = distributed.run_config_device(args.run_dir)
    count = distributed.gpu_count(args.gpus, device)
    if count == 1:
        return None

    def failed(message: str) -> None:
        print(f"mnsegment: error: {message}", file=sys.stderr)
        events.emit("error", message=message, exit_code=EXIT_ERROR)

    return distributed.launch(argv, count, stop, failed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; set before CUDA starts
    ranks = distributed.setup()  # joins the other ranks when started by --gpus N or torchrun
    main_rank = ranks.is_main
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, stream=sys.stderr, datefmt="%H:%M:%S",
                        format="%(asctime)s %(message)s" if ranks.world == 1 else
                        f"%(asctime)s [rank {ranks.rank}] %(message)s")
    use_events = getattr(args, "events", False)
    events = Events(use_events and main_rank, sys.stdout)
    if use_events or not main_rank:
        sys.stdout = sys.stderr  # anything a library prints goes to the log, never into the event stream
    stop = threading.Event()
    _install_signal_handlers(stop)
    _watch_stop_file(stop)
    distributed.watch_launcher(stop)
    code = EXIT_ERROR
    try:
        launched = _launch_ranks(args, argv, events, stop)
        if launched is not None:
            code = launched
            return code
        with terminal_progress(events, wanted=not use_events and main_rank):  # a bar on a terminal; else logs
            code = run(args, events, stop)
    except distributed.PeerExit as peer:  # rank 0 failed before this rank's part began and reported it
        code = peer.code
    except InputError as err:
        code = EXIT_INPUT
        if main_rank:  # every rank meets the same bad input; rank 0 alone reports it
            print(f"mnsegment: error: {err}", file=sys.stderr)
            events.emit("error", message=str(err), exit_code=EXIT_INPUT)
    except Cancelled:
        code = EXIT_CANCELLED
        if main_rank:
            print("mnsegment: cancelled; continue with 'mnsegment resume RUN_DIR'", file=sys.stderr)
            events.emit("cancelled")
    except Exception as err:  # the worker must always end with an exit code and an event
        traceback.print_exc()
        events.emit("error", message=f"{type(err).__name__}: {err}", exit_code=EXIT_ERROR)
        code = EXIT_ERROR
    finally:
        ranks.announce(code)  # rank 0 failing while the others wait for its preparation tells them so
        distributed.teardown()
    return code


if __name__ == "__main__":
    sys.exit(main())
