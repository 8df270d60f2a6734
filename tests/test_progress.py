"""utils/progress.py: the time-left estimate of the progress lines."""

import math

import pytest

from utils import progress


def test_the_pace_so_far_is_carried_to_the_end():
    assert progress.eta_seconds(10, 40, 60.0) == pytest.approx(180.0)  # 6 s a run, 30 runs to go
    assert progress.eta_seconds(1, 3, 100) == pytest.approx(200.0)
    assert progress.eta_seconds(0, 5, 30.0) is None  # no pace before the first run ends
    assert progress.eta_seconds(5, 5, 30.0) == 0.0
    assert progress.eta_seconds(0, 0, 0.0) == 0.0  # nothing to do is done


@pytest.mark.parametrize("done, total, elapsed", [
    (6, 5, 1.0), (-1, 5, 1.0), (1, 5, -2.0), (1, 5, math.nan), (1, math.inf, 1.0), ("1", 5, 1.0),
])
def test_impossible_counts_are_refused(done, total, elapsed):
    with pytest.raises(ValueError):
        progress.eta_seconds(done, total, elapsed)


@pytest.mark.parametrize("seconds, text", [
    (0.2, "1 s"), (40.4, "40 s"), (59.4, "59 s"), (60, "1.0 min"), (204, "3.4 min"), (89 * 60, "89.0 min"),
    (2.1 * 3600, "2.1 h"),
])
def test_durations_read_at_a_glance(seconds, text):
    assert progress.format_duration(seconds) == text


def test_suffix_of_a_progress_line():
    # the sweep's line: "3/4 transfer runs: 120 of 580 runs finished (1.2 min, about 4.6 min left)"
    elapsed = 72.0
    line = f"120 of 580 runs finished ({elapsed / 60:.1f} min{progress.eta_suffix(120, 580, elapsed)})"
    assert line == "120 of 580 runs finished (1.2 min, about 4.6 min left)"
    assert progress.eta_suffix(0, 580, 5.0) == ""  # no estimate yet: the line stays as it was
    assert progress.eta_suffix(580, 580, 400.0) == ""
