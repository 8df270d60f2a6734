"""Run a grid of stage-2 runs (main_downstream.py) on local GPUs/CPUs or on SLURM, and track it.

    python script/sweep.py plan   GRID.toml [GRID.toml ...] [--bench FILE]
                                            # every run: its directory and exact command, and totals; on
                                            # stderr the GPU-hours and disk per group and grid file
    python script/sweep.py run    GRID.toml [--backend local|slurm] [--workers N] [--retries 1] [--print]
                                            [--rerun-stale] [--stage1-only]
    python script/sweep.py status GRID.toml      # per group: done / running / failed / pending / stale, GPU-hours, disk
    ... [--seeds 1,2] [--datasets cifar10] [--levels 5,10,19]   # any command: only these runs

The grid file (docs/contracts.md §7) names the θ_p file and the stage-1 ticket directories of each
pre-training, the axes and extra flags; [stage1.NAME] entries make ticket directories inside the
grid: ``run`` (local backend) runs those stage-1 jobs and starts each round's runs as soon as its
ticket is written, and ``plan`` lists every run before any θ_p or ticket exists. The paper's per-dataset protocol (lr, epochs, milestones,
batch size, weight decay, SVHN's cosine schedule, --eval-from) is NOT repeated here: flags the
grid leaves unset are filled by main_downstream.py's own defaults, the one place they live.

Every run gets one deterministic directory below ``out``; ``run`` skips runs whose results.json
exists, so rerunning the same command after any interruption finishes the grid without rework.
A run directory whose config.json differs from what the grid gives that run now (a [flags] value
changed since) is ``stale``: ``run`` refuses the grid until ``--rerun-stale`` moves such
directories aside (to ``DIR.stale-TIMESTAMP``, never deleted) and runs them again.
A run's output goes to ``.sweep.log`` inside its directory (a dot-file, which main_downstream.py
ignores when it checks that a new run directory is empty); a run that failed leaves
``.sweep-failed.json`` there for ``status``.
"""

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# light: nothing here imports torch, so plan's and the grid's errors come at once
from study.cost import ASSUMED_TFLOPS, Pricer, cost_lines, select  # noqa: E402
from study.grid import (  # noqa: E402
    Grid,
    Run,
    build_grid,
    check_flag_keys,
    check_flags,
    expand,
    expected_runs,
    flag_args,
    load_grid,
    refuse_flags_acting_nowhere,
)
from study.local import Task, run_local  # noqa: E402
from study.pipeline import run_pipeline  # noqa: E402
from study.rundirs import (  # noqa: E402
    LOG_NAME,
    entry_lock_holder,
    last_error_line,
    lock_holder,
    plan_state,
    refuse_linked_control_files,
    stale_text,
    sweep_lock,
)
from study.slurm import SlurmRun, parse_minutes, run_slurm  # noqa: E402
from study.stage1_progress import plan_lines as stage1_plan_lines  # noqa: E402
from study.stage1_progress import unfinished  # noqa: E402
from study.status import status_lines  # noqa: E402
from utils.cli import ArgumentParser, int_list  # noqa: E402
from utils.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError  # noqa: E402

# what users and tests call as sweep.NAME from before the study/ package
__all__ = ["Grid", "Run", "Task", "SlurmRun", "UserError", "build_grid", "expand", "expected_runs", "flag_args",
           "load_grid", "lock_holder", "sweep_lock", "last_error_line", "LOG_NAME", "parse_minutes", "run_local",
           "run_slurm", "status_lines", "main"]


# a smaller study: every command takes these and acts on those runs only (study.cost.select)
SUBSET = {"seeds": "1,2", "datasets": "cifar10", "levels": "5,10,19"}


def _names(text):
    return [v for v in str(text).replace(" ", "").split(",") if v]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["plan", "run", "status"])
    p.add_argument("grid", help="grid file (TOML, docs/contracts.md §7)")
    p.add_argument("more_grids", nargs="*", metavar="GRID",
                   help="plan: more grid files of the study (one run tree): the cost per file and of their "
                        "distinct runs")
    p.add_argument("--bench", action="append", default=None, metavar="FILE",
                   help="plan: a benchmarks/bench_step.py --json record (repeatable) pricing runs of its regime, "
                        "architecture and image size that no finished run prices (default: none; finished runs "
                        "price what they can)")
    p.add_argument("--assume-tflops", type=float, default=None, metavar="T",
                   help="plan: the achieved TFLOP/s that prices runs no finished run or --bench record prices, from "
                        "their counted FLOPs (default: 250, a quarter of an H100's dense bf16 peak)")
    p.add_argument("--seeds", type=int_list, default=None, help="only these seeds, e.g. 1,2 (default: every seed of the grid)")
    p.add_argument("--datasets", type=_names, default=None, help="only these datasets, e.g. cifar10,svhn (default: every dataset of the grid)")
    p.add_argument("--levels", type=int_list, default=None,
                   help="only these ticket rounds, e.g. 5,10,19; the dense baselines stay (default: every round of the grid)")
    p.add_argument("--backend", choices=["local", "slurm"], default="local")
    p.add_argument("--workers", type=int, default=None,
                   help="local: parallel runs (default: one per visible GPU; on a CPU-only machine 1)")
    p.add_argument("--retries", type=int, default=1, help="local: retries of a failed run (default 1)")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="write the pending runs' commands, one per line, instead of running them")
    p.add_argument("--rerun-stale", action="store_true",
                   help="move each stale run directory (config.json differs from what the grid gives it now) "
                        "aside to DIR.stale-TIMESTAMP and run it again; without it `run` refuses such a grid")
    p.add_argument("--stage1-only", action="store_true",
                   help="local: run only the grid's [stage1.NAME] entries (before a SLURM submission)")
    p.add_argument("--slurm-partition", default=None, help="SLURM partition (default: the cluster's)")
    p.add_argument("--slurm-time", default="24:00:00", help="time limit per task: minutes or HH:MM:SS")
    p.add_argument("--slurm-array-parallelism", type=int, default=256, help="tasks running at once")
    p.add_argument("--slurm-gpus-per-task", type=int, default=1,
                   help="GPUs each task asks for (default 1; 0 asks for none: a CPU partition, or a cluster "
                        "without GPU GRES)")
    p.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra #SBATCH option (repeatable), e.g. account=myproj or cpus-per-task=8")
    p.add_argument("--slurm-signal-delay", type=int, default=120,
                   help="seconds before the time limit at which tasks are asked to checkpoint and requeue")
    p.add_argument("--slurm-max-requeues", type=int, default=10,
                   help="times a task may be requeued after reaching its time limit (preemptions do not count)")
    p.add_argument("--slurm-job-name", default="double-win-sweep")
    p.add_argument("--slurm-folder", default=None, help="submitit's logs and task files (default: OUT/.submitit)")
    args = p.parse_args(argv)
    given = {a.dest: "/".join(a.option_strings) for a in p._actions
             if a.option_strings and a.dest not in ("help", *SUBSET, "bench", "assume_tflops") and getattr(args, a.dest) != a.default}
    if args.command != "plan" and args.bench:
        p.error(f"--bench applies only to `plan`; drop it from `{args.command}`.")
    if args.assume_tflops is not None and (args.command != "plan" or not args.assume_tflops > 0):
        p.error("--assume-tflops applies only to `plan` and must be a positive number of TFLOP/s.")
    args.assume_tflops = args.assume_tflops or ASSUMED_TFLOPS
    if args.command != "plan" and args.more_grids:
        p.error(f"more than one grid file applies only to `plan`; `{args.command}` takes one grid file.")
    for dest in SUBSET:
        if getattr(args, dest) == []:
            p.error(f"--{dest} needs at least one value, e.g. --{dest} {SUBSET[dest]}")
    if args.command != "run" and given:
        p.error(f"{', '.join(given.values())} apply only to `run`; drop them from `{args.command}`.")
    slurm_only = [flag for dest, flag in given.items() if dest.startswith("slurm_")]
    if slurm_only and (args.backend != "slurm" or args.print_only):
        p.error(f"{', '.join(slurm_only)} apply only to --backend slurm (without --print).")
    local_only = [flag for dest, flag in given.items() if dest in ("workers", "retries", "stage1_only")]
    if local_only and (args.backend != "local" or args.print_only):
        p.error(f"{', '.join(local_only)} apply only to --backend local (without --print).")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    if args.retries < 0:
        p.error("--retries must be 0 or more")
    if args.slurm_gpus_per_task < 0:
        p.error("--slurm-gpus-per-task must be 0 or more")
    if args.slurm_array_parallelism < 1:
        p.error("--slurm-array-parallelism must be at least 1")
    return args


def plan(runs, states):
    for r in runs:
        state, diffs = states[id(r)]
        print(f"{state:7}  {r.run_dir}  {r.command()}")
        if diffs:
            print(f"         differs from its config.json: {stale_text(diffs)}")
    count = {s: sum(state == s for state, _ in states.values()) for s in ("done", "pending", "stale")}
    stale = f", {count['stale']} stale (`run --rerun-stale` moves them aside and runs them again)"
    print(f"{len(runs)} runs: {count['done']} done, {count['pending']} pending" + (stale if count["stale"] else ""))


def checked_runs(grid):
    """The runs of a grid whose flags main_downstream.py accepts (every check `run` makes first)."""
    runs = expand(grid)
    check_flag_keys(grid)
    refuse_flags_acting_nowhere(grid, runs)
    check_flags(runs)
    return runs


def plan_study(args, grid, runs):
    """plan: the runs of one or more grid files (those they share listed once), then their cost."""
    grids = [grid] + [load_grid(path) for path in args.more_grids]
    planned = [(args.grid, runs)] + [(path, checked_runs(g)) for path, g in zip(args.more_grids, grids[1:])]
    planned = select(planned, seeds=args.seeds, datasets=args.datasets, levels=args.levels)
    pricer = Pricer([g.out for g in grids], args.bench or (), args.assume_tflops)  # a bad --bench: refused first
    unique = list({r.run_dir: r for _, rs in planned for r in rs}.values())
    states = {id(r): plan_state(r) for r in unique}
    lines = cost_lines(planned, pricer, done={r.run_dir for r in unique if states[id(r)][0] == "done"})
    for g in grids:  # the stage-1 jobs first: every run below waits on their tickets
        for line in stage1_plan_lines(g):
            print(line)
    plan(unique, states)
    for g in grids:
        for line in g.missing:
            print(f"missing: {line}")
    for line in left_out_lines(unique):  # on stderr: a note on flags, not part of the plan
        print(f"note: {line}", file=sys.stderr)
    print("\n".join(lines))
    return 0


def move_stale(runs, states, rerun):
    """Refuse stale runs in one line, or (``rerun``) move each stale directory aside, never deleting it."""
    stale = [r for r in runs if states[id(r)][0] == "stale"]
    if stale and not rerun:
        first = stale[0]
        raise UserError(f"{len(stale)} run(s) of the grid are stale: their config.json differs from what the grid "
                        f"gives them now (e.g. '{first.run_dir}': {stale_text(states[id(first)][1], 3)}); restore "
                        "the grid's values, or rerun with --rerun-stale to move them aside and run them again "
                        "(`status` lists them all).")
    for r in stale:
        aside = Path(f"{r.run_dir}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while os.path.lexists(aside):
            n += 1
            aside = Path(f"{r.run_dir}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        with sweep_lock(r.run_dir) as mine:
            if not mine or entry_lock_holder(r.run_dir):
                raise UserError(f"'{r.run_dir}' is stale but {lock_holder(r.run_dir) or 'another process'} holds "
                                "it; wait for that process to end, then rerun.")
            os.rename(r.run_dir, aside)
        print(f"sweep: stale run moved aside: {r.run_dir} -> {aside.name}", file=sys.stderr, flush=True)
        states[id(r)] = ("pending", [])


def left_out_lines(runs):
    """One line per [flags] entry that some runs do not get, because it has no effect on them."""
    left_out = {}
    for r in runs:
        for flag, where in r.acting_flags()[1].items():
            left_out.setdefault(flag, [where, 0])[1] += 1
    return [f"{flag}: left out of {n} of {len(runs)} runs, where it has no effect ({where})"
            for flag, (where, n) in sorted(left_out.items())]


def refuse_unfinished_stage1(grid):
    """The SLURM backend runs stage-2 runs only: their tickets must all be written first."""
    left = unfinished(grid)
    if left:
        e = left[0]
        raise UserError(f"[stage1.{e.name}] has {len(e.written())} of {len(e.levels)} tickets in '{e.save_dir}', and "
                        f"the SLURM backend does not run stage 1; run `python script/sweep.py run {grid.path} "
                        "--stage1-only` (local backend) first, then submit again.")


def report_pipeline(res, runs):
    """run_pipeline's outcome as the summary line, the hints and the exit status of `run` (``runs``
    empty: stage 1 alone was asked for)."""
    finished = res["skipped"] + len(res["done"])
    jobs = res["stage1"]
    stage2 = (f"; {finished} of {len(runs)} runs done, {len(res['failed'])} failed, {len(res['blocked'])} held back "
              f"by a failed stage-1 job, {len(res['interrupted'])} left to resume, {len(res['busy'])} held by another "
              "process") if runs else " (--stage1-only)"
    print(f"sweep: stage 1: {sum(s == 'done' for s in jobs.values())} of {len(jobs)} ticket directories done{stage2}")
    if res["interrupted"] or "interrupted" in jobs.values():
        print("sweep: stopped; rerun the same command to resume both stages", file=sys.stderr)
        return EXIT_PREEMPTED
    if res["failed"] or res["blocked"] or "failed" in jobs.values():
        print("sweep: some stage-1 jobs or runs failed; `status` lists them with their errors, rerunning retries "
              "them", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    args = parse_args(argv)
    grid = load_grid(args.grid, missing_ok=args.command == "plan")
    runs = expand(grid)
    check_flag_keys(grid)
    refuse_flags_acting_nowhere(grid, runs)
    check_flags(runs)
    if args.command == "plan":
        return plan_study(args, grid, runs)
    ((_, runs),) = select([(args.grid, runs)], seeds=args.seeds, datasets=args.datasets, levels=args.levels)
    if args.command == "status":
        print("\n".join(status_lines(grid, runs)))
        return 0
    states = {id(r): plan_state(r) for r in runs}
    if args.stage1_only and not grid.stage1:
        raise UserError(f"grid file '{grid.path}' has no [stage1.NAME] entries; drop --stage1-only.")
    refuse_linked_control_files([r.run_dir for r in runs if states[id(r)][0] != "done"] +
                                [e.save_dir for e in unfinished(grid)])
    move_stale(runs, states, args.rerun_stale)
    if args.print_only:
        for entry in unfinished(grid):
            print(entry.command())
        for r in runs:
            if states[id(r)][0] != "done":
                print(r.command())
        return 0
    if args.backend == "slurm":
        refuse_unfinished_stage1(grid)
        run_slurm(runs, args, grid)
        return 0
    if grid.stage1:
        res = run_pipeline(grid, runs, workers=args.workers, retries=args.retries, stage1_only=args.stage1_only)
        return report_pipeline(res, [] if args.stage1_only else runs)
    res = run_local(runs, workers=args.workers, retries=args.retries)
    finished = res["skipped"] + len(res["done"])
    print(f"sweep: {finished} of {len(runs)} runs done, {len(res['failed'])} failed, "
          f"{len(res['interrupted'])} left to resume, {len(res['busy'])} held by another process")
    if res["interrupted"]:
        print("sweep: stopped; rerun the same command to resume (finished runs are skipped, stopped runs "
              "continue from their checkpoints)", file=sys.stderr)
        return EXIT_PREEMPTED
    if res["failed"]:
        print(f"sweep: {len(res['failed'])} runs failed; `status` lists them with their errors, rerunning "
              "retries them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
