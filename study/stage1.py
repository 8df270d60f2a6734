"""Stage 1 inside a grid: the [stage1.NAME] entries (docs/contracts.md §7) that make ticket directories.

An entry names the pre-training whose θ_p it prunes, the method, IMP's re-training, its save
directory, the GPUs of its job and main_imp_pretrain.py flags. The flags are judged by stage 1's own
parser, and the sparsity of every round is computed before anything runs with the counts stage 1
prunes (training/lmp.level_keep_counts: IMP's per-round rounding, which OMP, RP and LMP share), so
``plan`` lists the run directories of tickets that do not exist yet. A round is written, for the
sweep as for stage 1 (main_imp_pretrain.survey_tickets), when sparsity.json lists it and its ticket
file is there: the ticket is saved atomically before sparsity.json names it.
"""

import contextlib
import difflib
import functools
import io
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from study.gridfile import REPO, TicketDir, flag_args, is_name, key_line, read_inits
from study.gridfile import fail as _fail
from utils.errors import UserError

ENTRY_KEYS = {"pretrain", "method", "retrain", "save_dir", "gpus", "flags", "replicas"}
METHODS = ("imp", "omp", "rp", "lmp")
# main_imp_pretrain.py settings an entry sets itself (by whatever alias a flags key names them);
# --restart would discard the directory on every rerun instead of resuming it
ENTRY_DESTS = {"init", "pretrain", "method", "retrain", "save_dir", "restart"}
PATH_FLAGS = {"data"}


@dataclass
class Entry:
    """One [stage1.NAME] entry, checked, with the sparsity every round of it will have."""
    name: str
    pretrain: str
    method: str
    retrain: object  # "st" / "at" for IMP and LMP (stage 1's default "st" when unset), else None
    save_dir: Path
    gpus: int
    init: str
    flags: dict
    levels: dict = field(default_factory=dict)  # round -> sparsity percent (2 decimals), as sparsity.json will hold
    given: tuple = ()  # the entry keys the grid file sets (retrain is passed only when given)
    replica: int = 1  # which of the entry's replicated ticket searches this is (NAME_rI in SAVE_DIR/rI)
    replicas: int = 1
    group_dir: Path = None  # the entry's save_dir as the grid file names it (the replicates' parent)
    entry = "main_imp_pretrain"
    done_file = "sparsity.json"

    @property
    def run_dir(self):
        return self.save_dir

    @property
    def family(self):
        return f"{self.method}-at" if self.method == "imp" and self.retrain == "at" else self.method

    def argv(self):
        args = ["--init", self.init, "--pretrain", self.pretrain, "--method", self.method]
        if self.retrain is not None and "retrain" in self.given:
            args += ["--retrain", self.retrain]
        return args + ["--save-dir", str(self.save_dir)] + flag_args(self.flags)

    def launcher(self, python=sys.executable):
        """The command that starts the job: torchrun over ``gpus`` processes, or one process."""
        script = str(REPO / "main_imp_pretrain.py")
        if self.gpus > 1:
            return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(self.gpus), script]
        return [python, script]

    def command(self, python="python"):
        head = self.launcher(python)
        if self.gpus > 1:
            head = ["torchrun", *head[3:]]
        return shlex.join([*head, *self.argv()])

    def written(self):
        """{round: sparsity} of the rounds whose ticket is completely written."""
        return written_rounds(self.save_dir)

    @property
    def finished(self):
        return set(self.written()) >= set(self.levels)


def written_rounds(save_dir):
    """Rounds listed in sparsity.json whose ticket file exists ({} before the first, or while the
    list cannot be read: stage 1 itself reports a damaged one)."""
    from utils.records import read_sparsity

    path = Path(save_dir) / "sparsity.json"
    if not path.is_file():
        return {}
    try:
        levels = read_sparsity(path)
    except UserError:
        return {}
    return {k: v for k, v in levels.items() if (Path(save_dir) / "tickets" / f"round_{k:02d}.pt").is_file()}


def read_entries(grid_path, base, table, pretrain, source=""):
    """The checked [stage1.*] tables: name -> Entry. ``pretrain`` is the grid's [pretrain] table."""
    if not isinstance(table, dict):
        _fail(grid_path, "stage1 must hold [stage1.NAME] tables, one per ticket directory the grid makes.")
    entries, owners = {}, {}
    for name, spec in table.items():
        line = _header_line(source, name)
        if not is_name(name) or not isinstance(spec, dict):
            _fail(grid_path, f"[stage1.{name}] must be a table with a plain name (letters, digits, '.', '_', '-').",
                  line)
        save_dir = spec.get("save_dir", f"tickets/{name}")
        if not isinstance(save_dir, str) or not save_dir:
            _fail(grid_path, f"[stage1.{name}] save_dir must be a directory path (default \"tickets/{name}\").", line)
        other = owners.setdefault((base / save_dir).resolve(), name)
        if other != name:  # before either is judged: the clash is the mistake to name
            _fail(grid_path, f"[stage1.{name}] and [stage1.{other}] both make the ticket directory "
                             f"'{(base / save_dir).resolve()}'; give one of them another save_dir.", line)
        for entry in _replicate(grid_path, base, name, spec, pretrain, source, line):
            if entry.name in entries or entry.name in table and entry.name != name:
                _fail(grid_path, f"[stage1.{name}]'s replicate {entry.name} has the name of another entry; rename "
                                 "one of them.", line)
            entries[entry.name] = entry
    return entries


def _replicate(grid_path, base, name, spec, pretrain, source, line):
    """The entry, or with replicas = R (by default the number of its label's θ_p files) its R
    ticket searches NAME_r1..NAME_rR in SAVE_DIR/r1..rR: replicate I prunes the label's θ_p file I
    (its only one when it has one) with stage 1's --seed I where the seed acts."""
    label = spec.get("pretrain")
    inits = pretrain[label].get("init") if isinstance(pretrain, dict) and isinstance(pretrain.get(label), dict) else None
    inits = read_inits(grid_path, label, inits) if label in (pretrain or {}) else [None]
    replicas = spec.get("replicas", len(inits))
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        _fail(grid_path, f"[stage1.{name}] replicas = {replicas!r} must be a whole number of ticket searches, 1 or "
                         "more.", line)
    if len(inits) not in (1, replicas):
        _fail(grid_path, f"[stage1.{name}] replicas = {replicas} but [pretrain.{label}] names {len(inits)} θ_p "
                         f"files; a replicated search prunes one θ_p file each: use replicas = {len(inits)}.", line)
    if replicas == 1:
        return [_read_entry(grid_path, base, name, spec, pretrain, source, line, inits[0])]
    flags = spec.get("flags", {})
    if isinstance(flags, dict) and any(k.replace("-", "_") == "seed" for k in flags):
        _fail(grid_path, f"[stage1.{name}] sets seed in its flags and replicas = {replicas}; each replicate gets "
                         "its own --seed (1..replicas): drop seed from its flags.", line)
    save_dir = spec.get("save_dir", f"tickets/{name}")
    out = []
    for i in range(1, replicas + 1):
        one = {**spec, "save_dir": f"{save_dir}/r{i}"}
        entry = _read_entry(grid_path, base, f"{name}_r{i}", one, pretrain, source, line, inits[(i - 1) % len(inits)])
        args = _parse(grid_path, entry, line)
        import main_imp_pretrain

        if main_imp_pretrain.FLAG_SCOPE["seed"][0]({k: getattr(args, k) for k in main_imp_pretrain.FLAG_CONTEXT}):
            entry.flags["seed"] = i
        elif len(inits) == 1:
            _fail(grid_path, f"[stage1.{name}] replicas = {replicas} from one θ_p: stage 1's --seed "
                             f"{main_imp_pretrain.FLAG_SCOPE['seed'][1]}, so the replicates would be one ticket; "
                             f"give [pretrain.{label}] one θ_p file per replicate, or drop replicas.", line)
        entry.replica, entry.replicas, entry.group_dir = i, replicas, (base / save_dir).resolve()
        out.append(entry)
    return out


def _read_entry(grid_path, base, name, spec, pretrain, source, line, init=None):
    where = f"[stage1.{name}]"
    unknown = sorted(set(spec) - ENTRY_KEYS)
    if unknown:
        _fail(grid_path, f"unknown key(s) in {where}: {', '.join(unknown)}; use {', '.join(sorted(ENTRY_KEYS))}.",
              line)
    label = spec.get("pretrain")
    if not isinstance(label, str) or label not in (pretrain or {}):
        known = ", ".join(pretrain or {}) or "none"
        _fail(grid_path, f"{where} pretrain = {label!r} names no [pretrain.LABEL] table (the grid has: {known}); "
                         "name the pre-training whose θ_p it prunes.", line)
    method = spec.get("method")
    if method not in METHODS:
        _fail(grid_path, f"{where} method = {method!r} is not a stage-1 method; use one of {', '.join(METHODS)}.",
              line)
    retrain = spec.get("retrain")
    if retrain is not None and (method != "imp" or retrain not in ("st", "at")):
        _fail(grid_path, f"{where} retrain = {retrain!r}: re-training is \"st\" or \"at\" and applies to "
                         "method = \"imp\" only; fix or drop it.", line)
    gpus = spec.get("gpus", 1)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        _fail(grid_path, f"{where} gpus = {gpus!r} must be a whole number of GPUs per job, 1 or more.", line)
    save_dir = spec.get("save_dir", f"tickets/{name}")
    init = init or (pretrain[label].get("init") if isinstance(pretrain[label], dict) else None)
    if not isinstance(init, str) or not init:
        _fail(grid_path, f"[pretrain.{label}] needs init = \"PATH\" (the θ_p file, or \"none\").")
    entry = Entry(name=name, pretrain=label, method=method, retrain=retrain, save_dir=(base / save_dir).resolve(),
                  gpus=gpus, init=init if init.lower() == "none" else str(base / init),
                  flags=_read_flags(grid_path, base, name, spec.get("flags", {}), source), given=tuple(spec))
    args = _parse(grid_path, entry, line)
    entry.retrain = args.retrain
    entry.levels = expected_levels(grid_path, entry, args, line)
    return entry


def _header_line(source, name):
    for number, text in enumerate(source.splitlines(), 1):
        if "".join(text.split()).startswith((f"[stage1.{name}]", f'[stage1."{name}"]')):
            return number
    return None


@contextlib.contextmanager
def _quiet():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        yield err


def _stage_options():
    import main_imp_pretrain

    return {o: a.dest for a in main_imp_pretrain.build_parser()._actions for o in a.option_strings}


def _read_flags(grid_path, base, name, flags, source):
    """[stage1.NAME.flags]: each key, spelt in full, a flag of main_imp_pretrain.py that the entry
    does not set itself; path values are taken from ``base``."""
    table = f"stage1.{name}.flags"
    if not isinstance(flags, dict):
        _fail(grid_path, f"[{table}] must be a table of main_imp_pretrain.py flags.")
    options = _stage_options()
    clean = {}
    for key, value in flags.items():
        line = key_line(source, table, key)
        flag = flag_args({key: True})[0]
        if flag not in options or key.startswith("-") or "=" in key:
            near = difflib.get_close_matches(flag, [o for o in options if o.startswith("--")], n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            _fail(grid_path, f"[{table}] {key} would be {flag}, which is not a flag of main_imp_pretrain.py{hint}; "
                             "fix or remove it (python main_imp_pretrain.py --help).", line)
        if options[flag] in ENTRY_DESTS:
            _fail(grid_path, f"[{table}] sets '{key}' ({flag}), which the entry sets itself (pretrain, method, "
                             f"retrain, save_dir; init from [pretrain.LABEL]; the sweep resumes, never restarts); "
                             f"remove it from [{table}].", line)
        if isinstance(value, dict) or (isinstance(value, list) and not all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value)):
            _fail(grid_path, f"[{table}] {key} must be a string, number, boolean or list of them.", line)
        clean[key] = str(base / value) if key.replace("-", "_") in PATH_FLAGS and isinstance(value, str) else value
    return clean


def _parse(grid_path, entry, line):
    """main_imp_pretrain.py's own parse_args over the entry's command (it reads no file)."""
    import main_imp_pretrain
    with _quiet() as err:
        try:
            return main_imp_pretrain.parse_args(entry.argv())
        except SystemExit:
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            reason = lines[-1].split(" error: ", 1)[-1].removeprefix("error: ") if lines else "usage error"
        except UserError as exc:
            reason = str(exc).rstrip(".")
    _fail(grid_path, f"main_imp_pretrain.py rejects [stage1.{entry.name}] ({reason}); fix its flags.", line)


def expected_levels(grid_path, entry, args, line=None):
    """{round: sparsity} the entry's stage-1 run will write, from its architecture's prunable
    weights and the counts stage 1 prunes."""
    import pruning_utils
    from training import lmp

    if args.pattern != "unstructured":
        _fail(grid_path, f"[stage1.{entry.name}] asks for --pattern {args.pattern}, whose levels depend on the "
                         "weights; run that stage 1 by hand and list its directory in [pretrain.LABEL] tickets.", line)
    model = _shapes(args.arch, args.cifar_stem)
    names = pruning_utils.prunable_names(model, include_stem=not args.exclude_stem)
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in names)
    keeps = lmp.level_keep_counts(model, names, args.rounds, args.rate, args.layerwise)
    levels = {}
    for k, keep in enumerate(keeps, 1):
        kept = sum(keep.values()) if isinstance(keep, dict) else keep
        levels[k] = round(float(100.0 * (total - kept) / total), 2)  # masks.stats.sparsity, make_ticket's rounding
    written = written_rounds(entry.save_dir)
    wrong = [k for k, v in written.items() if levels.get(k) != round(v, 2)]
    if wrong:
        k = wrong[0]
        _fail(grid_path, f"'{entry.save_dir / 'sparsity.json'}' lists round {k} at {written[k]:.2f}%, but "
                         f"[stage1.{entry.name}]'s flags give {levels.get(k, 'no such round')}: the directory holds "
                         "another stage-1 run; point save_dir elsewhere or move that directory aside.", line)
    return levels


@functools.lru_cache(maxsize=None)
def _shapes(arch, cifar_stem):
    """The architecture with its parameters' shapes (built once per grid file and architecture)."""
    import models

    return models.build_model(arch, 10, cifar_stem=cifar_stem)


def ticket_dir(entry):
    """The grid's view of the directory the entry makes (study.grid.TicketDir)."""
    return TicketDir(path=entry.save_dir, method=entry.method, retrain=entry.retrain, levels=dict(entry.levels),
                     name=entry.family, made_by=entry.name)


def launch_env(gpus, threads):
    """The environment of a stage-1 job: its GPUs, and its share of the CPU threads."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(gpus), OMP_NUM_THREADS=str(threads))
