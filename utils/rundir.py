"""Run directories: the resolved config saved beside the results, and refusal to mix runs.

A directory belongs to one configuration. Rerunning the same command resumes; rerunning a
different configuration into the same directory is refused with the differences listed, so a
week-long sweep can never silently overwrite or blend results.
"""

import csv
import errno
import fcntl
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from utils.checkpoint import atomic_write_json, atomic_write_text
from utils.errors import UserError
from utils.records import read_config

# Settings that change how fast a run goes, what it prints, keeps or also writes (--tensorboard), whether it starts afresh
# (--restart), when it gives up (--max-loss) or whether a result at chance level is kept
# (--allow-chance), never what a finished run computes.
NON_SEMANTIC_KEYS = frozenset({"workers", "progress", "save_dir", "device", "channels_last", "cudnn_benchmark",
                               "keep_checkpoint", "checkpoint_minutes", "restart", "max_loss", "allow_chance",
                               "tensorboard", "keep_model"})


# Flags added after run directories already existed, with the default that reproduces what those
# runs did: a config written before the flag existed resumes under that default. (Not --subset:
# older data-limited runs drew their subset per training seed, so resuming one under the shared
# subset would change its data mid-run; such a directory is refused with the difference listed.)
INTRODUCED_DEFAULTS = {"pattern": "unstructured", "folder_loader": "pil"}


def config_differences(old, new, ignore=NON_SEMANTIC_KEYS):
    """(key, old, new) for every setting that differs. A key one side lacks while the other holds
    None (or the default that reproduces the older behaviour, INTRODUCED_DEFAULTS) is no difference:
    a flag added or removed between versions must not strand a sweep's run directories."""
    keys = sorted((set(old) | set(new)) - set(ignore))
    diffs = []
    for k in keys:
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        neutral = (None, INTRODUCED_DEFAULTS.get(k))
        if a != b and not ((a in neutral and b == "<absent>") or (a == "<absent>" and b in neutral)):
            if not _same_behaviour(k, a, b, old, new):
                diffs.append((k, a, b))
    return diffs


def _same_behaviour(key, a, b, old, new):
    """Flags added later whose new default computes what a run made before them did: the subset
    rule when no subset is drawn (data rate 1), the fp32 test precision when training ran in fp32."""
    present = b if a == "<absent>" else a if b == "<absent>" else None
    if present is None:
        return False
    if key in ("subset", "subset_seed") and old.get("data_rate", 1.0) == new.get("data_rate", 1.0) == 1.0:
        return True
    return key == "eval_amp" and present == "off" and old.get("amp") == new.get("amp") == "off"


# ----------------------------------------------------------------------------- one writer per directory

LOCK_NAME = ".lock"  # a dot-file, so a directory holding only it still counts as empty
# A holder is refused only if the lock stays taken this long: lock_holder's probe takes a shared
# lock for microseconds, and a run starting in that instant must not mistake it for a holder.
_ACQUIRE_GRACE_S = 0.25


def open_control_file(path, flags, mode=0o666):
    """``os.open`` for the files the tools control a run directory with (locks, logs, failure records),
    never through a symbolic link: a link in their place would let a truncate or an append land in
    whatever file it points at. Such a link is one line naming it; its target is left untouched."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.EMLINK and os.path.islink(path)):
            raise UserError(f"'{path}' is a symbolic link, and control files are never followed; remove the link "
                            "(its target is untouched) and rerun.") from None
        raise


def _identity():
    return f"{os.getpid()}@{socket.gethostname()}"


def _read_holder(fd):
    """The "pid@host" a holder wrote; it writes right after locking, so an empty file is retried."""
    for _ in range(20):
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown process@unknown host"


class RunDirLock:
    """An exclusive ``flock`` on ``<save_dir>/.lock`` for the whole run.

    The OS drops the lock when the process ends however it ends (a SIGKILL included), so there is
    never a stale lock to clean up; the file's content ("pid@host") only names the holder. The file
    itself is never deleted: unlinking a lock file lets a newcomer lock a fresh inode while an
    old holder still holds the unlinked one. ``acquire`` raises :class:`UserError` naming the holder.
    """

    def __init__(self, save_dir):
        self.dir = Path(save_dir)
        self.path = self.dir / LOCK_NAME
        self._fd = None

    @property
    def held(self):
        return self._fd is not None

    def acquire(self):
        if self._fd is not None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = open_control_file(self.path, os.O_RDWR | os.O_CREAT)
        deadline = time.monotonic() + _ACQUIRE_GRACE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                holder = _read_holder(fd)
                os.close(fd)
                pid, _, host = holder.partition("@")
                raise UserError(f"--save-dir '{self.dir}' is in use by another run (PID {pid} on host {host}, "
                                f"lock '{self.path}'); wait for that run to end or stop it, or choose another "
                                "--save-dir.") from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    # e.g. Lustre mounted without -o flock: refusing would make the tool unusable
                    # there, so the run goes on, but says it has no protection against a second writer
                    print(f"warning: cannot lock '{self.path}' ({exc.strerror}); nothing stops a second run "
                          "from writing into this --save-dir at the same time.", file=sys.stderr, flush=True)
                    return self
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_identity() + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self):
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # while still locked, so no newcomer's name is erased
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor drops the flock

    def _forget(self):
        """Close this process's descriptor without touching the file: in a forked child the
        parent still holds the lock through its own descriptor, and keeps its name in the file."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def lock_holder(run_dir):
    """"pid@host" of the process holding ``run_dir``'s lock, or None when it is free.

    Probes with a shared lock, released at once, on a read-only descriptor: the holder keeps its
    exclusive lock and its file content untouched. A holder in this very process counts too.
    """
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = open_control_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


_HELD_LOCKS = {}  # resolved run directory -> RunDirLock, held until release_locks()


def _hold_lock(save_dir):
    """Acquire ``save_dir``'s lock for this process (again: a no-op). Returns True when newly taken."""
    key = Path(save_dir).resolve()
    lock = _HELD_LOCKS.get(key)
    if lock is not None and lock.held:
        return False
    lock = RunDirLock(save_dir).acquire()
    _HELD_LOCKS[key] = lock
    return True


def _drop_lock(save_dir):
    lock = _HELD_LOCKS.pop(Path(save_dir).resolve(), None)
    if lock is not None:
        lock.release()


def _forget_locks_in_child():
    # A forked child (a DataLoader worker) inherits the descriptors; were it to outlive a killed
    # parent, it would keep the directory locked. Closing its copies leaves the parent's lock held.
    for lock in _HELD_LOCKS.values():
        lock._forget()
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def release_locks():
    """Release every run-directory lock :func:`prepare_run_dir` took in this process.

    Entry points call it in a ``finally``: a process that runs many ``main()`` calls (in-process
    sweep workers, tests) must free each directory when its run ends, not at process exit.
    """
    while _HELD_LOCKS:
        _, lock = _HELD_LOCKS.popitem()
        lock.release()


# ----------------------------------------------------------------------------- leftovers and restarts

# utils.checkpoint._atomic_write's temporary names: "." + target name + "." + mkstemp's 8 characters + ".tmp"
_TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_TMP_FOLDERS = ("", "tickets", "trajectory")

# What the two stages write into a run directory; --restart discards these and nothing else, so a
# file the user put there survives.
RUN_FILES = ("checkpoint.pt", "config.json", "log.csv", "sparsity.json", "model_best.pt", "model_best_sa.pt",
             "subset_indices.json", "run_info.json")
RUN_FOLDERS = ("tickets", "trajectory")


def remove_stale_temporaries(save_dir):
    """Delete the temporary files of atomic writes that a kill interrupted; returns their paths.

    Only safe while holding the directory's lock: another live writer's temporary looks the same.
    """
    removed = []
    for sub in _TMP_FOLDERS:
        folder = Path(save_dir) / sub
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if _TMP_NAME.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
    return removed


def run_finished(save_dir):
    """A stage-2 run is finished once ``results.json`` exists; a stage-1 run (its config.json has
    ``rounds``) once the ticket of every round it was asked for exists."""
    save_dir = Path(save_dir)
    if (save_dir / "results.json").exists():
        return True
    try:
        config = json.loads((save_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    rounds = config.get("rounds") if isinstance(config, dict) else None
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        return False
    return all((save_dir / "tickets" / f"round_{k:02d}.pt").is_file() for k in range(1, rounds + 1))


def _discard_unfinished_run(save_dir, finished):
    if finished:
        raise UserError(f"--restart refuses to discard '{save_dir}': it holds a finished run "
                        "(results.json, or every round's ticket, exists); choose another --save-dir.")
    for name in RUN_FILES:
        p = save_dir / name
        if p.is_file() or p.is_symlink():
            print(f"--restart: discarding {p}", flush=True)
            p.unlink()
    for name in RUN_FOLDERS:
        p = save_dir / name
        if p.is_dir() and not p.is_symlink():
            print(f"--restart: discarding {p}/", flush=True)
            shutil.rmtree(p)


def prepare_run_dir(save_dir, config, primary=True, *, restart=False, finished=None, lock=True):
    """Create ``save_dir`` and write ``config.json``, or check it matches an existing one.

    Returns True when the directory already held this configuration (a resume).

    The primary process first takes the directory's lock (:class:`RunDirLock`, kept until
    :func:`release_locks`; ``lock=False`` skips it), then removes the temporaries of killed writes.
    ``restart``: an unfinished run in the directory (config.json present) is discarded, each file
    printed, and the run starts afresh; a finished one is refused. ``finished`` overrides
    :func:`run_finished`'s verdict on whether the directory's run is finished.
    Non-primary processes (``primary=False``) only check the config the primary wrote.
    """
    save_dir = Path(save_dir)
    taken = primary and lock and lock_run_dir(save_dir)
    try:
        return _prepare_locked(save_dir, config, primary, restart, finished)
    except BaseException:
        if taken:
            _drop_lock(save_dir)
        raise


def lock_run_dir(save_dir):
    """Take ``save_dir``'s lock for this process (kept until :func:`release_locks`) before anything
    about the run in it is decided: whether it is finished, resumed or started is only true while no
    other process can change it. Returns True when newly taken (False: this process held it already).

    A directory that is not a run of this tool is refused first, so a mistyped --save-dir gets no lock file."""
    save_dir = Path(save_dir)
    if not (save_dir / "config.json").exists():
        _refuse_foreign(save_dir)
    return _hold_lock(save_dir)


def config_stage(config):
    """1 for a stage-1 (ticket finding) config, 2 for a stage-2 (transfer) one, None if neither."""
    if "rounds" in config:
        return 1
    if "regime" in config:
        return 2
    return None


def _refuse_other_stage(path, config):
    """--restart discards a run of the *same* stage only: a stage-2 command pointed at an IMP directory
    (swapped arguments) must never delete days of ticket finding."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # the config check below reports it
    a, b = config_stage(old), config_stage(json.loads(json.dumps(config)))
    if a is not None and b is not None and a != b:
        raise UserError(f"--restart refuses to discard '{path.parent}': it holds a stage-{a} run and this is a stage-{b} "
                        "command; check --save-dir (a swapped argument?) or choose another directory.")


def _refuse_foreign(save_dir):
    if save_dir.is_dir() and any(p.name != "config.json" and not p.name.startswith(".") for p in save_dir.iterdir()):
        raise UserError(f"--save-dir '{save_dir}' is not empty and holds no config.json, so it is not a run of this tool; "
                        "choose an empty or new directory.")


def _prepare_locked(save_dir, config, primary, restart, finished):
    path = save_dir / "config.json"
    config = json.loads(json.dumps(config))  # normalise tuples etc. to what JSON gives back
    discarded = False
    if primary:
        for p in remove_stale_temporaries(save_dir):
            print(f"removed {p}, left by a write that was killed", flush=True)
        if restart and (path.exists() or path.is_symlink()):
            _refuse_other_stage(path, config)
            _discard_unfinished_run(save_dir, run_finished(save_dir) if finished is None else finished)
            discarded = True  # the directory was this tool's run; files the user added there may stay
    if path.exists():
        old = read_config(path)
        diffs = config_differences(old, config)
        if diffs:
            listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in diffs[:12])
            done = run_finished(save_dir) if finished is None else finished
            fix = ("choose another --save-dir or rerun with the original flags." if done else
                   "rerun with the original flags to resume, add --restart to discard this unfinished run and "
                   "start afresh, or choose another --save-dir.")
            raise UserError(f"--save-dir '{save_dir}' holds a run with a different configuration ({listed}); {fix}")
        return True
    if not discarded:
        _refuse_foreign(save_dir)
    if primary:
        save_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(config, path)
    return False


def csv_text(rows, fields):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buf.getvalue()


def write_csv(rows, path, fields):
    """Rewrite a whole CSV atomically (cheap: logs are per epoch), so it always matches the checkpoint."""
    atomic_write_text(csv_text(rows, fields), path)
    return Path(path)


def git_commit():
    """The commit of the code that produced a result, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None
