"""Replicated sources in a grid (docs/contracts.md §7): a pre-training label with several θ_p files and
one ticket directory per replicate, a [stage1.NAME] entry replicated over ticket searches, the seeds of
each cell dealt over the replicates; a grid without replicates expands as before; bad input refused."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from study.grid import expand, load_grid
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DIGITS = ["--dataset", "digits", "--arch", "resnet_tiny", "--cifar-stem"]
FLAGS = ['[flags]', 'arch = "resnet_tiny"', "cifar_stem = true", 'classes = "5-9"', "epochs = 1",
         "batch_size = 128", "no_progress = true", "allow_chance = true", "channels_last = false"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three θ_p files (different seeds) and an OMP ticket directory pruned from each (50%, 75%)."""
    import dataset
    import main_imp_pretrain
    import models

    root = tmp_path_factory.mktemp("replicas")
    mean, std = dataset.DATASET_STATS["digits"]
    for k in (1, 2, 3):
        torch.manual_seed(k)
        models.save_model_checkpoint(root / f"std{k}.pt", models.build_model("resnet_tiny", 5, cifar_stem=True,
                                                                             mean=mean, std=std))
        assert main_imp_pretrain.main(DIGITS + [
            "--classes", "0-4", "--init", str(root / f"std{k}.pt"), "--pretrain", "std", "--method", "omp",
            "--rate", "0.5", "--rounds", "2", "--save-dir", str(root / f"omp{k}")]) in (0, None)
    return root


def _grid(root, init, tickets, seeds="[1, 2, 3, 4, 5]", extra=(), name="grid.toml"):
    lines = ['out = "runs"', "[pretrain.std]", f"init = {init}", f"tickets = {tickets}", *extra, "[axes]",
             'dataset = ["digits"]', 'regime = ["st"]', f"seed = {seeds}", *FLAGS]
    path = Path(root) / name
    path.write_text("\n".join(lines) + "\n")
    return path


REPLICATED = ('["std1.pt", "std2.pt", "std3.pt"]', '[["omp1", "omp2", "omp3"]]')


def test_replicated_sources_spread_each_cells_seeds(sources):
    runs = expand(load_grid(_grid(sources, *REPLICATED)))
    assert len(runs) == 3 * 5  # dense + 2 levels, 5 seeds each
    assert len({r.run_dir for r in runs}) == len(runs)
    cells = {}
    for r in runs:
        cells.setdefault((r.method, r.sparsity), []).append(r)
    assert sorted(cells) == [("dense", 0.0), ("omp", 50.0), ("omp", 75.0)]
    for cell in cells.values():
        assert [r.seed for r in cell] == [1, 2, 3, 4, 5]
        for r in cell:
            k = (r.seed - 1) % 3 + 1  # seed position -> replicate, in turn
            assert r.run_dir.parent.name == f"rep{k}" and r.init == str(sources / f"std{k}.pt")
            assert r.ticket is None if r.method == "dense" else r.ticket.parent.parent == sources / f"omp{k}"
            assert r.argv()[r.argv().index("--init") + 1] == r.init
        assert len({(r.init, str(r.ticket)) for r in cell}) == 3
    assert runs[5].run_dir == sources / "runs/digits/rate1/st/std/omp/s50.00/rep1/seed1"


def test_a_grid_without_replicates_keeps_its_runs(sources):
    """The documented single-source layout, and a one-item init list is the same grid."""
    single = expand(load_grid(_grid(sources, '"std1.pt"', '["omp1"]', seeds="[1, 2]")))
    listed = expand(load_grid(_grid(sources, '["std1.pt"]', '[["omp1"]]', seeds="[1, 2]", name="one.toml")))
    out = sources / "runs/digits/rate1/st/std"
    assert [r.run_dir for r in single] == [out / "dense/seed1", out / "dense/seed2", out / "omp/s50.00/seed1",
                                           out / "omp/s50.00/seed2", out / "omp/s75.00/seed1", out / "omp/s75.00/seed2"]
    assert [r.argv() for r in single] == [r.argv() for r in listed]
    assert {r.init for r in single} == {str(sources / "std1.pt")}


def test_ticket_replicates_from_one_theta_p_share_the_dense_runs(sources):
    runs = expand(load_grid(_grid(sources, '"std1.pt"', '[["omp1", "omp2", "omp3"]]', seeds="[1, 2, 3]")))
    dense = [r for r in runs if r.method == "dense"]
    assert [r.run_dir.parent.name for r in dense] == ["dense"] * 3  # one source model: no replicate component
    assert {r.ticket.parent.parent.name for r in runs if r.ticket} == {"omp1", "omp2", "omp3"}


@pytest.mark.parametrize("init, tickets, extra, words", [
    ('["std1.pt", "std2.pt", "std3.pt"]', '[["omp1", "omp2"]]', (), "one ticket directory per replicate"),
    ('["std1.pt", "std2.pt", "std3.pt"]', '["omp1"]', (), "one ticket directory per replicate"),
    ('["std1.pt", "./std1.pt", "std3.pt"]', '[]', (), "twice"),
    ('"std1.pt"', '[["omp1", "omp1"]]', (), "twice"),
    ('"std1.pt"', '["t/x"]', ("[stage1.x]", 'pretrain = "std"', 'method = "omp"', "replicas = 0"), "replicas = 0"),
    ('["std1.pt", "std2.pt"]', '["t/x"]', ("[stage1.x]", 'pretrain = "std"', 'method = "omp"', "replicas = 3"),
     "use replicas = 2"),
    ('"std1.pt"', '["t/x"]', ("[stage1.x]", 'pretrain = "std"', 'method = "omp"', "replicas = 3",
                              "[stage1.x.flags]", 'dataset = "digits"', 'arch = "resnet_tiny"'), "one ticket"),
])
def test_bad_replicates_are_refused_in_one_line(sources, init, tickets, extra, words):
    with pytest.raises(UserError, match=words) as exc:
        load_grid(_grid(sources, init, tickets, extra=extra, name="bad.toml"), missing_ok=True)
    assert "\n" not in str(exc.value)


def test_plan_of_a_replicated_grid_exits_2_on_a_length_mismatch(sources):
    bad = _grid(sources, REPLICATED[0], '[["omp1", "omp2"]]', name="bad_cli.toml")
    proc = subprocess.run([sys.executable, str(REPO / "script/sweep.py"), "plan", str(bad)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    good = subprocess.run([sys.executable, str(REPO / "script/sweep.py"), "plan", str(_grid(sources, *REPLICATED))],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert good.returncode == 0, good.stderr
    assert "omp/s75.00/rep3/seed3" in good.stdout and "dense/rep2/seed5" in good.stdout


def test_a_replicated_stage1_entry_makes_one_ticket_search_per_replicate(tmp_path):
    """IMP (which trains, so its seed acts) from one θ_p: NAME_r1..r3 in SAVE_DIR/r1..r3 with --seed 1..3;
    OMP from three θ_p files: one search per file (replicas defaults to their count), no seed."""
    imp = ["[stage1.s]", 'pretrain = "std"', 'method = "imp"', "replicas = 3", "[stage1.s.flags]",
           'dataset = "digits"', 'arch = "resnet_tiny"', "cifar_stem = true", "rounds = 2", "epochs_per_round = 1"]
    grid = load_grid(_grid(tmp_path, '"std1.pt"', '["tickets/s"]', seeds="[1, 2, 3, 4]", extra=imp),
                     missing_ok=True)
    assert sorted(grid.stage1) == ["s_r1", "s_r2", "s_r3"]
    for i, name in enumerate(sorted(grid.stage1), 1):
        entry = grid.stage1[name]
        argv = entry.argv()
        assert entry.save_dir == tmp_path / f"tickets/s/r{i}" and argv[argv.index("--seed") + 1] == str(i)
    runs = [r for r in expand(grid) if r.method == "imp"]
    assert {(r.seed, r.ticket.parent.parent.name) for r in runs if r.round == 1} == {
        (1, "r1"), (2, "r2"), (3, "r3"), (4, "r1")}
    omp = ["[stage1.o]", 'pretrain = "std"', 'method = "omp"', "[stage1.o.flags]", 'dataset = "digits"',
           'arch = "resnet_tiny"', "cifar_stem = true", "rounds = 2"]
    grid = load_grid(_grid(tmp_path, REPLICATED[0], '["tickets/o"]', extra=omp, name="omp.toml"), missing_ok=True)
    assert [e.init for e in grid.stage1.values()] == [str(tmp_path / f"std{k}.pt") for k in (1, 2, 3)]
    assert all("--seed" not in e.argv() for e in grid.stage1.values())
    runs = expand(grid)
    assert {(r.init, r.ticket.parent.parent.name) for r in runs if r.ticket} == {
        (str(tmp_path / f"std{k}.pt"), f"r{k}") for k in (1, 2, 3)}


@pytest.mark.slow
def test_finished_replicated_runs_give_three_sources_per_cell(sources):
    """A sweep of the replicated grid, then the verdict table: each cell's sources are its 3 replicates."""
    import csv

    from analysis import table

    grid = _grid(sources, REPLICATED[0], REPLICATED[1], seeds="[1, 2, 3]", name="run.toml")
    text = grid.read_text().replace('regime = ["st"]', 'regime = ["st", "at"]\nrounds = [1]')
    grid.write_text(text + 'eps = "32/255"\nalpha = "8/255"\ntrain_steps = 1\ntest_steps = 2\n')
    proc = subprocess.run([sys.executable, str(REPO / "script/sweep.py"), "run", str(grid), "--workers", "2"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = sources / "analysis"
    table.write_tables(table.collect([str(sources / "runs")]), out)
    with open(out / "double_win_details.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    judged = [row for row in rows if row["judged"] == "True"]  # rounds = [1]: the 75% level has no runs
    assert [row["sparsity"] for row in judged] == ["50.00"] and judged[0]["sources"] == "3"
