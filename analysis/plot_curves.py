"""SA/RA-vs-sparsity curves and the double-win table from downstream results (DESIGN §5.5).

    python analysis/plot_curves.py RUNS_DIR [RUNS_DIR ...] --out OUT_DIR

Reads every results.json under the directories.  A group is (dataset, data rate, pretrain label,
method); its baseline for a regime is the dense runs (method "dense" or sparsity 0) of the same dataset, data
rate, pretrain label and regime.  Each (group, regime, sparsity) cell is reported as mean ± std
over its seeds, std being the sample standard deviation (ddof=1) for two or more seeds and 0 for
one.  A ticket's metric is matching when its mean ≥ dense mean − one dense std (compared with a
1e-9 tolerance so that equality survives float rounding).  A level is double-win when SA under
ST and SA and RA under AT are all matching; the extreme sparsity is the largest such level.

Method labels: the results' "method"; when the IMP runs of the analysis use tickets of more than
one re-training kind (read from the ticket's stage-1 config.json or the ticket file, when they
still exist), IMP runs become "imp-st" / "imp-at" so the two are never averaged together.

Never averaged over fewer runs: a level with fewer seeds than the most any level of its group has
(or a duplicated seed, or an AT run without RA) is not judged; a group whose dense baseline is
missing, short of seeds, or mixes architectures with its tickets gets no verdict (empty
extreme_sparsity).  Each case is a warning, printed, written to warnings.txt and listed under
the table in double_win.md.

Outputs in OUT_DIR: double_win.csv, double_win.md, double_win_details.csv (the per-level
comparison behind the verdict), summary.csv (every cell), warnings.txt, and PNG figures each
with a CSV of the data drawn: curves_* (per dataset and data rate, one line per pretrain label),
data_rate_* (data rates side by side), methods_* (pruning methods of one pre-training).
Bad input (no results.json found, a missing directory, no readable results) exits with status 2.
"""

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as `python analysis/plot_curves.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import common  # noqa: E402
from utils.checkpoint import atomic_write_text  # noqa: E402
from utils.errors import UserError  # noqa: E402

TABLE_FIELDS = ["dataset", "data_rate", "pretrain", "method", "extreme_sparsity", "double_win_levels"]
SUMMARY_FIELDS = ["dataset", "data_rate", "pretrain", "method", "regime", "sparsity", "n", "seeds", "complete",
                  "sa_mean", "sa_std", "ra_mean", "ra_std", "arch"]
LEVEL_FIELDS = ["dataset", "data_rate", "pretrain", "method", "sparsity", "judged", "double_win",
                "st_sa_mean", "st_sa_std", "dense_st_sa_mean", "dense_st_sa_std", "st_sa_matching",
                "at_sa_mean", "at_sa_std", "dense_at_sa_mean", "dense_at_sa_std", "at_sa_matching",
                "at_ra_mean", "at_ra_std", "dense_at_ra_mean", "dense_at_ra_std", "at_ra_matching", "note"]
FIGURE_FIELDS = ["figure", "panel", "regime", "metric", "series", "kind", "dataset", "data_rate", "pretrain", "method",
                 "sparsity", "x_position", "mean", "std", "n", "complete"]
CORE_PANELS = (("st", "sa"), ("at", "sa"), ("at", "ra"))
DENSE = "dense"
RANDOM = "rp"
_TOL = 1e-9


@dataclass
class Run:
    path: Path
    dataset: str
    data_rate: float
    pretrain: str
    method: str
    regime: str
    sparsity: float
    seed: str
    sa: float
    ra: Optional[float]
    arch: str
    retrain: Optional[str] = None
    label: str = ""

    @property
    def dense(self):
        return self.method == DENSE


@dataclass
class Cell:
    """The runs of one (dataset, data rate, pretrain, method label, regime, sparsity)."""

    runs: list
    expected: int = 0
    problems: list = field(default_factory=list)

    @property
    def n(self):
        return len(self.runs)

    @property
    def complete(self):
        return not self.problems

    def stat(self, metric):
        values = [getattr(r, metric) for r in self.runs]
        if any(v is None for v in values):
            return math.nan, math.nan
        return common.agg_mean_std([float(v) for v in values])


# --------------------------------------------------------------------------- reading

def _ticket_retrain(obj, results_path, cache):
    """The ticket's re-training kind ("st"/"at"), or None when it cannot be known."""
    ticket = obj.get("ticket")
    if not ticket and isinstance(obj.get("config"), dict):
        ticket = obj["config"].get("ticket")
    if not isinstance(ticket, str) or not ticket or ticket.lower() == "none":
        return None
    path = Path(ticket)
    candidates = [path] if path.is_absolute() else [path, results_path.parent / path]
    for cand in candidates:
        if not cand.is_file():
            continue
        key = str(cand.resolve())
        if key not in cache:
            cache[key] = _read_retrain(cand, obj["method"])
        return cache[key]
    return None


def _read_retrain(ticket_path, method):
    # stage 1 writes SAVE_DIR/tickets/round_XX.pt beside SAVE_DIR/config.json: reading the small
    # config avoids loading every mask of a ResNet-50 ticket just for one field
    stage1 = ticket_path.parent.parent / "config.json"
    try:
        cfg = json.loads(stage1.read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and cfg.get("method") == method and cfg.get("retrain") in ("st", "at"):
            return cfg["retrain"]
    except (OSError, ValueError):
        pass
    import pruning_utils

    try:
        retrain = pruning_utils.load_ticket(ticket_path).get("retrain")
    except UserError:
        return None
    return retrain if retrain in ("st", "at") else None


def load_runs(dirs):
    """(runs, warnings) from every results.json under ``dirs``; UserError when none is usable."""
    paths = common.find_result_files(dirs)
    good, warnings = common.read_results(paths)
    if not good:
        raise UserError(f"none of the {len(paths)} results.json files found is usable ({warnings[0]}); "
                        "pass directories of finished main_downstream.py runs.")
    cache, runs = {}, []
    for path, obj in good:
        method = DENSE if common.is_dense(obj) else obj["method"]
        runs.append(Run(path=path, dataset=obj["dataset"], data_rate=round(float(obj["data_rate"]), 6),
                        pretrain=obj["pretrain"], method=method, regime=obj["regime"],
                        sparsity=0.0 if method == DENSE else round(float(obj["sparsity"]), 2),
                        seed=str(obj["seed"]), sa=float(obj["sa"]),
                        ra=None if obj["ra"] is None else float(obj["ra"]), arch=obj["arch"],
                        retrain=_ticket_retrain(obj, path, cache) if method != DENSE else None))
    assign_labels(runs)
    return runs, warnings


def assign_labels(runs):
    """Method label per run: the method, plus the re-training kind where one method has several."""
    kinds = defaultdict(set)
    for r in runs:
        if r.retrain is not None:
            kinds[r.method].add(r.retrain)
    for r in runs:
        split = len(kinds[r.method]) > 1 and r.retrain is not None
        r.label = f"{r.method}-{r.retrain}" if split else r.method


# --------------------------------------------------------------------------- aggregation

def _where(dataset, rate, pretrain, label, regime=None):
    parts = [dataset, f"data rate {common.fmt_rate(rate)}", f"pretrain {pretrain}", f"method {label}"]
    if regime:
        parts.append(f"regime {regime}")
    return ", ".join(parts)


def build_cells(runs):
    """{(dataset, rate, pretrain, label, regime, sparsity): Cell} with incompleteness recorded, and warnings."""
    cells = defaultdict(list)
    for r in runs:
        cells[(r.dataset, r.data_rate, r.pretrain, r.label, r.regime, r.sparsity)].append(r)
    cells = {k: Cell(sorted(v, key=lambda r: r.seed)) for k, v in cells.items()}
    warnings = []

    # expected seeds: the most any level of the group has, over all its regimes; dense
    # baselines are compared among the dense runs of the same dataset, rate and pretrain
    expected = defaultdict(int)
    for (ds, rate, pre, label, _regime, _s), cell in cells.items():
        expected[(ds, rate, pre, label)] = max(expected[(ds, rate, pre, label)], len({r.seed for r in cell.runs}))
    for key in sorted(cells, key=_cell_sort_key):
        ds, rate, pre, label, regime, s = key
        cell = cells[key]
        cell.expected = expected[(ds, rate, pre, label)]
        level = "dense baseline" if label == DENSE else f"level {common.fmt_sparsity(s)}%"
        where = _where(ds, rate, pre, label, regime)
        seeds = [r.seed for r in cell.runs]
        dup = sorted({s_ for s_ in seeds if seeds.count(s_) > 1})
        if dup:
            cell.problems.append("duplicate seeds")
            files = ", ".join(str(r.path) for r in cell.runs if r.seed in dup)
            warnings.append(f"{where}: {level} has more than one run of seed(s) {', '.join(dup)} ({files}); "
                            "it is not averaged or judged — remove the duplicates.")
        elif len(seeds) < cell.expected:
            cell.problems.append("missing seeds")
            warnings.append(f"{where}: {level} has {len(seeds)} of {cell.expected} seeds (seeds {', '.join(seeds)}); "
                            "it is drawn as incomplete and not judged double-win.")
        if regime in ("at", "fat") and any(r.ra is None for r in cell.runs):
            cell.problems.append("no RA")
            missing = ", ".join(str(r.path) for r in cell.runs if r.ra is None)
            warnings.append(f"{where}: {level} has runs without RA ({missing}); it is not judged double-win.")
    return cells, warnings


def _cell_sort_key(key):
    ds, rate, pre, label, regime, s = key
    return (ds, -rate, common.order_key(pre, common.PRETRAIN_ORDER),
            common.order_key(label, (DENSE,) + common.METHOD_ORDER), common.order_key(regime, ("st", "at", "fat")), s)


def groups_of(cells):
    """Sorted (dataset, rate, pretrain, label) of every ticket group (dense runs are baselines)."""
    keys = {k[:4] for k in cells if k[3] != DENSE}
    return sorted(keys, key=lambda g: (g[0], -g[1], common.order_key(g[2], common.PRETRAIN_ORDER),
                                       common.order_key(g[3], common.METHOD_ORDER)))


def _matching(mean, dense_mean, dense_std):
    if any(math.isnan(v) for v in (mean, dense_mean, dense_std)):
        return False
    return mean >= dense_mean - dense_std - _TOL * max(1.0, abs(dense_mean))


def judge(cells):
    """(table rows, per-level rows, warnings): the double-win verdict of every group."""
    rows, level_rows, warnings = [], [], []
    for group in groups_of(cells):
        ds, rate, pre, label = group
        where = _where(*group)
        levels = sorted({k[5] for k in cells if k[:4] == group})
        base = {regime: cells.get((ds, rate, pre, DENSE, regime, 0.0)) for regime in ("st", "at")}
        n_seeds = cells_expected(cells, group)
        reasons = []
        for regime in ("st", "at"):
            if base[regime] is None:
                reasons.append(f"no dense baseline for regime {regime} (dense runs of {ds}, data rate "
                               f"{common.fmt_rate(rate)}, pretrain {pre})")
            elif not base[regime].complete:
                reasons.append(f"its regime-{regime} dense baseline is incomplete ({', '.join(base[regime].problems)})")
            elif base[regime].n < n_seeds:
                reasons.append(f"its regime-{regime} dense baseline has {base[regime].n} seeds, fewer than the "
                               f"{n_seeds} of its tickets")
            elif base[regime].n > n_seeds:
                reasons.append(f"its tickets have {n_seeds} seeds, fewer than the "
                               f"{base[regime].n} of its regime-{regime} dense baseline")
        archs = sorted({r.arch for k, c in cells.items() if k[:4] == group for r in c.runs}
                       | {r.arch for c in base.values() if c is not None for r in c.runs})
        if len(archs) > 1:
            reasons.append(f"its runs mix architectures ({', '.join(archs)})")
        group_regimes = {k[4] for k in cells if k[:4] == group}
        for regime in ("st", "at"):
            if regime not in group_regimes:
                reasons.append(f"it has no ticket runs under regime {regime}")
        if reasons:
            warnings.append(f"{where}: no double-win verdict because {'; '.join(reasons)}.")
        elif n_seeds < 2:
            warnings.append(f"{where}: judged on a single seed, so the dense std is 0 and matching means "
                            "ticket ≥ dense exactly; run 3 seeds (as the paper) for a verdict that allows for noise.")

        wins, judged = [], []
        for s in levels:
            st, at = cells.get(group + ("st", s)), cells.get(group + ("at", s))
            row = {"dataset": ds, "data_rate": common.fmt_rate(rate), "pretrain": pre, "method": label,
                   "sparsity": common.fmt_sparsity(s), "judged": False, "double_win": False, "note": ""}
            notes = []
            for regime, metric, cell, b in (("st", "sa", st, base["st"]), ("at", "sa", at, base["at"]),
                                            ("at", "ra", at, base["at"])):
                mean, std = cell.stat(metric) if cell is not None else (math.nan, math.nan)
                dmean, dstd = b.stat(metric) if b is not None else (math.nan, math.nan)
                row.update({f"{regime}_{metric}_mean": _num(mean), f"{regime}_{metric}_std": _num(std),
                            f"dense_{regime}_{metric}_mean": _num(dmean), f"dense_{regime}_{metric}_std": _num(dstd),
                            f"{regime}_{metric}_matching": _matching(mean, dmean, dstd)})
            for regime, cell in (("st", st), ("at", at)):
                if cell is None:
                    notes.append(f"no {regime} runs")
                elif not cell.complete:
                    notes.append(f"{regime}: {', '.join(cell.problems)}")
            if reasons:
                notes.append("no verdict for the group")
            if st is not None and at is not None and st.complete and at.complete and not reasons:
                row["judged"] = True
                judged.append(s)
                row["double_win"] = row["st_sa_matching"] and row["at_sa_matching"] and row["at_ra_matching"]
                if row["double_win"]:
                    wins.append(s)
            for regime, cell in (("st", st), ("at", at)):
                # a regime the group lacks altogether was reported once above
                if cell is None and regime in group_regimes:
                    warnings.append(f"{where}: level {common.fmt_sparsity(s)}% has no regime-{regime} runs; "
                                    "it is not judged double-win.")
            row["note"] = "; ".join(notes)
            level_rows.append(row)
        rows.append({"dataset": ds, "data_rate": common.fmt_rate(rate), "pretrain": pre, "method": label,
                     "extreme_sparsity": common.fmt_sparsity(max(wins)) if wins else "",
                     "double_win_levels": ";".join(common.fmt_sparsity(s) for s in wins),
                     "incomplete": _incompleteness(reasons, wins, [s for s in levels if s not in judged])})
    return rows, level_rows, warnings


def _incompleteness(reasons, wins, unjudged):
    """What a table row cannot say by itself: '' when every level of the group was judged."""
    if reasons:
        return "no verdict (see warnings)"
    if not unjudged:
        return ""
    listed = ", ".join(common.fmt_sparsity(s) for s in unjudged)
    if any(s > max(wins, default=-1.0) for s in unjudged):
        return f"levels {listed} not judged, so the extreme sparsity may be higher"
    return f"levels {listed} not judged"


def cells_expected(cells, group):
    return max((c.expected for k, c in cells.items() if k[:4] == group), default=0)


def _num(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 6)


def summary_rows(cells):
    rows = []
    for key in sorted(cells, key=_cell_sort_key):
        ds, rate, pre, label, regime, s = key
        c = cells[key]
        sa, sa_std = c.stat("sa")
        ra, ra_std = c.stat("ra")
        rows.append({"dataset": ds, "data_rate": common.fmt_rate(rate), "pretrain": pre, "method": label,
                     "regime": regime, "sparsity": common.fmt_sparsity(s), "n": c.n,
                     "seeds": ";".join(r.seed for r in c.runs), "complete": c.complete,
                     "sa_mean": _num(sa), "sa_std": _num(sa_std), "ra_mean": _num(ra), "ra_std": _num(ra_std),
                     "arch": ";".join(sorted({r.arch for r in c.runs}))})
    return rows


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


def _draw_panel(ax, series_list, regime, metric, xs, fig_name, panel, data_rows):
    pos = {s: i for i, s in enumerate(xs)}
    drawn = False
    for ser in series_list:
        by_s = ser.cells.get(regime, {})
        if not by_s:
            continue
        if ser.kind == "dense":
            cell = by_s.get(0.0)
            mean, std = cell.stat(metric)
            if math.isnan(mean):
                continue
            ax.axhline(mean, color=ser.color, ls="--", lw=1.3, label=ser.name)
            ax.axhspan(mean - std, mean + std, color=ser.color, alpha=0.12, lw=0)
            data_rows.append(_figure_row(fig_name, panel, regime, metric, ser, 0.0, "", mean, std, cell))
            drawn = True
            continue
        pts = []
        for s in sorted(by_s):
            mean, std = by_s[s].stat(metric)
            if math.isnan(mean) or s not in pos:
                continue
            pts.append((pos[s], mean, std, by_s[s].complete))
            data_rows.append(_figure_row(fig_name, panel, regime, metric, ser, s, pos[s], mean, std, by_s[s]))
        if not pts:
            continue
        x = [p[0] for p in pts]
        m = [p[1] for p in pts]
        lo = [p[1] - p[2] for p in pts]
        hi = [p[1] + p[2] for p in pts]
        ls = ":" if ser.kind == "random" else "-"
        ax.plot(x, m, ls=ls, marker="o", ms=3.5, lw=1.6, color=ser.color, label=ser.name)
        ax.fill_between(x, lo, hi, color=ser.color, alpha=0.18, lw=0)
        bad = [p for p in pts if not p[3]]
        if bad:
            ax.plot([p[0] for p in bad], [p[1] for p in bad], ls="none", marker="o", ms=8, mfc="none",
                    mec="black", mew=1.2)
        drawn = True
    ax.set_title(f"{regime.upper()}: {metric.upper()}", fontsize=10)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([common.fmt_sparsity(s) for s in xs], rotation=60, fontsize=7)
    ax.set_xlim(-0.5, max(len(xs) - 0.5, 0.5))
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="grey")
    return drawn


def _figure_row(fig_name, panel, regime, metric, ser, s, x, mean, std, cell):
    return {"figure": fig_name, "panel": panel, "regime": regime, "metric": metric, "series": ser.name,
            "kind": ser.kind, "dataset": ser.dataset, "data_rate": common.fmt_rate(ser.data_rate),
            "pretrain": ser.pretrain, "method": ser.method, "sparsity": common.fmt_sparsity(s), "x_position": x,
            "mean": _num(mean), "std": _num(std), "n": cell.n, "complete": cell.complete}


def _levels(series_list):
    return sorted({s for ser in series_list if ser.kind != "dense" for c in ser.cells.values() for s in c})


def _legend(fig, axes):
    handles, labels, seen = [], [], set()
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in seen:
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, -0.02))


def _has_incomplete(series_list):
    return any(not c.complete for ser in series_list for by_s in ser.cells.values() for c in by_s.values())


def draw_figure(out_dir, name, title, columns):
    """``columns``: list of (column title, series list); rows are the (regime, metric) panels."""
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
    data_rows = []
    for pi, (regime, metric) in enumerate(panels):
        for ci, (col_title, series_list) in enumerate(columns):
            ax = grid[pi][ci]
            panel = f"{regime}_{metric}" + (f"_{col_title}" if ncol > 1 else "")
            # one set of levels for every column, so data rates side by side line up
            _draw_panel(ax, series_list, regime, metric, _levels(all_series), name, panel, data_rows)
            if ncol > 1:
                ax.set_title(f"{col_title} — {regime.upper()}: {metric.upper()}", fontsize=9)
            if ci == 0 or ncol == 1:
                ax.set_ylabel("accuracy (%)", fontsize=9)
            ax.set_xlabel("sparsity (%)", fontsize=8)
    flat = [ax for row in grid for ax in row]
    if _has_incomplete(all_series):
        from matplotlib.lines import Line2D

        flat[0].add_line(Line2D([], [], ls="none", marker="o", ms=8, mfc="none", mec="black",
                                label="fewer seeds (see warnings)"))
    _legend(fig, flat)
    fig.suptitle(title, fontsize=11)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0.4 / height, 1, 1 - 0.3 / height))
    png = common.save_figure(fig, out_dir / f"{name}.png")
    common.write_csv(data_rows, out_dir / f"{name}.csv", FIGURE_FIELDS)
    return png


def _rate_tag(rate):
    return f"rate{100 * rate:g}"


def make_figures(cells, out_dir):
    paths = []
    ticket_keys = {k[:4] for k in cells if k[3] != DENSE}

    def dense_series(ds, rate, pre, color=None):
        return _series(cells, ds, rate, pre, DENSE, "dense", color or common.pretrain_color(pre), f"{pre} dense")

    def pretrain_columns(ds, rate, label):
        out = []
        pretrains = sorted({k[2] for k in ticket_keys if k[0] == ds and k[1] == rate and k[3] == label},
                           key=lambda p: common.order_key(p, common.PRETRAIN_ORDER))
        for pre in pretrains:
            color = common.pretrain_color(pre)
            main = _series(cells, ds, rate, pre, label, "random" if label == RANDOM else "ticket", color,
                           f"{pre} {label}")
            out.append(main)
            if label != RANDOM and (ds, rate, pre, RANDOM) in ticket_keys:
                out.append(_series(cells, ds, rate, pre, RANDOM, "random", color, f"{pre} rp"))
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
                paths.append(draw_figure(out_dir, name, title, [("", cols)]))
        # data rates side by side
        if len(rates) > 1:
            for label in main_labels:
                columns = [(f"{common.fmt_rate_percent(rate)} data", pretrain_columns(ds, rate, label)) for rate in rates]
                if sum(any(s.kind != "dense" for s in cols) for _, cols in columns) < 2:
                    continue
                name = f"data_rate_{common.safe_name(ds)}_{common.safe_name(label)}"
                title = f"{ds}: data rates, {label} tickets (mean ± std over seeds)"
                paths.append(draw_figure(out_dir, name, title, columns))
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
                                common.method_color(lab), _method_name(cells, lab)) for lab in labels]
                dense = dense_series(ds, rate, pre, color="#000000")
                if dense is not None:
                    cols.append(dense)
                name = f"methods_{common.safe_name(ds)}_{_rate_tag(rate)}_{common.safe_name(pre)}"
                title = f"{ds}, {common.fmt_rate_percent(rate)} data, {pre} pre-training: pruning methods"
                paths.append(draw_figure(out_dir, name, title, [("", cols)]))
    return paths


def _method_name(cells, label):
    """Legend text: IMP with its re-training kind when the tickets tell it."""
    retrains = {r.retrain for k, c in cells.items() if k[3] == label for r in c.runs}
    if label.startswith("imp") and len(retrains) == 1 and None not in retrains:
        return f"imp (retrain {retrains.pop()})"
    return label


# --------------------------------------------------------------------------- entry point

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUNS_DIR", help="folders holding results.json files (searched recursively)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="folder for the table, figures and their data")
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    return p.parse_args(argv)


def incomplete_markdown(rows):
    """The rows whose verdict is missing or partial, so the table is never read as more than it says."""
    flagged = [r for r in rows if r.get("incomplete")]
    if not flagged:
        return ""
    lines = ["", "## Incomplete rows", ""]
    lines += [f"- {r['dataset']}, data rate {r['data_rate']}, pretrain {r['pretrain']}, method {r['method']}: "
              f"{r['incomplete']}" for r in flagged]
    return "\n".join(lines) + "\n"


def notes_markdown(warnings):
    lines = ["", "## Notes", "",
             "- mean ± std over seeds; std is the sample standard deviation (ddof=1), 0 for a single seed "
             "(a single-seed group is judged and warned about).",
             "- matching: ticket mean ≥ dense mean − one dense std (same dataset, data rate, pretrain label "
             "and regime). double-win: matching SA under ST and matching SA and RA under AT.",
             "- extreme_sparsity: the largest double-win level; empty when no level is double-win or the "
             "group has no verdict (see the warnings).",
             "- levels with missing seeds are never averaged into a verdict; double_win_details.csv lists "
             "every level with its comparison."]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def analyse(dirs, out_dir, figures=True):
    """Everything main does, returning (table rows, warnings, figure paths)."""
    out_dir = Path(out_dir)
    runs, warnings = load_runs(dirs)
    cells, cell_warnings = build_cells(runs)
    rows, level_rows, verdict_warnings = judge(cells)
    warnings = warnings + cell_warnings + verdict_warnings
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_csv(rows, out_dir / "double_win.csv", TABLE_FIELDS)
    atomic_write_text("# Double-win tickets\n\n" + common.markdown_table(rows, TABLE_FIELDS)
                      + incomplete_markdown(rows) + notes_markdown(warnings), out_dir / "double_win.md")
    common.write_csv(level_rows, out_dir / "double_win_details.csv", LEVEL_FIELDS)
    common.write_csv(summary_rows(cells), out_dir / "summary.csv", SUMMARY_FIELDS)
    atomic_write_text("".join(w + "\n" for w in warnings), out_dir / "warnings.txt")
    paths = make_figures(cells, out_dir) if figures else []
    return rows, warnings, paths


def main(argv=None):
    args = parse_args(argv)
    rows, warnings, paths = analyse(args.runs, args.out, figures=not args.no_figures)
    out = Path(args.out)
    print(common.markdown_table(rows, TABLE_FIELDS), end="")
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
