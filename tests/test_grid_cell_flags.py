"""[[cell_flags]]: per-cell main_downstream.py flags in a grid file (docs/contracts.md §7): each run's
flags, the order entries override in, one-line refusals, and a study whose runs, once made with
their cell's schedule, `status` counts done (not stale)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from study.grid import expand, load_grid

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "script" / "sweep.py"
STAGE1 = ['dataset = "digits"', 'arch = "resnet_tiny"', "cifar_stem = true", 'classes = "0-4"', "rate = 0.5",
          "rounds = 2"]
FLAGS = ['arch = "resnet_tiny"', "cifar_stem = true", 'classes = "5-9"', "epochs = 1", "lr = 0.05",
         "batch_size = 128", "no_progress = true"]
# the digits demo's kind of schedule: longer at the small data rate, regime at's own lr, chance allowed
# for the tickets; the last entry overrides the first where both match
CELLS = ["[[cell_flags]]", "data_rate = 0.1", "flags = { epochs = 3, milestones = [2], eval_from = 1 }",
         "[[cell_flags]]", 'method = ["imp", "omp"]', "flags = { allow_chance = true }",
         "[[cell_flags]]", 'regime = "at"', "[cell_flags.flags]", "lr = 0.02", "batch-size = 64",
         "[[cell_flags]]", "data_rate = [0.1]", 'method = "omp"', 'regime = "at"', "flags = { epochs = 4 }"]


def _load_sweep():
    spec = importlib.util.spec_from_file_location("sweep_cells", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()


def write_grid(root, cells=CELLS, flags=FLAGS, name="grid.toml"):
    """θ_p "at.pt" (need not exist), IMP and OMP tickets made by the grid (2 rounds each), dense runs,
    regimes st and at, data rates 1.0 and 0.1, seed 1: 20 runs."""
    lines = ['out = "runs"', "[pretrain.at]", 'init = "at.pt"', 'tickets = ["tickets/at_imp", "tickets/at_omp"]',
             "[stage1.at_imp]", 'pretrain = "at"', 'method = "imp"', "[stage1.at_imp.flags]", *STAGE1,
             "epochs_per_round = 1", "[stage1.at_omp]", 'pretrain = "at"', 'method = "omp"', "[stage1.at_omp.flags]",
             *STAGE1, "[axes]", 'dataset = ["digits"]', 'regime = ["st", "at"]', "data_rate = [1.0, 0.1]",
             "seed = [1]", "[flags]", *flags, *cells]
    path = Path(root) / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_each_run_gets_flags_then_its_cells_entries_in_file_order(tmp_path, capsys):
    runs = expand(load_grid(write_grid(tmp_path), missing_ok=True))
    assert len(runs) == 20 and {r.method for r in runs} == {"dense", "imp", "omp"}
    for r in runs:
        small, at = r.data_rate == 0.1, r.regime == "at"
        want = {"epochs": 4 if small and at and r.method == "omp" else 3 if small else 1,
                "lr": 0.02 if at else 0.05, "batch_size": 64 if at else 128}
        assert {k: r.flags[k] for k in want} == want, r.point()
        assert r.flags.get("milestones") == ([2] if small else None) and r.flags.get("eval_from") == (
            1 if small else None), r.point()
        assert r.flags.get("allow_chance", False) is (r.method != "dense"), r.point()
        assert "batch-size" not in r.flags and r.flags["keep_model"] == "none"  # the sweep's default stays
        assert f"--epochs {want['epochs']} " in r.command() and f"--batch-size {want['batch_size']} " in r.command()
    assert sweep.main(["plan", str(write_grid(tmp_path))]) == 0
    plan = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("pending  ")]
    line = next(ln for ln in plan if "/rate0.1/at/at/omp/" in ln)
    assert "--epochs 4 " in line and "--lr 0.02 " in line and "--allow-chance" in line and "--milestones 2 " in line
    assert "--allow-chance" not in next(ln for ln in plan if "/rate1/st/at/dense/" in ln)


def test_a_grid_without_cell_flags_gives_every_run_the_grid_flags(tmp_path):
    runs = expand(load_grid(write_grid(tmp_path, cells=[]), missing_ok=True))
    assert len({json.dumps(r.flags) for r in runs}) == 1
    assert list(runs[0].flags) == ["keep_model", "arch", "cifar_stem", "classes", "epochs", "lr", "batch_size",
                                   "no_progress"]


BAD = [
    (["[[cell_flags]]", "data_rat = 0.1", "flags = { epochs = 3 }"],
     "[[cell_flags]] entry 1 has the unknown key 'data_rat' (did you mean data_rate?)", 2),
    (["[[cell_flags]]", "data_rate = [0.1, 0.5]", "flags = { epochs = 3 }"],
     "[[cell_flags]] entry 1 data_rate = 0.5 matches no run of the grid (its runs have data_rate 0.1, 1.0)", 2),
    (["[[cell_flags]]", 'method = "rp"', "flags = { epochs = 3 }"], "method = 'rp' matches no run of the grid", 2),
    (["[[cell_flags]]", "regime = 'st'", "flags = { epochs = 3 }", "[[cell_flags]]", "regime = 'at'",
      "flags = { epoch = 3 }"], "[[cell_flags]] entry 2 flags epoch would be --epoch, which is not one of its flags "
                                "(did you mean --epochs?)", 6),
    (["[[cell_flags]]", "regime = 'at'", "flags = { seed = 3 }"],
     "[[cell_flags]] entry 1 flags sets 'seed', which the grid sets per run", 3),
    (["[[cell_flags]]", "flags = { epochs = 3 }"], "[[cell_flags]] entry 1 names no cells, so it would act on every "
                                                   "run", 1),
    (["[[cell_flags]]", "regime = 'at'"], "[[cell_flags]] entry 1 sets no flags", 1),
    (["[[cell_flags]]", "regime = 'st'", "flags = { train_steps = 2 }"],
     "[[cell_flags]] entry 1 flags train_steps (--train-steps) has no effect on any run it matches", 3),
    (["[cell_flags]", "regime = 'st'", "flags = { epochs = 2 }"], "cell_flags must be an array of tables", None),
]


@pytest.mark.parametrize("cells, needle, line", BAD, ids=["key", "rate", "method", "flag", "axis", "nomatch", "noflags",
                                                          "nowhere", "table"])
def test_bad_cell_flags_are_one_line_naming_the_entry(tmp_path, cells, needle, line):
    grid = write_grid(tmp_path, cells=cells)
    first = len(grid.read_text().splitlines()) - len(cells)  # the line before the entries
    with pytest.raises(sweep.UserError) as info:
        sweep.main(["plan", str(grid)])
    message = str(info.value)
    assert "\n" not in message and needle in message, message
    assert (f", line {first + line}:" in message) if line else ", line " not in message, message


def test_a_refusal_through_the_command_is_one_line_and_exit_2(tmp_path):
    grid = write_grid(tmp_path, cells=BAD[1][0])
    proc = subprocess.run([sys.executable, str(SWEEP), "plan", str(grid)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and BAD[1][1] in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.toml"]


@pytest.mark.slow
def test_runs_made_with_their_cells_schedule_are_done_not_stale(tmp_path):
    """Two dense runs; the data rate 0.1 one trains 2 epochs by its cell entry, and `status` and
    `plan` of the grid file alone count both done."""
    import dataset
    import models

    mean, std = dataset.DATASET_STATS["digits"]
    torch.manual_seed(0)
    models.save_model_checkpoint(tmp_path / "at.pt",
                                 models.build_model("resnet_tiny", 5, cifar_stem=True, mean=mean, std=std))
    lines = ['out = "runs"', "[pretrain.at]", 'init = "at.pt"', "[axes]", 'dataset = ["digits"]', 'regime = ["st"]',
             "data_rate = [1.0, 0.1]", "seed = [1]", "[flags]", *FLAGS, "allow_chance = true", "test_steps = 2",
             "[[cell_flags]]", "data_rate = 0.1", "flags = { epochs = 2 }"]
    grid = tmp_path / "grid.toml"
    grid.write_text("\n".join(lines) + "\n")

    def sweep_cmd(*args):
        return subprocess.run([sys.executable, str(SWEEP), *args, str(grid)], capture_output=True, text=True,
                              timeout=600, cwd=REPO)

    ran = sweep_cmd("run", "--workers", "1")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    base = tmp_path / "runs" / "digits"
    epochs = {rate: len(json.loads((base / rate / "st" / "at" / "dense" / "seed1" / "results.json").read_text())
                        ["history"]) for rate in ("rate1", "rate0.1")}
    assert epochs == {"rate1": 1, "rate0.1": 2}
    status = sweep_cmd("status")
    assert status.returncode == 0 and "done 2 of 2 runs (0 failed, 0 pending, 0 running)" in status.stdout, status.stdout
    plan = sweep_cmd("plan")
    assert "2 runs: 2 done, 0 pending" in plan.stdout and "stale" not in plan.stdout, plan.stdout


def test_method_matches_the_ticket_method_or_its_family_and_entries_must_meet_some_run(tmp_path):
    grid = write_grid(tmp_path, cells=["[[cell_flags]]", 'method = "imp-at"', "flags = { epochs = 5 }",
                                       "[[cell_flags]]", 'method = "imp"', "flags = { lr = 0.03 }"])
    text = grid.read_text().replace('tickets = ["tickets/at_imp", "tickets/at_omp"]',
                                    'tickets = ["tickets/at_imp", "tickets/at_omp", "tickets/at_imp_at"]')
    grid.write_text(text.replace("[axes]", "\n".join(["[stage1.at_imp_at]", 'pretrain = "at"', 'method = "imp"',
                                                       'retrain = "at"', "[stage1.at_imp_at.flags]", *STAGE1,
                                                       "epochs_per_round = 1", "[axes]"])))
    runs = expand(load_grid(grid, missing_ok=True))
    family = {r.family: r.method for r in runs}
    assert family == {"dense": "dense", "imp": "imp", "omp": "omp", "imp-at": "imp"}
    for r in runs:
        assert r.flags["epochs"] == (5 if r.family == "imp-at" else 1), r.point()
        assert r.flags["lr"] == (0.03 if r.method == "imp" else 0.05), r.point()
        assert ("/imp-at/" in str(r.run_dir)) is (r.family == "imp-at")

    two = write_grid(tmp_path, cells=["[[cell_flags]]", 'pretrain = "std"', 'method = ["imp", "omp"]',
                                      "flags = { epochs = 5 }"], name="two.toml")
    two.write_text(two.read_text().replace("[axes]", '[pretrain.std]\ninit = "none"\n[axes]'))
    with pytest.raises(sweep.UserError, match=r"entry 1 matches no run of the grid: no pre-training it names has "
                                              r"runs of the method imp or omp"):
        load_grid(two, missing_ok=True)
