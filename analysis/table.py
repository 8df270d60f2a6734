"""The double-win table: expected runs, the verdict of every group, and its outputs (docs/contracts.md §5).

A group is (dataset, data rate, pretrain label, method label); its baseline for a regime is the
dense runs of the same dataset, data rate, pretrain label and regime. Each (group, regime, sparsity)
cell is reported as mean ± std over its seeds (analysis.runs); the verdict itself — matching,
double-win, the extremes and their support under seed resampling — is analysis/verdict.py.

Expected runs: every level listed in the sparsity.json of a ticket's stage-1 directory
(SAVE_DIR/tickets/round_XX.pt -> SAVE_DIR/sparsity.json), or every run of a sweep's grid
(study.grid.expected_runs), under ST and AT, for every seed present in the group or its dense
baseline. Each expected run without a result is listed (warning, warnings.txt, double_win.md); a
level missing a run is not judged, and a row with an unjudged level at or below its extreme gets no
extreme (verdict "incomplete"). Rows never change because runs are missing in another group.
A level that is incomplete is not judged; a group whose dense baseline is missing, short of seeds,
or mixes architectures with its tickets gets no verdict (empty extreme_sparsity, verdict
"no-baseline"); so does a group whose ticket runs of a regime faced another threat model than that
regime's dense baseline (ε, α, steps, test ε/α/steps, norm: verdict "threat-mismatch", both settings
named). Each case is a warning. Levels whose comparison holds a run kept at chance level
(--allow-chance) are marked * in double_win.md's per-level table.

Outputs: double_win.csv (the six §5.5 columns, then extreme_sparsity_contiguous, verdict,
extreme_sparsity_supported), double_win.md (what the supports resampled, the same table, the per-level
verdicts with their support, uncertain cells marked '?', those the std estimator decides '†', missing
runs), double_win_details.csv (the per-level comparison, the support of each comparison and of the
level's double-win, its sources and its verdict with ddof=0), summary.csv (every cell),
warnings.txt. ``verdict_rows(dirs, expected=None)`` returns the double_win.csv rows without writing.
"""

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import study.grid
from analysis import common, verdict
from analysis.runs import (
    DENSE,
    THREAT_KEYS,
    build_cells,
    cell_sort_key,
    csv_number,
    fmt_setting,
    group_text,
    groups_of,
    load_runs,
    protocol_conflicts,
    threat_differences,
)
from utils import records
from utils.checkpoint import atomic_write_text
from utils.errors import UserError

TABLE_FIELDS = ["dataset", "data_rate", "pretrain", "method", "extreme_sparsity", "double_win_levels"]
# appended after the six contract columns, in this order (docs/contracts.md §5)
EXTRA_FIELDS = ["extreme_sparsity_contiguous", "verdict", "extreme_sparsity_supported"]
CSV_FIELDS = TABLE_FIELDS + EXTRA_FIELDS
SUMMARY_FIELDS = ["dataset", "data_rate", "pretrain", "method", "regime", "sparsity", "n", "seeds", "complete",
                  "sa_mean", "sa_std", "ra_mean", "ra_std", "arch"]
LEVEL_FIELDS = ["dataset", "data_rate", "pretrain", "method", "sparsity", "judged", "double_win",
                "st_sa_mean", "st_sa_std", "dense_st_sa_mean", "dense_st_sa_std", "st_sa_matching",
                "at_sa_mean", "at_sa_std", "dense_at_sa_mean", "dense_at_sa_std", "at_sa_matching",
                "at_ra_mean", "at_ra_std", "dense_at_ra_mean", "dense_at_ra_std", "at_ra_matching", "note",
                "st_sa_support", "at_sa_support", "at_ra_support", "double_win_support", "support",
                "sources", "double_win_ddof0"]

# --------------------------------------------------------------------------- expected runs

VERDICT_REGIMES = ("st", "at")


def _stage1_levels(runs, warnings):
    """{ticket group: levels its stage-1 directories' sparsity.json list} (docs/contracts.md §2)."""
    read, levels, paths = {}, defaultdict(set), {}
    for r in runs:
        if r.dense or r.stage1 is None:
            continue
        key = common.resolved_path(r.stage1, paths)
        if key not in read:
            path = r.stage1 / "sparsity.json"
            try:
                values = list(records.read_sparsity(path).values())
            except UserError as exc:
                values = None
                warnings.append(f"{str(exc).rstrip('.')}; its levels are not checked for missing runs.")
            if values is not None and not all(0.0 < v <= 100.0 for v in values):
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
    """Run keys of the records of ``study.grid.expected_runs`` (docs/contracts.md §7).

    A record whose ``run_dir`` holds a loaded run takes that run's key; any other record is keyed by
    its fields, its method standing for every label of that method in its group (IMP runs split
    into imp-st / imp-at when both kinds exist).
    """
    paths = {}  # each directory resolved once (analysis.common.resolved_path)
    by_dir = {common.resolved_path(r.path.parent, paths): r for r in runs}
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
                            "check study/grid.py's expected_runs.") from None
        run = None
        if rec.get("run_dir"):
            for cand in ([Path(rec["run_dir"])] + ([Path(base) / rec["run_dir"]] if base else [])):
                run = by_dir.get(common.resolved_path(cand, paths))
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
    for key in sorted(expected - present, key=lambda k: (cell_sort_key(k[:6]), _seed_key(k[6]))):
        out[key[:4]][key[5]][key[4]].append(key[6])
    return out


def _seed_key(seed):
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def missing_messages(missing):
    """One line per (group, level) with missing runs, naming the regimes and seeds."""
    lines = []
    for group in sorted(missing, key=lambda g: cell_sort_key(g + ("", 0.0))):
        for s in sorted(missing[group]):
            level = "dense baseline" if group[3] == DENSE else f"level {common.fmt_sparsity(s)}%"
            what = "; ".join(f"regime {regime} seed(s) {', '.join(seeds)}"
                             for regime, seeds in sorted(missing[group][s].items(),
                                                         key=lambda kv: common.order_key(kv[0], common.REGIMES)))
            lines.append(f"{group_text(*group)}: {level} has no result for {what}.")
    return lines


# --------------------------------------------------------------------------- verdict

def run_source(run):
    """A run's source (docs/contracts.md §5): its θ_p file, plus for a ticket the directory of its
    ticket file, as results.json's ``init`` and ``ticket`` write them (normalised, not resolved:
    the same file has other absolute paths on other machines).  Unrecorded parts are ''."""
    obj = run.results
    init = obj.get("init")
    init = os.path.normpath(init) if isinstance(init, str) and init else ""
    if run.dense:
        return (init,)
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    ticket = obj.get("ticket") or config.get("ticket")
    return (init, os.path.dirname(os.path.normpath(ticket)) if isinstance(ticket, str) and ticket else "")


def _supports(st, at, base):
    """(support of each comparison and of the level's double-win, distinct sources of each of the
    level's four cells): hierarchical where a side has two or more sources (analysis.verdict)."""
    src = [[run_source(r) for r in c.runs] for c in (st, base["st"], at, base["at"])]
    st_kw = {"ticket_sources": src[0], "dense_sources": src[1]}
    at_kw = {"ticket_sources": src[2], "dense_sources": src[3]}
    st_sa, dst_sa = [r.sa for r in st.runs], [r.sa for r in base["st"].runs]
    at_rows = [(r.sa, r.ra) for r in at.runs]
    dat_rows = [(r.sa, r.ra) for r in base["at"].runs]
    st_support = verdict.block_support(st_sa, dst_sa, **st_kw)
    # the ST and AT runs are resampled independently, so the double-win support is the product
    # of the ST block's and the joint (SA, RA) AT block's (verdict.level_support)
    joint = 0.0 if st_support == 0.0 else st_support * verdict.block_support(at_rows, dat_rows, **at_kw)
    return ({"st_sa_support": st_support,
             "at_sa_support": verdict.block_support([x[0] for x in at_rows], [x[0] for x in dat_rows], **at_kw),
             "at_ra_support": verdict.block_support([x[1] for x in at_rows], [x[1] for x in dat_rows], **at_kw),
             "double_win_support": joint}, [len(set(s)) for s in src])


def _population_std(cell, metric):
    values = [getattr(r, metric) for r in cell.runs]
    return math.nan if any(v is None for v in values) else verdict.mean_std([float(v) for v in values], ddof=0)[1]


def judge(cells, missing=None):
    """(table rows, per-level rows, warnings): the double-win verdict of every group.

    ``missing``: the result of :func:`missing_runs`; a level with a missing ST or AT run is not
    judged, and a group whose dense baseline misses a run gets no verdict.
    """
    missing = missing or {}
    rows, level_rows, warnings = [], [], []
    for group in groups_of(cells):
        ds, rate, pre, label = group
        where = group_text(*group)
        base = {regime: cells.get((ds, rate, pre, DENSE, regime, 0.0)) for regime in VERDICT_REGIMES}
        n_seeds = cells_expected(cells, group)
        group_regimes = {k[4] for k in cells if k[:4] == group}
        reasons, base_reasons = _no_verdict_reasons(cells, group, base, n_seeds, group_regimes,
                                                    missing.get((ds, rate, pre, DENSE), {}).get(0.0, {}))
        mismatch, mismatch_notes = _threat_mismatch(cells, group, base)
        reasons += mismatch
        if reasons:
            warnings.append(f"{where}: no double-win verdict because {'; '.join(reasons)}.")
        elif n_seeds < 2:
            warnings.append(f"{where}: judged on a single seed, so the dense std is 0 and matching means "
                            "ticket ≥ dense exactly; run 3 seeds (as the paper) for a verdict that allows for noise.")

        gone = missing.get(group, {})
        levels = sorted({k[5] for k in cells if k[:4] == group}
                        | {s for s, by_regime in gone.items() if any(r in by_regime for r in VERDICT_REGIMES)})
        wins, judged, supports, flips, hierarchical = {}, [], {}, set(), 0
        chance = _chance_levels(cells, group, base, levels)
        for s in levels:
            st, at = cells.get(group + ("st", s)), cells.get(group + ("at", s))
            absent = {r: seeds for r, seeds in gone.get(s, {}).items() if r in VERDICT_REGIMES}
            row, support = _level_row(group, s, st, at, base, absent, bool(reasons))
            _add_notes(row, mismatch_notes.get(s, []) + (["chance-level runs (--allow-chance)"] if s in chance else []))
            if row["judged"]:
                judged.append(s)
                supports[s] = support
                hierarchical += row["hierarchical"]
                if row["double_win"] != row["double_win_ddof0"]:
                    flips.add(s)
            wins[s] = row["double_win"]
            for regime, cell in (("st", st), ("at", at)):
                # a regime the group lacks altogether was reported once above; a level listed as
                # missing runs is reported with them
                if cell is None and regime in group_regimes and not absent:
                    warnings.append(f"{where}: level {common.fmt_sparsity(s)}% has no regime-{regime} runs; "
                                    "it is not judged double-win.")
            level_rows.append(row)
        unjudged = [s for s in levels if s not in judged]
        rows.append(_table_row(group, wins, supports, unjudged, reasons, base_reasons, mismatch))
        rows[-1].update(chance=chance, hierarchical=hierarchical, ddof_flips=flips)
    return rows, level_rows, warnings


def _threat_mismatch(cells, group, base):
    """(one reason per setting in which the group's ticket cells of a regime and that regime's dense
    baseline differ, naming both values; {level: notes}). Such a group gets no verdict: matching a
    baseline that faced another attack says nothing about the ticket."""
    found = defaultdict(list)  # (regime, setting, ticket value, dense value) -> levels
    for key, cell in cells.items():
        if key[:4] == group and key[4] in VERDICT_REGIMES and base[key[4]] is not None:
            for setting, mine, theirs in threat_differences(cell, base[key[4]]):
                found[(key[4], setting, mine, theirs)].append(key[5])
    reasons, notes = [], defaultdict(list)
    for (regime, setting, mine, theirs), levels in sorted(
            found.items(), key=lambda kv: (kv[0][0], THREAT_KEYS.index(kv[0][1]), min(kv[1]))):
        listed = ", ".join(common.fmt_sparsity(s) for s in sorted(levels))
        reasons.append(f"its regime-{regime} tickets (level(s) {listed}) were run with {fmt_setting(setting, mine)} "
                       f"but its regime-{regime} dense baseline with {fmt_setting(setting, theirs)}: another "
                       "threat model")
        for s in levels:
            notes[s].append(f"{regime}: {fmt_setting(setting, mine)} here, {fmt_setting(setting, theirs)} in the "
                            "dense baseline")
    return reasons, notes


def _chance_levels(cells, group, base, levels):
    """The levels whose comparison involves a run kept at chance level (--allow-chance): its own
    ST/AT runs, or any level when the dense baseline holds one."""
    if any(c is not None and any(r.chance for r in c.runs) for c in base.values()):
        return set(levels)
    return {k[5] for k, c in cells.items()
            if k[:4] == group and k[4] in VERDICT_REGIMES and any(r.chance for r in c.runs)}


def _add_notes(row, notes):
    if notes:
        row["note"] = "; ".join(([row["note"]] if row["note"] else []) + notes)


def _no_verdict_reasons(cells, group, base, n_seeds, group_regimes, dense_missing):
    """(every reason the group gets no verdict, those about its dense baseline): both empty when it is judged."""
    ds, rate, pre, _label = group
    reasons, base_reasons = [], []
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
    for regime in VERDICT_REGIMES:
        if regime not in group_regimes:
            reasons.append(f"it has no ticket runs under regime {regime}")
    return base_reasons + reasons, base_reasons


def _level_row(group, s, st, at, base, absent, no_verdict):
    """(double_win_details.csv row of level ``s``, its double-win support or None when not judged).

    A level is judged when both its ST and AT cells are complete, no run of it is missing
    (``absent``: {regime: seeds}) and the group has a verdict."""
    ds, rate, pre, label = group
    row = {"dataset": ds, "data_rate": common.fmt_rate(rate), "pretrain": pre, "method": label,
           "sparsity": common.fmt_sparsity(s), "judged": False, "double_win": False, "note": ""}
    population = []  # each comparison judged again with the dense population std (ddof=0)
    for regime, metric, cell, b in (("st", "sa", st, base["st"]), ("at", "sa", at, base["at"]),
                                    ("at", "ra", at, base["at"])):
        mean, std = cell.stat(metric) if cell is not None else (math.nan, math.nan)
        dmean, dstd = b.stat(metric) if b is not None else (math.nan, math.nan)
        row.update({f"{regime}_{metric}_mean": csv_number(mean), f"{regime}_{metric}_std": csv_number(std),
                    f"dense_{regime}_{metric}_mean": csv_number(dmean), f"dense_{regime}_{metric}_std": csv_number(dstd),
                    f"{regime}_{metric}_matching": verdict.matching(mean, dmean, dstd)})
        population.append(b is not None and verdict.matching(mean, dmean, _population_std(b, metric)))
    notes = []
    for regime, cell in (("st", st), ("at", at)):
        if cell is None:
            notes.append(f"no {regime} runs")
        elif not cell.complete:
            notes.append(f"{regime}: {', '.join(cell.problems)}")
    if absent:
        notes.append("missing runs: " + "; ".join(f"{r} seed(s) {', '.join(seeds)}"
                                                  for r, seeds in sorted(absent.items())))
    if no_verdict:
        notes.append("no verdict for the group")
    row["note"] = "; ".join(notes)
    if st is None or at is None or not st.complete or not at.complete or absent or no_verdict:
        return row, None
    row["judged"] = True
    row["double_win"] = verdict.double_win(row["st_sa_matching"], row["at_sa_matching"], row["at_ra_matching"])
    row["double_win_ddof0"] = verdict.double_win(*population)
    sup, sources = _supports(st, at, base)
    row.update({k: round(v, 4) for k, v in sup.items()})
    row["support"] = verdict.support_label(sup["double_win_support"])
    # the column counts the sources both sides have; the support is hierarchical where either has two
    row["sources"], row["hierarchical"] = min(sources), max(sources) > 1
    return row, sup["double_win_support"]


def _table_row(group, wins, supports, unjudged, reasons, base_reasons, mismatch=()):
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
    elif mismatch:
        state = "threat-mismatch"
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
            "incomplete": _incompleteness(reasons, won, unjudged, mismatch),
            "supports": supports, "wins": wins, "unjudged": unjudged}


def _incompleteness(reasons, wins, unjudged, mismatch=()):
    """What a table row cannot say by itself: '' when every level of the group was judged."""
    if reasons:
        return "no verdict (see warnings)" + (f": {'; '.join(mismatch)}" if mismatch else "")
    if not unjudged:
        return ""
    listed = ", ".join(common.fmt_sparsity(s) for s in unjudged)
    if any(s <= max(wins, default=-1.0) for s in unjudged):
        return (f"levels {listed} not judged (missing or incomplete runs), so the extreme sparsity is withheld: "
                "a level below it might not be double-win")
    return f"levels {listed} not judged, so the extreme sparsity may be higher"


def cells_expected(cells, group):
    return max((c.expected for k, c in cells.items() if k[:4] == group), default=0)


def summary_rows(cells):
    rows = []
    for key in sorted(cells, key=cell_sort_key):
        ds, rate, pre, label, regime, s = key
        c = cells[key]
        sa, sa_std = c.stat("sa")
        ra, ra_std = c.stat("ra")
        rows.append({"dataset": ds, "data_rate": common.fmt_rate(rate), "pretrain": pre, "method": label,
                     "regime": regime, "sparsity": common.fmt_sparsity(s), "n": c.n,
                     "seeds": ";".join(r.seed for r in c.runs), "complete": c.complete,
                     "sa_mean": csv_number(sa), "sa_std": csv_number(sa_std), "ra_mean": csv_number(ra), "ra_std": csv_number(ra_std),
                     "arch": ";".join(sorted({r.arch for r in c.runs}))})
    return rows


def grid_expected_runs(grid_path):
    """The records of ``study.grid.expected_runs(grid_path)``: every run the sweep's grid implies."""
    if not Path(grid_path).is_file():
        raise UserError(f"grid file '{grid_path}' does not exist; pass the GRID.toml of your sweep.")
    return list(study.grid.expected_runs(str(grid_path)))


@dataclass
class Analysis:
    runs: list
    cells: dict
    rows: list          # double_win.csv rows (with internal keys the CSV leaves out)
    level_rows: list
    warnings: list
    missing: list       # one line per level with expected runs that have no result
    protocol_conflicts: list = field(default_factory=list)  # analysis.runs.protocol_conflicts of the runs


def collect(dirs, expected=None, grid_base=None):
    """Read, group and judge the runs under ``dirs``.

    ``expected``: records of ``study.grid.expected_runs`` (docs/contracts.md §7) naming the runs
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
                    missing_messages(missing), protocol_conflicts(runs))


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
            if s in r.get("chance", ()):
                cell += " *"
            if s in r.get("ddof_flips", ()):
                cell += " †"
            line[common.fmt_sparsity(s)] = cell
        table.append(line)
    return ("\n## Double-win per level\n\n" + common.markdown_table(table, fields)
            + "\nwin / no: the verdict of the rule; the number is its support, the fraction of seed resamples "
              "under which the level is double-win. **?** marks an uncertain cell (support between "
              f"{verdict.CONTRADICTED} and {verdict.SUPPORTED}): other seeds could well flip it."
            + (" **\\*** marks a level whose comparison holds a run that ended at chance level on validation SA "
               "and was kept with --allow-chance (its own runs or the dense baseline's; see the warnings)."
               if any(r.get("chance") for r in rows) else "")
            + (" **†** marks a level whose double-win verdict changes when the dense std is the population std "
               "(ddof = 0) instead of the sample std (ddof = 1)." if any(r.get("ddof_flips") for r in rows) else "")
            + "\n")


def resampling_markdown(rows):
    """What the support resampled, and how many judged levels the choice of std estimator decides."""
    judged = sum(len(r.get("supports", {})) for r in rows)
    hierarchical = sum(r.get("hierarchical", 0) for r in rows)
    flips = sum(len(r.get("ddof_flips", ())) for r in rows)
    if not judged:
        return ""
    if hierarchical:
        what = (f"in {hierarchical} of the {judged} judged levels a side has two or more sources (θ_p file, ticket "
                "directory), so the support resampled the sources, then the runs within each drawn source"
                + ("; in the others, the runs (seeds)" if hierarchical < judged else ""))
    else:
        what = (f"each of the {judged} judged levels has one source (θ_p file, ticket directory) per side, so the "
                "support resampled its runs (seeds) only")
    return (f"**Resampled:** {what}. **Std:** the rule uses the dense sample std (ddof = 1); with the population "
            f"std (ddof = 0) {flips} of the {judged} judged levels change their double-win verdict"
            + (", marked **†** below" if flips else "") + ".\n\n")


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
             "extremes are lower bounds at best), no-baseline (no usable dense baseline), threat-mismatch "
             "(the tickets and their dense baseline faced different attacks: not compared).",
             "- levels with missing seeds are never averaged into a verdict; double_win_details.csv lists "
             "every level with its comparison and supports."]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def write_tables(result, out_dir):
    """double_win.csv, double_win.md, double_win_details.csv, summary.csv and warnings.txt of a
    :func:`collect` result in ``out_dir``; returns the warnings, missing runs last."""
    rows = result.rows
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_csv(rows, out_dir / "double_win.csv", CSV_FIELDS)
    atomic_write_text("# Double-win tickets\n\n" + resampling_markdown(rows) + common.markdown_table(rows, CSV_FIELDS)
                      + incomplete_markdown(rows) + levels_markdown(rows) + missing_markdown(result.missing)
                      + notes_markdown(result.warnings), out_dir / "double_win.md")
    common.write_csv(result.level_rows, out_dir / "double_win_details.csv", LEVEL_FIELDS)
    common.write_csv(summary_rows(result.cells), out_dir / "summary.csv", SUMMARY_FIELDS)
    warnings = result.warnings + result.missing
    atomic_write_text("".join(w + "\n" for w in warnings), out_dir / "warnings.txt")
    return warnings


def level_supports(rows):
    """{(dataset, rate, pretrain, label): {level: support}} of every judged level."""
    return {(r["dataset"], float(r["data_rate"]), r["pretrain"], r["method"]): dict(r["supports"]) for r in rows}
