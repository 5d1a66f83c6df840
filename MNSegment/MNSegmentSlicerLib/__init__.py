"""Qt-free logic of the MNSegment Slicer module (runs with ``slicer-core`` alone)."""

from .job import EngineError, EngineJob
from .logic import MNSegmentLogic, gpu_info

__all__ = ["EngineError", "EngineJob", "MNSegmentLogic", "gpu_info"]
