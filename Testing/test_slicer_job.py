"""Job machinery of the Slicer module (MNSegmentSlicerLib.job) against a *stand-in* worker.

The stand-in is a real subprocess (a small Python script written below) that speaks the engine's event
protocol and handles SIGTERM like the engine; it lets these tests exercise launching, event parsing, phases,
error messages and cancellation (including a launcher that does not forward signals, like PythonSlicer)
without training anything. The real engine is used in test_slicer_engine.py.
"""

from __future__ import annotations

import os
import stat
import sys
import textwrap
import threading
import time

import psutil
import pytest
import slicer_test_utils  # noqa: F401  (puts MNSegment/ on sys.path)
from MNSegmentSlicerLib import job as jobs

STANDIN = textwrap.dedent(
    """
    # Stand-in for `mnsegment` (test double of the engine's event protocol; trains nothing).
    import json, os, signal, subprocess, sys, time
    args = sys.argv[1:]
    mode = args[0]
    marker = os.environ.get("STANDIN_MARKER")

    def event(**kw):
        print(json.dumps(kw), flush=True)

    def on_term(signum, frame):
        print("saving checkpoint", file=sys.stderr, flush=True)
        if marker:
            open(marker, "w").write("terminated")
        event(event="checkpoint", path="ckpt.pt")
        sys.exit(3)

    if mode == "ok":
        event(event="start", total_steps=3)
        for step in range(1, 4):
            print(f"log line {step} é", file=sys.stderr, flush=True)
            event(event="progress", stage="warmup", step=step, total_steps=3, unlabeled_share=0.0,
                  lr_2d=1e-3, lr_3d=1e-4, loss_2d=1.0, loss_3d=1.0, eta_s=3 - step)
        print("not json on stdout", flush=True)
        event(event="done", model_dir=os.getcwd())
        sys.exit(0)
    if mode == "bad":
        print("error: the label of case 2 is not on the grid of its image", file=sys.stderr, flush=True)
        sys.exit(2)
    if mode == "error-event":
        print("Traceback (most recent call last):", file=sys.stderr, flush=True)
        event(event="error", message="CUDA out of memory: try a smaller patch size")
        sys.exit(1)
    if mode == "crash":
        print("Traceback (most recent call last):", file=sys.stderr)
        print('  File "x.py", line 1', file=sys.stderr)
        print("ZeroDivisionError: division by zero", file=sys.stderr, flush=True)
        sys.exit(1)
    if mode == "long":
        signal.signal(signal.SIGTERM, on_term)
        event(event="start")
        step = 0
        while True:
            step += 1
            event(event="progress", stage="cotrain", step=step, total_steps=10**6)
            time.sleep(0.05)
    if mode == "finishing":  # in its last seconds: a stop no longer changes the outcome (as after training)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        event(event="start")
        event(event="progress", stage="cotrain", step=1, total_steps=1)
        time.sleep(1.5)
        event(event="done", model_dir=os.getcwd())
        sys.exit(0)
    if mode == "stubborn":  # ignores SIGTERM and has a child of its own
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        event(event="start", child=child.pid)
        time.sleep(600)
    """
)

LAUNCHER = textwrap.dedent(
    """\
    #!{python}
    # Stand-in for PythonSlicer: starts the worker as a child and dies on SIGTERM without forwarding it.
    import subprocess, sys
    sys.exit(subprocess.call([sys.executable] + sys.argv[1:]))
    """
)


@pytest.fixture()
def standin(tmp_path):
    path = tmp_path / "standin worker é.py"
    path.write_text(STANDIN, encoding="utf-8")
    return path


def make_job(standin, tmp_path, *modes, prefix=None, **kwargs):
    phases = [jobs.Phase(f"phase{i}", [mode]) for i, mode in enumerate(modes)]
    env = jobs.worker_environment({"STANDIN_MARKER": str(tmp_path / "marker.txt")})
    return jobs.EngineJob(phases, folder=tmp_path, env=env,
                          command_prefix=prefix or [sys.executable, str(standin)], **kwargs)


def alive(pids):
    left = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def test_events_progress_logs_and_phases(standin, tmp_path):
    seen = {"progress": [], "log": [], "phase": [], "threads": set(), "finished": 0}

    def on_progress(job, event):
        seen["progress"].append((job.phase, event["step"]))
        seen["threads"].add(threading.get_ident())

    def on_log(job, line):
        seen["log"].append(line)
        seen["threads"].add(threading.get_ident())

    def on_finished(job):
        seen["finished"] += 1

    job = make_job(standin, tmp_path, "ok", "ok", on_progress=on_progress, on_log=on_log,
                   on_phase=lambda job, name: seen["phase"].append(name), on_finished=on_finished)
    job.start()
    assert job.wait(timeout=60) == jobs.DONE
    assert seen["phase"] == ["phase0", "phase1"]
    assert seen["progress"] == [("phase0", 1), ("phase0", 2), ("phase0", 3), ("phase1", 1), ("phase1", 2),
                                ("phase1", 3)]
    assert "log line 1 é" in seen["log"] and "not json on stdout" in seen["log"]
    assert seen["threads"] == {threading.get_ident()}  # callbacks only on the polling thread
    assert seen["finished"] == 1
    assert job.last_progress["step"] == 3 and job.returncode == 0 and job.error is None
    assert job.model_dir == str(tmp_path)
    assert [e["event"] for e in job.events].count("done") == 2


def test_bad_input_message_reaches_user(standin, tmp_path):
    job = make_job(standin, tmp_path, "bad", "ok").start()
    assert job.wait(timeout=60) == jobs.FAILED
    assert job.returncode == 2
    assert job.error == "error: the label of case 2 is not on the grid of its image"
    assert job.phases[1].returncode is None  # later phases do not run
    with pytest.raises(jobs.EngineError, match="not on the grid"):
        job.raise_for_status()


def test_error_event_wins_over_traceback(standin, tmp_path):
    job = make_job(standin, tmp_path, "error-event").start()
    assert job.wait(timeout=60) == jobs.FAILED
    assert job.error == "CUDA out of memory: try a smaller patch size"


def test_crash_shows_last_line_not_traceback(standin, tmp_path):
    job = make_job(standin, tmp_path, "crash").start()
    assert job.wait(timeout=60) == jobs.FAILED
    assert job.error.startswith("ZeroDivisionError: division by zero")
    assert "Traceback" not in job.error


def test_cancel_is_graceful_and_leaves_nothing(standin, tmp_path):
    job = make_job(standin, tmp_path, "long", "ok").start()
    while job.poll() == jobs.RUNNING and not job.last_progress:
        time.sleep(0.05)
    pid = job.pid
    t0 = time.monotonic()
    job.cancel(grace_s=10)
    assert time.monotonic() - t0 < 0.5  # never blocks the GUI thread: later polls finish the job
    assert job.status == jobs.CANCELLING and job.running
    assert job.wait(timeout=20) == jobs.CANCELLED and job.returncode == 3
    assert (tmp_path / "marker.txt").read_text() == "terminated"  # SIGTERM reached the worker
    assert any(e["event"] == "checkpoint" for e in job.events)
    assert alive([pid]) == []
    assert job.phases[1].returncode is None


@pytest.mark.parametrize("phases, expected", [(("finishing",), jobs.DONE), (("finishing", "ok"), jobs.CANCELLED)])
def test_a_stop_that_comes_after_the_work_is_done_keeps_the_result(standin, tmp_path, phases, expected):
    """The worker exits 0 with its result although the stop was asked: the last phase's job is done (with a log
    line saying why); an earlier phase's job is cancelled, and the phases after it never run."""
    job = make_job(standin, tmp_path, *phases).start()
    while job.poll() == jobs.RUNNING and not job.last_progress:
        time.sleep(0.05)
    job.cancel(grace_s=10)
    assert job.wait(timeout=20) == expected and job.returncode == 0
    assert job.model_dir == str(tmp_path)
    assert ("The engine finished before the stop took effect; its result is kept." in job.log) == (
        expected == jobs.DONE)
    if len(phases) > 1:
        assert job.phases[1].returncode is None


def test_cancel_kills_stubborn_process_tree(standin, tmp_path):
    job = make_job(standin, tmp_path, "stubborn").start()
    while job.poll() == jobs.RUNNING and not job.events:
        time.sleep(0.05)
    child = job.events[0]["child"]
    pids = [job.pid, child]
    assert alive(pids) == pids
    t0 = time.monotonic()
    job.cancel(grace_s=1)
    assert time.monotonic() - t0 < 0.5 and job.status == jobs.CANCELLING
    assert job.wait(timeout=20) == jobs.CANCELLED
    assert alive(pids) == []


@pytest.mark.skipif(sys.platform.startswith("win"), reason="POSIX launcher script")
def test_cancel_through_launcher_reaches_worker(standin, tmp_path):
    launcher = tmp_path / "bin" / "PythonSlicer"
    launcher.parent.mkdir()
    launcher.write_text(LAUNCHER.format(python=sys.executable), encoding="utf-8")
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    job = make_job(standin, tmp_path, "long", prefix=[str(launcher), str(standin)]).start()
    while job.poll() == jobs.RUNNING and not job.last_progress:
        time.sleep(0.05)
    tree = [p.pid for p in psutil.Process(job.pid).children(recursive=True)] + [job.pid]
    assert len(tree) == 2
    job.cancel(grace_s=10, wait=True)
    assert job.status == jobs.CANCELLED
    assert (tmp_path / "marker.txt").read_text() == "terminated"
    assert job.returncode == 3  # the launcher passed on the worker's exit code
    assert alive(tree) == []


def test_worker_environment_finds_engine():
    env = jobs.worker_environment()
    path = jobs.engine_search_path()
    assert path is not None and (path / "MNSegmentLib" / "__init__.py").is_file()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(path)
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONIOENCODING"] == "utf-8"
    assert jobs.engine_command("train", "x.json")[:3] == [sys.executable, "-m", "MNSegmentLib.cli"]


def test_progress_text_and_settings():
    from MNSegmentSlicerLib import progress

    status, metrics, step, total = progress.describe_progress(
        {"event": "progress", "stage": "cotrain", "step": 120, "total_steps": 400, "unlabeled_share": 0.35,
         "lr_2d": 8.1e-4, "lr_3d": 8.1e-5, "loss_2d": 0.41234, "loss_3d": None, "eta_s": 200.2})
    assert (step, total) == (120, 400)
    assert status == "Training, co-training: step 120/400, about 3 min 20 s left"
    assert "loss 2D 0.4123" in metrics and "loss 3D –" in metrics and "share 35 %" in metrics
    status, _, _, _ = progress.describe_progress({"stage": "warmup", "step": 5, "total_steps": 9,
                                                  "activity": "refreshing pseudo-masks"})
    assert status == "Training, warm-up (labeled only): step 5/9 (refreshing pseudo-masks)"
    assert progress.format_eta(None) == "unknown" and progress.format_eta(7300) == "2 h 01 min"
    assert progress.parse_patch_size(" 96, 96 ,48") == [96, 96, 48]
    assert progress.parse_patch_size("") is None
    with pytest.raises(ValueError, match="three voxel counts"):
        progress.parse_patch_size("96,96")
    assert progress.settings_overrides() == {}
    assert progress.settings_overrides(steps=500, batch_size=2, patch_size="64x64x32", lrg_mode="linear",
                                       backbone_2d=" resnet18 ", weights_2d="/w/r18.pth", network_3d="SegResNet") == {
        "steps": 500, "batch_size": 2, "patch_size": [64, 64, 32], "lrg_mode": "linear",
        "backbone_2d": "resnet18", "weights_2d": "/w/r18.pth", "network_3d": "SegResNet"}


def test_engine_warnings_are_worded_for_the_user():
    from MNSegmentSlicerLib import progress

    assert progress.describe_warning({"event": "warning", "message": "no unlabeled volumes: training labeled-only"}
                                     ) == "Warning: no unlabeled volumes: training labeled-only"
    assert progress.describe_warning({"event": "progress", "step": 1}) is None


def test_the_chosen_network_and_its_reason_are_worded_for_the_user():
    from MNSegmentSlicerLib import progress

    events = [{"event": "start"}, {"event": "done", "model_dir": "/r", "network": "ensemble", "phase": "train",
                                   "network_reason": "highest mean Dice on 2 validation cases (3d 0.7, ...)"},
              {"event": "done", "outputs": [], "phase": "predict"}]
    assert progress.describe_chosen_network(events, "ensemble") == (
        "Chosen network: ensemble (highest mean Dice on 2 validation cases (3d 0.7, ...)).")
    assert progress.describe_chosen_network(events, "3d").endswith(
        "These segmentations used the 3d network (the Network setting).")
    assert progress.describe_chosen_network(events[:1]) is None  # still training, or an older engine


def test_engine_settings_map_friendly_names():
    from MNSegmentSlicerLib.logic import device_argument, engine_settings

    assert engine_settings({"steps": 10, "train.lr_2d": 1e-3, "batch_size": None}) == {
        "train.steps": 10, "train.lr_2d": 1e-3}
    assert engine_settings({"network_3d": "SegResNet"}) == {"model3d.name": "SegResNet", "model3d.kwargs": {}}
    assert engine_settings({"network_3d": "UNet"}) == {"model3d.name": "UNet"}
    assert [device_argument(d) for d in ("auto", "GPU", "cpu", "cuda:1")] == ["auto", "cuda", "cpu", "cuda:1"]
    with pytest.raises(ValueError):
        device_argument("tpu")


def test_failing_finished_handler_fails_the_job(standin, tmp_path):
    job = make_job(standin, tmp_path, "ok")

    def load(job):
        raise ValueError("The prediction x.nii.gz is not on the grid of CT 3")

    job.add_finished_handler(load)
    job.start()
    assert job.wait(timeout=60) == jobs.FAILED
    assert job.error == "The prediction x.nii.gz is not on the grid of CT 3"


def _stepper(log: list, fail_at: int | None = None):
    def steps():
        try:
            for i in range(3):
                if i == fail_at:
                    raise ValueError(f"piece {i} failed")
                log.append(("piece", i, threading.get_ident()))
                yield
        except GeneratorExit:
            log.append(("closed",))
            raise
    return steps


def test_a_main_thread_phase_advances_one_piece_per_poll_on_the_polling_thread():
    """Phase(steps=...): the work that must touch the scene (loading predictions) runs in pieces, one per poll,
    so the GUI's timer returns between them; then the next phase, then done."""
    log = []
    job = jobs.EngineJob([jobs.Phase("load", steps=_stepper(log)), jobs.Phase("after", run=lambda stop: None)])
    job.start()
    assert job.phase == "load" and log == []
    for expected in (1, 2, 3):
        job.poll()
        assert len(log) == expected
    assert job.wait(timeout=30) == jobs.DONE
    assert {ident for _, _, ident in log} == {threading.get_ident()}


def test_a_failing_main_thread_phase_fails_the_job_and_cancel_closes_it():
    failing = jobs.EngineJob([jobs.Phase("load", steps=_stepper([], fail_at=1))])
    failing.start()
    assert failing.wait(timeout=30) == jobs.FAILED and failing.error == "piece 1 failed"

    log = []
    cancelled = jobs.EngineJob([jobs.Phase("load", steps=_stepper(log))])
    cancelled.start()
    cancelled.poll()
    cancelled.cancel()
    assert cancelled.status == jobs.CANCELLED and log[-1] == ("closed",)  # at once: it undoes its work
