"""analysis/verdict.py: the double-win rule and its support under seed resampling, on hand-made numbers."""

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import verdict

REPO = Path(__file__).resolve().parents[1]
DENSE = [90.0, 92.0, 94.0]  # mean 92, sample std 2: matching from 90 on


def _brute_force(ticket, dense):
    """Support by listing every one of the n**n * m**m resamples (each equally likely)."""
    n, m = len(ticket), len(dense)
    hits = total = 0
    for ti in itertools.product(range(n), repeat=n):
        for di in itertools.product(range(m), repeat=m):
            total += 1
            hits += verdict.is_matching([ticket[i] for i in ti], [dense[i] for i in di])
    return hits / total


def test_mean_std_is_the_sample_std():
    assert verdict.mean_std(DENSE) == (92.0, 2.0)
    assert verdict.mean_std([77.5]) == (77.5, 0.0)
    assert all(math.isnan(v) for v in verdict.mean_std([]))


def test_matching_rule_and_its_edge():
    assert verdict.is_matching([89.0, 90.0, 91.0], DENSE)  # mean 90 = 92 − 2 exactly
    assert not verdict.is_matching([88.99, 89.99, 90.99], DENSE)
    assert not verdict.matching(math.nan, 92.0, 2.0)
    assert verdict.double_win(True, True, True) and not verdict.double_win(True, False, True)


def test_clear_win_has_support_one_and_clear_loss_zero():
    assert verdict.matching_support([99.0, 99.5, 100.0], DENSE) == 1.0
    assert verdict.matching_support([50.0, 51.0, 52.0], DENSE) == 0.0
    win_at = [(95.0, 60.0), (96.0, 61.0), (97.0, 62.0)]
    dense_at = [(80.0, 48.0), (82.0, 50.0), (84.0, 52.0)]
    assert verdict.level_support([99.0, 99.0, 99.0], DENSE, win_at, dense_at) == 1.0
    # RA alone fails: the level's double-win support is 0 even though SA wins everywhere
    lose_ra = [(95.0, 10.0), (96.0, 11.0), (97.0, 12.0)]
    assert verdict.level_support([99.0, 99.0, 99.0], DENSE, lose_ra, dense_at) == 0.0


def test_identical_samples_give_the_rules_answer():
    # no spread: every resample is the original sample, so support is the rule's answer itself
    assert verdict.is_matching([90.0] * 3, [90.0] * 3)
    assert verdict.matching_support([90.0] * 3, [90.0] * 3) == 1.0
    assert not verdict.is_matching([89.99] * 3, [90.0] * 3)
    assert verdict.matching_support([89.99] * 3, [90.0] * 3) == 0.0
    # one seed each: one resample, the rule's answer
    assert verdict.matching_support([91.9], [92.0]) == 0.0
    assert verdict.matching_support([92.0], [92.0]) == 1.0
    # the same spread sample on both sides: matching as a whole, but not under every resample
    p = verdict.matching_support(DENSE, DENSE)
    assert verdict.is_matching(DENSE, DENSE) and 0.5 < p < 1.0
    assert p == pytest.approx(_brute_force(DENSE, DENSE), abs=1e-12)


def test_exact_enumeration_equals_listing_every_resample():
    cases = [([90.5, 91.5, 92.5], DENSE), ([89.0, 93.0], [90.0, 91.0, 95.0]), ([91.0, 88.0, 95.0], [92.0, 92.5])]
    for ticket, dense in cases:
        assert verdict.matching_support(ticket, dense) == pytest.approx(_brute_force(ticket, dense), abs=1e-12)


def test_exact_enumeration_agrees_with_a_large_draw_estimate():
    ticket = [90.5, 91.5, 92.5, 89.0]
    exact = verdict.matching_support(ticket, DENSE)
    drawn = verdict.matching_support(ticket, DENSE, exact_limit=0, draws=100_000, seed=3)
    assert 0.2 < exact < 0.9
    assert drawn == pytest.approx(exact, abs=0.01)
    # seeded: the same draws give the same estimate
    assert drawn == verdict.matching_support(ticket, DENSE, exact_limit=0, draws=100_000, seed=3)


def test_level_support_resamples_runs_jointly():
    """SA and RA of one AT run stay together; ST and AT runs are resampled independently."""
    st_t, st_d = [91.0, 93.0], [90.0, 94.0]
    at_t = [(82.0, 47.0), (80.0, 51.0)]   # the run with the better SA has the worse RA
    at_d = [(80.0, 48.0), (84.0, 52.0)]
    hits = total = 0
    for a, b, c, d in itertools.product(itertools.product(range(2), repeat=2), repeat=4):
        total += 1
        st_ok = verdict.is_matching([st_t[i] for i in a], [st_d[i] for i in b])
        at_ok = all(verdict.is_matching([at_t[i][k] for i in c], [at_d[i][k] for i in d]) for k in (0, 1))
        hits += st_ok and at_ok
    joint = verdict.level_support(st_t, st_d, at_t, at_d)
    assert joint == pytest.approx(hits / total, abs=1e-12)
    # resampling SA and RA separately would overstate it here
    separate = (verdict.matching_support(st_t, st_d) * verdict.matching_support([r[0] for r in at_t], [r[0] for r in at_d])
                * verdict.matching_support([r[1] for r in at_t], [r[1] for r in at_d]))
    assert joint != pytest.approx(separate)


def test_extremes_on_a_gap():
    wins = {20.0: True, 36.0: True, 48.8: False, 59.04: True, 67.23: False}
    assert verdict.extreme_sparsity(wins) == 59.04       # the paper's reading: the largest win
    assert verdict.contiguous_extreme(wins) == 36.0      # every level at or below it wins
    assert verdict.contiguous_extreme({20.0: False, 36.0: True}) is None
    assert verdict.extreme_sparsity({20.0: False}) is None
    assert verdict.supported_extreme({20.0: 1.0, 36.0: 0.95, 48.8: 0.5, 59.04: 0.9}) == 59.04
    assert verdict.supported_extreme({20.0: 0.89}) is None


def test_support_labels():
    assert [verdict.support_label(p) for p in (1.0, 0.9, 0.5, 0.1, 0.0, None)] == [
        "supported", "supported", "uncertain", "contradicted", "contradicted", ""]


def test_module_is_pure():
    code = ("import sys, analysis.verdict; "
            "bad = [m for m in ('matplotlib', 'torch', 'csv', 'utils.checkpoint') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
