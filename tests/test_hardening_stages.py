"""Hardening round 3 (issue 27), the stages' part: a finished run is decided under the directory lock
and never touched again; chance level is a failure, not a result; every stage-1 method checks its
tickets and sparsity.json on resume; a second SIGTERM still exits 75; a failed write inside
torch.save, a damaged results.json or config.json are one line and exit 2; --pretrain is a name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_downstream
import main_imp_pretrain
import pruning_utils
from training.chance import check_chance_level
from utils import checkpoint as ckpt_module
from utils import rundir
from utils.checkpoint import atomic_save, safe_load
from utils.cli import label, run_main
from utils.errors import EXIT_PREEMPTED, UserError
from utils.rundir import NON_SEMANTIC_KEYS, release_locks

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "resnet_tiny", "--cifar-stem", "--no-progress", "--batch-size", "32"]


@pytest.fixture(autouse=True)
def _free_locks():
    yield
    release_locks()


def _stage2(out, *extra, epochs=1, lr=0.01):
    return ["--dataset", "digits", "--init", "none", "--pretrain", "std", "--epochs", str(epochs), "--lr", str(lr),
            "--test-steps", "0", "--save-dir", str(out), *TINY, *map(str, extra)]


def _stage1(out, method, *extra):
    # OMP and RP train nothing: the training flags would be refused as having no effect on them
    training = ["--epochs-per-round", "1", "--lr", "0.01", "--batch-size", "32", "--no-progress"]
    return ["--dataset", "digits", "--classes", "0-4", "--init", "none", "--pretrain", "std", "--method", method,
            "--rate", "0.5", "--rounds", "2", "--arch", "resnet_tiny", "--cifar-stem", "--save-dir", str(out),
            *(training if method in ("imp", "lmp") else []), *map(str, extra)]


def _exit(main, argv, capsys):
    """(exit status, stderr) of the command line ``argv`` run through the entry points' error boundary."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_main(main, [str(a) for a in argv])
    return info.value.code, capsys.readouterr().err


def _one_line(err):
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err


def _snapshot(run_dir):
    """Every file of a run with its bytes and mtime (the lock file aside: taking it is how a run decides)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(run_dir).rglob("*")) if p.is_file() and p.name != rundir.LOCK_NAME}


# ----------------------------------------------------------------------------- finished means finished, under the lock

def _second_run_reaches_the_lock_after_the_first(monkeypatch, main, argv):
    """Run ``argv`` twice such that the second run reaches the directory lock only once the first one has
    finished and released it (the acquire of the second runs the first to its end, then proceeds), as a
    requeued task and its late original do. Returns the finished run's files as the first left them."""
    real_acquire = rundir.RunDirLock.acquire
    state = {"first": None}

    def acquire(lock):
        if state["first"] is None:
            state["first"] = "running"
            main(argv)  # the first run, from start to end, with the plain acquire below
            state["first"] = _snapshot(lock.dir)
        return real_acquire(lock)

    monkeypatch.setattr(rundir.RunDirLock, "acquire", acquire)
    main(argv)
    return state["first"]


def test_stage2_run_that_reaches_the_lock_after_a_finished_one_touches_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    finished = _second_run_reaches_the_lock_after_the_first(monkeypatch, main_downstream.main, _stage2(out))
    assert "results.json" in finished and "checkpoint.pt" not in finished
    assert _snapshot(out) == finished  # bytes and mtimes
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith(f"already finished: {out}")


@pytest.mark.parametrize("method", ["omp", "imp"])
def test_stage1_run_that_reaches_the_lock_after_a_finished_one_touches_nothing(tmp_path, monkeypatch, capsys, method):
    out = tmp_path / method
    finished = _second_run_reaches_the_lock_after_the_first(monkeypatch, main_imp_pretrain.main, _stage1(out, method))
    assert {"tickets/round_01.pt", "tickets/round_02.pt", "sparsity.json"} <= set(finished)
    assert _snapshot(out) == finished
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith(f"already finished: {out}: 2 ")


def test_a_finished_stage1_run_is_still_refused_for_another_command_or_restart(tmp_path):
    out = tmp_path / "omp"
    main_imp_pretrain.main(_stage1(out, "omp"))
    release_locks()
    before = _snapshot(out)
    with pytest.raises(UserError, match="different configuration.*exclude_stem"):
        main_imp_pretrain.main(_stage1(out, "omp", "--exclude-stem"))
    release_locks()
    with pytest.raises(UserError, match="--restart refuses to discard"):
        main_imp_pretrain.main(_stage1(out, "omp", "--restart"))
    assert _snapshot(out) == before


# ----------------------------------------------------------------------------- chance level is a failure

def test_chance_level_is_a_failure_unless_allowed(tmp_path, capsys):
    out = tmp_path / "run"
    argv = _stage2(out, epochs=2, lr=3)
    code, err = _exit(main_downstream.main, argv, capsys)
    assert code == 2 and _one_line(err), err
    assert "chance level" in err and "--lr 3" in err and "--restart" in err and "--allow-chance" in err
    assert not (out / "results.json").exists()
    assert safe_load(out / "checkpoint.pt")["state"]["epoch"] == 2 and (out / "model_best.pt").exists()
    release_locks()
    # the same command says so again without training; with --allow-chance it resumes and keeps the result
    assert _exit(main_downstream.main, argv, capsys)[0] == 2
    release_locks()
    main_downstream.main([*argv, "--allow-chance"])
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["allow_chance"] is True and res["config"]["chance_level"] is True
    assert len(res["history"]) == 2


def test_allow_chance_is_no_part_of_what_a_run_computes(tmp_path):
    assert "allow_chance" in NON_SEMANTIC_KEYS
    out = tmp_path / "run"
    main_downstream.main(_stage2(out, "--allow-chance"))
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["allow_chance"] is True and config["chance_level"] is False
    # without the flag a run records neither key: no result is at chance
    plain = tmp_path / "plain"
    main_downstream.main(_stage2(plain))
    config = json.loads((plain / "results.json").read_text())["config"]
    assert "allow_chance" not in config and "chance_level" not in config


def test_chance_bound_is_two_points_above_one_over_classes(tmp_path):
    state = {"best": {"epoch": 0, "score": 12.0}, "history": [{"epoch": 0, "val_sa": 12.0}]}
    args = main_downstream.parse_args(_stage2(tmp_path / "r"))
    with pytest.raises(UserError, match="chance level.*kept"):
        check_chance_level(args, state, 10, "kept.")
    state["history"][0]["val_sa"] = 12.01
    assert check_chance_level(args, state, 10, "kept.") == {}
    state["history"][0]["val_sa"] = 3.0  # 100 classes: chance 1%, bound 3%
    with pytest.raises(UserError):
        check_chance_level(args, state, 100, "kept.")
    state["best"] = {"epoch": -1, "score": None}  # FAT's guard kept the start: no validated epoch to judge
    assert check_chance_level(args, state, 100, "kept.") == {}


# ----------------------------------------------------------------------------- stage-1 tickets on resume

@pytest.mark.parametrize("method", ["omp", "rp"])
def test_omp_rp_recompute_a_truncated_ticket_of_a_finished_run(tmp_path, capsys, method):
    out = tmp_path / method
    argv = _stage1(out, method)
    main_imp_pretrain.main(argv)
    release_locks()
    good = pruning_utils.load_ticket(out / "tickets" / "round_02.pt")
    data = (out / "tickets" / "round_02.pt").read_bytes()
    (out / "tickets" / "round_02.pt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    main_imp_pretrain.main(argv)
    assert "recomputed" in capsys.readouterr().out
    again = pruning_utils.load_ticket(out / "tickets" / "round_02.pt")
    assert all(torch.equal(again["masks"][n], m) for n, m in good["masks"].items())


def test_omp_recomputes_a_ticket_of_another_round_copied_in_its_place(tmp_path, capsys):
    out = tmp_path / "omp"
    argv = _stage1(out, "omp")
    main_imp_pretrain.main(argv)
    release_locks()
    good = pruning_utils.load_ticket(out / "tickets" / "round_02.pt")
    (out / "tickets" / "round_02.pt").write_bytes((out / "tickets" / "round_01.pt").read_bytes())
    main_imp_pretrain.main(argv)
    assert "records round 1" in capsys.readouterr().out
    again = pruning_utils.load_ticket(out / "tickets" / "round_02.pt")
    assert again["round"] == 2 and all(torch.equal(again["masks"][n], m) for n, m in good["masks"].items())


def test_imp_reports_a_ticket_that_does_not_match_sparsity_json(tmp_path, capsys):
    out = tmp_path / "imp"
    argv = _stage1(out, "imp")
    main_imp_pretrain.main(argv)
    release_locks()
    levels = json.loads((out / "sparsity.json").read_text())
    (out / "sparsity.json").write_text(json.dumps({**levels, "1": 33.0}))
    code, err = _exit(main_imp_pretrain.main, argv, capsys)
    assert code == 2 and _one_line(err) and "sparsity.json lists 33.00%" in err and "round_01.pt" in err, err
    release_locks()
    (out / "sparsity.json").write_text(json.dumps(levels))
    (out / "tickets" / "round_01.pt").write_bytes((out / "tickets" / "round_02.pt").read_bytes())
    code, err = _exit(main_imp_pretrain.main, argv, capsys)
    assert code == 2 and _one_line(err) and "records round 2" in err, err


def test_imp_does_not_say_done_while_sparsity_json_lacks_a_ticket_on_disk(tmp_path, capsys):
    out = tmp_path / "imp"
    argv = _stage1(out, "imp")
    main_imp_pretrain.main(argv)
    release_locks()
    (out / "sparsity.json").write_text(json.dumps({"1": json.loads((out / "sparsity.json").read_text())["1"]}))
    code, err = _exit(main_imp_pretrain.main, argv, capsys)
    assert code == 2 and _one_line(err) and "round_02.pt' is not listed in sparsity.json" in err, err


@pytest.mark.parametrize("method", ["omp", "imp"])
def test_sparsity_json_holding_null_is_one_line(tmp_path, capsys, method):
    out = tmp_path / method
    argv = _stage1(out, method)
    main_imp_pretrain.main(argv)
    release_locks()
    (out / "sparsity.json").write_text("null")
    code, err = _exit(main_imp_pretrain.main, argv, capsys)
    assert code == 2 and _one_line(err) and "sparsity.json" in err and "null" in err, err
    release_locks()
    main_imp_pretrain.main([*argv, "--restart"])  # an unfinished run: --restart finds the tickets again
    assert sorted(json.loads((out / "sparsity.json").read_text())) == ["1", "2"]


def test_omp_rewrites_the_sparsity_json_entry_it_lacks(tmp_path):
    out = tmp_path / "omp"
    argv = _stage1(out, "omp")
    main_imp_pretrain.main(argv)
    release_locks()
    full = (out / "sparsity.json").read_text()
    (out / "sparsity.json").write_text(json.dumps({"2": json.loads(full)["2"]}))
    main_imp_pretrain.main(argv)
    assert (out / "sparsity.json").read_text() == full


# ----------------------------------------------------------------------------- a second SIGTERM

_TWO_SIGTERMS = """
import os, signal, sys
from training import setup
from utils.cli import run_main
from utils.errors import Preempted
from utils.preemption import StopRequest

class Args:
    save_dir = sys.argv[1]

def run(args, stop):
    os.kill(os.getpid(), signal.SIGTERM)  # the first: the run saves at a step boundary and stops
    assert stop.requested
    raise Preempted("stopped after step 3 of the epoch on request")

release = setup.release_run_locks
def release_then_second_signal():  # after the stop handlers are gone, as scancel's and torchrun's both land
    release()
    os.kill(os.getpid(), signal.SIGTERM)
setup.release_run_locks = release_then_second_signal
run_main(lambda argv: setup.run_stoppable(run, Args, StopRequest()))
"""


def test_a_second_sigterm_still_exits_75(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _TWO_SIGTERMS, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == EXIT_PREEMPTED, (proc.returncode, proc.stderr)
    assert (tmp_path / ".preempted").exists()


# ----------------------------------------------------------------------------- a write failing inside torch.save

def _failing_torch_save(monkeypatch, when):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if when(Path(os.readlink(f"/proc/self/fd/{f.fileno()}"))):  # the temporary file being written
            f.write(b"PK\x03\x04 half a zip")
            raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_zip_writer_failure_inside_torch_save_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"epoch": 1}, path)
    old = path.read_bytes()
    _failing_torch_save(monkeypatch, lambda p: True)
    code, err = _exit(lambda argv: atomic_save({"epoch": 2}, path), [], capsys)
    assert code == 2 and _one_line(err), err
    assert f"cannot write '{path}'" in err and "file write failed" in err and "free space" in err
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert ckpt_module._zip_writer_failure(RuntimeError("PytorchStreamWriter failed writing file version"))
    assert not ckpt_module._zip_writer_failure(RuntimeError("CUDA out of memory"))


def test_stage2_disk_full_inside_torch_save_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    checkpoints = []

    def second_checkpoint(p):
        if not p.name.startswith(".checkpoint.pt."):
            return False
        checkpoints.append(p)
        return len(checkpoints) == 2

    _failing_torch_save(monkeypatch, second_checkpoint)
    code, err = _exit(main_downstream.main, _stage2(out, epochs=2), capsys)
    assert code == 2 and _one_line(err) and f"cannot write '{out / 'checkpoint.pt'}'" in err, err
    assert safe_load(out / "checkpoint.pt")["state"]["epoch"] == 1  # the epoch-1 checkpoint, intact
    assert not (out / "results.json").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- damaged results.json / config.json

@pytest.mark.parametrize("name,content", [("results.json", b'{"sa": 7'), ("config.json", b'{"lr": 0.0'),
                                          ("results.json", b"\xff\xfe"), ("config.json", b"[1, 2]"),
                                          ("results.json", b'{"sa": null}')])
def test_damaged_files_of_a_finished_stage2_run_are_one_line(tmp_path, capsys, name, content):
    out = tmp_path / "run"
    main_downstream.main(_stage2(out))
    release_locks()
    (out / name).write_bytes(content)
    code, err = _exit(main_downstream.main, _stage2(out), capsys)
    assert code == 2 and _one_line(err) and str(out / name) in err, err
    assert (out / name).read_bytes() == content


@pytest.mark.parametrize("content", [b'{"rounds": 2, "lr"', b"\xff\xfe", b"[1]"])
def test_damaged_config_of_a_stage1_run_is_one_line(tmp_path, capsys, content):
    out = tmp_path / "omp"
    main_imp_pretrain.main(_stage1(out, "omp"))
    release_locks()
    (out / "config.json").write_bytes(content)
    code, err = _exit(main_imp_pretrain.main, _stage1(out, "omp"), capsys)
    assert code == 2 and _one_line(err) and str(out / "config.json") in err, err


# ----------------------------------------------------------------------------- labels are names

@pytest.mark.parametrize("bad", ["../../x", "a/b", ".", "..", "", "std at", "x\n"])
def test_pretrain_labels_that_are_no_names_are_refused_by_both_stages(tmp_path, capsys, bad):
    for main in (main_downstream.main, main_imp_pretrain.main):
        argv = _stage2(tmp_path / "r") if main is main_downstream.main else _stage1(tmp_path / "r", "omp")
        argv[argv.index("--pretrain") + 1] = bad
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and "--pretrain" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_label_accepts_names():
    for name in ("std", "fat", "at", "at-8_255.v2", "..x", "A1"):
        assert label(name) == name
