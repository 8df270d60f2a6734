"""script/sweep.py against stale runs, overriding flags, shared directories, path-like labels,
linked control files and damaged files (issue 27): each refusal is one line and exit status 2, and
`status` shows a damaged run as failed, never as done."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "script" / "sweep.py"
FLAGS = ['arch = "resnet_tiny"', "cifar_stem = true", 'classes = "5-9"', "epochs = 1", "lr = 0.05",
         "batch_size = 128", "no_progress = true", "channels_last = false"]


def _load_sweep():
    spec = importlib.util.spec_from_file_location("sweep_h", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()


def _sweep(*args, timeout=300):
    return subprocess.run([sys.executable, str(SWEEP), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _one_line_refusal(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def _refused(argv, *needles):
    """sweep.main in this process: a UserError of one line (what the script prints, with exit 2)."""
    with pytest.raises(sweep.UserError) as info:
        sweep.main(argv)
    text = str(info.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


def _grid(root, out="runs", flags=(), axes=(), pretrain=None, name="grid.toml"):
    """A dense-only grid (θ_p "none": nothing to make first), one run unless ``axes`` adds more."""
    pretrain = pretrain or ['[pretrain.std]', 'init = "none"']
    lines = [f'out = "{out}"', *pretrain, "[axes]", 'dataset = ["digits"]', 'regime = ["st"]', "seed = [1]", *axes,
             "[flags]", *FLAGS, *flags]
    path = Path(root) / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _ticket_dir(root, levels, name="std_omp"):
    """A stage-1 directory as the grid reads it (the ticket files are only checked to exist here)."""
    d = Path(root) / name
    (d / "tickets").mkdir(parents=True)
    (d / "sparsity.json").write_text(json.dumps({str(k): v for k, v in levels.items()}))
    (d / "config.json").write_text(json.dumps({"method": "omp", "retrain": None, "pattern": "unstructured",
                                               "rounds": max(levels)}))
    for k in levels:
        (d / "tickets" / f"round_{k:02d}.pt").write_bytes(b"")
    return d


def _run_dir(grid):
    (run,) = sweep.expand(sweep.load_grid(grid))
    return run


def _results(run, **changes):
    obj = {"dataset": run.dataset, "arch": "resnet_tiny", "pretrain": run.pretrain, "method": "dense",
           "sparsity": 0.0, "regime": run.regime, "data_rate": run.data_rate, "seed": run.seed, "sa": 90.0,
           "ra": 10.0, "selected_epoch": 1}
    obj.update(changes)
    return obj


def _finished(run):
    """A finished run directory as main_downstream.py leaves it: its config (the same function the
    stage uses) and a results.json."""
    import main_downstream

    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.json").write_text(json.dumps(main_downstream.config_for(run.argv())))
    (run.run_dir / "results.json").write_text(json.dumps(_results(run)))


def _status(grid):
    lines = sweep.status_lines(sweep.load_grid(grid), sweep.expand(sweep.load_grid(grid)))
    return lines


# --------------------------------------------------------------------------- defect 2: stale runs

@pytest.mark.slow
def test_a_finished_run_is_done_and_after_a_flag_change_stale(tmp_path):
    """A real run: the config the sweep compares with is the one main_downstream.py wrote."""
    grid = _grid(tmp_path)
    proc = _sweep("run", grid, "--workers", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = _sweep("plan", grid)
    assert plan.returncode == 0 and "1 runs: 1 done, 0 pending" in plan.stdout.splitlines(), plan.stdout
    run = _run_dir(grid)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.run_dir.iterdir() if p.is_file()}

    grid.write_text(grid.read_text().replace("epochs = 1", "epochs = 2"))
    plan = _sweep("plan", grid)
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.strip().splitlines()
    assert lines[0].startswith("stale  ") and "epochs: 1 -> 2" in lines[1], lines
    assert any(ln.startswith("1 runs: 0 done, 0 pending, 1 stale") for ln in lines), lines
    status = _sweep("status", grid)
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip().splitlines()[-1] == "done 0 of 1 runs (0 failed, 0 pending, 0 running, 1 stale)"
    assert "epochs: 1 -> 2" in status.stdout
    refused = _sweep("run", grid, "--workers", "1")
    _one_line_refusal(refused, "stale", "epochs: 1 -> 2", "--rerun-stale")
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.run_dir.iterdir() if p.is_file()} == before


def test_rerun_stale_moves_the_old_directory_aside(tmp_path):
    grid = _grid(tmp_path)
    run = _run_dir(grid)
    _finished(run)
    assert _status(grid)[-1] == "done 1 of 1 runs (0 failed, 0 pending, 0 running)"
    results = (run.run_dir / "results.json").read_bytes()

    grid.write_text(grid.read_text().replace("lr = 0.05", "lr = 0.1"))
    assert _status(grid)[-1] == "done 0 of 1 runs (0 failed, 0 pending, 0 running, 1 stale)"
    _refused(["run", str(grid), "--print"], "stale", "lr: 0.05 -> 0.1", "--rerun-stale")
    assert (run.run_dir / "results.json").read_bytes() == results
    proc = _sweep("run", grid, "--print", "--rerun-stale")
    assert proc.returncode == 0, proc.stderr
    aside = [p for p in run.run_dir.parent.iterdir() if p.name.startswith("seed1.stale-")]
    assert len(aside) == 1 and (aside[0] / "results.json").read_bytes() == results  # moved, never deleted
    assert not run.run_dir.exists()
    assert proc.stdout.strip().splitlines() == [_run_dir(grid).command()]  # --print's output: the commands alone
    assert f"moved aside: {run.run_dir} -> {aside[0].name}" in proc.stderr


def test_a_non_semantic_flag_change_is_not_stale(tmp_path):
    grid = _grid(tmp_path)
    run = _run_dir(grid)
    _finished(run)
    grid.write_text(grid.read_text() + "keep_checkpoint = true\ncheckpoint_minutes = 5.0\n")
    assert _status(grid)[-1] == "done 1 of 1 runs (0 failed, 0 pending, 0 running)"


# --------------------------------------------------------------------------- defect 3: [flags] checked

@pytest.mark.parametrize("entry, key", [
    ("see = 7", "see"),  # argparse's prefix matching would read it as --seed 7
    ('"seed=7" = true', "seed=7"),
    ('"save_dir=/tmp/elsewhere" = true', "save_dir=/tmp/elsewhere"),
    ('"init=none" = true', "init=none"),
    ("data_number = 0.5", "data_number"),
    ("pretrained = \"x\"", "pretrained"),
])
def test_flags_that_would_override_an_axis_are_refused_with_their_line(tmp_path, entry, key):
    grid = _grid(tmp_path, flags=[entry])
    line = grid.read_text().splitlines().index(entry) + 1
    _refused(["plan", str(grid)], key, f"line {line}")
    proc = _sweep("plan", grid)
    _one_line_refusal(proc, key, f"line {line}")


def test_a_flag_that_is_no_flag_names_the_nearest(tmp_path):
    grid = _grid(tmp_path, flags=["weight_decy = 0.1"])
    _refused(["plan", str(grid)], "main_downstream.py rejects the grid's flags", "weight_decy", "--weight-decay")


# --------------------------------------------------------------------------- defect 7: one directory per run

def test_two_rounds_of_one_sparsity_are_refused(tmp_path):
    _ticket_dir(tmp_path, {1: 50.001, 2: 50.004})
    grid = _grid(tmp_path, pretrain=['[pretrain.std]', 'init = "none"', 'tickets = ["std_omp"]'])
    _refused(["plan", str(grid)], "two runs map to one directory", "s50.00", "round 1", "round 2")


def test_two_data_rates_of_one_name_are_refused(tmp_path):
    grid = _grid(tmp_path, axes=["data_rate = [0.1, 0.1000000001]"])
    text = _refused(["plan", str(grid)], "two runs map to one directory", "rate0.1")
    assert "0.1000000001" in text and "data rate 0.1," in text


def test_todays_directory_names_are_kept(tmp_path):
    _ticket_dir(tmp_path, {1: 20.0, 2: 36.0, 3: 48.8})
    grid = _grid(tmp_path, axes=["data_rate = [1.0, 0.1, 0.01]"],
                 pretrain=['[pretrain.std]', 'init = "none"', 'tickets = ["std_omp"]'])
    names = {str(r.run_dir.relative_to(tmp_path / "runs")) for r in sweep.expand(sweep.load_grid(grid))}
    assert "digits/rate0.01/st/std/omp/s48.80/seed1" in names and "digits/rate1/st/std/dense/seed1" in names
    assert "digits/rate0.1/st/std/omp/s20.00/seed1" in names


# --------------------------------------------------------------------------- defect 10: labels are names

@pytest.mark.parametrize("label", ["../../x", "..", ".", "a b", "x/y"])
def test_pretrain_labels_are_names(tmp_path, label):
    grid = _grid(tmp_path, pretrain=[f'[pretrain."{label}"]', 'init = "none"'])
    proc = _sweep("plan", grid)
    _one_line_refusal(proc, "not a plain name", "line 2")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- defect 5: control files

@pytest.mark.parametrize("name", [".sweep.lock", ".sweep.log", ".sweep-failed.json"])
def test_a_control_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, name):
    grid = _grid(tmp_path)
    run = _run_dir(grid)
    run.run_dir.mkdir(parents=True)
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    (run.run_dir / name).symlink_to(target)
    proc = _sweep("run", grid, "--workers", "1")
    _one_line_refusal(proc, name, "symbolic link")
    assert target.read_text() == "keep me\n" and target.stat().st_mtime_ns == 1_000_000_000
    assert not (run.run_dir / "config.json").exists()


def test_control_files_are_opened_without_following_links(tmp_path):
    from study import rundirs

    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in (".sweep.lock", ".sweep.log"):
        (run_dir / name).symlink_to(target)
    with pytest.raises(sweep.UserError, match="symbolic link"), rundirs.sweep_lock(run_dir):
        pass
    with pytest.raises(sweep.UserError, match="symbolic link"):
        rundirs.open_log(run_dir)
    with pytest.raises(sweep.UserError, match="symbolic link"):
        rundirs.last_error_line(run_dir)
    (tmp_path / "tmp.txt").write_text("keep me too\n")
    (run_dir / f".sweep-failed.json.{os.getpid()}.tmp").symlink_to(tmp_path / "tmp.txt")
    with pytest.raises(sweep.UserError, match="symbolic link"):
        rundirs.record_failure(run_dir, 1, 1)
    assert target.read_text() == "keep me\n" and (tmp_path / "tmp.txt").read_text() == "keep me too\n"


# --------------------------------------------------------------------------- one reader per file kind

DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_text('{"dataset": "digits", "sa": 9'),
    "not UTF-8": lambda p: p.write_bytes(b'{"dataset": "\xff\xfe"}'),
    "wrong JSON type": lambda p: p.write_text("[1, 2]"),
    "null": lambda p: p.write_text("null"),
    "a directory": lambda p: p.mkdir(),
}


def _damage(path, kind, fields=None):
    if kind == "null fields":
        path.write_text(json.dumps({k: None for k in fields}))
    else:
        DAMAGE[kind](path)


@pytest.mark.parametrize("kind", [*DAMAGE, "null fields"])
def test_a_damaged_results_json_is_never_done(tmp_path, kind):
    grid = _grid(tmp_path)
    run = _run_dir(grid)
    _finished(run)
    (run.run_dir / "results.json").unlink()
    _damage(run.run_dir / "results.json", kind, _results(run))
    _refused(["plan", str(grid)], "results.json")
    _refused(["run", str(grid), "--print"], "results.json")
    lines = _status(grid)
    assert lines[-1] == "done 0 of 1 runs (1 failed, 0 pending, 0 running)", lines
    assert any("invalid: results file" in ln for ln in lines), lines


@pytest.mark.parametrize("kind", [*DAMAGE])
def test_a_damaged_config_json_is_one_line(tmp_path, kind):
    grid = _grid(tmp_path)
    run = _run_dir(grid)
    run.run_dir.mkdir(parents=True)
    _damage(run.run_dir / "config.json", kind)
    _refused(["plan", str(grid)], "config.json")
    _refused(["run", str(grid), "--print"], "config.json")
    lines = _status(grid)
    assert lines[-1] == "done 0 of 1 runs (1 failed, 0 pending, 0 running)", lines
    assert any("invalid: run config" in ln for ln in lines), lines


def test_a_config_json_with_null_fields_is_stale_not_done(tmp_path):
    grid = _grid(tmp_path)
    run = _run_dir(grid)
    _finished(run)
    config = json.loads((run.run_dir / "config.json").read_text())
    (run.run_dir / "config.json").write_text(json.dumps({k: None for k in config}))
    assert _status(grid)[-1] == "done 0 of 1 runs (0 failed, 0 pending, 0 running, 1 stale)"
    _refused(["run", str(grid), "--print"], "stale")


@pytest.mark.parametrize("kind", [*DAMAGE, "null fields"])
def test_a_damaged_sparsity_json_is_one_line(tmp_path, kind):
    d = _ticket_dir(tmp_path, {1: 50.0})
    (d / "sparsity.json").unlink()
    _damage(d / "sparsity.json", kind, ["1"])
    grid = _grid(tmp_path, pretrain=['[pretrain.std]', 'init = "none"', 'tickets = ["std_omp"]'])
    for command in (["plan"], ["run", "--print"], ["status"]):
        _refused([command[0], str(grid), *command[1:]], "sparsity.json")


@pytest.mark.parametrize("kind", ["binary", "not UTF-8", "a directory"])
def test_a_damaged_log_csv_makes_the_run_failed_in_status(tmp_path, kind):
    grid = _grid(tmp_path)
    run = _run_dir(grid)
    _finished(run)
    log = run.run_dir / "log.csv"
    if kind == "binary":
        log.write_bytes(b"epoch,seconds\n\x00\x01\x02\n")
    elif kind == "not UTF-8":
        log.write_bytes(b"epoch,seconds\n1,\xff\n")
    else:
        log.mkdir()
    lines = _status(grid)
    assert lines[-1] == "done 0 of 1 runs (1 failed, 0 pending, 0 running)", lines
    assert any("invalid: training log" in ln for ln in lines), lines
    proc = _sweep("status", grid)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("kind", [*DAMAGE, "null fields"])
def test_a_damaged_failure_record_is_still_a_failed_run(tmp_path, kind):
    grid = _grid(tmp_path)
    run = _run_dir(grid)
    run.run_dir.mkdir(parents=True)
    _damage(run.run_dir / ".sweep-failed.json", kind, ["exit_status", "attempts", "error"])
    lines = _status(grid)
    assert lines[-1] == "done 0 of 1 runs (1 failed, 0 pending, 0 running)", lines
    assert any("failure record" in ln for ln in lines), lines


def test_status_with_every_kind_damaged_has_no_traceback(tmp_path):
    grid = _grid(tmp_path)
    run = _run_dir(grid)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "results.json").mkdir()
    proc = _sweep("status", grid)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "done 0 of 1 runs (1 failed, 0 pending, 0 running)"
    _one_line_refusal(_sweep("plan", grid), "results.json", "is a directory")


# --------------------------------------------------------------------------- the grid file itself

@pytest.mark.parametrize("rounds", ["[1, 1]", "[2, 1]"])
def test_rounds_must_increase(tmp_path, rounds):
    _ticket_dir(tmp_path, {1: 50.0, 2: 75.0})
    grid = _grid(tmp_path, axes=[f"rounds = {rounds}"],
                 pretrain=['[pretrain.std]', 'init = "none"', 'tickets = ["std_omp"]'])
    _refused(["plan", str(grid)], "rounds must list each round once, in increasing order")


def test_a_grid_that_is_not_utf8_is_one_line(tmp_path):
    grid = _grid(tmp_path)
    grid.write_bytes(grid.read_bytes().replace(b'"5-9"', b'"5-9\xff"'))
    line = grid.read_bytes().split(b"\n").index(b'classes = "5-9\xff"') + 1
    for command in ("plan", "status"):
        _one_line_refusal(_sweep(command, grid), "not UTF-8", f"line {line}")


# --------------------------------------------------------------------------- [flags] only where they apply

def test_flags_go_only_to_the_runs_they_act_on(tmp_path):
    grid = _grid(tmp_path, axes=['regime = ["st", "at"]'], flags=["keep_sa_best = true", "train_steps = 1"])
    grid.write_text(grid.read_text().replace('regime = ["st"]\n', ""))
    runs = {r.regime: r for r in sweep.expand(sweep.load_grid(grid))}
    assert "--keep-sa-best" not in runs["st"].argv() and "--train-steps" not in runs["st"].argv()
    assert "--keep-sa-best" in runs["at"].argv() and "--train-steps" in runs["at"].argv()
    proc = _sweep("plan", grid)
    assert proc.returncode == 0, proc.stderr
    notes = proc.stderr.split("cost of ")[0].strip().splitlines()  # the notes, then plan's cost report
    assert len(notes) == 2 and all(n.startswith("note: --") and "left out of 1 of 2 runs" in n for n in notes), notes
    assert any(n.startswith("note: --keep-sa-best:") and "--regime at and fat" in n for n in notes), notes
    assert "2 runs: 0 done, 2 pending" in proc.stdout.splitlines()


def test_a_flag_that_acts_on_no_run_is_refused(tmp_path):
    grid = _grid(tmp_path, flags=["keep_sa_best = true"])
    line = grid.read_text().splitlines().index("keep_sa_best = true") + 1
    _one_line_refusal(_sweep("plan", grid), "keep_sa_best", "no effect on any run", f"line {line}")


def test_a_setting_without_effect_does_not_make_a_finished_run_stale(tmp_path):
    """A run made when the grid still passed --train-steps to st runs is not another run for it."""
    grid = _grid(tmp_path)
    run = _run_dir(grid)
    _finished(run)
    config = json.loads((run.run_dir / "config.json").read_text())
    (run.run_dir / "config.json").write_text(json.dumps({**config, "train_steps": 1}))
    assert _status(grid)[-1] == "done 1 of 1 runs (0 failed, 0 pending, 0 running)"
    (run.run_dir / "results.json").unlink()  # unfinished: a resume compares every setting, so it is stale
    assert _status(grid)[-1] == "done 0 of 1 runs (0 failed, 0 pending, 0 running, 1 stale)"


def test_a_context_flag_written_as_a_string_is_read_as_the_parser_reads_it(tmp_path):
    grid = _grid(tmp_path, axes=['regime = ["at"]'], flags=['test_steps = "2"', "keep_sa_best = true"])
    grid.write_text(grid.read_text().replace('regime = ["st"]\n', ""))
    (run,) = sweep.expand(sweep.load_grid(grid))
    assert "--keep-sa-best" in run.argv() and "--test-steps" in run.argv()
