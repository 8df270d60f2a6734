"""The state of a run directory as the study sees it: the sweep's lock, failure records, the run log.

A run's output goes to ``.sweep.log`` inside its directory (a dot-file, which main_downstream.py
ignores when it checks that a new run directory is empty); a run that failed leaves
``.sweep-failed.json`` there for ``status``. These control files are opened through
utils.rundir.open_control_file, never through a symbolic link. A run directory whose config.json
differs from the config the grid gives that run now is ``stale``.
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from study.grid import run_finished
from utils.errors import UserError
from utils.records import read_config, read_json, read_results
from utils.rundir import lock_holder as rundir_lock_holder
from utils.rundir import open_control_file

LOG_NAME, FAILED_NAME, LOCK_NAME = ".sweep.log", ".sweep-failed.json", ".sweep.lock"
CONTROL_NAMES = (LOCK_NAME, LOG_NAME, FAILED_NAME)


def open_control(path, flags):
    """A control file's descriptor, never through a symbolic link (utils.rundir.open_control_file)."""
    return open_control_file(path, flags, 0o666)


def open_log(run_dir):
    """The run's log, opened for appending (text)."""
    return os.fdopen(open_control(Path(run_dir) / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")


def refuse_linked_control_files(run_dirs):
    """One line for the first control file that is a symbolic link, before any run starts."""
    for run_dir in run_dirs:
        for name in CONTROL_NAMES:
            path = Path(run_dir) / name
            if path.is_symlink():
                raise UserError(f"'{path}' is a symbolic link, and control files are never followed; remove the "
                                "link (its target is untouched) and rerun.")


def lock_holder(run_dir):
    """'pid@host' of a live process working on ``run_dir``, else None: the entry points' own
    per-directory lock, or the lock the sweep's workers and SLURM tasks hold while a run is theirs."""
    return entry_lock_holder(run_dir) or _sweep_lock_holder(run_dir)


def entry_lock_holder(run_dir):
    """The holder of the lock main_downstream.py takes on its --save-dir."""
    return rundir_lock_holder(run_dir)


def _sweep_lock_holder(run_dir):
    path = Path(run_dir) / LOCK_NAME
    if not os.path.lexists(path):
        return None
    try:
        fd = open_control(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return fh.read(256).decode("utf-8", "replace").strip() or "unknown"
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def sweep_lock(run_dir):
    """Hold ``run_dir``'s sweep lock; yields False (holding nothing) when another process has it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = os.fdopen(open_control(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT), "r+")
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
    if not os.path.lexists(log):
        return ""
    with os.fdopen(open_control(log, os.O_RDONLY), "rb") as fh:
        fh.seek(max(0, os.fstat(fh.fileno()).st_size - 8192))
        tail = fh.read().decode("utf-8", "replace")
    lines = [ln.strip() for ln in tail.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def record_failure(run_dir, rc, attempts):
    """Leave the failure record ``status`` reads (written whole, so a reader never sees half of it)."""
    record = {"exit_status": rc, "attempts": attempts, "error": last_error_line(run_dir),
              "host": socket.gethostname(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = Path(run_dir) / f"{FAILED_NAME}.{os.getpid()}.tmp"
    with os.fdopen(open_control(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as fh:
        fh.write(json.dumps(record, indent=1))
    os.replace(tmp, Path(run_dir) / FAILED_NAME)  # replaces a link in its place, never writes through it


def read_failure(run_dir):
    """The failure record ``record_failure`` left, checked ({} when there is none)."""
    path = Path(run_dir) / FAILED_NAME
    if not os.path.lexists(path):
        return {}
    if path.is_symlink():
        raise UserError(f"'{path}' is a symbolic link, and control files are never followed; remove the link.")
    record = read_json(path, "failure record")
    status, error = record.get("exit_status"), record.get("error")
    if isinstance(status, bool) or not isinstance(status, (int, str)) or not isinstance(error, str):
        raise UserError(f"failure record '{path}' lacks a readable exit status or error; remove it (the run is "
                        "retried by `run` either way).")
    return record


def clear_failure(run_dir):
    with contextlib.suppress(FileNotFoundError):
        (Path(run_dir) / FAILED_NAME).unlink()


def log_header(fh, run, note):
    """The line that opens each attempt of a run in its log: where, when, and the exact command."""
    fh.write(f"\n# sweep: {note} on {socket.gethostname()} pid {os.getpid()} at "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n# {run.command()}\n")
    fh.flush()



def _as_path(run_dir):
    """``run_dir`` as a Path, without re-parsing one that is already (status asks this of 31,000 runs)."""
    return run_dir if isinstance(run_dir, Path) else Path(run_dir)


def recorded_config(run_dir):
    """The run directory's config.json (checked), or None when there is none yet."""
    path = _as_path(run_dir) / "config.json"
    return read_config(path) if os.path.lexists(path) else None


def stale_keys(run, old, finished):
    """(key, recorded, now) for every setting in which ``old``, the run directory's config.json,
    differs from the config the grid gives the run now ([] when they agree or ``old`` is None);
    ``finished``: whether the run is (a finished run is compared on the settings that act on it).
    Compared by main_downstream.py's own config_for and config_changes, as a rerun of it would; a
    UserError here is the grid's flags, not the run directory."""
    if old is None:
        return []
    from training import downstream_args

    return downstream_args.config_changes(old, config_now(run), finished=finished)


_CONFIGS = {}  # main_downstream.config_for of the first run of each kind (config_now)


def config_now(run):
    """main_downstream.config_for(run.argv()), its parser run once per kind of run: runs that differ
    only in the seed, the run directory and the ticket file (not in having one) differ in exactly
    those three config values (tests/test_bench_grid_scale.py compares every run of a grid with
    config_for). Parsing per run cost 10 ms a run, most of `status` at 31,000 runs. A seed
    config_for would refuse goes to config_for itself, which says why."""
    from training import downstream_args

    argv = run.argv()
    at = {argv[i]: i + 1 for i in range(0, 16, 2)}  # Run.argv's head: flag, value pairs
    if not (isinstance(run.seed, int) and 0 <= run.seed < 2 ** 32) or not {"--seed", "--save-dir", "--ticket"} <= set(at):
        return downstream_args.config_for(argv)
    ticket = argv[at["--ticket"]]
    ticket = None if ticket.lower() == "none" else ticket  # as resolve_defaults reads it
    varying = {at["--seed"], at["--save-dir"]} | ({at["--ticket"]} if ticket else set())
    key = tuple(v for i, v in enumerate(argv) if i not in varying)
    if key not in _CONFIGS:
        _CONFIGS[key] = downstream_args.config_for(argv)
    return dict(_CONFIGS[key], seed=run.seed, save_dir=argv[at["--save-dir"]], ticket=ticket)


def stale_text(diffs, limit=6):
    return "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in diffs[:limit]) + (" ..." if len(diffs) > limit else "")


def finished_results(run_dir):
    """The run's results.json as utils.records reads it (checked), without its per-epoch history
    and with its keys (and its config's) interned, or None when there is none (study.grid.run_finished's
    rule); a damaged one is a UserError. `status` holds one per done run: 4.5 KB instead of 8 plus
    the history, which nothing after this reads."""
    path = _as_path(run_dir) / "results.json"
    if not os.path.lexists(path):
        return None
    results = read_results(path)
    results.pop("history", None)
    if isinstance(results.get("config"), dict):
        results["config"] = {sys.intern(k): v for k, v in results["config"].items()}
    return {sys.intern(k): v for k, v in results.items()}


def run_state(run):
    """(state, detail): done, stale (its config.json differs from what the grid gives it now;
    detail: the differences), running (a live process holds it), failed (a failure record, or a
    damaged file; detail: why) or pending. A damaged file of the run is its state, never an error."""
    return run_state_results(run)[:2]


def run_state_results(run):
    """(state, detail, results): run_state's answer, and the results.json it read (see
    finished_results; None when there is none or the run is not done), so no caller reads it twice."""
    try:
        old, results = recorded_config(run.run_dir), finished_results(run.run_dir)
    except UserError as exc:
        return "failed", f"invalid: {exc}", None
    finished = results is not None
    diffs = stale_keys(run, old, finished)
    try:
        if diffs:
            return ("running", "", None) if lock_holder(run.run_dir) else ("stale", diffs, None)
        if finished:
            return "done", "", results
        if lock_holder(run.run_dir):
            return "running", "", None
        record = read_failure(run.run_dir)
    except UserError as exc:
        return "failed", f"invalid: {exc}", None
    if record:
        try:
            return "failed", last_error_line(run.run_dir) or record.get("error", ""), None
        except UserError as exc:
            return "failed", f"invalid: {exc}", None
    return "pending", "", None


def plan_state(run):
    """(state, differences) as plan and run see a run: done, stale or pending. A damaged
    results.json or config.json is a UserError naming it: nothing is run over it."""
    old, finished = recorded_config(run.run_dir), run_finished(run.run_dir)
    diffs = stale_keys(run, old, finished)
    if diffs:
        return "stale", diffs
    return ("done" if finished else "pending"), []
