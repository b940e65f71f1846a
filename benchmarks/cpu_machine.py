"""One line describing this CPU machine, for the stats benchmarks (numpy only, no torch)."""

from __future__ import annotations

import os
import platform

import numpy as np


def machine() -> str:
    """CPU count and model, Python and numpy versions."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, numpy {np.__version__}"
