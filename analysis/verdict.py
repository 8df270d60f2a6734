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
≤ 0.1 and *uncertain* in between.  Where the runs of a side come from two or more *sources* (θ_p
file, ticket directory), the resample is two-stage: sources first, then the runs of each drawn
source (:func:`_hierarchical_support`); with one source it is the run resample above.
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
CHUNK = 2000  # drawn resamples whose statistics are computed at once: bounds their memory


def mean_std(values, ddof=1):
    """(mean, std): sample std (ddof=1) for two or more values, 0 for one; NaNs for none.

    ``ddof=0`` gives the population std (numpy's default), which the paper's rule might also mean."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (n - ddof)
    return mean, math.sqrt(var)


def matching(mean, dense_mean, dense_std):
    """The rule on summary numbers: mean ≥ dense mean − dense std (False when any is NaN)."""
    if any(v is None or math.isnan(v) for v in (mean, dense_mean, dense_std)):
        return False
    return mean >= dense_mean - dense_std - TOL * max(1.0, abs(dense_mean))


def is_matching(ticket_values, dense_values, ddof=1):
    """The rule on the per-seed values of one metric (``ddof`` of the dense std as in :func:`mean_std`)."""
    mean, _ = mean_std(list(ticket_values))
    dmean, dstd = mean_std(list(dense_values), ddof)
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


@lru_cache(maxsize=64)
def _compositions(n, picks=None):
    """(counts K×n, probabilities K): every multiset of ``picks`` (default n) draws from n runs, with
    its probability.

    A resample's mean and std depend only on how often each run was drawn, so enumerating the
    multisets with their multinomial weights is the same as enumerating all n**n resamples.
    """
    picks = n if picks is None else picks
    counts, weights = [], []
    log_total = picks * math.log(n)
    for combo in combinations_with_replacement(range(n), picks):
        c = np.bincount(combo, minlength=n)
        counts.append(c)
        log_w = math.lgamma(picks + 1) - sum(math.lgamma(k + 1) for k in c)
        weights.append(math.exp(log_w - log_total))
    counts, weights = np.asarray(counts, dtype=np.float64), np.asarray(weights)
    counts.flags.writeable = weights.flags.writeable = False  # shared by every caller through the cache
    return counts, weights


def _n_compositions(n):
    return math.comb(2 * n - 1, n)


def _resampled_means(rows, counts):
    """Mean per metric of each resample (``counts``: resamples × runs)."""
    return counts @ rows / rows.shape[0]


def _resampled_stats(rows, counts):
    """Mean and sample std per metric of each resample (``counts``: resamples × runs)."""
    n = rows.shape[0]
    means = _resampled_means(rows, counts)
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


def block_support(ticket_rows, dense_rows, *, ticket_sources=None, dense_sources=None, draws=DRAWS, seed=0,
                  exact_limit=EXACT_LIMIT):
    """Probability that every metric of the block is matching when both sides' runs are resampled.

    ``ticket_rows`` / ``dense_rows``: one entry per run, each a number (one metric) or a sequence of
    the run's metrics in the same order on both sides (e.g. (SA, RA) of AT runs).
    ``ticket_sources`` / ``dense_sources``: one key per run naming its source; when either side has
    two or more sources the support is hierarchical (:func:`_hierarchical_support`), otherwise the
    runs alone are resampled.  Exact when the number of (ticket resample, dense resample) pairs to
    enumerate is ≤ ``exact_limit``, otherwise estimated from ``draws`` draws of a generator seeded
    with ``seed``.
    """
    t, d = _as_rows(ticket_rows), _as_rows(dense_rows)
    if t.shape[1] != d.shape[1]:
        raise ValueError("ticket and dense runs must carry the same metrics")
    t_groups, d_groups = _source_groups(ticket_sources, len(t)), _source_groups(dense_sources, len(d))
    if len(t_groups) > 1 or len(d_groups) > 1:
        return _hierarchical_support(t, d, t_groups, d_groups, draws, seed, exact_limit)
    n, m = t.shape[0], d.shape[0]
    if _n_compositions(n) * _n_compositions(m) <= exact_limit:
        ct, wt = _compositions(n)
        cd, wd = _compositions(m)
        dm, ds = _resampled_stats(d, cd)
        return float(min(1.0, max(0.0, wt @ _holds(_resampled_means(t, ct), dm, ds).astype(np.float64) @ wd)))
    hits = 0
    for (ct, _), edge in zip(_drawn_counts(n, m, draws, seed), _drawn_edges(d.tobytes(), d.shape, n, draws, seed)):
        hits += int(np.all(_resampled_means(t, ct) >= edge, axis=1).sum())
    return hits / draws


@lru_cache(maxsize=8)
def _drawn_counts(n, m, draws, seed):
    """((ticket counts, dense counts) per chunk of :data:`CHUNK` draws) of a generator seeded with
    ``seed``, called per chunk for the ticket side, then the dense side, as it always was, so a seed
    gives the same draws as before.  A pure function of its arguments, so every block of these
    sizes shares one set of draws instead of drawing its own."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, draws, CHUNK):
        k = min(CHUNK, draws - start)
        ct, cd = _counts_of(rng.integers(0, n, size=(k, n)), n), _counts_of(rng.integers(0, m, size=(k, m)), m)
        ct.flags.writeable = cd.flags.writeable = False  # shared by every caller through the cache
        out.append((ct, cd))
    return tuple(out)


@lru_cache(maxsize=64)
def _drawn_edges(d_bytes, shape, n, draws, seed):
    """The matching edge (dense mean − std − tolerance) of each drawn dense resample, per chunk.

    Keyed by the dense runs' bytes: the levels of a row share one dense baseline, so its edges are
    computed once.  The statistics are computed chunk by chunk, in the shapes they always had, so
    the same float operations give the same bits."""
    d = np.frombuffer(d_bytes, dtype=np.float64).reshape(shape).copy()
    edges = []
    for _, cd in _drawn_counts(n, shape[0], draws, seed):
        dm, ds = _resampled_stats(d, cd)
        edge = dm - ds - TOL * np.maximum(1.0, np.abs(dm))
        edge.flags.writeable = False
        edges.append(edge)
    return tuple(edges)


def _counts_of(idx, n):
    """(draws × n) counts of how often each run was drawn; ``idx``: the runs each draw picked."""
    k = idx.shape[0]
    flat = (np.arange(k)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=k * n).reshape(k, n).astype(np.float64)


# --------------------------------------------------------------------------- hierarchical support

def _source_groups(sources, n):
    """Run indices per distinct source, in order of first appearance; one group when ``sources`` is None."""
    if sources is None:
        return [list(range(n))]
    sources = list(sources)
    if len(sources) != n:
        raise ValueError("give one source per run")
    groups = {}
    for i, s in enumerate(sources):
        groups.setdefault(s, []).append(i)
    return list(groups.values())


def _hierarchical_support(t, d, t_groups, d_groups, draws, seed, exact_limit):
    """Support under a two-stage resample of each side: as many sources as it has, drawn with
    replacement, then each drawn source's runs, drawn with replacement (as many as it has); the
    rule is applied to every run drawn, pooled.  A source drawn twice contributes two independent
    resamples of its runs, so sources that disagree weigh as the few draws they are."""
    t, d = t[np.concatenate(t_groups)], d[np.concatenate(d_groups)]  # runs ordered by source
    t_sizes, d_sizes = tuple(len(g) for g in t_groups), tuple(len(g) for g in d_groups)
    if _n_hierarchical(t_sizes, exact_limit) * _n_hierarchical(d_sizes, exact_limit) <= exact_limit:
        ct, wt = _hierarchical_compositions(t_sizes)
        cd, wd = _hierarchical_compositions(d_sizes)
        dm, ds = _pooled_stats(d, cd)
        return float(min(1.0, max(0.0, wt @ _holds(_pooled_means(t, ct), dm, ds).astype(np.float64) @ wd)))
    all_t = _hierarchical_drawn(t_sizes, d_sizes, draws, seed)[0]
    edges = _hierarchical_edges(d.tobytes(), d.shape, t_sizes, d_sizes, draws, seed)
    hits = 0
    for start, edge in zip(range(0, draws, CHUNK), edges):
        hits += int(np.all(_pooled_means(t, all_t[start:start + CHUNK]) >= edge, axis=1).sum())
    return hits / draws


@lru_cache(maxsize=4)
def _hierarchical_drawn(t_sizes, d_sizes, draws, seed):
    """(ticket counts, dense counts) of ``draws`` two-stage resamples per side, from a generator
    seeded with ``seed``: a pure function of its arguments, shared by every block of these sizes."""
    rng = np.random.default_rng(seed)
    out = _hierarchical_draw(rng, t_sizes, draws), _hierarchical_draw(rng, d_sizes, draws)
    for counts in out:
        counts.flags.writeable = False  # shared by every caller through the cache
    return out


@lru_cache(maxsize=64)
def _hierarchical_edges(d_bytes, shape, t_sizes, d_sizes, draws, seed):
    """The matching edge of each drawn dense resample, per chunk, computed once per dense baseline
    (keyed by its runs' bytes, ordered by source) as :func:`_drawn_edges` does for one source."""
    d = np.frombuffer(d_bytes, dtype=np.float64).reshape(shape).copy()
    all_d = _hierarchical_drawn(t_sizes, d_sizes, draws, seed)[1]
    edges = []
    for start in range(0, draws, CHUNK):
        dm, ds = _pooled_stats(d, all_d[start:start + CHUNK])
        edge = dm - ds - TOL * np.maximum(1.0, np.abs(dm))
        edge.flags.writeable = False
        edges.append(edge)
    return tuple(edges)


def _n_hierarchical(sizes, cap):
    """How many count vectors :func:`_hierarchical_compositions` lists (``cap`` + 1 once past ``cap``)."""
    if _n_compositions(len(sizes)) > cap:
        return cap + 1
    total = 0
    for combo in combinations_with_replacement(range(len(sizes)), len(sizes)):
        c = np.bincount(combo, minlength=len(sizes))
        total += math.prod(math.comb(int(k) * n + n - 1, n - 1) for k, n in zip(c, sizes))
        if total > cap:
            return cap + 1
    return total


@lru_cache(maxsize=16)
def _hierarchical_compositions(sizes):
    """(counts K×runs, probabilities K) of every outcome of the two-stage resample of sources of
    ``sizes`` runs: a multiset of sources, then, for a source drawn c times, c × its size draws
    among its runs (c resamples of it, pooled)."""
    src_counts, src_weights = _compositions(len(sizes))
    blocks, block_weights = [], []
    for c, w in zip(src_counts, src_weights):
        counts, weights = np.zeros((1, 0)), np.array([w])
        for k, n in zip(c, sizes):
            pc, pw = _compositions(n, int(k) * n)
            counts = np.hstack([np.repeat(counts, len(pc), axis=0), np.tile(pc, (len(counts), 1))])
            weights = np.outer(weights, pw).ravel()
        blocks.append(counts)
        block_weights.append(weights)
    counts, weights = np.vstack(blocks), np.concatenate(block_weights)
    counts.flags.writeable = weights.flags.writeable = False  # shared by every caller through the cache
    return counts, weights


def _hierarchical_draw(rng, sizes, k):
    """(k × runs) counts of ``k`` two-stage resamples, drawn in one vectorised call."""
    sizes = np.asarray(sizes)
    offsets, total, widest = np.cumsum(sizes) - sizes, int(sizes.sum()), int(sizes.max())
    src = rng.integers(0, len(sizes), size=(k, len(sizes)))
    n_src = sizes[src][..., None]
    within = np.minimum((rng.random((k, len(sizes), widest)) * n_src).astype(np.int64), n_src - 1)
    drawn = np.arange(widest) < n_src  # a source of n runs fills the first n slots of its row
    flat = (np.arange(k)[:, None, None] * total + offsets[src][..., None] + within)[drawn]
    return np.bincount(flat, minlength=k * total).reshape(k, total).astype(np.float64)


def _pooled_means(rows, counts):
    """Mean per metric of each resample whose size varies (``counts``: resamples × runs)."""
    return counts @ rows / counts.sum(axis=1)[:, None]


def _pooled_stats(rows, counts):
    """Mean and sample std per metric of each resample whose size varies (``counts``: resamples × runs)."""
    totals = counts.sum(axis=1)[:, None]
    means = _pooled_means(rows, counts)
    dev = rows[None, :, :] - means[:, None, :]
    ss = np.einsum("kr,krm->km", counts, dev * dev)
    var = np.where(totals > 1, ss / np.maximum(totals - 1, 1), 0.0)
    return means, np.sqrt(np.maximum(var, 0.0))


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
