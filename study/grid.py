"""The grid model: a grid file (TOML, docs/contracts.md §7) -> a checked Grid -> every run it implies.

The grid names the θ_p file and the stage-1 ticket directories of each pre-training, the axes and
extra flags. The paper's per-dataset protocol is NOT repeated here: flags the grid leaves unset are
filled by main_downstream.py's own defaults, the one place they live. Every run gets one
deterministic directory below ``out``; ``expected_runs`` hands the same runs to the analysis.
"""

import contextlib
import difflib
import functools
import io
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from masks.family import ticket_family
from study.cellflags import read_cell_flags, refuse_acting_nowhere, run_flags
from study.gridfile import (
    REPO,
    TicketDir,
    flag_args,
    is_name,
    key_line,
    read_flags,
    read_inits,
    replica_dir,
    replica_of,
    sweep_flags,
)
from study.gridfile import fail as _fail
from utils.errors import UserError
from utils.records import read_config, read_results, read_sparsity

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

ENTRY = REPO / "main_downstream.py"

GRID_KEYS = {"out", "pretrain", "axes", "flags", "cell_flags", "stage1"}
PRETRAIN_KEYS = {"init", "tickets"}
AXES_KEYS = {"dataset", "regime", "data_rate", "seed", "rounds", "dense"}
DATASETS = ("cifar10", "cifar100", "svhn", "folder", "digits")
REGIMES = ("st", "fat", "at")
# main_downstream.py's settings the grid sets per run (by whatever alias a [flags] key names them)
AXIS_DESTS = {"dataset", "init", "pretrain", "ticket", "regime", "data_rate", "seed", "save_dir"}


@dataclass
class Grid:
    path: Path
    out: Path
    pretrains: dict  # label -> {"init": str, "tickets": [TicketDir]}
    datasets: list
    regimes: list
    data_rates: list
    seeds: list
    rounds: object  # "all" or a list of ints
    dense: bool
    flags: dict
    source: str = ""  # the grid file's text, to name the line of a refused entry
    stage1: dict = field(default_factory=dict)  # name -> study.stage1.Entry: the ticket directories it makes
    missing: list = field(default_factory=list)  # inputs not there yet (load_grid(..., missing_ok=True))
    cell_flags: list = field(default_factory=list)  # [[cell_flags]] entries (study.cellflags.CellFlags)


@dataclass
class Run:
    dataset: str
    data_rate: float
    regime: str
    pretrain: str
    method: str  # the ticket's method, or "dense"
    sparsity: float  # percent, 0.0 for dense
    seed: int
    round: object  # int, or None for dense
    init: str
    ticket: object  # Path or None
    run_dir: Path
    flags: dict = field(default_factory=dict)
    family: str = ""  # its run directory's family: "dense", the ticket family, "imp-at"
    entry = "main_downstream"

    @property
    def group(self):
        return (self.dataset, self.data_rate, self.pretrain, self.method, self.regime)

    def argv(self):
        """main_downstream.py's arguments for this run."""
        args = ["--dataset", self.dataset, "--init", self.init, "--pretrain", self.pretrain,
                "--ticket", str(self.ticket) if self.ticket else "none", "--regime", self.regime,
                "--data-rate", repr(float(self.data_rate)), "--seed", str(self.seed), "--save-dir", str(self.run_dir)]
        return args + flag_args(self.acting_flags()[0])

    def acting_flags(self):
        """(the grid's flags that act on this run, {flag: where it applies} of those left out). A grid's
        [flags] holds every run's extras, but a flag without effect on a run (--train-steps on an st
        run) is refused by main_downstream.py, so each run gets only the flags that act on it."""
        # the answer depends on nothing else, and plan asks it about every run four times
        key = (self.dataset, self.regime, float(self.data_rate), str(self.ticket) if self.ticket else "none",
               self.init, tuple((k, type(v), repr(v)) for k, v in self.flags.items()))
        if key not in _ACTING:
            _ACTING[key] = self._acting_flags()
        acting, left_out = _ACTING[key]
        return dict(acting), dict(left_out)

    def _acting_flags(self):
        from training import downstream_args  # the stage's own rule of where each of its flags acts

        context = {"dataset": self.dataset, "regime": self.regime, "data_rate": float(self.data_rate),
                   "ticket": str(self.ticket) if self.ticket else "none", "init": self.init,
                   **{k: _typed(k, self.flags[k]) for k in ("subset", "test_steps", "test_eps") if k in self.flags}}
        acting, left_out = {}, {}
        for key, value in self.flags.items():
            flag = "--" + key.replace("_", "-")
            try:
                applies, where = downstream_args.flag_applies(flag, **context)
            except UserError:  # not a flag of the stage: check_flags reports it with the parser's words
                applies = True
            if applies or value is False:
                acting[key] = value
            else:
                left_out[flag] = where
        return acting, left_out

    @property
    def keep_model(self):
        """The model files the run keeps once results.json is written: "best" or "none" (--keep-model)."""
        given = [v for k, v in self.flags.items() if k.replace("-", "_") == "keep_model"]
        return given[-1] if given else "best"  # main_downstream.py's own default

    def command(self, python="python"):
        return shlex.join([python, str(ENTRY), *self.argv()])

    @property
    def done(self):
        """Whether the run's results.json is there and valid; a damaged one is a UserError naming it."""
        return run_finished(self.run_dir)

    def point(self):
        """The grid point this run is, in words."""
        where = "dense" if self.round is None else f"{self.method} round {self.round} ({self.sparsity:.2f}%)"
        return (f"dataset {self.dataset}, data rate {self.data_rate!r}, regime {self.regime}, pretrain "
                f"{self.pretrain}, {where}, seed {self.seed}")


_ACTING = {}  # Run.acting_flags by everything it depends on


def run_finished(run_dir):
    """A stage-2 run directory is finished when its results.json is a valid one (utils.records);
    anything else in that place (a directory, an empty or damaged file) is a UserError naming it."""
    path = Path(run_dir) / "results.json"
    if not os.path.lexists(path):
        return False
    read_results(path)
    return True


def _list_of(grid_path, axes, key, kind, default=None):
    value = axes.get(key, default)
    if value is None:
        _fail(grid_path, f"[axes] needs '{key}', e.g. {key} = {_EXAMPLES[key]}.")
    if not isinstance(value, list):
        value = [value]
    if not value:
        _fail(grid_path, f"[axes] {key} is empty; list at least one value, e.g. {key} = {_EXAMPLES[key]}.")
    for v in value:
        if not kind(v):
            _fail(grid_path, f"[axes] {key} holds {v!r}, which is not valid; use values like {_EXAMPLES[key]}.")
    if len(set(value)) != len(value):
        _fail(grid_path, f"[axes] {key} repeats a value ({value}); list each once.")
    return value


_EXAMPLES = {"dataset": '["cifar10", "cifar100", "svhn"]', "regime": '["st", "at"]', "data_rate": "[1.0, 0.1, 0.01]",
             "seed": "[1, 2, 3]"}


def _read_ticket_dir(grid_path, label, path):
    """Method, re-training and levels of a stage-1 save directory."""
    if not path.is_dir():
        _fail(grid_path, f"[pretrain.{label}] ticket directory '{path}' does not exist; give the --save-dir of a "
                         "main_imp_pretrain.py run (relative paths are relative to the grid file).")
    spars = path / "sparsity.json"
    if not os.path.lexists(spars):
        _fail(grid_path, f"ticket directory '{path}' has no sparsity.json; it is not a finished main_imp_pretrain.py "
                         "--save-dir (rerun stage 1 until it writes its tickets).")
    levels = read_sparsity(spars)
    if not levels:
        _fail(grid_path, f"'{spars}' lists no rounds yet; let stage 1 finish at least one round.")
    method = retrain = pattern = nm = None
    config = path / "config.json"
    if os.path.lexists(config):
        cfg = read_config(config)
        method, retrain = cfg.get("method"), cfg.get("retrain")
        pattern, nm = cfg.get("pattern"), cfg.get("nm")
    if method is None:  # a directory without our config: the ticket file says what it is
        import pruning_utils

        first = path / "tickets" / f"round_{min(levels):02d}.pt"
        ticket = pruning_utils.load_ticket(first)
        method, retrain = ticket.get("method"), ticket.get("retrain")
        pattern, nm = ticket.get("pattern"), ticket.get("nm")
    if method not in ("imp", "omp", "rp", "lmp"):
        _fail(grid_path, f"cannot tell the pruning method of '{path}' (config.json and its tickets name none).")
    # structured tickets are their own family ("omp_channel"): own run directories, own verdict rows
    if not (pattern is None or isinstance(pattern, str)) or not (nm is None or isinstance(nm, list) and len(nm) == 2):
        _fail(grid_path, f"the stage-1 run in '{path}' names the sparsity pattern {pattern!r} (N:M {nm!r}), which "
                         "this tool does not write; rerun stage 1 there.")
    method = ticket_family(method, pattern, nm)
    name = f"{method}-at" if method == "imp" and retrain == "at" else method
    if not is_name(name):
        _fail(grid_path, f"the ticket family {name!r} of '{path}' is not a plain name (letters, digits, '.', '_', '-'), "
                         "and it would become a directory of its runs; rerun stage 1 there.")
    return TicketDir(path=path, method=method, retrain=retrain, levels=levels, name=name)


def load_grid(grid_path, missing_ok=False):
    """Read and check a grid file; every problem is one UserError naming it and the fix.
    ``missing_ok``: a θ_p file or ticket directory that is not there yet is a line of
    ``Grid.missing`` instead (``plan`` before any input exists)."""
    grid_path = Path(grid_path)
    if not grid_path.is_file():
        raise UserError(f"grid file '{grid_path}' does not exist; pass a TOML file such as script/grids/fig3.toml.")
    if tomllib is None:
        raise UserError("reading a grid file on Python < 3.11 needs the tomli package; `pip install tomli`.")
    try:
        source = grid_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = grid_path.read_bytes()[:exc.start].count(b"\n") + 1
        raise UserError(f"grid file '{grid_path}', line {line}: not UTF-8 text (byte {exc.start}); save the file as "
                        "UTF-8.") from None
    except OSError as exc:
        raise UserError(f"grid file '{grid_path}' cannot be read ({exc.strerror or exc}).") from None
    try:
        spec = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        message = " ".join(str(exc).split())
        raise UserError(f"grid file '{grid_path}' is not valid TOML ({message}); fix the line it names.") from None
    return build_grid(spec, grid_path.resolve().parent, grid_path, source, missing_ok)


def build_grid(spec, base, grid_path, source="", missing_ok=False):
    """A checked Grid from the parsed file ``spec`` (whose text ``source``, when given, names the
    lines of refused entries); relative paths are taken from ``base``.
    (script/demo.py builds its grid in code through this.)"""
    base = Path(base)
    unknown = sorted(set(spec) - GRID_KEYS)
    if unknown:
        _fail(grid_path, f"unknown key(s) {', '.join(unknown)}; the file holds only out, [pretrain.LABEL], [axes] "
                         "[flags], [[cell_flags]] and [stage1.NAME] (docs/contracts.md §7).")
    if not isinstance(spec.get("out"), str) or not spec["out"]:
        _fail(grid_path, "needs out = \"DIR\", the folder every run directory goes below.")
    pretrain = spec.get("pretrain")
    if not isinstance(pretrain, dict) or not pretrain:
        _fail(grid_path, "needs at least one [pretrain.LABEL] table with init = \"θ_p file\" and tickets = [...].")
    for label in pretrain:
        if not is_name(label):
            _fail(grid_path, f"the pre-training label {label!r} is not a plain name (letters, digits, '.', '_', '-'; "
                             "not '.' or '..'): it becomes a directory of every run; rename [pretrain.LABEL].",
                  _header_line(source, label))
    axes = _read_axes(grid_path, spec.get("axes"))
    made, missing = {}, [] if missing_ok else None
    if "stage1" in spec:  # only a grid that makes its own tickets pays for stage 1's imports
        from study.stage1 import read_entries

        made = read_entries(grid_path, base, spec["stage1"], pretrain, source)
    pretrains = {label: _read_pretrain(grid_path, base, label, table, axes["rounds"], made, missing)
                 for label, table in pretrain.items()}
    if not axes["dense"] and not any(p["tickets"] for p in pretrains.values()) and not missing:
        _fail(grid_path, "implies no runs: no pre-training lists tickets and dense = false.")
    flags = read_flags(grid_path, base, spec.get("flags", {}), source)
    cells = _read_cells(grid_path, base, spec.get("cell_flags", []), source, axes, pretrains, missing)
    return Grid(path=Path(grid_path).resolve(), out=(base / spec["out"]).resolve(), pretrains=pretrains,
                datasets=axes["datasets"], regimes=axes["regimes"], data_rates=[float(r) for r in axes["rates"]],
                seeds=axes["seeds"], rounds=axes["rounds"], dense=axes["dense"], flags=flags, source=source,
                stage1=made, missing=missing or [], cell_flags=cells)


def _read_cells(grid_path, base, entries, source, axes, pretrains, missing):
    """The checked [[cell_flags]] entries, each match value one that some run of the grid holds."""
    # a ticket directory not there yet has a method nobody knows, so the runs' methods are not all known
    families = None if any("ticket directory" in m for m in missing or []) else [
        (label, m, f) for label, pre in pretrains.items()
        for m, f in [("dense", "dense")] * axes["dense"] + [(d.method, d.name) for d in pre["tickets"]]]
    known = {"dataset": axes["datasets"], "data_rate": [float(r) for r in axes["rates"]],
             "regime": axes["regimes"], "pretrain": list(pretrains)}
    return read_cell_flags(grid_path, base, entries, source, known, families)


def _header_line(source, label):
    """The line of the [pretrain.LABEL] header (the label bare or quoted), or None."""
    spelled = {f"pretrain.{label}", f'pretrain."{label}"', f"pretrain.'{label}'"}
    for number, line in enumerate(source.splitlines(), 1):
        header = re.fullmatch(r"\[([^\[\]]+)\]\s*(#.*)?", line.strip())
        if header and "".join(header.group(1).split()) in {"".join(h.split()) for h in spelled}:
            return number
    return None


def _read_axes(grid_path, axes):
    """The checked [axes] table: datasets, regimes, rates, seeds, rounds ("all" or a list), dense."""
    if not isinstance(axes, dict):
        _fail(grid_path, "needs an [axes] table (dataset, regime, data_rate, seed, rounds, dense).")
    unknown = sorted(set(axes) - AXES_KEYS)
    if unknown:
        _fail(grid_path, f"unknown key(s) in [axes]: {', '.join(unknown)}; use {', '.join(sorted(AXES_KEYS))}.")
    datasets = _list_of(grid_path, axes, "dataset", lambda v: v in DATASETS)
    regimes = _list_of(grid_path, axes, "regime", lambda v: v in REGIMES)
    rates = _list_of(grid_path, axes, "data_rate",
                     lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1, default=[1.0])
    seeds = _list_of(grid_path, axes, "seed", lambda v: isinstance(v, int) and not isinstance(v, bool))
    rounds = axes.get("rounds", "all")
    if rounds != "all":
        if not isinstance(rounds, list) or not rounds or not all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rounds):
            _fail(grid_path, f"[axes] rounds must be \"all\" or a non-empty list of round numbers such as [1, 5, 10], "
                             f"not {rounds!r}.")
        if any(b <= a for a, b in zip(rounds, rounds[1:])):
            _fail(grid_path, f"[axes] rounds must list each round once, in increasing order (such as [1, 5, 10]), "
                             f"not {rounds!r}.")
    dense = axes.get("dense", True)
    if not isinstance(dense, bool):
        _fail(grid_path, f"[axes] dense must be true or false, not {dense!r}.")
    return {"datasets": datasets, "regimes": regimes, "rates": rates, "seeds": seeds, "rounds": rounds,
            "dense": dense}


def _read_pretrain(grid_path, base, label, table, rounds, made=None, missing=None):
    """One checked [pretrain.LABEL] table: {"init": the (first) θ_p path or "none", "inits": the θ_p
    of each replicate, "tickets": [TicketDir] of every replicate, "replicas": their count}.
    ``made``: the grid's stage-1 entries (their directories need not exist); ``missing``: a list to
    note absent inputs in, instead of refusing them."""
    if not isinstance(table, dict):
        _fail(grid_path, f"pretrain.{label} must be a table with init and tickets.")
    unknown = sorted(set(table) - PRETRAIN_KEYS)
    if unknown:
        _fail(grid_path, f"unknown key(s) in [pretrain.{label}]: {', '.join(unknown)}; use init and tickets.")
    inits = [_read_init(grid_path, base, label, i, missing) for i in read_inits(grid_path, label, table.get("init"))]
    tickets = table.get("tickets", [])
    if isinstance(tickets, str):
        tickets = [tickets]
    if not isinstance(tickets, list) or not all(isinstance(t, str) or (
            isinstance(t, list) and t and all(isinstance(u, str) for u in t)) for t in tickets):
        _fail(grid_path, f"[pretrain.{label}] tickets must be a list of stage-1 directories (each a directory, or a "
                         "list of one directory per replicate).")
    families = [_ticket_replicas(grid_path, base, label, t, made, missing) for t in tickets]
    families = [f for f in families if f is not None]
    count = max([len(inits)] + [len(f) for f in families])
    for t, fam in zip(tickets, families):
        if len(fam) != count or len(inits) not in (1, count):
            _fail(grid_path, f"[pretrain.{label}] has {len(inits)} θ_p file(s) but its tickets entry {t!r} names "
                             f"{len(fam)} directory(ies); replicated sources need one ticket directory per replicate, "
                             f"{count} for every entry, in the order of init.")
    dirs = [d for fam in families for d in fam]
    _check_ticket_dirs(grid_path, label, dirs, rounds)
    return {"init": inits[0], "inits": inits, "tickets": dirs, "replicas": count}


def _read_init(grid_path, base, label, init, missing):
    """One θ_p path taken from ``base`` (or "none"); an absent file is refused or noted in ``missing``."""
    if init.lower() == "none":
        return init
    init_path = base / init
    if not init_path.exists() and missing is not None:
        missing.append(f"[pretrain.{label}] init '{init_path}': θ_p is not there yet (`run` needs it)")
    elif not init_path.exists():
        _fail(grid_path, f"[pretrain.{label}] init '{init_path}' does not exist; point it at your θ_p "
                         "checkpoint (relative paths are relative to the grid file).")
    return str(init_path)


def _ticket_replicas(grid_path, base, label, item, made, missing):
    """The replicates of one tickets entry, replicate 1 first: a list's directories, the directories
    of a replicated [stage1.NAME] entry whose save_dir it names, or one directory; None when absent."""
    entries = (made or {}).values()
    if isinstance(item, str):
        group = sorted((e for e in entries if e.replicas > 1 and e.group_dir == (base / item).resolve()),
                       key=lambda e: e.replica)
        item = [e.save_dir for e in group] or [item]
    dirs = []
    for i, t in enumerate(item, 1):
        entry = next((e for e in entries if e.save_dir == (base / t).resolve()), None)
        if entry is not None:
            from study.stage1 import ticket_dir

            d = ticket_dir(entry)
        elif missing is not None and not (base / t).exists():
            missing.append(f"[pretrain.{label}] ticket directory '{base / t}' is not there and no [stage1.NAME] "
                           "entry makes it: its runs are not listed")
            return None
        else:
            d = _read_ticket_dir(grid_path, label, base / t)
        d.replica = i
        dirs.append(d)
    return dirs


def _check_ticket_dirs(grid_path, label, dirs, rounds):
    """One directory per method name and replicate in a pre-training, each holding every round the
    grid asks for; the replicates of a method at the same levels, no directory twice."""
    paths = [d.path.resolve() for d in dirs]
    twice = next((p for p in paths if paths.count(p) > 1), None)
    if twice is not None:
        _fail(grid_path, f"[pretrain.{label}] lists the ticket directory '{twice}' twice; each replicate needs "
                         "its own ticket search.")
    names = [(d.name, d.replica) for d in dirs]
    for name in set(names):
        if names.count(name) > 1:
            clash = [str(d.path) for d in dirs if (d.name, d.replica) == name]
            _fail(grid_path, f"[pretrain.{label}] has two ticket directories of method '{name}' ({', '.join(clash)}); "
                             "the analysis tells runs apart by pre-training label and method, so give one of "
                             "them its own [pretrain.LABEL] table.")
    first = {d.name: d for d in dirs if d.replica == 1}
    for d in dirs:
        if d.levels != first[d.name].levels and (rounds == "all" or any(
                d.levels.get(r) != first[d.name].levels.get(r) for r in rounds)):
            _fail(grid_path, f"[pretrain.{label}]: the replicates '{first[d.name].path}' and '{d.path}' of method "
                             f"'{d.name}' are at other levels; a cell's replicates must share its sparsity (list "
                             "rounds they share, or let stage 1 finish them alike).")
    if rounds != "all":
        for d in dirs:
            absent = [r for r in rounds if r not in d.levels]
            if absent:
                has = f"[stage1.{d.made_by}] makes" if d.made_by else "it has"
                _fail(grid_path, f"round(s) {absent} are not in '{d.path / 'sparsity.json'}' ({has} "
                                 f"{sorted(d.levels)}); list rounds it has or let stage 1 finish them.")
    for d in (d for d in dirs if not d.made_by):  # a stage-1 entry's tickets come while the grid runs
        for r in (d.levels if rounds == "all" else rounds):
            if not (d.path / "tickets" / f"round_{r:02d}.pt").is_file():
                _fail(grid_path, f"'{d.path / 'tickets' / f'round_{r:02d}.pt'}' is missing although "
                                 "sparsity.json lists it; rerun stage 1 in that directory.")


def level_dir(sparsity):
    return f"s{sparsity:05.2f}"


def expand(grid, flags_for=None):
    """Every run the grid implies, in a fixed order, each with its flags: [flags], then the
    [[cell_flags]] entries that match it. ``flags_for(run) -> dict`` may add or override flags per
    run on top (the digits demo uses it for its shortened schedules)."""
    runs = []
    for dataset in grid.datasets:
        for rate in grid.data_rates:
            for regime in grid.regimes:
                for label, pre in grid.pretrains.items():
                    runs += _label_runs(grid, dataset, rate, regime, label, pre, flags_for)
    _refuse_shared_dirs(grid, runs)
    return runs


def _label_runs(grid, dataset, rate, regime, label, pre, flags_for):
    """The runs of one pre-training at one (dataset, rate, regime): each cell's seeds dealt over its
    replicates (the dense runs over the θ_p files alone), a replicate's runs below repI/ when there
    are several."""
    base = grid.out / dataset / f"rate{rate:g}" / regime / label
    inits = pre.get("inits", [pre["init"]])
    cells = []
    if grid.dense:
        cells.append(("dense", "dense", 0.0, None, [None] * len(inits)))
    for td in (d for d in pre["tickets"] if d.replica == 1):
        replicas = [d for d in pre["tickets"] if d.name == td.name]
        for r in sorted(td.levels if grid.rounds == "all" else grid.rounds):
            s = round(td.levels[r], 2)
            cells.append((td.method, td.name, s, r, [d.path / "tickets" / f"round_{r:02d}.pt" for d in replicas]))
    runs = []
    for method, family, s, r, tickets in cells:
        where = base / family / (level_dir(s) if r is not None else "")
        count = max(len(tickets), len(inits))
        for position, seed in enumerate(grid.seeds):
            i = replica_of(position, count)
            run = Run(dataset=dataset, data_rate=rate, regime=regime, pretrain=label, method=method, sparsity=s,
                      seed=seed, round=r, init=inits[(i - 1) % len(inits)], ticket=tickets[(i - 1) % len(tickets)],
                      run_dir=where / replica_dir(i, count) / f"seed{seed}", family=family)
            run.flags = sweep_flags(run_flags(grid.flags, grid.cell_flags, run))
            if flags_for is not None:
                run.flags.update(flags_for(run))
            runs.append(run)
    return runs


def _refuse_shared_dirs(grid, runs):
    """Two grid points in one run directory would make the second look finished by the first's results."""
    seen = {}
    for run in runs:
        other = seen.setdefault(run.run_dir, run)
        if other is not run:
            _fail(grid.path, f"two runs map to one directory '{run.run_dir}': ({other.point()}) and ({run.point()}); "
                             "their directory names round the data rate or the sparsity alike, so list only one "
                             "of them ([axes] rounds, data_rate).")


def expected_record(r):
    """A run as the analysis reads it from the grid: the fields of its cell and its directory."""
    return {"dataset": r.dataset, "data_rate": r.data_rate, "pretrain": r.pretrain, "method": r.method,
            "sparsity": r.sparsity, "regime": r.regime, "seed": r.seed, "run_dir": str(r.run_dir)}


def expected_runs(grid_path):
    """The runs a grid file implies, as plain dicts (for analysis/plot_curves.py --grid)."""
    return [expected_record(r) for r in expand(load_grid(grid_path))]


@functools.lru_cache(maxsize=None)
def stage_options():
    """main_downstream.py's option strings -> their argparse actions."""
    from training import downstream_args

    return {o: a for a in downstream_args.build_parser()._actions for o in a.option_strings}


def _typed(key, value):
    """A [flags] value as main_downstream.py's parser reads it (test_steps = "2" is the number 2)."""
    action = stage_options().get(flag_args({key: True})[0])
    if isinstance(value, str) and action is not None and callable(action.type):
        with contextlib.suppress(Exception):  # a value the parser refuses: check_flags says so in one line
            return action.type(value)
    return value


def refuse_flags_acting_nowhere(grid, runs):
    """A [flags] entry left out of every run (Run.acting_flags: it has no effect on any of them) is
    refused with its line, as main_downstream.py refuses a flag without effect."""
    left_out = {}
    for r in runs:
        for flag, where in r.acting_flags()[1].items():
            left_out.setdefault(flag, [where, 0])[1] += 1
    for key in grid.flags:
        flag = flag_args({key: True})[0]
        if runs and left_out.get(flag, [None, 0])[1] == len(runs):
            _fail(grid.path, f"[flags] {key} ({flag}) has no effect on any run of the grid: it {left_out[flag][0]}; "
                             "drop it.", key_line(grid.source, "flags", key))
    refuse_acting_nowhere(grid.path, grid.cell_flags, runs)


def check_flag_keys(grid):
    """Every [flags] and [[cell_flags]] key must be, spelt out in full, a flag of main_downstream.py's
    parser, and none may set what the grid sets per run (an axis, the θ_p file, the ticket, the run
    directory)."""
    options = {o: a.dest for o, a in stage_options().items()}
    tables = [("[flags]", grid.flags, lambda k: key_line(grid.source, "flags", k))]
    tables += [(f"{c.where} flags", c.flags, c.line_of) for c in grid.cell_flags]
    for where, flags, line_of in tables:
        for key in flags:
            flag, line = flag_args({key: True})[0], line_of(key)
            if flag not in options:
                near = difflib.get_close_matches(flag, [o for o in options if o.startswith("--")], n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                _fail(grid.path, f"main_downstream.py rejects the grid's flags: {where} {key} would be {flag}, which "
                                 f"is not one of its flags{hint}; fix or remove it (python main_downstream.py --help).",
                      line)
            if options[flag] in AXIS_DESTS:
                _fail(grid.path, f"{where} sets '{key}' ({flag}, main_downstream.py's {options[flag]}), which the "
                                 f"grid sets per run from [axes] and [pretrain.*]; remove it from {where}.", line)


def check_flags(runs):
    """Let main_downstream.py's own parser and defaults judge the flags, before hundreds of runs fail
    on them: once per kind of run (dataset, regime, data rate, dense or not: the flags each gets)."""
    from training import downstream_args

    kinds = {}
    for r in runs:
        kinds.setdefault((r.dataset, r.regime, r.data_rate, r.ticket is None, str(r.init).lower() == "none",
                          tuple(flag_args(r.acting_flags()[0]))), r)
    for run in kinds.values():
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                downstream_args.config_for(run.argv())
            continue
        except SystemExit:
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            reason = lines[-1].split(" error: ", 1)[-1].removeprefix("error: ") if lines else "usage error"
        except UserError as exc:  # a value its defaults resolution refuses (e.g. epochs = 0)
            reason = str(exc).rstrip(".")
        raise UserError(f"main_downstream.py rejects the grid's flags ({reason}); fix [flags] in the grid file.")
