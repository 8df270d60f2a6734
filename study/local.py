"""The local backend: runs on long-lived worker processes, one per visible GPU (or as many as asked).

Each worker loads the interpreter and torch once, then takes runs one by one and calls the entry
point's main(argv) in-process, its output going to the run's log. ``run`` skips runs whose
results.json exists, so rerunning after any interruption finishes the work without rework.
"""

import contextlib
import importlib
import multiprocessing
import os
import shlex
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from study.grid import REPO
from study.rundirs import (
    clear_failure,
    entry_lock_holder,
    last_error_line,
    lock_holder,
    log_header,
    open_log,
    record_failure,
    sweep_lock,
)
from utils.cli import run_main
from utils.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from utils.progress import eta_suffix


@dataclass
class Task:
    """A run of any entry point with its own arguments: all the local backend needs to know.
    (The digits demo runs its source models and stage 1 through it; grid runs are ``Run``s.)"""
    entry: str  # module name, e.g. "main_imp_pretrain"
    args: list
    run_dir: Path
    done_file: str = "results.json"  # relative to run_dir; its existence means finished

    def argv(self):
        return list(self.args)

    def command(self, python="python"):
        return shlex.join([python, str(REPO / f"{self.entry}.py"), *self.args])

    @property
    def done(self):
        return (Path(self.run_dir) / self.done_file).is_file()


def call_in_process(run, attempt):
    """Run the entry point's main(argv) (main_downstream.py for grid runs) in this process, with
    its output in the run's log; returns the exit status, or "busy" when another process holds the run.

    run_main gives the statuses a separate process would: 0, 2 for bad input, 75 after a
    requested stop (checkpoint saved), 1 for anything else."""
    entry = importlib.import_module(run.entry)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    with sweep_lock(run.run_dir) as mine:
        if not mine or entry_lock_holder(run.run_dir):  # another sweep, or a run started by hand
            return "busy"
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", signal.SIGTERM))}
        with open_log(run.run_dir) as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            log_header(fh, run, f"attempt {attempt}")
            try:
                rc = run_main(entry.main, run.argv())
                rc = 0 if rc is None else int(rc)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: B036  (a worker must report, whatever the run raised)
                traceback.print_exc()
                rc = 1
            finally:
                for sig, handler in saved.items():  # a run's stop handler must not outlive it in this worker
                    signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if rc == 0 and not _finished(run):
            rc = 1
        return rc


def _finished(run):
    try:
        return run.done
    except UserError:  # a results.json the run did not write whole: not finished
        return False


def _worker_main(conn, env, threads):
    """A long-lived worker: the interpreter and torch are loaded once, then runs arrive one by one."""
    os.environ.update(env)  # before torch is imported: CUDA_VISIBLE_DEVICES pins this worker's GPU
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which asks runs to checkpoint
    import torch
    torch.set_num_threads(threads)
    import main_downstream  # noqa: F401  (the import is the cost this process pays once)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        run, attempt = task
        start = time.perf_counter()
        try:
            rc = call_in_process(run, attempt)
        except UserError as exc:  # a control file of the run refused (a symbolic link in its place)
            print(f"error: {exc}", file=sys.stderr, flush=True)
            rc = EXIT_USER_ERROR
        conn.send((rc, time.perf_counter() - start))


def visible_gpus():
    ids = os.environ.get("CUDA_VISIBLE_DEVICES")
    if ids is not None:
        return [i for i in ids.split(",") if i.strip() and i.strip() != "-1"]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


class _Stop:
    """Ctrl-C / SIGTERM in the parent: the first asks every running run to checkpoint and stop, a
    second one kills the workers (runs still resume from their last checkpoint)."""

    def __init__(self):
        self.count = 0

    def __call__(self, signum, frame):
        self.count += 1


def spawn_worker(ctx, slot, gpus, threads):
    """A long-lived worker process for ``slot`` (its GPU, its threads) and the pipe to it: {"proc",
    "conn", "task": None (idle), "slot"}; the local backend's pool and the pipeline both hold these."""
    env = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)] if gpus else ""}
    parent, child = ctx.Pipe()
    # not daemonic: a run may start DataLoader worker processes of its own
    proc = ctx.Process(target=_worker_main, args=(child, env, threads))
    proc.start()
    child.close()
    return {"proc": proc, "conn": parent, "task": None, "slot": slot}


class _Workers:
    """The worker processes and the task each one holds (None while idle)."""

    def __init__(self, n, gpus, threads):
        self.gpus, self.threads = gpus, threads
        self.ctx = multiprocessing.get_context("spawn")
        self.pool = [self.start(i) for i in range(n)]

    def start(self, slot):
        return spawn_worker(self.ctx, slot, self.gpus, self.threads)

    def ask_to_stop(self):
        """SIGTERM to every busy worker: its run saves a checkpoint and returns status 75."""
        for w in self.pool:
            if w["task"] is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w["proc"].pid, signal.SIGTERM)

    def kill(self):
        for w in self.pool:
            w["proc"].kill()

    def feed(self, queue, stopping):
        """Give each idle worker the next run; an idle worker with nothing left to do is retired."""
        for w in list(self.pool):
            if w["task"] is not None:
                continue
            if queue and not stopping:
                w["task"] = queue.pop(0)
                w["conn"].send(w["task"])
            else:
                with contextlib.suppress(OSError):
                    w["conn"].send(None)
                w["proc"].join(timeout=30)
                self.pool.remove(w)

    def wait(self):
        """The pipes and process sentinels that are ready, after at most a second."""
        return wait([w["conn"] for w in self.pool] + [w["proc"].sentinel for w in self.pool], timeout=1.0)


def run_local(runs, workers=None, retries=1, title="sweep", out=sys.stdout):
    """Run ``runs`` (skipping finished ones) on long-lived worker processes.

    Returns {"done", "failed", "interrupted", "busy"} lists of runs. One worker per visible GPU
    (CUDA_VISIBLE_DEVICES pinned per worker) unless ``workers`` is given, then that many
    processes (on the CPU when no GPU is visible, GPUs shared round-robin otherwise)."""
    todo = [r for r in runs if not r.done]
    skipped = len(runs) - len(todo)
    result = {"done": [], "failed": [], "interrupted": [], "busy": [], "skipped": skipped}
    if skipped:
        print(f"{title}: {skipped} of {len(runs)} runs already finished, skipped", file=out, flush=True)
    if not todo:
        return result
    gpus = visible_gpus()
    n = workers or max(1, len(gpus))
    n = max(1, min(n, len(todo)))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    queue = [(r, 1) for r in todo]
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    pool = _Workers(n, gpus, threads=max(1, cpus // n))
    where = f"{n} worker{'s' * (n > 1)}" + (f" on GPU {', '.join(gpus)}" if gpus else " on the CPU")
    print(f"{title}: {len(todo)} runs on {where}", file=out, flush=True)
    progress = _Progress(len(todo), title, out)
    try:
        _drive(pool, queue, stop, retries, result, progress)
    finally:
        pool.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop.count:
        result["interrupted"] += [r for r, _ in queue]
    return result


def _drive(pool, queue, stop, retries, result, progress):
    """Hand out runs and settle their outcomes until every worker is retired."""
    forwarded = killed = False
    while pool.pool:
        if stop.count and not forwarded:
            forwarded = True
            print(f"{progress.title}: stopping: running runs save a checkpoint and stop (press Ctrl-C again to kill "
                  "them; they then resume from their last epoch)", file=progress.out, flush=True)
            pool.ask_to_stop()
        if stop.count > 1 and not killed:
            killed = True
            pool.kill()
        pool.feed(queue, stop.count)
        if not pool.pool:
            break
        ready = pool.wait()
        for w in list(pool.pool):
            if w["conn"] in ready and _receive(w, retries, queue, result, progress, stop.count > 0):
                continue
            if w["proc"].is_alive() and w["proc"].sentinel not in ready and w["conn"] not in ready:
                continue
            _bury(pool, w, retries, queue, result, progress, stop.count)


def _receive(w, retries, queue, result, progress, stopping):
    """Settle the run whose status worker ``w`` sent; False when its pipe closed instead."""
    try:
        rc, _ = w["conn"].recv()
    except (EOFError, OSError):
        return False  # the pipe closed: the worker is gone, handled by the caller
    _settle(w["task"], rc, retries, queue, result, progress, stopping)
    w["task"] = None
    return True


def _bury(pool, w, retries, queue, result, progress, stops):
    """A worker that died: settle the run it held and start a new worker while runs remain."""
    w["proc"].join(timeout=5)
    pool.pool.remove(w)
    if w["task"] is not None:
        code = w["proc"].exitcode
        run = w["task"][0]
        with contextlib.suppress(UserError), open_log(run.run_dir) as fh:
            fh.write(f"# sweep: the worker process died (exit code {code}) during this run\n")
        _settle(w["task"], EXIT_PREEMPTED if stops else f"worker died ({code})", retries,
                queue, result, progress, stops > 0)
    if queue and not stops:
        pool.pool.append(pool.start(w["slot"]))


def _settle(task, rc, retries, queue, result, progress, stopping):
    run, attempt = task
    if rc == 0:
        clear_failure(run.run_dir)
        result["done"].append(run)
        progress.update(run, "done")
    elif rc == "busy":
        result["busy"].append(run)
        progress.update(run, f"skipped: {lock_holder(run.run_dir) or 'another process'} holds it")
    elif rc == EXIT_PREEMPTED or stopping:
        result["interrupted"].append(run)
        progress.update(run, "stopped, resumable", count=False)
    elif attempt <= retries:
        queue.append((run, attempt + 1))
        progress.update(run, f"failed (status {rc}), will retry: {last_error_line(run.run_dir)}", count=False)
    else:
        record_failure(run.run_dir, rc, attempt)
        result["failed"].append(run)
        progress.update(run, f"FAILED (status {rc}): {last_error_line(run.run_dir)}")


class _Progress:
    """One line per finished run would flood a 9,000-run sweep; a line every few seconds does not."""

    def __init__(self, total, title, out):
        self.total, self.title, self.out = total, title, out
        self.finished = 0
        self.start = self.last = time.monotonic()

    def update(self, run, what, count=True):
        if count:
            self.finished += 1
        if what.startswith(("FAILED", "failed", "skipped", "stopped")):
            print(f"{self.title}: {run.run_dir}: {what}", file=self.out, flush=True)
        now = time.monotonic()
        if now - self.last >= 10 or self.finished == self.total:
            self.last = now
            print(f"{self.title}: {self.finished} of {self.total} runs finished "
                  f"({(now - self.start) / 60:.1f} min{eta_suffix(self.finished, self.total, now - self.start)})",
                  file=self.out, flush=True)
