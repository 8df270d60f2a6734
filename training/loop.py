"""The one resumable epoch loop: stage 1's IMP rounds and LMP levels and stage 2's fine-tuning run in it.

A run is a sequence of units (an IMP round, an LMP level; stage 2 has one) of epochs. The loop owns
what makes every run resumable and safe, the same way for each stage: the checkpoint (written after
every epoch and at every unit boundary, read back when the same command is run again), every rank's
RNG state, the loss guard, the position and sums inside an epoch that a stop signal or
``--checkpoint-minutes`` saves through the StepCheckpointer, log.csv (and with ``--tensorboard`` its
event files, training/tensorboard.py), and the one error a diverged loss becomes. A stage states only its policy (:class:`Policy`): what one epoch trains, what follows
it (validation, selection), what else its checkpoint holds, and how a unit ends.
"""

from dataclasses import dataclass, field
from pathlib import Path

from training import setup
from training.tensorboard import Board
from utils import distributed as du
from utils.checkpoint import atomic_save, read_resume_checkpoint
from utils.errors import NonFiniteLoss, UserError
from utils.preemption import StepCheckpointer
from utils.rundir import write_csv
from utils.seeding import gather_rng_states, restore_rank_rng_state


@dataclass
class Progress:
    """Where a run stands; each stage's checkpoint records it in its own keys."""
    unit: int  # the IMP round or LMP level; 0 for stage 2
    epoch: int  # epochs done in the unit
    log: list = field(default_factory=list)  # the rows of log.csv
    # inside epoch ``epoch``: {"epoch", "step", "carry"} of the mid-epoch checkpoint on disk, else None
    partial: dict = None


class Policy:
    """What a stage decides. The loop asks, in this order: ``load``, ``restore`` and ``resumed`` when a
    checkpoint exists, else ``fresh``; then, while ``has_unit``: ``enter_unit``; for each of the unit's
    ``epochs`` (until ``stopped``): ``train``, ``after_epoch``, ``checkpoint`` (and ``saved``),
    ``report``; then ``end_unit``. ``where`` and ``diverged`` word its messages. The hooks that raise
    NotImplementedError are the ones every stage writes."""

    log_fields = ()  # the columns of log.csv
    checkpoint_keys = ()  # keys a checkpoint of this stage must have
    log_always = False  # write log.csv at the end even when no epoch was trained
    stopped = None  # why the run ended before its last epoch (stage 2: FAT's guard), else None

    def load(self, path, device):
        """The checkpoint at ``path``, refused with a clear error when it is not one of this stage."""
        return read_resume_checkpoint(path, device, self.checkpoint_keys)

    def restore(self, ckpt):
        """Put the stage's state back from ``ckpt``; return the :class:`Progress` it records."""
        raise NotImplementedError

    def resumed(self, progress):
        """Called once the checkpoint and the RNG state are restored (say so, check side files)."""

    def fresh(self):
        """The :class:`Progress` of a run with no checkpoint yet."""
        return Progress(0, 0)

    def has_unit(self, unit):
        return unit == 0

    def enter_unit(self, progress):
        """Build what the unit's epochs need (also when the unit is resumed part-way)."""

    def epochs(self, unit):
        raise NotImplementedError

    def train(self, progress, *, start_step, carry, step_hook, loss_guard):
        """Train epoch ``progress.epoch`` of the unit from batch ``start_step`` (``carry``: the sums of
        the steps before it) with ``engine.train_epoch``, passing these four on; return its stats."""
        raise NotImplementedError

    def after_epoch(self, progress, stats):
        """What follows the epoch's training (validation, selection); return its log.csv row, or None
        when the run ends here (the weights to keep put back, ``stopped`` set)."""
        raise NotImplementedError

    def checkpoint(self, progress):
        """The stage's part of the checkpoint (the loop adds the RNG states and the loss guard)."""
        raise NotImplementedError

    def saved(self, progress):
        """The primary rank wrote an end-of-epoch (not a mid-epoch) checkpoint."""

    def report(self, progress, row):
        """An epoch is done and checkpointed: tell the user."""

    def end_unit(self, progress):
        """Close the unit. True: the run goes on to the next unit (the loop checkpoints the boundary);
        False: the run ends with this unit."""
        return False

    def where(self, progress):
        """The position in words, for the mid-epoch checkpoint message."""
        raise NotImplementedError

    def diverged(self, exc, progress):
        """The one error message of a diverged loss ``exc``: where, and what is kept."""
        raise NotImplementedError


class ResumableRun:
    """Runs a :class:`Policy` to its end, resuming from ``save_dir/checkpoint.pt`` when it exists."""

    def __init__(self, policy, *, save_dir, dist_info, stop, checkpoint_minutes, loss_guard, tensorboard=False):
        self.policy = policy
        self.dist_info = dist_info
        self.loss_guard = loss_guard
        self.ckpt_path = Path(save_dir) / "checkpoint.pt"
        self.log_path = Path(save_dir) / "log.csv"
        self.checkpointer = StepCheckpointer(self._save_mid_epoch, stop, checkpoint_minutes)
        self.progress = None
        self.board = Board(save_dir) if tensorboard and dist_info.primary else None

    def run(self):
        """Every remaining unit and epoch; returns the final :class:`Progress`."""
        progress = self.progress = self._resume()
        if self.board is not None:
            self.board.start(progress.log)
        try:
            self._units()
        finally:
            if self.board is not None:
                self.board.close()
        if self.policy.log_always and self.dist_info.primary and not self.log_path.exists():
            write_csv(progress.log, self.log_path, self.policy.log_fields)
        du.barrier()
        return progress

    def _units(self):
        policy, progress = self.policy, self.progress
        while policy.has_unit(progress.unit):
            policy.enter_unit(progress)
            while progress.epoch < policy.epochs(progress.unit) and not policy.stopped:
                self._epoch()
            if policy.stopped or not policy.end_unit(progress):
                break
            progress.unit, progress.epoch = progress.unit + 1, 0
            self.save()

    def _resume(self):
        if not self.ckpt_path.exists():
            return self.policy.fresh()
        ckpt = self.policy.load(self.ckpt_path, self.dist_info.device)
        progress = self.policy.restore(ckpt)
        self.loss_guard.load_state_dict(ckpt.get("loss_guard"))
        restore_rank_rng_state(ckpt["rng"], self.dist_info.rank)
        self.policy.resumed(progress)
        return progress

    def _epoch(self):
        progress = self.progress
        partial = progress.partial
        try:
            stats = self.policy.train(progress, start_step=partial["step"] if partial else 0,
                                      carry=partial["carry"] if partial else None, step_hook=self.checkpointer,
                                      loss_guard=self.loss_guard)
        except NonFiniteLoss as exc:
            raise UserError(self.policy.diverged(exc, progress)) from None
        row = self.policy.after_epoch(progress, stats)
        if row is None:  # the policy ended the run in this epoch and put back the weights to keep
            self.save()
            return
        progress.log.append(row)
        progress.epoch += 1
        if self.dist_info.primary:  # before the checkpoint: a kill in between re-runs this epoch and rewrites both
            write_csv(progress.log, self.log_path, self.policy.log_fields)
        self.save()
        if self.board is not None:  # after the checkpoint: a resume never trains this epoch again
            self.board.epoch(row, len(progress.log) - 1)
        self.checkpointer.reset_clock()
        self.policy.report(progress, row)
        du.barrier()

    def save(self, partial=None):
        """The checkpoint of ``self.progress``; ``partial``: the position inside the epoch in progress
        and that epoch's sums (a mid-epoch checkpoint). A collective: every rank calls it."""
        progress = self.progress
        progress.partial = partial
        rng = gather_rng_states()
        if self.dist_info.primary:
            atomic_save({**self.policy.checkpoint(progress), "rng": rng,
                         "loss_guard": self.loss_guard.state_dict()}, self.ckpt_path)
            if partial is None:
                self.policy.saved(progress)
        du.barrier()

    def _save_mid_epoch(self, step, carry):
        self.save({"epoch": self.progress.epoch, "step": step, "carry": carry})
        setup.log(f"checkpoint inside {self.policy.where(self.progress)} after step {step} -> {self.ckpt_path}")
