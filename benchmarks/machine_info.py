"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import os
import platform
import subprocess


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                                  if ln.startswith("Model name")), None)
    except (OSError, subprocess.SubprocessError):
        info["cpu_model"] = None
    try:
        import psutil
        import torch

        info["torch"] = torch.__version__
        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_avg_at_start"] = os.getloadavg()
    except ImportError:
        pass
    return info
