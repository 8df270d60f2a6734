"""analysis/plot_companion.py: the companion paper's figures from a synthetic results tree."""

import contextlib
import csv
import io
import json
import statistics
from pathlib import Path

import pytest
import torch

import pruning_utils as pu
from analysis import plot_companion
from utils.cli import run_main

SEEDS = (1, 2, 3)
CONV1, CONV2 = "layer1.0.conv1.weight", "layer1.0.conv2.weight"


def unstructured_masks():
    g = torch.Generator().manual_seed(0)
    return {name: torch.rand(4, 4, 3, 3, generator=g) > 0.5 for name in (CONV1, CONV2)}


def channel_masks():
    """Filter 0 of the block's first conv removed, and the second conv's input channel it fed."""
    a, b = torch.ones(4, 4, 3, 3, dtype=torch.bool), torch.ones(4, 4, 3, 3, dtype=torch.bool)
    a[0] = False
    b[:, 0] = False
    return {CONV1: a, CONV2: b}


def write_ticket(path, *, method, pattern="unstructured", rewind="theta_p", pretrain="at"):
    masks = channel_masks() if pattern == "channel" else unstructured_masks()
    ticket = pu.make_ticket(masks, round=1, method=method, retrain=None if method in ("omp", "rp") else "st",
                            arch="resnet50", pretrain=pretrain, init="init.pt", source_dataset="imagenet",
                            pattern=pattern, rewind=rewind)
    pu.save_ticket(path, ticket)
    return path


def write_result(root, *, pretrain, method, sparsity, seed, sa, ra, ticket=None, linear=False, regime="st",
                 arch="resnet50", dataset="cifar10"):
    tag = Path(ticket).stem if ticket else "dense"
    run = Path(root) / f"{pretrain}_{tag}_{sparsity:.2f}_{regime}_{'lin' if linear else 'ft'}_s{seed}"
    run.mkdir(parents=True)
    obj = {"dataset": dataset, "arch": arch, "pretrain": pretrain, "init": "init.pt",
           "ticket": None if ticket is None else str(ticket), "method": method, "sparsity": float(sparsity),
           "regime": regime, "data_rate": 1.0, "seed": seed, "sa": sa, "ra": ra, "selected_epoch": 1,
           "selection": "val_sa", "history": [],
           "config": {"dataset": dataset, "arch": arch, "seed": seed, "linear_eval": linear, "image_size": 224,
                      "ticket": None if ticket is None else str(ticket)},
           "git": None}
    (run / "results.json").write_text(json.dumps(obj))


# (pretrain, ticket file stem, method, pattern, rewind): one ticket per kind and pre-training
KINDS = [("at", "omp_unstructured", "omp", "unstructured", "theta_p"),
         ("std", "omp_unstructured", "omp", "unstructured", "theta_p"),
         ("at", "omp_channel", "omp", "channel", "theta_p"),
         ("at", "imp_rewind", "imp", "unstructured", "theta_p"),
         ("at", "imp_norewind", "imp", "unstructured", "none")]
LEVELS = (20.0, 50.0, 91.41, 95.6)


def accuracy(kind_index, pretrain, linear, sparsity, seed):
    """Distinct, seed-dependent numbers for every cell, so a mix-up of cells changes a mean."""
    base = 60.0 - 0.3 * sparsity + 1.7 * kind_index + (3.0 if pretrain == "at" else 0.0) - (9.0 if linear else 0.0)
    sa = round(base + 0.9 * seed + 0.13 * seed * seed, 4)
    return sa, round(sa / 2 - 0.4 * seed, 4)


def build_tree(root):
    """Results of every kind, full fine-tuning and linear evaluation, and the dense baselines;
    returns {(pattern, method, rewind, pretrain, linear_eval, sparsity): (SA values, RA values)}."""
    root = Path(root)
    tickets = root / "tickets"
    tickets.mkdir(parents=True)
    expected = {}
    for i, (pretrain, stem, method, pattern, rewind) in enumerate(KINDS):
        ticket = write_ticket(tickets / f"{pretrain}_{stem}.pt", method=method, pattern=pattern, rewind=rewind,
                              pretrain=pretrain)
        for linear in (False, True):
            for s in LEVELS:
                sas, ras = [], []
                for seed in SEEDS:
                    sa, ra = accuracy(i, pretrain, linear, s, seed)
                    write_result(root / "runs", pretrain=pretrain, method=method, sparsity=s, seed=seed, sa=sa, ra=ra,
                                 ticket=ticket, linear=linear)
                    sas.append(sa)
                    ras.append(ra)
                expected[(pattern, method, rewind, pretrain, linear, s)] = (sas, ras)
    for pretrain in ("at", "std"):
        for linear in (False, True):
            sas, ras = [], []
            for seed in SEEDS:
                sa, ra = accuracy(9, pretrain, linear, 0.0, seed)
                write_result(root / "runs", pretrain=pretrain, method="dense", sparsity=0.0, seed=seed, sa=sa, ra=ra,
                             linear=linear)
                sas.append(sa)
                ras.append(ra)
            expected[("", "dense", "", pretrain, linear, 0.0)] = (sas, ras)
    return expected


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def cell_of(row):
    return (row["pattern"], row["method"], row["rewind"], row["pretrain"], row["linear_eval"] == "True",
            float(row["sparsity"]))


def check_numbers(rows, expected):
    """Every row's mean and std are those of its cell's seeds (sample std); returns the cells seen."""
    seen = set()
    for row in rows:
        key = cell_of(row)
        sas, ras = expected[key]
        values = sas if row["metric"] == "sa" else ras
        assert float(row["mean"]) == pytest.approx(statistics.mean(values), abs=1e-6), row
        assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-6), row
        assert row["n"] == "3" and row["seeds"] == "1;2;3"
        seen.add((key, row["metric"]))
    return seen


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("companion")
    expected = build_tree(root)
    out = root / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert plot_companion.main([str(root / "runs"), "--out", str(out)]) == 0
    return root, expected, out, printed.getvalue()


def test_pattern_figures_hold_the_cell_means_and_stds(analysed):
    _, expected, out, _ = analysed
    for pattern in ("unstructured", "channel"):
        name = f"companion_pattern_cifar10_rate100_{pattern}"
        assert (out / f"{name}.png").stat().st_size > 10_000
        rows = read_csv(out / f"{name}.csv")
        assert {r["range"] for r in rows} == {"full"} and {r["pattern"] for r in rows} <= {pattern, ""}
        seen = check_numbers(rows, expected)
        # every ticket cell of the pattern at every level, SA and RA, both evaluation modes, and the
        # dense lines of the pre-trainings drawn
        want = {(k, m) for k in expected if k[0] == pattern for m in ("sa", "ra")}
        pretrains = {k[3] for k in expected if k[0] == pattern}
        want |= {(k, m) for k in expected if k[1] == "dense" and k[3] in pretrains for m in ("sa", "ra")}
        assert seen == want
        # robust and natural pre-training on the same axes: both labels in one panel
        if pattern == "unstructured":
            panel = [r for r in rows if r["panel"] == "full_st_sa"]
            assert {r["pretrain"] for r in panel} == {"at", "std"}
            assert {r["series"] for r in panel} >= {"at imp", "at imp no-rewind", "at omp", "std omp",
                                                    "at dense", "std dense"}


def test_zoom_csv_holds_only_levels_between_90_and_99(analysed):
    _, expected, out, _ = analysed
    rows = read_csv(out / "companion_pattern_cifar10_rate100_unstructured_zoom.csv")
    assert rows and {r["range"] for r in rows} == {"zoom"}
    assert {float(r["sparsity"]) for r in rows} == {91.41, 95.6}
    seen = check_numbers(rows, expected)
    assert seen == {(k, m) for k in expected if k[0] == "unstructured" and 90 <= k[5] <= 99 for m in ("sa", "ra")}


def test_linear_evaluation_and_fine_tuning_are_separate_panels(analysed):
    _, _, out, _ = analysed
    rows = read_csv(out / "companion_pattern_cifar10_rate100_channel.csv")
    panels = {r["panel"] for r in rows}
    assert panels == {"full_st_sa", "full_st_ra", "linear_st_sa", "linear_st_ra"}
    for r in rows:
        assert r["panel"].startswith("linear") == (r["linear_eval"] == "True")


def test_method_figure_compares_patterns_and_keeps_imp_variants_apart(analysed):
    _, expected, out, _ = analysed
    # OMP was run with two patterns; IMP with one (its two rewinding variants are two lines)
    rows = read_csv(out / "companion_method_cifar10_rate100_omp.csv")
    assert {r["pattern"] for r in rows if r["kind"] == "ticket"} == {"unstructured", "channel"}
    check_numbers(rows, expected)
    assert not list(out.glob("companion_method_*imp*"))
    summary = read_csv(out / "companion_summary.csv")
    imp = {(r["rewind"], r["linear_eval"], r["sparsity"]) for r in summary if r["method"] == "imp"}
    assert len(imp) == 2 * 2 * len(LEVELS)
    assert (out / "companion_warnings.txt").read_text() == ""


def test_no_bench_skips_the_efficiency_figure_with_a_note(analysed):
    _, _, out, printed = analysed
    assert "note: no --bench record given" in printed
    assert not list(out.glob("companion_efficiency_*"))


def fake_record(path, arch="resnet50"):
    rows = [{"variant": "dense", "params": 100, "flops_per_image": 8.0e9, "latency_ms": 150.0,
             "throughput_images_per_s": 7.0},
            {"variant": "unstructured_90", "sparsity": 90.0, "flops_per_image": 8.0e9, "latency_ms": 149.0,
             "throughput_images_per_s": 7.1},
            {"variant": "channel_50", "sparsity": 51.5, "filter_sparsity": 50.0, "flops_per_image": 3.5e9,
             "latency_ms": 90.0, "throughput_images_per_s": 11.0},
            {"variant": "channel_90", "sparsity": 90.6, "filter_sparsity": 90.0, "flops_per_image": 1.5e9,
             "latency_ms": 45.0, "throughput_images_per_s": 15.0},
            # the masked twin runs dense kernels: never matched to a ticket
            {"variant": "nm_2:4_masked", "sparsity": 50.0, "flops_per_image": 8.0e9, "latency_ms": 1.0}]
    path.write_text(json.dumps({"device": "Test CPU", "arch": arch, "image_size": 224, "rows": rows}))
    return path


def test_bench_record_makes_the_efficiency_figure(tmp_path, capsys):
    expected = build_tree(tmp_path)
    bench = fake_record(tmp_path / "cpu.json")
    other = fake_record(tmp_path / "r18.json", arch="resnet18")
    out = tmp_path / "out"
    assert plot_companion.main([str(tmp_path / "runs"), "--out", str(out), "--bench", str(bench), str(other)]) == 0
    # a record of another network times nothing these runs trained: no figure, and the reason
    assert not list(out.glob("companion_efficiency_*r18*"))
    assert "record arch resnet18, runs resnet50" in capsys.readouterr().err
    name = "companion_efficiency_cifar10_rate100_cpu"
    assert (out / f"{name}.png").stat().st_size > 10_000
    rows = read_csv(out / f"{name}.csv")
    check_numbers(rows, expected)
    by_variant = {}
    for r in rows:
        by_variant.setdefault(r["bench_variant"], set()).add((r["pattern"] or "dense", float(r["sparsity"])))
        want_x = float(r["latency_ms"]) if r["axis"] == "latency_ms" else float(r["flops_per_image"])
        assert float(r["x"]) == want_x
    # nearest row within 2 points of the level and of the ticket's pattern; 91.41% unstructured
    # takes unstructured_90 (1.41 points), 50% channel takes channel_50 (1.5), 91.41% channel
    # channel_90 (0.81); 20% and 95.6% have no row that close, 50% unstructured none of its pattern
    assert by_variant == {"dense": {("dense", 0.0)}, "unstructured_90": {("unstructured", 91.41)},
                          "channel_50": {("channel", 50.0)}, "channel_90": {("channel", 91.41)}}
    lat = {(r["pattern"], r["pretrain"], r["linear_eval"], r["metric"], float(r["sparsity"])): float(r["x"])
           for r in rows if r["axis"] == "latency_ms"}
    assert lat[("channel", "at", "False", "sa", 50.0)] == 90.0
    assert {r["axis"] for r in rows} == {"latency_ms", "flops_per_image"}
    warnings = (out / "companion_warnings.txt").read_text()
    assert "have no row of" in warnings and "20.00%" in warnings


def test_match_bench_rules(tmp_path):
    record = plot_companion.load_bench(fake_record(tmp_path / "b.json"))
    assert [r.variant for r in record.rows] == ["dense", "unstructured_90", "channel_50", "channel_90"]
    row, gap = plot_companion.match_bench(record, "channel", "", 89.0, {"resnet50"}, 2.0)
    assert row.variant == "channel_90" and gap == pytest.approx(1.6)
    assert plot_companion.match_bench(record, "channel", "", 89.0, {"resnet50"}, 1.0) is None
    assert plot_companion.match_bench(record, "channel", "", 90.6, {"resnet18"}, 2.0) is None
    assert plot_companion.match_bench(record, "nm", "2:4", 50.0, {"resnet50"}, 2.0) is None


def test_unreadable_or_missing_ticket_is_a_skipped_run(tmp_path, capsys):
    build_tree(tmp_path)
    # a stage-1 config naming the re-training kind: plot_curves' reader then leaves the ticket
    # files unopened, so the damaged one is found by the pattern reader
    (tmp_path / "config.json").write_text(json.dumps({"method": "omp", "retrain": "st"}))
    bad = tmp_path / "tickets" / "at_omp_channel.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    gone = tmp_path / "tickets" / "at_imp_norewind.pt"
    gone.unlink()
    out = tmp_path / "out"
    assert plot_companion.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    warnings = (out / "companion_warnings.txt").read_text()
    assert str(bad) in warnings and "does not exist" in warnings
    summary = read_csv(out / "companion_summary.csv")
    assert {r["pattern"] for r in summary} == {"unstructured", "dense"}
    assert {r["rewind"] for r in summary} == {"theta_p", ""}
    assert not (out / "companion_pattern_cifar10_rate100_channel.png").exists()


def test_version_1_ticket_reads_as_unstructured(tmp_path):
    ticket = pu.make_ticket(unstructured_masks(), round=1, method="imp", retrain="at", arch="resnet50",
                            pretrain="at", init="i", source_dataset="imagenet")
    for key in ("pattern", "rewind"):
        del ticket[key]
    ticket["version"] = 1
    torch.save(ticket, tmp_path / "v1.pt")
    for seed in SEEDS:
        write_result(tmp_path / "runs", pretrain="at", method="imp", sparsity=91.41, seed=seed, sa=70.0 + seed,
                     ra=None, ticket=tmp_path / "v1.pt")
    out = tmp_path / "out"
    assert plot_companion.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    rows = read_csv(out / "companion_pattern_cifar10_rate100_unstructured.csv")
    # no run evaluated RA: SA panels only
    assert {(r["pattern"], r["rewind"], r["metric"], r["mean"]) for r in rows} == {("unstructured", "theta_p", "sa",
                                                                                     "72.0")}


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        run_main(plot_companion.main, [str(tmp_path / "empty"), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no results.json found") and "\n" not in err

    build_tree(tmp_path / "tree")
    runs = str(tmp_path / "tree" / "runs")
    (tmp_path / "notes.json").write_text(json.dumps({"hello": 1}))
    for bench in (tmp_path / "absent.json", tmp_path / "notes.json"):
        with pytest.raises(SystemExit) as exc:
            run_main(plot_companion.main, [runs, "--out", str(out), "--bench", str(bench)])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert str(bench) in err and "\n" not in err
    # dense runs alone, or ticket runs whose tickets are all gone: nothing to draw
    for seed in SEEDS:
        write_result(tmp_path / "dense", pretrain="at", method="dense", sparsity=0.0, seed=seed, sa=80.0, ra=None)
    with pytest.raises(SystemExit) as exc:
        run_main(plot_companion.main, [str(tmp_path / "dense"), "--out", str(out)])
    assert exc.value.code == 2 and "no ticket run is usable" in capsys.readouterr().err
    assert not out.exists()


def test_nm_ticket_takes_the_semi_structured_row_never_its_dense_twin(tmp_path):
    g = torch.Generator().manual_seed(1)
    weights = {name: torch.randn(4, 4, 3, 3, generator=g) for name in (CONV1, CONV2)}
    full = {name: torch.ones(4, 4, 3, 3, dtype=torch.bool) for name in weights}
    ticket = pu.make_ticket(pu.nm_prune(weights, full, 2, 4), round=1, method="omp", retrain=None, arch="resnet50",
                            pretrain="at", init="i", source_dataset="imagenet", pattern="nm", nm=[2, 4])
    pu.save_ticket(tmp_path / "nm.pt", ticket)
    for seed in SEEDS:
        write_result(tmp_path / "runs", pretrain="at", method="omp", sparsity=50.0, seed=seed, sa=60.0 + seed, ra=None,
                     ticket=tmp_path / "nm.pt")
    rows = [{"variant": "nm_2:4_masked", "sparsity": 50.0, "flops_per_image": 8e9, "latency_ms": 150.0},
            {"variant": "nm_2:4", "sparsity": 49.5, "flops_per_image": 8e9, "latency_ms": 80.0}]
    bench = tmp_path / "gpu.json"
    bench.write_text(json.dumps({"device": "GPU", "arch": "resnet50", "rows": rows}))
    out = tmp_path / "out"
    assert plot_companion.main([str(tmp_path / "runs"), "--out", str(out), "--bench", str(bench)]) == 0
    curves = read_csv(out / "companion_pattern_cifar10_rate100_nm2_4.csv")
    assert {(r["pattern"], r["nm"], r["mean"]) for r in curves} == {("nm", "2:4", "62.0")}
    eff = read_csv(out / "companion_efficiency_cifar10_rate100_gpu.csv")
    assert {(r["bench_variant"], r["axis"], r["x"]) for r in eff} == {("nm_2:4", "latency_ms", "80.0"),
                                                                      ("nm_2:4", "flops_per_image", "8000000000.0")}
