"""SA/RA-vs-sparsity curves and the double-win table from downstream results (DESIGN §5.5).

    python analysis/plot_curves.py RUNS_DIR [RUNS_DIR ...] --out OUT_DIR [--grid GRID.toml]

Reads every results.json under the directories.  A group is (dataset, data rate, pretrain label,
method); its baseline for a regime is the dense runs (method "dense" or sparsity 0) of the same dataset, data
rate, pretrain label and regime.  Each (group, regime, sparsity) cell is reported as mean ± std
over its seeds, std being the sample standard deviation (ddof=1) for two or more seeds and 0 for
one.  The verdict itself — matching, double-win, the extremes and their support under seed
resampling — is analysis/verdict.py; this script reads, groups, checks and draws.

Method labels: the results' "method"; when the IMP runs of the analysis use tickets of more than
one re-training kind (read from the ticket's stage-1 config.json or the ticket file, when they
still exist), IMP runs become "imp-st" / "imp-at" so the two are never averaged together.

Expected runs: every level listed in the sparsity.json of a ticket's stage-1 directory
(SAVE_DIR/tickets/round_XX.pt -> SAVE_DIR/sparsity.json), or every run of ``--grid`` (through
script/sweep.py's expected_runs), under ST and AT, for every seed present in the group or its dense
baseline.  Each expected run without a result is listed (warning, warnings.txt, double_win.md); a
level missing a run is not judged, and a row with an unjudged level at or below its extreme gets no
extreme (verdict "incomplete").  Rows never change because runs are missing in another group.

Never averaged over fewer runs: a level with fewer seeds than the most any level of its group has
(or a duplicated seed, or an AT run without RA) is not judged; a group whose dense baseline is
missing, short of seeds, or mixes architectures with its tickets gets no verdict (empty
extreme_sparsity, verdict "no-baseline").  Each case is a warning, printed, written to warnings.txt
and listed under the table in double_win.md.  Runs of one cell trained or tested with different ε,
α or attack steps are refused (exit 2); a results.json with SA/RA outside [0, 100] or whose ticket
file exists but is not a torch file is skipped with a warning.

Outputs in OUT_DIR: double_win.csv (the six §5.5 columns, then extreme_sparsity_contiguous, verdict,
extreme_sparsity_supported), double_win.md (the same table, the per-level verdicts with their
support, uncertain cells marked '?', missing runs), double_win_details.csv (the per-level comparison
and the support of each comparison and of the level's double-win), summary.csv (every cell),
warnings.txt, and PNG figures each with a CSV of the data drawn: curves_* (per dataset and data
rate, one line per pretrain label; hollow markers at levels whose double-win is uncertain),
data_rate_* (data rates side by side), methods_* (pruning methods of one pre-training).
``verdict_rows(dirs, expected=None)`` returns the double_win.csv rows without writing anything.
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

from analysis import common, verdict  # noqa: E402
from utils.checkpoint import atomic_write_text  # noqa: E402
from utils.cli import ArgumentParser  # noqa: E402
from utils.errors import UserError  # noqa: E402

TABLE_FIELDS = ["dataset", "data_rate", "pretrain", "method", "extreme_sparsity", "double_win_levels"]
# appended after the six contract columns, in this order (DESIGN §5.5)
EXTRA_FIELDS = ["extreme_sparsity_contiguous", "verdict", "extreme_sparsity_supported"]
CSV_FIELDS = TABLE_FIELDS + EXTRA_FIELDS
SUMMARY_FIELDS = ["dataset", "data_rate", "pretrain", "method", "regime", "sparsity", "n", "seeds", "complete",
                  "sa_mean", "sa_std", "ra_mean", "ra_std", "arch"]
LEVEL_FIELDS = ["dataset", "data_rate", "pretrain", "method", "sparsity", "judged", "double_win",
                "st_sa_mean", "st_sa_std", "dense_st_sa_mean", "dense_st_sa_std", "st_sa_matching",
                "at_sa_mean", "at_sa_std", "dense_at_sa_mean", "dense_at_sa_std", "at_sa_matching",
                "at_ra_mean", "at_ra_std", "dense_at_ra_mean", "dense_at_ra_std", "at_ra_matching", "note",
                "st_sa_support", "at_sa_support", "at_ra_support", "double_win_support", "support"]
FIGURE_FIELDS = ["figure", "panel", "regime", "metric", "series", "kind", "dataset", "data_rate", "pretrain", "method",
                 "sparsity", "x_position", "mean", "std", "n", "complete", "double_win_support"]
CORE_PANELS = (("st", "sa"), ("at", "sa"), ("at", "ra"))
DENSE = "dense"
RANDOM = "rp"


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
    family: str = ""  # the method, plus the sparsity pattern of a structured ticket (pruning_utils.ticket_family)
    label: str = ""
    attack: dict = field(default_factory=dict)
    stage1: Optional[Path] = None

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

def _ticket_candidates(obj, results_path):
    """Where the ticket a run names may be (as written, or relative to its run directory); [] for dense."""
    ticket = obj.get("ticket")
    if not ticket and isinstance(obj.get("config"), dict):
        ticket = obj["config"].get("ticket")
    if not isinstance(ticket, str) or not ticket or ticket.lower() == "none":
        return []
    path = Path(ticket)
    return [path] if path.is_absolute() else [path, results_path.parent / path]


def _stage1_dir(candidates):
    """The stage-1 save dir of SAVE_DIR/tickets/round_XX.pt (DESIGN §5.2) holding sparsity.json, or None."""
    for cand in candidates:
        if cand.parent.name == "tickets" and (cand.parent.parent / "sparsity.json").is_file():
            return cand.parent.parent
    return None


def _ticket_retrain(ticket_path, method, cache):
    """(re-training kind "st"/"at" or None, problem or None) of a run's ticket file.

    A ticket file that is gone leaves the kind unknown (the run stands: tickets may be moved after
    training); one that exists but is not a readable torch file is a problem, and the run is skipped.
    """
    if ticket_path is None or not ticket_path.exists():
        return None, None
    key = str(ticket_path.resolve())
    if key not in cache:
        cache[key] = _read_retrain(ticket_path, method)
    return cache[key]


def _ticket_family(ticket_path, method, cache):
    """The ticket's family (pruning_utils.ticket_family): from the stage-1 config.json beside its
    tickets/ when there is one (an older config without 'pattern' is unstructured), else from the file."""
    import pruning_utils

    if ticket_path is None or not ticket_path.exists():
        return method
    key = ("family", str(ticket_path.resolve()))
    if key not in cache:
        family = None
        try:
            cfg = json.loads((ticket_path.parent.parent / "config.json").read_text(encoding="utf-8"))
            if isinstance(cfg, dict) and cfg.get("method") == method:
                family = pruning_utils.ticket_family(method, cfg.get("pattern"), cfg.get("nm"))
        except (OSError, ValueError):
            pass
        if family is None:
            try:
                t = pruning_utils.load_ticket(ticket_path)
                family = pruning_utils.ticket_family(method, t.get("pattern"), t.get("nm"))
            except Exception:  # noqa: BLE001 - _ticket_retrain already reported an unreadable file
                family = method
        cache[key] = family
    return cache[key]


def _torch_file_problem(path):
    """Why ``path`` cannot be a torch.save file, or None: a cheap look at its first bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        return f"cannot be read ({exc.__class__.__name__}: {exc})"
    if not head:
        return "is empty"
    # torch.save writes a zip archive; files from before torch 1.6 are a bare pickle (protocol 2+)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        return "is not a torch file"
    return None


def _read_retrain(ticket_path, method):
    # only the first bytes are checked when the stage-1 config names the kind: loading every
    # ResNet-50 ticket in full would cost more than the analysis itself
    problem = _torch_file_problem(ticket_path) if ticket_path.is_file() else "is not a file"
    if problem:
        return None, problem
    # stage 1 writes SAVE_DIR/tickets/round_XX.pt beside SAVE_DIR/config.json: reading the small
    # config avoids loading every mask of a ResNet-50 ticket just for one field
    stage1 = ticket_path.parent.parent / "config.json"
    try:
        cfg = json.loads(stage1.read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and cfg.get("method") == method and cfg.get("retrain") in ("st", "at"):
            return cfg["retrain"], None
    except (OSError, ValueError):
        pass
    import pruning_utils

    try:
        retrain = pruning_utils.load_ticket(ticket_path).get("retrain")
    except UserError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - a damaged file may fail inside torch in any way; it must not stop the analysis
        return None, f"cannot be loaded ({exc.__class__.__name__}: {exc})"
    return (retrain if retrain in ("st", "at") else None), None


ATTACK_KEYS = ("eps", "alpha", "train_steps", "test_eps", "test_alpha", "test_steps")
TRAIN_ATTACK_KEYS = ("eps", "alpha", "train_steps")


def _attack_settings(obj):
    """The attack settings a run's numbers depend on: {key: value} for those its results record.

    ST trains without an attack, so only the test attack counts for it.  Unrecorded settings (older
    results) are left out rather than guessed, so they never conflict.
    """
    cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    out = {}
    for key in ATTACK_KEYS:
        if obj["regime"] == "st" and key in TRAIN_ATTACK_KEYS:
            continue
        value = cfg.get(key, obj.get(key))
        if key == "test_eps" and value is None:
            value = cfg.get("eps", obj.get("eps"))  # main_downstream.py: --test-eps defaults to --eps
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = round(float(value), 9)
    return out


def load_runs(dirs, linear_eval=False):
    """(runs, warnings) from every results.json under ``dirs``; UserError when none is usable.

    The double-win verdict is about fine-tuning, so runs made with ``--linear-eval`` are left out
    (counted in a warning) unless ``linear_eval`` is True (plot_companion.py draws them apart)."""
    paths = common.find_result_files(dirs)
    good, warnings = common.read_results(paths)
    if not good:
        raise UserError(f"none of the {len(paths)} results.json files found is usable ({warnings[0]}); "
                        "pass directories of finished main_downstream.py runs.")
    if not linear_eval:
        linear = [path for path, obj in good if (obj.get("config") or {}).get("linear_eval")]
        if linear:
            warnings.append(f"left out {len(linear)} linear-evaluation runs (--linear-eval, e.g. '{linear[0]}'): the "
                            "double-win verdict compares fine-tuned runs; analysis/plot_companion.py draws them.")
            good = [(path, obj) for path, obj in good if not (obj.get("config") or {}).get("linear_eval")]
    cache, runs = {}, []
    for path, obj in good:
        method = DENSE if common.is_dense(obj) else obj["method"]
        candidates = [] if method == DENSE else _ticket_candidates(obj, path)
        ticket = next((c for c in candidates if c.exists()), None)
        retrain, problem = _ticket_retrain(ticket, method, cache)
        family = method if method == DENSE or problem else _ticket_family(ticket, method, cache)
        if problem:
            warnings.append(f"skipped '{path}': its ticket '{ticket}' {problem.rstrip('.')} "
                            "(restore the ticket file or remove the run).")
            continue
        runs.append(Run(path=path, dataset=obj["dataset"], data_rate=round(float(obj["data_rate"]), 6),
                        pretrain=obj["pretrain"], method=method, regime=obj["regime"],
                        sparsity=0.0 if method == DENSE else round(float(obj["sparsity"]), 2),
                        seed=str(obj["seed"]), sa=float(obj["sa"]),
                        ra=None if obj["ra"] is None else float(obj["ra"]), arch=obj["arch"],
                        retrain=retrain, family=family, attack=_attack_settings(obj),
                        stage1=_stage1_dir(candidates)))
    if not runs:
        raise UserError(f"none of the {len(paths)} results.json files found is usable ({warnings[0]}); "
                        "pass directories of finished main_downstream.py runs.")
    assign_labels(runs)
    return runs, warnings


def assign_labels(runs):
    """Method label per run: the method (with a structured ticket's pattern), plus the re-training
    kind where one such family has several."""
    kinds = defaultdict(set)
    for r in runs:
        r.family = r.family or r.method
        if r.retrain is not None:
            kinds[r.family].add(r.retrain)
    for r in runs:
        split = len(kinds[r.family]) > 1 and r.retrain is not None
        r.label = f"{r.family}-{r.retrain}" if split else r.family


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
    check_attack_settings(cells)
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


def _fmt_setting(key, value):
    if key.endswith("steps"):
        return f"{key} {value:g}"
    return f"{key} {value:.6g} (= {value * 255:.4g}/255)"


def check_attack_settings(cells):
    """UserError when the runs of one cell were trained or tested under different attacks.

    Averaging a PGD-10 run at ε = 8/255 with one at 4/255 gives a number that is neither, and the
    verdict built on it means nothing; every conflict is listed with its run directories.
    """
    conflicts = []
    for key in sorted(cells, key=_cell_sort_key):
        ds, rate, pre, label, regime, s = key
        runs = cells[key].runs
        for setting in ATTACK_KEYS:
            by_value = defaultdict(list)
            for r in runs:
                if setting in r.attack:
                    by_value[r.attack[setting]].append(str(r.path.parent))
            if len(by_value) > 1:
                level = "dense baseline" if label == DENSE else f"level {common.fmt_sparsity(s)}%"
                listed = "; ".join(f"{_fmt_setting(setting, v)} in {', '.join(dirs)}"
                                   for v, dirs in sorted(by_value.items()))
                conflicts.append(f"{_where(ds, rate, pre, label, regime)}, {level}: {listed}")
    if conflicts:
        raise UserError("runs that would be averaged into one cell were run with different attack settings ("
                        + " | ".join(conflicts) + "); pass runs of one ε, α and step count per analysis "
                        "(separate folders, separate plot_curves.py calls) or rerun them with one setting.")


def _cell_sort_key(key):
    ds, rate, pre, label, regime, s = key
    return (ds, -rate, common.order_key(pre, common.PRETRAIN_ORDER),
            common.order_key(label, (DENSE,) + common.METHOD_ORDER), common.order_key(regime, ("st", "at", "fat")), s)


def groups_of(cells):
    """Sorted (dataset, rate, pretrain, label) of every ticket group (dense runs are baselines)."""
    keys = {k[:4] for k in cells if k[3] != DENSE}
    return sorted(keys, key=lambda g: (g[0], -g[1], common.order_key(g[2], common.PRETRAIN_ORDER),
                                       common.order_key(g[3], common.METHOD_ORDER)))


# --------------------------------------------------------------------------- expected runs

VERDICT_REGIMES = ("st", "at")


def _stage1_levels(runs, warnings):
    """{ticket group: levels its stage-1 directories' sparsity.json list} (DESIGN §5.2)."""
    read, levels = {}, defaultdict(set)
    for r in runs:
        if r.dense or r.stage1 is None:
            continue
        key = str(r.stage1.resolve())
        if key not in read:
            path = r.stage1 / "sparsity.json"
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
                values = [float(v) for v in obj.values()] if isinstance(obj, dict) else None
            except (OSError, ValueError, TypeError) as exc:
                values = None
                warnings.append(f"'{path}' cannot be read ({exc.__class__.__name__}); its levels are not "
                                "checked for missing runs.")
            if values is not None and not all(math.isfinite(v) and 0.0 < v <= 100.0 for v in values):
                warnings.append(f"'{path}' holds values that are not sparsities in percent; its levels are not "
                                "checked for missing runs.")
                values = None
            read[key] = {round(v, 2) for v in values or ()}
        levels[(r.dataset, r.data_rate, r.pretrain, r.label)] |= read[key]
    return levels


def expected_from_results(runs, cells, stage1_levels):
    """Run keys (dataset, rate, pretrain, label, regime, sparsity, seed) the results imply.

    Per ticket group: every level present or listed in its stage-1 sparsity.json, under ST, AT and
    any other regime the group has, for every seed present in the group or in its dense baseline;
    the dense baseline is expected under the same regimes and seeds.
    """
    expected = set()
    for group in groups_of(cells):
        ds, rate, pre, label = group
        mine = {k: c for k, c in cells.items() if k[:4] == group}
        dense = {k: c for k, c in cells.items() if k[:4] == (ds, rate, pre, DENSE)}
        regimes = set(VERDICT_REGIMES) | {k[4] for k in mine}
        levels = {k[5] for k in mine} | stage1_levels.get(group, set())
        seeds = {r.seed for c in mine.values() for r in c.runs}
        seeds |= {r.seed for k, c in dense.items() if k[4] in regimes for r in c.runs}
        for regime in regimes:
            for seed in seeds:
                expected.add((ds, rate, pre, DENSE, regime, 0.0, seed))
                expected.update((ds, rate, pre, label, regime, s, seed) for s in levels)
    return expected


def expected_from_records(records, runs, base=None):
    """Run keys of the records of ``script/sweep.py``'s ``expected_runs`` (DESIGN §5.7).

    A record whose ``run_dir`` holds a loaded run takes that run's key; any other record is keyed by
    its fields, its method standing for every label of that method in its group (IMP runs split
    into imp-st / imp-at when both kinds exist).
    """
    by_dir = {str(r.path.parent.resolve()): r for r in runs}
    labels = defaultdict(set)
    for r in runs:
        if not r.dense:
            labels[(r.dataset, r.data_rate, r.pretrain)].add(r.label)
    expected = set()
    for rec in records:
        try:
            ds, pre, regime, method = rec["dataset"], rec["pretrain"], rec["regime"], rec.get("method")
            rate, s, seed = round(float(rec["data_rate"]), 6), round(float(rec["sparsity"]), 2), str(rec["seed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"the grid's expected run {rec!r} lacks a field or holds a bad value ({exc}); "
                            "check script/sweep.py's expected_runs.") from None
        run = None
        if rec.get("run_dir"):
            for cand in ([Path(rec["run_dir"])] + ([Path(base) / rec["run_dir"]] if base else [])):
                run = by_dir.get(str(cand.resolve()))
                if run is not None:
                    break
        if run is not None:
            expected.add((run.dataset, run.data_rate, run.pretrain, run.label, run.regime, run.sparsity, run.seed))
        elif s == 0.0 or method == DENSE:
            expected.add((ds, rate, pre, DENSE, regime, 0.0, seed))
        else:
            mine = sorted(lab for lab in labels[(ds, rate, pre)] if lab == method or lab.startswith(f"{method}-"))
            expected.update((ds, rate, pre, lab, regime, s, seed) for lab in mine or [method])
    return expected


def missing_runs(expected, cells):
    """{(dataset, rate, pretrain, label): {sparsity: {regime: [seeds]}}} of expected runs without a result."""
    present = {k + (r.seed,) for k, c in cells.items() for r in c.runs}
    out = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for key in sorted(expected - present, key=lambda k: (_cell_sort_key(k[:6]), _seed_key(k[6]))):
        out[key[:4]][key[5]][key[4]].append(key[6])
    return out


def _seed_key(seed):
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def missing_messages(missing):
    """One line per (group, level) with missing runs, naming the regimes and seeds."""
    lines = []
    for group in sorted(missing, key=lambda g: _cell_sort_key(g + ("", 0.0))):
        for s in sorted(missing[group]):
            level = "dense baseline" if group[3] == DENSE else f"level {common.fmt_sparsity(s)}%"
            what = "; ".join(f"regime {regime} seed(s) {', '.join(seeds)}"
                             for regime, seeds in sorted(missing[group][s].items(),
                                                         key=lambda kv: common.order_key(kv[0], common.REGIMES)))
            lines.append(f"{_where(*group)}: {level} has no result for {what}.")
    return lines


# --------------------------------------------------------------------------- verdict

def _matching(mean, dense_mean, dense_std):
    return verdict.matching(mean, dense_mean, dense_std)


def _values(cell, metric):
    return [getattr(r, metric) for r in cell.runs]


def _supports(st, at, base):
    """Support of each comparison and of the level's double-win (analysis.verdict)."""
    st_sa, dst_sa = _values(st, "sa"), _values(base["st"], "sa")
    at_rows = [(r.sa, r.ra) for r in at.runs]
    dat_rows = [(r.sa, r.ra) for r in base["at"].runs]
    return {"st_sa_support": verdict.matching_support(st_sa, dst_sa),
            "at_sa_support": verdict.matching_support([x[0] for x in at_rows], [x[0] for x in dat_rows]),
            "at_ra_support": verdict.matching_support([x[1] for x in at_rows], [x[1] for x in dat_rows]),
            "double_win_support": verdict.level_support(st_sa, dst_sa, at_rows, dat_rows)}


def judge(cells, missing=None):
    """(table rows, per-level rows, warnings): the double-win verdict of every group.

    ``missing``: the result of :func:`missing_runs`; a level with a missing ST or AT run is not
    judged, and a group whose dense baseline misses a run gets no verdict.
    """
    missing = missing or {}
    rows, level_rows, warnings = [], [], []
    for group in groups_of(cells):
        ds, rate, pre, label = group
        where = _where(*group)
        base = {regime: cells.get((ds, rate, pre, DENSE, regime, 0.0)) for regime in VERDICT_REGIMES}
        n_seeds = cells_expected(cells, group)
        reasons, base_reasons = [], []
        dense_missing = missing.get((ds, rate, pre, DENSE), {}).get(0.0, {})
        for regime in VERDICT_REGIMES:
            if base[regime] is None:
                base_reasons.append(f"no dense baseline for regime {regime} (dense runs of {ds}, data rate "
                                    f"{common.fmt_rate(rate)}, pretrain {pre})")
            elif not base[regime].complete:
                base_reasons.append(f"its regime-{regime} dense baseline is incomplete "
                                    f"({', '.join(base[regime].problems)})")
            elif base[regime].n < n_seeds:
                base_reasons.append(f"its regime-{regime} dense baseline has {base[regime].n} seeds, fewer than the "
                                    f"{n_seeds} of its tickets")
            elif dense_missing.get(regime):
                base_reasons.append(f"its regime-{regime} dense baseline has no result for seed(s) "
                                    f"{', '.join(dense_missing[regime])}")
            elif base[regime].n > n_seeds:
                reasons.append(f"its tickets have {n_seeds} seeds, fewer than the "
                               f"{base[regime].n} of its regime-{regime} dense baseline")
        archs = sorted({r.arch for k, c in cells.items() if k[:4] == group for r in c.runs}
                       | {r.arch for c in base.values() if c is not None for r in c.runs})
        if len(archs) > 1:  # no baseline of the tickets' own architecture
            base_reasons.append(f"its runs mix architectures ({', '.join(archs)})")
        group_regimes = {k[4] for k in cells if k[:4] == group}
        for regime in VERDICT_REGIMES:
            if regime not in group_regimes:
                reasons.append(f"it has no ticket runs under regime {regime}")
        reasons = base_reasons + reasons
        if reasons:
            warnings.append(f"{where}: no double-win verdict because {'; '.join(reasons)}.")
        elif n_seeds < 2:
            warnings.append(f"{where}: judged on a single seed, so the dense std is 0 and matching means "
                            "ticket ≥ dense exactly; run 3 seeds (as the paper) for a verdict that allows for noise.")

        gone = missing.get(group, {})
        levels = sorted({k[5] for k in cells if k[:4] == group}
                        | {s for s, by_regime in gone.items() if any(r in by_regime for r in VERDICT_REGIMES)})
        wins, judged, supports = {}, [], {}
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
            absent = {r: seeds for r, seeds in gone.get(s, {}).items() if r in VERDICT_REGIMES}
            if absent:
                notes.append("missing runs: " + "; ".join(f"{r} seed(s) {', '.join(seeds)}"
                                                          for r, seeds in sorted(absent.items())))
            if reasons:
                notes.append("no verdict for the group")
            if (st is not None and at is not None and st.complete and at.complete and not absent
                    and not reasons):
                row["judged"] = True
                judged.append(s)
                row["double_win"] = verdict.double_win(row["st_sa_matching"], row["at_sa_matching"],
                                                       row["at_ra_matching"])
                sup = _supports(st, at, base)
                supports[s] = sup["double_win_support"]
                row.update({k: round(v, 4) for k, v in sup.items()})
                row["support"] = verdict.support_label(sup["double_win_support"])
            wins[s] = row["double_win"]
            for regime, cell in (("st", st), ("at", at)):
                # a regime the group lacks altogether was reported once above; a level listed as
                # missing runs is reported with them
                if cell is None and regime in group_regimes and not absent:
                    warnings.append(f"{where}: level {common.fmt_sparsity(s)}% has no regime-{regime} runs; "
                                    "it is not judged double-win.")
            row["note"] = "; ".join(notes)
            level_rows.append(row)
        unjudged = [s for s in levels if s not in judged]
        rows.append(_table_row(group, wins, supports, unjudged, reasons, base_reasons))
    return rows, level_rows, warnings


def _table_row(group, wins, supports, unjudged, reasons, base_reasons):
    """One double_win.csv row; an extreme with an unjudged level at or below it is withheld."""
    ds, rate, pre, label = group
    won = [s for s in sorted(wins) if wins[s]]

    def bounded(level):
        if level is None or any(u <= level for u in unjudged):
            return ""
        return common.fmt_sparsity(level)

    contiguous = verdict.contiguous_extreme(wins) if not reasons else None
    if base_reasons:
        state = "no-baseline"
    elif reasons or unjudged:
        state = "incomplete"
    else:
        state = "complete"
    return {"dataset": ds, "data_rate": common.fmt_rate(rate), "pretrain": pre, "method": label,
            "extreme_sparsity": bounded(verdict.extreme_sparsity(wins)),
            "double_win_levels": ";".join(common.fmt_sparsity(s) for s in won),
            "extreme_sparsity_contiguous": "" if contiguous is None else common.fmt_sparsity(contiguous),
            "verdict": state,
            "extreme_sparsity_supported": bounded(verdict.supported_extreme(supports)),
            "incomplete": _incompleteness(reasons, won, unjudged),
            "supports": supports, "wins": wins, "unjudged": unjudged}


def _incompleteness(reasons, wins, unjudged):
    """What a table row cannot say by itself: '' when every level of the group was judged."""
    if reasons:
        return "no verdict (see warnings)"
    if not unjudged:
        return ""
    listed = ", ".join(common.fmt_sparsity(s) for s in unjudged)
    if any(s <= max(wins, default=-1.0) for s in unjudged):
        return (f"levels {listed} not judged (missing or incomplete runs), so the extreme sparsity is withheld: "
                "a level below it might not be double-win")
    return f"levels {listed} not judged, so the extreme sparsity may be higher"


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


def _draw_panel(ax, series_list, regime, metric, xs, fig_name, panel, data_rows, supports=None):
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
        level_support = (supports or {}).get((ser.dataset, ser.data_rate, ser.pretrain, ser.method), {})
        for s in sorted(by_s):
            mean, std = by_s[s].stat(metric)
            if math.isnan(mean) or s not in pos:
                continue
            support = level_support.get(s)
            pts.append((pos[s], mean, std, by_s[s].complete, verdict.support_label(support) == "uncertain"))
            data_rows.append(_figure_row(fig_name, panel, regime, metric, ser, s, pos[s], mean, std, by_s[s],
                                         support))
        if not pts:
            continue
        x = [p[0] for p in pts]
        m = [p[1] for p in pts]
        lo = [p[1] - p[2] for p in pts]
        hi = [p[1] + p[2] for p in pts]
        ls = ":" if ser.kind == "random" else "-"
        ax.plot(x, m, ls=ls, marker="o", ms=3.5, lw=1.6, color=ser.color, label=ser.name)
        ax.fill_between(x, lo, hi, color=ser.color, alpha=0.18, lw=0)
        unsure = [p for p in pts if p[4]]
        if unsure:  # hollow: the level's double-win verdict could flip with other seeds
            ax.plot([p[0] for p in unsure], [p[1] for p in unsure], ls="none", marker="o", ms=5, mfc="white",
                    mec=ser.color, mew=1.4)
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


def _figure_row(fig_name, panel, regime, metric, ser, s, x, mean, std, cell, support=None):
    return {"double_win_support": "" if support is None else round(support, 4),"figure": fig_name, "panel": panel, "regime": regime, "metric": metric, "series": ser.name,
            "kind": ser.kind, "dataset": ser.dataset, "data_rate": common.fmt_rate(ser.data_rate),
            "pretrain": ser.pretrain, "method": ser.method, "sparsity": common.fmt_sparsity(s), "x_position": x,
            "mean": _num(mean), "std": _num(std), "n": cell.n, "complete": cell.complete}


def _levels(series_list):
    return sorted({s for ser in series_list if ser.kind != "dense" for c in ser.cells.values() for s in c})


def _has_incomplete(series_list):
    return any(not c.complete for ser in series_list for by_s in ser.cells.values() for c in by_s.values())


def _has_uncertain(series_list, supports):
    for ser in series_list:
        sup = (supports or {}).get((ser.dataset, ser.data_rate, ser.pretrain, ser.method), {})
        if ser.kind != "dense" and any(verdict.support_label(p) == "uncertain" for p in sup.values()):
            return True
    return False


def draw_figure(out_dir, name, title, columns, supports=None):
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
            _draw_panel(ax, series_list, regime, metric, _levels(all_series), name, panel, data_rows, supports)
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
    if _has_uncertain(all_series, supports):
        from matplotlib.lines import Line2D

        flat[0].add_line(Line2D([], [], ls="none", marker="o", ms=5, mfc="white", mec="black",
                                label=f"uncertain double-win (support {verdict.CONTRADICTED}–{verdict.SUPPORTED})"))
    common.figure_legend(fig, flat)
    fig.suptitle(title, fontsize=11)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0.4 / height, 1, 1 - 0.3 / height))
    png = common.save_figure(fig, out_dir / f"{name}.png")
    common.write_csv(data_rows, out_dir / f"{name}.csv", FIGURE_FIELDS)
    return png


def _rate_tag(rate):
    return f"rate{100 * rate:g}"


def make_figures(cells, out_dir, supports=None):
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
                paths.append(draw_figure(out_dir, name, title, [("", cols)], supports))
        # data rates side by side
        if len(rates) > 1:
            for label in main_labels:
                columns = [(f"{common.fmt_rate_percent(rate)} data", pretrain_columns(ds, rate, label)) for rate in rates]
                if sum(any(s.kind != "dense" for s in cols) for _, cols in columns) < 2:
                    continue
                name = f"data_rate_{common.safe_name(ds)}_{common.safe_name(label)}"
                title = f"{ds}: data rates, {label} tickets (mean ± std over seeds)"
                paths.append(draw_figure(out_dir, name, title, columns, supports))
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
                paths.append(draw_figure(out_dir, name, title, [("", cols)], supports))
    return paths


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
    return p.parse_args(argv)


def grid_expected_runs(grid_path):
    """The records of ``script/sweep.py``'s ``expected_runs(grid_path)``, imported only when asked for."""
    import importlib

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        sweep = importlib.import_module("script.sweep")
    except ModuleNotFoundError as exc:
        if exc.name not in ("script", "script.sweep"):
            raise
        raise UserError("--grid needs script/sweep.py, which this checkout lacks; run without --grid "
                        "(the expected levels then come from each ticket's sparsity.json).") from None
    fn = getattr(sweep, "expected_runs", None)
    if fn is None:
        raise UserError("--grid needs expected_runs() in script/sweep.py, which this version lacks; "
                        "run without --grid or update the checkout.")
    if not Path(grid_path).is_file():
        raise UserError(f"grid file '{grid_path}' does not exist; pass the GRID.toml of your sweep.")
    return list(fn(str(grid_path)))


@dataclass
class Analysis:
    runs: list
    cells: dict
    rows: list          # double_win.csv rows (with internal keys the CSV leaves out)
    level_rows: list
    warnings: list
    missing: list       # one line per level with expected runs that have no result


def collect(dirs, expected=None, grid_base=None):
    """Read, group and judge the runs under ``dirs``.

    ``expected``: records of ``script/sweep.py``'s ``expected_runs`` (DESIGN §5.7) naming the runs
    that should exist; None infers them from the results (levels from the tickets' sparsity.json,
    seeds from the group and its dense baseline).
    """
    runs, warnings = load_runs(dirs)
    cells, cell_warnings = build_cells(runs)
    if expected is None:
        keys = expected_from_results(runs, cells, _stage1_levels(runs, warnings))
    else:
        keys = expected_from_records(expected, runs, grid_base)
    missing = missing_runs(keys, cells)
    rows, level_rows, verdict_warnings = judge(cells, missing)
    return Analysis(runs, cells, rows, level_rows, warnings + cell_warnings + verdict_warnings,
                    missing_messages(missing))


def verdict_rows(dirs, expected=None):
    """Exactly the rows double_win.csv gets (every column, values as written), without drawing anything."""
    result = collect(dirs, expected)
    return [{f: "" if r.get(f) is None else str(r.get(f)) for f in CSV_FIELDS} for r in result.rows]


def incomplete_markdown(rows):
    """The rows whose verdict is missing or partial, so the table is never read as more than it says."""
    flagged = [r for r in rows if r.get("incomplete")]
    if not flagged:
        return ""
    lines = ["", "## Incomplete rows", ""]
    lines += [f"- {r['dataset']}, data rate {r['data_rate']}, pretrain {r['pretrain']}, method {r['method']}: "
              f"{r['incomplete']}" for r in flagged]
    return "\n".join(lines) + "\n"


def levels_markdown(rows):
    """Every judged level of every row with its double-win support; uncertain cells carry '?'."""
    levels = sorted({s for r in rows for s in r.get("wins", {})})
    if not levels:
        return ""
    fields = ["dataset", "data_rate", "pretrain", "method"] + [common.fmt_sparsity(s) for s in levels]
    table = []
    for r in rows:
        line = {f: r[f] for f in fields[:4]}
        for s in levels:
            if s not in r["wins"]:
                cell = ""
            elif s in r["unjudged"]:
                cell = "not judged"
            else:
                p = r["supports"].get(s)
                mark = "?" if verdict.support_label(p) == "uncertain" else ""
                cell = f"{'win' if r['wins'][s] else 'no'}{mark} ({p:.2f})"
            line[common.fmt_sparsity(s)] = cell
        table.append(line)
    return ("\n## Double-win per level\n\n" + common.markdown_table(table, fields)
            + "\nwin / no: the verdict of the rule; the number is its support, the fraction of seed resamples "
              "under which the level is double-win. **?** marks an uncertain cell (support between "
              f"{verdict.CONTRADICTED} and {verdict.SUPPORTED}): other seeds could well flip it.\n")


def missing_markdown(missing):
    if not missing:
        return ""
    return "\n## Missing runs\n\n" + "".join(f"- {m}\n" for m in missing)


def notes_markdown(warnings):
    lines = ["", "## Notes", "",
             "- mean ± std over seeds; std is the sample standard deviation (ddof=1), 0 for a single seed "
             "(a single-seed group is judged and warned about).",
             "- matching: ticket mean ≥ dense mean − one dense std (same dataset, data rate, pretrain label "
             "and regime). double-win: matching SA under ST and matching SA and RA under AT.",
             "- extreme_sparsity: the largest double-win level; empty when no level is double-win, the "
             "group has no verdict, or a level at or below it was not judged (see the warnings).",
             "- extreme_sparsity_contiguous: the largest level such that every level at or below it is "
             "double-win; extreme_sparsity_supported: the largest level whose double-win support (the "
             f"fraction of seed resamples under which the rule holds) is ≥ {verdict.SUPPORTED}.",
             "- verdict: complete (every expected run present and judged), incomplete (runs missing: the "
             "extremes are lower bounds at best), no-baseline (no usable dense baseline).",
             "- levels with missing seeds are never averaged into a verdict; double_win_details.csv lists "
             "every level with its comparison and supports."]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def analyse(dirs, out_dir, figures=True, expected=None, grid_base=None):
    """Everything main does, returning (table rows, warnings, figure paths); missing runs are warnings too."""
    out_dir = Path(out_dir)
    result = collect(dirs, expected, grid_base)
    rows = result.rows
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_csv(rows, out_dir / "double_win.csv", CSV_FIELDS)
    atomic_write_text("# Double-win tickets\n\n" + common.markdown_table(rows, CSV_FIELDS)
                      + incomplete_markdown(rows) + levels_markdown(rows) + missing_markdown(result.missing)
                      + notes_markdown(result.warnings), out_dir / "double_win.md")
    common.write_csv(result.level_rows, out_dir / "double_win_details.csv", LEVEL_FIELDS)
    common.write_csv(summary_rows(result.cells), out_dir / "summary.csv", SUMMARY_FIELDS)
    warnings = result.warnings + result.missing
    atomic_write_text("".join(w + "\n" for w in warnings), out_dir / "warnings.txt")
    paths = make_figures(result.cells, out_dir, _uncertain_levels(rows)) if figures else []
    return rows, warnings, paths


def _uncertain_levels(rows):
    """{(dataset, rate, pretrain, label): {level: support}} of every judged level."""
    return {(r["dataset"], float(r["data_rate"]), r["pretrain"], r["method"]): dict(r["supports"]) for r in rows}


def main(argv=None):
    args = parse_args(argv)
    expected = grid_expected_runs(args.grid) if args.grid else None
    grid_base = Path(args.grid).resolve().parent if args.grid else None
    rows, warnings, paths = analyse(args.runs, args.out, figures=not args.no_figures, expected=expected,
                                    grid_base=grid_base)
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
