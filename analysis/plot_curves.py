"""SA/RA-vs-sparsity curves and the double-win table from downstream results (docs/contracts.md §5).

    python analysis/plot_curves.py RUNS_DIR [RUNS_DIR ...] --out OUT_DIR [--grid GRID.toml]

Reads every results.json under the directories (analysis/runs.py), judges every group and writes
the double-win table (analysis/table.py: how runs are grouped, which runs are expected, when a level
is judged), then draws. ``--grid`` takes the expected runs from the sweep's grid file.

Outputs in OUT_DIR: double_win.csv, double_win.md, double_win_details.csv, summary.csv,
warnings.txt (analysis/table.py), and PNG figures each with a CSV of the data drawn: curves_* (per
dataset and data rate, one line per pretrain label), data_rate_* (data rates side by side),
methods_* (pruning methods of one pre-training). Each ticket level carries its double-win verdict as
a marker — filled circle: double-win, cross: not, hollow circle: uncertain (analysis/style.py);
levels evenly spaced in IMP rounds sit one step apart, other sets of levels on a numeric axis. The
CSVs' x_position is the level's rank among the figure's levels in either case.
Bad input (no results.json found, a missing directory, no readable results) exits with status 2,
and so do runs of one group (dataset, data rate, pretrain, method, regime) made with different
protocols (epochs, lr, ε, ...: analysis.runs.PROTOCOL_KEYS), unless ``--mix-protocols`` draws them
together with a warning. The architecture is part of every line's key: runs of two architectures
in one line are refused (exit 2) even with ``--mix-protocols``; IMP's rewind variants are lines
(and verdict rows) of their own ("imp", "imp-norewind").
"""

import argparse
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/plot_curves.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import common, style  # noqa: E402
from analysis.runs import DENSE, cell_sort_key, csv_number, group_text, load_runs  # noqa: E402, F401  (load_runs: reached as plot_curves.load_runs too)
from analysis.table import (  # noqa: E402, F401  (verdict_rows, collect: reached as plot_curves.NAME too)
    CSV_FIELDS,
    collect,
    grid_expected_runs,
    level_supports,
    verdict_rows,
    write_tables,
)
from utils.cli import ArgumentParser  # noqa: E402
from utils.errors import UserError  # noqa: E402

FIGURE_FIELDS = ["figure", "panel", "regime", "metric", "series", "kind", "dataset", "data_rate", "pretrain", "method",
                 "sparsity", "x_position", "mean", "std", "n", "complete", "double_win_support"]
CORE_PANELS = (("st", "sa"), ("at", "sa"), ("at", "ra"))
RANDOM = "rp"


# --------------------------------------------------------------------------- figures

@dataclass
class Series:
    """One drawn line: its cells by sparsity (tickets) or one cell (a dense baseline)."""

    name: str
    kind: str  # "ticket", "random" or "dense"
    color: str
    cells: dict  # regime -> {sparsity: Cell}
    dataset: str
    data_rate: float
    pretrain: str
    method: str


def _series(cells, ds, rate, pre, label, kind, color, name):
    by_regime = defaultdict(dict)
    for (d, r, p, lab, regime, s), c in cells.items():
        if (d, r, p, lab) == (ds, rate, pre, label):
            by_regime[regime][s] = c
    if not by_regime:
        return None
    return Series(name, kind, color, dict(by_regime), ds, rate, pre, label)


def _panels(series_list):
    regimes = {regime for s in series_list for regime in s.cells}
    panels = list(CORE_PANELS)
    if "fat" in regimes:
        panels += [("fat", "sa"), ("fat", "ra")]
    return panels


def _draw_panel(ax, series_list, regime, metric, xs, fig_name, panel, data_rows, verdicts=None, kinds=None):
    """One (regime, metric) panel; ``verdicts``: (supports, wins) of analysis/table.py's rows; the verdict
    marker kinds drawn are added to ``kinds``."""
    rank = {s: i for i, s in enumerate(xs)}  # the CSV's x_position: the level's place among the figure's levels
    pos, numeric = style.sparsity_positions(xs)
    drawn = False
    for ser in series_list:
        by_s = ser.cells.get(regime, {})
        if not by_s:
            continue
        if ser.kind == "dense":
            drawn |= _draw_dense(ax, ser, by_s, regime, metric, fig_name, panel, data_rows)
            continue
        key = (ser.dataset, ser.data_rate, ser.pretrain, ser.method)
        supports, wins = verdicts or ({}, None)
        level_support = (supports or {}).get(key, {})
        level_win = None if wins is None else wins.get(key, {})
        pts = []
        for s in sorted(by_s):
            mean, std = by_s[s].stat(metric)
            if math.isnan(mean) or s not in pos:
                continue
            support = level_support.get(s)
            kind = style.verdict_kind(None if level_win is None else level_win.get(s), support)
            pts.append((pos[s], mean, std, by_s[s].complete, kind))
            data_rows.append(_figure_row(fig_name, panel, regime, metric, ser, s, rank[s], mean, std, by_s[s],
                                         support))
        if pts:
            _draw_ticket_line(ax, ser, pts)
            if kinds is not None:
                kinds.update(p[4] for p in pts)
            drawn = True
    ax.set_title(f"{regime.upper()}: {metric.upper()}", fontsize=10)
    style.sparsity_axis(ax, xs, numeric, common.fmt_sparsity)
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="grey")
    return drawn


def _draw_dense(ax, ser, by_s, regime, metric, fig_name, panel, data_rows):
    cell = by_s.get(0.0)
    mean, std = cell.stat(metric)
    if math.isnan(mean):
        return False
    ax.axhline(mean, color=ser.color, ls="--", lw=1.3, label=ser.name)
    ax.axhspan(mean - std, mean + std, color=ser.color, alpha=0.12, lw=0)
    data_rows.append(_figure_row(fig_name, panel, regime, metric, ser, 0.0, "", mean, std, cell))
    return True


def _draw_ticket_line(ax, ser, pts):
    """The line with its band, a verdict marker at each level, and a ring around levels missing seeds.

    ``pts``: (x, mean, std, complete, verdict kind) per level."""
    x = [p[0] for p in pts]
    ls = ":" if ser.kind == "random" else "-"
    ax.plot(x, [p[1] for p in pts], ls=ls, lw=1.6, color=ser.color, label=ser.name)
    ax.fill_between(x, [p[1] - p[2] for p in pts], [p[1] + p[2] for p in pts], color=ser.color, alpha=0.18, lw=0)
    for kind in style.VERDICT_KINDS:
        mine = [p for p in pts if p[4] == kind]
        if mine:
            ax.plot([p[0] for p in mine], [p[1] for p in mine], ls="none", zorder=3,
                    **style.verdict_marker(kind, ser.color))
    bad = [p for p in pts if not p[3]]
    if bad:
        ax.plot([p[0] for p in bad], [p[1] for p in bad], ls="none", marker="o", ms=9, mfc="none",
                mec="black", mew=1.2)


def _figure_row(fig_name, panel, regime, metric, ser, s, x, mean, std, cell, support=None):
    return {"double_win_support": "" if support is None else round(support, 4),"figure": fig_name, "panel": panel, "regime": regime, "metric": metric, "series": ser.name,
            "kind": ser.kind, "dataset": ser.dataset, "data_rate": common.fmt_rate(ser.data_rate),
            "pretrain": ser.pretrain, "method": ser.method, "sparsity": common.fmt_sparsity(s), "x_position": x,
            "mean": csv_number(mean), "std": csv_number(std), "n": cell.n, "complete": cell.complete}


def _levels(series_list):
    return sorted({s for ser in series_list if ser.kind != "dense" for c in ser.cells.values() for s in c})


def _has_incomplete(series_list):
    return any(not c.complete for ser in series_list for by_s in ser.cells.values() for c in by_s.values())


def draw_figure(out_dir, name, title, columns, supports=None, wins=None):
    """``columns``: list of (column title, series list); rows are the (regime, metric) panels.

    ``supports`` / ``wins``: {(dataset, rate, pretrain, method): {level: support / double-win}} give
    each ticket level its verdict marker (analysis/style.py)."""
    plt = common.use_agg()
    all_series = [s for _, ss in columns for s in ss]
    panels = _panels(all_series)
    ncol, nrow = len(columns), len(panels)
    if ncol == 1:  # the paper's layout: the panels side by side
        fig, axes = plt.subplots(1, nrow, figsize=(4.2 * nrow, 3.8), squeeze=False)
        grid = [[axes[0][i]] for i in range(nrow)]
    else:
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
        grid = [list(axes[i]) for i in range(nrow)]
    data_rows, kinds = [], set()
    for pi, (regime, metric) in enumerate(panels):
        for ci, (col_title, series_list) in enumerate(columns):
            ax = grid[pi][ci]
            panel = f"{regime}_{metric}" + (f"_{col_title}" if ncol > 1 else "")
            # one set of levels for every column, so data rates side by side line up
            _draw_panel(ax, series_list, regime, metric, _levels(all_series), name, panel, data_rows,
                        (supports, wins), kinds)
            if ncol > 1:
                ax.set_title(f"{col_title} — {regime.upper()}: {metric.upper()}", fontsize=9)
            if ci == 0 or ncol == 1:
                ax.set_ylabel("accuracy (%)", fontsize=9)
            ax.set_xlabel("sparsity (%)", fontsize=8)
    flat = [ax for row in grid for ax in row]
    for handle in style.verdict_legend_handles(kinds):
        flat[0].add_line(handle)
    if _has_incomplete(all_series):
        from matplotlib.lines import Line2D

        flat[0].add_line(Line2D([], [], ls="none", marker="o", ms=8, mfc="none", mec="black",
                                label="fewer seeds (see warnings)"))
    common.figure_legend(fig, flat)
    fig.suptitle(title, fontsize=11)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0.4 / height, 1, 1 - 0.3 / height))
    png = common.save_figure(fig, out_dir / f"{name}.png")
    common.write_csv(data_rows, out_dir / f"{name}.csv", FIGURE_FIELDS)
    return png


def _rate_tag(rate):
    return f"rate{100 * rate:g}"


def make_figures(cells, out_dir, supports=None, wins=None):
    """Every figure of the cells; ``supports`` / ``wins`` as in draw_figure. Returns the PNG paths."""
    paths = []
    ticket_keys = {k[:4] for k in cells if k[3] != DENSE}

    def dense_series(ds, rate, pre, color=None):
        return _series(cells, ds, rate, pre, DENSE, "dense", color or style.series_color(pre, DENSE), f"{pre} dense")

    def pretrain_columns(ds, rate, label):
        out = []
        pretrains = sorted({k[2] for k in ticket_keys if k[0] == ds and k[1] == rate and k[3] == label},
                           key=lambda p: common.order_key(p, common.PRETRAIN_ORDER))
        for pre in pretrains:
            main = _series(cells, ds, rate, pre, label, "random" if label == RANDOM else "ticket",
                           style.series_color(pre, label), f"{pre} {label}")
            out.append(main)
            if label != RANDOM and (ds, rate, pre, RANDOM) in ticket_keys:
                out.append(_series(cells, ds, rate, pre, RANDOM, "random", style.series_color(pre, RANDOM),
                                   f"{pre} rp"))
            dense = dense_series(ds, rate, pre)
            if dense is not None:
                out.append(dense)
        return out

    datasets = sorted({k[0] for k in ticket_keys})
    for ds in datasets:
        rates = sorted({k[1] for k in ticket_keys if k[0] == ds}, reverse=True)
        labels_all = sorted({k[3] for k in ticket_keys if k[0] == ds},
                            key=lambda m: common.order_key(m, common.METHOD_ORDER))
        main_labels = [m for m in labels_all if m != RANDOM] or labels_all
        # per dataset and data rate: one line per pretrain label
        for rate in rates:
            for label in main_labels:
                cols = pretrain_columns(ds, rate, label)
                if not any(s.kind != "dense" for s in cols):
                    continue
                name = f"curves_{common.safe_name(ds)}_{_rate_tag(rate)}_{common.safe_name(label)}"
                title = f"{ds}, {common.fmt_rate_percent(rate)} data, {label} tickets (mean ± std over seeds)"
                paths.append(draw_figure(out_dir, name, title, [("", cols)], supports, wins))
        # data rates side by side
        if len(rates) > 1:
            for label in main_labels:
                columns = [(f"{common.fmt_rate_percent(rate)} data", pretrain_columns(ds, rate, label)) for rate in rates]
                if sum(any(s.kind != "dense" for s in cols) for _, cols in columns) < 2:
                    continue
                name = f"data_rate_{common.safe_name(ds)}_{common.safe_name(label)}"
                title = f"{ds}: data rates, {label} tickets (mean ± std over seeds)"
                paths.append(draw_figure(out_dir, name, title, columns, supports, wins))
        # pruning methods of one pre-training
        for rate in rates:
            pretrains = sorted({k[2] for k in ticket_keys if k[0] == ds and k[1] == rate},
                               key=lambda p: common.order_key(p, common.PRETRAIN_ORDER))
            for pre in pretrains:
                labels = sorted({k[3] for k in ticket_keys if k[:3] == (ds, rate, pre)},
                                key=lambda m: common.order_key(m, common.METHOD_ORDER))
                if len(labels) < 2:
                    continue
                cols = [_series(cells, ds, rate, pre, lab, "random" if lab == RANDOM else "ticket",
                                style.method_color(lab), _method_name(cells, lab)) for lab in labels]
                dense = dense_series(ds, rate, pre, color="#000000")
                if dense is not None:
                    cols.append(dense)
                name = f"methods_{common.safe_name(ds)}_{_rate_tag(rate)}_{common.safe_name(pre)}"
                title = f"{ds}, {common.fmt_rate_percent(rate)} data, {pre} pre-training: pruning methods"
                paths.append(draw_figure(out_dir, name, title, [("", cols)], supports, wins))
    return paths


def level_wins(rows):
    """{(dataset, rate, pretrain, label): {level: double-win by the rule}} of every judged level."""
    return {(r["dataset"], float(r["data_rate"]), r["pretrain"], r["method"]): dict(r["wins"]) for r in rows}


def _method_name(cells, label):
    """Legend text: IMP with its re-training kind when the tickets tell it."""
    retrains = {r.retrain for k, c in cells.items() if k[3] == label for r in c.runs}
    if label.startswith("imp") and len(retrains) == 1 and None not in retrains:
        return f"imp (retrain {retrains.pop()})"
    return label


# --------------------------------------------------------------------------- entry point

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUNS_DIR", help="folders holding results.json files (searched recursively)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="folder for the table, figures and their data")
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    p.add_argument("--grid", default=None, metavar="GRID.toml",
                   help="the sweep's grid file: its runs are the expected set, and every one without a result "
                        "is listed (default: the levels of each ticket's sparsity.json and the seeds present)")
    p.add_argument("--mix-protocols", action="store_true",
                   help="draw and judge together runs of one group that differ in a protocol setting (epochs, lr, "
                        "ε, ...; docs/analysis.md lists them) with a warning, instead of refusing them")
    return p.parse_args(argv)



def _refuse_mixed_archs(runs):
    """A drawn line is (dataset, data rate, pretrain, method label) over its regimes: the architecture
    belongs to that key, so runs of two architectures are never one line, --mix-protocols or not."""
    archs = defaultdict(dict)
    for r in sorted(runs, key=lambda r: str(r.path)):
        archs[(r.dataset, r.data_rate, r.pretrain, r.label)].setdefault(r.arch, r.path.parent)
    for (ds, rate, pre, label), found in sorted(archs.items(), key=lambda kv: cell_sort_key(kv[0] + ("", 0.0))):
        if len(found) > 1:
            listed = " vs ".join(f"{a} (e.g. '{d}')" for a, d in sorted(found.items()))
            raise UserError(f"{group_text(ds, rate, pre, label)}: one line would mix architectures ({listed}); "
                            "analyse each architecture from its own folder, or use --no-figures for the table alone.")


def analyse(dirs, out_dir, figures=True, expected=None, grid_base=None, mix_protocols=False):
    """Everything main does, returning (table rows, warnings, figure paths); missing runs are warnings too.

    Runs of one group (dataset, data rate, pretrain, method, regime) that differ in a protocol setting
    (analysis.runs.PROTOCOL_KEYS) are refused before anything is written, unless ``mix_protocols``."""
    out_dir = Path(out_dir)
    result = collect(dirs, expected, grid_base)
    conflicts = result.protocol_conflicts
    if conflicts and not mix_protocols:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise UserError(f"runs of one group differ in their protocol: {conflicts[0]}{more}; pass runs of one protocol "
                        "(rerun the others, or analyse them from separate folders), or --mix-protocols to draw them "
                        "together anyway.")
    if figures:
        _refuse_mixed_archs(result.runs)
    result.warnings.extend(f"runs of one group differ in their protocol (--mix-protocols): {c}." for c in conflicts)
    warnings = write_tables(result, out_dir)
    paths = make_figures(result.cells, out_dir, level_supports(result.rows), level_wins(result.rows)) if figures else []
    return result.rows, warnings, paths


def main(argv=None):
    args = parse_args(argv)
    expected = grid_expected_runs(args.grid) if args.grid else None
    grid_base = Path(args.grid).resolve().parent if args.grid else None
    rows, warnings, paths = analyse(args.runs, args.out, figures=not args.no_figures, expected=expected,
                                    grid_base=grid_base, mix_protocols=args.mix_protocols)
    out = Path(args.out)
    print(common.markdown_table(rows, CSV_FIELDS), end="")
    if warnings:
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(f"\n{len(warnings)} warning(s), listed in {out / 'warnings.txt'} and double_win.md")
    print(f"\ntable: {out / 'double_win.csv'}  {out / 'double_win.md'}")
    for p in paths:
        print(f"figure: {p}  (data: {p.with_suffix('.csv')})")
    return 0


if __name__ == "__main__":
    from utils.cli import run_main

    sys.exit(run_main(main))
