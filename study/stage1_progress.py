"""Stage 1's progress as plan, status and the pipeline see it: which runs wait on which round of
which [stage1.NAME] entry, and each entry's state (done, running, failed, pending)."""

from pathlib import Path

from study.rundirs import entry_lock_holder, read_failure
from utils.errors import UserError


def needs(grid):
    """ticket file path -> (entry, round) for every ticket a grid's stage-1 entries make."""
    out = {}
    for entry in grid.stage1.values():
        for k in entry.levels:
            out[entry.save_dir / "tickets" / f"round_{k:02d}.pt"] = (entry, k)
    return out


def run_needs(grid, runs):
    """id(run) -> (entry, round) for the runs whose ticket a stage-1 entry of the grid makes."""
    made = needs(grid)
    return {id(r): made[Path(r.ticket)] for r in runs if r.ticket is not None and Path(r.ticket) in made}


def entry_state(entry):
    """(state, detail): done, running (its lock is held), failed (the sweep's failure record), pending."""
    if entry.finished:
        return "done", ""
    if entry.save_dir.is_dir() and entry_lock_holder(entry.save_dir):
        return "running", ""
    try:
        record = read_failure(entry.save_dir)
    except UserError as exc:
        return "failed", f"invalid: {exc}"
    if record:
        return "failed", record.get("error", "")
    return "pending", ""


def plan_lines(grid):
    """One line per stage-1 entry for ``plan``: state, rounds written, directory and command."""
    lines = []
    for entry in grid.stage1.values():
        state = "done" if entry.finished else "pending"
        lines.append(f"stage1 {state:7}  {len(entry.written())}/{len(entry.levels)} rounds  {entry.save_dir}  "
                     f"{entry.command()}")
    return lines


def status_lines(grid, runs, table, show):
    """Stage 1's progress per ticket directory, and the runs a failed entry holds back; ``table``
    and ``show`` are study.status's own table and path formatting."""
    if not grid.stage1:
        return []
    waiting = {}
    for entry, k in run_needs(grid, runs).values():
        if k not in entry.written():
            waiting[entry.name] = waiting.get(entry.name, 0) + 1
    rows, notes = [], []
    for entry in grid.stage1.values():
        state, detail = entry_state(entry)
        written = entry.written()
        rows.append([entry.name, entry.pretrain, entry.family, show(entry.save_dir),
                     f"round {max(written, default=0)} of {len(entry.levels)}", state, entry.gpus])
        if state == "failed":
            notes.append(f"  {entry.name}: {detail.rstrip('.')}; {waiting.get(entry.name, 0)} runs wait on its tickets "
                         "(`run` resumes it)")
    header = ["stage 1", "pretrain", "family", "directory", "progress", "state", "gpus"]
    lines = table(header, rows)
    if notes:
        lines += ["failed stage-1 jobs:", *notes]
    return [*lines, ""]


def unfinished(grid):
    return [e for e in grid.stage1.values() if not e.finished]
