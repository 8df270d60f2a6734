"""analysis/: the double-win table and curves from synthetic results, and mask statistics."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pruning_utils as pu
import study.grid
from analysis import common, mask_stats, plot_curves
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# docs/protocol.md §1: sparsity after IMP round k
LEVELS = [20.00, 36.00, 48.80, 59.04, 67.23, 73.79, 79.03, 83.22, 86.58, 89.26, 91.41, 93.13]
SEEDS = (1, 2, 3)


def write_result(root, *, dataset="cifar10", pretrain="at", method="imp", sparsity=0.0, regime="st", data_rate=1.0,
                 seed=1, sa=90.0, ra=None, arch="resnet50", ticket=None, name=None):
    """One results.json in the docs/contracts.md §3 schema, in its own run directory."""
    name = name or f"{dataset}_{data_rate}_{pretrain}_{method}_{sparsity:.2f}_{regime}_s{seed}"
    run = Path(root) / name
    run.mkdir(parents=True)
    obj = {"dataset": dataset, "arch": arch, "pretrain": pretrain, "init": "/weights/init.pth",
           "ticket": ticket if method != "dense" else None, "method": method, "sparsity": float(sparsity),
           "regime": regime, "data_rate": data_rate, "seed": seed, "sa": sa, "ra": ra,
           "selected_epoch": 3, "selection": "val_sa" if regime == "st" else "val_ra",
           "history": [{"epoch": 0, "lr": 0.1, "train_loss": 1.0, "train_acc": 50.0, "val_sa": sa,
                        "val_ra": ra, "seconds": 1.0}],
           "config": {"dataset": dataset, "arch": arch, "ticket": ticket, "seed": seed}, "git": None}
    (run / "results.json").write_text(json.dumps(obj))
    return run


def write_level(root, *, sparsity, st_sa, at_sa, at_ra, seeds=SEEDS, at_seeds=None, **kw):
    """ST and AT runs of one level; values are per-seed lists (or one value for every seed)."""
    def vals(v, n):
        return list(v) if isinstance(v, (list, tuple)) else [v] * n

    method = kw.pop("method", "dense" if sparsity == 0 else "imp")
    for seed, sa in zip(seeds, vals(st_sa, len(seeds))):
        write_result(root, method=method, sparsity=sparsity, regime="st", seed=seed, sa=sa, **kw)
    at_seeds = seeds if at_seeds is None else at_seeds
    for seed, sa, ra in zip(at_seeds, vals(at_sa, len(at_seeds)), vals(at_ra, len(at_seeds))):
        write_result(root, method=method, sparsity=sparsity, regime="at", seed=seed, sa=sa, ra=ra, **kw)


# dense: ST SA 92 ± 2, AT SA 82 ± 2, AT RA 50 ± 2 (sample std of three seeds): thresholds 90 / 80 / 48
DENSE = dict(st_sa=[90.0, 92.0, 94.0], at_sa=[80.0, 82.0, 84.0], at_ra=[48.0, 50.0, 52.0])


def write_at_study(root, pretrain="at"):
    """Double-win up to 89.26 and not beyond, 89.26 sitting exactly on the one-std edge."""
    write_level(root, sparsity=0.0, pretrain=pretrain, **DENSE)
    for s in LEVELS:
        if s < 89.26:
            write_level(root, sparsity=s, pretrain=pretrain, st_sa=[90.5, 91.5, 92.5], at_sa=[81.0, 81.5, 82.0],
                        at_ra=[49.0, 49.5, 50.0])
        elif s == 89.26:  # means exactly dense mean − std in every metric: matching
            write_level(root, sparsity=s, pretrain=pretrain, st_sa=[89.0, 90.0, 91.0], at_sa=[79.0, 80.0, 81.0],
                        at_ra=[47.0, 48.0, 49.0])
        elif s == 91.41:  # RA a hair below the edge: not matching
            write_level(root, sparsity=s, pretrain=pretrain, st_sa=[90.5, 91.5, 92.5], at_sa=[81.0, 81.5, 82.0],
                        at_ra=[46.99, 47.99, 48.99])
        else:  # ST SA below the edge
            write_level(root, sparsity=s, pretrain=pretrain, st_sa=[88.9, 89.9, 90.9], at_sa=[81.0, 81.5, 82.0],
                        at_ra=[49.0, 49.5, 50.0])


def read_table(out):
    with open(out / "double_win.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def row_for(rows, **key):
    hits = [r for r in rows if all(r[k] == v for k, v in key.items())]
    assert len(hits) == 1, (key, rows)
    return hits[0]


# --------------------------------------------------------------------------- double-win table

def test_double_win_table_known_answer(tmp_path):
    write_at_study(tmp_path / "runs")
    out = tmp_path / "out"
    assert plot_curves.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    fields, rows = read_table(out)
    # the six §5.5 columns first, the appended ones after them in this order
    assert fields == ["dataset", "data_rate", "pretrain", "method", "extreme_sparsity", "double_win_levels",
                      "extreme_sparsity_contiguous", "verdict", "extreme_sparsity_supported"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["dataset"], row["pretrain"], row["method"]) == ("cifar10", "at", "imp")
    assert float(row["data_rate"]) == 1.0
    assert row["extreme_sparsity"] == "89.26"
    assert row["double_win_levels"] == ";".join(f"{s:.2f}" for s in LEVELS if s <= 89.26)
    assert row["extreme_sparsity_contiguous"] == "89.26" and row["verdict"] == "complete"
    # 3 seeds a std apart from the dense mean: no level is double-win under ≥ 90% of seed resamples
    assert row["extreme_sparsity_supported"] == ""
    assert (out / "warnings.txt").read_text() == ""
    md = (out / "double_win.md").read_text()
    assert "| cifar10 | 1.0 | at | imp | 89.26 | 20.00;36.00;" in md
    # per-level detail: 91.41 fails only on RA
    with open(out / "double_win_details.csv", newline="") as fh:
        levels = {r["sparsity"]: r for r in csv.DictReader(fh)}
    assert levels["91.41"]["at_ra_matching"] == "False" and levels["91.41"]["st_sa_matching"] == "True"
    assert levels["93.13"]["st_sa_matching"] == "False"
    assert levels["89.26"]["double_win"] == "True"


def test_dense_runs_are_recognised_by_sparsity_zero(tmp_path):
    """docs/contracts.md §5: the dense runs are those of sparsity 0, whatever their method field says."""
    write_at_study(tmp_path / "runs")
    for path in (tmp_path / "runs").glob("*/results.json"):
        obj = json.loads(path.read_text())
        if obj["sparsity"] == 0.0:
            obj["method"] = None if obj["seed"] == 1 else "none"
            path.write_text(json.dumps(obj))
    out = tmp_path / "out"
    assert plot_curves.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    _, rows = read_table(out)
    assert [(r["method"], r["extreme_sparsity"]) for r in rows] == [("imp", "89.26")]


def test_one_std_rule_survives_float_rounding(tmp_path):
    """A ticket mean equal to dense mean − std computed from decimals is still matching."""
    dense_sa = [93.17, 93.61, 94.02]
    mean, std = common.agg_mean_std(dense_sa)
    edge = mean - std
    root = tmp_path / "runs"
    write_level(root, sparsity=0.0, st_sa=dense_sa, at_sa=dense_sa, at_ra=dense_sa)
    write_level(root, sparsity=20.0, st_sa=[edge - 0.3, edge, edge + 0.3], at_sa=[edge - 0.3, edge, edge + 0.3],
                at_ra=[edge - 0.3, edge, edge + 0.3])
    write_level(root, sparsity=36.0, st_sa=[edge - 0.31, edge - 0.01, edge + 0.29], at_sa=edge, at_ra=edge)
    out = tmp_path / "out"
    plot_curves.main([str(root), "--out", str(out), "--no-figures"])
    _, rows = read_table(out)
    assert rows[0]["double_win_levels"] == "20.00"


def test_std_is_sample_std():
    assert common.agg_mean_std([90.0, 92.0, 94.0]) == (92.0, 2.0)
    assert common.agg_mean_std([77.5]) == (77.5, 0.0)
    mean, std = common.agg_mean_std([1.0, 2.0])
    assert mean == 1.5 and math.isclose(std, math.sqrt(0.5))


def test_missing_seed_level_is_not_double_win(tmp_path):
    root = tmp_path / "runs"
    write_at_study(root, pretrain="std")
    # 89.26 AT with seeds 1 and 2 only: the edge level loses its verdict
    for run in root.glob("*_std_imp_89.26_at_s3"):
        (run / "results.json").unlink()
    out = tmp_path / "out"
    plot_curves.main([str(root), "--out", str(out), "--no-figures"])
    _, rows = read_table(out)
    row = row_for(rows, pretrain="std")
    assert row["extreme_sparsity"] == "86.58"
    assert "89.26" not in row["double_win_levels"].split(";")
    warnings = (out / "warnings.txt").read_text()
    assert "89.26% has 2 of 3 seeds" in warnings
    md = (out / "double_win.md").read_text()
    assert "89.26% has 2 of 3 seeds" in md
    # the table row itself is flagged: its extreme sparsity might be higher than 86.58
    assert "levels 89.26 not judged, so the extreme sparsity may be higher" in md


def test_tickets_with_fewer_seeds_than_their_baseline_get_no_verdict(tmp_path):
    root = tmp_path / "runs"
    write_level(root, sparsity=0.0, **DENSE)
    for s in LEVELS[:3]:  # every ticket level has seeds 1 and 2 only; the baseline has 3
        write_level(root, sparsity=s, seeds=(1, 2), st_sa=92.0, at_sa=82.0, at_ra=50.0)
    out = tmp_path / "out"
    plot_curves.main([str(root), "--out", str(out), "--no-figures"])
    _, rows = read_table(out)
    assert rows[0]["extreme_sparsity"] == "" and rows[0]["double_win_levels"] == ""
    warnings = (out / "warnings.txt").read_text()
    assert "its tickets have 2 seeds, fewer than the 3 of its regime-st dense baseline" in warnings
    assert "no verdict (see warnings)" in (out / "double_win.md").read_text()


def test_single_seed_groups_are_judged_with_a_warning(tmp_path):
    root = tmp_path / "runs"
    write_level(root, sparsity=0.0, seeds=(1,), st_sa=92.0, at_sa=82.0, at_ra=50.0)
    write_level(root, sparsity=20.0, seeds=(1,), st_sa=92.0, at_sa=82.0, at_ra=50.0)
    write_level(root, sparsity=36.0, seeds=(1,), st_sa=91.9, at_sa=82.0, at_ra=50.0)
    out = tmp_path / "out"
    plot_curves.main([str(root), "--out", str(out), "--no-figures"])
    _, rows = read_table(out)
    assert rows[0]["double_win_levels"] == "20.00"  # std 0: 91.9 < 92.0 is not matching
    assert "judged on a single seed" in (out / "warnings.txt").read_text()


def test_missing_baseline_gives_no_verdict(tmp_path):
    root = tmp_path / "runs"
    write_at_study(root, pretrain="at")
    write_at_study(root, pretrain="fat")
    for run in root.glob("*_fat_dense_0.00_at_s*"):
        (run / "results.json").unlink()
    out = tmp_path / "out"
    plot_curves.main([str(root), "--out", str(out), "--no-figures"])
    _, rows = read_table(out)
    assert row_for(rows, pretrain="at")["extreme_sparsity"] == "89.26"
    fat = row_for(rows, pretrain="fat")
    assert fat["extreme_sparsity"] == "" and fat["double_win_levels"] == ""
    warnings = (out / "warnings.txt").read_text()
    assert "pretrain fat" in warnings and "no dense baseline for regime at" in warnings
    assert "no dense baseline for regime at" in (out / "double_win.md").read_text()


def test_groups_by_data_rate_and_method(tmp_path):
    root = tmp_path / "runs"
    write_at_study(root)
    # 10% data: double-win only at 20%; OMP at full data: never (its ST SA is far below)
    write_level(root, sparsity=0.0, data_rate=0.1, **DENSE)
    write_level(root, sparsity=20.0, data_rate=0.1, st_sa=92.0, at_sa=82.0, at_ra=50.0)
    write_level(root, sparsity=36.0, data_rate=0.1, st_sa=70.0, at_sa=82.0, at_ra=50.0)
    write_level(root, sparsity=20.0, method="omp", st_sa=60.0, at_sa=82.0, at_ra=50.0)
    out = tmp_path / "out"
    plot_curves.main([str(root), "--out", str(out), "--no-figures"])
    _, rows = read_table(out)
    assert row_for(rows, data_rate="0.1")["double_win_levels"] == "20.00"
    assert row_for(rows, data_rate="1.0", method="imp")["extreme_sparsity"] == "89.26"
    omp = row_for(rows, method="omp")
    assert omp["extreme_sparsity"] == "" and omp["double_win_levels"] == ""


def test_mixed_architectures_get_no_verdict(tmp_path):
    root = tmp_path / "runs"
    write_level(root, sparsity=0.0, arch="resnet18", **DENSE)
    write_level(root, sparsity=20.0, st_sa=92.0, at_sa=82.0, at_ra=50.0)
    out = tmp_path / "out"
    plot_curves.main([str(root), "--out", str(out), "--no-figures"])
    _, rows = read_table(out)
    assert rows[0]["extreme_sparsity"] == ""
    assert "mix architectures (resnet18, resnet50)" in (out / "warnings.txt").read_text()


def test_imp_retrain_kinds_are_kept_apart(tmp_path):
    """IMP tickets re-trained ST and AT become imp-st / imp-at, read from the ticket files."""
    mask = {"conv1.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)}
    mask["conv1.weight"][0] = False
    tickets = {}
    for retrain in ("st", "at"):
        t = pu.make_ticket(mask, round=1, method="imp", retrain=retrain, arch="resnet50", pretrain="at",
                           init="x", source_dataset="imagenet")
        tickets[retrain] = tmp_path / f"ticket_{retrain}.pt"
        pu.save_ticket(tickets[retrain], t)
    root = tmp_path / "runs"
    write_level(root, sparsity=0.0, **DENSE)
    for retrain, st_sa in (("st", 92.0), ("at", 50.0)):
        for seed in SEEDS:
            write_result(root, method="imp", sparsity=20.0, regime="st", seed=seed, sa=st_sa,
                         ticket=str(tickets[retrain]), name=f"{retrain}_st_{seed}")
            write_result(root, method="imp", sparsity=20.0, regime="at", seed=seed, sa=82.0, ra=50.0,
                         ticket=str(tickets[retrain]), name=f"{retrain}_at_{seed}")
    out = tmp_path / "out"
    plot_curves.main([str(root), "--out", str(out)])
    _, rows = read_table(out)
    assert row_for(rows, method="imp-st")["extreme_sparsity"] == "20.00"
    assert row_for(rows, method="imp-at")["extreme_sparsity"] == ""
    assert (out / "methods_cifar10_rate100_at.png").stat().st_size > 0
    # a ticket file that is gone leaves the plain method label
    for t in tickets.values():
        t.unlink()
    plot_curves.main([str(root), "--out", str(tmp_path / "out2"), "--no-figures"])
    _, rows = read_table(tmp_path / "out2")
    assert [r["method"] for r in rows] == ["imp"]
    assert "seed(s) 1, 2, 3" in (tmp_path / "out2" / "warnings.txt").read_text()  # both kinds now collide


def test_figures_and_their_data(tmp_path):
    root = tmp_path / "runs"
    write_at_study(root, pretrain="at")
    write_at_study(root, pretrain="std")
    for s in LEVELS[:4]:  # random pruning of the at pre-training
        write_level(root, sparsity=s, method="rp", st_sa=80.0, at_sa=70.0, at_ra=40.0)
    write_level(root, sparsity=0.0, data_rate=0.1, **DENSE)
    write_level(root, sparsity=20.0, data_rate=0.1, st_sa=92.0, at_sa=82.0, at_ra=50.0)
    out = tmp_path / "out"
    plot_curves.main([str(root), "--out", str(out)])
    for name in ("curves_cifar10_rate100_imp", "curves_cifar10_rate10_imp", "data_rate_cifar10_imp",
                 "methods_cifar10_rate100_at"):
        png, data = out / f"{name}.png", out / f"{name}.csv"
        assert png.stat().st_size > 5000, name
        with open(data, newline="") as fh:
            drawn = list(csv.DictReader(fh))
        assert drawn, name
    with open(out / "curves_cifar10_rate100_imp.csv", newline="") as fh:
        drawn = list(csv.DictReader(fh))
    series = {r["series"] for r in drawn}
    assert {"at imp", "std imp", "at rp", "at dense", "std dense"} <= series
    ra_at = [r for r in drawn if r["series"] == "at imp" and r["panel"] == "at_ra"]
    assert [r["sparsity"] for r in ra_at] == [f"{s:.2f}" for s in LEVELS]
    assert [int(r["x_position"]) for r in ra_at] == list(range(len(LEVELS)))  # evenly spaced levels
    edge = next(r for r in ra_at if r["sparsity"] == "89.26")
    assert float(edge["mean"]) == 48.0 and float(edge["std"]) == 1.0 and edge["n"] == "3"
    dense = next(r for r in drawn if r["series"] == "at dense" and r["panel"] == "st_sa")
    assert float(dense["mean"]) == 92.0 and float(dense["std"]) == 2.0
    # fixed colours per pretrain label
    assert common.pretrain_color("at") != common.pretrain_color("std")
    assert common.pretrain_color("mine") == common.pretrain_color("mine")


def test_malformed_results_are_skipped_with_warning(tmp_path, capsys):
    root = tmp_path / "runs"
    write_at_study(root)
    bad = root / "broken"
    bad.mkdir()
    (bad / "results.json").write_text('{"dataset": "cifar10", "sa": ')
    partial = root / "partial"
    partial.mkdir()
    (partial / "results.json").write_text(json.dumps({"dataset": "cifar10", "sa": 90.0}))
    out = tmp_path / "out"
    assert plot_curves.main([str(root), "--out", str(out), "--no-figures"]) == 0
    _, rows = read_table(out)
    assert rows[0]["extreme_sparsity"] == "89.26"
    warnings = (out / "warnings.txt").read_text()
    assert str(bad / "results.json") in warnings and "not valid JSON" in warnings
    assert str(partial / "results.json") in warnings and "lacks the keys" in warnings
    printed = capsys.readouterr()
    assert "| cifar10 | 1.0 | at | imp | 89.26 |" in printed.out and "2 warning(s)" in printed.out
    assert f"warning: skipped '{bad / 'results.json'}'" in printed.err


def test_bad_inputs_raise_user_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no results.json"):
        plot_curves.main([str(empty), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="does not exist"):
        plot_curves.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    only_bad = tmp_path / "bad" / "run"
    only_bad.mkdir(parents=True)
    (only_bad / "results.json").write_text("not json")
    with pytest.raises(UserError, match="none of the 1 results.json"):
        plot_curves.main([str(tmp_path / "bad"), "--out", str(tmp_path / "o")])


def test_script_exit_status_2_on_empty_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "analysis/plot_curves.py", str(empty), "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no results.json" in proc.stderr
    assert not (tmp_path / "o" / "double_win.csv").exists()


# --------------------------------------------------------------------------- mask statistics

def _ticket(path, masks, *, round_, pretrain, arch="resnet_tiny"):
    pu.save_ticket(path, pu.make_ticket(masks, round=round_, method="imp", retrain="st", arch=arch,
                                        pretrain=pretrain, init="x", source_dataset="imagenet"))
    return path


def _hand_masks():
    """Two 2-layer masks with known overlap and zero kernels."""
    a = {"conv1.weight": torch.ones(2, 2, 3, 3, dtype=torch.bool), "layer1.0.conv1.weight": torch.ones(4, 2, 1, 1, dtype=torch.bool)}
    b = {k: v.clone() for k, v in a.items()}
    a["conv1.weight"][0, 0] = False          # one 3x3 kernel fully pruned (9 weights)
    a["conv1.weight"][1, 1, 0, 0] = False    # one weight of another kernel
    b["conv1.weight"][0] = False             # two 3x3 kernels fully pruned (18 weights)
    b["layer1.0.conv1.weight"][:2] = False   # four 1x1 kernels (2 outputs x 2 inputs)
    return a, b


def test_mask_stats_iou_and_zero_kernels(tmp_path, capsys):
    a, b = _hand_masks()
    # 44 weights; pruned: a = conv1[0,0] (9) + one weight = 10, b = conv1[0] (18) + 4 1x1 weights = 22.
    # kept in both = 44 - |pruned a ∪ pruned b| = 44 - 23 = 21; kept in either = 44 - 9 = 35
    assert pu.mask_iou(a, b) == pytest.approx(21 / 35)
    ta = _ticket(tmp_path / "std" / "tickets" / "round_01.pt", a, round_=1, pretrain="std")
    tb = _ticket(tmp_path / "at" / "tickets" / "round_01.pt", b, round_=1, pretrain="at")
    _ticket(tmp_path / "at" / "tickets" / "round_02.pt", b, round_=2, pretrain="at")
    out = tmp_path / "out"
    assert mask_stats.main([str(tmp_path / "std"), str(tmp_path / "at"), "--out", str(out), "--heatmap", str(ta)]) == 0
    assert "differ in sparsity" in capsys.readouterr().err  # round 1 pairs a 22.73% with a 50% mask
    with open(out / "mask_iou.csv", newline="") as fh:
        iou = list(csv.DictReader(fh))
    assert len(iou) == 1  # round 2 has only one pre-training
    assert {iou[0]["label_a"], iou[0]["label_b"]} == {"std", "at"}
    assert float(iou[0]["iou"]) == pytest.approx(21 / 35)
    with open(out / "zero_kernels.csv", newline="") as fh:
        zk = {(r["label"], r["round"]): r for r in csv.DictReader(fh)}
    assert zk[("std", "1")]["zero_kernels"] == "1" and zk[("std", "1")]["kernels"] == "12"
    assert zk[("at", "1")]["zero_kernels"] == "6"  # 2 of conv1 + 4 of the 1x1 layer
    with open(out / "layer_sparsity.csv", newline="") as fh:
        layers = {(r["label"], r["round"], r["layer"]): r for r in csv.DictReader(fh)}
    assert float(layers[("at", "1", "layer1.0.conv1.weight")]["sparsity"]) == 50.0
    assert layers[("at", "1", "layer1.0.conv1.weight")]["zero_kernels"] == "4"
    heat = json.loads((out / f"heatmap_{mask_stats.heatmap_stem(ta)}.json").read_text())
    assert [layer["name"] for layer in heat["layers"]] == ["conv1.weight", "layer1.0.conv1.weight"]
    assert heat["layers"][0]["pruned"] == "1000"  # kernels in [out, in] order; a partly pruned one is kept
    assert heat["layers"][1]["pruned"] == "00000000"
    for png in ("mask_iou.png", "zero_kernels.png", f"heatmap_{mask_stats.heatmap_stem(ta)}.png"):
        assert (out / png).stat().st_size > 2000
    assert tb.exists()


def test_mask_stats_levels_by_sparsity_when_rounds_repeat(tmp_path, capsys):
    """Seed files at no 20% level all read as round 0; two such tickets of one label are told
    apart by sparsity instead of being refused as duplicates."""
    a, b = _hand_masks()
    for name, masks in (("p.pt", a), ("q.pt", b)):
        _ticket(tmp_path / "std" / name, masks, round_=0, pretrain="std")
    for name, masks in (("p.pt", a), ("q.pt", b)):
        _ticket(tmp_path / "at" / name, masks, round_=0, pretrain="at")
    out = tmp_path / "out"
    assert mask_stats.main([str(tmp_path / "std"), str(tmp_path / "at"), "--out", str(out)]) == 0
    with open(out / "mask_iou.csv", newline="") as fh:
        iou = list(csv.DictReader(fh))
    assert sorted(r["round"] for r in iou) == ["22.73", "50.0"]  # two levels, each pairing std with at
    assert all(float(r["iou"]) == 1.0 for r in iou)


def test_mask_stats_different_architectures_exit_2(tmp_path):
    a, _ = _hand_masks()
    other = {"conv1.weight": torch.ones(3, 2, 3, 3, dtype=torch.bool)}
    _ticket(tmp_path / "a.pt", a, round_=1, pretrain="std")
    _ticket(tmp_path / "b.pt", other, round_=1, pretrain="at", arch="resnet18")
    with pytest.raises(UserError, match="architecture"):
        mask_stats.main([str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(tmp_path / "out")])
    proc = subprocess.run([sys.executable, "analysis/mask_stats.py", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"),
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "architecture" in proc.stderr


def test_heatmap_of_a_resnet_ticket_marks_stages_and_bins_wide_layers(tmp_path):
    import models

    torch.manual_seed(0)
    model = models.build_model("resnet_tiny", 10, cifar_stem=True)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    mask = pu.prune_to_sparsity(weights, 90.0, base_mask=pu.full_mask(model))
    path = _ticket(tmp_path / "at" / "tickets" / "round_10.pt", mask, round_=10, pretrain="at")
    out = tmp_path / "out"
    mask_stats.main([str(tmp_path / "at"), "--out", str(out), "--heatmap", str(path), "--heatmap-width", "64"])
    heat = json.loads((out / "heatmap_at_round_10.json").read_text())
    names = [layer["name"] for layer in heat["layers"]]
    assert names == pu.prunable_names(model)
    assert [layer["stage"] for layer in heat["layers"]][:2] == ["stem", "layer1"]
    assert {layer["stage"] for layer in heat["layers"]} == {"stem", "layer1", "layer2", "layer3", "layer4"}
    widest = max(layer["kernels"] for layer in heat["layers"])  # layer4: 128 x 128 kernels
    assert heat["kernels_per_pixel"] == math.ceil(widest / 64)
    zk = pu.zero_kernels(mask)
    for layer in heat["layers"]:
        assert layer["zero_kernels"] == zk[layer["name"]][0] == layer["pruned"].count("1")
        assert len(layer["pruned"]) == zk[layer["name"]][1]
    assert (out / "heatmap_at_round_10.png").stat().st_size > 5000
    with open(out / "heatmap_at_round_10.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(names)
    # a single pre-training: nothing to compare, said so, not an error
    with open(out / "mask_iou.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == []


# --------------------------------------------------------------------------- grid awareness, support, hardening

def write_stage1(root, name, levels=LEVELS):
    """A stage-1 save dir as far as the analysis reads it: sparsity.json (the ticket files may be gone)."""
    d = Path(root) / name
    d.mkdir(parents=True)
    (d / "sparsity.json").write_text(json.dumps({str(k + 1): s for k, s in enumerate(levels)}))
    return d


def write_ticket_study(runs, stage1, pretrain):
    """write_at_study's numbers, each ticket run naming stage1/tickets/round_XX.pt."""
    write_level(runs, sparsity=0.0, pretrain=pretrain, **DENSE)
    for k, s in enumerate(LEVELS, start=1):
        ticket = str(stage1 / "tickets" / f"round_{k:02d}.pt")
        if s <= 89.26:
            vals = dict(st_sa=[90.5, 91.5, 92.5], at_sa=[81.0, 81.5, 82.0], at_ra=[49.0, 49.5, 50.0])
        else:
            vals = dict(st_sa=[88.9, 89.9, 90.9], at_sa=[81.0, 81.5, 82.0], at_ra=[49.0, 49.5, 50.0])
        write_level(runs, sparsity=s, pretrain=pretrain, ticket=ticket, **vals)


def _delete(runs, pattern):
    hits = list(runs.glob(pattern))
    assert hits, pattern
    for run in hits:
        (run / "results.json").unlink()


def test_missing_level_makes_its_row_incomplete_and_leaves_others_alone(tmp_path, capsys):
    runs = tmp_path / "runs"
    for pre in ("at", "std"):
        write_ticket_study(runs, write_stage1(tmp_path / "stage1", pre), pre)
    full = plot_curves.verdict_rows([str(runs)])
    assert [(r["pretrain"], r["extreme_sparsity"], r["verdict"]) for r in full] == [
        ("std", "89.26", "complete"), ("at", "89.26", "complete")]
    # every run of one level of the at row is gone: only sparsity.json still says it should exist
    _delete(runs, "*_at_imp_48.80_*")
    out = tmp_path / "out"
    assert plot_curves.main([str(runs), "--out", str(out), "--no-figures"]) == 0
    _, rows = read_table(out)
    at, std = row_for(rows, pretrain="at"), row_for(rows, pretrain="std")
    assert at["verdict"] == "incomplete" and at["extreme_sparsity"] == ""
    assert at["extreme_sparsity_contiguous"] == "36.00"  # the gap at 48.80 stops the contiguous run
    assert "48.80" not in at["double_win_levels"].split(";") and "89.26" in at["double_win_levels"].split(";")
    assert std == next(r for r in full if r["pretrain"] == "std")  # untouched by the other row's gap
    err = capsys.readouterr().err
    assert "warning: cifar10, data rate 1.0, pretrain at, method imp: level 48.80% has no result for " \
           "regime st seed(s) 1, 2, 3; regime at seed(s) 1, 2, 3." in err
    md = (out / "double_win.md").read_text()
    assert "## Missing runs" in md and "level 48.80% has no result" in md
    assert "extreme sparsity is withheld" in md
    with open(out / "double_win_details.csv", newline="") as fh:
        level = {r["sparsity"]: r for r in csv.DictReader(fh) if r["pretrain"] == "at"}["48.80"]
    assert level["judged"] == "False" and "missing runs" in level["note"]


def test_missing_seed_at_one_level_is_listed(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_ticket_study(runs, write_stage1(tmp_path / "stage1", "at"), "at")
    _delete(runs, "*_at_imp_20.00_st_s2")
    (row,) = plot_curves.verdict_rows([str(runs)])
    assert row["verdict"] == "incomplete" and row["extreme_sparsity"] == ""
    assert row["extreme_sparsity_contiguous"] == ""  # the very first level is not judged
    plot_curves.main([str(runs), "--out", str(tmp_path / "out"), "--no-figures"])
    assert "level 20.00% has no result for regime st seed(s) 2." in capsys.readouterr().err


def test_verdict_rows_match_the_csv(tmp_path):
    runs = tmp_path / "runs"
    write_at_study(runs)
    write_level(runs, sparsity=20.0, method="omp", st_sa=60.0, at_sa=82.0, at_ra=50.0)
    out = tmp_path / "out"
    plot_curves.main([str(runs), "--out", str(out), "--no-figures"])
    _, rows = read_table(out)
    assert plot_curves.verdict_rows([str(runs)]) == rows
    assert not list(tmp_path.glob("**/*.png"))


def test_no_baseline_verdict(tmp_path):
    runs = tmp_path / "runs"
    write_at_study(runs, pretrain="at")
    write_at_study(runs, pretrain="fat")
    _delete(runs, "*_fat_dense_0.00_at_s*")
    rows = {r["pretrain"]: r for r in plot_curves.verdict_rows([str(runs)])}
    assert rows["fat"]["verdict"] == "no-baseline" and rows["fat"]["extreme_sparsity_contiguous"] == ""
    assert rows["at"]["verdict"] == "complete"


def test_grid_records_are_the_expected_set(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    write_at_study(runs)
    grid = tmp_path / "grid.toml"
    grid.write_text("# read by the fake expected_runs\n")
    seen = []

    def expected_runs(path):
        seen.append(path)
        recs = []
        for s in [0.0] + LEVELS + [94.5]:  # 94.50: a level the grid asks for that never ran
            for regime in ("st", "at"):
                for seed in SEEDS:
                    name = f"cifar10_1.0_at_{'dense' if s == 0 else 'imp'}_{s:.2f}_{regime}_s{seed}"
                    recs.append({"dataset": "cifar10", "data_rate": 1.0, "pretrain": "at",
                                 "method": "dense" if s == 0 else "imp", "sparsity": s, "regime": regime,
                                 "seed": seed, "run_dir": str(runs / name)})
        return recs

    monkeypatch.setattr(study.grid, "expected_runs", expected_runs)
    out = tmp_path / "out"
    assert plot_curves.main([str(runs), "--out", str(out), "--grid", str(grid), "--no-figures"]) == 0
    assert seen == [str(grid)]
    _, rows = read_table(out)
    # 94.50 lies above the extreme: the extreme stands, the row says it is incomplete
    assert rows[0]["extreme_sparsity"] == "89.26" and rows[0]["verdict"] == "incomplete"
    assert "level 94.50% has no result for regime st seed(s) 1, 2, 3" in capsys.readouterr().err
    # without the grid nothing marks 94.50 as expected
    assert plot_curves.verdict_rows([str(runs)])[0]["verdict"] == "complete"


def test_plot_curves_does_not_need_sweep():
    code = "import sys, analysis.plot_curves; sys.exit('script.sweep' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # the grid model is study.grid, not the sweep's command line


def test_support_columns_on_a_known_tree(tmp_path):
    """Levels far above the dense band are supported; one on the band's edge is uncertain."""
    runs = tmp_path / "runs"
    write_level(runs, sparsity=0.0, **DENSE)
    write_level(runs, sparsity=20.0, st_sa=[97.0, 98.0, 99.0], at_sa=[88.0, 89.0, 90.0], at_ra=[56.0, 57.0, 58.0])
    write_level(runs, sparsity=36.0, st_sa=[97.0, 98.0, 99.0], at_sa=[88.0, 89.0, 90.0], at_ra=[56.0, 57.0, 58.0])
    write_level(runs, sparsity=48.8, st_sa=[90.5, 91.5, 92.5], at_sa=[81.0, 81.5, 82.0], at_ra=[49.0, 49.5, 50.0])
    write_level(runs, sparsity=59.04, st_sa=[60.0, 61.0, 62.0], at_sa=[88.0, 89.0, 90.0], at_ra=[56.0, 57.0, 58.0])
    out = tmp_path / "out"
    plot_curves.main([str(runs), "--out", str(out)])
    _, (row,) = read_table(out)
    assert (row["extreme_sparsity"], row["extreme_sparsity_contiguous"], row["extreme_sparsity_supported"]) == (
        "48.80", "48.80", "36.00")
    with open(out / "double_win_details.csv", newline="") as fh:
        levels = {r["sparsity"]: r for r in csv.DictReader(fh)}
    assert float(levels["20.00"]["double_win_support"]) == 1.0 and levels["20.00"]["support"] == "supported"
    assert levels["48.80"]["support"] == "uncertain" and 0.1 < float(levels["48.80"]["double_win_support"]) < 0.9
    assert float(levels["48.80"]["st_sa_support"]) == pytest.approx(0.7545, abs=1e-4)
    assert levels["59.04"]["support"] == "contradicted" and float(levels["59.04"]["st_sa_support"]) == 0.0
    md = (out / "double_win.md").read_text()
    assert "win? (" in md and "**?** marks an uncertain cell" in md
    assert "win (1.00)" in md and "no (0.00)" in md
    with open(out / "curves_cifar10_rate100_imp.csv", newline="") as fh:
        drawn = {r["sparsity"]: r for r in csv.DictReader(fh) if r["series"] == "at imp" and r["panel"] == "st_sa"}
    assert float(drawn["48.80"]["double_win_support"]) == float(levels["48.80"]["double_win_support"])


def test_mixed_attack_settings_in_one_cell_are_refused(tmp_path):
    runs = tmp_path / "runs"
    write_at_study(runs)
    for path in runs.glob("*/results.json"):
        obj = json.loads(path.read_text())
        obj["config"].update(eps=8 / 255, alpha=2 / 255, train_steps=10, test_eps=8 / 255, test_steps=20)
        if "_20.00_at_s3" in str(path):
            obj["config"].update(eps=4 / 255, test_eps=4 / 255)
        path.write_text(json.dumps(obj))
    with pytest.raises(UserError) as err:
        plot_curves.main([str(runs), "--out", str(tmp_path / "out"), "--no-figures"])
    msg = str(err.value)
    assert "level 20.00%" in msg and "regime at" in msg and "eps 0.0156863 (= 4/255)" in msg
    assert "cifar10_1.0_at_imp_20.00_at_s3" in msg and "cifar10_1.0_at_imp_20.00_at_s1" in msg
    proc = subprocess.run([sys.executable, "analysis/plot_curves.py", str(runs), "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "different attack settings" in proc.stderr
    assert not (tmp_path / "o" / "double_win.csv").exists()
    # ST trains without an attack: a different training ε under ST is no conflict
    for path in runs.glob("*_20.00_*/results.json"):
        obj = json.loads(path.read_text())
        obj["config"].update(eps=8 / 255, test_eps=8 / 255)
        if "_st_s3" in str(path):
            obj["config"].update(eps=4 / 255, train_steps=3)
        path.write_text(json.dumps(obj))
    assert plot_curves.verdict_rows([str(runs)])[0]["extreme_sparsity"] == "89.26"


def test_accuracies_outside_percent_are_skipped(tmp_path):
    runs = tmp_path / "runs"
    write_at_study(runs)
    bad = write_result(runs, sparsity=20.0, regime="at", seed=4, sa=0.91, ra=150.0, name="fraction_ra")
    out = tmp_path / "out"
    plot_curves.main([str(runs), "--out", str(out), "--no-figures"])
    warnings = (out / "warnings.txt").read_text()
    assert f"skipped '{bad / 'results.json'}'" in warnings and "outside [0, 100]" in warnings
    assert read_table(out)[1][0]["extreme_sparsity"] == "89.26"


def test_unreadable_ticket_is_a_skipped_run(tmp_path):
    runs = tmp_path / "runs"
    write_at_study(runs)
    for content, name in ((b"", "empty.pt"), (b"not a torch file\n", "text.pt")):
        ticket = tmp_path / name
        ticket.write_bytes(content)
        write_result(runs, sparsity=20.0, regime="st", seed=9, sa=91.0, ticket=str(ticket), name=f"run_{name}")
    out = tmp_path / "out"
    assert plot_curves.main([str(runs), "--out", str(out), "--no-figures"]) == 0
    warnings = (out / "warnings.txt").read_text()
    assert f"its ticket '{tmp_path / 'empty.pt'}' is empty" in warnings
    assert f"its ticket '{tmp_path / 'text.pt'}' is not a torch file" in warnings
    assert read_table(out)[1][0]["extreme_sparsity"] == "89.26"


def test_grid_of_the_real_sweep(tmp_path, capsys):
    """plot_curves --grid with the grid model's own expected_runs (study.grid) on a small finished grid."""
    stage1 = tmp_path / "stage1"
    masks = {"conv1.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)}
    levels = {1: 20.0, 2: 36.0, 3: 48.8}
    for r in levels:
        pu.save_ticket(stage1 / "tickets" / f"round_{r:02d}.pt",
                       pu.make_ticket(masks, round=r, method="imp", retrain="st", arch="resnet_tiny", pretrain="at",
                                      init="x", source_dataset="digits"))
    (stage1 / "sparsity.json").write_text(json.dumps({str(k): v for k, v in levels.items()}))
    (stage1 / "config.json").write_text(json.dumps({"method": "imp", "retrain": "st"}))
    grid = tmp_path / "grid.toml"
    grid.write_text('out = "runs"\n[pretrain.at]\ninit = "none"\ntickets = ["stage1"]\n'
                    '[axes]\ndataset = ["digits"]\nregime = ["st", "at"]\nseed = [1, 2]\n')
    records = study.grid.expected_runs(str(grid))
    assert len(records) == 4 * 2 * 2
    round_of = {v: k for k, v in levels.items()}
    for rec in records:
        if rec["sparsity"] == 36.0 and rec["regime"] == "at" and rec["seed"] == 2:
            continue  # never ran
        dense = rec["sparsity"] == 0.0
        sa = 90.0 if dense else 95.0
        obj = {"dataset": rec["dataset"], "arch": "resnet_tiny", "pretrain": rec["pretrain"], "init": "none",
               "ticket": None if dense else str(stage1 / "tickets" / f"round_{round_of[rec['sparsity']]:02d}.pt"),
               "method": "dense" if dense else rec["method"], "sparsity": rec["sparsity"], "regime": rec["regime"],
               "data_rate": rec["data_rate"], "seed": rec["seed"], "sa": sa, "ra": 40.0 if rec["regime"] == "at" else None,
               "config": {}}
        Path(rec["run_dir"]).mkdir(parents=True)
        (Path(rec["run_dir"]) / "results.json").write_text(json.dumps(obj))
    out = tmp_path / "out"
    assert plot_curves.main([str(tmp_path / "runs"), "--out", str(out), "--grid", str(grid), "--no-figures"]) == 0
    (row,) = read_table(out)[1]
    assert (row["extreme_sparsity"], row["double_win_levels"], row["verdict"]) == ("", "20.00;48.80", "incomplete")
    assert row["extreme_sparsity_contiguous"] == "20.00"
    assert "level 36.00% has no result for regime at seed(s) 2." in capsys.readouterr().err


def test_linear_evaluation_runs_stay_out_of_the_double_win_verdict(tmp_path):
    write_level(tmp_path, sparsity=0.0, **DENSE)
    write_level(tmp_path, sparsity=20.0, st_sa=95.0, at_sa=85.0, at_ra=55.0)
    # a linear-evaluation run far below the dense band would flip the level if it were averaged in
    run = write_result(tmp_path, method="imp", sparsity=20.0, regime="st", seed=9, sa=10.0, name="linear")
    obj = json.loads((run / "results.json").read_text())
    obj["config"]["linear_eval"] = True
    (run / "results.json").write_text(json.dumps(obj))
    runs, warnings = plot_curves.load_runs([tmp_path])
    assert all(r.path.parent.name != "linear" for r in runs)
    assert any("linear-evaluation" in w for w in warnings)
    runs, _ = plot_curves.load_runs([tmp_path], linear_eval=True)
    assert any(r.path.parent.name == "linear" for r in runs)


def test_structured_tickets_get_their_own_verdict_row(tmp_path):
    """Channel and unstructured OMP tickets of one pre-training are two rows, never one curve."""
    import models
    model = models.build_model("resnet_tiny", 5, cifar_stem=True)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    full = pu.full_mask(model)
    tickets = {}
    for pattern, mask in (("unstructured", pu.global_magnitude_prune(weights, full, 0.2)),
                          ("channel", pu.channel_prune(weights, full, 0.2))):
        t = pu.make_ticket(mask, round=1, method="omp", retrain=None, arch="resnet_tiny", pretrain="at",
                           init="θ_p.pt", source_dataset="digits", pattern=pattern)
        path = tmp_path / "tickets" / pattern / "round_01.pt"
        pu.save_ticket(path, t)
        tickets[pattern] = (path, round(float(t["sparsity"]), 2))
    runs_dir = tmp_path / "runs"
    write_level(runs_dir, sparsity=0.0, **DENSE)
    for pattern, (path, s) in tickets.items():
        for seed in SEEDS:
            write_result(runs_dir, method="omp", sparsity=s, regime="st", seed=seed, sa=93.0, ticket=str(path),
                         name=f"{pattern}_st_{seed}")
            write_result(runs_dir, method="omp", sparsity=s, regime="at", seed=seed, sa=83.0, ra=51.0,
                         ticket=str(path), name=f"{pattern}_at_{seed}")
    rows = plot_curves.verdict_rows([runs_dir])
    assert sorted(r["method"] for r in rows) == ["omp", "omp_channel"]


def test_heatmap_names_a_replicated_search_by_its_parent_too():
    from analysis import mask_stats

    assert mask_stats.heatmap_stem(Path("/o/tickets/at_imp/r2/tickets/round_03.pt")) == "at_imp_r2_round_03"
    assert mask_stats.heatmap_stem(Path("/o/tickets/at_imp/tickets/round_03.pt")) == "at_imp_round_03"
