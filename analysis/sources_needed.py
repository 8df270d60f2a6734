"""How many source models does a double-win verdict need before another set of them gives the same one?

    python analysis/sources_needed.py RUNS_DIR [RUNS_DIR ...] [--max-sources K] [--draws N] [--seed S] [--out DIR]

The support of a verdict (analysis/verdict.py) resamples the sources a cell has, then the runs
within each, so it can only see as much of the source models' variance as the study drew. This
tool asks the question the support cannot: if the study were run again with k *other* source
models per pre-training label, would the cells it calls settled (double-win support >= 0.9 or
<= 0.1) keep their verdict? It pools every results.json under the directories (analysis/runs.py),
splits the runs into *source slots*, and for k = 1 .. min(K, slots // 2) draws N times two disjoint
sets of k slots, judges each set's runs alone (analysis.table.judge, hierarchical support and all)
and compares the two tables level by level, as analysis/compare_verdicts.py compares two whole
runs of a study: cells per table, settled per table, settled with the same label in both, settled
in either, of those how many changed their double-win verdict (and one in how many), and
reversals (supported in one table, contradicted in the other) — each a mean per draw. It ends with
the verdicts of all slots together.

A *source slot* is one source model of every label: the replicate directory ``rI`` holding a run's
θ_p file (``init`` in results.json; the demo's ``OUT/source/LABEL/rI/model_best.pt``) within its
study, the study being the path above it less the label's own directory. Runs whose θ_p is in no
replicate directory are refused (exit 2): the tool needs replicated sources (docs/sweeps.md §6,
"Replicated sources"). Several demo outputs pooled repeat each other's seeds in the same cells;
their runs are then told apart by prefixing each seed with its directory's index, and the output
says so.

Outputs (with ``--out``): sources_needed.csv (one row per k) and sources_needed.md (the table, the
slots and the verdicts of all slots); the table is printed either way.
"""

import os
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/sources_needed.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import common  # noqa: E402
from analysis.runs import build_cells, load_runs  # noqa: E402
from analysis.table import judge  # noqa: E402
from analysis.verdict import support_label  # noqa: E402
from utils.checkpoint import atomic_write_text  # noqa: E402
from utils.cli import ArgumentParser, positive_int, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402

REPLICATE = re.compile(r"r([0-9]+)")
SETTLED = ("supported", "contradicted")
FIELDS = ["k", "draws", "cells", "settled", "settled_alike", "settled_either", "changed", "one_in", "reversals"]
HEADINGS = {"k": "k (sources per label)", "draws": "draws", "cells": "cells per table",
            "settled": "settled per table", "settled_alike": "settled alike in both",
            "settled_either": "settled in either", "changed": "verdict changed", "one_in": "one in",
            "reversals": "reversals"}


def source_slot(run, dir_index):
    """(study, I) of a run's θ_p file ``…/rI/…``, or None when it is in no replicate directory.

    The study is the path above ``rI`` without the label's own directory (the demo's
    ``OUT/source/LABEL``), so replicate I of every label is one slot. A relative path names no
    study (every demo writes the same one), so it is kept apart by the index of its RUNS_DIR."""
    init = run.results.get("init")
    if not isinstance(init, str) or not init:
        return None
    parts = Path(os.path.normpath(init)).parts[:-1]  # the directories holding the file
    for i in range(len(parts) - 1, -1, -1):
        match = REPLICATE.fullmatch(parts[i])
        if match:
            above = list(parts[:i])
            if above and above[-1] == run.pretrain:
                above.pop()
            study = str(Path(*above)) if above else ""
            if not os.path.isabs(init):
                study = f"#{dir_index}:{study}"
            return study, int(match.group(1))
    return None


def slot_name(slot):
    study, i = slot
    return f"{study}/r{i}" if study else f"r{i}"


def _dir_index(run, dirs):
    """The index of the first RUNS_DIR holding the run (find_result_files resolves every path)."""
    return next((i for i, d in enumerate(dirs) if run.path.is_relative_to(d)), 0)


def assign_slots(runs, dirs):
    """{id(run): slot} of every run; UserError naming the first run whose θ_p is not replicated."""
    resolved = [Path(d).resolve() for d in dirs]
    slots = {}
    for r in runs:
        slot = source_slot(r, _dir_index(r, resolved))
        if slot is None:
            raise UserError(f"'{r.path}' names the θ_p file {r.results.get('init')!r}, which is in no replicate "
                            "directory (…/rI/…); sources_needed.py compares sets of source models, so it needs "
                            "replicated sources (docs/sweeps.md §6, \"Replicated sources\").")
        slots[id(r)] = slot
    return slots


def make_seeds_distinct(runs, dirs):
    """Prefix every seed with its RUNS_DIR's index when two directories hold the same seed in one
    cell (pooled demo outputs): the analysis refuses duplicated seeds. True when it did."""
    resolved = [Path(d).resolve() for d in dirs]
    index = {id(r): _dir_index(r, resolved) for r in runs}
    where = defaultdict(set)
    for r in runs:
        where[(r.dataset, r.data_rate, r.pretrain, r.label, r.regime, r.sparsity, r.seed)].add(index[id(r)])
    if all(len(v) < 2 for v in where.values()):
        return False
    for r in runs:
        r.seed = f"{index[id(r)]}:{r.seed}"
    return True


def verdicts(runs):
    """{(dataset, rate, pretrain, method, sparsity): (double_win, support)} of every judged level."""
    cells, _ = build_cells(runs)
    _, levels, _ = judge(cells)
    return {(row["dataset"], row["data_rate"], row["pretrain"], row["method"], row["sparsity"]):
            (row["double_win"], row["double_win_support"]) for row in levels if row["judged"]}


def compare(a, b):
    """Counts of two verdict tables (:func:`verdicts`) over the levels both judged."""
    out = Counter()
    for key in a.keys() & b.keys():
        la, lb = support_label(a[key][1]), support_label(b[key][1])
        out["cells"] += 1
        out["settled"] += (la in SETTLED) + (lb in SETTLED)  # both tables: halved into a per-table mean
        out["settled_alike"] += la in SETTLED and la == lb
        if {la, lb} & set(SETTLED):
            out["settled_either"] += 1
            out["changed"] += a[key][0] != b[key][0]
        out["reversals"] += {la, lb} == set(SETTLED)
    return out


def measure(runs, slot_of, k_max, draws, seed):
    """One row per k (the FIELDS, means per draw) and the verdicts of all slots together."""
    slots = sorted(set(slot_of.values()))
    by_slot = defaultdict(list)
    for r in runs:
        by_slot[slot_of[id(r)]].append(r)
    cache = {}

    def table(chosen):
        key = frozenset(chosen)
        if key not in cache:  # k = 1 has only as many sets as slots
            cache[key] = verdicts([r for s in sorted(key) for r in by_slot[s]])
        return cache[key]

    rng = random.Random(seed)
    rows = []
    for k in range(1, k_max + 1):
        total = Counter()
        for _ in range(draws):
            pick = rng.sample(slots, 2 * k)
            total += compare(table(pick[:k]), table(pick[k:]))
        row = {f: total[f] / draws for f in FIELDS[2:] if f != "one_in"}
        row["settled"] /= 2
        row.update(k=k, draws=draws, one_in=total["settled_either"] / total["changed"] if total["changed"] else None)
        rows.append(row)
    return rows, table(slots)


def _fmt(field, value):
    if value is None:
        return "never"
    if field in ("k", "draws"):
        return str(value)
    return f"{value:.2f}" if field == "reversals" else f"{value:.1f}"


def markdown(rows):
    fields = [HEADINGS[f] for f in FIELDS]
    return common.markdown_table([{HEADINGS[f]: _fmt(f, r[f]) for f in FIELDS} for r in rows], fields)


def all_slots_line(all_verdicts, n_slots):
    counts = Counter(support_label(v[1]) for v in all_verdicts.values())
    return (f"all {n_slots} slots together: {len(all_verdicts)} cells judged, "
            + ", ".join(f"{counts[label]} {label}" for label in ("supported", "contradicted", "uncertain")))


def _coverage_notes(runs, slot_of):
    """One note per slot that lacks runs of some label: its sets then judge those labels on fewer sources."""
    labels = {r.pretrain for r in runs}
    held = defaultdict(set)
    for r in runs:
        held[slot_of[id(r)]].add(r.pretrain)
    return [f"slot {slot_name(s)} holds no runs of pretrain label(s) {', '.join(sorted(labels - held[s]))}"
            for s in sorted(held) if labels - held[s]]


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="directories of finished stage-2 runs (several studies are pooled)")
    p.add_argument("--max-sources", type=positive_int, default=None,
                   help="largest k (sources per label) to measure; at most half the slots (default: half)")
    p.add_argument("--draws", type=positive_int, default=20, help="pairs of disjoint slot sets drawn per k")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    p.add_argument("--out", type=Path, default=None, help="write sources_needed.csv and sources_needed.md here (default: none, print only)")
    args = p.parse_args(argv)

    runs, warnings = load_runs(args.runs)
    slot_of = assign_slots(runs, args.runs)
    slots = sorted(set(slot_of.values()))
    if len(slots) < 2:
        raise UserError(f"the runs hold one source slot ({slot_name(slots[0])}); two disjoint sets of sources need "
                        "at least two: pass a study with replicated sources, or several of them.")
    notes = [f"{len(runs)} runs, {len(slots)} source slots: {', '.join(slot_name(s) for s in slots)}"]
    if make_seeds_distinct(runs, args.runs):
        notes.append("several directories hold the same seed in one cell: each seed is prefixed with the index of "
                     "its directory (0:1, 1:1, …), so the pooled runs stay distinct")
    notes += _coverage_notes(runs, slot_of)
    k_max = min(args.max_sources or len(slots) // 2, len(slots) // 2)
    rows, all_verdicts = measure(runs, slot_of, k_max, args.draws, args.seed)
    text = markdown(rows)
    tail = all_slots_line(all_verdicts, len(slots))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print("\n".join(notes) + "\n\n" + text + "\n" + tail)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        common.write_csv([{f: "" if r[f] is None else round(r[f], 4) for f in FIELDS} for r in rows],
                         args.out / "sources_needed.csv", FIELDS)
        atomic_write_text("# How many sources the verdict needs\n\n" + "".join(f"- {n}\n" for n in notes)
                          + f"- per k: {args.draws} draws (seed {args.seed}) of two disjoint sets of k slots, each "
                            "set's runs judged alone; counts are means per draw, over the levels both tables "
                            "judged; settled = double-win support >= 0.9 or <= 0.1; verdict changed and reversals "
                            "count cells settled in either table\n\n"
                          + text + "\n" + tail + "\n", args.out / "sources_needed.md")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
