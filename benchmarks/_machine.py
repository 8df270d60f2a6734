"""The machine a benchmark ran on, without torch (bench_grid_scale.py times processes that must not load it)."""

import platform
from pathlib import Path


def cpu_model():
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model
