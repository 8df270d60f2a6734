"""The SLURM backend: every pending run one task of a job array (one GPU each), through submitit.

submitit is optional (requirements-slurm.txt); without it ``--backend slurm`` says how to install it.
"""

import contextlib
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from study.grid import ENTRY, REPO, run_finished
from study.rundirs import (
    clear_failure,
    entry_lock_holder,
    last_error_line,
    lock_holder,
    open_log,
    record_failure,
    sweep_lock,
)
from utils.errors import EXIT_PREEMPTED, UserError


class SlurmRun:
    """One array task: runs the main_downstream.py command of one run directory.

    submitit sends SIGUSR2 before the time limit (``--signal=USR2@...``) and calls ``checkpoint``:
    the run is asked to save (SIGTERM) and the same task is requeued; main_downstream.py then
    resumes from its checkpoint. The child ignores SIGUSR2 so that signal can only reach it as
    the SIGTERM it knows how to handle."""

    def __init__(self, argv, run_dir, python, stop_grace_s):
        self.argv, self.run_dir, self.python, self.stop_grace_s = list(argv), str(run_dir), python, stop_grace_s
        self._proc = None
        self.stopped_status = None  # the run's exit status when checkpoint() stopped it

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_proc"] = None
        return state

    def command(self):
        return [self.python, str(ENTRY), *self.argv]

    def __call__(self):
        run_dir = Path(self.run_dir)
        try:
            if run_finished(run_dir):
                return 0
            run_dir.mkdir(parents=True, exist_ok=True)
            return self._run_locked(run_dir)
        except UserError as exc:  # a damaged results.json, a control file that is a link
            raise RuntimeError(str(exc)) from None

    def _run_locked(self, run_dir):
        with sweep_lock(run_dir) as mine:
            if not mine or entry_lock_holder(run_dir):
                raise RuntimeError(f"{lock_holder(run_dir)} is already working on {run_dir}")
            with open_log(run_dir) as fh:
                fh.write(f"\n# sweep: slurm task {os.environ.get('SLURM_ARRAY_JOB_ID', '?')}_"
                         f"{os.environ.get('SLURM_ARRAY_TASK_ID', '?')} on {socket.gethostname()} at "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n# {shlex.join(self.command())}\n")
                fh.flush()
                usr2 = getattr(signal, "SIGUSR2", None)
                self._proc = subprocess.Popen(
                    self.command(), stdout=fh, stderr=subprocess.STDOUT, cwd=str(REPO),
                    preexec_fn=(lambda: signal.signal(usr2, signal.SIG_IGN)) if usr2 else None)
                # poll, not wait(): a blocking wait() holds Popen's lock, and checkpoint() (a signal
                # handler in this thread) must be able to reap the child meanwhile
                while (rc := self._proc.poll()) is None:
                    time.sleep(1.0)
            self._proc = None
            if rc == 0:
                clear_failure(run_dir)
                return 0
            if rc == EXIT_PREEMPTED:
                raise RuntimeError(f"{run_dir} stopped on a signal after saving its checkpoint (status 75); it "
                                   "resumes when the job is requeued or the sweep is run again")
            record_failure(run_dir, rc, 1)
            raise RuntimeError(f"{run_dir} failed with status {rc}: {last_error_line(run_dir)}")

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on the preemption/time-limit signal: stop the run at a checkpoint, requeue."""
        import submitit
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_grace_s
            while True:
                try:
                    pid, status = os.waitpid(proc.pid, os.WNOHANG)
                except ChildProcessError:  # reaped already
                    break
                if pid:
                    self.stopped_status = os.waitstatus_to_exitcode(status)
                    break
                if time.monotonic() > deadline:
                    proc.kill()  # its last checkpoint is still there to resume from
                    break
                time.sleep(0.2)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def parse_minutes(text):
    """SLURM's time formats -> minutes (what submitit's time parameter takes): M, M:S, H:M:S,
    D-H, D-H:M, D-H:M:S."""
    original = text = str(text).strip()
    try:
        days = None
        if "-" in text:
            d, text = text.split("-", 1)
            days = int(d)
        parts = [int(p) for p in text.split(":")]
        if any(v < 0 for v in parts) or len(parts) > 3:
            raise ValueError
    except ValueError:
        raise UserError(f"--slurm-time '{original}' is not a SLURM time; use minutes (240), HH:MM:SS (4:00:00) "
                        "or D-HH:MM:SS (1-00:00:00).") from None
    if days is None:  # M, M:S or H:M:S
        h, m, sec = parts if len(parts) == 3 else (0, parts[0], parts[1] if len(parts) == 2 else 0)
    else:  # D-H, D-H:M or D-H:M:S
        h, m, sec = (parts + [0, 0])[:3]
        h += 24 * days
    minutes = h * 60 + m + math.ceil(sec / 60)
    if minutes < 1:
        raise UserError(f"--slurm-time must be at least one minute, not '{original}'.")
    return minutes


def run_slurm(runs, args, grid, out=sys.stdout):
    """Submit every pending run as one task of a SLURM job array (one GPU per task)."""
    try:
        import submitit
    except ImportError:
        raise UserError("--backend slurm needs the submitit package; install it with "
                        "`pip install -r requirements-slurm.txt` (or use --print to drive your own scheduler).") from None
    todo = [r for r in runs if not r.done]
    busy = [r for r in todo if lock_holder(r.run_dir)]
    todo = [r for r in todo if r not in busy]
    if busy:
        print(f"{len(busy)} runs are running already and are not submitted again", file=out)
    if not todo:
        print(f"nothing to submit: {len(runs) - len(busy)} of {len(runs)} runs are finished", file=out)
        return None
    extra = {}
    for item in args.slurm_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--slurm-option '{item}' must look like KEY=VALUE, e.g. --slurm-option account=myproj.")
        extra[key.strip().lstrip("-")] = value.strip()
    folder = Path(args.slurm_folder) if args.slurm_folder else grid.out / ".submitit"
    try:
        executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=args.slurm_max_requeues)
    except RuntimeError as exc:  # submitit's check for srun
        raise UserError(f"--backend slurm needs SLURM's commands on PATH ({exc}); run the sweep on a login "
                        "node of the cluster, or use --print.") from None
    params = {"time": parse_minutes(args.slurm_time), "nodes": 1, "ntasks_per_node": 1, "gpus_per_task": 1,
              "signal_delay_s": args.slurm_signal_delay, "array_parallelism": args.slurm_array_parallelism,
              "job_name": args.slurm_job_name}
    if args.slurm_partition:
        params["partition"] = args.slurm_partition
    # a task unpickles its SlurmRun by reference to study.slurm: the repository must be importable
    # on the node whatever directory sbatch was called from
    params["setup"] = [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if extra:
        params["additional_parameters"] = extra
    executor.update_parameters(**params)
    grace = max(10, args.slurm_signal_delay - 20)
    try:
        with executor.batch():
            for r in todo:
                executor.submit(SlurmRun(r.argv(), r.run_dir, sys.executable, grace))
    except (OSError, subprocess.SubprocessError, submitit.core.utils.FailedJobError) as exc:
        raise UserError(f"sbatch refused the job array ({exc}); check --slurm-partition, --slurm-time and "
                        "--slurm-option against your cluster's limits.") from None
    print(f"submitted {len(todo)} runs as a job array (submitit folder {folder}); follow them with "
          f"`python script/sweep.py status {args.grid}`", file=out)
    return folder
