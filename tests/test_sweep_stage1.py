"""Stage 1 inside the grid ([stage1.NAME] entries, study/stage1.py and study/pipeline.py): plan before
any input exists, bad entries refused in one line, one `sweep.py run` that runs stage 1 and starts each
round's runs as soon as its ticket is written, interrupted and resumed, and a failed stage-1 job that
holds back only the runs that need its tickets. Digits, resnet_tiny, the real on-disk formats."""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "script" / "sweep.py"
# stage 1 on digits: 3 IMP rounds of 50% with enough re-training between them (about 4 s a round on
# one thread) that the runs of round 1 visibly start (about 2 s after their ticket) before round 3 is written
STAGE1 = ['dataset = "digits"', 'arch = "resnet_tiny"', "cifar_stem = true", 'classes = "0-4"', "rate = 0.5",
          "rounds = 3", "epochs_per_round = 12", "batch_size = 64", "lr = 0.01", "no_progress = true"]
FLAGS = ['arch = "resnet_tiny"', "cifar_stem = true", 'classes = "5-9"', "epochs = 1", "lr = 0.05",
         "batch_size = 128", "no_progress = true", "allow_chance = true"]


def _load_sweep():
    spec = importlib.util.spec_from_file_location("sweep_s1", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()


def _sweep(*args, timeout=600):
    return subprocess.run([sys.executable, str(SWEEP), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _theta(path, seed=0):
    import dataset
    import models

    mean, std = dataset.DATASET_STATS["digits"]
    torch.manual_seed(seed)
    models.save_model_checkpoint(path, models.build_model("resnet_tiny", 5, cifar_stem=True, mean=mean, std=std))
    return path


def write_grid(root, entries=None, pretrain=None, axes=(), name="grid.toml"):
    """θ_p "at.pt" pruned by one IMP entry into tickets/at_imp (3 rounds); its runs: st, seed 1, no dense."""
    pretrain = pretrain or ['[pretrain.at]', 'init = "at.pt"', 'tickets = ["tickets/at_imp"]']
    entries = entries if entries is not None else ['[stage1.at_imp]', 'pretrain = "at"', 'method = "imp"',
                                                   '[stage1.at_imp.flags]', *STAGE1]
    lines = ['out = "runs"', *pretrain, *entries, "[axes]", 'dataset = ["digits"]', 'regime = ["st"]', "seed = [1]",
             "dense = false", *axes, "[flags]", *FLAGS]
    path = Path(root) / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _plan(capsys, grid):
    assert sweep.main(["plan", str(grid)]) == 0
    return capsys.readouterr().out.splitlines()


# --------------------------------------------------------------------------- plan, before anything exists

def test_plan_lists_every_run_before_theta_p_and_tickets_exist(tmp_path, capsys):
    grid = write_grid(tmp_path)
    lines = _plan(capsys, grid)
    stage1 = [ln for ln in lines if ln.startswith("stage1 ")]
    assert len(stage1) == 1 and "pending  0/3 rounds" in stage1[0]
    assert f"--save-dir {tmp_path / 'tickets' / 'at_imp'}" in stage1[0] and "--rounds 3" in stage1[0]
    runs = [ln.split()[1] for ln in lines if ln.startswith("pending  ")]
    base = tmp_path / "runs" / "digits" / "rate1" / "st" / "at" / "imp"
    # 50% of the remaining weights per round, counted as stage 1 counts them
    assert runs == [str(base / level / "seed1") for level in ("s50.00", "s75.00", "s87.50")]
    assert "3 runs: 0 done, 3 pending" in lines
    missing = [ln for ln in lines if ln.startswith("missing: ")]
    assert missing == [f"missing: [pretrain.at] init '{tmp_path / 'at.pt'}': θ_p is not there yet (`run` needs it)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.toml"]  # plan made nothing


def test_plan_names_a_ticket_directory_nobody_makes(tmp_path, capsys):
    grid = write_grid(tmp_path, pretrain=['[pretrain.at]', 'init = "at.pt"',
                                          'tickets = ["tickets/at_imp", "tickets/at_omp"]'])
    lines = _plan(capsys, grid)
    assert any(ln.startswith("missing: ") and "at_omp' is not there and no [stage1.NAME] entry makes it" in ln
               for ln in lines)
    assert sum(ln.startswith("pending  ") for ln in lines) == 3


def test_run_refuses_a_missing_theta_p_before_starting_anything(tmp_path):
    grid = write_grid(tmp_path)
    proc = _sweep("run", grid)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "at.pt' does not exist" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.toml"]


def test_expected_levels_are_stage_1s_for_the_papers_resnet50():
    """19 rounds of 20% over ResNet-50's convolutions: the levels the paper quotes (20.00% ... 98.56%)."""
    from study import stage1_progress

    grid = sweep.build_grid({"out": "runs", "pretrain": {"at": {"init": "none", "tickets": ["t"]}},
                             "stage1": {"t": {"pretrain": "at", "method": "omp", "save_dir": "t",
                                              "flags": {"dataset": "imagenet", "arch": "resnet50"}}},
                             "axes": {"dataset": ["cifar10"], "regime": ["st"], "seed": [1]}},
                            Path("/nonexistent"), "g.toml")
    levels = grid.stage1["t"].levels
    assert len(levels) == 19 and levels[1] == 20.0 and levels[3] == 48.8 and levels[19] == 98.56
    assert grid.pretrains["at"]["tickets"][0].made_by == "t"
    assert stage1_progress.needs(grid)[Path("/nonexistent/t/tickets/round_19.pt")][1] == 19


# --------------------------------------------------------------------------- bad input

BAD = [
    (lambda e: [x.replace('method = "imp"', 'method = "magnitude"') for x in e],
     "[stage1.at_imp] method = 'magnitude' is not a stage-1 method; use one of imp, omp, rp, lmp"),
    (lambda e: e + ["epochs_per_rnd = 2"], "[stage1.at_imp.flags] epochs_per_rnd would be --epochs-per-rnd, which "
                                           "is not a flag of main_imp_pretrain.py (did you mean --epochs-per-round?)"),
    (lambda e: e + ['init = "other.pt"'], "[stage1.at_imp.flags] sets 'init' (--init), which the entry sets itself"),
    (lambda e: e + ["restart = true"], "sets 'restart' (--restart), which the entry sets itself"),
    (lambda e: [x.replace('pretrain = "at"', 'pretrain = "std"') for x in e],
     "[stage1.at_imp] pretrain = 'std' names no [pretrain.LABEL] table (the grid has: at)"),
    (lambda e: e + ['[stage1.again]', 'pretrain = "at"', 'method = "omp"', 'save_dir = "tickets/at_imp"'],
     "[stage1.again] and [stage1.at_imp] both make the ticket directory"),
    (lambda e: [x.replace('method = "imp"', 'method = "omp"') for x in e],
     "main_imp_pretrain.py rejects [stage1.at_imp] (--epochs-per-round, --batch-size, --lr"),
    (lambda e: e[:3] + ['retrain = "at"', 'gpus = 0'] + e[3:], "[stage1.at_imp] gpus = 0 must be a whole number"),
]


@pytest.mark.parametrize("edit, needle", BAD, ids=["method", "flag", "init", "restart", "label", "two", "scope",
                                                   "gpus"])
def test_bad_stage1_entries_are_one_line_naming_the_entry(tmp_path, edit, needle):
    entries = ['[stage1.at_imp]', 'pretrain = "at"', 'method = "imp"', '[stage1.at_imp.flags]', *STAGE1]
    grid = write_grid(tmp_path, entries=edit(entries))
    for command in ("plan", "run"):
        with pytest.raises(sweep.UserError) as info:
            sweep.main([command, str(grid)])
        assert "\n" not in str(info.value) and needle in str(info.value), str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.toml"]


def test_slurm_refuses_unfinished_stage1_and_stage1_only_needs_entries(tmp_path, capsys):
    _theta(tmp_path / "at.pt")
    grid = write_grid(tmp_path)
    assert sweep.main(["run", str(grid), "--print"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and "main_imp_pretrain.py --init" in printed[0] and "round_01.pt" in printed[1]
    with pytest.raises(sweep.UserError, match=r"\[stage1.at_imp\] has 0 of 3 tickets .* --stage1-only"):
        sweep.main(["run", str(grid), "--backend", "slurm"])
    plain = write_grid(tmp_path, entries=[], pretrain=['[pretrain.at]', 'init = "at.pt"'], name="plain.toml")
    plain.write_text(plain.read_text().replace("dense = false", "dense = true"))
    with pytest.raises(sweep.UserError, match="has no \\[stage1.NAME\\] entries; drop --stage1-only"):
        sweep.main(["run", str(plain), "--stage1-only"])


def test_stage1_only_makes_the_tickets_and_no_run(tmp_path, capsys):
    from study.stage1_progress import unfinished

    _theta(tmp_path / "at.pt")
    entries = ['[stage1.at_omp]', 'pretrain = "at"', 'method = "omp"', '[stage1.at_omp.flags]', 'dataset = "digits"',
               'arch = "resnet_tiny"', "cifar_stem = true", "rate = 0.5", "rounds = 2"]
    grid = write_grid(tmp_path, entries=entries, pretrain=['[pretrain.at]', 'init = "at.pt"',
                                                           'tickets = ["tickets/at_omp"]'])
    assert sweep.main(["run", str(grid), "--stage1-only"]) == 0
    out = capsys.readouterr().out
    assert "stage 1: 1 of 1 ticket directories done (--stage1-only)" in out, out
    assert json.loads((tmp_path / "tickets" / "at_omp" / "sparsity.json").read_text()) == {"1": 50.0, "2": 75.0}
    assert not (tmp_path / "runs").exists() and not unfinished(sweep.load_grid(grid))


def test_a_multi_gpu_job_gets_slots_on_different_gpus():
    """--workers 4 over 2 GPUs: slots 0 and 2 share GPU 0, so a 2-GPU job takes slots 0 and 1."""
    from study.pipeline import Pipeline

    pipeline = Pipeline([], {}, [], 4, 0, sys.stdout, "sweep")
    pipeline.gpus = ["0", "1"]
    assert pipeline.distinct_gpu_slots(2) == [0, 1] and pipeline.distinct_gpu_slots(3) is None
    pipeline.workers[0] = {"task": ("a run", 1)}  # a worker busy on GPU 0's first slot
    assert pipeline.distinct_gpu_slots(2) == [1, 2]


# --------------------------------------------------------------------------- one command, both stages

def _round_1_run(root):
    return root / "runs" / "digits" / "rate1" / "st" / "at" / "imp" / "s50.00" / "seed1"


@pytest.mark.slow
def test_one_command_runs_stage_1_and_starts_round_1_before_the_last_round(tmp_path):
    _theta(tmp_path / "at.pt")
    grid = write_grid(tmp_path)
    planned = [r.run_dir for r in sweep.expand(sweep.load_grid(grid, missing_ok=True))]
    proc = _sweep("run", grid, "--workers", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tickets = tmp_path / "tickets" / "at_imp"
    assert json.loads((tickets / "sparsity.json").read_text()) == {"1": 50.0, "2": 75.0, "3": 87.5}
    assert all((d / "results.json").is_file() for d in planned)  # the directories plan listed are the real ones
    # the proof of the pipeline: round 1's run wrote its config.json (at its start) before stage 1 wrote round 3
    started = (_round_1_run(tmp_path) / "config.json").stat().st_mtime_ns
    assert started < (tickets / "tickets" / "round_03.pt").stat().st_mtime_ns, proc.stdout
    assert "stage 1 at_imp: round 1 ticket written (50.00%); its 1 run(s) queued" in proc.stdout
    status = _sweep("status", grid)
    assert status.returncode == 0, status.stderr
    row = next(ln for ln in status.stdout.splitlines() if ln.startswith("at_imp "))
    assert "round 3 of 3" in row and row.split()[-2:] == ["done", "1"], row
    assert status.stdout.strip().splitlines()[-1].startswith("done 3 of 3 runs")
    again = _sweep("run", grid, "--workers", "2")
    assert again.returncode == 0 and "stage 1 already finished: at_imp" in again.stdout, again.stdout


@pytest.mark.slow
def test_interrupted_study_resumes_both_stages(tmp_path):
    _theta(tmp_path / "at.pt")
    grid = write_grid(tmp_path)
    tickets = tmp_path / "tickets" / "at_imp"
    sweeper = subprocess.Popen([sys.executable, str(SWEEP), "run", str(grid), "--workers", "2"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (tickets / "tickets" / "round_01.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sweeper.poll() is None
    sweeper.send_signal(signal.SIGTERM)
    output, _ = sweeper.communicate(timeout=300)
    assert sweeper.returncode == 75, output
    assert "rerun the same command to resume both stages" in output
    assert not (tickets / "tickets" / "round_03.pt").exists(), output  # stage 1 was stopped part-way
    again = _sweep("run", grid, "--workers", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    log = (tickets / ".sweep.log").read_text()
    assert "attempt 1" in log and "resuming" in log  # stage 1 went on from its checkpoint
    assert all((d.parent.parent / s / "seed1" / "results.json").is_file()
               for d in [_round_1_run(tmp_path)] for s in ("s50.00", "s75.00", "s87.50"))


@pytest.mark.slow
def test_a_failed_stage_1_job_holds_back_only_its_runs(tmp_path):
    _theta(tmp_path / "at.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    entries = ['[stage1.at_omp]', 'pretrain = "at"', 'method = "omp"', '[stage1.at_omp.flags]',
               'dataset = "digits"', 'arch = "resnet_tiny"', "cifar_stem = true", "rate = 0.5", "rounds = 2",
               '[stage1.bad_omp]', 'pretrain = "bad"', 'method = "omp"', '[stage1.bad_omp.flags]',
               'dataset = "digits"', 'arch = "resnet_tiny"', "cifar_stem = true", "rate = 0.5", "rounds = 2"]
    pretrain = ['[pretrain.at]', 'init = "at.pt"', 'tickets = ["tickets/at_omp"]',
                '[pretrain.bad]', 'init = "bad.pt"', 'tickets = ["tickets/bad_omp"]']
    grid = write_grid(tmp_path, entries=entries, pretrain=pretrain)
    proc = _sweep("run", grid, "--workers", "2", "--retries", "0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stage 1 bad_omp: FAILED" in proc.stdout
    assert "2 of 4 runs done, 0 failed, 2 held back by a failed stage-1 job" in proc.stdout
    runs = sweep.expand(sweep.load_grid(grid))
    assert {r.pretrain for r in runs if r.done} == {"at"}
    assert not any(r.run_dir.exists() for r in runs if r.pretrain == "bad")  # never started
    assert (tmp_path / "tickets" / "bad_omp" / ".sweep-failed.json").is_file()
    status = _sweep("status", grid)
    assert status.returncode == 0, status.stderr
    row = next(ln for ln in status.stdout.splitlines() if ln.startswith("bad_omp "))
    assert "round 0 of 2  failed" in row, status.stdout
    why = status.stdout.split("failed stage-1 jobs:")[1].splitlines()[1]
    assert why.startswith("  bad_omp: ") and "2 runs wait on its tickets" in why, status.stdout


# --------------------------------------------------------------------------- the paper's grids

GRIDS = REPO / "script" / "grids"


def test_the_papers_grids_make_every_ticket_directory_they_read_and_agree_on_them():
    import tomllib

    seen = {}
    for name in ("fig3", "fig4", "fig5"):
        spec = tomllib.loads((GRIDS / f"{name}.toml").read_text(encoding="utf-8"))
        made = {f"tickets/{entry}" for entry in spec["stage1"]}
        assert made == {t for table in spec["pretrain"].values() for t in table["tickets"]}, name
        for entry, table in spec["stage1"].items():
            assert seen.setdefault(entry, table) == table, (name, entry)  # one directory, one stage-1 command
            label, _, kind = entry.partition("_")
            assert table["pretrain"] == label and table["method"] == kind.split("_")[0]
            assert table.get("retrain") == (kind.split("_")[1] if kind.startswith("imp") else None)
            assert table["flags"]["dataset"] == "imagenet" and table["flags"]["arch"] == "resnet50"
    assert seen["at_imp_at"]["retrain"] == "at"


def test_fig4_plans_in_a_fresh_clone(capsys):
    """No θ_p, no tickets: θ_AT runs at the full data only, with the adversarially re-trained IMP arm."""
    assert not (GRIDS / "weights").exists() and not (GRIDS / "tickets").exists()
    lines = _plan(capsys, GRIDS / "fig4.toml")
    stage1 = [ln.split()[4] for ln in lines if ln.startswith("stage1 ")]
    assert [Path(d).name for d in stage1] == ["at_imp_st", "at_imp_at", "at_omp", "at_rp"]
    runs = [Path(ln.split()[1]).relative_to(GRIDS / "runs" / "study") for ln in lines if ln.startswith("pending  ")]
    assert len(runs) == 1386 and "1386 runs: 0 done, 1386 pending" in lines
    assert {r.parts[1] for r in runs} == {"rate1"} and {r.parts[3] for r in runs} == {"at"}
    assert {r.parts[4] for r in runs} == {"dense", "imp", "imp-at", "omp", "rp"}
    assert {r.parts[5] for r in runs if r.parts[4] == "imp-at"} == {
        f"s{100 * (1 - 0.8 ** k):05.2f}" for k in range(1, 20)}
    assert [ln for ln in lines if ln.startswith("missing: ")] == [
        f"missing: [pretrain.at] init '{GRIDS / 'weights' / 'at.pt'}': θ_p is not there yet (`run` needs it)"]
    assert not (GRIDS / "runs").exists() and not (GRIDS / "tickets").exists()
