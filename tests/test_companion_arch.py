"""Issue 24: architectures and IMP's rewind variants are never one line (companion figures and plot_curves)."""

import csv

import pytest
import torch

import pruning_utils as pu
from analysis import plot_companion, plot_curves
from tests.test_analysis import DENSE, read_table, write_level, write_result
from tests.test_companion import write_result as write_companion_result
from tests.test_companion import write_ticket
from utils.cli import run_main


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_companion_two_architectures_are_two_lines(tmp_path):
    ticket = write_ticket(tmp_path / "omp.pt", method="omp")
    # the same setting, ResNet-50 scoring 10 points above ResNet-18: one average would read 65
    for arch, base in (("resnet18", 60.0), ("resnet50", 70.0)):
        for seed in (1, 2):
            for s, sa in ((0.0, base + 5), (50.0, base)):
                write_companion_result(tmp_path / "runs" / arch, pretrain="at", method="dense" if s == 0 else "omp",
                                       sparsity=s, seed=seed, sa=sa + seed, ra=None, arch=arch,
                                       ticket=None if s == 0 else ticket)
    out = tmp_path / "out"
    plot_companion.analyse([str(tmp_path / "runs")], out)
    rows = [r for r in read_csv(out / "companion_summary.csv") if r["method"] == "omp"]
    assert sorted((r["arch"], r["sa_mean"]) for r in rows) == [("resnet18", "61.5"), ("resnet50", "71.5")]
    for arch, ticket_mean, dense_mean in (("resnet18", "61.5", "66.5"), ("resnet50", "71.5", "76.5")):
        drawn = read_csv(out / f"companion_pattern_cifar10_rate100_{arch}_unstructured.csv")
        assert {r["arch"] for r in drawn} == {arch}
        assert {(r["kind"], r["mean"]) for r in drawn} == {("ticket", ticket_mean), ("dense", dense_mean)}
    assert not (out / "companion_pattern_cifar10_rate100_unstructured.csv").exists()


def test_plot_curves_refuses_a_line_of_two_architectures(tmp_path, capsys):
    root = tmp_path / "runs"
    write_level(root, sparsity=0.0, **DENSE)
    write_level(root, sparsity=20.0, st_sa=92.0, at_sa=82.0, at_ra=50.0)
    for seed in (4, 5):
        write_result(root, method="imp", sparsity=20.0, regime="st", seed=seed, sa=91.0, arch="resnet18")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:  # asked to draw them together anyway: still refused
        run_main(plot_curves.main, [str(root), "--out", str(out), "--mix-protocols"])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "mix architectures (resnet18" in lines[0] and "resnet50" in lines[0]
    assert not out.exists()


def test_plot_curves_keeps_imp_rewind_variants_apart(tmp_path):
    mask = {"conv1.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)}
    mask["conv1.weight"][0] = False
    root = tmp_path / "runs"
    write_level(root, sparsity=0.0, **DENSE)
    for rewind, st_sa in (("theta_p", 92.0), ("none", 50.0)):
        path = tmp_path / f"ticket_{rewind}.pt"
        pu.save_ticket(path, pu.make_ticket(mask, round=1, method="imp", retrain="st", arch="resnet50",
                                            pretrain="at", init="x", source_dataset="imagenet", rewind=rewind))
        for seed in (1, 2, 3):
            write_result(root, method="imp", sparsity=20.0, regime="st", seed=seed, sa=st_sa, ticket=str(path),
                         name=f"{rewind}_st_{seed}")
            write_result(root, method="imp", sparsity=20.0, regime="at", seed=seed, sa=82.0, ra=50.0,
                         ticket=str(path), name=f"{rewind}_at_{seed}")
    out = tmp_path / "out"
    plot_curves.main([str(root), "--out", str(out)])
    _, rows = read_table(out)
    assert sorted(r["method"] for r in rows) == ["imp", "imp-norewind"]
    assert next(r for r in rows if r["method"] == "imp")["extreme_sparsity"] == "20.00"
    assert next(r for r in rows if r["method"] == "imp-norewind")["extreme_sparsity"] == ""
    assert (out / "curves_cifar10_rate100_imp-norewind.png").exists()
