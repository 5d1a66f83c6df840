"""Background engine jobs: launch ``mnsegment`` in a child process, read its events, cancel it.

Qt-free and MRML-free. A :class:`EngineJob` runs one or more *phases* (e.g. ``export``, ``train``, ``predict``):
a command line of the engine, or a Python function run on a worker thread (writing the exported files). Two
reader threads per process (stdout, stderr) put lines on a queue; nothing else happens on those threads.
:meth:`EngineJob.poll` drains the queue and calls the callbacks, so callbacks run on the thread that calls
``poll()`` (the GUI thread via a QTimer in Slicer, or :meth:`EngineJob.wait`). Nothing here blocks that thread:
:meth:`EngineJob.cancel` only asks, the job reports ``cancelling`` and later polls finish it.

Stopping the worker politely: the job creates the file named by ``MNSEGMENT_STOP_FILE`` in the worker's
environment (works everywhere, also behind ``PythonSlicer`` and without a console), and also sends SIGTERM
(POSIX) or CTRL_BREAK_EVENT (Windows; reaches the worker only when this process shares its console).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

# Exit codes of the engine's command line.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3

# Job states.
PENDING = "pending"
RUNNING = "running"
CANCELLING = "cancelling"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"

LOG_LINES_KEPT = 200
CANCEL_GRACE_S = 10.0
KILL_WAIT_S = 5.0  # after killing, how long to wait for the pipes to close before calling the job cancelled
STOP_FILE_VARIABLE = "MNSEGMENT_STOP_FILE"  # MNSegmentLib.cli.STOP_FILE_VARIABLE (not imported: no torch here)

_ENGINE_PACKAGE = "MNSegmentLib"
_WINDOWS = sys.platform.startswith("win")


class EngineError(RuntimeError):
    """The engine failed; ``str(error)`` is the message meant for the user (no traceback)."""

    def __init__(self, message: str, job: EngineJob | None = None):
        super().__init__(message)
        self.job = job


# --------------------------------------------------------------------------------------------------
# Finding the engine and the Python that runs it
# --------------------------------------------------------------------------------------------------
def engine_search_path() -> Path | None:
    """Folder that contains the ``MNSegmentLib`` package, to put on the worker's PYTHONPATH.

    Uses the package this process would import (without importing it: importing would pull torch into Slicer),
    else looks next to this package (installed extension: both packages are siblings in ``qt-scripted-modules``)
    and at the source-tree root (``<repo>/MNSegment/MNSegmentSlicerLib`` → ``<repo>/MNSegmentLib``).
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec(_ENGINE_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent.parent
    here = Path(__file__).resolve().parent
    for candidate in (here.parent, here.parent.parent):
        if (candidate / _ENGINE_PACKAGE / "__init__.py").is_file():
            return candidate
    return None


def python_executable() -> list[str]:
    """Command prefix that starts a Python able to run the engine.

    Inside Slicer this is ``PythonSlicer`` (a launcher that sets up Slicer's Python environment); outside,
    the current interpreter.
    """
    try:
        import slicer

        app = getattr(slicer, "app", None)
    except ImportError:
        app = None
    if app is not None:
        import shutil

        names = ["PythonSlicer.exe", "PythonSlicer"] if _WINDOWS else ["PythonSlicer"]
        home = Path(str(app.slicerHome))
        for folder in (home / "bin", home):
            for name in names:
                if (folder / name).is_file():
                    return [str(folder / name)]
        found = shutil.which("PythonSlicer")
        if found:
            return [found]
        raise EngineError("PythonSlicer was not found next to the Slicer executable.")
    return [sys.executable]


def engine_command(*args: str, python: list[str] | None = None) -> list[str]:
    """Full command line running ``mnsegment <args>`` with ``python`` (default: :func:`python_executable`)."""
    return [*(python or python_executable()), "-m", f"{_ENGINE_PACKAGE}.cli", *[str(a) for a in args]]


def worker_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the worker: engine on PYTHONPATH, unbuffered UTF-8 output."""
    env = dict(os.environ)
    path = engine_search_path()
    if path is not None:
        parts = [str(path)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUTF8"] = "1"
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------------------------------
# Process-tree helpers
# --------------------------------------------------------------------------------------------------
def _tree(pid: int) -> list:
    """psutil processes of ``pid`` and all its descendants (descendants first)."""
    import psutil

    try:
        root = psutil.Process(pid)
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [*list(reversed(children)), root]


def kill_tree(pid: int, extra: list | None = None, wait_s: float = 5.0) -> None:
    """Kill ``pid`` and every descendant, children first; ``extra`` are processes seen earlier."""
    import psutil

    procs = {p.pid: p for p in (extra or [])}
    for p in _tree(pid):
        procs[p.pid] = p
    for p in procs.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
        except psutil.AccessDenied:
            pass
    psutil.wait_procs(list(procs.values()), timeout=wait_s)


# --------------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------------
_RUNNING_JOBS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _cancel_running_jobs() -> None:  # pragma: no cover - runs at interpreter exit
    for job in list(_RUNNING_JOBS):
        with contextlib.suppress(Exception):
            job.cancel(grace_s=5.0, wait=True)


class Phase:
    """One step of a job: an engine invocation (``args``), ``run(stop)`` called on a worker thread (``stop``
    is a :class:`threading.Event` set on cancel), or ``steps()``: an iterator advanced once per :meth:`EngineJob.poll`
    on the calling (GUI) thread, for work that must touch the scene, cut into pieces short enough that the GUI
    never waits long; closed on cancel. An exception fails the job with its message."""

    def __init__(self, name: str, args: list[str] | None = None, before: Callable[[], list[str] | None] | None = None,
                 env: dict[str, str] | None = None, run: Callable[[threading.Event], None] | None = None,
                 steps: Callable[[], Iterator] | None = None):
        self.name = name
        self.args = list(args or [])
        self.run = run
        self.steps = steps
        #: extra environment variables for this phase only
        self.env = dict(env or {})
        #: called right before the phase starts; may return replacement arguments (e.g. the images to predict)
        self.before = before
        self.returncode: int | None = None


class EngineJob:
    """A running or finished engine job.

    Attributes: ``status`` (pending/running/cancelling/done/failed/cancelled), ``phase`` (name of the current phase),
    ``last_progress`` (last ``progress`` event), ``events`` (all events), ``log`` (last stderr lines),
    ``error`` (message for the user when failed), ``returncode``, ``folder`` and ``result`` (whatever the
    ``on_finished`` handler of the logic stored, e.g. segmentation nodes).

    Callbacks (all called from :meth:`poll`, never from a reader thread): ``on_event(job, event)``,
    ``on_progress(job, event)``, ``on_log(job, line)``, ``on_phase(job, name)``, ``on_finished(job)``.
    """

    def __init__(
        self,
        phases: list[Phase],
        folder: Path | str | None = None,
        env: dict[str, str] | None = None,
        on_event=None,
        on_progress=None,
        on_log=None,
        on_phase=None,
        on_finished=None,
        command_prefix: list[str] | None = None,
        python: list[str] | None = None,
    ):
        self.phases = list(phases)
        self.folder = Path(folder) if folder is not None else None
        self.env = env
        #: replaces ``python -m MNSegmentLib.cli`` (tests: a stand-in worker)
        self.command_prefix = command_prefix
        #: the Python that runs the engine (default: ``PythonSlicer`` inside Slicer, else this interpreter)
        self.python = python
        #: also send SIGTERM / CTRL_BREAK_EVENT on cancel (the stop file is always created)
        self.signal_stop = True
        self.status = PENDING
        self.phase: str | None = None
        self.last_progress: dict | None = None
        self.events: list[dict] = []
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self.error: str | None = None
        self.returncode: int | None = None
        self.result = None
        self.model_dir: str | None = None
        self.on_event = on_event
        self.on_progress = on_progress
        self.on_log = on_log
        self.on_phase = on_phase
        self._finished_handlers: list[Callable] = []
        if on_finished is not None:
            self._finished_handlers.append(on_finished)
        self._queue: queue.Queue = queue.Queue()
        self._proc: subprocess.Popen | None = None
        self._open_streams = 0
        self._phase_index = -1
        self._error_event: str | None = None
        self._cancel_requested = False
        self._stop = threading.Event()  # set on cancel; seen by thread phases
        self._stop_file = Path(tempfile.gettempdir()) / f"mnsegment-stop-{os.getpid()}-{uuid.uuid4().hex}"
        self._cancel_deadline = 0.0
        self._cancel_seen: list = []
        self._killed = False
        self._thread_phase = False
        self._steps: Iterator | None = None  # the running main-thread phase's iterator (Phase.steps)
        self._launcher = False

    # ----------------------------------------------------------------------------------- life cycle
    @property
    def running(self) -> bool:
        """Not ended yet (also while cancelling)."""
        return self.status in (PENDING, RUNNING, CANCELLING)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def add_finished_handler(self, handler: Callable) -> None:
        """Handlers run in order, from :meth:`poll`, once the job has ended (any status)."""
        self._finished_handlers.append(handler)

    def start(self) -> EngineJob:
        if self.status != PENDING:
            raise RuntimeError("job already started")
        self.status = RUNNING
        _RUNNING_JOBS.add(self)
        self._start_next_phase()
        return self

    def _start_next_phase(self) -> None:
        self._phase_index += 1
        if self._phase_index >= len(self.phases):
            self._finish(DONE)
            return
        phase = self.phases[self._phase_index]
        if phase.steps is not None:
            self.phase = phase.name
            self._call(self.on_phase, phase.name)
            try:
                self._steps = iter(phase.steps())
            except Exception as error:
                self.error = str(error) or type(error).__name__
                self._finish(FAILED)
            return
        if phase.run is not None:
            self.phase = phase.name
            self._thread_phase = True
            threading.Thread(target=self._run_thread_phase, args=(phase,), daemon=True).start()
            self._queue.put(("phase", phase.name, None))
            return
        if phase.before is not None:
            try:
                replaced = phase.before()
            except EngineError as error:
                self.error = str(error)
                self._finish(FAILED)
                return
            if replaced is None:  # nothing to do in this phase
                self._start_next_phase()
                return
            phase.args = replaced
        self.phase = phase.name
        self._error_event = None
        prefix = self.command_prefix
        try:
            if prefix is not None:
                command = [*prefix, *phase.args]
            else:
                command = engine_command(*phase.args, python=self.python)
            self._launcher = Path(command[0]).name.lower().startswith("pythonslicer")
            env = dict(self.env) if self.env is not None else worker_environment()
            env.update(phase.env)
            env[STOP_FILE_VARIABLE] = str(self._stop_file)
            kwargs: dict = {}
            if _WINDOWS:
                # Its own process group (Ctrl+Break goes to it alone) and no console window, like
                # slicer.util.launchConsoleProcess.
                kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
            else:
                kwargs["start_new_session"] = True
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                env=env,
                cwd=str(self.folder) if self.folder is not None and self.folder.is_dir() else None,
                **kwargs,
            )
        except (OSError, EngineError) as error:
            self.error = f"Could not start the engine: {error}"
            self._finish(FAILED)
            return
        self._open_streams = 2
        for stream, kind in ((self._proc.stdout, "out"), (self._proc.stderr, "err")):
            threading.Thread(target=self._reader, args=(stream, kind, self._proc), daemon=True).start()
        self._queue.put(("phase", phase.name, self._proc))

    def _run_thread_phase(self, phase: Phase) -> None:
        """Worker thread of a Python phase: only runs it and reports the outcome on the queue."""
        try:
            phase.run(self._stop)
        except Exception as error:
            self._queue.put(("ran", str(error) or type(error).__name__, phase))
        else:
            self._queue.put(("ran", None, phase))

    def _reader(self, stream, kind: str, proc) -> None:
        """Reader thread: only puts raw lines on the queue."""
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((kind, line.rstrip("\r\n"), proc))
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put(("eof", kind, proc))

    # -------------------------------------------------------------------------------------- polling
    def poll(self) -> str:
        """Process what the worker printed so far, call callbacks, advance phases. Returns the status."""
        while True:
            try:
                kind, payload, proc = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "phase":
                self._call(self.on_phase, payload)
            elif kind == "out":
                self._handle_stdout(payload)
            elif kind == "err":
                self._handle_log(payload)
            elif kind == "eof" and proc is self._proc:
                self._open_streams -= 1
            elif kind == "ran":
                self._thread_phase_ended(payload)
        if self.status in (RUNNING, CANCELLING) and self._proc is not None and self._open_streams <= 0:
            returncode = self._proc.poll()  # the pipes are closed: the process is ending
            if returncode is not None:
                self._phase_ended(returncode)
        if self.status == RUNNING and self._steps is not None:
            self._advance_steps()
        if self.status == CANCELLING:
            self._escalate_cancel()
        return self.status

    def _advance_steps(self) -> None:
        """One piece of the main-thread phase; the next phase when it is through."""
        try:
            next(self._steps)
        except StopIteration:
            self._steps = None
            self._start_next_phase()
        except Exception as error:
            self._steps = None
            self.error = str(error) or type(error).__name__
            self._finish(FAILED)

    def _thread_phase_ended(self, error: str | None) -> None:
        self._thread_phase = False
        if self.status not in (RUNNING, CANCELLING):
            return
        if self._cancel_requested:
            self._finish(CANCELLED)
        elif error is not None:
            self.error = error
            self._finish(FAILED)
        else:
            self._start_next_phase()

    def _handle_stdout(self, line: str) -> None:
        text = line.strip()
        if not text:
            return
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if not isinstance(event, dict) or "event" not in event:
            self._handle_log(line)
            return
        event.setdefault("phase", self.phase)
        self.events.append(event)
        name = event.get("event")
        if name == "progress":
            self.last_progress = event
            self._call(self.on_progress, event)
        elif name == "error":
            self._error_event = str(event.get("message", "")).strip() or None
        elif name == "done" and event.get("model_dir"):
            self.model_dir = str(event["model_dir"])
        self._call(self.on_event, event)

    def _handle_log(self, line: str) -> None:
        self.log.append(line)
        self._call(self.on_log, line)

    def _call(self, callback, *args) -> None:
        if callback is not None:
            callback(self, *args)

    def _phase_ended(self, returncode: int) -> None:
        phase = self.phases[self._phase_index]
        phase.returncode = returncode
        self.returncode = returncode
        self._proc = None
        if self._cancel_requested or returncode == EXIT_CANCELLED:
            for process in self._cancel_seen:  # e.g. a worker its launcher left behind
                with contextlib.suppress(Exception):
                    process.kill()
            # A killed process reads as 0 too (psutil reaped it before Popen could), so only a worker that
            # exited by itself counts: the stop came after its work was done (e.g. while the engine ranked the
            # unlabeled volumes after training), and calling the job cancelled would hide a complete model.
            if returncode == EXIT_OK and not self._killed and self._phase_index == len(self.phases) - 1:
                self._handle_log("The engine finished before the stop took effect; its result is kept.")
                self._finish(DONE)
            else:
                self._finish(CANCELLED)
            return
        if returncode == EXIT_OK:
            self._start_next_phase()
            return
        self.error = self._error_message(returncode)
        self._finish(FAILED)

    def _error_message(self, returncode: int) -> str:
        if self._error_event:
            return self._error_event
        lines = [line.strip() for line in self.log if line.strip()]
        if returncode == EXIT_BAD_INPUT and lines:
            return lines[-1]
        # Anything else: the last line is the exception's "Type: message" when Python died on one.
        last = lines[-1] if lines else ""
        where = f" (engine {self.phase} exited with code {returncode})"
        return (last + where) if last else f"The engine {self.phase} step failed{where}."

    def _finish(self, status: str) -> None:
        self.status = status
        _RUNNING_JOBS.discard(self)
        with contextlib.suppress(OSError):
            self._stop_file.unlink(missing_ok=True)
        for handler in list(self._finished_handlers):
            try:
                handler(self)
            except Exception as error:  # e.g. loading the results failed: the job failed, with that message
                if self.status == DONE:
                    self.status = FAILED
                    self.error = str(error) or type(error).__name__

    # ------------------------------------------------------------------------------------- blocking
    def wait(self, timeout: float | None = None, interval: float = 0.1) -> str:
        """Block (polling) until the job ends or ``timeout`` seconds pass; returns the status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() in (PENDING, RUNNING, CANCELLING):
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(interval)
        return self.status

    def raise_for_status(self) -> EngineJob:
        if self.status == FAILED:
            raise EngineError(self.error or "The engine failed.", self)
        if self.status == CANCELLED:
            raise EngineError("The job was cancelled.", self)
        return self

    # --------------------------------------------------------------------------------------- cancel
    def cancel(self, grace_s: float = CANCEL_GRACE_S, wait: bool = False) -> None:
        """Ask the job to stop and return at once: the status becomes ``cancelling``, then ``cancelled`` from a
        later :meth:`poll` once the worker has saved its checkpoint and exited. A worker still there after
        ``grace_s`` seconds is killed with its whole process tree. ``wait=True`` polls until the job ended."""
        if self.status == PENDING:
            self._cancel_requested = True
            self._finish(CANCELLED)
            return
        if self.status == RUNNING and self._steps is not None:  # nothing runs outside this thread: stop now
            self._cancel_requested = True
            steps, self._steps = self._steps, None
            with contextlib.suppress(Exception):
                getattr(steps, "close", lambda: None)()  # a generator undoes its work on close
            self._finish(CANCELLED)
            return
        if self.status == RUNNING:
            self._cancel_requested = True
            self._stop.set()
            self.status = CANCELLING
            self._cancel_deadline = time.monotonic() + grace_s
            proc = self._proc
            if proc is not None and proc.poll() is None:
                self._cancel_seen = _tree(proc.pid)
                self._terminate(proc)
        if wait:
            self.wait()

    def _escalate_cancel(self) -> None:
        """Called by :meth:`poll` while cancelling: kill what is left once the grace period is over."""
        if time.monotonic() < self._cancel_deadline:
            return
        if not self._killed:
            self._killed = True
            self._cancel_deadline = time.monotonic() + KILL_WAIT_S
            if self._proc is not None:
                kill_tree(self._proc.pid, self._cancel_seen, wait_s=0.5)
        elif not self._thread_phase:  # killed, yet the pipes never closed (a stray process holds them)
            self._proc = None
            self._finish(CANCELLED)

    def _terminate(self, proc: subprocess.Popen) -> list:
        """Send the polite stop request: the stop file, and a signal to the worker (the process itself, or
        behind a launcher (``PythonSlicer``) the Python it started, so the launcher exits with the worker's exit
        code). Returns the psutil processes of those launched workers (not our own child)."""
        import psutil

        with contextlib.suppress(OSError):
            self._stop_file.touch()
        if not self.signal_stop:
            return []
        workers = []
        if self._launcher:
            with contextlib.suppress(psutil.NoSuchProcess):
                workers = psutil.Process(proc.pid).children()
        targets = [c.pid for c in workers] or [proc.pid]
        for pid in targets:
            try:
                if _WINDOWS:
                    proc.send_signal(signal.CTRL_BREAK_EVENT)  # reaches the whole process group
                    break
                else:
                    os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                pass
        return workers
