"""The grid model: a grid file (TOML, DESIGN.md §5.7) -> a checked Grid -> every run it implies.

The grid names the θ_p file and the stage-1 ticket directories of each pre-training, the axes and
extra flags. The paper's per-dataset protocol is NOT repeated here: flags the grid leaves unset are
filled by main_downstream.py's own defaults, the one place they live. Every run gets one
deterministic directory below ``out``; ``expected_runs`` hands the same runs to the analysis.
"""

import contextlib
import io
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "main_downstream.py"

GRID_KEYS = {"out", "pretrain", "axes", "flags"}
PRETRAIN_KEYS = {"init", "tickets"}
AXES_KEYS = {"dataset", "regime", "data_rate", "seed", "rounds", "dense"}
DATASETS = ("cifar10", "cifar100", "svhn", "folder", "digits")
REGIMES = ("st", "fat", "at")
# Flags every run gets from the grid's own structure; a [flags] entry may not override them.
AXIS_FLAGS = {"dataset", "init", "pretrained", "pretrain", "ticket", "tickets_file", "mask", "regime", "data_rate",
              "data_number", "seed", "save_dir"}
PATH_FLAGS = {"data"}  # [flags] values that are paths, hence relative to the grid file


@dataclass
class TicketDir:
    path: Path
    method: str
    retrain: object
    levels: dict  # round -> sparsity (percent)
    name: str = ""  # the run-directory component: the method, "-at" added for adversarially re-trained IMP


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
        import main_downstream  # the stage's own rule of where each of its flags acts

        context = {"dataset": self.dataset, "regime": self.regime, "data_rate": float(self.data_rate),
                   "ticket": str(self.ticket) if self.ticket else "none", "init": self.init,
                   **{k: self.flags[k] for k in ("subset", "test_steps", "test_eps") if k in self.flags}}
        acting, left_out = {}, {}
        for key, value in self.flags.items():
            flag = "--" + key.replace("_", "-")
            try:
                applies, where = main_downstream.flag_applies(flag, **context)
            except UserError:  # not a flag of the stage: check_flags reports it with the parser's words
                applies = True
            if applies or value is False:
                acting[key] = value
            else:
                left_out[flag] = where
        return acting, left_out

    def command(self, python="python"):
        return shlex.join([python, str(ENTRY), *self.argv()])

    @property
    def done(self):
        return (self.run_dir / "results.json").exists()


def _fail(grid_path, message):
    raise UserError(f"grid file '{grid_path}': {message}")


def _fmt_value(value):
    return repr(value) if isinstance(value, float) else str(value)


def flag_args(flags):
    """[flags] -> argv: key -> --key (underscores -> dashes), true -> bare flag, false -> omitted,
    a list -> comma-joined."""
    out = []
    for key, value in flags.items():
        name = "--" + key.replace("_", "-")
        if value is True:
            out.append(name)
        elif value is False:
            continue
        elif isinstance(value, list):
            out += [name, ",".join(_fmt_value(v) for v in value)]
        else:
            out += [name, _fmt_value(value)]
    return out


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
    if not spars.is_file():
        _fail(grid_path, f"ticket directory '{path}' has no sparsity.json; it is not a finished main_imp_pretrain.py "
                         "--save-dir (rerun stage 1 until it writes its tickets).")
    try:
        levels = {int(k): float(v) for k, v in json.loads(spars.read_text()).items()}
    except (ValueError, AttributeError):
        _fail(grid_path, f"'{spars}' is not a {{round: sparsity}} JSON object; rerun stage 1 to rewrite it.")
    if not levels:
        _fail(grid_path, f"'{spars}' lists no rounds yet; let stage 1 finish at least one round.")
    import pruning_utils

    method = retrain = pattern = nm = None
    config = path / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
            method, retrain = cfg.get("method"), cfg.get("retrain")
            pattern, nm = cfg.get("pattern"), cfg.get("nm")
        except json.JSONDecodeError:
            pass
    if method is None:  # a directory without our config: the ticket file says what it is
        first = path / "tickets" / f"round_{min(levels):02d}.pt"
        ticket = pruning_utils.load_ticket(first)
        method, retrain = ticket.get("method"), ticket.get("retrain")
        pattern, nm = ticket.get("pattern"), ticket.get("nm")
    if method not in ("imp", "omp", "rp", "lmp"):
        _fail(grid_path, f"cannot tell the pruning method of '{path}' (config.json and its tickets name none).")
    # structured tickets are their own family ("omp_channel"): own run directories, own verdict rows
    method = pruning_utils.ticket_family(method, pattern, nm)
    name = f"{method}-at" if method == "imp" and retrain == "at" else method
    return TicketDir(path=path, method=method, retrain=retrain, levels=levels, name=name)


def load_grid(grid_path):
    """Read and check a grid file; every problem is one UserError naming it and the fix."""
    grid_path = Path(grid_path)
    if not grid_path.is_file():
        raise UserError(f"grid file '{grid_path}' does not exist; pass a TOML file such as script/grids/fig3.toml.")
    if tomllib is None:
        raise UserError("reading a grid file on Python < 3.11 needs the tomli package; `pip install tomli`.")
    try:
        spec = tomllib.loads(grid_path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"grid file '{grid_path}' is not valid TOML ({exc}); fix the line it names.") from None
    return build_grid(spec, grid_path.resolve().parent, grid_path)


def build_grid(spec, base, grid_path):
    """A checked Grid from the parsed file ``spec``; relative paths are taken from ``base``.
    (script/demo.py builds its grid in code through this.)"""
    base = Path(base)
    unknown = sorted(set(spec) - GRID_KEYS)
    if unknown:
        _fail(grid_path, f"unknown key(s) {', '.join(unknown)}; the file holds only out, [pretrain.LABEL], [axes] "
                         "and [flags] (DESIGN.md §5.7).")
    if not isinstance(spec.get("out"), str) or not spec["out"]:
        _fail(grid_path, "needs out = \"DIR\", the folder every run directory goes below.")
    pretrain = spec.get("pretrain")
    if not isinstance(pretrain, dict) or not pretrain:
        _fail(grid_path, "needs at least one [pretrain.LABEL] table with init = \"θ_p file\" and tickets = [...].")
    axes = _read_axes(grid_path, spec.get("axes"))
    pretrains = {label: _read_pretrain(grid_path, base, label, table, axes["rounds"])
                 for label, table in pretrain.items()}
    if not axes["dense"] and not any(p["tickets"] for p in pretrains.values()):
        _fail(grid_path, "implies no runs: no pre-training lists tickets and dense = false.")
    flags = _read_flags(grid_path, base, spec.get("flags", {}))
    return Grid(path=Path(grid_path).resolve(), out=(base / spec["out"]).resolve(), pretrains=pretrains,
                datasets=axes["datasets"], regimes=axes["regimes"], data_rates=[float(r) for r in axes["rates"]],
                seeds=axes["seeds"], rounds=axes["rounds"], dense=axes["dense"], flags=flags)


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
    dense = axes.get("dense", True)
    if not isinstance(dense, bool):
        _fail(grid_path, f"[axes] dense must be true or false, not {dense!r}.")
    return {"datasets": datasets, "regimes": regimes, "rates": rates, "seeds": seeds, "rounds": rounds,
            "dense": dense}


def _read_pretrain(grid_path, base, label, table, rounds):
    """One checked [pretrain.LABEL] table: {"init": the θ_p path or "none", "tickets": [TicketDir]}."""
    if not isinstance(table, dict):
        _fail(grid_path, f"pretrain.{label} must be a table with init and tickets.")
    unknown = sorted(set(table) - PRETRAIN_KEYS)
    if unknown:
        _fail(grid_path, f"unknown key(s) in [pretrain.{label}]: {', '.join(unknown)}; use init and tickets.")
    init = table.get("init")
    if not isinstance(init, str) or not init:
        _fail(grid_path, f"[pretrain.{label}] needs init = \"PATH\" (the θ_p file, or \"none\").")
    if init.lower() != "none":
        init_path = base / init
        if not init_path.exists():
            _fail(grid_path, f"[pretrain.{label}] init '{init_path}' does not exist; point it at your θ_p "
                             "checkpoint (relative paths are relative to the grid file).")
        init = str(init_path)
    tickets = table.get("tickets", [])
    if isinstance(tickets, str):
        tickets = [tickets]
    if not isinstance(tickets, list) or not all(isinstance(t, str) for t in tickets):
        _fail(grid_path, f"[pretrain.{label}] tickets must be a list of stage-1 directories.")
    dirs = [_read_ticket_dir(grid_path, label, base / t) for t in tickets]
    _check_ticket_dirs(grid_path, label, dirs, rounds)
    return {"init": init, "tickets": dirs}


def _check_ticket_dirs(grid_path, label, dirs, rounds):
    """One directory per method name in a pre-training, holding every round the grid asks for."""
    names = [d.name for d in dirs]
    for name in set(names):
        if names.count(name) > 1:
            clash = [str(d.path) for d in dirs if d.name == name]
            _fail(grid_path, f"[pretrain.{label}] has two ticket directories of method '{name}' ({', '.join(clash)}); "
                             "the analysis tells runs apart by pre-training label and method, so give one of "
                             "them its own [pretrain.LABEL] table.")
    if rounds != "all":
        for d in dirs:
            missing = [r for r in rounds if r not in d.levels]
            if missing:
                _fail(grid_path, f"round(s) {missing} are not in '{d.path / 'sparsity.json'}' (it has "
                                 f"{sorted(d.levels)}); list rounds it has or let stage 1 finish them.")
    for d in dirs:
        for r in (d.levels if rounds == "all" else rounds):
            if not (d.path / "tickets" / f"round_{r:02d}.pt").is_file():
                _fail(grid_path, f"'{d.path / 'tickets' / f'round_{r:02d}.pt'}' is missing although "
                                 "sparsity.json lists it; rerun stage 1 in that directory.")


def _read_flags(grid_path, base, flags):
    """The checked [flags] table; path values are taken from ``base``."""
    if not isinstance(flags, dict):
        _fail(grid_path, "[flags] must be a table of main_downstream.py flags.")
    clean = {}
    for key, value in flags.items():
        norm = key.replace("-", "_")
        if norm in AXIS_FLAGS:
            _fail(grid_path, f"[flags] sets '{key}', which the grid sets per run from [axes] and [pretrain.*]; "
                             "remove it from [flags].")
        scalar = (str, int, float, bool)
        if isinstance(value, list):
            if not all(isinstance(v, scalar) and not isinstance(v, bool) for v in value):
                _fail(grid_path, f"[flags] {key} must be a list of numbers or strings.")
        elif not isinstance(value, scalar):
            _fail(grid_path, f"[flags] {key} must be a string, number, boolean or list, not a table.")
        if norm in PATH_FLAGS and isinstance(value, str):
            value = str(base / value)
        clean[key] = value
    return clean


def level_dir(sparsity):
    return f"s{sparsity:05.2f}"


def expand(grid, flags_for=None):
    """Every run the grid implies, in a fixed order. ``flags_for(run) -> dict`` may add or
    override flags per run (the digits demo uses it for its shortened schedules)."""
    runs = []
    for dataset in grid.datasets:
        for rate in grid.data_rates:
            for regime in grid.regimes:
                for label, pre in grid.pretrains.items():
                    base = grid.out / dataset / f"rate{rate:g}" / regime / label
                    cells = []
                    if grid.dense:
                        cells.append(("dense", 0.0, None, None, base / "dense"))
                    for td in pre["tickets"]:
                        for r in sorted(td.levels if grid.rounds == "all" else grid.rounds):
                            s = round(td.levels[r], 2)
                            cells.append((td.method, s, r, td.path / "tickets" / f"round_{r:02d}.pt",
                                          base / td.name / level_dir(s)))
                    for method, s, r, ticket, where in cells:
                        for seed in grid.seeds:
                            run = Run(dataset=dataset, data_rate=rate, regime=regime, pretrain=label, method=method,
                                      sparsity=s, seed=seed, round=r, init=pre["init"], ticket=ticket,
                                      run_dir=where / f"seed{seed}", flags=dict(grid.flags))
                            if flags_for is not None:
                                run.flags.update(flags_for(run))
                            runs.append(run)
    return runs


def expected_record(r):
    """A run as the analysis reads it from the grid: the fields of its cell and its directory."""
    return {"dataset": r.dataset, "data_rate": r.data_rate, "pretrain": r.pretrain, "method": r.method,
            "sparsity": r.sparsity, "regime": r.regime, "seed": r.seed, "run_dir": str(r.run_dir)}


def expected_runs(grid_path):
    """The runs a grid file implies, as plain dicts (for analysis/plot_curves.py --grid)."""
    return [expected_record(r) for r in expand(load_grid(grid_path))]


def check_flags(runs):
    """Let main_downstream.py's own parser judge the flags once, before hundreds of runs fail on them."""
    if not runs:
        return
    import main_downstream
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main_downstream.parse_args(runs[0].argv())
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        reason = lines[-1].split("error: ", 1)[-1] if lines else "usage error"
        raise UserError(f"main_downstream.py rejects the grid's flags ({reason}); "
                        "fix [flags] in the grid file.") from None
