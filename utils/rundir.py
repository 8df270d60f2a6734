"""Run directories: the resolved config saved beside the results, and refusal to mix runs.

A directory belongs to one configuration. Rerunning the same command resumes; rerunning a
different configuration into the same directory is refused with the differences listed, so a
week-long sweep can never silently overwrite or blend results.
"""

import csv
import io
import json
import subprocess
from pathlib import Path

from utils.checkpoint import atomic_write_json, atomic_write_text
from utils.errors import UserError

# Settings that change how fast a run goes or what it prints, never what it computes.
NON_SEMANTIC_KEYS = frozenset({"workers", "progress", "save_dir", "device", "channels_last", "cudnn_benchmark"})


def config_differences(old, new, ignore=NON_SEMANTIC_KEYS):
    """(key, old, new) for every setting that differs. A key one side lacks while the other holds
    None is no difference: a flag added or removed between versions with its default unset must
    not strand a sweep's run directories."""
    keys = sorted((set(old) | set(new)) - set(ignore))
    diffs = []
    for k in keys:
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if a != b and not ((a is None and b == "<absent>") or (a == "<absent>" and b is None)):
            diffs.append((k, a, b))
    return diffs


def prepare_run_dir(save_dir, config, primary=True):
    """Create ``save_dir`` and write ``config.json``, or check it matches an existing one.

    Returns True when the directory already held this configuration (a resume).
    """
    save_dir = Path(save_dir)
    path = save_dir / "config.json"
    config = json.loads(json.dumps(config))  # normalise tuples etc. to what JSON gives back
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"'{path}' is not valid JSON; remove it (or choose another --save-dir) to start afresh.") from None
        diffs = config_differences(old, config)
        if diffs:
            listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in diffs[:12])
            raise UserError(f"--save-dir '{save_dir}' holds a run with a different configuration ({listed}); "
                            "choose another --save-dir or rerun with the original flags.")
        return True
    if save_dir.exists() and any(p.name != "config.json" and not p.name.startswith(".") for p in save_dir.iterdir()):
        raise UserError(f"--save-dir '{save_dir}' is not empty and holds no config.json, so it is not a run of this tool; "
                        "choose an empty or new directory.")
    if primary:
        save_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(config, path)
    return False


def write_csv(rows, path, fieldnames):
    """Rewrite a whole CSV atomically (cheap: logs are per epoch), so it always matches the checkpoint."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(buf.getvalue(), path)


def git_commit():
    """The commit of the code that produced a result, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None
