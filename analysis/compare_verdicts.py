"""Do two double-win tables agree? Cell by cell, with the support of each verdict.

    python analysis/compare_verdicts.py REFERENCE_OUT OTHER_OUT [OTHER_OUT ...]

Each argument is an ``--out`` directory of ``analysis/plot_curves.py`` (it holds
``double_win_details.csv``). A *cell* is one sparsity level of one row (dataset, data rate,
pretrain, method). For every other table the report counts, by the reference's support label of
the cell (supported: double-win support >= 0.9; contradicted: <= 0.1; uncertain: between), how
many cells changed their double-win verdict, and how many rows changed any of their extreme
sparsities. The question it answers: when the same runs are repeated on another machine or with
other float rounding, do the cells the support calls settled stay settled? (docs/demo.md §3, "How
sure is the demo's table".) The report ends with the settled cells over all the tables: how many
are settled in every one, how many settled cells changed their verdict (and one in how many), and
the reversals, cells supported in one table and contradicted in another — the measure of a support
that claims more than it knows.
"""

import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from analysis.verdict import support_label  # noqa: E402
from utils.cli import ArgumentParser, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.records import read_table  # noqa: E402

LABELS = ("supported", "contradicted", "uncertain")
ROW_KEY = ("dataset", "data_rate", "pretrain", "method")
EXTREMES = ("extreme_sparsity", "extreme_sparsity_contiguous", "extreme_sparsity_supported")


def _read_csv(path, required):
    """A verdict table of analysis/plot_curves.py, with the columns ``required``."""
    return read_table(path, required, "pass the --out directory analysis/plot_curves.py wrote (this version)")


def level_key(method, rank, sparsity_text):
    """How a level is paired across two tables: by its sparsity, except for channel tickets, whose
    weight sparsity depends on which filters the source model lets go (the same round has another
    level in another run), so their levels pair by rank (round k of stage 1)."""
    return f"#{rank}" if "channel" in method else f"{float(sparsity_text):.2f}"


def read_cells(out_dir):
    """{(dataset, rate, pretrain, method, level): (double_win, support, sparsity)} of the judged levels,
    ``level`` as :func:`level_key` gives it."""
    rows = _read_csv(Path(out_dir) / "double_win_details.csv", ROW_KEY + ("sparsity", "judged", "double_win"))
    by_row = {}
    for r in rows:
        if r.get("judged") != "True":
            continue
        try:
            support = float(r["double_win_support"])
            sparsity = float(r["sparsity"])
        except KeyError:
            raise UserError(f"'{out_dir}/double_win_details.csv' has no double_win_support column; rerun "
                            "analysis/plot_curves.py with this version.") from None
        except ValueError:
            raise UserError(f"'{out_dir}/double_win_details.csv' gives a judged level the sparsity {r['sparsity']!r} "
                            f"and support {r['double_win_support']!r}, not numbers; rerun analysis/plot_curves.py to "
                            "write it again.") from None
        by_row.setdefault(tuple(r[k] for k in ROW_KEY), []).append((sparsity, r["double_win"] == "True",
                                                                      support, r["sparsity"]))
    cells = {}
    for row, levels in by_row.items():
        for k, (_, win, support, text) in enumerate(sorted(levels), start=1):
            cells[row + (level_key(row[3], k, text),)] = (win, support, text)
    return cells


def read_rows(out_dir):
    return {tuple(r[k] for k in ROW_KEY): r for r in _read_csv(Path(out_dir) / "double_win.csv", ROW_KEY)}


def compare(reference, other):
    """Counts of the comparison of two analysis outputs (see the module docstring)."""
    ref, oth = read_cells(reference), read_cells(other)
    out = {"cells": Counter(), "changed": Counter(), "label_changed": Counter(),
           "unmatched_reference": sorted(k[:4] + (ref[k][2],) for k in ref.keys() - oth.keys()),
           "unmatched_other": sorted(k[:4] + (oth[k][2],) for k in oth.keys() - ref.keys())}
    changed_cells = []
    for key, (win, support, text) in ref.items():
        label = support_label(support)
        if key not in oth:
            continue
        out["cells"][label] += 1  # cells compared
        other_win, other_support, _ = oth[key]
        if other_win != win:
            out["changed"][label] += 1
            changed_cells.append((key[:4] + (text,), label, win, support, other_win, other_support))
        if support_label(other_support) != label:
            out["label_changed"][label] += 1
    ref_rows, oth_rows = read_rows(reference), read_rows(other)
    out["rows"] = len(ref_rows)
    out["rows_changed"] = {e: sum(1 for k, r in ref_rows.items() if k in oth_rows and oth_rows[k].get(e) != r.get(e))
                           for e in EXTREMES}
    out["changed_cells"] = changed_cells
    return out


def settled_summary(tables):
    """Over every cell in all ``tables`` (read_cells of each): {"settled_everywhere": cells settled in
    each table, "settled": cells settled in at least one, "changed": of those, the ones whose verdict is
    not the same in every table, "reversals": cells supported in one table and contradicted in another}."""
    common = set.intersection(*(set(t) for t in tables))
    out = {"cells": len(common), "settled_everywhere": 0, "settled": 0, "changed": 0, "reversals": 0}
    for key in common:
        labels = {support_label(t[key][1]) for t in tables}
        if labels & {"supported", "contradicted"}:
            out["settled"] += 1
            out["changed"] += len({t[key][0] for t in tables}) > 1
        out["settled_everywhere"] += labels <= {"supported", "contradicted"} and len(labels) == 1
        out["reversals"] += {"supported", "contradicted"} <= labels
    return out


def summary_lines(dirs):
    s = settled_summary([read_cells(d) for d in dirs])
    rate = f" (one in {s['settled'] / s['changed']:.1f})" if s["changed"] else ""
    return [f"over all {len(dirs)} tables, {s['cells']} cells in every one:",
            f"  settled (support >= 0.9 or <= 0.1) in every table, with one label: {s['settled_everywhere']}",
            f"  settled in at least one table: {s['settled']}; of them, verdict not the same in every table: "
            f"{s['changed']}{rate}",
            f"  reversals (supported in one table, contradicted in another): {s['reversals']}"]


def report(reference, others):
    lines = []
    for other in others:
        res = compare(reference, other)
        lines.append(f"{other} vs {reference}:")
        for label in LABELS:
            n = res["cells"][label]
            lines.append(f"  {label:12s} cells compared {n:3d}: verdict changed in {res['changed'][label]}, "
                         f"support label changed in {res['label_changed'][label]}")
        rows = res["rows_changed"]
        lines.append(f"  rows {res['rows']}: extreme sparsity changed in {rows['extreme_sparsity']}, contiguous in "
                     f"{rows['extreme_sparsity_contiguous']}, supported in {rows['extreme_sparsity_supported']}")
        for side, name in (("unmatched_reference", str(reference)), ("unmatched_other", str(other))):
            if res[side]:
                lines.append(f"  {len(res[side])} level(s) only in {name}:")
                lines += [f"    {' '.join(key[:4])} {key[4]}%" for key in res[side]]
        for key, label, win, support, other_win, other_support in res["changed_cells"]:
            lines.append(f"    changed: {' '.join(key[:4])} {key[4]}%: {'win' if win else 'no'} ({support:.2f}, "
                         f"{label}) -> {'win' if other_win else 'no'} ({other_support:.2f})")
    return lines


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference", help="--out directory of plot_curves.py (the reference table)")
    p.add_argument("others", nargs="+", help="--out directories to compare with it")
    args = p.parse_args(argv)
    lines = report(args.reference, args.others) + summary_lines([args.reference, *args.others])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
