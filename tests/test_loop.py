"""The one resumable loop (training/loop.py) with a toy policy: the order of the hooks, what is
checkpointed when, the mid-epoch position a rerun resumes from, and the one divergence error."""

import csv
import random

import pytest
import torch

from training.engine import LossGuard
from training.loop import Policy, Progress, ResumableRun
from utils.checkpoint import safe_load
from utils.distributed import DistInfo
from utils.errors import NonFiniteLoss, Preempted, UserError
from utils.preemption import StopRequest

DIST = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Toy(Policy):
    """Two units of two epochs; each epoch is 4 steps whose 'loss' is a random draw."""

    log_fields = ["unit", "epoch", "loss"]
    checkpoint_keys = ("unit", "epoch", "log", "rng")

    def __init__(self, events, stop_after=None, diverge_at=None, end_run_at=None):
        self.events, self.stop_after, self.diverge_at, self.end_run_at = events, stop_after, diverge_at, end_run_at
        self.weights = 0.0

    def restore(self, ckpt):
        self.weights = ckpt["weights"]
        self.events.append(("restore", ckpt["unit"], ckpt["epoch"]))
        return Progress(ckpt["unit"], ckpt["epoch"], ckpt["log"], ckpt["partial"])

    def resumed(self, progress):
        self.events.append(("resumed", progress.unit, progress.epoch))

    def has_unit(self, unit):
        return unit < 2

    def enter_unit(self, progress):
        self.events.append(("enter", progress.unit))

    def epochs(self, unit):
        return 2

    def train(self, progress, *, start_step, carry, step_hook, loss_guard):
        self.events.append(("train", progress.unit, progress.epoch, start_step))
        if (progress.unit, progress.epoch) == self.diverge_at:
            raise NonFiniteLoss("training loss became nan at step 1")
        total = carry["loss_sum"] if carry else 0.0
        for step in range(start_step, 4):
            total += random.random()
            self.weights += 1
            if self.stop_after == (progress.unit, progress.epoch, step + 1):
                self.stop.signal = 15  # as the signal handler does
            step_hook(step + 1, lambda t=total, n=step + 1: {"loss_sum": t, "correct": 0, "seen": n, "seconds": 0.0})
        return {"loss": total}

    def after_epoch(self, progress, stats):
        if (progress.unit, progress.epoch) == self.end_run_at:
            self.stopped = "ended by the policy"
            return None
        return {"unit": progress.unit, "epoch": progress.epoch, "loss": stats["loss"]}

    def checkpoint(self, progress):
        return {"unit": progress.unit, "epoch": progress.epoch, "log": progress.log, "partial": progress.partial,
                "weights": self.weights}

    def report(self, progress, row):
        self.events.append(("report", progress.unit, progress.epoch))

    def end_unit(self, progress):
        self.events.append(("end", progress.unit))
        return True

    def where(self, progress):
        return f"unit {progress.unit}, epoch {progress.epoch + 1},"

    def diverged(self, exc, progress):
        return f"{exc} in unit {progress.unit}; toy"


def run(tmp_path, policy, minutes=0.0):
    stop = StopRequest()
    policy.stop = stop
    loop = ResumableRun(policy, save_dir=tmp_path, dist_info=DIST, stop=stop, checkpoint_minutes=minutes,
                        loss_guard=LossGuard(100.0))
    return loop.run()


def log_rows(tmp_path):
    with open(tmp_path / "log.csv") as f:
        return list(csv.DictReader(f))


def test_hooks_in_order_and_what_each_checkpoint_holds(tmp_path):
    random.seed(0)
    events = []
    progress = run(tmp_path, Toy(events))
    assert events == [("enter", 0), ("train", 0, 0, 0), ("report", 0, 1), ("train", 0, 1, 0), ("report", 0, 2),
                      ("end", 0), ("enter", 1), ("train", 1, 0, 0), ("report", 1, 1), ("train", 1, 1, 0),
                      ("report", 1, 2), ("end", 1)]
    assert (progress.unit, progress.epoch, progress.partial) == (2, 0, None)
    ckpt = safe_load(tmp_path / "checkpoint.pt")  # the boundary after the last unit
    assert (ckpt["unit"], ckpt["epoch"], ckpt["weights"], ckpt["partial"]) == (2, 0, 16.0, None)
    assert ckpt["loss_guard"] == {"consecutive": None} and isinstance(ckpt["rng"], list)
    assert [(int(r["unit"]), int(r["epoch"])) for r in log_rows(tmp_path)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    events.clear()
    run(tmp_path, Toy(events))  # a rerun of a finished run trains nothing
    assert events == [("restore", 2, 0), ("resumed", 2, 0)]


def test_a_stop_inside_an_epoch_resumes_there_and_ends_as_an_uninterrupted_run(tmp_path):
    random.seed(0)
    straight = run(tmp_path / "straight", Toy([]))
    random.seed(0)
    events = []
    with pytest.raises(Preempted):
        run(tmp_path / "stopped", Toy(events, stop_after=(1, 0, 2)))
    ckpt = safe_load(tmp_path / "stopped" / "checkpoint.pt")
    assert (ckpt["unit"], ckpt["epoch"], ckpt["partial"]["epoch"], ckpt["partial"]["step"]) == (1, 0, 0, 2)
    random.seed(123)  # the checkpoint's RNG state, not this, decides the rest of the run
    events.clear()
    resumed = run(tmp_path / "stopped", Toy(events))
    assert events[:4] == [("restore", 1, 0), ("resumed", 1, 0), ("enter", 1), ("train", 1, 0, 2)]
    assert resumed.log == straight.log  # same losses, the carried sum included
    assert safe_load(tmp_path / "stopped" / "checkpoint.pt")["weights"] == 16.0


def test_periodic_checkpoints_inside_epochs(tmp_path, capsys):
    run(tmp_path, Toy([]), minutes=1e-9)
    out = capsys.readouterr().out
    assert f"checkpoint inside unit 0, epoch 1, after step 1 -> {tmp_path / 'checkpoint.pt'}" in out
    assert out.count("checkpoint inside") == 16


def test_divergence_is_one_error_and_the_last_checkpoint_survives(tmp_path):
    with pytest.raises(UserError, match=r"^training loss became nan at step 1 in unit 1; toy$"):
        run(tmp_path, Toy([], diverge_at=(1, 1)))
    ckpt = safe_load(tmp_path / "checkpoint.pt")
    assert (ckpt["unit"], ckpt["epoch"], ckpt["partial"]) == (1, 1, None)
    assert len(log_rows(tmp_path)) == 3


def test_a_policy_may_end_the_run_inside_a_unit(tmp_path):
    events = []
    progress = run(tmp_path, Toy(events, end_run_at=(0, 1)))
    assert ("report", 0, 2) not in events and ("enter", 1) not in events
    assert (progress.unit, progress.epoch) == (0, 1)
    ckpt = safe_load(tmp_path / "checkpoint.pt")
    assert (ckpt["unit"], ckpt["epoch"], ckpt["partial"]) == (0, 1, None)


def test_log_always_writes_the_log_of_a_run_without_epochs(tmp_path):
    class Untrained(Toy):
        log_always = True

        def epochs(self, unit):
            return 0

    run(tmp_path, Untrained([]))
    assert (tmp_path / "log.csv").read_text().splitlines() == ["unit,epoch,loss"]
    run(tmp_path / "plain", Toy([], end_run_at=(0, 0)))
    assert not (tmp_path / "plain" / "log.csv").exists()
