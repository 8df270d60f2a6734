"""The stage-2 runs as the companion paper's figures read them, grouped into drawn cells.

Runs are read as the double-win table reads them (analysis/runs.py: same checks, same skipped runs,
same method labels: IMP becomes imp-st / imp-at when both re-training kinds are present, LMP
likewise), then split further by what the companion paper compares:

- the sparsity pattern of the run's ticket ("unstructured", "channel", "nm"), read from the ticket
  file with pruning_utils.load_ticket (a version-1 ticket is unstructured); a ticket run whose
  ticket file is gone or cannot be loaded is skipped with a warning, since its pattern is unknown;
- IMP's variant, the ticket's "rewind": "theta_p" (rewound every round), "epoch_K" (rewound to epoch
  K of the first re-training round) or "none"; stage 2's --random-reinit ablation is a method of its
  own ("imp-reinit");
- full fine-tuning vs linear evaluation (results.json config "linear_eval");
- the pretrain label (robust, e.g. at / fat, vs natural, std).

A cell is (dataset, data rate, pretrain, pattern, N:M, method, rewind, architecture, linear eval,
regime, sparsity); it is drawn as mean ± std over its seeds (sample std, ddof=1; 0 for one seed).
The architecture is part of every line's key, so ResNet-18 and ResNet-50 runs of one setting are two
lines (in figures of their own), never one average.
"""

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from analysis import common
from analysis.runs import DENSE, Cell, Run, assign_labels, check_attack_settings, csv_number
from analysis.runs import load_runs as read_runs
from utils.errors import UserError

EVAL_NAMES = {False: "full fine-tuning", True: "linear evaluation"}
REGIME_ORDER = ("st", "fat", "at")
PATTERN_ORDER = ("unstructured", "channel", "nm")
SUMMARY_FIELDS = ["dataset", "data_rate", "pretrain", "pattern", "nm", "method", "rewind", "linear_eval", "regime",
                  "sparsity", "n", "seeds", "complete", "sa_mean", "sa_std", "ra_mean", "ra_std", "arch"]


# --------------------------------------------------------------------------- reading

@dataclass
class CompanionRun:
    run: Run
    pattern: str        # "unstructured" | "channel" | "nm" | "dense"
    nm: str             # "2:4" for N:M tickets, "" otherwise
    rewind: str         # "theta_p" | "none" | "" for dense runs
    linear_eval: bool
    image_size: Optional[int]


def _ticket_path(obj, results_path):
    """(the ticket path a run names or None, the file: as written or relative to its run directory,
    None when neither exists)."""
    ticket = obj.get("ticket")
    if not ticket and isinstance(obj.get("config"), dict):
        ticket = obj["config"].get("ticket")
    if not isinstance(ticket, str) or not ticket or ticket.lower() == "none":
        return None, None
    path = Path(ticket)
    candidates = [path] if path.is_absolute() else [path, results_path.parent / path]
    return ticket, next((c for c in candidates if c.exists()), None)


def _read_pattern(path):
    """({pattern, nm, rewind} or None, problem or None) of one ticket file."""
    import pruning_utils

    try:
        ticket = pruning_utils.load_ticket(path)
    except UserError as exc:
        return None, str(exc)
    # a damaged file may fail inside torch in any way; it must not stop the analysis
    except Exception as exc:  # noqa: BLE001
        return None, f"'{path}' cannot be loaded ({exc.__class__.__name__}: {exc})"
    nm = ticket.get("nm")
    return {"pattern": ticket.get("pattern", "unstructured"), "rewind": ticket.get("rewind", "theta_p"),
            "nm": f"{nm[0]}:{nm[1]}" if ticket.get("pattern") == "nm" and nm else ""}, None


def _image_size(obj):
    cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    try:
        size = common.run_image_size(dict(cfg, dataset=cfg.get("dataset", obj["dataset"])))
    except Exception:  # noqa: BLE001 - an unknown dataset name only loses the size check of --bench
        return None
    return int(size) if isinstance(size, (int, float)) and not isinstance(size, bool) else None


def load_runs(dirs):
    """(companion runs, warnings) from every results.json under ``dirs``; UserError when none is usable."""
    base, warnings = read_runs(dirs, linear_eval=True)
    # the pattern and the rewind are dimensions of their own here, so labels are the method's alone
    # (no "_channel", no "-norewind"); the --random-reinit ablation stays a method of its own
    for r in base:
        r.family = r.method + ("-reinit" if r.family.endswith("-reinit") else "")
    assign_labels(base)
    cache, runs = {}, []
    for r in base:
        obj = r.results  # as analysis.runs read and checked it: one read per file
        cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        linear = cfg.get("linear_eval", False)
        if linear not in (True, False, None):
            warnings.append(f"skipped '{r.path}': config 'linear_eval' is {linear!r}, not true or false.")
            continue
        if r.dense:
            runs.append(CompanionRun(r, DENSE, "", "", bool(linear), _image_size(obj)))
            continue
        named, ticket = _ticket_path(obj, r.path)
        if ticket is None:
            what = f"its ticket '{named}' does not exist" if named else "it names no ticket file"
            warnings.append(f"skipped '{r.path}': {what}, so its sparsity pattern is unknown "
                            "(restore the ticket file or remove the run).")
            continue
        key = str(ticket.resolve())
        if key not in cache:
            cache[key] = _read_pattern(ticket)
        info, problem = cache[key]
        if problem:
            warnings.append(f"skipped '{r.path}': its ticket is unusable: {problem.rstrip('.')} "
                            "(restore the ticket file or remove the run).")
            continue
        runs.append(CompanionRun(r, info["pattern"], info["nm"], info["rewind"], bool(linear), _image_size(obj)))
    if not any(c.pattern != DENSE for c in runs):
        why = f" ({warnings[-1].rstrip('.')})" if warnings else ""
        raise UserError(f"no ticket run is usable, so there is nothing to draw{why}; pass directories of finished "
                        "main_downstream.py ticket runs whose ticket files still exist (run from the directory "
                        "their relative ticket paths start in).")
    return runs, warnings


# --------------------------------------------------------------------------- cells

@dataclass
class Stat:
    runs: list
    complete: bool = True

    @property
    def n(self):
        return len(self.runs)

    @property
    def seeds(self):
        return ";".join(r.run.seed for r in self.runs)

    def stat(self, metric):
        values = [getattr(r.run, metric) for r in self.runs]
        if not values or any(v is None for v in values):
            return math.nan, math.nan
        return common.agg_mean_std([float(v) for v in values])


# (dataset, rate, pretrain, pattern, nm, method label, rewind, arch): one drawn line
SeriesKey = tuple


def series_key(c):
    r = c.run
    return (r.dataset, r.data_rate, r.pretrain, c.pattern, c.nm, r.label, c.rewind, r.arch)


def describe(key):
    ds, rate, pre, pattern, nm, label, rewind, arch = key
    if label == DENSE:
        return f"{ds}, data rate {common.fmt_rate(rate)}, {arch}, pretrain {pre}, dense"
    variant = f" ({method_name('', rewind).strip()})" if rewind != "theta_p" else ""
    return (f"{ds}, data rate {common.fmt_rate(rate)}, {arch}, pretrain {pre}, {pattern}{' ' + nm if nm else ''} "
            f"{label}{variant}")


def build_cells(runs):
    """({series key: {(linear_eval, regime): {sparsity: Stat}}}, warnings).

    Runs that would be averaged must share their attack settings (analysis.runs' rule, UserError
    otherwise); a level with a duplicated seed, or with fewer seeds than the line's best level under
    the same evaluation mode, is drawn but marked incomplete and warned about.
    """
    grouped = defaultdict(list)
    for c in runs:
        grouped[(series_key(c), c.linear_eval, c.run.regime, c.run.sparsity)].append(c)
    # the double-win table's attack check, one of its cells per companion cell; the label names the split
    check_attack_settings({(k[0][0], k[0][1], k[0][2], _split_label(k[0], k[1]), k[2], k[3]):
                           Cell([c.run for c in v]) for k, v in grouped.items()})
    series = defaultdict(lambda: defaultdict(dict))
    for (skey, linear, regime, s), members in grouped.items():
        series[skey][(linear, regime)][s] = Stat(sorted(members, key=lambda c: seed_key(c.run.seed)))
    warnings = []
    for skey in sorted(series, key=series_sort_key):
        by_panel = series[skey]
        # seeds expected: the most any level of the line has under the same evaluation mode (linear
        # evaluation is a separate experiment, often run with other seeds than fine-tuning)
        expected = defaultdict(int)
        for (linear, _), levels in by_panel.items():
            for st in levels.values():
                expected[linear] = max(expected[linear], len({c.run.seed for c in st.runs}))
        for (linear, regime), levels in sorted(by_panel.items(), key=lambda kv: (kv[0][0], regime_key(kv[0][1]))):
            for s, st in sorted(levels.items()):
                seeds = [c.run.seed for c in st.runs]
                where = (f"{describe(skey)}, {EVAL_NAMES[linear]}, regime {regime}, "
                         + ("dense" if skey[5] == DENSE else f"level {common.fmt_sparsity(s)}%"))
                dup = sorted({x for x in seeds if seeds.count(x) > 1})
                if dup:
                    st.complete = False
                    warnings.append(f"{where}: more than one run of seed(s) {', '.join(dup)} "
                                    f"({', '.join(str(c.run.path) for c in st.runs if c.run.seed in dup)}); "
                                    "averaged as they are — remove the duplicates.")
                elif len(seeds) < expected[linear]:
                    st.complete = False
                    warnings.append(f"{where}: {len(seeds)} of {expected[linear]} seeds (seeds {', '.join(seeds)}); "
                                    "drawn with a black ring.")
                if any(c.run.ra is None for c in st.runs) and any(c.run.ra is not None for c in st.runs):
                    warnings.append(f"{where}: some runs have no RA, so no RA is drawn for it.")
    return {k: {p: dict(v) for p, v in d.items()} for k, d in series.items()}, warnings


def _split_label(key, linear):
    ds, rate, pre, pattern, nm, label, rewind, arch = key
    text = label if label == DENSE else f"{pattern_name(pattern, nm)} {method_name(label, rewind)}"
    return f"{text} {arch}" + (" (linear eval)" if linear else "")


def seed_key(seed):
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def regime_key(regime):
    return common.order_key(regime, REGIME_ORDER)


def series_sort_key(key):
    ds, rate, pre, pattern, nm, label, rewind, arch = key
    return (ds, -rate, arch, common.order_key(label, (DENSE,) + common.METHOD_ORDER + ("lmp",)),
            rewind != "theta_p", common.order_key(pattern, PATTERN_ORDER), nm,
            common.order_key(pre, common.PRETRAIN_ORDER))


def summary_rows(series):
    rows = []
    for key in sorted(series, key=series_sort_key):
        ds, rate, pre, pattern, nm, label, rewind, arch = key
        for (linear, regime), levels in sorted(series[key].items(), key=lambda kv: (kv[0][0], regime_key(kv[0][1]))):
            for s, st in sorted(levels.items()):
                sa, sa_std = st.stat("sa")
                ra, ra_std = st.stat("ra")
                rows.append({"dataset": ds, "data_rate": common.fmt_rate(rate), "pretrain": pre, "pattern": pattern,
                             "nm": nm, "method": label, "rewind": rewind, "linear_eval": linear, "regime": regime,
                             "sparsity": common.fmt_sparsity(s), "n": st.n, "seeds": st.seeds,
                             "complete": st.complete, "sa_mean": csv_number(sa), "sa_std": csv_number(sa_std),
                             "ra_mean": csv_number(ra), "ra_std": csv_number(ra_std),
                             "arch": arch})
    return rows


def method_name(label, rewind):
    """A method as legends and warnings name it: IMP without rewinding, or rewinding to epoch K of
    its first re-training round, says so."""
    from masks.ticket import rewind_epoch

    k = rewind_epoch(rewind)
    return f"{label} no-rewind" if rewind == "none" else f"{label} rew{k}" if k else label


def pattern_name(pattern, nm):
    """A sparsity pattern with its N:M, as legends and warnings name it."""
    return f"{pattern} {nm}" if nm else pattern
