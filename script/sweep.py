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
import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.cli import ArgumentParser  # noqa: E402
from utils.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, UserError  # noqa: E402  (light: no torch at import)

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

ENTRY = REPO / "main_downstream.py"
LOG_NAME, FAILED_NAME, LOCK_NAME = ".sweep.log", ".sweep-failed.json", ".sweep.lock"

GRID_KEYS = {"out", "pretrain", "axes", "flags"}
PRETRAIN_KEYS = {"init", "tickets"}
AXES_KEYS = {"dataset", "regime", "data_rate", "seed", "rounds", "dense"}
DATASETS = ("cifar10", "cifar100", "svhn", "folder", "digits")
REGIMES = ("st", "fat", "at")
# Flags every run gets from the grid's own structure; a [flags] entry may not override them.
AXIS_FLAGS = {"dataset", "init", "pretrained", "pretrain", "ticket", "tickets_file", "mask", "regime", "data_rate",
              "data_number", "seed", "save_dir"}
PATH_FLAGS = {"data"}  # [flags] values that are paths, hence relative to the grid file


# --------------------------------------------------------------------------- the grid

@dataclass
class TicketDir:
    path: Path
    method: str
    retrain: object
    levels: dict  # round -> sparsity (percent)
    name: str = ""  # the run-directory component: the method, "-at" added for adversarially re-trained IMP


@dataclass
class Grid:
    path: Path
    out: Path
    pretrains: dict  # label -> {"init": str, "tickets": [TicketDir]}
    datasets: list
    regimes: list
    data_rates: list
    seeds: list
    rounds: object  # "all" or a list of ints
    dense: bool
    flags: dict


@dataclass
class Run:
    dataset: str
    data_rate: float
    regime: str
    pretrain: str
    method: str  # the ticket's method, or "dense"
    sparsity: float  # percent, 0.0 for dense
    seed: int
    round: object  # int, or None for dense
    init: str
    ticket: object  # Path or None
    run_dir: Path
    flags: dict = field(default_factory=dict)
    entry = "main_downstream"

    @property
    def group(self):
        return (self.dataset, self.data_rate, self.pretrain, self.method, self.regime)

    def argv(self):
        """main_downstream.py's arguments for this run."""
        args = ["--dataset", self.dataset, "--init", self.init, "--pretrain", self.pretrain,
                "--ticket", str(self.ticket) if self.ticket else "none", "--regime", self.regime,
                "--data-rate", repr(float(self.data_rate)), "--seed", str(self.seed), "--save-dir", str(self.run_dir)]
        return args + flag_args(self.flags)

    def command(self, python="python"):
        return shlex.join([python, str(ENTRY), *self.argv()])

    @property
    def done(self):
        return (self.run_dir / "results.json").exists()


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
        return (Path(self.run_dir) / self.done_file).exists()


def _fail(grid_path, message):
    raise UserError(f"grid file '{grid_path}': {message}")


def _fmt_value(value):
    return repr(value) if isinstance(value, float) else str(value)


def flag_args(flags):
    """[flags] -> argv: key -> --key (underscores -> dashes), true -> bare flag, false -> omitted,
    a list -> comma-joined."""
    out = []
    for key, value in flags.items():
        name = "--" + key.replace("_", "-")
        if value is True:
            out.append(name)
        elif value is False:
            continue
        elif isinstance(value, list):
            out += [name, ",".join(_fmt_value(v) for v in value)]
        else:
            out += [name, _fmt_value(value)]
    return out


def _list_of(grid_path, axes, key, kind, default=None):
    value = axes.get(key, default)
    if value is None:
        _fail(grid_path, f"[axes] needs '{key}', e.g. {key} = {_EXAMPLES[key]}.")
    if not isinstance(value, list):
        value = [value]
    if not value:
        _fail(grid_path, f"[axes] {key} is empty; list at least one value, e.g. {key} = {_EXAMPLES[key]}.")
    for v in value:
        if not kind(v):
            _fail(grid_path, f"[axes] {key} holds {v!r}, which is not valid; use values like {_EXAMPLES[key]}.")
    if len(set(value)) != len(value):
        _fail(grid_path, f"[axes] {key} repeats a value ({value}); list each once.")
    return value


_EXAMPLES = {"dataset": '["cifar10", "cifar100", "svhn"]', "regime": '["st", "at"]', "data_rate": "[1.0, 0.1, 0.01]",
             "seed": "[1, 2, 3]"}


def _read_ticket_dir(grid_path, label, path):
    """Method, re-training and levels of a stage-1 save directory."""
    if not path.is_dir():
        _fail(grid_path, f"[pretrain.{label}] ticket directory '{path}' does not exist; give the --save-dir of a "
                         "main_imp_pretrain.py run (relative paths are relative to the grid file).")
    spars = path / "sparsity.json"
    if not spars.is_file():
        _fail(grid_path, f"ticket directory '{path}' has no sparsity.json; it is not a finished main_imp_pretrain.py "
                         "--save-dir (rerun stage 1 until it writes its tickets).")
    try:
        levels = {int(k): float(v) for k, v in json.loads(spars.read_text()).items()}
    except (ValueError, AttributeError):
        _fail(grid_path, f"'{spars}' is not a {{round: sparsity}} JSON object; rerun stage 1 to rewrite it.")
    if not levels:
        _fail(grid_path, f"'{spars}' lists no rounds yet; let stage 1 finish at least one round.")
    import pruning_utils

    method = retrain = pattern = nm = None
    config = path / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
            method, retrain = cfg.get("method"), cfg.get("retrain")
            pattern, nm = cfg.get("pattern"), cfg.get("nm")
        except json.JSONDecodeError:
            pass
    if method is None:  # a directory without our config: the ticket file says what it is
        first = path / "tickets" / f"round_{min(levels):02d}.pt"
        ticket = pruning_utils.load_ticket(first)
        method, retrain = ticket.get("method"), ticket.get("retrain")
        pattern, nm = ticket.get("pattern"), ticket.get("nm")
    if method not in ("imp", "omp", "rp", "lmp"):
        _fail(grid_path, f"cannot tell the pruning method of '{path}' (config.json and its tickets name none).")
    # structured tickets are their own family ("omp_channel"): own run directories, own verdict rows
    method = pruning_utils.ticket_family(method, pattern, nm)
    name = f"{method}-at" if method == "imp" and retrain == "at" else method
    return TicketDir(path=path, method=method, retrain=retrain, levels=levels, name=name)


def load_grid(grid_path):
    """Read and check a grid file; every problem is one UserError naming it and the fix."""
    grid_path = Path(grid_path)
    if not grid_path.is_file():
        raise UserError(f"grid file '{grid_path}' does not exist; pass a TOML file such as script/grids/fig3.toml.")
    if tomllib is None:
        raise UserError("reading a grid file on Python < 3.11 needs the tomli package; `pip install tomli`.")
    try:
        spec = tomllib.loads(grid_path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"grid file '{grid_path}' is not valid TOML ({exc}); fix the line it names.") from None
    return build_grid(spec, grid_path.resolve().parent, grid_path)


def build_grid(spec, base, grid_path):
    """A checked Grid from the parsed file ``spec``; relative paths are taken from ``base``.
    (script/demo.py builds its grid in code through this.)"""
    base = Path(base)
    unknown = sorted(set(spec) - GRID_KEYS)
    if unknown:
        _fail(grid_path, f"unknown key(s) {', '.join(unknown)}; the file holds only out, [pretrain.LABEL], [axes] "
                         "and [flags] (DESIGN.md §5.7).")
    if not isinstance(spec.get("out"), str) or not spec["out"]:
        _fail(grid_path, "needs out = \"DIR\", the folder every run directory goes below.")
    pretrain = spec.get("pretrain")
    if not isinstance(pretrain, dict) or not pretrain:
        _fail(grid_path, "needs at least one [pretrain.LABEL] table with init = \"θ_p file\" and tickets = [...].")
    axes = spec.get("axes")
    if not isinstance(axes, dict):
        _fail(grid_path, "needs an [axes] table (dataset, regime, data_rate, seed, rounds, dense).")
    unknown = sorted(set(axes) - AXES_KEYS)
    if unknown:
        _fail(grid_path, f"unknown key(s) in [axes]: {', '.join(unknown)}; use {', '.join(sorted(AXES_KEYS))}.")
    datasets = _list_of(grid_path, axes, "dataset", lambda v: v in DATASETS)
    regimes = _list_of(grid_path, axes, "regime", lambda v: v in REGIMES)
    rates = _list_of(grid_path, axes, "data_rate",
                     lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1, default=[1.0])
    seeds = _list_of(grid_path, axes, "seed", lambda v: isinstance(v, int) and not isinstance(v, bool))
    rounds = axes.get("rounds", "all")
    if rounds != "all":
        if not isinstance(rounds, list) or not rounds or not all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rounds):
            _fail(grid_path, f"[axes] rounds must be \"all\" or a non-empty list of round numbers such as [1, 5, 10], "
                             f"not {rounds!r}.")
    dense = axes.get("dense", True)
    if not isinstance(dense, bool):
        _fail(grid_path, f"[axes] dense must be true or false, not {dense!r}.")

    pretrains = {}
    for label, table in pretrain.items():
        if not isinstance(table, dict):
            _fail(grid_path, f"pretrain.{label} must be a table with init and tickets.")
        unknown = sorted(set(table) - PRETRAIN_KEYS)
        if unknown:
            _fail(grid_path, f"unknown key(s) in [pretrain.{label}]: {', '.join(unknown)}; use init and tickets.")
        init = table.get("init")
        if not isinstance(init, str) or not init:
            _fail(grid_path, f"[pretrain.{label}] needs init = \"PATH\" (the θ_p file, or \"none\").")
        if init.lower() != "none":
            init_path = base / init
            if not init_path.exists():
                _fail(grid_path, f"[pretrain.{label}] init '{init_path}' does not exist; point it at your θ_p "
                                 "checkpoint (relative paths are relative to the grid file).")
            init = str(init_path)
        tickets = table.get("tickets", [])
        if isinstance(tickets, str):
            tickets = [tickets]
        if not isinstance(tickets, list) or not all(isinstance(t, str) for t in tickets):
            _fail(grid_path, f"[pretrain.{label}] tickets must be a list of stage-1 directories.")
        dirs = [_read_ticket_dir(grid_path, label, base / t) for t in tickets]
        names = [d.name for d in dirs]
        for name in set(names):
            if names.count(name) > 1:
                clash = [str(d.path) for d in dirs if d.name == name]
                _fail(grid_path, f"[pretrain.{label}] has two ticket directories of method '{name}' ({', '.join(clash)}); "
                                 "the analysis tells runs apart by pre-training label and method, so give one of "
                                 "them its own [pretrain.LABEL] table.")
        if rounds != "all":
            for d in dirs:
                missing = [r for r in rounds if r not in d.levels]
                if missing:
                    _fail(grid_path, f"round(s) {missing} are not in '{d.path / 'sparsity.json'}' (it has "
                                     f"{sorted(d.levels)}); list rounds it has or let stage 1 finish them.")
        for d in dirs:
            for r in (d.levels if rounds == "all" else rounds):
                if not (d.path / "tickets" / f"round_{r:02d}.pt").is_file():
                    _fail(grid_path, f"'{d.path / 'tickets' / f'round_{r:02d}.pt'}' is missing although "
                                     "sparsity.json lists it; rerun stage 1 in that directory.")
        pretrains[label] = {"init": init, "tickets": dirs}
    if not dense and not any(p["tickets"] for p in pretrains.values()):
        _fail(grid_path, "implies no runs: no pre-training lists tickets and dense = false.")

    flags = spec.get("flags", {})
    if not isinstance(flags, dict):
        _fail(grid_path, "[flags] must be a table of main_downstream.py flags.")
    clean = {}
    for key, value in flags.items():
        norm = key.replace("-", "_")
        if norm in AXIS_FLAGS:
            _fail(grid_path, f"[flags] sets '{key}', which the grid sets per run from [axes] and [pretrain.*]; "
                             "remove it from [flags].")
        scalar = (str, int, float, bool)
        if isinstance(value, list):
            if not all(isinstance(v, scalar) and not isinstance(v, bool) for v in value):
                _fail(grid_path, f"[flags] {key} must be a list of numbers or strings.")
        elif not isinstance(value, scalar):
            _fail(grid_path, f"[flags] {key} must be a string, number, boolean or list, not a table.")
        if norm in PATH_FLAGS and isinstance(value, str):
            value = str(base / value)
        clean[key] = value
    return Grid(path=Path(grid_path).resolve(), out=(base / spec["out"]).resolve(), pretrains=pretrains,
                datasets=datasets, regimes=regimes, data_rates=[float(r) for r in rates], seeds=seeds,
                rounds=rounds, dense=dense, flags=clean)


def level_dir(sparsity):
    return f"s{sparsity:05.2f}"


def expand(grid, flags_for=None):
    """Every run the grid implies, in a fixed order. ``flags_for(run) -> dict`` may add or
    override flags per run (the digits demo uses it for its shortened schedules)."""
    runs = []
    for dataset in grid.datasets:
        for rate in grid.data_rates:
            for regime in grid.regimes:
                for label, pre in grid.pretrains.items():
                    base = grid.out / dataset / f"rate{rate:g}" / regime / label
                    cells = []
                    if grid.dense:
                        cells.append(("dense", 0.0, None, None, base / "dense"))
                    for td in pre["tickets"]:
                        for r in sorted(td.levels if grid.rounds == "all" else grid.rounds):
                            s = round(td.levels[r], 2)
                            cells.append((td.method, s, r, td.path / "tickets" / f"round_{r:02d}.pt",
                                          base / td.name / level_dir(s)))
                    for method, s, r, ticket, where in cells:
                        for seed in grid.seeds:
                            run = Run(dataset=dataset, data_rate=rate, regime=regime, pretrain=label, method=method,
                                      sparsity=s, seed=seed, round=r, init=pre["init"], ticket=ticket,
                                      run_dir=where / f"seed{seed}", flags=dict(grid.flags))
                            if flags_for is not None:
                                run.flags.update(flags_for(run))
                            runs.append(run)
    return runs


def _expected_record(r):
    return {"dataset": r.dataset, "data_rate": r.data_rate, "pretrain": r.pretrain, "method": r.method,
            "sparsity": r.sparsity, "regime": r.regime, "seed": r.seed, "run_dir": str(r.run_dir)}


def expected_runs(grid_path):
    """The runs a grid file implies, as plain dicts (for analysis/plot_curves.py --grid)."""
    return [_expected_record(r) for r in expand(load_grid(grid_path))]


def check_flags(runs):
    """Let main_downstream.py's own parser judge the flags once, before hundreds of runs fail on them."""
    if not runs:
        return
    import main_downstream
    err = __import__("io").StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main_downstream.parse_args(runs[0].argv())
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        reason = lines[-1].split(" error: ", 1)[-1] if lines else "usage error"
        raise UserError(f"main_downstream.py rejects the grid's flags ({reason}); "
                        "fix [flags] in the grid file.") from None


# --------------------------------------------------------------------------- run-directory state

def lock_holder(run_dir):
    """'pid@host' of a live process working on ``run_dir``, else None: the entry points' own
    per-directory lock, or the lock the sweep's workers and SLURM tasks hold while a run is theirs."""
    return _entry_lock_holder(run_dir) or _sweep_lock_holder(run_dir)


def _entry_lock_holder(run_dir):
    """The holder of the lock main_downstream.py takes on its --save-dir (utils.rundir), where this
    checkout has that lock."""
    try:
        from utils import rundir
    except ImportError:
        return None
    holder = getattr(rundir, "lock_holder", None)
    return holder(run_dir) if holder is not None else None


def _sweep_lock_holder(run_dir):
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return None
    import fcntl
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
    import fcntl
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
    log = Path(run_dir) / LOG_NAME
    if not log.exists():
        return ""
    with open(log, "rb") as fh:
        fh.seek(max(0, log.stat().st_size - 8192))
        tail = fh.read().decode("utf-8", "replace")
    lines = [ln.strip() for ln in tail.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def record_failure(run_dir, rc, attempts):
    record = {"exit_status": rc, "attempts": attempts, "error": last_error_line(run_dir),
              "host": socket.gethostname(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = Path(run_dir) / f"{FAILED_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, Path(run_dir) / FAILED_NAME)


def clear_failure(run_dir):
    with contextlib.suppress(FileNotFoundError):
        (Path(run_dir) / FAILED_NAME).unlink()


def _log_header(fh, run, note):
    fh.write(f"\n# sweep: {note} on {socket.gethostname()} pid {os.getpid()} at "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n# {run.command()}\n")
    fh.flush()


# --------------------------------------------------------------------------- local backend

def call_in_process(run, attempt):
    """Run the entry point's main(argv) (main_downstream.py for grid runs) in this process, with
    its output in the run's log; returns the exit status, or "busy" when another process holds the run.

    run_main gives the statuses a separate process would: 0, 2 for bad input, 75 after a
    requested stop (checkpoint saved), 1 for anything else."""
    import importlib

    from utils.cli import run_main
    entry = importlib.import_module(run.entry)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    with sweep_lock(run.run_dir) as mine:
        if not mine or _entry_lock_holder(run.run_dir):  # another sweep, or a run started by hand
            return "busy"
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", signal.SIGTERM))}
        with open(run.run_dir / LOG_NAME, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            _log_header(fh, run, f"attempt {attempt}")
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
        if rc == 0 and not run.done:
            rc = 1
        return rc


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
        rc = call_in_process(run, attempt)
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


def run_local(runs, workers=None, retries=1, title="sweep", out=sys.stdout):
    """Run ``runs`` (skipping finished ones) on long-lived worker processes.

    Returns {"done", "failed", "interrupted", "busy"} lists of runs. One worker per visible GPU
    (CUDA_VISIBLE_DEVICES pinned per worker) unless ``workers`` is given, then that many
    processes (on the CPU when no GPU is visible, GPUs shared round-robin otherwise)."""
    import multiprocessing
    from multiprocessing.connection import wait

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
    threads = max(1, cpus // n)
    ctx = multiprocessing.get_context("spawn")

    def start_worker(i):
        env = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)] if gpus else ""}
        parent, child = ctx.Pipe()
        # not daemonic: a run may start DataLoader worker processes of its own
        proc = ctx.Process(target=_worker_main, args=(child, env, threads))
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "task": None, "slot": i}

    queue = [(r, 1) for r in todo]
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    pool = [start_worker(i) for i in range(n)]
    where = f"{n} worker{'s' * (n > 1)}" + (f" on GPU {', '.join(gpus)}" if gpus else " on the CPU")
    print(f"{title}: {len(todo)} runs on {where}", file=out, flush=True)
    progress = _Progress(len(todo), title, out)
    forwarded = killed = False
    try:
        while pool:
            if stop.count and not forwarded:
                forwarded = True
                print(f"{title}: stopping: running runs save a checkpoint and stop (press Ctrl-C again to kill "
                      "them; they then resume from their last epoch)", file=out, flush=True)
                for w in pool:
                    if w["task"] is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(w["proc"].pid, signal.SIGTERM)
            if stop.count > 1 and not killed:
                killed = True
                for w in pool:
                    w["proc"].kill()
            for w in list(pool):
                if w["task"] is None:
                    if queue and not stop.count:
                        w["task"] = queue.pop(0)
                        w["conn"].send(w["task"])
                    else:
                        with contextlib.suppress(OSError):
                            w["conn"].send(None)
                        w["proc"].join(timeout=30)
                        pool.remove(w)
            if not pool:
                break
            ready = wait([w["conn"] for w in pool] + [w["proc"].sentinel for w in pool], timeout=1.0)
            for w in list(pool):
                if w["conn"] in ready:
                    try:
                        rc, _ = w["conn"].recv()
                    except (EOFError, OSError):
                        pass  # the pipe closed: the worker is gone, handled below
                    else:
                        _settle(w["task"], rc, retries, queue, result, progress, stop.count > 0)
                        w["task"] = None
                        continue
                if w["proc"].is_alive() and w["proc"].sentinel not in ready and w["conn"] not in ready:
                    continue
                w["proc"].join(timeout=5)
                pool.remove(w)
                if w["task"] is not None:
                    code = w["proc"].exitcode
                    run = w["task"][0]
                    with open(run.run_dir / LOG_NAME, "a") as fh:
                        fh.write(f"# sweep: the worker process died (exit code {code}) during this run\n")
                    _settle(w["task"], EXIT_PREEMPTED if stop.count else f"worker died ({code})", retries,
                            queue, result, progress, stop.count > 0)
                if queue and not stop.count:
                    pool.append(start_worker(w["slot"]))
    finally:
        for w in pool:
            w["proc"].kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        progress.close()
    if stop.count:
        result["interrupted"] += [r for r, _ in queue]
    return result


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
        self.finished = self.failed = 0
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
                  f"({(now - self.start) / 60:.1f} min)", file=self.out, flush=True)

    def close(self):
        pass


# --------------------------------------------------------------------------- SLURM backend (submitit)

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
        if (run_dir / "results.json").exists():
            return 0
        run_dir.mkdir(parents=True, exist_ok=True)
        with sweep_lock(run_dir) as mine:
            if not mine or _entry_lock_holder(run_dir):
                raise RuntimeError(f"{lock_holder(run_dir)} is already working on {run_dir}")
            with open(run_dir / LOG_NAME, "a") as fh:
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


# --------------------------------------------------------------------------- status

def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def gpu_seconds(run_dir):
    import csv
    path = Path(run_dir) / "log.csv"
    if not path.exists():
        return 0.0
    total = 0.0
    with contextlib.suppress(OSError, csv.Error), open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            with contextlib.suppress(TypeError, ValueError):
                total += float(row.get("seconds") or 0)
    return total


def run_state(run):
    if run.done:
        return "done"
    if lock_holder(run.run_dir):
        return "running"
    if (run.run_dir / FAILED_NAME).exists():
        return "failed"
    return "pending"


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _show(path):
    """A path as short as it can be said: relative to the working directory when below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows]
    return lines


def status_lines(grid, runs):
    """The status report as lines; the last one is `done D of N runs (...)`."""
    groups = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    states = {id(r): run_state(r) for r in runs}
    rows, failed, total_bytes, total_gpu = [], [], 0, 0.0
    order = {"dense": ""}
    for key in sorted(groups, key=lambda k: (k[0], -k[1], k[2], order.get(k[3], k[3]), REGIMES.index(k[4]))):
        members = groups[key]
        dataset, rate, pretrain, method, regime = key
        counts = {s: sum(states[id(r)] == s for r in members) for s in ("done", "running", "failed", "pending")}
        seconds = sum(gpu_seconds(r.run_dir) for r in members)
        sizes = [dir_bytes(r.run_dir) for r in members if r.run_dir.exists()]
        total_bytes += sum(sizes)
        total_gpu += seconds
        rows.append([dataset, f"{rate:g}", pretrain, method, regime, len(members), counts["done"], counts["running"],
                     counts["failed"], counts["pending"], f"{seconds / 3600:.3f}",
                     human_bytes(sum(sizes) / len(sizes)) if sizes else "-"])
        failed += [r for r in members if states[id(r)] == "failed"]
    header = ["dataset", "rate", "pretrain", "method", "regime", "runs", "done", "running", "failed", "pending",
              "GPU-h", "disk/run"]
    lines = [f"grid {_show(grid.path)} -> {_show(grid.out)}", *_table(header, rows)]
    if failed:
        lines += ["", f"failed runs ({len(failed)}; `run` retries them):"]
        for r in failed:
            info = {}
            with contextlib.suppress(OSError, json.JSONDecodeError):
                info = json.loads((r.run_dir / FAILED_NAME).read_text())
            lines.append(f"  {_show(r.run_dir)}: {last_error_line(r.run_dir) or info.get('error', '')}")
    lines += ["", *verdict_lines(grid, runs, states)]
    n = len(runs)
    count = {s: sum(v == s for v in states.values()) for s in ("done", "running", "failed", "pending")}
    lines += ["", f"GPU-hours {total_gpu / 3600:.3f}, disk {human_bytes(total_bytes)}",
              f"done {count['done']} of {n} runs ({count['failed']} failed, {count['pending']} pending, "
              f"{count['running']} running)"]
    return lines


def _rate_text(value):
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def verdict_lines(grid, runs, states):
    """The double-win verdict of every (dataset, rate, pretrain, method) whose runs, and whose dense
    baselines, are all done, from the analysis' own verdict code."""
    finished = {}
    for r in runs:
        key = (r.dataset, r.data_rate, r.pretrain, r.method)
        finished.setdefault(key, []).append(r)
    ready = []
    for (dataset, rate, pretrain, method), members in finished.items():
        if method == "dense":
            continue
        dense = finished.get((dataset, rate, pretrain, "dense"), [])
        if all(states[id(r)] == "done" for r in members + dense):
            ready.append(members + dense)
    if not ready:
        return ["verdicts: no group is finished yet"]
    try:
        from analysis.plot_curves import verdict_rows
    except ImportError:
        return ["verdicts: analysis.plot_curves.verdict_rows is not in this checkout yet; run "
                "analysis/plot_curves.py on the finished runs for the double-win table"]
    dirs = sorted({str(r.run_dir) for members in ready for r in members})
    # the grid says which levels and seeds exist: rounds left out of the grid are not "missing"
    expected = [_expected_record(r) for members in ready for r in members]
    try:
        rows = verdict_rows(dirs, expected=expected)
    except UserError as exc:
        return [f"verdicts: not available ({exc})"]
    except Exception as exc:  # noqa: BLE001  (the progress table must not die with the verdict code)
        return [f"verdicts: analysis.plot_curves.verdict_rows failed ({type(exc).__name__}: {exc}); "
                "run analysis/plot_curves.py for the table"]
    if not rows:
        return ["verdicts: none (the finished groups hold no ticket runs with baselines)"]
    header = ["dataset", "rate", "pretrain", "method", "verdict", "extreme", "contiguous", "supported (>=0.9)",
              "double-win levels"]
    body = [[r.get("dataset"), _rate_text(r.get("data_rate")), r.get("pretrain"), r.get("method"), r.get("verdict", ""),
             r.get("extreme_sparsity", "") or "-", r.get("extreme_sparsity_contiguous", "") or "-",
             r.get("extreme_sparsity_supported", "") or "-", r.get("double_win_levels", "") or "-"] for r in rows]
    return ["verdicts of finished groups (support: the fraction of seed resamples under which the rule holds; "
            "see README 'How sure is a verdict'):", *_table(header, body)]


# --------------------------------------------------------------------------- command line

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
