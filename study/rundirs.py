"""The state of a run directory as the study sees it: the sweep's lock, failure records, the run log.

A run's output goes to ``.sweep.log`` inside its directory (a dot-file, which main_downstream.py
ignores when it checks that a new run directory is empty); a run that failed leaves
``.sweep-failed.json`` there for ``status``.
"""

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOG_NAME, FAILED_NAME, LOCK_NAME = ".sweep.log", ".sweep-failed.json", ".sweep.lock"


def lock_holder(run_dir):
    """'pid@host' of a live process working on ``run_dir``, else None: the entry points' own
    per-directory lock, or the lock the sweep's workers and SLURM tasks hold while a run is theirs."""
    return entry_lock_holder(run_dir) or _sweep_lock_holder(run_dir)


def entry_lock_holder(run_dir):
    """The holder of the lock main_downstream.py takes on its --save-dir."""
    # imported here: utils.rundir loads torch (through utils.checkpoint), and plan and the grid's
    # error messages should not wait for it
    from utils import rundir

    return rundir.lock_holder(run_dir)


def _sweep_lock_holder(run_dir):
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return None
    try:
        with open(path) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return fh.read().strip() or "unknown"
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


@contextlib.contextmanager
def sweep_lock(run_dir):
    """Hold ``run_dir``'s sweep lock; yields False (holding nothing) when another process has it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}@{socket.gethostname()}")
        fh.flush()
        yield True
    finally:
        fh.close()


def last_error_line(run_dir):
    """The last non-empty line of the run's log: what a failed run said last."""
    log = Path(run_dir) / LOG_NAME
    if not log.exists():
        return ""
    with open(log, "rb") as fh:
        fh.seek(max(0, log.stat().st_size - 8192))
        tail = fh.read().decode("utf-8", "replace")
    lines = [ln.strip() for ln in tail.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def record_failure(run_dir, rc, attempts):
    """Leave the failure record ``status`` reads (written whole, so a reader never sees half of it)."""
    record = {"exit_status": rc, "attempts": attempts, "error": last_error_line(run_dir),
              "host": socket.gethostname(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = Path(run_dir) / f"{FAILED_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, Path(run_dir) / FAILED_NAME)


def clear_failure(run_dir):
    with contextlib.suppress(FileNotFoundError):
        (Path(run_dir) / FAILED_NAME).unlink()


def log_header(fh, run, note):
    """The line that opens each attempt of a run in its log: where, when, and the exact command."""
    fh.write(f"\n# sweep: {note} on {socket.gethostname()} pid {os.getpid()} at "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n# {run.command()}\n")
    fh.flush()




def run_state(run):
    """done, running (a live process holds it), failed (a failure record) or pending."""
    if run.done:
        return "done"
    if lock_holder(run.run_dir):
        return "running"
    if (run.run_dir / FAILED_NAME).exists():
        return "failed"
    return "pending"
