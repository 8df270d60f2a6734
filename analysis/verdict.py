"""The double-win verdict as pure functions: matching, double-win, extreme sparsity and support.

No I/O and no plotting, so ``analysis/plot_curves.py`` and ``script/sweep.py status`` judge a grid
with the same code.

Rule (docs/protocol.md §1, the paper's reading):

- a metric of a ticket is *matching* when its mean over seeds is ≥ the dense model's mean minus one
  dense std, the std being the sample standard deviation (ddof=1) for two or more seeds and 0 for
  one seed (:func:`mean_std`); equality is compared with a relative tolerance of 1e-9 so that a
  mean sitting exactly on the edge survives float rounding;
- a sparsity level is *double-win* when SA under ST and both SA and RA under AT are matching
  (same dataset and data rate, baselines of the same pretrain label and regime);
- the *extreme sparsity* is the largest double-win level (:func:`extreme_sparsity`); the
  *contiguous* extreme is the largest level such that every level at or below it is double-win
  (:func:`contiguous_extreme`).

*Support* (:func:`block_support`, :func:`level_support`) is the probability that the rule holds
when the seeds are resampled: the ticket runs and the dense runs are each drawn with replacement
(as many as there are), the same rule is applied to the draw, and the fraction of draws where it
holds is reported.  Runs, not numbers, are resampled: the SA and RA of one AT run stay together,
so the AT comparison of a level (SA and RA against the dense AT runs) is one block judged jointly
per draw.  The ST runs and the AT runs are resampled independently of each other, so a level's
double-win support is the product of its ST block's and its AT block's support — exactly the
fraction of joint draws (ST ticket, ST dense, AT ticket, AT dense runs all resampled each draw)
under which all three comparisons hold.  When the number of distinct resamples is small enough
(≤ ``exact_limit`` weighted combinations of ticket and dense resamples; 100 for 3 seeds each) every
resample is enumerated with its probability, so the support is exact; otherwise it is estimated
from ``draws`` seeded random draws.  A verdict is *supported* at support ≥ 0.9, *contradicted* at
≤ 0.1 and *uncertain* in between.
"""

import math
from functools import lru_cache
from itertools import combinations_with_replacement

import numpy as np

TOL = 1e-9
SUPPORTED = 0.9
CONTRADICTED = 0.1
DRAWS = 10_000
EXACT_LIMIT = 200_000


def mean_std(values):
    """(mean, std): sample std (ddof=1) for two or more values, 0 for one; NaNs for none."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def matching(mean, dense_mean, dense_std):
    """The rule on summary numbers: mean ≥ dense mean − dense std (False when any is NaN)."""
    if any(v is None or math.isnan(v) for v in (mean, dense_mean, dense_std)):
        return False
    return mean >= dense_mean - dense_std - TOL * max(1.0, abs(dense_mean))


def is_matching(ticket_values, dense_values):
    """The rule on the per-seed values of one metric."""
    mean, _ = mean_std(list(ticket_values))
    dmean, dstd = mean_std(list(dense_values))
    return matching(mean, dmean, dstd)


def double_win(st_sa, at_sa, at_ra):
    """A level is double-win when all three comparisons are matching."""
    return bool(st_sa and at_sa and at_ra)


def extreme_sparsity(wins):
    """The paper's reading: the largest double-win level, or None.  ``wins``: {level: bool}."""
    return max((s for s, w in wins.items() if w), default=None)


def contiguous_extreme(wins):
    """The largest level such that every level at or below it is double-win, or None.

    ``wins`` maps every level that should have been judged to True/False; a level that could not
    be judged (missing runs) must be given as False, so the contiguous run stops below it.
    """
    best = None
    for s in sorted(wins):
        if not wins[s]:
            break
        best = s
    return best


def supported_extreme(supports, threshold=SUPPORTED):
    """The largest level whose double-win support is ≥ ``threshold``, or None.  ``supports``: {level: p}."""
    return max((s for s, p in supports.items() if p is not None and p >= threshold), default=None)


def support_label(p):
    """'supported' (≥ 0.9), 'contradicted' (≤ 0.1), 'uncertain' in between, '' when unknown."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    if p >= SUPPORTED:
        return "supported"
    if p <= CONTRADICTED:
        return "contradicted"
    return "uncertain"


# --------------------------------------------------------------------------- resampling

def _as_rows(values):
    """Per-run rows of metrics as a float array (runs × metrics)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError("support needs at least one run with one metric on each side")
    return arr


@lru_cache(maxsize=16)
def _compositions(n):
    """(counts K×n, probabilities K): every multiset of n draws from n runs, with its probability.

    A resample's mean and std depend only on how often each run was drawn, so enumerating the
    multisets with their multinomial weights is the same as enumerating all n**n resamples.
    """
    counts, weights = [], []
    log_total = n * math.log(n)
    for combo in combinations_with_replacement(range(n), n):
        c = np.bincount(combo, minlength=n)
        counts.append(c)
        log_w = math.lgamma(n + 1) - sum(math.lgamma(k + 1) for k in c)
        weights.append(math.exp(log_w - log_total))
    counts, weights = np.asarray(counts, dtype=np.float64), np.asarray(weights)
    counts.flags.writeable = weights.flags.writeable = False  # shared by every caller through the cache
    return counts, weights


def _n_compositions(n):
    return math.comb(2 * n - 1, n)


def _resampled_stats(rows, counts):
    """Mean and sample std per metric of each resample (``counts``: resamples × runs)."""
    n = rows.shape[0]
    means = counts @ rows / n
    if n == 1:
        return means, np.zeros_like(means)
    # the squared deviations of each run from each resample's mean, weighted by its count
    dev = rows[None, :, :] - means[:, None, :]
    var = np.einsum("kr,krm->km", counts, dev * dev) / (n - 1)
    return means, np.sqrt(np.maximum(var, 0.0))


def _holds(t_means, d_means, d_stds):
    """Boolean (ticket resamples × dense resamples): every metric matching."""
    edge = d_means - d_stds - TOL * np.maximum(1.0, np.abs(d_means))
    return np.all(t_means[:, None, :] >= edge[None, :, :], axis=2)


def block_support(ticket_rows, dense_rows, *, draws=DRAWS, seed=0, exact_limit=EXACT_LIMIT):
    """Probability that every metric of the block is matching when both sides' runs are resampled.

    ``ticket_rows`` / ``dense_rows``: one entry per run, each a number (one metric) or a sequence of
    the run's metrics in the same order on both sides (e.g. (SA, RA) of AT runs).  Exact when the
    number of (ticket resample, dense resample) pairs to enumerate is ≤ ``exact_limit``, otherwise
    estimated from ``draws`` draws of a generator seeded with ``seed``.
    """
    t, d = _as_rows(ticket_rows), _as_rows(dense_rows)
    if t.shape[1] != d.shape[1]:
        raise ValueError("ticket and dense runs must carry the same metrics")
    n, m = t.shape[0], d.shape[0]
    if _n_compositions(n) * _n_compositions(m) <= exact_limit:
        ct, wt = _compositions(n)
        cd, wd = _compositions(m)
        tm, _ = _resampled_stats(t, ct)
        dm, ds = _resampled_stats(d, cd)
        return float(min(1.0, max(0.0, wt @ _holds(tm, dm, ds).astype(np.float64) @ wd)))
    rng = np.random.default_rng(seed)
    hits = 0
    chunk = 2000  # bounds the memory of one vectorised batch of draws
    for start in range(0, draws, chunk):
        k = min(chunk, draws - start)
        ct = _draw_counts(rng, n, k)
        cd = _draw_counts(rng, m, k)
        tm, _ = _resampled_stats(t, ct)
        dm, ds = _resampled_stats(d, cd)
        edge = dm - ds - TOL * np.maximum(1.0, np.abs(dm))
        hits += int(np.all(tm >= edge, axis=1).sum())
    return hits / draws


def _draw_counts(rng, n, k):
    idx = rng.integers(0, n, size=(k, n))
    counts = np.zeros((k, n))
    np.add.at(counts, (np.repeat(np.arange(k), n), idx.ravel()), 1.0)
    return counts


def matching_support(ticket_values, dense_values, **kw):
    """Support of one comparison (one metric of one regime)."""
    return block_support(list(ticket_values), list(dense_values), **kw)


def level_support(st_ticket_sa, st_dense_sa, at_ticket, at_dense, **kw):
    """Support of a level's double-win.

    ``st_ticket_sa`` / ``st_dense_sa``: SA per ST run; ``at_ticket`` / ``at_dense``: (SA, RA) per AT
    run.  The ST and AT runs are resampled independently, so the joint support is the product of
    the two blocks' supports (see the module docstring).
    """
    st = block_support(list(st_ticket_sa), list(st_dense_sa), **kw)
    if st == 0.0:
        return 0.0
    return st * block_support([tuple(r) for r in at_ticket], [tuple(r) for r in at_dense], **kw)
