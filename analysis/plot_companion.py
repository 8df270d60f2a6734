"""Figures of the companion paper (Fu et al., "Robust Tickets Can Transfer Better", DAC 2023) from
the stage-2 results.json files, and accuracy against measured latency and FLOPs.

    python analysis/plot_companion.py RUNS_DIR [RUNS_DIR ...] --out OUT_DIR [--bench BENCH.json ...]

Runs are read and split into cells by analysis/companion_runs.py: by sparsity pattern, IMP's
rewind variant, architecture, full fine-tuning vs linear evaluation and pretrain label. Colours are
those of plot_curves (analysis/style.py): one per pretrain label x method family (IMP, OMP, LMP, RP,
dense), so robust and natural pre-training and the methods within each differ in colour; line style
and marker tell the method (or the pattern) apart as well. Each architecture gets figures of its own:
when one dataset and data rate hold runs of several architectures, every figure name below gains
"_<arch>" after the rate. A cell is drawn as mean ± std over its seeds; dense runs (sparsity 0) of the same
dataset, data rate, pretrain label, regime and evaluation mode are the horizontal line and band.

Figures (PNG, each with a CSV of every number it draws):

- companion_pattern_<dataset>_<rate>_<pattern>: every method of one pattern;
- companion_method_<dataset>_<rate>_<method>: one method (IMP variants apart) under every pattern
  it was run with (only when there are two or more);
  both lay out one row per (regime, metric) — SA, and RA where the runs evaluated it — and per
  evaluation mode two columns: all levels, and beside it a zoom on the levels in [90, 99] %.
  <name>.csv holds the full-range panels (dense lines included), <name>_zoom.csv the zoomed ones
  (ticket levels in [90, 99] only; the dense lines there are those of <name>.csv);
- companion_efficiency_<dataset>_<rate>_<bench>: with --bench, accuracy against the measured
  batch-1 latency and the FLOPs per image of the matching benchmarks/bench_inference.py variant,
  one figure per record; without --bench it is skipped with a note.

Matching a cell to a benchmark row (the benchmark times random-weight networks, whose speed
depends on the shape of the mask, not on the weights): the record's arch must be the runs' arch;
dense runs take the "dense" row; unstructured, channel and N:M tickets take the rows
"unstructured_S", "channel_S" and "nm_N:M" (the semi-structured kernels; its dense twin
"nm_N:M_masked" is never used) with the same N:M; among those, the row whose "sparsity" (percent of
conv weights masked, the measure tickets record) is nearest to the cell's level, when it lies
within --bench-tolerance points (default 2). Other cells are left out and counted in a warning. A
channel row's filters were chosen on random weights, so its per-layer widths only approximate
those of a trained ticket at the same sparsity; run the benchmark with --channel-sparsities set to
the tickets' filter levels for closer matches.

Also written: companion_summary.csv (every cell) and companion_warnings.txt. Bad input (no
results.json found, no usable ticket run, a missing directory or benchmark file, a file that is not
a bench_inference record, a latency, FLOP count or throughput that is negative or not finite) exits
with status 2 and one line, before anything is written.
"""

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as `python analysis/plot_companion.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import common, style  # noqa: E402
from analysis.companion_runs import (  # noqa: E402
    EVAL_NAMES,
    PATTERN_ORDER,
    SUMMARY_FIELDS,
    SeriesKey,
    build_cells,
    load_runs,
    method_name,
    pattern_name,
    regime_key,
    series_sort_key,
    summary_rows,
)
from analysis.runs import DENSE, csv_number  # noqa: E402
from utils.checkpoint import atomic_write_text  # noqa: E402
from utils.cli import ArgumentParser  # noqa: E402
from utils.errors import UserError  # noqa: E402

ZOOM = (90.0, 99.0)
DEFAULT_TOLERANCE = 2.0

# line style and marker per base method and per pattern, the same in every figure; colour is the
# (pretrain label, method family)'s (analysis/style.py), the same as in plot_curves' figures
METHOD_STYLES = {"imp": ("-", "o"), "omp": ("-", "^"), "lmp": ("-", "D"), "rp": (":", "x")}
NO_REWIND_STYLE = ("-.", "s")
REWIND_EPOCH_STYLE = ("--", "o")  # IMP rewound to epoch K of its first re-training round
REINIT_STYLE = (":", "P")  # stage 2's --random-reinit ablation: the mask on fresh weights
PATTERN_STYLES = {"unstructured": ("-", "o"), "channel": ("-.", "s"), "nm": (":", "^")}
FALLBACK_STYLES = (("--", "v"), ("--", "P"), ("--", "*"), ("--", "h"))

CURVE_FIELDS = ["figure", "panel", "range", "eval", "linear_eval", "regime", "metric", "series", "kind", "dataset",
                "arch", "data_rate", "pretrain", "pattern", "nm", "method", "rewind", "sparsity", "mean", "std", "n", "seeds",
                "complete"]
EFFICIENCY_FIELDS = ["figure", "panel", "axis", "x", "eval", "linear_eval", "regime", "metric", "series", "kind",
                     "dataset", "arch", "data_rate", "pretrain", "pattern", "nm", "method", "rewind", "sparsity", "mean", "std",
                     "n", "seeds", "complete", "bench_file", "bench_device", "bench_arch", "bench_variant",
                     "bench_sparsity", "sparsity_gap", "latency_ms", "flops_per_image", "throughput_images_per_s"]


# --------------------------------------------------------------------------- drawn lines

@dataclass
class Series:
    key: SeriesKey
    name: str
    color: str
    linestyle: str
    marker: str
    hollow: bool
    cells: dict  # (linear_eval, regime) -> {sparsity: Stat}

    @property
    def dense(self):
        return self.key[5] == DENSE


def _method_style(label, rewind):
    base = label.split("-")[0]
    if "-reinit" in label:
        return REINIT_STYLE
    if base == "imp" and rewind == "none":
        return NO_REWIND_STYLE
    if base == "imp" and rewind not in ("theta_p", ""):
        return REWIND_EPOCH_STYLE
    return METHOD_STYLES.get(base) or FALLBACK_STYLES[sum(map(ord, base)) % len(FALLBACK_STYLES)]


def make_series(cells, key, by):
    """The drawn line of ``key``; ``by`` is what varies within its figure: "method" or "pattern"."""
    ds, rate, pre, pattern, nm, label, rewind, arch = key
    color = style.series_color(pre, label)
    if label == DENSE:
        return Series(key, f"{pre} dense", color, "--", "", False, cells[key])
    if by == "method":
        ls, marker = _method_style(label, rewind)
        name = f"{pre} {method_name(label, rewind)}"
    else:
        ls, marker = PATTERN_STYLES.get(pattern) or FALLBACK_STYLES[0]
        name = f"{pre} {pattern_name(pattern, nm)}"
    # an IMP/LMP split by re-training kind keeps one style; the standard kind is drawn hollow
    return Series(key, name, color, ls, marker, label.endswith("-st"), cells[key])


def _dense_keys(cells, ds, rate, arch, pretrains):
    return [k for k in cells if k[5] == DENSE and k[0] == ds and k[1] == rate and k[7] == arch and k[2] in pretrains]


def _figure_groups(ticket_keys):
    """[(dataset, rate, arch, name tag, title prefix)]: one figure set per architecture; the arch joins
    the tag only when its dataset and rate hold several, so one-arch trees keep their names."""
    out = []
    for ds, rate in sorted({k[:2] for k in ticket_keys}, key=lambda dr: (dr[0], -dr[1])):
        archs = sorted({k[7] for k in ticket_keys if k[:2] == (ds, rate)})
        for arch in archs:
            tag = f"{common.safe_name(ds)}_rate{100 * rate:g}" + (f"_{common.safe_name(arch)}" if len(archs) > 1 else "")
            out.append((ds, rate, arch, tag, f"{ds}, {common.fmt_rate_percent(rate)} data, {arch}"))
    return out


def _panels(ticket_series, modes):
    """[(regime, metric)]: SA of every regime the tickets have, RA where any of their runs has it."""
    regimes = sorted({regime for s in ticket_series for (lin, regime) in s.cells if lin in modes}, key=regime_key)
    panels = []
    for regime in regimes:
        panels.append((regime, "sa"))
        if any(c.run.ra is not None for s in ticket_series for (lin, rg), levels in s.cells.items()
               if rg == regime and lin in modes for st in levels.values() for c in st.runs):
            panels.append((regime, "ra"))
    return panels


def _finish(fig, axes, title):
    common.figure_legend(fig, axes, ncol=5, y=-0.01)
    fig.suptitle(title, fontsize=11)
    height = fig.get_size_inches()[1]
    legend_rows = math.ceil(len({lab for ax in axes for lab in ax.get_legend_handles_labels()[1]}) / 5)
    fig.tight_layout(rect=(0, (0.25 + 0.22 * legend_rows) / height, 1, 1 - 0.35 / height))


def _row(fig_name, panel, ser, linear, regime, metric, s, mean, std, st):
    ds, rate, pre, pattern, nm, label, rewind, arch = ser.key
    return {"figure": fig_name, "panel": panel, "eval": "linear" if linear else "full", "linear_eval": linear,
            "regime": regime, "metric": metric, "series": ser.name, "kind": "dense" if ser.dense else "ticket",
            "dataset": ds, "arch": arch, "data_rate": common.fmt_rate(rate), "pretrain": pre,
            "pattern": "" if ser.dense else pattern, "nm": nm, "method": label, "rewind": rewind,
            "sparsity": common.fmt_sparsity(s), "mean": csv_number(mean), "std": csv_number(std), "n": st.n, "seeds": st.seeds,
            "complete": st.complete}


def in_zoom(s):
    return ZOOM[0] <= s <= ZOOM[1]


def _draw_curve_panel(ax, series_list, linear, regime, metric, zoom, fig_name, panel, rows):
    drawn = False
    for ser in series_list:
        levels = ser.cells.get((linear, regime), {})
        if ser.dense:
            st = levels.get(0.0)
            mean, std = st.stat(metric) if st is not None else (math.nan, math.nan)
            if math.isnan(mean):
                continue
            ax.axhline(mean, color=ser.color, ls="--", lw=1.2, label=ser.name)
            ax.axhspan(mean - std, mean + std, color=ser.color, alpha=0.10, lw=0)
            if not zoom:  # the same line in both panels; its numbers once, in the full-range CSV
                rows.append(_row(fig_name, panel, ser, linear, regime, metric, 0.0, mean, std, st) | {"range": "full"})
            continue
        pts = []
        for s in sorted(levels):
            if zoom and not in_zoom(s):
                continue
            mean, std = levels[s].stat(metric)
            if math.isnan(mean):
                continue
            pts.append((s, mean, std, levels[s].complete))
            rows.append(_row(fig_name, panel, ser, linear, regime, metric, s, mean, std, levels[s])
                        | {"range": "zoom" if zoom else "full"})
        if not pts:
            continue
        x = [p[0] for p in pts]
        ax.plot(x, [p[1] for p in pts], ls=ser.linestyle, marker=ser.marker, ms=4, lw=1.5, color=ser.color,
                mfc="white" if ser.hollow else ser.color, label=ser.name)
        ax.fill_between(x, [p[1] - p[2] for p in pts], [p[1] + p[2] for p in pts], color=ser.color, alpha=0.15, lw=0)
        bad = [p for p in pts if not p[3]]
        if bad:
            ax.plot([p[0] for p in bad], [p[1] for p in bad], ls="none", marker="o", ms=9, mfc="none", mec="black",
                    mew=1.1)
        drawn = True
    if zoom:
        ax.set_xlim(ZOOM[0] - 0.5, ZOOM[1] + 0.5)
        ax.set_xticks(range(int(ZOOM[0]), int(ZOOM[1]) + 1))
    else:
        ax.set_xlim(0, 100)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("sparsity (%)", fontsize=8)
    if not drawn:
        text = f"no levels in {ZOOM[0]:g}–{ZOOM[1]:g}%" if zoom else "no ticket runs"
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey", fontsize=8)


def draw_curves(out_dir, name, title, series_list):
    """One figure: rows (regime, metric), per evaluation mode a full-range and a zoomed column.

    Writes <name>.png, <name>.csv (full-range panels) and <name>_zoom.csv; returns the PNG path.
    """
    plt = common.use_agg()
    tickets = [s for s in series_list if not s.dense]
    modes = sorted({lin for s in tickets for (lin, _) in s.cells})
    panels = _panels(tickets, modes)
    columns = [(lin, zoom) for lin in modes for zoom in (False, True)]
    fig, axes = plt.subplots(len(panels), len(columns), figsize=(3.6 * len(columns), 2.9 * len(panels)),
                             squeeze=False)
    full_rows, zoom_rows = [], []
    for ri, (regime, metric) in enumerate(panels):
        for ci, (linear, zoom) in enumerate(columns):
            ax = axes[ri][ci]
            panel = f"{'linear' if linear else 'full'}_{regime}_{metric}" + ("_zoom" if zoom else "")
            _draw_curve_panel(ax, series_list, linear, regime, metric, zoom, name, panel,
                              zoom_rows if zoom else full_rows)
            span = f"{ZOOM[0]:g}–{ZOOM[1]:g}%" if zoom else "all levels"
            ax.set_title(f"{EVAL_NAMES[linear]}, {regime.upper()}: {metric.upper()} ({span})", fontsize=8)
            if ci == 0:
                ax.set_ylabel("accuracy (%)", fontsize=8)
    flat = [ax for row in axes for ax in row]
    if any(not st.complete for s in series_list for lv in s.cells.values() for st in lv.values()):
        from matplotlib.lines import Line2D

        flat[0].add_line(Line2D([], [], ls="none", marker="o", ms=9, mfc="none", mec="black",
                                label="incomplete seeds (see warnings)"))
    _finish(fig, flat, title)
    png = common.save_figure(fig, Path(out_dir) / f"{name}.png")
    common.write_csv(full_rows, Path(out_dir) / f"{name}.csv", CURVE_FIELDS)
    common.write_csv(zoom_rows, Path(out_dir) / f"{name}_zoom.csv", CURVE_FIELDS)
    return png


def _with_dense(series, ds, rate, arch, keys, by):
    """The lines of ``keys`` and the dense lines of their pretrain labels, in drawing order."""
    dense = sorted(_dense_keys(series, ds, rate, arch, {k[2] for k in keys}), key=series_sort_key)
    return [make_series(series, k, by) for k in sorted(keys, key=series_sort_key) + dense]


def curve_figures(series, out_dir):
    """The pattern and method figures of every dataset and data rate; returns their PNG paths."""
    paths = []
    ticket_keys = [k for k in series if k[5] != DENSE]
    for ds, rate, arch, tag, where in _figure_groups(ticket_keys):
        mine = [k for k in ticket_keys if k[:2] == (ds, rate) and k[7] == arch]
        patterns = sorted({(k[3], k[4]) for k in mine}, key=lambda p: (common.order_key(p[0], PATTERN_ORDER), p[1]))
        for pattern, nm in patterns:
            lines = _with_dense(series, ds, rate, arch, [k for k in mine if (k[3], k[4]) == (pattern, nm)], "method")
            name = f"companion_pattern_{tag}_{common.safe_name(pattern_name(pattern, nm).replace(' ', ''))}"
            title = f"{where}, {pattern_name(pattern, nm)} tickets: methods, robust vs natural pre-training"
            paths.append(draw_curves(out_dir, name, title, lines))
        methods = sorted({(k[5], k[6]) for k in mine},
                         key=lambda m: series_sort_key((ds, rate, "", "", "", *m, arch)))
        for label, rewind in methods:
            keys = [k for k in mine if (k[5], k[6]) == (label, rewind)]
            if len({(k[3], k[4]) for k in keys}) < 2:
                continue
            method = method_name(label, rewind)
            name = f"companion_method_{tag}_{common.safe_name(method.replace(' ', '_'))}"
            title = f"{where}, {method} tickets: sparsity patterns, robust vs natural pre-training"
            paths.append(draw_curves(out_dir, name, title, _with_dense(series, ds, rate, arch, keys, "pattern")))
    return paths


# --------------------------------------------------------------------------- benchmark records

@dataclass
class BenchRow:
    variant: str
    pattern: str          # "dense" | "unstructured" | "channel" | "nm"
    nm: str
    sparsity: float
    latency_ms: float
    flops: Optional[float]
    throughput: Optional[float]


@dataclass
class BenchRecord:
    path: Path
    tag: str
    device: str
    arch: str
    image_size: Optional[int]
    rows: list = field(default_factory=list)


_VARIANT = re.compile(r"^(?:(?P<dense>dense)|(?P<kind>unstructured|channel)_[0-9.]+|nm_(?P<nm>\d+:\d+))$")


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


MEASURES = ("latency_ms", "flops_per_image", "throughput_images_per_s")


def _check_measures(path, rows):
    """UserError naming the first measure that is there but no finite non-negative number: a
    negative time or FLOP count is a broken or hand-edited record, and drawing it would mislead.
    (null stays allowed: the benchmark writes it for FLOPs it could not count.)"""
    for r in rows:
        for key in MEASURES:
            value = r.get(key)
            if value is not None and not (_finite(value) and value >= 0):
                raise UserError(f"benchmark record '{path}' gives variant '{r['variant']}' the {key} {value!r}, not a "
                                "finite non-negative number; rerun benchmarks/bench_inference.py --json to write it "
                                "again.")


def load_bench(path):
    """A benchmarks/bench_inference.py record (its --json); UserError when the file is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"benchmark record '{path}' does not exist; pass the --json file of "
                        "benchmarks/bench_inference.py.")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"benchmark record '{path}' is not valid JSON ({exc.__class__.__name__}); pass the --json "
                        "file of benchmarks/bench_inference.py.") from None
    if (not isinstance(obj, dict) or not isinstance(obj.get("rows"), list) or not isinstance(obj.get("arch"), str)
            or not all(isinstance(r, dict) and isinstance(r.get("variant"), str) for r in obj["rows"])):
        raise UserError(f"'{path}' is not a record of benchmarks/bench_inference.py (it needs 'arch' and 'rows' with "
                        "a 'variant' each); pass that script's --json output.")
    _check_measures(path, obj["rows"])
    record = BenchRecord(path, common.safe_name(path.stem), str(obj.get("device", "unknown device")), obj["arch"],
                         obj.get("image_size") if _finite(obj.get("image_size")) else None)
    for r in obj["rows"]:
        found = _VARIANT.match(r["variant"])
        if not found or not _finite(r.get("latency_ms")):
            continue  # the 2:4 masked twin runs dense kernels: no ticket's deployed form
        if found["dense"]:
            pattern, sparsity = "dense", 0.0
        else:
            if not _finite(r.get("sparsity")):
                continue
            pattern, sparsity = ("nm" if found["nm"] else found["kind"]), float(r["sparsity"])
        record.rows.append(BenchRow(r["variant"], pattern, found["nm"] or "", sparsity, float(r["latency_ms"]),
                                    float(r["flops_per_image"]) if _finite(r.get("flops_per_image")) else None,
                                    float(r["throughput_images_per_s"])
                                    if _finite(r.get("throughput_images_per_s")) else None))
    if not record.rows:
        raise UserError(f"'{path}' holds no timed variant of benchmarks/bench_inference.py (dense, unstructured_S, "
                        "channel_S or nm_N:M with latency_ms and sparsity); rerun the benchmark.")
    return record


def match_bench(record, pattern, nm, sparsity, archs, tolerance):
    """(row, gap in points) of ``record`` for a cell, or None (rules in the module docstring)."""
    if archs != {record.arch}:
        return None
    best = None
    for row in record.rows:
        if row.pattern != pattern or row.nm != nm:
            continue
        gap = abs(row.sparsity - sparsity)
        if gap <= tolerance + 1e-9 and (best is None or gap < best[1]):
            best = (row, gap)
    return best


def _draw_efficiency_panel(ax, series_list, record, linear, regime, metric, axis, tolerance, fig_name, panel, rows,
                           unmatched):
    drawn = False
    for ser in series_list:
        levels = ser.cells.get((linear, regime), {})
        pts = []
        for s in sorted(levels):
            st = levels[s]
            mean, std = st.stat(metric)
            if math.isnan(mean):
                continue
            pattern = "dense" if ser.dense else ser.key[3]
            hit = match_bench(record, pattern, ser.key[4], s, {c.run.arch for c in st.runs}, tolerance)
            if hit is None:
                unmatched.add((ser.key, linear, regime, s))
                continue
            row, gap = hit
            x = row.latency_ms if axis == "latency_ms" else row.flops
            if x is None:
                continue
            pts.append((x, mean, std))
            rows.append(_row(fig_name, panel, ser, linear, regime, metric, s, mean, std, st)
                        | {"axis": axis, "x": x, "bench_file": str(record.path), "bench_device": record.device,
                           "bench_arch": record.arch, "bench_variant": row.variant,
                           "bench_sparsity": common.fmt_sparsity(row.sparsity), "sparsity_gap": round(gap, 4),
                           "latency_ms": row.latency_ms, "flops_per_image": row.flops,
                           "throughput_images_per_s": row.throughput})
        if not pts:
            continue
        pts.sort()
        scale = 1e9 if axis == "flops_per_image" else 1.0
        xs = [p[0] / scale for p in pts]
        if ser.dense:
            ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], ls="none", marker="*", ms=10,
                        color=ser.color, capsize=2, label=ser.name)
        else:
            ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], ls=ser.linestyle, marker=ser.marker, ms=4,
                        lw=1.3, color=ser.color, mfc="white" if ser.hollow else ser.color, capsize=2, label=ser.name)
        drawn = True
    ax.set_xlabel("latency, batch 1 (ms)" if axis == "latency_ms" else "GFLOPs per image", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no cell matches a benchmark row", ha="center", va="center", transform=ax.transAxes,
                color="grey", fontsize=8)
    return drawn


def efficiency_figures(series, records, out_dir, tolerance):
    """Per (dataset, data rate, arch) and benchmark record: accuracy vs latency and vs FLOPs. (paths, warnings)"""
    plt = common.use_agg()
    paths, warnings = [], []
    ticket_keys = [k for k in series if k[5] != DENSE]
    for ds, rate, arch, tag, where in _figure_groups(ticket_keys):
        keys = sorted((k for k in ticket_keys if k[:2] == (ds, rate) and k[7] == arch), key=series_sort_key)
        keys += sorted(_dense_keys(series, ds, rate, arch, {k[2] for k in keys}), key=series_sort_key)
        # every pattern and method on one axes: colour the pretrain label and method family, line
        # style the pattern, marker the method
        lines = []
        for k in keys:
            ser = make_series(series, k, "method")
            if not ser.dense:
                ser.name = f"{ser.name} ({pattern_name(k[3], k[4])})"
                ser.linestyle = (PATTERN_STYLES.get(k[3]) or FALLBACK_STYLES[0])[0]
            lines.append(ser)
        tickets = [s for s in lines if not s.dense]
        modes = sorted({lin for s in tickets for (lin, _) in s.cells})
        panels = _panels(tickets, modes)
        for record in records:
            name = f"companion_efficiency_{tag}_{record.tag}"
            columns = [(lin, axis) for lin in modes for axis in ("latency_ms", "flops_per_image")]
            fig, axes = plt.subplots(len(panels), len(columns), figsize=(3.8 * len(columns), 2.9 * len(panels)),
                                     squeeze=False)
            rows, unmatched, any_drawn = [], set(), False
            for ri, (regime, metric) in enumerate(panels):
                for ci, (linear, axis) in enumerate(columns):
                    ax = axes[ri][ci]
                    panel = f"{'linear' if linear else 'full'}_{regime}_{metric}_{axis}"
                    any_drawn |= _draw_efficiency_panel(ax, lines, record, linear, regime, metric, axis, tolerance,
                                                        name, panel, rows, unmatched)
                    ax.set_title(f"{EVAL_NAMES[linear]}, {regime.upper()}: {metric.upper()}", fontsize=8)
                    if ci == 0:
                        ax.set_ylabel("accuracy (%)", fontsize=8)
            archs = sorted({c.run.arch for s in lines for lv in s.cells.values() for st in lv.values()
                            for c in st.runs})
            if not any_drawn:
                plt.close(fig)
                warnings.append(f"{ds}, data rate {common.fmt_rate(rate)}, {arch}: no cell matches a row of '{record.path}' "
                                f"(record arch {record.arch}, runs {', '.join(archs)}; tolerance {tolerance:g} "
                                "points), so its efficiency figure is not drawn.")
                continue
            if unmatched:
                listed = sorted({f"{pattern_name(k[3], k[4]) if k[5] != DENSE else 'dense'} "
                                 f"{common.fmt_sparsity(s)}%" for k, _, _, s in unmatched})
                warnings.append(f"{ds}, data rate {common.fmt_rate(rate)}, {arch}: {len(unmatched)} cell(s) have no row of "
                                f"'{record.path}' within {tolerance:g} points of their level and arch "
                                f"{record.arch} and are left out of {name} ({'; '.join(listed[:8])}"
                                f"{'; ...' if len(listed) > 8 else ''}).")
            sizes = {c.image_size for s in lines for lv in s.cells.values() for st in lv.values() for c in st.runs
                     if c.image_size is not None}
            if record.image_size is not None and sizes and sizes != {record.image_size}:
                warnings.append(f"'{record.path}' timed {record.image_size} px inputs but the runs of {ds} use "
                                f"{', '.join(map(str, sorted(sizes)))} px; rerun the benchmark with --image-size "
                                "to match before reading absolute latencies.")
            title = (f"{where}: accuracy vs cost on {record.device} "
                     f"({record.arch}, {record.path.name})")
            _finish(fig, [ax for row in axes for ax in row], title)
            paths.append(common.save_figure(fig, Path(out_dir) / f"{name}.png"))
            common.write_csv(rows, Path(out_dir) / f"{name}.csv", EFFICIENCY_FIELDS)
    return paths, warnings


# --------------------------------------------------------------------------- entry point

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUNS_DIR",
                   help="folders holding results.json files (searched recursively)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="folder for the figures and their data")
    p.add_argument("--bench", nargs="+", default=[], metavar="BENCH.json",
                   help="records of benchmarks/bench_inference.py --json: adds accuracy vs latency / FLOPs figures")
    p.add_argument("--bench-tolerance", type=float, default=DEFAULT_TOLERANCE, metavar="POINTS",
                   help="largest gap in sparsity points between a level and the benchmark row it takes "
                        f"(default {DEFAULT_TOLERANCE:g})")
    return p.parse_args(argv)


def analyse(dirs, out_dir, bench=(), tolerance=DEFAULT_TOLERANCE):
    """Everything main does: returns (figure paths, warnings, notes)."""
    if not (_finite(tolerance) and tolerance >= 0):
        raise UserError(f"--bench-tolerance {tolerance} is not a non-negative number of sparsity points; pass e.g. 2.")
    records = [load_bench(p) for p in bench]  # every input checked before anything is written
    runs, warnings = load_runs(dirs)
    series, cell_warnings = build_cells(runs)
    warnings += cell_warnings
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_csv(summary_rows(series), out_dir / "companion_summary.csv", SUMMARY_FIELDS)
    paths = curve_figures(series, out_dir)
    notes = []
    if records:
        more, bench_warnings = efficiency_figures(series, records, out_dir, tolerance)
        paths += more
        warnings += bench_warnings
    else:
        notes.append("no --bench record given: the accuracy vs latency / FLOPs figure is skipped (run "
                     "benchmarks/bench_inference.py --json FILE and pass --bench FILE).")
    atomic_write_text("".join(w + "\n" for w in warnings), out_dir / "companion_warnings.txt")
    return paths, warnings, notes


def main(argv=None):
    args = parse_args(argv)
    paths, warnings, notes = analyse(args.runs, args.out, args.bench, args.bench_tolerance)
    out = Path(args.out)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for n in notes:
        print(f"note: {n}")
    if warnings:
        print(f"{len(warnings)} warning(s), listed in {out / 'companion_warnings.txt'}")
    print(f"cells: {out / 'companion_summary.csv'}")
    for p in paths:
        zoom = p.with_name(p.stem + "_zoom.csv")
        extra = f", zoom: {zoom}" if zoom.exists() else ""
        print(f"figure: {p}  (data: {p.with_suffix('.csv')}{extra})")
    return 0


if __name__ == "__main__":
    from utils.cli import run_main

    sys.exit(run_main(main))
