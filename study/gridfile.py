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
