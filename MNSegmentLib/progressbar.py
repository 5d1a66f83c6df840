"""A progress bar with ETA on an interactive terminal, fed by the same events the Slicer module reads.

tqdm comes with peft (a dependency); the command line still works with plain log lines without it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from MNSegmentLib.events import Events


class ProgressBar:
    """An :class:`Events` listener: ``start`` opens a bar over the training steps, ``progress`` moves it,
    ``prediction`` counts predicted images; the end of a command closes it."""

    def __init__(self, stream: TextIO):
        from tqdm import tqdm

        self._tqdm, self.stream = tqdm, stream
        self.bar = None

    def _open(self, total: int, initial: int, unit: str, description: str) -> None:
        self.close()
        # tqdm draws nothing on a terminal that reports 0 columns (some CI/container pseudo-terminals)
        sized = _columns(self.stream) > 0
        self.bar = self._tqdm(total=total, initial=initial, unit=unit, desc=description, file=self.stream,
                              dynamic_ncols=sized, ncols=None if sized else 100)

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if event == "start":
            self._open(fields["total_steps"], fields["step"], "step", "training")
        elif event == "progress" and self.bar is not None:
            losses = {k: f"{fields[k]:.3f}" for k in ("loss_2d", "loss_3d") if fields.get(k) is not None}
            self.bar.set_postfix(stage=fields.get("activity") or fields["stage"], **losses, refresh=False)
            self.bar.update(fields["step"] - self.bar.n)
        elif event == "prediction":
            if self.bar is None:
                self._open(fields["total"], 0, "image", "predicting")
            self.bar.update(fields["index"] + 1 - self.bar.n)
        elif event in ("done", "error", "cancelled"):
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


@contextlib.contextmanager
def terminal_progress(events: Events, wanted: bool, stream: TextIO = sys.stderr) -> Iterator[None]:
    """Shows a bar while the block runs when ``wanted`` (no ``--events``), ``stream`` is a terminal and tqdm is
    importable; the log lines then print above the bar. Otherwise the log lines alone."""
    try:
        if not (wanted and stream.isatty()):
            raise ImportError
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = ProgressBar(stream)
    except ImportError:
        yield
        return
    events.listeners.append(bar)
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        bar.close()
        events.listeners.remove(bar)
