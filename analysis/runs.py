"""The stage-2 runs as the double-win table reads them, grouped into cells (docs/contracts.md §5).

Every results.json under the given directories is one Run. Method labels: the results' "method"
(a structured ticket adds its pattern, masks.family.ticket_family; an IMP ticket that was not
rewound to θ_p adds its rewind variant, "imp-norewind" or "imp-rewK", :func:`rewind_family`; a run of
stage 2's --random-reinit ablation adds "-reinit"); when the IMP runs of the
analysis use tickets of more than one re-training kind (read from the ticket's stage-1 config.json
or the ticket file, when they still exist), IMP runs become "imp-st" / "imp-at" so the two are never
averaged together. A results.json with SA/RA outside [0, 100], or whose ticket file exists but is
not a torch file, is skipped with a warning; runs made with --linear-eval are left out of the
verdict (analysis/plot_companion.py draws them).

A cell is (dataset, data rate, pretrain label, method label, regime, sparsity); its runs are
averaged over seeds only when complete: a level with fewer seeds than the most any level of its
group has (or a duplicated seed, or an AT run without RA) is marked incomplete with a warning.
Runs of one cell trained or tested with different ε, α, attack steps or norm are refused (UserError).

Each Run also keeps its protocol (:data:`PROTOCOL_KEYS`, the settings that change what a run
computes) and whether stage 2 recorded it as ending at chance level (``config.chance_level``, a run
kept with ``--allow-chance``); :func:`protocol_conflicts` lists the groups whose runs differ in one.
"""

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from analysis import common
from masks.family import rewind_epoch, ticket_family
from utils import records
from utils.errors import UserError

DENSE = "dense"


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
    family: str = ""  # the method, plus the sparsity pattern of a structured ticket (masks.family.ticket_family)
    label: str = ""
    attack: dict = field(default_factory=dict)
    stage1: Optional[Path] = None
    protocol: dict = field(default_factory=dict)
    chance: bool = False  # stage 2 found it at chance level and kept it (--allow-chance)
    # the results.json as read (less its per-epoch history, analysis.common.read_results), so no tool reads it twice
    results: dict = field(default_factory=dict, repr=False)

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


def csv_number(v):
    """A value as the CSV files write it: rounded to 6 places, empty when missing."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 6)


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


def _stage1_dir(candidates, cache):
    """The stage-1 save dir of SAVE_DIR/tickets/round_XX.pt (docs/contracts.md §2) holding sparsity.json, or None."""
    for cand in candidates:
        # exists, not is_file: a damaged sparsity.json (a directory, say) is reported, not passed over
        if cand.parent.name == "tickets" and _exists(cand.parent.parent / "sparsity.json", cache):
            return cand.parent.parent
    return None


def _exists(path, cache):
    """path.exists(), asked once per path in one load_runs (thousands of runs share a few tickets)."""
    key = ("exists", str(path))
    if key not in cache:
        cache[key] = path.exists()
    return cache[key]


def _ticket_retrain(ticket_path, method, cache):
    """(re-training kind "st"/"at" or None, problem or None) of a run's ticket file.

    A ticket file that is gone leaves the kind unknown (the run stands: tickets may be moved after
    training); one that exists but is not a readable torch file is a problem, and the run is skipped.
    """
    if ticket_path is None or not _exists(ticket_path, cache):
        return None, None
    key = common.resolved_path(ticket_path, cache)
    if key not in cache:
        cache[key] = _read_retrain(ticket_path, method)
    return cache[key]


def _ticket_family(ticket_path, method, cache):
    """The ticket's family (masks.family.ticket_family): from the stage-1 config.json beside its
    tickets/ when there is one (an older config without 'pattern' is unstructured), else from the file
    (loading torch only then: status and the analysis of a sweep's runs need none)."""
    if ticket_path is None or not _exists(ticket_path, cache):
        return method
    key = ("family", common.resolved_path(ticket_path, cache))
    if key not in cache:
        family = None
        cfg = _stage1_config(ticket_path)
        nm = cfg.get("nm")
        if (cfg.get("method") == method and isinstance(cfg.get("pattern"), (str, type(None)))
                and (nm is None or (isinstance(nm, list) and len(nm) == 2))):
            family = rewind_family(ticket_family(method, cfg.get("pattern"), nm), cfg.get("rewind"))
        if family is None:
            import pruning_utils

            try:
                t = pruning_utils.load_ticket(ticket_path)
                family = rewind_family(ticket_family(method, t.get("pattern"), t.get("nm")),
                                       t.get("rewind"))
            except Exception:  # noqa: BLE001 - _ticket_retrain already reported an unreadable file
                family = method
        cache[key] = family
    return cache[key]


def rewind_family(family, rewind):
    """IMP's rewind variants are families of their own (never one line or verdict row): rewinding to
    θ_p keeps the plain name (a stage-1 config records it as null), no rewinding adds "-norewind",
    rewinding to epoch K of the first re-training round "-rewK"."""
    if rewind in (None, "theta_p") or not isinstance(rewind, str):
        return family
    k = rewind_epoch(rewind)
    return f"{family}-norewind" if rewind == "none" else f"{family}-rew{k}" if k else f"{family}-{rewind}"


def _stage1_config(ticket_path):
    """The stage-1 config.json beside SAVE_DIR/tickets/, or {} when there is none or it is damaged:
    it only spares loading the ticket file, which then answers instead."""
    path = ticket_path.parent.parent / "config.json"
    if not path.exists():
        return {}
    try:
        return records.read_config(path)
    except UserError:
        return {}


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
    cfg = _stage1_config(ticket_path)
    if cfg.get("method") == method and cfg.get("retrain") in ("st", "at"):
        return cfg["retrain"], None
    if cfg.get("method") == method and method not in ("imp", "lmp") and "retrain" in cfg and cfg["retrain"] is None:
        return None, None  # OMP and RP re-train nothing: stage 1 records (and writes into the ticket) no re-training
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
# the threat model: a ticket cell and its dense baseline are compared only when these agree
THREAT_KEYS = ATTACK_KEYS + ("norm",)
# What else changes what a run computes, so runs of one figure group must agree on it
# (docs/analysis.md). Left out: the seed (an axis), paths (init, data, save dir: the same file has
# other paths on other machines), the numeric precision (the machine's; compare_verdicts.py measures
# its effect) and settings that only stop, time or log a run (max_loss, checkpointing, progress).
PROTOCOL_KEYS = ("arch", "cifar_stem", "reinit_stem", "image_size", "classes", "augment", "val_size", "subset",
                 "subset_seed", "epochs", "lr", "momentum", "weight_decay", "batch_size", "schedule", "milestones",
                 "eval_from", "attack_bn", "fat_guard") + THREAT_KEYS
# Every config key the verdict code reads from a run's results.json (protocol, threat model, the
# kinds of run it sets apart): `status` keeps only these of 31,000 runs in memory (slim_results)
VERDICT_CONFIG_KEYS = frozenset(PROTOCOL_KEYS + ("ticket", "linear_eval", "random_reinit", "chance_level"))


def slim_results(obj):
    """``obj`` (a compacted results dict) with only the config keys the verdict code reads: the same
    verdicts from a third of the memory (tests/test_bench_grid_scale.py compares status's text)."""
    config = obj.get("config")
    if not isinstance(config, dict):
        return obj
    return {**obj, "config": {k: v for k, v in config.items() if k in VERDICT_CONFIG_KEYS}}


# settings a regime does not use: ST trains without an attack, and only FAT has the guard
_UNUSED = {"st": TRAIN_ATTACK_KEYS + ("attack_bn", "fat_guard"), "at": ("fat_guard",)}


def _setting(value):
    """A config value as runs are compared on it: numbers as rounded floats, lists as tuples; None
    when it is none of those (or not finite)."""
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return round(float(value), 9) if math.isfinite(value) else None
    if isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value):
        return tuple(_setting(v) for v in value)
    return None


def _attack_settings(obj):
    """The attack settings a run's numbers depend on: {key: value} for those its results record.

    ST trains without an attack, so only the test attack counts for it.  Unrecorded settings (older
    results) are left out rather than guessed, so they never conflict.
    """
    cfg = _config(obj)
    out = {}
    for key in THREAT_KEYS:
        if obj["regime"] == "st" and key in TRAIN_ATTACK_KEYS:
            continue
        value = cfg.get(key, obj.get(key))
        if key == "test_eps" and value is None:
            value = cfg.get("eps", obj.get("eps"))  # main_downstream.py: --test-eps defaults to --eps
        if key == "norm":
            if isinstance(value, str) and value:
                out[key] = value.lower()
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = round(float(value), 9)
    return out


def _protocol(obj, attack):
    """{key: value} of the PROTOCOL_KEYS a run records and its regime uses (recorded ones only, as above)."""
    cfg = _config(obj)
    out = {"arch": obj["arch"]}
    for key in PROTOCOL_KEYS:
        if key in THREAT_KEYS or key == "arch" or key in _UNUSED.get(obj["regime"], ()):
            continue
        if key == "milestones" and cfg.get("schedule") == "cosine":
            continue  # a cosine schedule ignores them
        if key not in cfg:
            continue
        value = cfg[key]  # null is a value of its own: "the default"
        if value is not None:
            value = _setting(value)
            if value is None:  # not a number, string or list of them: nothing to compare
                continue
        out[key] = value
    out.update(attack)
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
        ticket = next((c for c in candidates if _exists(c, cache)), None)
        retrain, problem = _ticket_retrain(ticket, method, cache)
        family = method if method == DENSE or problem else _ticket_family(ticket, method, cache)
        if method != DENSE and _config(obj).get("random_reinit") is True:  # the mask on fresh weights
            family += "-reinit"
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
                        stage1=_stage1_dir(candidates, cache), chance=_config(obj).get("chance_level") is True,
                        results=obj))
        runs[-1].protocol = _protocol(obj, runs[-1].attack)
    if not runs:
        raise UserError(f"none of the {len(paths)} results.json files found is usable ({warnings[0]}); "
                        "pass directories of finished main_downstream.py runs.")
    assign_labels(runs)
    chance = [str(r.path.parent) for r in runs if r.chance]
    if chance:
        warnings.append(f"{len(chance)} run(s) ended at chance level on validation SA and were kept with --allow-chance "
                        f"({', '.join(chance)}); the double-win table marks their levels * (double_win.md).")
    return runs, warnings


def _config(obj):
    return obj["config"] if isinstance(obj.get("config"), dict) else {}


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


# --------------------------------------------------------------------------- cells

def group_text(dataset, rate, pretrain, label, regime=None):
    """How warnings name a group (and regime): "cifar10, data rate 1.0, pretrain at, method imp"."""
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
    for key in sorted(cells, key=cell_sort_key):
        ds, rate, pre, label, regime, s = key
        cell = cells[key]
        cell.expected = expected[(ds, rate, pre, label)]
        level = "dense baseline" if label == DENSE else f"level {common.fmt_sparsity(s)}%"
        where = group_text(ds, rate, pre, label, regime)
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


def fmt_setting(key, value):
    """How messages name a setting: "test_eps 0.0313725 (= 8/255)", "epochs 2", "val_size unset"."""
    if value is None:
        return f"{key} unset (the default)"
    if isinstance(value, bool) or not isinstance(value, float):
        return f"{key} {list(value) if isinstance(value, tuple) else value}"
    if key in ("eps", "alpha", "test_eps", "test_alpha"):
        return f"{key} {value:.6g} (= {value * 255:.4g}/255)"
    return f"{key} {value:g}"


def check_attack_settings(cells):
    """UserError when the runs of one cell were trained or tested under different attacks.

    Averaging a PGD-10 run at ε = 8/255 with one at 4/255 gives a number that is neither, and the
    verdict built on it means nothing; every conflict is listed with its run directories.
    """
    conflicts = []
    for key in sorted(cells, key=cell_sort_key):
        ds, rate, pre, label, regime, s = key
        runs = cells[key].runs
        for setting in THREAT_KEYS:
            by_value = defaultdict(list)
            for r in runs:
                if setting in r.attack:
                    by_value[r.attack[setting]].append(str(r.path.parent))
            if len(by_value) > 1:
                level = "dense baseline" if label == DENSE else f"level {common.fmt_sparsity(s)}%"
                listed = "; ".join(f"{fmt_setting(setting, v)} in {', '.join(dirs)}"
                                   for v, dirs in sorted(by_value.items()))
                conflicts.append(f"{group_text(ds, rate, pre, label, regime)}, {level}: {listed}")
    if conflicts:
        raise UserError("runs that would be averaged into one cell were run with different attack settings ("
                        + " | ".join(conflicts) + "); pass runs of one ε, α, step count and norm per analysis "
                        "(separate folders, separate plot_curves.py calls) or rerun them with one setting.")


def cell_threat(cell):
    """The threat model of a cell's runs: the settings any of them records (check_attack_settings has
    made them agree)."""
    out = {}
    for r in cell.runs:
        out.update(r.attack)
    return out


def threat_differences(cell, base):
    """[(setting, the cell's value, the baseline's value)] of the threat-model settings both record
    and differ in: a ticket cell is only compared with a dense baseline that faced the same attack."""
    mine, theirs = cell_threat(cell), cell_threat(base)
    return [(k, mine[k], theirs[k]) for k in THREAT_KEYS if k in mine and k in theirs and mine[k] != theirs[k]]


def protocol_conflicts(runs):
    """One text per (figure group, setting) whose runs differ in that setting of :data:`PROTOCOL_KEYS`:
    the group, then each value with one run directory that has it.

    A figure group is (dataset, data rate, pretrain, method label, regime): its levels are drawn as one
    line and judged together, so a level trained for other epochs (a grid changed after some runs
    finished, say) would bend the curve without a trace.
    """
    groups = defaultdict(list)
    for r in runs:
        groups[(r.dataset, r.data_rate, r.pretrain, r.label, r.regime)].append(r)
    out = []
    for key in sorted(groups, key=lambda k: cell_sort_key(k + (0.0,))):
        for setting in PROTOCOL_KEYS:
            by_value = {}
            for r in sorted(groups[key], key=lambda r: str(r.path)):
                if setting in r.protocol:
                    by_value.setdefault(r.protocol[setting], r.path.parent)
            if len(by_value) > 1:
                values = sorted(by_value.items(), key=lambda kv: (kv[0] is not None, type(kv[0]).__name__,
                                                                  "" if kv[0] is None else kv[0]))
                out.append(f"{group_text(*key)}: " + " vs ".join(f"{fmt_setting(setting, v)} (e.g. '{d}')"
                                                                  for v, d in values))
    return out


def cell_sort_key(key):
    """The order of every table: dataset, data rate high to low, then the paper's order of labels."""
    ds, rate, pre, label, regime, s = key
    return (ds, -rate, common.order_key(pre, common.PRETRAIN_ORDER),
            common.order_key(label, (DENSE,) + common.METHOD_ORDER), common.order_key(regime, ("st", "at", "fat")), s)


def groups_of(cells):
    """Sorted (dataset, rate, pretrain, label) of every ticket group (dense runs are baselines)."""
    keys = {k[:4] for k in cells if k[3] != DENSE}
    return sorted(keys, key=lambda g: (g[0], -g[1], common.order_key(g[2], common.PRETRAIN_ORDER),
                                       common.order_key(g[3], common.METHOD_ORDER)))
