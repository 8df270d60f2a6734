"""The local backend with stage 1 inside the grid: stage-1 jobs and stage-2 runs share the slots.

A slot is one worker place of study.local (a visible GPU, or one of ``--workers`` CPU processes).
A stage-1 job (a [stage1.NAME] entry) holds ``gpus`` slots while it runs, as its own process group
(torchrun over its GPUs, or one process); a stage-2 run waiting on a ticket is handed to a worker as
soon as stage 1 has completely written that round (study.stage1.written_rounds), so the runs of early
rounds overlap the later IMP rounds. A job that fails (after ``retries`` retries) leaves
``.sweep-failed.json`` in its directory and holds back only the runs whose ticket it never wrote.
Ctrl-C / SIGTERM asks every job and run to checkpoint and stop; the same command resumes both
stages (stage 1 resumes its own directory).
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

from study import stage1, stage1_progress
from study.local import _Progress, _settle, _Stop, spawn_worker, visible_gpus
from study.rundirs import clear_failure, entry_lock_holder, log_header, open_log, record_failure
from utils.errors import EXIT_PREEMPTED, UserError


class Job:
    """A stage-1 entry as the pipeline drives it."""

    def __init__(self, entry):
        self.entry, self.proc, self.slots, self.attempt = entry, None, [], 0
        self.state = "done" if entry.finished else "pending"  # pending, running, busy, done, failed, interrupted

    def start(self, slots, gpus, threads):
        self.attempt += 1
        self.slots = slots
        ids = sorted({gpus[s % len(gpus)] for s in slots}) if gpus else []
        self.entry.save_dir.mkdir(parents=True, exist_ok=True)
        with open_log(self.entry.save_dir) as fh:
            log_header(fh, self.entry, f"stage 1, attempt {self.attempt}")
            # its own session: a Ctrl-C at the terminal reaches the sweep, which asks the job to checkpoint
            self.proc = subprocess.Popen([*self.entry.launcher(), *self.entry.argv()], stdout=fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=stage1.launch_env(ids, threads * len(slots)), start_new_session=True)
        self.state = "running"


class Pipeline:
    """Slots, worker processes, stage-1 jobs and the runs waiting on their tickets."""

    def __init__(self, runs, needs, jobs, n, retries, out, title):
        import multiprocessing

        self.gpus = visible_gpus()
        self.n, self.retries, self.out = n, retries, out
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = max(1, cpus // n)
        self.ctx = multiprocessing.get_context("spawn")
        self.workers = {}  # slot -> {"proc", "conn", "task", "slot"}
        self.jobs, self.needs = jobs, needs
        self.waiting = [r for r in runs if id(r) in needs]
        self.queue = [(r, 1) for r in runs if id(r) not in needs]
        self.result = {"done": [], "failed": [], "interrupted": [], "busy": [], "blocked": [], "skipped": 0}
        self.progress = _Progress(len(runs), title, out)
        self.stop = _Stop()

    # ------------------------------------------------------------------ slots
    def free_slots(self):
        held = {s for j in self.jobs if j.state == "running" for s in j.slots}
        return [s for s in range(self.n) if s not in held and s not in self.workers]

    def start_worker(self, slot):
        self.workers[slot] = spawn_worker(self.ctx, slot, self.gpus, self.threads)

    def retire(self, slot):
        w = self.workers.pop(slot)
        with contextlib.suppress(OSError):
            w["conn"].send(None)
        w["proc"].join(timeout=30)

    # ------------------------------------------------------------------ stage 1
    def poll_jobs(self):
        for job in self.jobs:
            if job.state == "busy" and not entry_lock_holder(job.entry.save_dir):
                job.state = "done" if job.entry.finished else "pending"
            if job.state != "running" or job.proc.poll() is None:
                continue
            rc, job.slots = job.proc.returncode, []
            if rc == 0 and job.entry.finished:
                clear_failure(job.entry.save_dir)
                job.state = "done"
                self.say(f"stage 1 {job.entry.name}: done, {len(job.entry.levels)} tickets in {job.entry.save_dir}")
            elif rc == EXIT_PREEMPTED or self.stop.count:
                job.state = "interrupted"
                self.say(f"stage 1 {job.entry.name}: stopped, resumable")
            elif job.attempt <= self.retries:
                job.state = "pending"
                self.say(f"stage 1 {job.entry.name}: failed (status {rc}), will retry: {self.last_line(job)}")
            else:
                record_failure(job.entry.save_dir, rc, job.attempt)
                job.state = "failed"
                self.say(f"stage 1 {job.entry.name}: FAILED (status {rc}): {self.last_line(job).rstrip('.')}; only "
                         "the runs waiting on its tickets are held back")

    @staticmethod
    def last_line(job):
        from study.rundirs import last_error_line

        return last_error_line(job.entry.save_dir)

    def start_jobs(self):
        """Stage 1 first: it is what the waiting runs need. A job waits for slots while idle workers
        are retired to make room (running runs are never cut short)."""
        for job in self.jobs:
            if job.state != "pending" or self.stop.count:
                continue
            if entry_lock_holder(job.entry.save_dir):  # another sweep, or stage 1 started by hand
                job.state = "busy"
                self.say(f"stage 1 {job.entry.name}: another process holds {job.entry.save_dir}; its runs start "
                         "as its tickets appear")
                continue
            for slot in [s for s, w in self.workers.items() if w["task"] is None]:
                if len(self.free_slots()) >= job.entry.gpus:
                    break
                self.retire(slot)
            slots = self.distinct_gpu_slots(job.entry.gpus)
            if slots is None:
                return  # wait for running runs to end; later jobs wait behind this one
            job.start(slots, self.gpus, self.threads)
            self.say(f"stage 1 {job.entry.name}: started on {job.entry.gpus} slot(s): {job.entry.command()}")

    def distinct_gpu_slots(self, count):
        """``count`` free slots on as many different GPUs (with --workers above the GPU count, slots
        share GPUs round-robin), or None while there are not enough."""
        chosen, ids = [], set()
        for slot in self.free_slots():
            gpu = self.gpus[slot % len(self.gpus)] if self.gpus else slot
            if gpu not in ids:
                chosen.append(slot)
                ids.add(gpu)
        return chosen[:count] if len(chosen) >= count else None

    def pending_stage1(self):
        return any(j.state in ("pending", "running", "busy") for j in self.jobs)

    # ------------------------------------------------------------------ stage 2
    def release_ready(self):
        """Move waiting runs whose ticket is written to the queue; hold back those of failed jobs."""
        written = {j.entry.name: j.entry.written() for j in self.jobs}
        state = {j.entry.name: j.state for j in self.jobs}
        still, released, ready = [], {}, []
        for run in self.waiting:
            entry, k = self.needs[id(run)]
            if k in written[entry.name]:
                ready.append((run, 1))
                released[(entry.name, k)] = released.get((entry.name, k), 0) + 1
            elif state[entry.name] in ("failed", "done"):  # done without this round: cannot happen, but never hang
                self.result["blocked"].append(run)
                self.progress.update(run, f"skipped: stage 1 {entry.name} failed before round {k}", count=False)
            else:
                still.append(run)
        self.waiting = still
        # ahead of the runs that waited on nothing (dense baselines): a round's runs start as soon as its
        # ticket exists, while later rounds are still being searched, which is the point of the pipeline
        self.queue[:0] = ready
        for (name, k), count in sorted(released.items()):
            self.say(f"stage 1 {name}: round {k} ticket written ({written[name][k]:.2f}%); its {count} run(s) queued")

    def feed(self):
        if not self.stop.count and not any(j.state == "pending" for j in self.jobs):
            # runs still waiting on a ticket count too: a worker started early has torch loaded when it comes
            idle = [w for w in self.workers.values() if w["task"] is None]
            for slot in self.free_slots()[:max(0, len(self.queue) + len(self.waiting) - len(idle))]:
                self.start_worker(slot)
        for slot, w in list(self.workers.items()):
            if w["task"] is not None:
                continue
            if self.queue and not self.stop.count:
                w["task"] = self.queue.pop(0)
                w["conn"].send(w["task"])
            elif self.stop.count or not (self.waiting or self.pending_stage1()) or any(
                    j.state == "pending" for j in self.jobs):
                self.retire(slot)

    def settle_workers(self, ready):
        for slot, w in list(self.workers.items()):
            if w["conn"] in ready:
                try:
                    rc, _ = w["conn"].recv()
                except (EOFError, OSError):
                    rc = None
                if rc is not None:
                    _settle(w["task"], rc, self.retries, self.queue, self.result, self.progress, self.stop.count > 0)
                    w["task"] = None
                    continue
            if w["proc"].is_alive():
                continue
            del self.workers[slot]  # a worker that died: its run is settled, a new worker takes the slot
            if w["task"] is not None:
                with contextlib.suppress(UserError), open_log(w["task"][0].run_dir) as fh:
                    fh.write(f"# sweep: the worker process died (exit code {w['proc'].exitcode}) during this run\n")
                _settle(w["task"], EXIT_PREEMPTED if self.stop.count else f"worker died ({w['proc'].exitcode})",
                        self.retries, self.queue, self.result, self.progress, self.stop.count > 0)

    # ------------------------------------------------------------------ the loop
    def say(self, text):
        print(f"{self.progress.title}: {text}", file=self.out, flush=True)

    def forward_stop(self, count):
        """First stop: SIGTERM to each job and busy worker (they checkpoint, exit 75); second: kill."""
        sig = signal.SIGTERM if count == 1 else signal.SIGKILL
        for job in self.jobs:
            if job.state == "running":
                with contextlib.suppress(ProcessLookupError):
                    (os.kill if count == 1 else os.killpg)(job.proc.pid, sig)
        for w in self.workers.values():
            if w["task"] is not None or count > 1:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w["proc"].pid, sig)

    def busy(self):
        """Work is left: a worker or job still running, or (unless stopping) runs or jobs to start.
        Runs still waiting when no job can write their tickets any more are left to a rerun."""
        return self.workers or any(j.state == "running" for j in self.jobs) or (
            not self.stop.count and (self.queue or self.pending_stage1()))

    def drive(self):
        from multiprocessing.connection import wait

        forwarded = 0
        while True:
            if self.stop.count > forwarded:
                if forwarded == 0:
                    self.say("stopping: stage-1 jobs and running runs save a checkpoint and stop (press Ctrl-C "
                             "again to kill them; they then resume from their last checkpoint)")
                forwarded = self.stop.count
                self.forward_stop(min(forwarded, 2))
            self.poll_jobs()
            self.release_ready()
            self.start_jobs()
            self.feed()
            if not self.busy():
                return
            handles = [w["conn"] for w in self.workers.values()] + [w["proc"].sentinel for w in self.workers.values()]
            if handles:
                ready = wait(handles, timeout=0.5)
            else:
                time.sleep(0.5)
                ready = []
            self.settle_workers(ready)

    def run(self):
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.drive()
        finally:
            for job in self.jobs:
                if job.state == "running" and job.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(job.proc.pid, signal.SIGKILL)
                    job.proc.wait()
            for w in self.workers.values():
                w["proc"].kill()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.stop.count:
            self.result["interrupted"] += [r for r, _ in self.queue]
        self.result["interrupted"] += self.waiting
        return self.result


def run_pipeline(grid, runs, workers=None, retries=1, stage1_only=False, title="sweep", out=sys.stdout):
    """Run the grid's stage-1 entries and its runs (skipping finished ones), each run as soon as its
    ticket is written. Returns run_local's result dict, with "blocked" (runs held back by a failed
    stage-1 job) and "stage1" ({entry name: final state})."""
    todo = [] if stage1_only else [r for r in runs if not r.done]
    skipped = 0 if stage1_only else len(runs) - len(todo)
    gpus = visible_gpus()
    n = workers or max(1, len(gpus))
    jobs = [Job(e) for e in grid.stage1.values()]
    for job in jobs:
        if job.state != "done" and (job.entry.gpus > n or (gpus and job.entry.gpus > len(gpus))):
            raise UserError(f"[stage1.{job.entry.name}] needs {job.entry.gpus} GPUs, but this sweep has {n} slot(s) "
                            f"({len(gpus)} visible GPU(s)); lower its gpus or give the sweep more "
                            "(CUDA_VISIBLE_DEVICES, --workers).")
    if skipped:
        print(f"{title}: {skipped} of {len(runs)} runs already finished, skipped", file=out, flush=True)
    done = [j.entry.name for j in jobs if j.state == "done"]
    if done:
        print(f"{title}: stage 1 already finished: {', '.join(done)}", file=out, flush=True)
    pipeline = Pipeline(todo, stage1_progress.run_needs(grid, todo), jobs, n, retries, out, title)
    where = f"{n} slot{'s' * (n > 1)}" + (f" on GPU {', '.join(gpus)}" if gpus else " on the CPU")
    print(f"{title}: {len(todo)} runs and {len(jobs) - len(done)} stage-1 job(s) on {where}", file=out, flush=True)
    result = pipeline.run()
    result["skipped"] = skipped
    result["stage1"] = {j.entry.name: j.state for j in jobs}
    return result
