"""The house rules of the layout, checked on the code itself: module and function sizes, imports that
flow one way (ground plumbing in utils/ imports nothing of the project above it), and no import circle."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
SKIP_DIRS = {"tests", ".git", ".ci-venv", "docs", "build"}
# utils/ is the ground floor: it may import only itself (and third-party libraries)
GROUND = "utils"


def project_files():
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in SKIP_DIRS or any(p.startswith(".") for p in rel.parts):
            continue
        yield rel


def top_level_names():
    names = {p.stem for p in REPO.glob("*.py")}
    names |= {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names - {"tests", "setup"}


def module_name(rel):
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts and parts[0] == "script":  # scripts put script/ on sys.path and import each other by bare name
        return ".".join(parts)
    return ".".join(parts)


def imports_of(rel, known):
    """Project modules a file imports (at any depth of the file, lazy imports included)."""
    tree = ast.parse((REPO / rel).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]  # importlib.import_module("pkg.mod") is an import all the same
        for name in names:
            # the longest project module that the dotted name starts with
            parts = name.split(".")
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in known:
                    found.add(cand)
                    break
    return found


def graph():
    files = list(project_files())
    known = {module_name(f): f for f in files}
    # bare-name imports between scripts in script/
    for f in files:
        if f.parts[0] == "script":
            known.setdefault(f.stem, f)
    edges = {}
    for f in files:
        mod = module_name(f)
        edges[mod] = {module_name(known[m]) for m in imports_of(f, known)} - {mod}
    return edges


def test_no_module_over_the_size_limit():
    too_long = {str(f): n for f in project_files()
                if (n := len((REPO / f).read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert not too_long, f"modules over {MAX_FILE_LINES} lines: {too_long}"


def test_no_function_over_the_size_limit():
    too_long = {}
    for f in project_files():
        tree = ast.parse((REPO / f).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long[f"{f}:{node.name}"] = n
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_ground_plumbing_imports_nothing_above_it():
    upward = {m: sorted(d for d in deps if d.split(".")[0] != GROUND)
              for m, deps in graph().items() if m.split(".")[0] == GROUND}
    upward = {m: d for m, d in upward.items() if d}
    assert not upward, f"utils/ imports the project above it: {upward}"


def test_no_import_circle():
    edges = graph()
    # a package's __init__ handing on its own submodules is not a circle
    def deps(m):
        return {d for d in edges.get(m, ()) if not (d.startswith(m + ".") or m.startswith(d + "."))}
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in deps(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"
