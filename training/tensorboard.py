"""``--tensorboard``: a run's curves as TensorBoard event files in its own ``SAVE_DIR/tb``.

One point per trained epoch for each column of log.csv that is a curve (train loss and accuracy,
learning rate, validation SA and RA where the epoch was validated, the ticket's sparsity in stage 1),
at step = the epoch's row in log.csv (stage 1 counts on across rounds and levels); stage 2 adds its
test SA/RA at the selected epoch's step. Since every run writes under its own directory,
``tensorboard --logdir <grid out>`` names each run by its path.

Resuming keeps one point per step, whatever reader shows the files: an epoch's points are written
only after its checkpoint, so a resumed run never trains (and writes) an epoch again whose points
exist; the points of epochs the checkpoint holds but the files lack (a kill between the checkpoint
and the write) are written on resume. A run started afresh (``--restart``) removes the event files
of the run it replaces. Only the caller's primary rank makes a :class:`Board`.

The package is optional: it is imported only when the flag is given, and :func:`require` turns its
absence into one clear error before anything is written.
"""

from pathlib import Path

from utils.errors import UserError

TB_DIR = "tb"
TEST_SUFFIX = ".test"  # the event file of the test scalars, replaced whole when the test is run again
# log.csv column -> tag
TAGS = {"train_loss": "train/loss", "train_acc": "train/acc", "lr": "train/lr", "val_sa": "val/sa",
        "val_ra": "val/ra", "sparsity": "ticket/sparsity"}
STEP_TAG = TAGS["train_loss"]  # every trained epoch has it: its steps are the epochs already written


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package, which is not installed; run "
                        "`pip install tensorboard` or drop the flag.") from None
    return SummaryWriter


def require(enabled):
    """Refuse ``--tensorboard`` (``enabled``) when the package is missing; called while parsing."""
    if enabled:
        _summary_writer()


def _event_files(folder, suffix=None):
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and "tfevents" in p.name and (suffix is None or p.name.endswith(suffix))]


def steps_written(folder, tag=STEP_TAG):
    """The steps of ``tag`` in the event files of ``folder``, as TensorBoard's own reader sees them."""
    if not _event_files(folder):
        return set()
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {e.step for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else set()


class Board:
    """The per-epoch event files of the run in ``save_dir``."""

    def __init__(self, save_dir):
        self.dir = Path(save_dir) / TB_DIR
        self.writer = None
        self.purge_step = 0

    def start(self, rows):
        """The run resumes with ``rows`` (log.csv's rows of its checkpoint; none: a fresh start)."""
        if not rows:
            for old in _event_files(self.dir):
                old.unlink()
        self.purge_step = len(rows)
        written = steps_written(self.dir) if rows else set()
        for step, row in enumerate(rows):
            if step not in written:
                self._add(row, step)
        self.flush()

    def epoch(self, row, step):
        """The points of a trained, checkpointed epoch; on disk when this returns."""
        self._add(row, step)
        self.flush()

    def _add(self, row, step):
        if self.writer is None:
            # TensorBoard hides points at steps >= purge_step of earlier files: none should exist, since
            # points follow their checkpoint, but a reader then never shows a step twice
            self.writer = _summary_writer()(log_dir=str(self.dir), purge_step=self.purge_step)
        for column, tag in TAGS.items():
            if row.get(column) is not None:
                self.writer.add_scalar(tag, float(row[column]), step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_test(save_dir, step, sa, ra):
    """Stage 2's test SA (and RA, when measured) at ``step``, the selected epoch, in an event file of
    their own; a test run again (after a kill before results.json) replaces it."""
    folder = Path(save_dir) / TB_DIR
    for old in _event_files(folder, TEST_SUFFIX):
        old.unlink()
    writer = _summary_writer()(log_dir=str(folder), filename_suffix=TEST_SUFFIX)
    writer.add_scalar("test/sa", float(sa), step)
    if ra is not None:
        writer.add_scalar("test/ra", float(ra), step)
    writer.close()
