"""One line describing this CPU machine, for the CPU benchmarks (numpy only, no torch)."""

from __future__ import annotations

import os
import platform

import numpy as np


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def machine() -> str:
    """CPU count and model, Python and numpy versions."""
    return f"{os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, numpy {np.__version__}"
