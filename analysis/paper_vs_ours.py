"""The paper's numbers beside ours: one Markdown table per figure of the paper.

    python analysis/paper_vs_ours.py ANALYSIS_OUT_DIR [--paper FILE] [--out FILE] [--figure "Fig. 4" ...]

ANALYSIS_OUT_DIR is an ``--out`` directory of analysis/plot_curves.py; its double_win.csv
(docs/contracts.md §5) holds our extreme sparsities. FILE (default analysis/paper_numbers.toml)
holds the numbers the paper states, each with where it is stated. Written: paper_vs_ours.md in
ANALYSIS_OUT_DIR (or --out): per figure, every stated extreme sparsity beside ours (the extreme,
its contiguous and supported variants and the row's verdict) with the agreement, then the other
numbers the text states. Those of them that the mask, landscape and robustness analyses measure
(kinds mask_iou_below, zero_kernels_order, transfer_attack) are compared with mask_iou.csv,
zero_kernels.csv (analysis/mask_stats.py) or robustness.csv (analysis/robustness.py) when
ANALYSIS_OUT_DIR holds them; analysis/study_report.py writes one file for a whole study with
``render_study``. Bad input is one line, exit 2.
"""

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.checkpoint import atomic_write_text  # noqa: E402
from utils.cli import ArgumentParser, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.records import read_table  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

DEFAULT_PAPER = Path(__file__).resolve().parent / "paper_numbers.toml"
COLUMNS = ("dataset", "data_rate", "pretrain", "method", "extreme_sparsity", "double_win_levels",
           "extreme_sparsity_contiguous", "verdict", "extreme_sparsity_supported")
EXTREME, RANGE, STATED = "extreme_sparsity", "extreme_sparsity_range", "stated"
IOU_BELOW, ZERO_ORDER, TRANSFER = "mask_iou_below", "zero_kernels_order", "transfer_attack"
SA_GAP = "sa_difference"
MEASURED = (IOU_BELOW, ZERO_ORDER, TRANSFER, SA_GAP)  # stated numbers one of the other analyses measures
REQUIRED = {EXTREME: ("dataset", "data_rate", "pretrain", "method", "value"),
            RANGE: ("datasets", "data_rate", "pretrain", "method", "value"),
            STATED: ("setting", "value"),
            IOU_BELOW: ("setting", "sparsity", "value"),
            ZERO_ORDER: ("setting", "sparsity", "value"),
            TRANSFER: ("setting", "dataset", "data_rate", "pretrain", "regime", "sparsity", "value"),
            SA_GAP: ("setting", "dataset", "regime", "sparsity", "data_rates", "pretrains", "value")}
# the analysis output each measured kind reads: (file, its columns used here, the tool that writes it)
OUTPUTS = {IOU_BELOW: ("mask_iou.csv", ("sparsity_a", "label_a", "label_b", "iou"), "analysis/mask_stats.py"),
           ZERO_ORDER: ("zero_kernels.csv", ("label", "sparsity", "zero_kernel_percent"), "analysis/mask_stats.py"),
           TRANSFER: ("robustness.csv", ("dataset", "pretrain", "sparsity", "regime", "data_rate", "seed",
                                         "n_images", "transfer_acc", "ra_pgd"),
                      "analysis/robustness.py --transfer-source"),
           SA_GAP: ("summary.csv", ("dataset", "data_rate", "pretrain", "method", "regime", "sparsity", "n",
                                    "sa_mean"), "analysis/plot_curves.py")}
CLOSE = 1.0  # points: a transfer-attack pair of accuracies within this of the paper's reads "close"
# plot_curves.py writes plain "imp" when the analysis holds IMP tickets of one re-training kind only;
# stage 1's default (standard re-training) is the reading taken here
ALIASES = {"imp-st": ("imp-st", "imp")}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "digits": "digits"}
PRETRAIN_NAMES = {"std": "θ_STD", "fat": "θ_FAT", "at": "θ_AT"}
METHOD_NAMES = {"imp": "IMP-ST", "imp-st": "IMP-ST", "imp-at": "IMP-AT", "omp": "OMP", "rp": "RP"}
SAME, NOT_MEASURED = "same", "not measured"
# the shipped grid files (script/grids/NAME.toml) -> the figure of the paper each reproduces
GRID_FIGURES = {"fig3": "Fig. 3", "fig4": "Fig. 4", "fig5": "Fig. 5", "fig6": "Figs. 2, 6, A9",
                "fig7": "Figs. 7, A8", "table_a2": "Table A2"}
LEGEND = """\
How to read the tables. **Paper**: the extreme sparsity (%) the text states: the largest sparsity at
which the ticket is double-win (matching the dense network of its pre-training in standard training's
SA and in adversarial training's SA and RA). **Ours** (from `double_win.csv`): `extreme` is the same
quantity, the value compared; `contiguous` the largest level with every level below it double-win too;
`supported` the largest level whose double-win holds in ≥ 90% of seed resamples; `verdict` is
`complete` (every run judged), `incomplete` (runs missing: an extreme shown is a lower bound) or
`no-baseline`. `none`: no ticket level is double-win, which the paper writes as 0.00%; `–`: no value.
**Agreement**: `same` (equal to 0.01 points), `ours higher` / `ours lower` (by the points shown),
`same or higher` / `undecided` where our extreme is only a lower bound, `mixed` where a range is wider
or narrower at both ends, `not measured` (no such row, or its extreme withheld). IMP-ST is matched to
our `imp-st` row, or to `imp` where the analysis held IMP tickets of one re-training kind only.
**Measured statements** (mask similarity, zero kernels, transfer attack, SA gaps) put our value beside
the paper's with its **support**: the seeds it averages (mean, and their standard deviation) or the masks
it compares (stage 1 makes one mask per pre-training and level, so these have no seeds). Their
agreement is `holds` / `does not hold` (a bound), `same order` / `other order` (a ranking), or `close`
(every accuracy or gap within 1 point) / `differs` (the differences in points, ours minus the paper's)."""


@dataclass
class Ours:
    """Our numbers for one setting; ``value`` is None when not measured (``why`` says why)."""

    value: Optional[float]
    extreme: str
    contiguous: str
    supported: str
    verdict: str
    why: str = ""
    bound: bool = False  # the extreme is a lower bound (the row is incomplete)


# --------------------------------------------------------------------------- reading

def _read_toml(path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"paper file '{path}' does not exist; pass --paper analysis/paper_numbers.toml.") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise UserError(f"paper file '{path}' is not a UTF-8 text file; pass a TOML file like "
                        "analysis/paper_numbers.toml.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"paper file '{path}' is not valid TOML ({exc}); fix the line it names.") from None


def _check_number(i, entry, figures, path):
    where = f"'{path}' [[number]] #{i + 1}"
    if not isinstance(entry, dict):
        raise UserError(f"{where} is not a table; write each number as a [[number]] table.")
    for key in ("figure", "kind", "source"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise UserError(f"{where} needs {key} = \"...\" (a non-empty string).")
    if entry["figure"] not in figures:
        raise UserError(f"{where} names figure '{entry['figure']}', which [figures] lacks; add it there.")
    kind = entry["kind"]
    if kind not in REQUIRED:
        raise UserError(f"{where} has kind '{kind}'; use one of {', '.join(REQUIRED)}.")
    missing = [k for k in REQUIRED[kind] if k not in entry]
    if missing:
        raise UserError(f"{where} (kind {kind}) lacks {', '.join(missing)}.")
    value = entry["value"]
    if kind == EXTREME:
        ok = _is_number(value)
    elif kind == RANGE:
        ok = (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)
              and value[0] <= value[1] and isinstance(entry["datasets"], list) and entry["datasets"])
    elif kind == IOU_BELOW:
        ok = _is_number(value) and _is_number(entry["sparsity"])
    elif kind == ZERO_ORDER:
        ok = (isinstance(value, list) and len(value) >= 2 and all(isinstance(v, str) and v for v in value)
              and _is_number(entry["sparsity"]))
    elif kind == SA_GAP:
        rates, pretrains = entry["data_rates"], entry["pretrains"]
        ok = (isinstance(rates, list) and rates and all(_is_number(r) for r in rates)
              and isinstance(value, list) and len(value) == len(rates) and all(_is_number(v) for v in value)
              and isinstance(pretrains, list) and len(pretrains) == 2 and all(isinstance(x, str) for x in pretrains)
              and _is_number(entry["sparsity"]))
    elif kind == TRANSFER:
        ok = (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)
              and _is_number(entry["sparsity"]) and _is_number(entry["data_rate"])
              and all(isinstance(entry[k], str) and entry[k] for k in ("dataset", "pretrain", "regime")))
    else:
        ok = isinstance(value, str) or _is_number(value)
    if ok and kind in (EXTREME, RANGE):
        names = [entry["pretrain"], entry["method"]] + ([entry["dataset"]] if kind == EXTREME else entry["datasets"])
        ok = _is_number(entry["data_rate"]) and all(isinstance(n, str) and n for n in names)
    if not ok:
        raise UserError(f"{where} holds a bad value for kind {kind}: an extreme needs value = NUMBER, "
                        "data_rate = NUMBER and dataset, pretrain, method as strings; a range value = [LOW, HIGH] "
                        "and datasets = [...]; a stated number a string or number; mask_iou_below value = "
                        "PERCENT and sparsity = NUMBER; zero_kernels_order value = [LABEL, LABEL, ...] (most zero "
                        "kernels first) and sparsity; transfer_attack value = [TRANSFER, RA] with dataset, "
                        "data_rate, pretrain, regime and sparsity; sa_difference value = [POINTS per data rate] "
                        "with data_rates = [...], pretrains = [A, B] and sparsity.")


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_paper(path):
    """({figure: title}, [number tables]) of a paper file, checked."""
    spec = _read_toml(path)
    figures = spec.get("figures")
    numbers = spec.get("number")
    if not isinstance(figures, dict) or not figures or not all(isinstance(t, str) for t in figures.values()):
        raise UserError(f"paper file '{path}' needs a [figures] table of \"FIGURE\" = \"title\" lines.")
    if not isinstance(numbers, list) or not numbers:
        raise UserError(f"paper file '{path}' holds no [[number]] tables; add the numbers the paper states.")
    for i, entry in enumerate(numbers):
        _check_number(i, entry, figures, path)
    return figures, numbers


def _sparsity(text, line, csv_path, column):
    return _number(text, csv_path, line, column, "a sparsity in percent",
                   "analysis/plot_curves.py to rewrite the table")


def read_double_win(out_dir):
    """{(dataset, data_rate, pretrain, method): row} of ``out_dir``/double_win.csv, checked."""
    path = Path(out_dir) / "double_win.csv"
    if not Path(out_dir).is_dir():
        raise UserError(f"'{out_dir}' is not a directory; pass the --out directory of analysis/plot_curves.py.")
    rows = read_table(path, COLUMNS, f"run analysis/plot_curves.py RUNS --out {out_dir} (this version) first")
    table = {}
    for line, row in enumerate(rows, start=2):
        try:
            rate = float(row["data_rate"])
        except (TypeError, ValueError):
            raise UserError(f"'{path}' line {line}: data_rate '{row['data_rate']}' is not a number.") from None
        for column in ("extreme_sparsity", "extreme_sparsity_contiguous", "extreme_sparsity_supported"):
            row[column] = _sparsity(row[column], line, path, column)
        key = (row["dataset"], _rate_key(rate), row["pretrain"], row["method"])
        if key in table:
            raise UserError(f"'{path}' line {line} repeats the row {', '.join(map(str, key))}; rerun "
                            "analysis/plot_curves.py to rewrite the table.")
        table[key] = row
    return table


def _rate_key(rate):
    return round(float(rate), 6)


def read_outputs(out_dir):
    """{file: rows} of the mask and robustness outputs in ``out_dir`` (OUTPUTS), each checked as the
    tool writes it; a file that is not there is left out."""
    outputs = {}
    for name, columns, tool in OUTPUTS.values():
        path = Path(out_dir) / name
        if name not in outputs and os.path.lexists(path):  # a directory or link there is refused by read_table
            rows = read_table(path, columns, f"rerun {tool} with --out {out_dir}")
            for line, row in enumerate(rows, start=2):
                for column in ("sparsity", "sparsity_a", "iou", "zero_kernel_percent", "data_rate", "transfer_acc",
                               "ra_pgd", "sa_mean"):
                    if column in columns:
                        row[column] = _float_cell(row[column], path, line, column, tool)
            outputs[name] = rows
    return outputs


def _float_cell(text, path, line, column, tool):
    """A number of an output table; empty (not measured, e.g. no transfer attack) is None."""
    return _number(text, path, line, column, "a number", f"{tool} to rewrite it")


def _number(text, path, line, column, what, rerun):
    """A table cell as a finite float, None where empty; anything else is one line naming the cell."""
    if text is None or text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"'{path}' line {line}: {column} '{text}' is not {what}; rerun {rerun}.")
    return value


# --------------------------------------------------------------------------- comparing

def ours_for(table, dataset, rate, pretrain, method):
    """Our numbers for one setting (an ``Ours``), matched by plot_curves.py's method labels."""
    row = None
    for label in ALIASES.get(method, (method,)):
        row = table.get((dataset, _rate_key(rate), pretrain, label))
        if row is not None:
            break
    if row is None:
        return Ours(None, "–", "–", "–", "–", why="no such row")
    verdict = row["verdict"] or "–"
    complete = verdict == "complete"
    extreme, contiguous, supported = (row["extreme_sparsity"], row["extreme_sparsity_contiguous"],
                                      row["extreme_sparsity_supported"])
    ours = Ours(extreme, _shown(extreme, complete), _shown(contiguous, complete), _shown(supported, complete),
                verdict, bound=verdict == "incomplete")
    if verdict not in ("complete", "incomplete"):
        ours.value = None
        ours.why = "no verdict: no dense baseline" if verdict == "no-baseline" else f"verdict '{verdict}'"
    elif extreme is None and complete:
        ours.value = 0.0  # no ticket level is double-win: the paper's 0.00%
    elif extreme is None:
        ours.why = "extreme withheld: runs missing"
    return ours


def _shown(value, complete):
    if value is None:
        return "none" if complete else "–"
    return f"{value:.2f}"


def agreement(paper, ours):
    """The agreement label of one stated extreme sparsity with ours."""
    if ours.value is None:
        return f"{NOT_MEASURED} ({ours.why})"
    diff = ours.value - paper
    if ours.bound:
        if diff > 0.005:
            return f"ours higher (+{diff:.2f}, at least)"
        return "same or higher (incomplete)" if abs(diff) <= 0.005 else "undecided (incomplete)"
    if abs(diff) <= 0.005:
        return SAME
    return f"ours higher (+{diff:.2f})" if diff > 0 else f"ours lower ({diff:.2f})"


def range_agreement(paper, ours):
    """Agreement of a stated [low, high] with ours, end by end."""
    if any(o.value is None for o in ours):
        why = "; ".join(sorted({o.why for o in ours if o.value is None}))
        return f"{NOT_MEASURED} ({why})"
    values = [o.value for o in ours]
    lo, hi = min(values), max(values)
    if any(o.bound for o in ours):
        return "undecided (incomplete)"
    d_lo, d_hi = lo - paper[0], hi - paper[1]
    if abs(d_lo) <= 0.005 and abs(d_hi) <= 0.005:
        return SAME
    if d_lo >= -0.005 and d_hi >= -0.005:
        return f"ours higher ({d_lo:+.2f} / {d_hi:+.2f})"
    if d_lo <= 0.005 and d_hi <= 0.005:
        return f"ours lower ({d_lo:+.2f} / {d_hi:+.2f})"
    return f"mixed ({d_lo:+.2f} / {d_hi:+.2f})"


def _span(texts):
    """'lo–hi' of per-dataset shown values, '–' where any is missing."""
    if not texts or "–" in texts:
        return "–"
    numbers = [0.0 if t == "none" else float(t) for t in texts]
    return f"{min(numbers):.2f}–{max(numbers):.2f}"


def _at_level(rows, column, sparsity):
    return [r for r in rows if r[column] is not None and abs(r[column] - float(sparsity)) <= 0.005]


def _pre(label):
    """A mask_stats label ('std', or 'std/std_imp_st' when two directories share it) in the paper's words."""
    return PRETRAIN_NAMES.get(label.split("/")[0], label)


def _missing_output(kind):
    name, _, tool = OUTPUTS[kind]
    return f"{NOT_MEASURED} (no {name}: run {tool})"


def measure_iou_below(entry, rows):
    """(ours, support, agreement) of 'every pair's mask IoU at this level is below VALUE percent'."""
    pairs = _at_level(rows, "sparsity_a", entry["sparsity"])
    if not pairs:
        return "–", "–", f"{NOT_MEASURED} (no pair of tickets at {float(entry['sparsity']):.2f}%)"
    values = [(100.0 * r["iou"], f"{_pre(r['label_a'])}–{_pre(r['label_b'])}") for r in pairs]
    top = max(v for v, _ in values)
    ours = f"max {top:.2f}% ({', '.join(f'{name} {v:.2f}' for v, name in values)})"
    support = f"{len(values)} pair{'s' if len(values) > 1 else ''} of masks, one per pre-training (no seeds)"
    bound = float(entry["value"])
    agree = "holds" if top < bound else f"does not hold (max {top - bound:+.2f} above)"
    return ours, support, agree


def measure_zero_order(entry, rows):
    """(ours, support, agreement) of 'the pre-trainings ranked by their zero kernels at this level'."""
    level = _at_level(rows, "sparsity", entry["sparsity"])
    share = {r["label"].split("/")[0]: r["zero_kernel_percent"] for r in level if r["zero_kernel_percent"] is not None}
    absent = [label for label in entry["value"] if label not in share]
    if absent:
        return "–", "–", (f"{NOT_MEASURED} (no {_pre(absent[0])} ticket at {float(entry['sparsity']):.2f}%)")
    ranked = sorted(entry["value"], key=lambda label: -share[label])
    ours = " > ".join(f"{_pre(label)} {share[label]:.2f}%" for label in ranked)
    support = f"share of zero kernels; {len(ranked)} masks, one per pre-training (no seeds)"
    return ours, support, "same order" if ranked == list(entry["value"]) else "other order"


def measure_transfer(entry, rows):
    """(ours, support, agreement) of one Table A2 row: mean transfer-attack and PGD accuracy over seeds."""
    import statistics

    runs = [r for r in _at_level(rows, "sparsity", entry["sparsity"])
            if r["dataset"] == entry["dataset"] and r["pretrain"] == entry["pretrain"]
            and r["regime"] == entry["regime"] and r["data_rate"] is not None
            and _rate_key(r["data_rate"]) == _rate_key(entry["data_rate"]) and r["transfer_acc"] is not None]
    if not runs:
        return "–", "–", f"{NOT_MEASURED} (no transfer-attack row at {float(entry['sparsity']):.2f}%)"
    means, sds = [], []
    for column in ("transfer_acc", "ra_pgd"):
        values = [r[column] for r in runs]
        means.append(statistics.fmean(values))
        sds.append(statistics.stdev(values) if len(values) > 1 else None)
    seeds = sorted({r["seed"] for r in runs})
    images = sorted({r["n_images"] for r in runs})
    spread = f", sd {sds[0]:.2f} / {sds[1]:.2f}" if sds[0] is not None else ""
    support = f"{len(runs)} seed{'s' if len(runs) > 1 else ''} ({', '.join(seeds)}{spread}); {'/'.join(images)} images"
    diffs = [m - float(v) for m, v in zip(means, entry["value"])]
    word = "close" if all(abs(d) <= CLOSE for d in diffs) else "differs"
    return f"{means[0]:.2f} / {means[1]:.2f}", support, f"{word} ({diffs[0]:+.2f} / {diffs[1]:+.2f})"


def measure_sa_gap(entry, rows):
    """(ours, support, agreement) of 'SA of pretrain A minus SA of pretrain B at this level, per data rate'
    from plot_curves.py's summary.csv (the IMP tickets' cells)."""
    a, b = entry["pretrains"]
    gaps, seeds = [], []
    for rate in entry["data_rates"]:
        cells = {r["pretrain"]: r for r in _at_level(rows, "sparsity", entry["sparsity"])
                 if (r["dataset"], r["regime"]) == (entry["dataset"], entry["regime"])
                 and r["method"] in ALIASES["imp-st"] and r["sa_mean"] is not None
                 and r["data_rate"] is not None and _rate_key(r["data_rate"]) == _rate_key(rate)}
        if a not in cells or b not in cells:
            missing = a if a not in cells else b
            return "–", "–", f"{NOT_MEASURED} (no {_pre(missing)} runs at {_rate_text(rate)} data)"
        gaps.append(cells[a]["sa_mean"] - cells[b]["sa_mean"])
        seeds.append(f"{cells[a]['n']}/{cells[b]['n']}")
    diffs = [g - float(v) for g, v in zip(gaps, entry["value"])]
    word = "close" if all(abs(d) <= CLOSE for d in diffs) else "differs"
    support = f"mean SA over seeds ({_pre(a)}/{_pre(b)}: {', '.join(seeds)} per data rate)"
    return (" / ".join(f"{g:+.2f}" for g in gaps), support,
            f"{word} ({' / '.join(f'{d:+.2f}' for d in diffs)})")


MEASURES = {IOU_BELOW: measure_iou_below, ZERO_ORDER: measure_zero_order, TRANSFER: measure_transfer,
            SA_GAP: measure_sa_gap}


def paper_text(entry):
    """The paper's side of a measured statement, as the table shows it."""
    value = entry["value"]
    if entry["kind"] == IOU_BELOW:
        return f"< {float(value):.2f}%"
    if entry["kind"] == ZERO_ORDER:
        return " > ".join(_pre(v) for v in value)
    if entry["kind"] == SA_GAP:
        return " / ".join(f"{float(v):+.2f}" for v in value)
    return f"{float(value[0]):.2f} / {float(value[1]):.2f}"


def measured_row(entry, outputs):
    """(markdown cells, agreement) of one measured statement, from the analysis outputs {file: rows}."""
    name = OUTPUTS[entry["kind"]][0]
    if outputs is None or name not in outputs:
        ours, support, agree = "–", "–", _missing_output(entry["kind"])
    else:
        ours, support, agree = MEASURES[entry["kind"]](entry, outputs[name])
    return [_cell(entry["setting"]), paper_text(entry), _cell(ours), _cell(support), agree, _source(entry)], agree


# --------------------------------------------------------------------------- writing

def _rate_text(rate):
    return f"{100.0 * float(rate):g}%"


def setting_text(entry):
    if entry["kind"] == STATED:
        return _cell(entry["setting"])
    data = entry.get("dataset") or ", ".join(DATASET_NAMES.get(d, d) for d in entry["datasets"])
    data = DATASET_NAMES.get(data, data)
    parts = [data, f"{_rate_text(entry['data_rate'])} data", PRETRAIN_NAMES.get(entry["pretrain"], entry["pretrain"]),
             METHOD_NAMES.get(entry["method"], entry["method"])]
    return " · ".join(parts)


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _source(entry):
    text = entry["source"]
    if entry.get("note"):
        text += f" — {entry['note']}"
    return _cell(text)


def compared_row(entry, table):
    """(markdown cells, agreement) of one extreme-sparsity or range entry."""
    if entry["kind"] == EXTREME:
        ours = ours_for(table, entry["dataset"], entry["data_rate"], entry["pretrain"], entry["method"])
        paper = f"{float(entry['value']):.2f}"
        agree = agreement(float(entry["value"]), ours)
        cells = [ours.extreme, ours.contiguous, ours.supported, ours.verdict]
    else:
        per = [ours_for(table, d, entry["data_rate"], entry["pretrain"], entry["method"]) for d in entry["datasets"]]
        lo, hi = (float(v) for v in entry["value"])
        paper = f"{lo:.2f}–{hi:.2f}"
        agree = range_agreement((lo, hi), per)
        cells = [_span([o.extreme for o in per]), _span([o.contiguous for o in per]),
                 _span([o.supported for o in per]), "/".join(sorted({o.verdict for o in per}))]
    return [setting_text(entry), paper, *cells, agree, _source(entry)], agree


def _tally(agreements):
    words = [a.split(" (")[0] for a in agreements]
    order = [SAME, "ours higher", "ours lower", "same or higher", "undecided", "mixed", "holds", "does not hold",
             "same order", "other order", "close", "differs", NOT_MEASURED]
    present = [w for w in order if w in words] + sorted(set(words) - set(order))
    return ", ".join(f"{words.count(w)} {w}" for w in present)


def figure_section(figure, title, entries, table, outputs=None, ours_from=None):
    """The Markdown lines of one figure; ``outputs`` ({file: rows}, read_outputs) serves the measured
    statements, ``ours_from`` (a line) says where our numbers come from."""
    lines = [f"## {figure}: {title}", ""] + ([ours_from, ""] if ours_from else [])
    compared = [e for e in entries if e["kind"] in (EXTREME, RANGE)]
    measured = [e for e in entries if e["kind"] in MEASURED]
    stated = [e for e in entries if e["kind"] == STATED]
    if measured:
        rows, agreements = zip(*(measured_row(e, outputs) for e in measured))
        lines += [f"{len(measured)} measured statement{'' if len(measured) == 1 else 's'}: {_tally(agreements)}.", "",
                  "| statement | paper | ours | support | agreement | source |",
                  "| --- | ---: | --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    if compared:
        rows, agreements = zip(*(compared_row(e, table) for e in compared))
        lines += [f"{len(compared)} stated extreme sparsit{'y' if len(compared) == 1 else 'ies'}: "
                  f"{_tally(agreements)}.", "",
                  "| setting | paper | ours: extreme | contiguous | supported | verdict | agreement | source |",
                  "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    if stated:
        lines += ["Also stated (not compared here):" if compared or measured
                  else "The text states no extreme sparsity here; the numbers it does state (not compared):", "",
                  "| setting | paper | source |", "| --- | ---: | --- |"]
        lines += [f"| {setting_text(e)} | {_cell(e['value'])} | {_source(e)} |" for e in stated]
        lines.append("")
    return lines


PAPER_LINE = "Paper: Chen et al., \"Data-Efficient Double-Win Lottery Tickets from Robust Pre-training\", ICML 2022."


def render(figures, numbers, table, csv_path, only=None, outputs=None):
    """The text of paper_vs_ours.md for one analysis directory."""
    read = ([f"`{csv_path}` ({len(table)} rows)"] if table or not outputs else []) + [
        f"`{Path(csv_path).parent / name}` ({len(rows)} rows)" for name, rows in (outputs or {}).items()]
    lines = ["# The paper's numbers beside ours", "", PAPER_LINE, f"Ours: {', '.join(read)}.", "", LEGEND, ""]
    for figure, title in figures.items():
        if only and figure not in only:
            continue
        entries = [e for e in numbers if e["figure"] == figure]
        if entries:
            lines += figure_section(figure, title, entries, table, outputs)
    return "\n".join(lines).rstrip("\n") + "\n"


def render_study(figures, numbers, sections, intro=()):
    """paper_vs_ours.md of a study: ``sections`` is [(figure, table, outputs, ours_from)], one per figure
    analysed, in order; ``intro`` lines go under the title."""
    lines = ["# The paper's numbers beside ours", "", PAPER_LINE, *intro, "", LEGEND, ""]
    for figure, table, outputs, ours_from in sections:
        entries = [e for e in numbers if e["figure"] == figure]
        lines += figure_section(figure, figures[figure], entries, table, outputs, ours_from)
        if not entries:
            lines += ["The text states no number for this figure; compare the drawings.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("analysis_dir", metavar="ANALYSIS_OUT_DIR",
                   help="an --out directory of analysis/plot_curves.py (it holds double_win.csv)")
    p.add_argument("--paper", default=str(DEFAULT_PAPER), metavar="FILE",
                   help="the paper's numbers (default: analysis/paper_numbers.toml)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="where to write the Markdown (default: ANALYSIS_OUT_DIR/paper_vs_ours.md)")
    p.add_argument("--figure", action="append", default=None, metavar="FIGURE",
                   help="only this figure's table, as [figures] names it (e.g. \"Fig. 4\") or by its grid file's "
                        "name (fig4); repeatable (default: every figure)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    figures, numbers = load_paper(args.paper)
    if args.figure:
        args.figure = [GRID_FIGURES.get(f, f) for f in args.figure]  # a grid's name stands for its figure
        unknown = [f for f in args.figure if f not in figures]
        if unknown:
            raise UserError(f"--figure {unknown[0]!r} is not in '{args.paper}'; use one of "
                            f"{', '.join(repr(f) for f in figures)}.")
    csv_path = Path(args.analysis_dir) / "double_win.csv"
    outputs = read_outputs(args.analysis_dir) if Path(args.analysis_dir).is_dir() else {}
    # a mask or robustness analysis has no double_win.csv; without either kind of output say what is missing
    table = read_double_win(args.analysis_dir) if os.path.lexists(csv_path) or not outputs else {}
    out = Path(args.out) if args.out else Path(args.analysis_dir) / "paper_vs_ours.md"
    if not out.parent.is_dir():
        raise UserError(f"--out '{out}': the folder '{out.parent}' does not exist; create it or choose another.")
    atomic_write_text(render(figures, numbers, table, csv_path, only=args.figure, outputs=outputs), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
