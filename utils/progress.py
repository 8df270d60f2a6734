"""The time left, for the progress lines of long loops (the sweep's local backend, the demo).

The estimate is the pace so far carried to the end: ``elapsed / done * (total - done)``. It assumes
the items left take as long as the finished ones on average; a grid whose long runs come last is
underestimated at first, and the estimate tightens as runs finish. Before the first item there is
no pace, so no estimate is given rather than a made-up one.
"""

import math


def eta_seconds(done, total, elapsed):
    """Seconds left at the pace so far; None before the first item is done; 0 when all are."""
    for name, value in (("done", done), ("total", total), ("elapsed", elapsed)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite non-negative number, not {value!r}")
    if done > total:
        raise ValueError(f"done ({done}) exceeds total ({total})")
    if done >= total:
        return 0.0
    if done == 0:
        return None
    return elapsed / done * (total - done)


def format_duration(seconds):
    """'40 s', '3.4 min' or '2.1 h': the unit a reader takes in at a glance."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def eta_suffix(done, total, elapsed):
    """', about 3.4 min left' to append to a progress line, or '' (no estimate yet, or nothing left)."""
    left = eta_seconds(done, total, elapsed)
    if not left:
        return ""
    return f", about {format_duration(left)} left"
