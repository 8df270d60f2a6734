"""Hardening (issue 15): one writer per run directory, leftovers of killed writes, --restart,
files that are not checkpoints, damaged θ_p, out-of-range flags, full disks and permissions."""

import errno
import fcntl
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

import main_downstream
import main_imp_pretrain
import models
import pruning_utils
from utils import checkpoint as ckpt_module
from utils import rundir
from utils.checkpoint import atomic_write_json, safe_load
from utils.cli import environment_error_message, run_main
from utils.errors import UserError
from utils.rundir import (
    NON_SEMANTIC_KEYS,
    RunDirLock,
    config_differences,
    lock_holder,
    prepare_run_dir,
    release_locks,
    run_finished,
)

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
TINY = ["--arch", "resnet_tiny", "--cifar-stem", "--no-progress", "--batch-size", "32"]


@pytest.fixture(autouse=True)
def _free_locks():
    yield
    release_locks()


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _stage2(out, *extra, epochs=1, init="none"):
    return ["--dataset", "digits", "--init", str(init), "--epochs", str(epochs), "--lr", "0.01", "--save-dir", str(out),
            *TINY, *map(str, extra)]


def _cli(script, argv):
    return [sys.executable, str(REPO / script), *map(str, argv)]


# ----------------------------------------------------------------------------- the run-directory lock

_HOLDER = """
import sys, time
from utils.rundir import RunDirLock
RunDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _start_holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], env=_env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_names_a_live_holder_and_vanishes_with_it_even_after_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    assert lock_holder(run_dir) is None  # no directory yet
    proc = _start_holder(run_dir)
    try:
        assert lock_holder(run_dir) == f"{proc.pid}@{HOST}"
        assert lock_holder(run_dir) == f"{proc.pid}@{HOST}"  # asking twice disturbs nothing
        with pytest.raises(UserError, match=rf"in use by another run \(PID {proc.pid} on host {HOST}"):
            RunDirLock(run_dir).acquire()
        with pytest.raises(UserError, match=str(proc.pid)):
            prepare_run_dir(run_dir, {"lr": 0.1})
        assert not (run_dir / "config.json").exists()  # refused before the config was checked or written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock_holder(run_dir) is None  # the OS dropped the killed holder's lock
    with RunDirLock(run_dir) as lock:
        assert lock.held and lock_holder(run_dir) == f"{os.getpid()}@{HOST}"
    assert lock_holder(run_dir) is None


def test_prepare_run_dir_holds_the_lock_until_release_locks(tmp_path):
    run_dir = tmp_path / "run"
    assert prepare_run_dir(run_dir, {"lr": 0.1}) is False
    assert lock_holder(run_dir) == f"{os.getpid()}@{HOST}"
    assert prepare_run_dir(run_dir, {"lr": 0.1}) is True  # the same process may prepare again (a resume)
    # another process is refused while this one holds the directory
    probe = subprocess.run([sys.executable, "-c", "import sys; from utils.rundir import prepare_run_dir; "
                            "prepare_run_dir(sys.argv[1], {'lr': 0.1})", str(run_dir)],
                           env=_env(), capture_output=True, text=True)
    assert probe.returncode != 0 and f"PID {os.getpid()} on host {HOST}" in probe.stderr
    # ranks other than the primary never lock: they only read what the primary wrote
    assert prepare_run_dir(run_dir, {"lr": 0.1}, primary=False) is True
    release_locks()
    assert lock_holder(run_dir) is None
    # a refused configuration gives back a lock it took itself
    with pytest.raises(UserError):
        prepare_run_dir(run_dir, {"lr": 0.2})
    assert lock_holder(run_dir) is None


def test_a_lock_holder_probe_at_the_moment_a_run_starts_does_not_refuse_it(tmp_path):
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):
        pass
    probe = os.open(run_dir / ".lock", os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # what lock_holder holds for an instant
    threading.Timer(0.05, os.close, (probe,)).start()
    with RunDirLock(run_dir) as lock:
        assert lock.held


def test_lock_file_is_a_dot_file_that_does_not_make_a_directory_foreign(tmp_path):
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):
        pass
    assert (run_dir / ".lock").exists()
    assert prepare_run_dir(run_dir, {"lr": 0.1}) is False


def _exit_code_and_stderr(main, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_main(main, [str(a) for a in argv])
    return info.value.code, capsys.readouterr().err


def test_stage2_run_refused_while_another_process_holds_its_directory(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _start_holder(out)
    try:
        code, err = _exit_code_and_stderr(main_downstream.main, _stage2(out), capsys)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert code == 2 and f"PID {holder.pid} on host {HOST}" in err and "Traceback" not in err, err
    assert not (out / "config.json").exists() and not (out / "results.json").exists()


@pytest.mark.slow
def test_two_stage2_runs_started_together_one_is_refused(tmp_path):
    out = tmp_path / "run"
    procs = [subprocess.Popen(_cli("main_downstream.py", _stage2(out, "--seed", 5, epochs=4)), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    pids = {p.pid for p in procs}
    seen = set()
    while any(p.poll() is None for p in procs):
        holder = lock_holder(out)
        if holder is not None:
            seen.add(holder)
        time.sleep(0.05)
    results = [(p.returncode, *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [r[2][-1500:] for r in results]
    winner = next(p for p, r in zip(procs, results) if r[0] == 0)
    loser_err = next(r[2] for r in results if r[0] == 2)
    assert f"PID {winner.pid} on host {HOST}" in loser_err and "Traceback" not in loser_err
    assert seen == {f"{winner.pid}@{HOST}"} and winner.pid in pids
    assert lock_holder(out) is None
    res = json.loads((out / "results.json").read_text())
    assert [h["epoch"] for h in res["history"]] == [0, 1, 2, 3]  # one run's history, not two interleaved


# ----------------------------------------------------------------------------- leftovers of killed writes

def test_temporaries_of_killed_writes_are_removed_and_nothing_else(tmp_path, capsys):
    run_dir = tmp_path / "run"
    atomic_write_json({"lr": 0.1}, run_dir / "config.json")
    stale = [run_dir / ".checkpoint.pt.k3j_x9a2.tmp", run_dir / "tickets" / ".round_02.pt.abcdefgh.tmp",
             run_dir / "trajectory" / ".epoch_003.pt.0a1b2c3d.tmp"]
    kept = [run_dir / "notes.abcdefgh.tmp", run_dir / ".my.tmp", run_dir / "other" / ".x.pt.abcdefgh.tmp",
            run_dir / "tickets" / "round_01.pt", run_dir / ".checkpoint.pt.short.tmp"]
    for p in stale + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (run_dir / ".dir.pt.abcdefgh.tmp").mkdir()  # a folder is never one of ours
    # the names the real writer uses match: a write killed before os.replace leaves one of these
    real = {}

    def die(src, dst):
        real["tmp"] = Path(src)
        raise KeyboardInterrupt

    original = os.replace
    os.replace = die
    try:
        with pytest.raises(KeyboardInterrupt):
            ckpt_module.atomic_save({"x": torch.zeros(1)}, run_dir / "tickets" / "round_03.pt")
    finally:
        os.replace = original
    assert rundir._TMP_NAME.match(real["tmp"].name)

    assert prepare_run_dir(run_dir, {"lr": 0.1}) is True
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept) and (run_dir / ".dir.pt.abcdefgh.tmp").is_dir()
    out = capsys.readouterr().out
    assert all(str(p) in out for p in stale)


# ----------------------------------------------------------------------------- --restart

def _unfinished_run(run_dir, config):
    atomic_write_json(config, run_dir / "config.json")
    for name in ("checkpoint.pt", "log.csv", "sparsity.json", "model_best.pt", "subset_indices.json"):
        (run_dir / name).write_text("old")
    (run_dir / "tickets").mkdir()
    (run_dir / "tickets" / "round_01.pt").write_text("old")


def test_restart_discards_an_unfinished_run_and_says_what(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _unfinished_run(run_dir, {"lr": 30.0, "rounds": 3})
    (run_dir / "my_notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="--restart") as err:
        prepare_run_dir(run_dir, {"lr": 0.1, "rounds": 3})
    assert "lr: 30.0 -> 0.1" in str(err.value)
    release_locks()
    assert prepare_run_dir(run_dir, {"lr": 0.1, "rounds": 3, "restart": True}, restart=True) is False
    out = capsys.readouterr().out
    for name in ("checkpoint.pt", "config.json", "log.csv", "sparsity.json", "model_best.pt", "tickets"):
        assert f"discarding {run_dir / name}" in out
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.json", "my_notes.txt"]
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.1
    # the restarted run resumes without --restart, which is not part of the configuration
    assert "restart" in NON_SEMANTIC_KEYS
    assert config_differences({"lr": 0.1, "restart": True}, {"lr": 0.1, "restart": False}) == []
    assert prepare_run_dir(run_dir, {"lr": 0.1, "rounds": 3, "restart": False}) is True


def test_restart_refuses_to_discard_a_finished_run(tmp_path):
    stage2 = tmp_path / "stage2"
    stage2.mkdir()
    _unfinished_run(stage2, {"lr": 0.1})
    (stage2 / "results.json").write_text("{}")
    assert run_finished(stage2)
    with pytest.raises(UserError, match="finished run.*another --save-dir"):
        prepare_run_dir(stage2, {"lr": 0.2}, restart=True)
    assert (stage2 / "checkpoint.pt").exists() and (stage2 / "tickets" / "round_01.pt").exists()
    with pytest.raises(UserError) as err:  # no --restart: a finished run is not offered for discarding
        prepare_run_dir(stage2, {"lr": 0.2})
    assert "--restart" not in str(err.value)

    # stage 1 is finished when the ticket of every round in its config exists
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    _unfinished_run(stage1, {"lr": 0.1, "rounds": 2})
    assert not run_finished(stage1)
    (stage1 / "tickets" / "round_02.pt").write_text("old")
    assert run_finished(stage1)
    with pytest.raises(UserError, match="finished run"):
        prepare_run_dir(stage1, {"lr": 0.2, "rounds": 2}, restart=True)
    assert (stage1 / "tickets" / "round_02.pt").exists()
    # the caller's verdict wins over the default one
    other = tmp_path / "override"
    other.mkdir()
    _unfinished_run(other, {"lr": 0.1})
    assert not run_finished(other)
    with pytest.raises(UserError, match="finished run"):
        prepare_run_dir(other, {"lr": 0.2}, restart=True, finished=True)
    assert (other / "checkpoint.pt").exists()
    assert prepare_run_dir(stage1, {"lr": 0.2, "rounds": 2}, restart=True, finished=False) is False
    assert not (stage1 / "tickets").exists()


def test_restart_without_a_previous_run_is_a_fresh_start(tmp_path):
    assert prepare_run_dir(tmp_path / "new", {"lr": 0.1}, restart=True) is False
    # a directory that is not a run of this tool is never emptied by --restart
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "checkpoint.pt").write_text("someone else's")
    with pytest.raises(UserError, match="not empty"):
        prepare_run_dir(foreign, {"lr": 0.1}, restart=True)
    assert (foreign / "checkpoint.pt").read_text() == "someone else's"
    assert sorted(p.name for p in foreign.iterdir()) == ["checkpoint.pt"]  # not even a lock file left there


def test_diverged_stage2_run_restarts_with_a_corrected_lr(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(UserError):
        main_downstream.main(_stage2(out, "--lr", "1e30", epochs=2))
    release_locks()
    assert not (out / "results.json").exists()
    with pytest.raises(UserError, match="--restart"):
        main_downstream.main(_stage2(out, "--lr", "0.01", epochs=2))
    release_locks()
    capsys.readouterr()
    main_downstream.main(_stage2(out, "--lr", "0.01", "--restart", epochs=2))
    assert f"discarding {out / 'config.json'}" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["config"]["lr"] == 0.01
    release_locks()
    # finished: a further --restart is refused, the result stays
    with pytest.raises(UserError, match="another --save-dir"):
        main_downstream.main(_stage2(out, "--lr", "0.02", "--restart", epochs=2))
    assert (out / "results.json").exists()


# ----------------------------------------------------------------------------- files that are not checkpoints

def _torch_bytes(legacy=False):
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.ones(4, 3, 3, 3), "step": 3}, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _foreign_zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "not a model")
    return buf.getvalue()


BAD_FILES = {
    "empty": lambda: b"",
    "random bytes": lambda: random.Random(0).randbytes(4096),
    "text": lambda: b"conv1.weight = [1, 2, 3]\n",
    "foreign zip": _foreign_zip,
    "truncated zip": lambda: _torch_bytes()[:700],
    "truncated legacy": lambda: _torch_bytes(legacy=True)[:-10],
    "legacy header only": lambda: _torch_bytes(legacy=True)[:30],
    "legacy cut at half": lambda: _torch_bytes(legacy=True)[: len(_torch_bytes(legacy=True)) // 2],
    "pickle of an int": lambda: b"\x80\x02Ke.",
    "ee": lambda: b"e" * 50,
    "bad utf-8 in a pickle string": lambda: b"\x80\x02X\x04\x00\x00\x00\xff\xfe\xfd\xfc.",
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_every_kind_of_bad_file_is_one_user_error_naming_it(tmp_path, kind):
    path = tmp_path / "weights.pt"
    path.write_bytes(BAD_FILES[kind]())
    with pytest.raises(UserError) as err:
        safe_load(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert ("is empty (0 bytes)" in message) == (kind == "empty")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_damaged_torch_files_never_escape_as_other_exceptions(tmp_path):
    """Random byte flips of real files reach IndexError, KeyError, TypeError, struct.error,
    UnicodeDecodeError, AssertionError... inside torch.load; each must come out as a UserError."""
    sources = [_torch_bytes(), _torch_bytes(legacy=True)]
    rng = random.Random(1)
    path = tmp_path / "flipped.pt"
    refused = 0
    for i in range(300):
        data = bytearray(sources[i % 2])
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            safe_load(path)
        except UserError as exc:
            assert str(path) in str(exc)
            refused += 1
    assert refused > 100


@pytest.mark.parametrize("exc", [IndexError("pop from empty list"), KeyError(101), AttributeError("x"),
                                 TypeError("_rebuild_tensor_v2() missing 2 arguments"), EOFError(),
                                 UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
                                 AssertionError(), MemoryError(), OverflowError("x"), RecursionError()])
def test_any_exception_from_unpickling_is_a_user_error(tmp_path, monkeypatch, exc):
    path = tmp_path / "w.pt"
    path.write_bytes(_torch_bytes())

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(UserError, match=type(exc).__name__) as err:
        safe_load(path)
    assert str(path) in str(err.value)


def test_directories_fifos_and_unreadable_files_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="is a directory"):
        safe_load(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UserError, match="not a regular file"):
        safe_load(tmp_path / "fifo")
    path = tmp_path / "w.pt"
    path.write_bytes(_torch_bytes())

    def denied(p, mode="r", *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(p))

    monkeypatch.setattr(ckpt_module, "open", denied, raising=False)
    with pytest.raises(UserError, match="cannot be read .Permission denied.*permissions") as err:
        safe_load(path)
    assert str(path) in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its mode")
def test_unreadable_file_by_mode_is_a_user_error(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(_torch_bytes())
    path.chmod(0)
    with pytest.raises(UserError, match="cannot be read"):
        safe_load(path)


def test_code_running_pickle_is_still_called_what_it_is(tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, ("true",)

    torch.save({"x": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="arbitrary unpickling"):
        safe_load(tmp_path / "evil.pt")
    # random bytes are damaged, not dangerous: no advice to re-save a state dict
    (tmp_path / "noise.pt").write_bytes(random.Random(0).randbytes(512))
    with pytest.raises(UserError, match="not a torch checkpoint"):
        safe_load(tmp_path / "noise.pt")


def test_empty_files_through_every_loader_and_the_cli(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        models.load_pretrained(models.build_model("resnet_tiny", 10), empty)
    with pytest.raises(UserError, match="empty"):
        pruning_utils.load_ticket(empty)
    for flag in ("--ticket", "--init"):
        argv = _stage2(tmp_path / flag, init=empty) if flag == "--init" else _stage2(tmp_path / flag, "--ticket", empty)
        code, err = _exit_code_and_stderr(main_downstream.main, argv, capsys)
        assert code == 2 and str(empty) in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / flag / "results.json").exists()


# ----------------------------------------------------------------------------- damaged θ_p

def _damaged_init(tmp_path, key, value):
    model = models.build_model("resnet_tiny", 10, cifar_stem=True)
    state = model.state_dict()
    state[key].view(-1)[0] = value
    path = tmp_path / "theta_p.pt"
    torch.save(state, path)
    return path


def test_omp_on_nan_conv_weights_writes_no_ticket(tmp_path):
    init = _damaged_init(tmp_path, "layer1.0.conv1.weight", float("nan"))
    out = tmp_path / "omp"
    with pytest.raises(UserError, match="layer1.0.conv1.weight"):
        main_imp_pretrain.main(["--dataset", "digits", "--arch", "resnet_tiny", "--cifar-stem", "--method", "omp",
                                "--rounds", "2", "--init", str(init), "--save-dir", str(out)])
    assert not (out / "tickets").exists() and not (out / "config.json").exists()


def test_nan_running_var_init_gives_no_results(tmp_path, capsys):
    init = _damaged_init(tmp_path, "bn1.running_var", float("nan"))
    out = tmp_path / "run"
    code, err = _exit_code_and_stderr(main_downstream.main, _stage2(out, init=init), capsys)
    assert code == 2 and "bn1.running_var" in err and str(init) in err, err
    assert not (out / "results.json").exists() and not (out / "config.json").exists()


# ----------------------------------------------------------------------------- flags

COMMON_BAD_FLAGS = [
    (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 32)], "--seed"),
    (["--momentum", "-3"], "--momentum"), (["--momentum", "1"], "--momentum"), (["--momentum", "nan"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--weight-decay", "inf"], "--weight-decay"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--lr", "0"], "--lr"), (["--lr", "-0.1"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--eps", "1.5"], "--eps"), (["--eps", "-0.1"], "--eps"), (["--alpha", "0"], "--alpha"),
    (["--alpha", "2"], "--alpha"), (["--workers", "-1"], "--workers"),
]


@pytest.mark.parametrize("flags,needle", COMMON_BAD_FLAGS + [
    (["--test-eps", "5"], "--test-eps"), (["--test-alpha", "3"], "--test-alpha")])
def test_out_of_range_flags_are_refused_by_stage2(tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    _refused(lambda: main_downstream.main(_stage2(out, *flags)), needle, capsys)
    assert not out.exists()


def _refused(call, needle, capsys):
    """A UserError from the checks, or argparse's exit 2 where the value's parser already refuses it."""
    try:
        call()
    except UserError as exc:
        assert needle in str(exc)
    except SystemExit as exc:
        assert exc.code == 2 and needle in capsys.readouterr().err
    else:
        raise AssertionError(f"{needle} was accepted")


@pytest.mark.parametrize("flags,needle", COMMON_BAD_FLAGS)
def test_out_of_range_flags_are_refused_by_stage1(tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    _refused(lambda: main_imp_pretrain.main(["--dataset", "digits", "--arch", "resnet_tiny", "--method", "omp",
                                             "--init", "none", "--save-dir", str(out), *flags]), needle, capsys)
    assert not out.exists()


def test_bad_flag_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    code, err = _exit_code_and_stderr(main_downstream.main, _stage2(tmp_path / "run", "--seed", "-1"), capsys)
    assert code == 2 and err.strip().startswith("error: --seed") and len(err.strip().splitlines()) == 1


def test_legal_edge_values_pass(tmp_path):
    main_downstream.main(_stage2(tmp_path / "run", "--seed", "0", "--momentum", "0", "--weight-decay", "0",
                                 "--eps", "1"))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["seed"] == 0


# ----------------------------------------------------------------------------- environment errors

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM])
def test_environment_errors_are_one_line(code):
    message = environment_error_message(OSError(code, os.strerror(code), "/runs/a/results.json"))
    assert "cannot write" in message and "'/runs/a/results.json'" in message and os.strerror(code) in message
    assert "\n" not in message
    assert environment_error_message(OSError(code, os.strerror(code))) is not None  # no file named
    assert environment_error_message(FileNotFoundError(errno.ENOENT, "No such file", "x")) is None


def test_full_disk_at_the_last_write_is_exit_2_and_no_result(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_replace = os.replace

    def full_disk(src, dst, *args, **kwargs):
        if str(dst).endswith("results.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(src), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        run_main(main_downstream.main, _stage2(out))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: cannot write '{out / 'results.json'}': No space left on device; free space on that "
                   "file system (or choose another --save-dir), then rerun the same command (files written before "
                   "this are intact).")
    assert not (out / "results.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(os, "replace", real_replace)
    release_locks()
    main_downstream.main(_stage2(out))  # space freed: the same command finishes the run
    assert json.loads((out / "results.json").read_text())["sa"] >= 0


def test_permission_denied_on_the_first_write_is_exit_2(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / ".x.abcdefgh.tmp"))

    monkeypatch.setattr(ckpt_module.tempfile, "mkstemp", denied)
    code, err = _exit_code_and_stderr(main_downstream.main, _stage2(out), capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"cannot write or read '{out / 'config.json'}': Permission denied; fix the permissions" in err
    assert not (out / "results.json").exists()


def test_full_disk_inside_a_write_names_the_target_not_the_temporary(tmp_path):
    def fill(fh):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:
        ckpt_module._atomic_write(tmp_path / "log.csv", fill, binary=False)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "log.csv")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory whatever its mode")
def test_unwritable_save_dir_is_exit_2(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = subprocess.run(_cli("main_downstream.py", _stage2(parent / "run")), env=_env(), capture_output=True,
                              text=True)
    finally:
        parent.chmod(0o755)
    assert proc.returncode == 2 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_forked_child_neither_keeps_nor_drops_the_parents_lock(tmp_path):
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, {"lr": 0.1})
    pid = os.fork()
    if pid == 0:  # the child: exits without running pytest's teardown
        os._exit(0 if lock_holder(run_dir) == f"{os.getppid()}@{HOST}" and not rundir._HELD_LOCKS else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lock_holder(run_dir) == f"{os.getpid()}@{HOST}"  # still held, still named
    release_locks()
    assert lock_holder(run_dir) is None


_FORKING_HOLDER = """
import os, sys, time
from utils.rundir import prepare_run_dir
prepare_run_dir(sys.argv[1], {"lr": 0.1})
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_a_killed_holder_frees_the_directory_even_while_its_forked_worker_lives(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _FORKING_HOLDER, str(run_dir)], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        assert lock_holder(run_dir) == f"{proc.pid}@{HOST}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the worker outlives its parent...
        assert lock_holder(run_dir) is None  # ...without holding the directory
    finally:
        proc.kill()
        os.kill(child, signal.SIGKILL)
