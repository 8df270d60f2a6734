"""The progress of a grid: per group done / running / failed / pending, GPU-hours, disk, and the
double-win verdict of every group whose runs are all done (from analysis.table, the table's own code)."""

import contextlib
import os
from pathlib import Path

from study.grid import REGIMES, expected_record
from study.rundirs import run_state_results, stale_text
from utils.errors import UserError
from utils.records import read_log_column

STATES = ("done", "running", "failed", "pending", "stale")


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def gpu_seconds(run_dir):
    """The summed ``seconds`` of the run's log.csv (utils.records: a damaged log is a UserError)."""
    path = (run_dir if isinstance(run_dir, Path) else Path(run_dir)) / "log.csv"  # no re-parse of a Path
    if not os.path.lexists(path):
        return 0.0
    total = 0.0
    for value in read_log_column(path, "seconds"):
        try:  # (a try per row, not contextlib.suppress: this loop runs 100 times per run)
            total += float(value or 0)
        except (TypeError, ValueError):
            pass
    return total


def _states(runs):
    """(id(run) -> (state, detail, GPU-seconds), {results.json path: its results} of the done runs);
    a run with a damaged file is failed, the damage its detail."""
    from analysis.runs import slim_results  # what of each results.json the verdicts read (verdict_lines)

    out, results = {}, {}
    for r in runs:
        state, detail, obj = run_state_results(r)
        try:
            seconds = gpu_seconds(r.run_dir)
        except UserError as exc:
            seconds, state, detail = 0.0, "failed", f"invalid: {exc}"
        if state == "done":
            results[r.run_dir / "results.json"] = slim_results(obj)
        out[id(r)] = (state, detail, seconds)
    return out, results


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _show(path, cwd=None):
    """A path as short as it can be said: relative to the working directory (``cwd``, resolved,
    when the caller has it) when below it."""
    try:
        return str(Path(path).resolve().relative_to(cwd or Path.cwd().resolve()))
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
    full, results = _states(runs)
    cwd = Path.cwd().resolve()
    states = {key: state for key, (state, _, _) in full.items()}
    rows, total_bytes, total_gpu = [], 0, 0.0
    order = {"dense": ""}
    for key in sorted(groups, key=lambda k: (k[0], -k[1], k[2], order.get(k[3], k[3]), REGIMES.index(k[4]))):
        members = groups[key]
        dataset, rate, pretrain, method, regime = key
        counts = {s: sum(states[id(r)] == s for r in members) for s in STATES}
        seconds = sum(full[id(r)][2] for r in members)
        sizes = [dir_bytes(r.run_dir) for r in members if r.run_dir.exists()]
        total_bytes += sum(sizes)
        total_gpu += seconds
        rows.append([dataset, f"{rate:g}", pretrain, method, regime, len(members),
                     *(counts[s] for s in STATES), f"{seconds / 3600:.3f}",
                     human_bytes(sum(sizes) / len(sizes)) if sizes else "-"])
    header = ["dataset", "rate", "pretrain", "method", "regime", "runs", *STATES, "GPU-h", "disk/run"]
    lines = [f"grid {_show(grid.path, cwd)} -> {_show(grid.out, cwd)}", *stage1_status_lines(grid, runs),
             *_table(header, rows)]
    failed = [r for r in runs if states[id(r)] == "failed"]
    if failed:
        lines += ["", f"failed runs ({len(failed)}; `run` retries them):"]
        lines += [f"  {_show(r.run_dir, cwd)}: {full[id(r)][1]}" for r in failed]
    stale = [r for r in runs if states[id(r)] == "stale"]
    if stale:
        lines += ["", f"stale runs ({len(stale)}; their config.json differs from what the grid gives them now; "
                      "`run --rerun-stale` moves them aside and runs them again):"]
        lines += [f"  {_show(r.run_dir, cwd)}: {stale_text(full[id(r)][1])}" for r in stale]
    lines += ["", *verdict_lines(grid, runs, states, results)]
    n = len(runs)
    count = {s: sum(v == s for v in states.values()) for s in STATES}
    lines += ["", f"GPU-hours {total_gpu / 3600:.3f}, disk {human_bytes(total_bytes)}",
              f"done {count['done']} of {n} runs ({count['failed']} failed, {count['pending']} pending, "
              f"{count['running']} running" + (f", {count['stale']} stale)" if count["stale"] else ")")]
    return lines


def stage1_status_lines(grid, runs):
    from study.stage1_progress import status_lines as stage1_lines  # the hook: stage 1's own table

    return stage1_lines(grid, runs, _table, _show)


def _rate_text(value):
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def verdict_lines(grid, runs, states, results=None):
    """The double-win verdict of every (dataset, rate, pretrain, method) whose runs, and whose dense
    baselines, are all done, from the analysis' own verdict code. ``results``: {path: results} of
    results.json files this status has just read (study.rundirs.finished_results), not read again."""
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
    # The one import that runs back up the house (study -> analysis): status shows the verdicts of
    # finished groups, and those are the analysis' own table code, never a second copy. Imported
    # here because the analysis loads torch (its ticket lookups, through pruning_utils), which plan,
    # the grid's error messages and a status without a finished group need not wait for.
    from analysis.common import preloaded_results
    from analysis.table import verdict_rows

    dirs = sorted({str(r.run_dir) for members in ready for r in members})
    # the grid says which levels and seeds exist: rounds left out of the grid are not "missing"
    expected = [expected_record(r) for members in ready for r in members]
    try:
        with preloaded_results(results or {}):
            rows = verdict_rows(dirs, expected=expected)
    except UserError as exc:
        return [f"verdicts: not available ({exc})"]
    except Exception as exc:  # noqa: BLE001  (the progress table must not die with the verdict code)
        return [f"verdicts: analysis.table.verdict_rows failed ({type(exc).__name__}: {exc}); "
                "run analysis/plot_curves.py for the table"]
    if not rows:
        return ["verdicts: none (the finished groups hold no ticket runs with baselines)"]
    header = ["dataset", "rate", "pretrain", "method", "verdict", "extreme", "contiguous", "supported (>=0.9)",
              "double-win levels"]
    body = [[r.get("dataset"), _rate_text(r.get("data_rate")), r.get("pretrain"), r.get("method"), r.get("verdict", ""),
             r.get("extreme_sparsity", "") or "-", r.get("extreme_sparsity_contiguous", "") or "-",
             r.get("extreme_sparsity_supported", "") or "-", r.get("double_win_levels", "") or "-"] for r in rows]
    return ["verdicts of finished groups (support: the fraction of seed resamples under which the rule holds; "
            "see docs/analysis.md §1, 'Support'):", *_table(header, body)]
