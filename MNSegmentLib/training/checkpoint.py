"""Atomic checkpoints: a crash, a kill -9 or a full disk at any moment leaves either the old file or the new one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from MNSegmentLib.data.io import write_failed


def save_atomic(state: dict[str, Any], path: Path) -> Path:
    """Writes a temporary file beside ``path``, flushes it to disk, then renames it over ``path`` (atomic on
    POSIX and Windows) and flushes the folder so the rename itself survives a power cut. On any failure the
    temporary file is removed and ``path`` is untouched; a failed write (full disk) is an InputError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f)
            try:
                torch.save(state, writer)
                f.flush()
                os.fsync(f.fileno())
            except (OSError, RuntimeError) as err:
                raise write_failed(path, writer.error or err) from None
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


class _Writer:
    """The file torch.save writes to, remembering why a write failed: torch's zip writer swallows the OSError
    (a full disk) and raises a RuntimeError that only says "unexpected pos"."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder; its rename is already durable (MoveFileEx)
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial(path: Path) -> None:
    """Deletes temporary files that a process killed during :func:`save_atomic` left beside ``path``."""
    for leftover in path.parent.glob(f".{path.name}.*.part"):
        leftover.unlink(missing_ok=True)


def load(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=device, weights_only=True)
