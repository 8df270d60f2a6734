"""analysis/sources_needed.py: two disjoint sets of k source slots judged alone and compared, on
hand-made results trees (the docs/contracts.md §3 format, several θ_p replicates per label)."""

import csv
import json
import random
from pathlib import Path

import pytest

from analysis import sources_needed
from analysis.runs import load_runs
from utils.cli import run_main

SEEDS_PER_SLOT = 3


def write_result(root, *, name, method, sparsity, regime, seed, sa, ra, init, ticket, pretrain="at"):
    run = Path(root) / name
    run.mkdir(parents=True)
    obj = {"dataset": "cifar10", "arch": "resnet50", "pretrain": pretrain, "init": init, "ticket": ticket,
           "method": method, "sparsity": float(sparsity), "regime": regime, "data_rate": 1.0, "seed": seed,
           "sa": sa, "ra": ra, "selected_epoch": 3, "selection": "val_sa" if regime == "st" else "val_ra",
           "history": [{"epoch": 0, "lr": 0.1, "train_loss": 1.0, "train_acc": 50.0, "val_sa": sa,
                        "val_ra": ra, "seconds": 1.0}],
           "config": {"dataset": "cifar10", "arch": "resnet50", "ticket": ticket, "seed": seed}, "git": None}
    (run / "results.json").write_text(json.dumps(obj))


def build_study(root, st_sa_by_slot, *, study="/w", levels=(20.0,), replicated=True, pretrain="at"):
    """A study whose pre-training label has one θ_p replicate per entry of ``st_sa_by_slot``
    (``STUDY/source/LABEL/rI/model_best.pt``, the demo's layout) and a ticket search from each;
    the downstream seeds are dealt over the replicates. Each entry: {level: ST SA of the tickets}
    (a number for every level). Dense ST SA is 90 and the AT comparison wins clearly in every slot,
    so the ST numbers decide each level."""
    for i, st_sa in enumerate(st_sa_by_slot, start=1):
        init = f"{study}/source/{pretrain}/r{i}/model_best.pt" if replicated else f"{study}/theta_{i}.pt"
        for j in range(SEEDS_PER_SLOT):
            seed = (i - 1) + len(st_sa_by_slot) * j + 1
            for regime in ("st", "at"):
                write_result(root, name=f"{pretrain}_d_{regime}_{seed}", method="dense", sparsity=0.0, regime=regime,
                             seed=seed, sa=(90.0 if regime == "st" else 80.0) + 0.1 * j,
                             ra=None if regime == "st" else 50.0 + 0.1 * j, init=init, ticket=None, pretrain=pretrain)
                for n, s in enumerate(levels, start=1):
                    value = st_sa if isinstance(st_sa, float) else st_sa[s]
                    write_result(root, name=f"{pretrain}_t{s}_{regime}_{seed}", method="imp", sparsity=s,
                                 regime=regime, seed=seed, sa=(value if regime == "st" else 85.0) + 0.1 * j,
                                 ra=None if regime == "st" else 55.0 + 0.1 * j, init=init,
                                 ticket=f"{study}/tickets/{pretrain}_imp/r{i}/tickets/round_{n:02d}.pt",
                                 pretrain=pretrain)


def _main(argv, capsys):
    assert sources_needed.main(argv) == 0
    return capsys.readouterr().out


def test_sources_that_agree_change_no_settled_cell(tmp_path, capsys):
    # level 20 wins in every slot (ST SA 92 against 90), level 36 loses in every one (70)
    build_study(tmp_path / "runs", [{20.0: 92.0, 36.0: 70.0}] * 4, levels=(20.0, 36.0))
    out = _main([str(tmp_path / "runs"), "--draws", "5", "--out", str(tmp_path / "out")], capsys)
    with open(tmp_path / "out" / "sources_needed.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["k"] for r in rows] == ["1", "2"]  # 4 slots: at most two disjoint pairs
    for r in rows:
        assert float(r["cells"]) == float(r["settled"]) == float(r["settled_alike"]) == float(r["settled_either"]) == 2
        assert float(r["changed"]) == float(r["reversals"]) == 0 and r["one_in"] == ""
    assert "4 source slots: /w/source/r1, /w/source/r2, /w/source/r3, /w/source/r4" in out
    assert "all 4 slots together: 2 cells judged, 1 supported, 1 contradicted, 0 uncertain" in out
    md = (tmp_path / "out" / "sources_needed.md").read_text()
    assert "| 1 | 5 | 2.0 | 2.0 | 2.0 | 2.0 | 0.0 | never | 0.00 |" in md and "prefixed" not in md


def test_one_slot_far_below_the_others_changes_the_cells_it_is_drawn_in(tmp_path, capsys):
    build_study(tmp_path / "runs", [92.0, 92.1, 91.9, 70.0])
    out = _main([str(tmp_path / "runs"), "--draws", "20", "--seed", "3", "--max-sources", "1"], capsys)
    # k = 1: a draw holding slot r4 judges it alone (contradicted) against a good slot (supported):
    # one reversal; the other draws agree. The draws are the tool's: seeded, over the sorted slots.
    rng = random.Random(3)
    with_bad = sum(4 in rng.sample([1, 2, 3, 4], 2) for _ in range(20))
    assert 0 < with_bad < 20
    rows, _ = _measure(tmp_path / "runs", 1, 20, 3)
    (row,) = rows
    assert row["cells"] == row["settled"] == row["settled_either"] == 1
    assert row["changed"] == row["reversals"] == pytest.approx(with_bad / 20)
    assert row["settled_alike"] == pytest.approx(1 - with_bad / 20)
    assert row["one_in"] == pytest.approx(20 / with_bad)
    assert f"| 1 | 20 | 1.0 | 1.0 | {(20 - with_bad) / 20:.1f} | 1.0 | {with_bad / 20:.1f} |" in out


def _measure(runs_dir, k_max, draws, seed):
    runs, _ = load_runs([runs_dir])
    return sources_needed.measure(runs, sources_needed.assign_slots(runs, [runs_dir]), k_max, draws, seed)


def test_two_sets_of_two_always_split_the_bad_slot_off_from_one_of_them(tmp_path):
    build_study(tmp_path / "runs", [92.0, 92.1, 91.9, 70.0])
    rows, all_verdicts = _measure(tmp_path / "runs", 2, 4, 0)
    # two disjoint pairs of four slots: the pair holding r4 misses on its pooled mean (81 against 90) but
    # its support is 1/4 (r4 never drawn of two), so it is uncertain; the other pair is supported
    assert rows[1] == pytest.approx({"k": 2, "draws": 4, "cells": 1, "settled": 0.5, "settled_alike": 0,
                                     "settled_either": 1, "changed": 1, "one_in": 1, "reversals": 0})
    (verdict,) = all_verdicts.values()
    # all four together: r4 never drawn of four, (3/4)^4 = 0.32, up to the draws
    assert not verdict[0] and 0.2 < verdict[1] < 0.45


def test_pooled_studies_repeating_seeds_are_told_apart_and_each_replicate_is_a_slot(tmp_path, capsys):
    for study in ("A", "B"):  # two demo outputs: the same seeds, other source models
        build_study(tmp_path / study, [92.0, 92.0], study=f"/w{study}")
        build_study(tmp_path / study, [92.0, 92.0], study=f"/w{study}", pretrain="std")
    out = _main([str(tmp_path / "A"), str(tmp_path / "B"), "--draws", "3"], capsys)
    assert "4 source slots: /wA/source/r1, /wA/source/r2, /wB/source/r1, /wB/source/r2" in out
    assert "each seed is prefixed with the index of its directory" in out
    assert "holds no runs" not in out  # replicate I of both labels is one slot
    assert "all 4 slots together: 2 cells judged, 2 supported" in out


def test_source_slot_of_a_relative_theta_p_is_kept_apart_by_its_directory():
    class Run:
        pretrain = "std"
        results = {"init": "out/source/std/r2/model_best.pt"}

    assert sources_needed.source_slot(Run, 1) == ("#1:out/source", 2)
    Run.results = {"init": "/a/source/std/r12/sub/model_best.pt"}
    assert sources_needed.source_slot(Run, 1) == ("/a/source", 12)  # absolute: its study needs no index
    Run.results = {"init": "/a/source/std/model_best.pt"}
    assert sources_needed.source_slot(Run, 0) is None


def test_runs_without_replicated_sources_are_one_line_exit_2(tmp_path, capsys):
    build_study(tmp_path / "runs", [92.0, 92.0], replicated=False)
    with pytest.raises(SystemExit) as exc:
        run_main(sources_needed.main, [str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and err.startswith("error: ")
    assert "/w/theta_" in err and "replicated sources (docs/sweeps.md §6" in err
    assert not (tmp_path / "out").exists()


def test_a_single_slot_is_one_line_exit_2(tmp_path, capsys):
    build_study(tmp_path / "runs", [92.0])
    with pytest.raises(SystemExit) as exc:
        run_main(sources_needed.main, [str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and "one source slot (/w/source/r1)" in err
