"""Stopping at a step boundary: SIGTERM / SIGUSR1 and periodic mid-epoch checkpoints.

SLURM sends SIGTERM when it preempts or cancels a job and can send SIGUSR1 shortly before the
time limit (``#SBATCH --signal=USR1@120``); torchrun forwards SIGTERM to its workers. Either makes
the run finish the step in progress, save a checkpoint that holds the position inside the epoch,
and exit with :data:`EXIT_PREEMPTED`, so a requeued run resumes mid-epoch and ends exactly where
an uninterrupted one would. An ImageNet epoch of stage 1 is hours: without this a preemption
loses all of it.
"""

import math
import signal
import threading
import time

import torch

from utils import distributed as du
from utils.errors import NonFiniteLoss, Preempted

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
SYNC_EVERY = 25  # under DDP ranks agree on stopping only every few steps (an agreement is a collective)


class StopRequest:
    """Turns the stop signals into a flag read at step boundaries (installed only on the main thread)."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    @property
    def requested(self):
        return self.signal is not None

    def _handle(self, signum, frame):
        self.signal = signum

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set there; a caller in a thread keeps its own
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self):
        """Put the previous handlers back; after a requested stop, ignore further stop signals instead.

        The stopped run has saved and is on its way out with status 75: a repeated signal (scancel and
        torchrun each forward SIGTERM) landing under the default handler would turn that into 143."""
        for sig, previous in self._previous.items():
            if self.requested:
                previous = signal.SIG_IGN
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()
        return False


class StepCheckpointer:
    """The engine's ``step_hook``: saves at a step boundary when a stop was requested or when
    ``minutes`` have passed since the last checkpoint, then raises ``Preempted`` for a stop.

    ``save(step, carry)`` writes the mid-epoch checkpoint; it is called on every rank together
    (it gathers RNG states), which is why under DDP the decision is agreed by an all-reduce. A
    carry whose loss is no longer finite is never saved: the last good checkpoint must survive a
    divergence that the engine's own check (every few dozen steps) has not caught yet.
    """

    def __init__(self, save, stop, minutes=0.0):
        self.save = save
        self.stop = stop
        self.interval = float(minutes or 0) * 60.0
        self.last = time.monotonic()

    def reset_clock(self):
        """An end-of-epoch checkpoint was just written."""
        self.last = time.monotonic()

    def __call__(self, step, carry_fn):
        distributed = du.is_distributed()
        if distributed and step % SYNC_EVERY:
            return
        stop = self.stop.requested
        due = bool(self.interval) and time.monotonic() - self.last >= self.interval
        if distributed:
            flags = torch.tensor([float(stop), float(due)])
            if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
                flags = flags.cuda()
            du.all_reduce_sum(flags)
            stop, due = bool(flags[0].item() > 0), bool(flags[1].item() > 0)
        if not (stop or due):
            return
        carry = carry_fn()  # global sums: every rank sees the same value
        if not math.isfinite(carry["loss_sum"]):
            raise NonFiniteLoss(f"training loss became non-finite by step {step}")
        self.save(step, carry)
        self.last = time.monotonic()
        if stop:
            raise Preempted(f"stopped after step {step} of the epoch on request (signal {self.stop.signal})")
