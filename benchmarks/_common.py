"""Plumbing the benchmark scripts share: device choice, device naming, timing, the JSON record."""

import datetime
import statistics
import time

import torch

from benchmarks._machine import cpu_model
from utils.cli import positive_int  # noqa: F401  (the benchmarks' argument type)
from utils.distributed import resolve_device  # noqa: F401  (the benchmarks' device choice)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()} ({torch.get_num_threads()} threads)"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(fn, device):
    """Images per second of ``fn()`` (which returns how many images it processed), GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    images = fn()
    synchronize(device)
    return images / (time.perf_counter() - start)


def summary(rates):
    return {"images_per_s": statistics.median(rates), "best_images_per_s": max(rates),
            "runs": [round(r, 3) for r in rates]}


def speedups(fast, slow):
    """Ratios of two sides timed in alternation: of the medians (the headline), of the best runs, and
    the median of the per-round ratios; the last two resist bursts of contention on shared machines."""
    return {"speedup": statistics.median(fast) / statistics.median(slow),
            "speedup_best": max(fast) / max(slow),
            "speedup_paired": statistics.median(f / s for f, s in zip(fast, slow))}


def stamp(device):
    """Keys every benchmark record carries."""
    return {"device": device_name(device), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__}


def steady_cpu_allocator():
    """Keep freed memory in the process (glibc only); returns whether the setting took.

    glibc hands large freed blocks back to the kernel, so every step faults its activation
    memory in again; on a virtual machine that reclaims free pages this made CPU step times
    swing by 10x from one block to the next, for both sides alike.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB is glibc's largest mmap threshold; a fixed value also stops its dynamic lowering
    ok = mallopt(m_mmap_threshold, 32 << 20) == 1
    return bool(mallopt(m_trim_threshold, 1 << 34) == 1 and ok)
