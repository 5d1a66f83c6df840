"""Progress where users look: a tqdm bar on an interactive terminal only, plain log lines otherwise, and
TensorBoard scalars in the run folder when tensorboard is installed (training unaffected without it)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from concurrent.futures import ThreadPoolExecutor

from engine_fixtures import TINY_SET, TRAINED_STEPS, cli_command, cli_env, make_dataset, set_args, trained_run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from MNSegmentLib.training.scalars import FOLDER, STEP_TIME_TAG, TAGS

SHORT = {**TINY_SET, "train.steps": 4}
BAR = "%|"  # tqdm's bar: "50%|█████     | 2/4 [...]"
# A Python that cannot import tensorboard, as on a machine without the optional extra.
NO_TENSORBOARD = ("import sys; sys.modules['tensorboard'] = sys.modules['torch.utils.tensorboard'] = None; "
                  "from MNSegmentLib.cli import main; sys.exit(main(sys.argv[1:]))")


def test_training_writes_tensorboard_scalars(tmp_path_factory):
    run = trained_run(tmp_path_factory)  # a real `mnsegment train` subprocess, tensorboard installed
    events = EventAccumulator(str(run.run_dir / FOLDER))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    # val/dice needs validation cases, which this run has none of
    assert {TAGS[k] for k in ("loss_2d", "loss_3d", "lr_2d", "lr_3d", "unlabeled_share", "train_dice_2d",
                              "train_dice_3d")} | {STEP_TIME_TAG} <= tags
    assert [e.step for e in events.Scalars(TAGS["lr_2d"])] == list(range(TRAINED_STEPS))
    history = {r["step"]: r for r in run.events if r["event"] == "progress"}
    for scalar in events.Scalars(TAGS["unlabeled_share"]):  # the same values the progress events carry
        if scalar.step + 1 in history:
            assert abs(scalar.value - history[scalar.step + 1]["unlabeled_share"]) < 1e-6


def _train_in_terminal(args: list[str]) -> tuple[int, str]:
    """Runs the CLI with stderr on a pseudo-terminal; returns the exit code and what the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    process = subprocess.Popen(cli_command(*args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=slave, env=cli_env())
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        elif process.poll() is not None:
            break
    os.close(master)
    return process.wait(timeout=60), shown.decode(errors="replace")


def test_progress_bar_on_a_terminal_plain_lines_on_a_pipe(tmp_path):
    datalist = make_dataset(tmp_path / "data", n_labeled=2, n_unlabeled=1)
    common = ["train", str(datalist), "--preset", "quick", "--device", "cpu", *set_args(SHORT)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        terminal = pool.submit(_train_in_terminal, [*common, "--output", str(tmp_path / "tty")])
        piped = pool.submit(subprocess.run, [sys.executable, "-c", NO_TENSORBOARD, *common, "--output",
                                             str(tmp_path / "pipe")], capture_output=True, text=True,
                            timeout=300, env=cli_env())
        (code, shown), result = terminal.result(), piped.result()

    assert code == 0, shown[-3000:]
    assert BAR in shown and "4/4" in shown, shown[-3000:]
    assert "step 4/4" in shown  # log lines still appear, above the bar

    assert result.returncode == 0, result.stderr[-3000:]
    assert BAR not in result.stderr and "it/s" not in result.stderr
    assert "step 4/4" in result.stderr
    # without tensorboard the training finishes and writes no scalars
    assert (tmp_path / "pipe" / "model.pt").exists() and not (tmp_path / "pipe" / FOLDER).exists()
    assert (tmp_path / "tty" / FOLDER).is_dir()
