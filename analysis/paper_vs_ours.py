"""The paper's numbers beside ours: one Markdown table per figure of the paper.

    python analysis/paper_vs_ours.py ANALYSIS_OUT_DIR [--paper FILE] [--out FILE] [--figure "Fig. 4" ...]

ANALYSIS_OUT_DIR is an ``--out`` directory of analysis/plot_curves.py; its double_win.csv
(docs/contracts.md §5) holds our extreme sparsities. FILE (default analysis/paper_numbers.toml)
holds the numbers the paper states, each with where it is stated. Written: paper_vs_ours.md in
ANALYSIS_OUT_DIR (or --out): per figure, every stated extreme sparsity beside ours (the extreme,
its contiguous and supported variants and the row's verdict) with the agreement, then the other
numbers the text states, which double_win.csv does not measure. Bad input is one line, exit 2.
"""

import math
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
REQUIRED = {EXTREME: ("dataset", "data_rate", "pretrain", "method", "value"),
            RANGE: ("datasets", "data_rate", "pretrain", "method", "value"),
            STATED: ("setting", "value")}
# plot_curves.py writes plain "imp" when the analysis holds IMP tickets of one re-training kind only;
# stage 1's default (standard re-training) is the reading taken here
ALIASES = {"imp-st": ("imp-st", "imp")}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "digits": "digits"}
PRETRAIN_NAMES = {"std": "θ_STD", "fat": "θ_FAT", "at": "θ_AT"}
METHOD_NAMES = {"imp": "IMP-ST", "imp-st": "IMP-ST", "imp-at": "IMP-AT", "omp": "OMP", "rp": "RP"}
SAME, NOT_MEASURED = "same", "not measured"
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
our `imp-st` row, or to `imp` where the analysis held IMP tickets of one re-training kind only."""


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
    else:
        ok = isinstance(value, str) or _is_number(value)
    if ok and kind != STATED:
        names = [entry["pretrain"], entry["method"]] + ([entry["dataset"]] if kind == EXTREME else entry["datasets"])
        ok = _is_number(entry["data_rate"]) and all(isinstance(n, str) and n for n in names)
    if not ok:
        raise UserError(f"{where} holds a bad value for kind {kind}: an extreme needs value = NUMBER, "
                        "data_rate = NUMBER and dataset, pretrain, method as strings; a range value = [LOW, HIGH] "
                        "and datasets = [...]; a stated number a string or number.")


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
    if text is None or text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"'{csv_path}' line {line}: {column} '{text}' is not a sparsity in percent; rerun "
                        "analysis/plot_curves.py to rewrite the table.")
    return value


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
    order = [SAME, "ours higher", "ours lower", "same or higher", "undecided", "mixed", NOT_MEASURED]
    present = [w for w in order if w in words] + sorted(set(words) - set(order))
    return ", ".join(f"{words.count(w)} {w}" for w in present)


def figure_section(figure, title, entries, table):
    lines = [f"## {figure}: {title}", ""]
    compared = [e for e in entries if e["kind"] != STATED]
    stated = [e for e in entries if e["kind"] == STATED]
    if compared:
        rows, agreements = zip(*(compared_row(e, table) for e in compared))
        lines += [f"{len(compared)} stated extreme sparsit{'y' if len(compared) == 1 else 'ies'}: "
                  f"{_tally(agreements)}.", "",
                  "| setting | paper | ours: extreme | contiguous | supported | verdict | agreement | source |",
                  "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    if stated:
        lines += ["Also stated (not a double-win extreme, so not compared here):" if compared
                  else "The text states no extreme sparsity here; the numbers it does state (not compared):", "",
                  "| setting | paper | source |", "| --- | ---: | --- |"]
        lines += [f"| {setting_text(e)} | {_cell(e['value'])} | {_source(e)} |" for e in stated]
        lines.append("")
    return lines


def render(figures, numbers, table, csv_path, only=None):
    """The text of paper_vs_ours.md."""
    lines = ["# The paper's numbers beside ours", "",
             "Paper: Chen et al., \"Data-Efficient Double-Win Lottery Tickets from Robust Pre-training\", ICML 2022.",
             f"Ours: `{csv_path}` ({len(table)} rows).", "", LEGEND, ""]
    for figure, title in figures.items():
        if only and figure not in only:
            continue
        entries = [e for e in numbers if e["figure"] == figure]
        if entries:
            lines += figure_section(figure, title, entries, table)
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
                   help="only this figure's table, as [figures] names it (e.g. \"Fig. 4\"); repeatable (default: every figure)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    figures, numbers = load_paper(args.paper)
    if args.figure:
        unknown = [f for f in args.figure if f not in figures]
        if unknown:
            raise UserError(f"--figure {unknown[0]!r} is not in '{args.paper}'; use one of "
                            f"{', '.join(repr(f) for f in figures)}.")
    csv_path = Path(args.analysis_dir) / "double_win.csv"
    table = read_double_win(args.analysis_dir)
    out = Path(args.out) if args.out else Path(args.analysis_dir) / "paper_vs_ours.md"
    if not out.parent.is_dir():
        raise UserError(f"--out '{out}': the folder '{out.parent}' does not exist; create it or choose another.")
    atomic_write_text(render(figures, numbers, table, csv_path, only=args.figure), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
