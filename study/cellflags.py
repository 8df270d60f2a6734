"""[[cell_flags]]: main_downstream.py flags for some cells of a grid (docs/contracts.md §7).

A study whose schedule differs per cell (more epochs at a small data rate, another learning rate per
regime) says so in its grid file: each entry names the cells it matches and the flags their runs get
on top of [flags], later entries over earlier ones. The result is the run's flags everywhere the
grid's flags act (command line, config and stale check, plan, status, cost, the backends).
"""

import difflib
import re
from dataclasses import dataclass

from study.gridfile import fail, flag_args, read_flags

MATCH_KEYS = ("dataset", "data_rate", "regime", "pretrain", "method")
EXAMPLE = "[[cell_flags]] with data_rate = 0.1 and flags = { epochs = 24 }"


@dataclass
class CellFlags:
    number: int  # the entry's place in the file, from 1
    match: dict  # match key -> the values it accepts
    flags: dict
    line: object = None  # the line of its [[cell_flags]] header, when the file has one per entry
    text: tuple = ()  # (line number, text) of the entry's lines, to name the line of a refused key

    @property
    def where(self):
        return f"[[cell_flags]] entry {self.number}"

    def line_of(self, key):
        """The line that sets ``key`` in this entry (else its header line)."""
        spelled = re.compile(r"(?:^|[\s{,])[\"']?" + re.escape(key) + r"[\"']?\s*=")
        return next((n for n, text in self.text if key and spelled.search(text)), self.line)

    def matches(self, run):
        """Whether the run is one of this entry's cells; ``method`` is its ticket's method or family
        (``imp`` matches both IMP families, ``imp-at`` only the adversarially re-trained one)."""
        seen = {"dataset": [run.dataset], "data_rate": [float(run.data_rate)], "regime": [run.regime],
                "pretrain": [run.pretrain], "method": [run.method, run.family]}
        return all(any(v in values for v in seen[key]) for key, values in self.match.items())


def entry_texts(source):
    """The (header line, [(line number, text)]) of each [[cell_flags]] entry of a TOML text, in order;
    an entry runs to the next header that is not one of its own sub-tables."""
    entries = []
    for number, line in enumerate(source.splitlines(), 1):
        text = line.strip()
        if re.fullmatch(r"\[\[\s*cell_flags\s*\]\]\s*(#.*)?", text):
            entries.append((number, []))
        elif text.startswith("[") and not re.match(r"\[\s*cell_flags\s*\.", text):
            entries.append(None)
        elif entries and entries[-1] is not None:
            entries[-1][1].append((number, line))
    return [e for e in entries if e is not None]


def read_cell_flags(grid_path, base, entries, source, known, families):
    """The checked [[cell_flags]] entries. ``known``: match key -> every value the grid's runs hold;
    ``families``: the (pretrain label, method, family) of every kind of run the grid has, or None
    while some are not known yet (``plan`` before every ticket directory exists)."""
    known = {**known, "method": None if families is None else {v for _, m, f in families for v in (m, f)}}
    if not (isinstance(entries, list) and all(isinstance(e, dict) for e in entries)):
        fail(grid_path, f"cell_flags must be an array of tables, each written as {EXAMPLE}.")
    texts = entry_texts(source)
    texts = texts if len(texts) == len(entries) else [(None, [])] * len(entries)
    cells = []
    for number, (entry, (line, text)) in enumerate(zip(entries, texts), 1):
        cell = CellFlags(number=number, match={}, flags={}, line=line, text=tuple(text))
        for key in sorted(set(entry) - set(MATCH_KEYS) - {"flags"}):
            near = difflib.get_close_matches(key, MATCH_KEYS, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            fail(grid_path, f"{cell.where} has the unknown key '{key}'{hint}; it matches runs by "
                            f"{', '.join(MATCH_KEYS)} and sets flags = {{ ... }}.", cell.line_of(key))
        for key in (k for k in MATCH_KEYS if k in entry):
            cell.match[key] = _match_values(grid_path, cell, key, entry[key], known.get(key))
        if not cell.match:
            fail(grid_path, f"{cell.where} names no cells, so it would act on every run; match some of "
                            f"{', '.join(MATCH_KEYS)}, or move its flags to [flags].", line)
        flags = entry.get("flags")
        if not isinstance(flags, dict) or not flags:
            fail(grid_path, f"{cell.where} sets no flags; give them as a table, e.g. flags = {{ epochs = 24 }}.",
                 cell.line_of("flags"))
        cell.flags = read_flags(grid_path, base, flags, source, f"{cell.where} flags", cell.line_of)
        _refuse_empty(grid_path, cell, families)
        cells.append(cell)
    return cells


def _match_values(grid_path, cell, key, value, known):
    """One match key's values (a value or a list of them), each a value some run of the grid holds."""
    values = value if isinstance(value, list) else [value]
    number = key == "data_rate"
    if not values or not all(isinstance(v, (int, float) if number else str) and not isinstance(v, bool)
                             for v in values):
        kind = "a number or a list of numbers" if number else "a name or a list of names"
        fail(grid_path, f"{cell.where} {key} must be {kind}, not {value!r}.", cell.line_of(key))
    values = [float(v) if number else v for v in values]
    absent = [v for v in values if known is not None and v not in known]
    if absent:
        fail(grid_path, f"{cell.where} {key} = {absent[0]!r} matches no run of the grid (its runs have {key} "
                        f"{', '.join(map(repr, sorted(known)))}); fix or drop the value.", cell.line_of(key))
    return values


def _refuse_empty(grid_path, cell, families):
    """An entry whose values each match some run but together none (a method the named pre-training
    has no tickets of) is refused, as a flag without effect is."""
    labels, methods = cell.match.get("pretrain"), cell.match.get("method")
    if families is None or any((labels is None or label in labels) and (methods is None or {m, f} & set(methods))
                               for label, m, f in families):
        return
    fail(grid_path, f"{cell.where} matches no run of the grid: no pre-training it names has runs of the method "
                    f"{' or '.join(methods)}; fix or drop it.", cell.line)


def run_flags(flags, cells, run):
    """A run's flags: ``flags`` (the grid's [flags]), then every entry that matches it in file order,
    a key spelt with dashes or underscores overriding either spelling in its place."""
    out = dict(flags)
    for cell in (c for c in cells if c.matches(run)):
        for key, value in cell.flags.items():
            same = next((k for k in out if k.replace("-", "_") == key.replace("-", "_")), key)
            out[same] = value
    return out


def refuse_acting_nowhere(grid_path, cells, runs):
    """An entry's flag left out of every run it matches (Run.acting_flags) is refused with its line."""
    for cell in cells:
        matched = [r for r in runs if cell.matches(r)]
        for key in cell.flags:
            flag = flag_args({key: True})[0]
            where = [r.acting_flags()[1].get(flag) for r in matched]
            if matched and all(where):
                fail(grid_path, f"{cell.where} flags {key} ({flag}) has no effect on any run it matches: it "
                                f"{where[0]}; drop it.", cell.line_of(key))
