"""Machine-readable events on stdout (one JSON object per line) for the Slicer module and other callers."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from typing import Any, TextIO


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing value reads as null
    return value


class Events:
    """Writes events when enabled; otherwise does nothing (stdout stays free for the caller). ``listeners``
    (``listener(event, fields)``, e.g. the terminal's progress bar) see every event either way."""

    def __init__(self, enabled: bool, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def emit(self, event: str, **fields: Any) -> None:
        for listener in self.listeners:
            listener(event, fields)
        if not self.enabled:
            return
        record = {"event": event, **{k: _clean(v) for k, v in fields.items()}}
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()
