"""Stopping and diverging (issues 12.3 and 15.2): SIGTERM mid-epoch checkpoints and a resumed run ends
exactly like an uninterrupted one, in both stages; a finite but absurd loss is divergence."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main_downstream
import main_imp_pretrain
from utils.checkpoint import safe_load
from utils.errors import EXIT_PREEMPTED, Preempted, UserError
from utils.preemption import StopRequest

REPO = Path(__file__).resolve().parents[1]
# a small batch makes many steps per epoch, so a stop lands inside an epoch
TINY = ["--arch", "resnet_tiny", "--cifar-stem", "--no-progress", "--batch-size", "8"]
STAGE2 = ["--dataset", "digits", "--classes", "5-9", "--init", "none", "--pretrain", "std", "--regime", "at",
          "--epochs", "3", "--lr", "0.05", "--train-steps", "1", "--test-steps", "1", "--eps", "8/255",
          "--data-rate", "0.5", *TINY]
STAGE1 = ["--dataset", "digits", "--classes", "0-4", "--init", "none", "--pretrain", "std", "--method", "imp",
          "--rate", "0.5", "--rounds", "3", "--epochs-per-round", "2", "--lr", "0.01", *TINY]


class StopAfter:
    """Stands in for a signal arriving after ``n`` training steps (the handler sets the same flag)."""

    def __init__(self, n):
        self.n, self.calls, self.signal = n, 0, None

    @property
    def requested(self):
        self.calls += 1
        if self.calls > self.n:
            self.signal = signal.SIGTERM
        return self.signal is not None

    def install(self):
        return self

    def uninstall(self):
        pass


def _same_history(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("train_loss", "train_acc", "val_sa", "val_ra", "lr"):
            assert x[key] == y[key], (key, x, y)


@pytest.mark.slow
def test_stage2_stopped_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    main_downstream.main([*STAGE2, "--save-dir", str(ref)])
    expected = json.loads((ref / "results.json").read_text())

    out = tmp_path / "stopped"
    for n in (30, 45):  # two stops: inside epoch 1 (of ~44 steps), and again after resuming
        monkeypatch.setattr(main_downstream, "StopRequest", lambda n=n: StopAfter(n))
        with pytest.raises(Preempted):
            main_downstream.main([*STAGE2, "--save-dir", str(out)])
        ckpt = safe_load(out / "checkpoint.pt")
        assert ckpt["state"]["partial"] is not None and ckpt["state"]["partial"]["step"] > 0
        assert not (out / "results.json").exists()
    monkeypatch.setattr(main_downstream, "StopRequest", StopRequest)
    main_downstream.main([*STAGE2, "--save-dir", str(out)])
    got = json.loads((out / "results.json").read_text())
    assert (got["sa"], got["ra"], got["selected_epoch"]) == (expected["sa"], expected["ra"], expected["selected_epoch"])
    _same_history(got["history"], expected["history"])


def _tickets(save_dir):
    return {p.name: safe_load(p)["masks"] for p in sorted((save_dir / "tickets").glob("round_*.pt"))}


@pytest.mark.slow
def test_stage1_sigterm_mid_round_resumes_to_the_same_tickets(tmp_path):
    ref = tmp_path / "ref"
    main_imp_pretrain.main([*STAGE1, "--save-dir", str(ref)])

    out = tmp_path / "stopped"
    cmd = [sys.executable, str(REPO / "main_imp_pretrain.py"), *STAGE1, "--save-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "tickets" / "round_02.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # round 2's ticket is written just before its re-training starts
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "rerun the same command" in err
    ckpt = safe_load(out / "checkpoint.pt")
    assert ckpt["round"] == 2 and ckpt["partial"] is not None
    main_imp_pretrain.main([*STAGE1, "--save-dir", str(out)])
    got, expected = _tickets(out), _tickets(ref)
    assert list(got) == list(expected) == ["round_01.pt", "round_02.pt", "round_03.pt"]
    for name in expected:
        for layer, m in expected[name].items():
            assert torch.equal(got[name][layer], m), (name, layer)


@pytest.mark.slow
def test_stage2_real_sigterm_exits_75_and_resumes(tmp_path):
    ref = tmp_path / "ref"
    main_downstream.main([*STAGE2, "--save-dir", str(ref)])
    out = tmp_path / "stopped"
    cmd = [sys.executable, str(REPO / "main_downstream.py"), *STAGE2, "--save-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "log.csv").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # epoch 1 is done: the signal lands in epoch 2 (or its validation)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert not (out / "results.json").exists()
    main_downstream.main([*STAGE2, "--save-dir", str(out)])
    got, expected = (json.loads((d / "results.json").read_text()) for d in (out, ref))
    assert (got["sa"], got["ra"]) == (expected["sa"], expected["ra"])
    _same_history(got["history"], expected["history"])


def test_periodic_checkpoints_inside_an_epoch(tmp_path):
    out = tmp_path / "run"
    main_downstream.main([*STAGE2[:-len(TINY)], *TINY, "--epochs", "1", "--checkpoint-minutes", "0.00001",
                          "--keep-checkpoint", "--save-dir", str(out)])
    assert (out / "results.json").exists()
    # the last checkpoint is the end-of-epoch one, with no position inside an epoch
    assert safe_load(out / "checkpoint.pt")["state"]["partial"] is None


def test_stage2_lr_30_is_divergence_not_a_result(tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "main_downstream.py"), "--dataset", "digits", "--classes",
                           "5-9", "--init", "none", "--pretrain", "std", "--regime", "st", "--epochs", "3",
                           "--lr", "30", "--test-steps", "0", "--save-dir", str(out), *TINY], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert not (out / "results.json").exists()
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "--restart" in line and "--max-loss" in line


def test_stage1_lr_30_writes_no_later_ticket(tmp_path):
    out = tmp_path / "imp"
    with pytest.raises(UserError, match="--restart"):
        main_imp_pretrain.main([*STAGE1[:-len(TINY)], *TINY, "--lr", "30", "--save-dir", str(out)])
    # round 1's mask comes from θ_p before any training; nothing after the divergence is written
    assert sorted(p.name for p in (out / "tickets").glob("round_*.pt")) == ["round_01.pt"]


def test_imp_rerun_reports_a_missing_ticket(tmp_path):
    out = tmp_path / "imp"
    argv = [*STAGE1[:-len(TINY)], *TINY, "--rounds", "2", "--epochs-per-round", "1", "--save-dir", str(out)]
    main_imp_pretrain.main(argv)
    (out / "tickets" / "round_01.pt").unlink()
    with pytest.raises(UserError, match="round_01.pt.*missing"):
        main_imp_pretrain.main(argv)


def test_imp_restart_rebuilds_a_run_with_a_missing_ticket(tmp_path, capsys):
    out = tmp_path / "imp"
    argv = [*STAGE1[:-len(TINY)], *TINY, "--rounds", "2", "--epochs-per-round", "1", "--save-dir", str(out)]
    main_imp_pretrain.main(argv)
    expected = _tickets(out)
    (out / "tickets" / "round_02.pt").unlink()
    main_imp_pretrain.main([*argv, "--restart"])
    assert "--restart: discarding" in capsys.readouterr().out
    got = _tickets(out)
    assert list(got) == list(expected)
    for name in expected:
        for layer, m in expected[name].items():
            assert torch.equal(got[name][layer], m)


def test_restart_never_discards_a_finished_stage2_run(tmp_path):
    out = tmp_path / "run"
    argv = [*STAGE2[:-len(TINY)], *TINY, "--epochs", "1", "--save-dir", str(out)]
    main_downstream.main(argv)
    with pytest.raises(UserError, match="finished run"):
        main_downstream.main([*argv, "--restart"])
    assert (out / "results.json").exists()


def test_a_foreign_torch_file_as_checkpoint_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    argv = [*STAGE2[:-len(TINY)], *TINY, "--epochs", "1", "--save-dir", str(out)]
    with pytest.raises(UserError):
        main_downstream.main([*argv, "--lr", "1e9"])  # diverges: leaves config.json, no result
    torch.save({"weights": torch.zeros(2)}, out / "checkpoint.pt")
    with pytest.raises(UserError, match="not a checkpoint of this stage"):
        main_downstream.main([*argv, "--lr", "1e9"])


@pytest.mark.slow
def test_launcher_maps_a_stopped_torchrun_group_to_status_75(tmp_path):
    """torchrun reports a stopped worker as a failure (1); the launcher reads rank 0's marker."""
    out = tmp_path / "ddp"
    env = {**os.environ, "NGPU": "2", "OMP_NUM_THREADS": "1", "PRETRAIN": "std", "SHUTDOWN_TIMEOUT": "60"}
    cmd = ["bash", "script/train_downstream/std.sh", "digits", "none", str(out), "none", "--classes", "5-9",
           "--arch", "resnet_tiny", "--cifar-stem", "--image-size", "8", "--batch-size", "8", "--epochs", "4",
           "--lr", "0.05", "--test-steps", "0", "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 180
    while not (out / "log.csv").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher's shell, as SLURM's --signal does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert (out / ".preempted").exists() and not (out / "results.json").exists()
    # the same command resumes and finishes; the marker goes
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "results.json").exists() and not (out / ".preempted").exists()
    # ... with the numbers of an uninterrupted two-process run, logged sums included (each rank's
    # share of the interrupted epoch counted once)
    ref = tmp_path / "ref"
    ref_cmd = [str(ref) if a == str(out) else a for a in cmd]
    subprocess.run(ref_cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    got, expected = (json.loads((d / "results.json").read_text()) for d in (out, ref))
    assert got["sa"] == expected["sa"]
    _same_history(got["history"], expected["history"])


def test_restart_never_discards_a_run_of_the_other_stage(tmp_path):
    out = tmp_path / "imp"
    with pytest.raises(UserError):
        main_imp_pretrain.main([*STAGE1[:-len(TINY)], *TINY, "--lr", "30", "--save-dir", str(out)])
    assert (out / "tickets" / "round_01.pt").exists()
    with pytest.raises(UserError, match="stage-1 run"):
        main_downstream.main([*STAGE2[:-len(TINY)], *TINY, "--restart", "--save-dir", str(out)])
    assert (out / "tickets" / "round_01.pt").exists() and (out / "checkpoint.pt").exists()


def test_a_diverged_carry_is_never_saved_over_the_last_good_checkpoint():
    from utils.errors import NonFiniteLoss
    from utils.preemption import StepCheckpointer
    saved = []
    hook = StepCheckpointer(lambda step, carry: saved.append(step), StopAfter(0))
    with pytest.raises(NonFiniteLoss):
        hook(3, lambda: {"loss_sum": float("nan"), "correct": 0, "seen": 8, "seconds": 1.0})
    assert saved == []
    with pytest.raises(Preempted):
        hook(4, lambda: {"loss_sum": 1.5, "correct": 2, "seen": 8, "seconds": 1.0})
    assert saved == [4]
