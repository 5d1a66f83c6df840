"""How the worker (``mnsegment``) takes a stop request: every stop signal this platform has, and the stop file
the Slicer module creates (the path that works on Windows, where Ctrl+Break may not reach a worker started
without a console). The stop request of a real training through the module is in test_slicer_engine.py."""

from __future__ import annotations

import os
import signal
import sys
import threading

import pytest

from MNSegmentLib import cli


@pytest.mark.skipif(sys.platform.startswith("win"), reason="sends a POSIX signal to itself")
def test_sigbreak_is_a_stop_request_where_the_platform_has_it(monkeypatch):
    # Linux has no SIGBREAK: stand in SIGUSR1 under that name, as Windows' signal module would provide it.
    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    saved = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGTERM", "SIGINT", "SIGUSR1")}
    stop, unhandled = threading.Event(), threading.Event()
    signal.signal(signal.SIGUSR1, lambda signum, frame: unhandled.set())  # left in place if the CLI ignores it
    try:
        cli._install_signal_handlers(stop)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.wait(5) and not unhandled.is_set()
    finally:
        for name, handler in saved.items():
            signal.signal(getattr(signal, name), handler)


def test_stop_file_is_a_stop_request(tmp_path, monkeypatch):
    path = tmp_path / "stop request é"
    monkeypatch.setenv(cli.STOP_FILE_VARIABLE, str(path))
    stop = threading.Event()
    cli._watch_stop_file(stop)
    assert not stop.wait(3 * cli.STOP_FILE_POLL_S)
    path.touch()
    assert stop.wait(10)


def test_module_and_worker_agree_on_the_stop_file_variable():
    import slicer_test_utils  # noqa: F401  (puts MNSegment/ on sys.path)
    from MNSegmentSlicerLib import job

    assert job.STOP_FILE_VARIABLE == cli.STOP_FILE_VARIABLE
