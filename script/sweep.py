"""Run a grid of stage-2 runs (main_downstream.py) on local GPUs/CPUs or on SLURM, and track it.

    python script/sweep.py plan   GRID.toml      # every run: its directory and exact command, and totals
    python script/sweep.py run    GRID.toml [--backend local|slurm] [--workers N] [--retries 1] [--print]
    python script/sweep.py status GRID.toml      # per group: done / running / failed / pending, GPU-hours, disk

The grid file (DESIGN.md §5.7) names the θ_p file and the stage-1 ticket directories of each
pre-training, the axes and extra flags. The paper's per-dataset protocol (lr, epochs, milestones,
batch size, weight decay, SVHN's cosine schedule, --eval-from) is NOT repeated here: flags the
grid leaves unset are filled by main_downstream.py's own defaults, the one place they live.

Every run gets one deterministic directory below ``out``; ``run`` skips runs whose results.json
exists, so rerunning the same command after any interruption finishes the grid without rework.
A run's output goes to ``.sweep.log`` inside its directory (a dot-file, which main_downstream.py
ignores when it checks that a new run directory is empty); a run that failed leaves
``.sweep-failed.json`` there for ``status``.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# light: nothing here imports torch, so plan's and the grid's errors come at once
from study.grid import (  # noqa: E402
    Grid,
    Run,
    build_grid,
    check_flags,
    expand,
    expected_runs,
    flag_args,
    load_grid,
)
from study.local import Task, run_local  # noqa: E402
from study.rundirs import LOG_NAME, last_error_line, lock_holder, sweep_lock  # noqa: E402
from study.slurm import SlurmRun, parse_minutes, run_slurm  # noqa: E402
from study.status import status_lines  # noqa: E402
from utils.cli import ArgumentParser  # noqa: E402
from utils.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError  # noqa: E402

# what users and tests call as sweep.NAME from before the study/ package
__all__ = ["Grid", "Run", "Task", "SlurmRun", "UserError", "build_grid", "expand", "expected_runs", "flag_args",
           "load_grid", "lock_holder", "sweep_lock", "last_error_line", "LOG_NAME", "parse_minutes", "run_local",
           "run_slurm", "status_lines", "main"]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["plan", "run", "status"])
    p.add_argument("grid", help="grid file (TOML, DESIGN.md §5.7)")
    p.add_argument("--backend", choices=["local", "slurm"], default="local")
    p.add_argument("--workers", type=int, default=None,
                   help="local: parallel runs (default: one per visible GPU; on a CPU-only machine 1)")
    p.add_argument("--retries", type=int, default=1, help="local: retries of a failed run (default 1)")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="write the pending runs' commands, one per line, instead of running them")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--slurm-time", default="24:00:00", help="time limit per task: minutes or HH:MM:SS")
    p.add_argument("--slurm-array-parallelism", type=int, default=256, help="tasks running at once")
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
             if a.option_strings and a.dest != "help" and getattr(args, a.dest) != a.default}
    if args.command != "run" and given:
        p.error(f"{', '.join(given.values())} apply only to `run`; drop them from `{args.command}`.")
    slurm_only = [flag for dest, flag in given.items() if dest.startswith("slurm_")]
    if slurm_only and (args.backend != "slurm" or args.print_only):
        p.error(f"{', '.join(slurm_only)} apply only to --backend slurm (without --print).")
    local_only = [flag for dest, flag in given.items() if dest in ("workers", "retries")]
    if local_only and (args.backend != "local" or args.print_only):
        p.error(f"{', '.join(local_only)} apply only to --backend local (without --print).")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    if args.retries < 0:
        p.error("--retries must be 0 or more")
    if args.slurm_array_parallelism < 1:
        p.error("--slurm-array-parallelism must be at least 1")
    return args


def left_out_lines(runs):
    """One line per [flags] entry that some runs do not get, because it has no effect on them."""
    left_out = {}
    for r in runs:
        for flag, where in r.acting_flags()[1].items():
            left_out.setdefault(flag, [where, 0])[1] += 1
    return [f"{flag}: left out of {n} of {len(runs)} runs, where it has no effect ({where})"
            for flag, (where, n) in sorted(left_out.items())]


def main(argv=None):
    args = parse_args(argv)
    grid = load_grid(args.grid)
    runs = expand(grid)
    if args.command == "status":
        print("\n".join(status_lines(grid, runs)))
        return 0
    check_flags(runs)
    if args.command == "plan":
        done = 0
        for r in runs:
            done += r.done
            print(f"{'done' if r.done else 'pending':7}  {r.run_dir}  {r.command()}")
        print(f"{len(runs)} runs: {done} done, {len(runs) - done} pending")
        for line in left_out_lines(runs):  # on stderr: stdout stays one line per run and the total
            print(f"note: {line}", file=sys.stderr)
        return 0
    if args.print_only:
        for r in runs:
            if not r.done:
                print(r.command())
        return 0
    if args.backend == "slurm":
        run_slurm(runs, args, grid)
        return 0
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
