"""The SLURM backend: every pending run one task of a job array (GPUs per task: --slurm-gpus-per-task), through
submitit.

submitit is optional (requirements-slurm.txt); without it ``--backend slurm`` says how to install it.
"""

import contextlib
import getpass
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
                env, threads = task_environment(os.environ)
                fh.write(f"\n# sweep: slurm {job_label(os.environ)} on {socket.gethostname()} at "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {threads}\n# {shlex.join(self.command())}\n")
                fh.flush()
                usr2 = getattr(signal, "SIGUSR2", None)
                self._proc = subprocess.Popen(
                    self.command(), stdout=fh, stderr=subprocess.STDOUT, cwd=str(REPO), env=env,
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
        """Called by submitit on the preemption/time-limit signal: stop the run at a checkpoint, requeue.

        A run that has finished (its results.json is written) is not requeued: the signal came as it
        ended, and a requeue would only spend one of the allowance and a scheduling round on nothing."""
        import submitit
        if run_finished(Path(self.run_dir)):
            return None
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
        if self.stopped_status == 0 or run_finished(Path(self.run_dir)):
            return None
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def job_label(environ):
    """'job 12_3' for an array task, 'job 12' for a plain job (a sweep of one run)."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"job {array}_{task}"
    return f"job {environ.get('SLURM_JOB_ID', '(no SLURM_JOB_ID)')}"


def task_environment(environ):
    """The run's environment: torch's threads set from the task's CPU allocation, as the local
    backend sets them from its share of the cores. Without it a 1-CPU task starts one thread per
    core of the node, and on CPU a run's numbers depend on its thread count."""
    env = dict(environ)
    cpus = environ.get("SLURM_CPUS_PER_TASK") or environ.get("SLURM_CPUS_ON_NODE")
    if not cpus or not cpus.isdigit() or "OMP_NUM_THREADS" in environ:
        return env, f"threads: {environ.get('OMP_NUM_THREADS', 'torch default')}"
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = cpus
    return env, f"threads: {cpus} (the task's CPUs)"


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


# submitit parameters fixed by the sweep's design: one run is one task on one node, importing the repository
FIXED_PARAMETERS = {"nodes", "ntasks_per_node", "setup"}
JOB_FILE = ".sweep-slurm-job"  # in a run directory: the SLURM job id its last submission got
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED", "PREEMPTED"}


def slurm_options(items):
    """--slurm-option KEY=VALUE items -> (submitit parameters, additional #SBATCH parameters).

    Keys are spelt either way (gpus-per-task, gpus_per_task): submitit writes each parameter with
    dashes, so an option given with a dash that the sweep also sets with an underscore would be
    written twice (the last wins). Normalised, an option overrides the sweep's own value, so
    ``gpus-per-task=0`` asks for no GPU as ``--slurm-gpus-per-task 0`` does."""
    import inspect

    from submitit.slurm.slurm import _make_sbatch_string
    named = set(inspect.signature(_make_sbatch_string).parameters) - {
        "command", "folder", "additional_parameters", "map_count", "srun_args"}
    params, extra = {}, {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise UserError(f"--slurm-option '{item}' must look like KEY=VALUE, e.g. --slurm-option account=myproj.")
        if key in FIXED_PARAMETERS:
            raise UserError(f"--slurm-option '{item}' cannot be changed: each run is one task on one node.")
        (params if key in named else extra)[key] = value.strip()
    return params, extra


def active_jobs():
    """The user's SLURM jobs that are queued or running, as {job id ('12_3' for array tasks): state}."""
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i %T"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"squeue could not be run ({exc}); the sweep asks it which runs are queued already, "
                        "so that none is submitted twice. Run the sweep where SLURM's commands work.") from None
    if proc.returncode != 0:
        raise UserError(f"squeue failed ({proc.stderr.strip() or proc.returncode}); the sweep asks it which runs "
                        "are queued already, so that none is submitted twice.")
    jobs = {}
    for line in proc.stdout.splitlines():
        job, _, state = line.strip().partition(" ")
        if state in ACTIVE_STATES:
            jobs[job] = state
    return jobs


def queued_job(run_dir, jobs):
    """The queued or running job of an earlier submission of this run, or None."""
    try:
        job = (Path(run_dir) / JOB_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return job if job in jobs else None


def run_slurm(runs, args, grid, out=None):
    """Submit every pending run as one task of a SLURM job array (``--slurm-gpus-per-task`` GPUs each).

    Runs still queued or running from an earlier submission (known by the job id each run directory
    records, asked of squeue) are not submitted again."""
    out = out or sys.stdout
    try:
        import submitit
    except ImportError:
        raise UserError("--backend slurm needs the submitit package; install it with "
                        "`pip install -r requirements-slurm.txt` (or use --print to drive your own scheduler).") from None
    named, extra = slurm_options(args.slurm_option)
    folder = Path(args.slurm_folder) if args.slurm_folder else grid.out / ".submitit"
    try:
        executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=args.slurm_max_requeues)
    except RuntimeError as exc:  # submitit's check for srun
        raise UserError(f"--backend slurm needs SLURM's commands on PATH ({exc}); run the sweep on a login "
                        "node of the cluster, or use --print.") from None
    todo = [r for r in runs if not r.done]
    jobs = active_jobs() if any(os.path.lexists(Path(r.run_dir) / JOB_FILE) for r in todo) else {}
    queued = {id(r): queued_job(r.run_dir, jobs) for r in todo}
    busy = [r for r in todo if queued[id(r)] or lock_holder(r.run_dir)]
    todo = [r for r in todo if r not in busy]
    if busy:
        ids = sorted({queued[id(r)] for r in busy if queued[id(r)]})
        shown = f" (jobs {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})" if ids else ""
        print(f"{len(busy)} runs are queued or running already{shown} and are not submitted again", file=out)
    if not todo:
        print(f"nothing to submit: {len(runs) - len(busy)} of {len(runs)} runs are finished, {len(busy)} queued or "
              "running", file=out)
        return None
    params = {"time": parse_minutes(args.slurm_time), "nodes": 1, "ntasks_per_node": 1,
              "signal_delay_s": args.slurm_signal_delay, "array_parallelism": args.slurm_array_parallelism,
              "job_name": args.slurm_job_name, "gpus_per_task": args.slurm_gpus_per_task}
    if args.slurm_partition:
        params["partition"] = args.slurm_partition
    params.update(named)
    if str(params["gpus_per_task"]).strip() in ("0", ""):  # ask for none: a CPU partition, or no GPU GRES
        del params["gpus_per_task"]
    # a task unpickles its SlurmRun by reference to study.slurm: the repository must be importable
    # on the node whatever directory sbatch was called from
    params["setup"] = [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if extra:
        params["additional_parameters"] = extra
    executor.update_parameters(**params)
    jobs = submit(executor, folder, todo, max(10, args.slurm_signal_delay - 20))
    for r, job in zip(todo, jobs):
        Path(r.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(r.run_dir) / JOB_FILE).write_text(f"{job.job_id}\n")
    base = str(jobs[0].job_id).split("_")[0]
    what = f"as job {base}" if len(jobs) == 1 else f"as job array {base} (tasks {base}_0 to {base}_{len(jobs) - 1})"
    print(f"submitted {len(todo)} run{'s' if len(todo) > 1 else ''} {what}; submitit folder {folder}; follow "
          f"them with `python script/sweep.py status {args.grid}` or `squeue -j {base}`", file=out)
    return folder


def submit(executor, folder, todo, grace):
    """One sbatch call for every run; a refused one leaves no task files behind in ``folder``."""
    import submitit
    before = set(folder.rglob("*")) if folder.exists() else set()
    try:
        with executor.batch():
            jobs = [executor.submit(SlurmRun(r.argv(), r.run_dir, sys.executable, grace)) for r in todo]
    except (OSError, subprocess.SubprocessError, submitit.core.utils.FailedJobError) as exc:
        for path in sorted(set(folder.rglob("*")) - before, reverse=True):
            if path.is_dir() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
        raise UserError(f"sbatch refused the job array ({exc}); check --slurm-partition, --slurm-time, "
                        "--slurm-gpus-per-task and --slurm-option against your cluster's limits.") from None
    return jobs
