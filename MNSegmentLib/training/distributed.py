"""Several processes (ranks) training one model or predicting many scans: torch.distributed.

A rank is one process with one device (``cuda:LOCAL_RANK``, or the CPU with gloo for testing). Ranks are started
either by ``mnsegment ... --gpus N`` on this machine (:func:`launch`, torch.multiprocessing) or by an external
``torchrun`` on several machines; both hand each rank the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``
variables that :func:`setup` reads, so the same entry point runs either way.

What is split and what rank 0 alone does is written down in README ("Several GPUs and machines"). In short:
rank 0 checks the input, preprocesses, refreshes pseudo-masks, validates, writes checkpoints, logs and emits
events; every rank draws its share of each step's global batch and the gradients are summed across ranks by one
all-reduce per optimiser step, which also carries the ranks' vote on running out of memory.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from MNSegmentLib.errors import InputError

log = logging.getLogger("mnsegment")

LAUNCHER_PID_VARIABLE = "MNSEGMENT_LAUNCHER_PID"
# Rank 0 may preprocess a large dataset while the others wait in a collective: the control group's deadline
# must outlast that. A rank that dies is noticed at once anyway (its sockets close).
CONTROL_TIMEOUT = timedelta(hours=12)
EXIT_GRACE_S = 30.0  # once a rank has failed, how long the others get to end before they are killed
FORWARD_EVERY_S = 5.0  # a stop request is passed on again: a rank still starting up ignores it


class PeerExit(Exception):
    """Another rank (rank 0) failed and reported it; this rank ends quietly with the same exit code."""

    def __init__(self, code: int):
        super().__init__(f"rank 0 ended with exit code {code}")
        self.code = code


class PeerOutOfMemory(torch.cuda.OutOfMemoryError):
    """Another rank ran out of GPU memory in this optimiser step: every rank retries with half the micro-batch."""


@dataclass
class Ranks:
    """This process's place among the ranks; with ``world == 1`` every method is a no-op."""

    rank: int = 0
    world: int = 1
    local: int = 0
    control: object = None  # gloo process group for flags, objects and barriers (CPU tensors)
    _awaited: bool = field(default=False, repr=False)  # rank 0 owes the others the outcome of its preparation

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` (GPUs chosen with CUDA_VISIBLE_DEVICES) or the CPU."""
        if self.world == 1 or device.type != "cuda":
            return device
        if device.index not in (None, 0):
            raise InputError(f"--device {device}: with several ranks each uses cuda:LOCAL_RANK; pick the GPUs "
                             "with CUDA_VISIBLE_DEVICES and use --device cuda")
        count = torch.cuda.device_count()
        if self.local >= count:
            raise InputError(f"rank {self.rank} needs cuda:{self.local} but only {count} GPU(s) are visible; "
                             "use fewer --gpus / --nproc-per-node")
        torch.cuda.set_device(self.local)
        return torch.device("cuda", self.local)

    # -- control collectives (CPU, gloo) ----------------------------------------------------------------------
    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a stop request, say)."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, 0, group=self.control)
        return box[0]

    def gather(self, value: object) -> list[object]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values: list[object] = [None] * self.world
        dist.all_gather_object(values, value, group=self.control)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.control)

    # -- rank 0 prepares, the others wait -----------------------------------------------------------------
    def main_prepares(self) -> None:
        """Called by rank 0 before it checks and preprocesses alone: it must then :meth:`announce` the outcome."""
        self._awaited = self.world > 1 and self.is_main

    def announce(self, exit_code: int) -> None:
        """Rank 0: tells the waiting ranks its preparation ended (0: go on; else: end with that code)."""
        if self._awaited:
            self._awaited = False
            self.broadcast(exit_code)

    def wait_for_main(self) -> None:
        """The other ranks: wait until rank 0 has prepared; raises :class:`PeerExit` if that failed."""
        code = self.broadcast(None)
        if code:
            raise PeerExit(code)

    # -- gradients ----------------------------------------------------------------------------------------
    def sum_gradients(self, parameters: list[torch.nn.Parameter], loss: torch.Tensor,
                      failed: bool) -> tuple[torch.Tensor, bool]:
        """Sums the gradients of ``parameters`` and ``loss`` (a tensor of step statistics) over the ranks and
        learns whether any rank ``failed`` (ran out of memory), all in one all-reduce.

        Written out instead of letting DistributedDataParallel reduce inside backward: a rank that runs out of
        memory mid-backward would leave the others waiting in DDP's reduction, so no collective decision to retry
        could be taken (fairseq's legacy DDP does the same for the same reason). On GPUs this forgoes DDP's
        overlap of communication with the backward pass, which matters little next to 3D patches' compute.
        """
        if self.world == 1:
            return loss, failed
        device = loss.device
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [loss.reshape(-1).float(), torch.tensor([float(failed)], device=device)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(parameters, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n
        return flat[-1 - loss.numel():-1].view_as(loss), bool(flat[-1].item())

    def same_parameters(self, *modules: torch.nn.Module) -> None:
        """Every rank starts from rank 0's tensors (parameters and buffers)."""
        if self.world == 1:
            return
        for module in modules:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, 0)

    def check_batch(self, batch_size: int) -> None:
        """Every rank needs at least one patch of each step."""
        if batch_size < self.world:
            raise InputError(f"sampling.batch_size={batch_size} is smaller than the {self.world} ranks; the global "
                             f"batch is split across ranks: use --set sampling.batch_size={self.world} or more, "
                             "or fewer --gpus")

    def shard(self, total: int) -> np.ndarray:
        """Which of a step's ``total`` patches this rank draws: a contiguous share, sizes differing by at most one."""
        return np.array_split(np.arange(total), self.world)[self.rank]


_current = Ranks()


def current() -> Ranks:
    return _current


def in_launched_rank() -> bool:
    """True inside a rank started by :func:`launch` or torchrun (the process group is set up from env vars)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> Ranks:
    """Joins the process group described by torchrun's environment variables (a no-op for one rank).

    The default group reduces gradients: NCCL when CUDA is there, gloo otherwise. A second, gloo, group carries
    the small control messages on CPU tensors whatever the device (as detectron2 does)."""
    global _current
    if not in_launched_rank() or dist.is_initialized():
        return _current
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
    if use_nccl:
        torch.cuda.set_device(local % max(torch.cuda.device_count(), 1))
    dist.init_process_group("nccl" if use_nccl else "gloo")
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _current = Ranks(rank, world, local, control)
    return _current


def teardown() -> None:
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = Ranks()


def watch_launcher(stop: threading.Event) -> None:
    """In a rank started by :func:`launch`: a launcher that vanished (killed) is a stop request, so the ranks
    save a checkpoint and end instead of living on as orphans."""
    pid = os.environ.get(LAUNCHER_PID_VARIABLE)
    if not pid:
        return

    def watch() -> None:
        while not stop.wait(0.5):
            if os.getppid() != int(pid):
                log.warning("the launcher is gone: saving a checkpoint and stopping")
                stop.set()

    threading.Thread(target=watch, name="mnsegment-launcher-watch", daemon=True).start()


# -- launching ranks on this machine ----------------------------------------------------------------------------
def gpu_count(requested: str, device: str | None) -> int:
    """``--gpus`` (a number or ``all``) checked against this machine; CPU ranks (gloo) only with ``--device cpu``."""
    on_cpu = device == "cpu"
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "all":
        if on_cpu or not visible:
            raise InputError("--gpus all: no CUDA GPU is usable here; give a number of ranks with --device cpu "
                             "to run CPU (gloo) ranks")
        return visible
    try:
        count = int(requested)
    except ValueError:
        raise InputError(f"--gpus {requested}: use a number of GPUs or 'all'") from None
    if count < 1:
        raise InputError(f"--gpus {requested}: use 1 or more")
    if count > 1 and not on_cpu and visible < count:
        raise InputError(f"--gpus {count}: only {visible} CUDA GPU(s) usable here; use --gpus {max(visible, 1)}, "
                         "or --device cpu to run CPU (gloo) ranks for testing")
    return count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(local_rank: int, argv: list[str], world: int, port: int, launcher: int) -> None:
    """A rank started by :func:`launch`: torchrun's environment, then the ordinary command line."""
    for name in ("SIGTERM", "SIGINT"):  # a stop request during start-up must not kill the rank: main() handles it
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       LAUNCHER_PID_VARIABLE: str(launcher)})
    from MNSegmentLib.cli import main

    sys.exit(main(argv))


def launch(argv: list[str], nprocs: int, stop: threading.Event, on_failure) -> int:
    """Runs ``mnsegment argv`` as ``nprocs`` ranks on this machine and returns the command's exit code.

    A stop request (``stop``) is passed on to every rank as SIGTERM, again every few seconds until they end (the
    ranks also watch the stop file themselves). Rank 0 reports its own outcome; ``on_failure(message)`` is
    called only when it could not (it was killed, or another rank failed while rank 0 finished)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_rank_entry, args=(argv, nprocs, _free_port(), os.getpid()), nprocs=nprocs,
                                 join=False, start_method="spawn")
    processes = context.processes
    forwarded, deadline = -FORWARD_EVERY_S, None
    while any(p.exitcode is None for p in processes):
        wait([p.sentinel for p in processes if p.exitcode is None], timeout=0.5)
        # (Windows' SIGTERM would kill at once: there the ranks see the stop file only.)
        if stop.is_set() and time.monotonic() - forwarded > FORWARD_EVERY_S and os.name == "posix":
            forwarded = time.monotonic()
            for p in processes:
                if p.exitcode is None:
                    os.kill(p.pid, signal.SIGTERM)
        failed = [p for p in processes if p.exitcode not in (None, 0)]
        if failed and deadline is None:
            deadline = time.monotonic() + EXIT_GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            for p in processes:
                if p.exitcode is None:
                    log.warning("rank %d did not end after another failed: killing it", processes.index(p))
                    p.kill()
            deadline = float("inf")
    codes = [p.exitcode for p in processes]
    if codes[0] in (1, 2, 3) or all(c == 0 for c in codes):
        return codes[0]
    bad = next(i for i, c in enumerate(codes) if c != 0)
    how = f"was killed by signal {-codes[bad]}" if codes[bad] < 0 else f"ended with exit code {codes[bad]}"
    on_failure(f"rank {bad} {how}; see the log above")
    return 1


def run_config_device(run_dir: Path) -> str | None:
    """The device a run folder was trained with (``resume`` without ``--device``), if readable."""
    import json

    try:
        return json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8")).get("device")
    except (OSError, ValueError):
        return None
