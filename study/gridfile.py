"""The grid file's shared vocabulary: what study.grid and study.stage1 (the [stage1.NAME] entries)
both need to read a grid file and refuse its mistakes, below either of them so neither imports the other."""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# what may become one component of a run directory's path: a plain name, never "." or ".."
NAME = re.compile(r"[A-Za-z0-9._-]+")
# Flags every run gets from the grid's own structure; a [flags] entry may not override them.
AXIS_FLAGS = {"dataset", "init", "pretrained", "pretrain", "ticket", "tickets_file", "mask", "regime", "data_rate",
              "data_number", "seed", "save_dir"}
PATH_FLAGS = {"data"}  # [flags] values that are paths, hence relative to the grid file
# What a sweep's run gets unless the grid's [flags] say otherwise: no model file once results.json is
# written (a grid whose figure reads weights, e.g. loss landscapes, sets keep_model = "best").
SWEEP_FLAGS = {"keep_model": "none"}


@dataclass
class TicketDir:
    path: Path
    method: str
    retrain: object
    levels: dict  # round -> sparsity (percent)
    name: str = ""  # the run-directory component: the method, "-at" added for adversarially re-trained IMP
    made_by: str = ""  # the [stage1.NAME] entry of the grid that makes this directory (study/stage1.py)
    replica: int = 1  # which replicated source (θ_p file, ticket search) of its pre-training it is


def fail(grid_path, message, line=None):
    where = f"grid file '{grid_path}'" + (f", line {line}" if line else "")
    raise UserError(f"{where}: {message}")


def key_line(source, table, key):
    """The line number of ``key`` in ``[table]`` of a TOML text (else of its first mention), or None."""
    current, first = None, None
    for number, line in enumerate(source.splitlines(), 1):
        text = line.strip()
        header = re.fullmatch(r"\[\s*([^\[\]]+?)\s*\]\s*(#.*)?", text)
        if header:
            current = header.group(1)
            continue
        for spelled in (key, f'"{key}"', f"'{key}'"):
            if text.startswith(spelled) and text[len(spelled):].lstrip().startswith("="):
                if current == table:
                    return number
                first = first or number
    return first


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


def is_name(text):
    """A string that may be one component of a path: [A-Za-z0-9._-]+, not "." or ".."."""
    return isinstance(text, str) and NAME.fullmatch(text) is not None and text not in (".", "..")


def read_inits(grid_path, label, init):
    """[pretrain.LABEL] init: one θ_p path (or "none"), or a list of distinct θ_p files, one per
    replicated source model. Returns the list (one item for the common case)."""
    if isinstance(init, str) and init:
        return [init]
    if not (isinstance(init, list) and init and all(isinstance(i, str) and i and i.lower() != "none" for i in init)):
        fail(grid_path, f"[pretrain.{label}] needs init = \"PATH\" (the θ_p file, or \"none\"), or a list of θ_p "
                        "files, one per replicated source model, such as [\"a.pt\", \"b.pt\", \"c.pt\"].")
    norm = [os.path.normpath(i) for i in init]
    twice = next((i for i, n in zip(init, norm) if norm.count(n) > 1), None)
    if twice is not None:
        fail(grid_path, f"[pretrain.{label}] init lists '{twice}' twice; each replicate is its own source model, "
                        "so list each θ_p file once.")
    return init


def replica_of(position, count):
    """The replicate (1-based) that the seed at ``position`` of [axes] seed runs from: the seeds of a
    cell are dealt over its ``count`` replicates in turn, so every seed stays distinct within the cell."""
    return position % count + 1


def replica_dir(replica, count):
    """The run-directory component of a replicate: "repI" when there are several, none otherwise
    (a grid without replicates keeps its paths)."""
    return f"rep{replica}" if count > 1 else ""


def read_flags(grid_path, base, flags, source="", where="[flags]", line_of=None):
    """A checked table of main_downstream.py flags (``where`` names it in a refusal, ``line_of(key)``
    gives a key's line); path values are taken from ``base``."""
    line_of = line_of or (lambda key: key_line(source, "flags", key))
    if not isinstance(flags, dict):
        fail(grid_path, f"{where} must be a table of main_downstream.py flags.", line_of(""))
    clean = {}
    for key, value in flags.items():
        norm = key.replace("-", "_")
        if "=" in key or not key.strip("-_") or key.startswith("-"):
            fail(grid_path, f"{where} key {key!r} is not a flag name: write the name alone, without dashes or "
                            "'=', and the value after it, e.g. epochs = 2.", line_of(key))
        if norm in AXIS_FLAGS:
            fail(grid_path, f"{where} sets '{key}', which the grid sets per run from [axes] and [pretrain.*]; "
                            f"remove it from {where}.", line_of(key))
        scalar = (str, int, float, bool)
        if isinstance(value, list):
            if not all(isinstance(v, scalar) and not isinstance(v, bool) for v in value):
                fail(grid_path, f"{where} {key} must be a list of numbers or strings.")
        elif not isinstance(value, scalar):
            fail(grid_path, f"{where} {key} must be a string, number, boolean or list, not a table.")
        if norm in PATH_FLAGS and isinstance(value, str):
            value = str(base / value)
        clean[key] = value
    return clean


def sweep_flags(flags):
    """A grid's [flags] with SWEEP_FLAGS' defaults for what they leave unset (a key may be spelt with dashes)."""
    given = {k.replace("-", "_") for k in flags}
    return {**{k: v for k, v in SWEEP_FLAGS.items() if k not in given}, **flags}
