"""One reader per file kind the pipeline writes and reads back: results.json, config.json,
sparsity.json, log.csv and a sweep's failure record.

Each reader checks the file's shape and types and raises a one-line :class:`UserError` naming the file,
what is wrong with it and what to do; nothing that reads these files parses them by hand. A damaged
file (empty, truncated, not UTF-8, the wrong JSON type, ``null`` where a value belongs, a directory in its
place) is thereby one line and exit status 2 in every tool, never a traceback.
"""

import csv
import errno
import io
import json
import math
import numbers
import os
import stat
from pathlib import Path

from utils.errors import UserError

# what pathlib's is_file() reads as "not there" (a missing file or directory, a link loop)
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EBADF)

REGIMES = ("st", "fat", "at")
# Every key the analysis reads from a results.json (docs/contracts.md §3); "ra" may be null.
RESULT_KEYS = ("dataset", "arch", "pretrain", "method", "sparsity", "regime", "data_rate", "seed", "sa", "ra")
_DAMAGED = "the run directory is damaged; rerun the run (--restart) or remove the file"


def is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def read_text(path, what):
    """The UTF-8 text of a regular file, or one line saying why it cannot be read. (One stat and no
    Path object per file: `status` reads three files of each of 31,000 runs.)"""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno in _ABSENT:
            raise UserError(f"{what} '{Path(path)}' does not exist.") from None
        mode = None  # no permission, say: reading it says why
    if mode is not None and stat.S_ISDIR(mode):
        raise UserError(f"{what} '{Path(path)}' is a directory, not a file; {_DAMAGED}.")
    if mode is not None and not stat.S_ISREG(mode):  # a FIFO or device would block or stream forever
        raise UserError(f"{what} '{Path(path)}' does not exist.")
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} '{Path(path)}' is not UTF-8 text; {_DAMAGED}.") from None
    except OSError as exc:
        raise UserError(f"{what} '{Path(path)}' cannot be read ({exc.strerror or exc}).") from None


def read_json(path, what, expect=dict):
    """A JSON document whose top level is of type ``expect``."""
    text = read_text(path, what)
    if not text.strip():
        raise UserError(f"{what} '{path}' is empty; {_DAMAGED}.")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} '{path}' is not valid JSON ({exc.msg} at line {exc.lineno}); {_DAMAGED}.") from None
    if not isinstance(obj, expect):
        raise UserError(f"{what} '{path}' holds a JSON {_json_type(obj)}, not {_json_type_name(expect)}; {_DAMAGED}.")
    return obj


def _json_type(obj):
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(obj), "number")


def _json_type_name(expect):
    return {dict: "an object", list: "an array"}.get(expect, expect.__name__)


# --------------------------------------------------------------------------- results.json

def result_problem(obj):
    """The reason ``obj`` is not a usable results.json, or None when it is."""
    if not isinstance(obj, dict):
        return f"it holds a JSON {_json_type(obj)}, not an object"
    missing = [k for k in RESULT_KEYS if k not in obj]
    if missing:
        return f"it lacks the keys {missing}"
    for key in ("dataset", "arch", "pretrain", "method"):
        if key == "method" and obj[key] is None and is_dense_result(obj):
            continue  # a dense run needs no method name
        if not isinstance(obj[key], str) or not obj[key]:
            return f"'{key}' is {obj[key]!r}, not a non-empty string"
    if obj["regime"] not in REGIMES:
        return f"'regime' is {obj['regime']!r}, not one of {list(REGIMES)}"
    if not is_number(obj["sparsity"]) or not 0.0 <= float(obj["sparsity"]) <= 100.0:
        return f"'sparsity' is {obj['sparsity']!r}, not a percentage"
    if not is_number(obj["data_rate"]) or not 0.0 < float(obj["data_rate"]) <= 1.0:
        return f"'data_rate' is {obj['data_rate']!r}, not a number in (0, 1]"
    if isinstance(obj["seed"], bool) or not isinstance(obj["seed"], (int, str)):
        return f"'seed' is {obj['seed']!r}, not an integer"
    if not is_number(obj["sa"]):
        return f"'sa' is {obj['sa']!r}, not a number"
    if obj["ra"] is not None and not is_number(obj["ra"]):
        return f"'ra' is {obj['ra']!r}, not a number or null"
    for key in ("sa", "ra"):  # accuracies in percent: a fraction or a count here is a broken writer
        if obj[key] is not None and not 0.0 <= float(obj[key]) <= 100.0:
            return f"'{key}' is {obj[key]!r}, outside [0, 100] percent"
    if "config" in obj and not isinstance(obj["config"], (dict, type(None))):
        return f"'config' is a JSON {_json_type(obj['config'])}, not an object"
    return None


def is_dense_result(obj):
    """A dense (unpruned) run: method "dense" or sparsity 0."""
    return obj.get("method") == "dense" or (is_number(obj.get("sparsity")) and float(obj["sparsity"]) == 0.0)


def read_results(path):
    """A stage-2 results.json, checked against the contract (docs/contracts.md §3)."""
    obj = read_json(path, "results file")
    problem = result_problem(obj)
    if problem:
        raise UserError(f"results file '{path}' is not a usable results.json: {problem}; {_DAMAGED}.")
    return obj


# --------------------------------------------------------------------------- config.json, sparsity.json

def read_config(path):
    """A run directory's config.json: an object whose keys are setting names."""
    obj = read_json(path, "run config")
    bad = [k for k in obj if not isinstance(k, str) or not k]
    if bad:
        raise UserError(f"run config '{path}' has keys that are no setting names ({bad[:3]}); {_DAMAGED}.")
    return obj


def read_sparsity(path):
    """A stage-1 sparsity.json: {round: sparsity percent} -> {int round: float}, rounds ascending."""
    obj = read_json(path, "level list")
    levels = {}
    for key, value in obj.items():
        try:
            k = int(key)
        except (TypeError, ValueError):
            k = 0
        if k < 1 or str(k) != str(key).strip():
            raise UserError(f"level list '{path}' has the round {key!r}, not a positive integer; rerun stage 1 "
                            "with --restart to write it again.")
        if not is_number(value) or not 0.0 <= float(value) <= 100.0:
            raise UserError(f"level list '{path}' gives round {k} the sparsity {value!r}, not a percentage; rerun "
                            "stage 1 with --restart to write it again.")
        levels[k] = float(value)
    return dict(sorted(levels.items()))


# --------------------------------------------------------------------------- log.csv

def read_log(path, required=()):
    """A log.csv as a list of row dicts (values as the text the writer wrote)."""
    text = read_text(path, "training log")
    if "\x00" in text:
        raise UserError(f"training log '{path}' holds binary data, not CSV; {_DAMAGED}.")
    try:
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
        fields = reader.fieldnames or []
    except csv.Error as exc:
        raise UserError(f"training log '{path}' is not valid CSV ({exc}); {_DAMAGED}.") from None
    missing = [f for f in required if f not in fields]
    if missing:
        raise UserError(f"training log '{path}' lacks the columns {missing}; {_DAMAGED}.")
    return rows


def read_log_column(path, name):
    """One column of a log.csv as the text the writer wrote, a value per row (None where a row is
    too short; every row None when the header lacks the column): what read_log gives for it, without
    a dict per row (status sums 100 rows of 31,000 logs)."""
    text = read_text(path, "training log")
    if "\x00" in text:
        raise UserError(f"training log '{path}' holds binary data, not CSV; {_DAMAGED}.")
    try:
        rows = [row for row in csv.reader(io.StringIO(text)) if row]  # DictReader skips blank rows too
    except csv.Error as exc:
        raise UserError(f"training log '{path}' is not valid CSV ({exc}); {_DAMAGED}.") from None
    if not rows or name not in rows[0]:
        return [None] * max(0, len(rows) - 1)
    i = rows[0].index(name)
    return [row[i] if i < len(row) else None for row in rows[1:]]


# --------------------------------------------------------------------------- CSV tables

def read_table(path, required, hint):
    """The rows of a CSV table a tool wrote (a verdict table, say), with the columns ``required``; every
    way it can be unreadable is one UserError naming it, ``hint`` saying what to pass or rerun."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; {hint}.")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows, fields = list(reader), reader.fieldnames or []
    except UnicodeDecodeError:
        raise UserError(f"'{path}' is not UTF-8 text; {hint}.") from None
    except csv.Error as exc:
        raise UserError(f"'{path}' is not a readable CSV ({exc}); {hint}.") from None
    missing = [c for c in required if c not in fields]
    if missing:
        raise UserError(f"'{path}' lacks the column(s) {', '.join(missing)}; {hint}.")
    return check_table_rows(path, rows)


def check_table_rows(path, rows):
    """UserError when a row of a csv.DictReader table has more or fewer fields than its header: a
    copy cut off inside a row, or a hand edit, whose missing cells would otherwise read as None."""
    for line, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()):
            more = "more" if None in row else "fewer"
            raise UserError(f"table '{path}' line {line} has {more} fields than its header (a copy cut off inside a "
                            "row, or an edit?); write the table again with the tool that made it.")
    return rows


# --------------------------------------------------------------------------- outputs never overwrite inputs

def refuse_overwriting_inputs(out, inputs, flag="--out"):
    """A tool's output path must not be one of the files it reads (compared as files on disk, so a
    second spelling or a hard link of an input is caught too)."""
    out = Path(out)
    if not out.exists():
        return
    for what, path in inputs:
        try:
            same = Path(path).exists() and os.path.samefile(out, path)
        except OSError:
            same = False
        if same:
            raise UserError(f"{flag} '{out}' is the {what} this command reads ('{path}'); writing there would destroy "
                            f"it, so choose another {flag}.")
