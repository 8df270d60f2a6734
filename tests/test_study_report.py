"""The grids of Figs. 2/6/A9, 7/A8 and Table A2, and analysis/study_report.py on a small study: its
figures analysed from the grids' own runs and paper_vs_ours.md with the published numbers beside ours."""

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import pruning_utils as pu
import study.grid
from analysis import paper_vs_ours as pvo
from analysis import robustness, study_report
from tests.test_analysis_robustness import tiny_run  # noqa: F401  (the trained ticket, a fixture)
from utils.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
GRIDS = REPO / "script" / "grids"
ALL_ROUNDS = range(1, 20)
# a tiny "architecture": enough weights that a ticket's sparsity is exact to 0.01%
SHAPES = {"conv1.weight": (16, 3, 3, 3), "layer1.0.conv1.weight": (64, 64, 3, 3),
          "layer1.0.conv2.weight": (64, 64, 3, 3)}


def _level(k):
    return round(100 * (1 - 0.8 ** k), 2)


def _mask(style, sparsity, seed):
    """Per-layer masks at ``sparsity``: 'kernel' keeps whole kernels (many zero kernels), 'random' any
    weights, 'spread' one weight per kernel before a second (few zero kernels)."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, shape in SHAPES.items():
        numel = int(torch.tensor(shape).prod())
        group = shape[2] * shape[3] if len(shape) == 4 else 1
        kernels = numel // group
        rank = torch.randperm(kernels, generator=gen).repeat_interleave(group)
        within = torch.arange(numel) % group  # a weight's place in its kernel
        score = {"kernel": rank * group + within, "spread": within * kernels + rank,
                 "random": torch.randperm(numel, generator=gen)}[style]
        keep = round(numel * (1 - sparsity / 100))
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.argsort(score)[:keep]] = True
        masks[name] = flat.reshape(shape)
    return masks


def _stage1_dir(root, rel, rounds, style=None, seed=0):
    """A stage-1 --save-dir in the real format: config.json, sparsity.json and tickets/round_XX.pt
    (real tickets with ``style``, else empty files as far as the grid reads them)."""
    d = root / rel
    (d / "tickets").mkdir(parents=True, exist_ok=True)
    label, _, kind = d.name.partition("_")
    method, retrain = {"imp_st": ("imp", "st"), "imp_at": ("imp", "at"), "omp": ("omp", None), "rp": ("rp", None)}[kind]
    (d / "config.json").write_text(json.dumps({"method": method, "retrain": retrain}))
    (d / "sparsity.json").write_text(json.dumps({str(k): _level(k) for k in rounds}))
    for k in rounds:
        path = d / "tickets" / f"round_{k:02d}.pt"
        if style is None:
            path.write_bytes(b"")
        else:
            pu.save_ticket(path, pu.make_ticket(_mask(style, _level(k), seed=100 * seed + k), round=k, method=method,
                                                retrain=retrain, arch="resnet_tiny", pretrain=label, init="x",
                                                source_dataset="imagenet"))


def _inputs_of(root, names, rounds=ALL_ROUNDS):
    """Every θ_p file and stage-1 directory the named grids name, below ``root``; the grids copied there."""
    (root / "weights").mkdir(exist_ok=True)
    for name in names:
        spec = tomllib.loads((GRIDS / f"{name}.toml").read_text(encoding="utf-8"))
        for table in spec["pretrain"].values():
            (root / table["init"]).write_bytes(b"")
            for t in table["tickets"]:
                if not (root / t).exists():
                    _stage1_dir(root, t, rounds)
        shutil.copy(GRIDS / f"{name}.toml", root / f"{name}.toml")


def _dirs(root, name):
    return {str(r.run_dir) for r in study.grid.expand(study.grid.load_grid(root / f"{name}.toml"))}


def test_the_new_grids_load_expand_and_share_the_study_tree(tmp_path):
    _inputs_of(tmp_path, ("fig3", "fig4", "fig5", "fig6", "fig7", "table_a2"))
    tree = tmp_path / "runs" / "study"
    fig6 = study.grid.expand(study.grid.load_grid(tmp_path / "fig6.toml"))
    assert len(fig6) == 9 and all(r.flags.get("save_trajectory") is True for r in fig6)
    assert {(r.pretrain, r.data_rate, r.sparsity, r.regime, r.dataset) for r in fig6} == {
        (p, rate, 73.79, "at", "cifar10") for p in ("std", "fat", "at") for rate in (1.0, 0.1, 0.01)}
    assert all("--save-trajectory" in r.argv() for r in fig6)
    # a run with --save-trajectory is another command: its own subtree, never one of fig5's directories
    assert all(Path(r.run_dir).is_relative_to(tree / "trajectories") for r in fig6)
    fig3, fig4, fig5 = (_dirs(tmp_path, n) for n in ("fig3", "fig4", "fig5"))
    fig7, table = _dirs(tmp_path, "fig7"), _dirs(tmp_path, "table_a2")
    assert len(fig7) == 6 and fig7 <= fig3 & fig5  # Figs. 7/A8 add no run to the study
    # Table A2 re-scores model_best.pt, which the sweep's runs of fig3/4/5 do not keep: its own subtree
    assert len(table) == 12 and all(Path(d).is_relative_to(tree / "table_a2") for d in table)
    table_a2 = study.grid.expand(study.grid.load_grid(tmp_path / "table_a2.toml"))
    assert all(r.keep_model == "best" for r in table_a2) and all(r.keep_model == "best" for r in fig6)
    levels = {r["sparsity"] for r in study.grid.expected_runs(tmp_path / "table_a2.toml")}
    assert levels == {0.0, 89.26, 93.13, 95.6}  # Table A2's rows
    fig3_flags = tomllib.loads((GRIDS / "fig3.toml").read_text(encoding="utf-8"))["flags"]
    for name, runs in (("fig6", 9), ("fig7", 6), ("table_a2", 12)):
        text = (GRIDS / f"{name}.toml").read_text(encoding="utf-8")
        spec = tomllib.loads(text)
        assert spec["out"].startswith("runs/study")
        assert {k: v for k, v in spec["flags"].items() if k not in ("save_trajectory", "keep_model")} == fig3_flags
        assert f"= {runs} main_downstream.py" in " ".join(text.split())  # the header's run count
        assert "Choices where the paper is silent" in text and "study_report.py" in text


def _write_result(run, value):
    """results.json (docs/contracts.md §3) of one grid run with SA = RA-ish = ``value``."""
    run.run_dir.mkdir(parents=True)
    ra = value - 40 if run.regime == "at" else None
    obj = {"dataset": run.dataset, "arch": "resnet50", "pretrain": run.pretrain, "init": run.init,
           "ticket": str(run.ticket) if run.ticket else None, "method": run.method, "sparsity": run.sparsity,
           "regime": run.regime, "data_rate": run.data_rate, "seed": run.seed, "sa": value, "ra": ra,
           "selected_epoch": 3, "selection": "val_sa" if run.regime == "st" else "val_ra",
           "history": [{"epoch": 0, "lr": 0.1, "train_loss": 1.0, "train_acc": 50.0, "val_sa": value, "val_ra": ra,
                        "seconds": 1.0}],
           "config": {"dataset": run.dataset, "arch": "resnet50", "ticket": str(run.ticket) if run.ticket else None,
                      "seed": run.seed}, "git": None}
    (run.run_dir / "results.json").write_text(json.dumps(obj))


SMALL_FIG4 = """\
out = "runs/study"
[pretrain.at]
init = "weights/at.pt"
tickets = ["tickets/at_imp_st", "tickets/at_omp"]
[axes]
dataset = ["cifar10"]
regime = ["st", "at"]
seed = [1, 2]
rounds = [10, 11]
dense = true
[flags]
arch = "resnet50"
"""


@pytest.fixture
def small_study(tmp_path):
    """A study of four grids: a small Fig. 4 with every run finished (IMP-ST double-win up to 91.41%,
    OMP up to 89.26%), the real fig7.toml on tiny real tickets, and fig6.toml / table_a2.toml with
    no run finished."""
    rounds = (6, 10, 11, 12, 14, 16)
    for seed, (label, style) in enumerate((("std", "kernel"), ("fat", "spread"), ("at", "random"))):
        _stage1_dir(tmp_path, f"tickets/{label}_imp_st", rounds, style, seed)
    _stage1_dir(tmp_path, "tickets/at_omp", (10, 11), "random", seed=3)
    _inputs_of(tmp_path, ("fig6", "fig7", "table_a2"))
    (tmp_path / "fig4.toml").write_text(SMALL_FIG4, encoding="utf-8")
    for run in study.grid.expand(study.grid.load_grid(tmp_path / "fig4.toml")):
        good = run.method == "dense" or run.sparsity <= (91.41 if run.method == "imp" else 89.26)
        _write_result(run, (90.0 + run.seed) if good else 50.0)
    return tmp_path


def _section(text, figure):
    return text.split(f"## {figure}:")[1].split("\n## ")[0]


def test_study_report_analyses_each_figure_and_writes_paper_vs_ours(small_study, capsys):
    out = small_study / "report"
    assert study_report.main([str(small_study / name) for name in ("fig4.toml", "fig6.toml", "fig7.toml",
                                                                   "table_a2.toml")] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fig6 (Figs. 2, 6, A9): skipped, 0 of 9 runs finished" in printed
    assert "table_a2 (Table A2): skipped, no --transfer-source given" in printed
    assert (out / "fig4" / "double_win.csv").is_file() and (out / "fig7" / "mask_iou.csv").is_file()
    assert len(list((out / "fig7").glob("heatmap_*_round_16.png"))) == 3  # Fig. 7: one heatmap per pre-training
    text = (out / "paper_vs_ours.md").read_text(encoding="utf-8")
    assert text.startswith("# The paper's numbers beside ours") and "How to read the tables" in text
    fig4 = _section(text, "Fig. 4")
    assert "Ours: `fig4/double_win.csv` (2 rows) from 20 of 20 runs of `fig4.toml`." in fig4
    assert "| CIFAR-10 · 100% data · θ_AT · IMP-ST | 91.41 | 91.41 |" in fig4 and "| same |" in fig4
    assert "| CIFAR-10 · 100% data · θ_AT · OMP | 89.26 | 89.26 |" in fig4
    assert "| CIFAR-100 · 100% data · θ_AT · OMP | 79.03 | – |" in fig4 and "not measured (no such row)" in fig4
    masks = _section(text, "Figs. 7, A8")
    iou = next(line for line in masks.splitlines() if line.startswith("| mask IoU"))
    assert "| < 20.00% | max " in iou and "| holds |" in iou and "3 pairs of masks" in iou
    order = next(line for line in masks.splitlines() if line.startswith("| zero kernels"))
    assert "| θ_STD > θ_AT > θ_FAT | θ_STD " in order and "| same order |" in order
    a2 = _section(text, "Table A2")
    assert "Ours: not analysed yet: no --transfer-source given" in a2
    assert a2.count("not measured (no robustness.csv: run analysis/robustness.py --transfer-source)") == 4
    assert "Ours: not analysed yet: 0 of 9 runs finished." in _section(text, "Figs. 2, 6, A9")
    assert "## Fig. 3:" not in text  # only the figures of the grids given


def test_a_study_folder_stands_for_its_grid_files_in_the_papers_order(small_study):
    files = study_report.grid_files([small_study])
    assert [f.stem for f in files] == ["fig4", "fig6", "fig7", "table_a2"]
    with pytest.raises(UserError, match="holds no grid file"):
        study_report.grid_files([small_study / "weights"])
    with pytest.raises(UserError, match="does not exist"):
        study_report.main([str(small_study / "fig9.toml"), "--out", str(small_study / "r")])


def test_table_a2_rows_compare_a_robustness_csv_with_their_support(tmp_path):
    """robustness.py's own columns; three seeds of the dense θ_AT and one ticket level."""
    rows = []
    for seed, (t0, r0, t1, r1) in zip((1, 2, 3), ((55.0, 47.0, 60.0, 55.0), (56.0, 47.5, 61.0, 55.5),
                                                  (55.5, 47.0, 62.0, 56.0))):
        for sparsity, transfer, ra in ((0.0, t0, r0), (89.26, t1, r1)):
            rows.append({"run": f"r{seed}_{sparsity}", "dataset": "cifar10", "pretrain": "at", "sparsity": sparsity,
                         "regime": "at", "data_rate": 1.0, "seed": seed, "n_images": 10000,
                         "transfer_acc": transfer, "ra_pgd": ra})
    with open(tmp_path / "robustness.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, robustness.FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert pvo.main([str(tmp_path), "--figure", "table_a2"]) == 0  # a grid's name stands for its figure
    text = (tmp_path / "paper_vs_ours.md").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.startswith("| θ_AT")]
    assert "| 55.54 / 47.11 | 55.50 / 47.17 | 3 seeds (1, 2, 3, sd 0.50 / 0.29); 10000 images | close (-0.04 / +0.06) |" \
        in lines[0]
    assert "| 62.79 / 56.00 | 61.00 / 55.50 |" in lines[1] and "differs (-1.79 / -0.50)" in lines[1]
    assert "not measured (no transfer-attack row at 93.13%)" in lines[2]
    assert "4 measured statements: 1 close, 1 differs, 2 not measured." in text


TRAINED_GRID = """\
out = "runs"
[pretrain.at]
init = "weights/at.pt"
tickets = ["tickets/at_imp_st"]
[axes]
dataset = ["digits"]
regime = ["at"]
seed = [1]
rounds = [3]
dense = false
"""
TRAINED_PAPER = """\
[figures]
"Figs. 2, 6, A9" = "Loss landscapes"
"Table A2" = "Transfer attack"

[[number]]
figure = "Table A2"
kind = "transfer_attack"
setting = "digits, the 50% ticket"
dataset = "digits"
data_rate = 1.0
pretrain = "at"
regime = "at"
sparsity = 50.0
value = [50.0, 20.0]
source = "a test"
"""


@pytest.mark.slow
def test_landscapes_and_the_transfer_attack_of_trained_runs(tiny_run, tmp_path):  # noqa: F811 (the fixture)
    """A ticket trained on digits with its trajectory (main_downstream.py's files) where the grids of
    Figs. 2/6/A9 and Table A2 put their run, and a second model as the unseen source."""
    import dataset
    import models

    _stage1_dir(tmp_path, "tickets/at_imp_st", (3,))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "at.pt").write_bytes(b"")
    for name in ("fig6", "table_a2"):
        (tmp_path / f"{name}.toml").write_text(TRAINED_GRID, encoding="utf-8")
    (run,) = study.grid.expand(study.grid.load_grid(tmp_path / "fig6.toml"))
    shutil.copytree(tiny_run, run.run_dir)
    data = dataset.build_data("digits", image_size=8, batch_size=64, seed=1)
    torch.manual_seed(1)
    source = models.build_model("resnet_tiny", data.num_classes, cifar_stem=True, mean=data.mean, std=data.std)
    models.save_model_checkpoint(tmp_path / "source.pt", source, epoch=0)
    (tmp_path / "paper.toml").write_text(TRAINED_PAPER, encoding="utf-8")
    out = tmp_path / "report"
    assert study_report.main([str(tmp_path / "fig6.toml"), str(tmp_path / "table_a2.toml"), "--out", str(out),
                              "--paper", str(tmp_path / "paper.toml"), "--transfer-source", str(tmp_path / "source.pt"),
                              "--max-images", "64", "--landscape-points", "3", "--landscape-images", "32",
                              "--device", "cpu"]) == 0
    name = f"digits_rate1_at_at_imp_s{run.sparsity:.2f}_seed1"  # the run's directory, flattened
    land = json.loads((out / "fig6" / name / "landscape.json").read_text())
    assert len(land["x"]) == 3 and land["settings"]["num_images"] == 32
    assert "principal directions" in land["settings"]["directions"]  # the run kept its trajectory
    (row,) = list(csv.DictReader(open(out / "table_a2" / "robustness.csv", newline="", encoding="utf-8")))
    assert row["transfer_acc"] and row["n_images"] == "64" and float(row["sparsity"]) == 50.0
    text = (out / "paper_vs_ours.md").read_text(encoding="utf-8")
    line = next(line for line in _section(text, "Table A2").splitlines() if line.startswith("| digits"))
    ours = f"{float(row['transfer_acc']):.2f} / {float(row['ra_pgd']):.2f}"
    assert f"| 50.00 / 20.00 | {ours} | 1 seed (1); 64 images |" in line
    assert "Ours: `fig6/fig6.png`, `fig6/figA9.png` (each run's landscape in" in _section(text, "Figs. 2, 6, A9")
    assert (out / "fig6" / "fig6.png").stat().st_size > 5000 and (out / "fig6" / "figA9.png").is_file()
    assert (out / "fig6" / "summary.csv").is_file()  # the SA of the landscapes' runs, which the text quotes
    assert "The text states no number for this figure" in _section(text, "Figs. 2, 6, A9")


def test_the_sa_gap_beside_the_landscapes_reads_plot_curves_summary(tmp_path):
    """The text's SA of θ_FAT over θ_AT at 73.79% on 10% and 1% data, from summary.csv's own columns."""
    from analysis.table import SUMMARY_FIELDS

    cells = [("fat", 0.1, 70.0, 3), ("at", 0.1, 61.5, 3), ("fat", 0.01, 40.0, 1), ("at", 0.01, 35.0, 1)]
    with open(tmp_path / "summary.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({"dataset": "cifar10", "data_rate": rate, "pretrain": pre, "method": "imp", "regime": "at",
                          "sparsity": 73.79, "n": n, "sa_mean": sa} for pre, rate, sa, n in cells)
    assert pvo.main([str(tmp_path), "--figure", "fig6"]) == 0
    text = (tmp_path / "paper_vs_ours.md").read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if line.startswith("| CIFAR-10, IMP-ST at 73.79%"))
    assert "| +8.98 / +9.62 | +8.50 / +5.00 | mean SA over seeds (θ_FAT/θ_AT: 3/3, 1/1 per data rate) |" in line
    assert "| differs (-0.48 / -4.62) |" in line
