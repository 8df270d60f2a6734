"""The hierarchical support (sources resampled, then runs within each), its `sources` column, the
ddof = 0 judgement, and proof that a single-source tree keeps the outputs it had before them."""

import csv
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from analysis import table, verdict

HERE = Path(__file__).resolve().parent
# double_win.csv, double_win.md, double_win_details.csv, summary.csv and warnings.txt written by the
# code before this change (commit b15f4fc) from the tree of build_single_source below
EXPECTED = HERE / "verdict_single_source"
LEVELS = [20.0, 36.0, 48.8, 59.04, 67.23]


def write_result(root, *, name, method, sparsity, regime, seed, sa, ra, init, ticket, rate=1.0):
    """One results.json in the docs/contracts.md §3 schema, in its own run directory."""
    run = Path(root) / name
    run.mkdir(parents=True)
    obj = {"dataset": "cifar10", "arch": "resnet50", "pretrain": "at", "init": init, "ticket": ticket,
           "method": method, "sparsity": float(sparsity), "regime": regime, "data_rate": rate, "seed": seed,
           "sa": sa, "ra": ra, "selected_epoch": 3, "selection": "val_sa" if regime == "st" else "val_ra",
           "history": [{"epoch": 0, "lr": 0.1, "train_loss": 1.0, "train_acc": 50.0, "val_sa": sa,
                        "val_ra": ra, "seconds": 1.0}],
           "config": {"dataset": "cifar10", "arch": "resnet50", "ticket": ticket, "seed": seed}, "git": None}
    (run / "results.json").write_text(json.dumps(obj))


def _jitter(seed, k, scale):
    return ((seed * 7 + k * 3) % 5 - 2) * scale


def build_single_source(root, rate, seeds):
    """One θ_p file and one ticket directory; 3 seeds give exact supports, 6 seeds drawn ones."""
    for regime in ("st", "at"):
        for seed in seeds:
            sa = (92.0 if regime == "st" else 82.0) + _jitter(seed, 0, 1.0)
            ra = None if regime == "st" else 50.0 + _jitter(seed, 1, 1.0)
            write_result(root, name=f"d_{rate}_{regime}_{seed}", method="dense", sparsity=0.0, regime=regime,
                         rate=rate, seed=seed, sa=sa, ra=ra, init="/w/theta.pth", ticket=None)
            for k, s in enumerate(LEVELS):
                drop = 0.8 * k
                sa = (92.0 if regime == "st" else 82.0) - drop + _jitter(seed, k + 2, 0.7)
                ra = None if regime == "st" else 50.0 - drop + _jitter(seed, k + 4, 0.7)
                write_result(root, name=f"t_{rate}_{regime}_{s}_{seed}", method="imp", sparsity=s, regime=regime,
                             rate=rate, seed=seed, sa=round(sa, 4), ra=None if ra is None else round(ra, 4),
                             init="/w/theta.pth", ticket=f"/w/s1/tickets/round_{k + 1:02d}.pt")


def _analyse(runs, out):
    table.write_tables(table.collect([str(runs)]), out)
    with open(out / "double_win_details.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_single_source_tree_keeps_every_output_it_had(tmp_path):
    build_single_source(tmp_path / "runs", 1.0, [1, 2, 3])
    build_single_source(tmp_path / "runs", 0.1, [1, 2, 3, 4, 5, 6])
    out = tmp_path / "out"
    details = _analyse(tmp_path / "runs", out)
    for name in ("double_win.csv", "summary.csv", "warnings.txt"):
        assert (out / name).read_bytes() == (EXPECTED / name).read_bytes(), name
    # details: every row as before, the two appended columns after it (docs/contracts.md §5)
    old, new = (EXPECTED / "double_win_details.csv").read_text(), (out / "double_win_details.csv").read_text()
    assert len(old.splitlines()) == len(new.splitlines()) == 11
    for before, after in zip(old.splitlines(), new.splitlines()):
        assert after.startswith(before + ",")
    assert new.splitlines()[0].endswith(",support,sources,double_win_ddof0")
    assert {r["sources"] for r in details} == {"1"}
    # the 6-seed rows are drawn (462² resample pairs > EXACT_LIMIT): same seed, same numbers
    assert any(r["data_rate"] == "0.1" and r["support"] == "uncertain" for r in details)
    # double_win.md: the old text, plus the header paragraph and the ddof = 0 marks
    md = (out / "double_win.md").read_text()
    flipped = [r for r in details if r["double_win"] != r["double_win_ddof0"]]
    assert flipped and md.count(" †") == len(flipped)
    assert (f"each of the 10 judged levels has one source (θ_p file, ticket directory) per side, so the support "
            f"resampled its runs (seeds) only. **Std:** the rule uses the dense sample std (ddof = 1); with the "
            f"population std (ddof = 0) {len(flipped)} of the 10 judged levels change their double-win verdict") in md
    stripped = re.sub(r"\*\*Resampled:\*\*[^\n]*\n\n", "", md, count=1).replace(" †", "")
    stripped = re.sub(r" \*\*†\*\* marks a level[^\n]*\(ddof = 1\)\.", "", stripped)
    assert stripped == (EXPECTED / "double_win.md").read_text()


def build_three_sources(root, st_sa_by_source, dense_st_by_source):
    """Three θ_p files for one label, a ticket search from each, four seeds per source; the AT
    comparison wins clearly so the ST numbers decide the level."""
    for k, src in enumerate("abc"):
        init, ticket = f"/w/theta_{src}.pth", f"/w/s1_{src}/tickets/round_01.pt"
        for j in range(4):
            seed = 4 * k + j + 1  # the downstream seeds are spread over the sources
            for regime in ("st", "at"):
                dense_sa = dense_st_by_source[k] + 0.05 * j if regime == "st" else 80.0 + 0.1 * j
                write_result(root, name=f"d_{regime}_{seed}", method="dense", sparsity=0.0, regime=regime, seed=seed,
                             sa=dense_sa, ra=None if regime == "st" else 50.0 + 0.1 * j, init=init, ticket=None)
                sa = st_sa_by_source[k] + 0.2 * j if regime == "st" else 90.0 + 0.1 * j
                write_result(root, name=f"t_{regime}_{seed}", method="imp", sparsity=20.0, regime=regime, seed=seed,
                             sa=sa, ra=None if regime == "st" else 60.0 + 0.1 * j, init=init, ticket=ticket)


def test_three_sources_that_disagree_are_not_supported(tmp_path):
    # ST SA: sources a and b near 90, c near 60, so the pooled ticket mean (about 80.2) clears the
    # dense edge (about 74.9) by far; but a resample that draws source c twice of three misses it
    st_sa, dense = [90.0, 90.1, 60.0], [74.95, 74.95, 74.95]
    build_three_sources(tmp_path / "runs", st_sa, dense)
    (row,) = _analyse(tmp_path / "runs", tmp_path / "out")
    assert row["sources"] == "3"
    assert row["st_sa_matching"] == "True" and row["double_win"] == "True"
    assert row["at_sa_support"] == row["at_ra_support"] == "1.0"
    # two-stage: P(c drawn at most once of three) = 20/27 ≈ 0.741, up to the draws
    assert float(row["st_sa_support"]) == pytest.approx(20 / 27, abs=0.015)
    assert row["support"] == "uncertain"
    # resampling the twelve runs alone would have called the same numbers settled
    ticket = [v + 0.2 * j for v in st_sa for j in range(4)]
    dense_runs = [v + 0.05 * j for v in dense for j in range(4)]
    assert verdict.block_support(ticket, dense_runs) >= verdict.SUPPORTED
    md = (tmp_path / "out" / "double_win.md").read_text()
    assert ("in 1 of the 1 judged levels a side has two or more sources (θ_p file, ticket directory), so the "
            "support resampled the sources, then the runs within each drawn source") in md


def test_three_sources_that_agree_stay_supported(tmp_path):
    build_three_sources(tmp_path / "runs", [90.0, 90.1, 89.9], [74.95, 75.0, 74.9])
    (row,) = _analyse(tmp_path / "runs", tmp_path / "out")
    assert row["sources"] == "3" and row["support"] == "supported" and row["double_win_support"] == "1.0"


def _two_stage_outcomes(values, groups):
    """Every outcome of the two-stage resample: (probability, pooled list of the drawn values)."""
    k = len(groups)
    for picked in itertools.product(range(k), repeat=k):
        inner = [list(itertools.product(groups[g], repeat=len(groups[g]))) for g in picked]
        p = 1.0 / (k ** k * math.prod(len(x) for x in inner))
        for runs in itertools.product(*inner):
            yield p, [values[i] for draw in runs for i in draw]


def _brute_force(ticket, t_src, dense, d_src):
    def groups(src):
        return [[i for i, s in enumerate(src) if s == key] for key in dict.fromkeys(src)]

    d_outcomes = list(_two_stage_outcomes(dense, groups(d_src)))
    return sum(pt * pd for pt, t in _two_stage_outcomes(ticket, groups(t_src))
               for pd, d in d_outcomes if verdict.is_matching(t, d))


def test_hierarchical_enumeration_equals_listing_every_two_stage_resample():
    cases = [([91.0, 89.0, 93.0], ["a", "a", "b"], [90.0, 92.0, 94.0], ["a", "b", "b"]),
             ([90.5, 88.0, 92.0], ["a", "b", "c"], [90.0, 92.0, 94.0], ["x", "x", "x"]),
             ([92.0, 91.0], ["a", "a"], [89.0, 95.0, 92.0], ["a", "b", "c"])]
    for ticket, t_src, dense, d_src in cases:
        exact = verdict.block_support(ticket, dense, ticket_sources=t_src, dense_sources=d_src)
        assert exact == pytest.approx(_brute_force(ticket, t_src, dense, d_src), abs=1e-12)
        assert 0.0 < exact < 1.0
        drawn = verdict.block_support(ticket, dense, ticket_sources=t_src, dense_sources=d_src, exact_limit=0,
                                      draws=40_000, seed=5)
        assert drawn == pytest.approx(exact, abs=0.012)


def test_one_source_is_the_run_resample_exactly():
    ticket, dense = [90.5, 91.5, 92.5, 89.0, 90.0, 91.0], [90.0, 92.0, 94.0, 91.0, 93.0, 92.5]
    same = {"ticket_sources": ["a"] * 6, "dense_sources": ["t"] * 6}
    for kw in ({}, {"exact_limit": 0, "draws": 3000, "seed": 7}):  # enumerated, then drawn
        assert verdict.block_support(ticket, dense, **same, **kw) == verdict.block_support(ticket, dense, **kw)


def test_a_verdict_that_depends_on_the_std_estimator_is_marked(tmp_path):
    runs = tmp_path / "runs"
    for seed, (st, at, ra) in enumerate(zip([90.0, 92.0, 94.0], [80.0, 82.0, 84.0], [48.0, 50.0, 52.0]), start=1):
        # dense: mean 92, sample std 2 (edge 90), population std 1.633 (edge 90.37)
        write_result(runs, name=f"d_st_{seed}", method="dense", sparsity=0.0, regime="st", seed=seed, sa=st, ra=None,
                     init="/w/theta.pth", ticket=None)
        write_result(runs, name=f"d_at_{seed}", method="dense", sparsity=0.0, regime="at", seed=seed, sa=at, ra=ra,
                     init="/w/theta.pth", ticket=None)
        for s, st_sa in ((20.0, 93.0 + seed), (36.0, 88.2 + seed)):  # ST SA means 95 and 90.2
            ticket = f"/w/s1/tickets/round_{int(s)}.pt"
            write_result(runs, name=f"t_st_{s}_{seed}", method="imp", sparsity=s, regime="st", seed=seed,
                         sa=st_sa, ra=None, init="/w/theta.pth", ticket=ticket)
            write_result(runs, name=f"t_at_{s}_{seed}", method="imp", sparsity=s, regime="at", seed=seed,
                         sa=84.0 + seed, ra=52.0 + seed, init="/w/theta.pth", ticket=ticket)
    rows = {r["sparsity"]: r for r in _analyse(runs, tmp_path / "out")}
    # 36%: ST SA mean 90.2 is matching against 90 (ddof = 1) but not against 90.37 (ddof = 0)
    assert rows["36.00"]["st_sa_mean"] == "90.2"
    assert (rows["36.00"]["double_win"], rows["36.00"]["double_win_ddof0"]) == ("True", "False")
    assert (rows["20.00"]["double_win"], rows["20.00"]["double_win_ddof0"]) == ("True", "True")
    md = (tmp_path / "out" / "double_win.md").read_text()
    assert "with the population std (ddof = 0) 1 of the 2 judged levels change their double-win verdict, " \
           "marked **†** below." in md
    level_line = next(line for line in md.splitlines() if line.startswith("| cifar10 | 1.0 | at | imp | win"))
    cells = [c.strip() for c in level_line.strip("|").split("|")][4:]
    assert cells[0].endswith(")") and cells[1].endswith(" †")


def _support_before(t, d, draws, seed):
    """The drawn support as b15f4fc computed it (np.add.at per chunk), kept to prove the same numbers."""
    t, d = verdict._as_rows(t), verdict._as_rows(d)
    n, m = len(t), len(d)
    rng, hits = np.random.default_rng(seed), 0

    def counts(size, k):
        idx = rng.integers(0, size, size=(k, size))
        c = np.zeros((k, size))
        np.add.at(c, (np.repeat(np.arange(k), size), idx.ravel()), 1.0)
        return c

    for start in range(0, draws, 2000):
        k = min(2000, draws - start)
        ct, cd = counts(n, k), counts(m, k)
        tm, _ = verdict._resampled_stats(t, ct)
        dm, ds = verdict._resampled_stats(d, cd)
        hits += int(np.all(tm >= dm - ds - verdict.TOL * np.maximum(1.0, np.abs(dm)), axis=1).sum())
    return hits / draws


def test_shared_draws_give_the_numbers_of_per_block_draws():
    rng = np.random.default_rng(11)
    dense = 90.0 + rng.normal(size=(7, 2))
    # several blocks of the same sizes share one set of draws and one dense edge; each must still
    # get exactly the number it got when it drew alone (a chunk count that is not a multiple, too)
    supports = []
    for shift in (-0.6, -0.3, 0.0, 0.4):
        ticket = 90.0 + shift + rng.normal(size=(6, 2))
        for draws, seed in ((4500, 0), (4500, 3)):
            for t, d in ((ticket, dense), (ticket[:, 0], dense[:, 0])):
                supports.append(verdict.block_support(t, d, exact_limit=0, draws=draws, seed=seed))
                assert supports[-1] == _support_before(t, d, draws, seed)
    assert sum(0.05 < p < 0.95 for p in supports) >= 8  # near the edge, where a changed draw shows
