"""The grid at study scale (issue 29): the shortcuts that make `status` and the analysis fast give
exactly what the code before them gave, and benchmarks/bench_grid_scale.py keeps running.

tests/data/grid_scale/ holds `status`'s text and the analysis' CSV files for the --tiny tree, made
by the code before these changes (first made with commit b15f4fc; made again with the parent of the
merge that brought them, whose verdict table has the `sources` and `double_win_ddof0` columns and
whose run configs record the newer flags):

    git archive <the code before> | tar -x -C /tmp/before
    python benchmarks/bench_grid_scale.py --tiny --code before=/tmp/before --steps status,analysis \
        --tree /tmp/gs_00000000 --keep-outputs /tmp/outputs
    # then status.txt with the tree's path written TREE, and analysis/*.csv (figures' data included)

The tree's path is as long here (status's disk column counts the paths results.json records).

Every supported value there is 0 or 1, so a change in how the support's resamples are drawn keeps
them; a change of the table's columns needs the files made again, from the code before it.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED = Path(__file__).resolve().parent / "data" / "grid_scale"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_grid_scale", REPO / "benchmarks" / "bench_grid_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


@pytest.fixture(scope="module")
def tree():
    base = Path(tempfile.mkdtemp(prefix="gs_", dir="/tmp"))  # as long a path as the expected files'
    root = base / "tiny_2seeds"
    try:
        n = bench.build_tree(root, bench.TINY, 2)
        assert n == 2 * bench.runs_per_seed(bench.TINY) == 88
        yield root
    finally:
        shutil.rmtree(base)


def test_config_of_a_kind_is_config_for_of_every_run(tree):
    import main_downstream
    from study.grid import expand, load_grid
    from study.rundirs import config_now

    runs = expand(load_grid(tree / "grid.toml"))
    assert {r.ticket is None for r in runs} == {True, False} and len({r.seed for r in runs}) == 2
    for run in runs:
        assert config_now(run) == main_downstream.config_for(run.argv()), run.run_dir
    # and every finished run directory agrees with it, so status finds nothing stale
    run = runs[-1]
    recorded = json.loads((run.run_dir / "config.json").read_text())
    assert run.ticket is not None and recorded == dict(config_now(run), ticket_sparsity=run.sparsity)


def test_status_and_analysis_outputs_are_those_of_the_code_before(tree, tmp_path, monkeypatch):
    """Byte for byte: status's text, double_win.csv, double_win_details.csv, summary.csv and the CSV
    of every figure."""
    from analysis import plot_curves
    from study.grid import expand, expected_runs, load_grid
    from study.status import status_lines

    monkeypatch.chdir(REPO)
    grid = load_grid(tree / "grid.toml")
    text = "\n".join(status_lines(grid, expand(grid))) + "\n"
    assert text.replace(str(tree.resolve()), "TREE") == (EXPECTED / "status.txt").read_text()
    out = tmp_path / "analysis"
    plot_curves.analyse([tree / "runs"], out, expected=expected_runs(tree / "grid.toml"),
                        grid_base=tree.resolve())
    expected = sorted(p.name for p in EXPECTED.glob("*.csv"))
    assert {"double_win.csv", "double_win_details.csv", "summary.csv"} <= set(expected)
    assert any(name.startswith("curves_") for name in expected)
    assert sorted(p.name for p in out.glob("*.csv")) == expected
    for name in expected:
        assert (out / name).read_bytes() == (EXPECTED / name).read_bytes(), name


def test_status_and_the_analysis_of_a_finished_grid_load_no_torch(tree, tmp_path):
    """Every group of the tree is finished, so status computes verdicts and the analysis its tables and
    figures: neither needs torch (its import alone was 800 MB and seconds, issue 29); a ticket file is
    loaded (with torch) only when its stage-1 config.json cannot name its family."""
    for argv in ([REPO / "script" / "sweep.py", "status", tree / "grid.toml"],
                 [REPO / "analysis" / "plot_curves.py", tree / "runs", "--grid", tree / "grid.toml", "--out",
                  tmp_path / "analysis"]):
        proc = subprocess.run([sys.executable, "-X", "importtime", *map(str, argv)], capture_output=True, text=True,
                              cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        assert "numpy" in modules and "torch" not in modules, (argv[1], sorted(m for m in modules if "torch" in m))
    assert (tmp_path / "analysis" / "double_win.csv").is_file()


def test_results_are_read_once_and_without_history(tree, monkeypatch):
    """status hands the results.json it read to the verdict code, which reads no file again, and
    keeps no per-epoch history."""
    from analysis import common
    from study.grid import expand, load_grid
    from study.status import status_lines
    from utils import records

    reads = []
    real = records.read_json
    monkeypatch.setattr(records, "read_json", lambda path, *a, **k: reads.append(Path(path)) or real(path, *a, **k))
    grid = load_grid(tree / "grid.toml")
    lines = status_lines(grid, expand(grid))
    assert lines[-1] == "done 88 of 88 runs (0 failed, 0 pending, 0 running)"
    runs = [p for p in reads if (tree / "runs") in p.parents]
    assert sorted(p.name for p in runs) == ["config.json"] * 88 + ["results.json"] * 88
    assert len(set(runs)) == 176
    good, _ = common.read_results(common.find_result_files([tree / "runs"]))
    assert len(good) == 88 and not any("history" in obj for _, obj in good)


def test_find_result_files_is_rglob_resolved(tree, tmp_path):
    """The walk that replaced rglob + resolve per file finds the same paths, links included: a linked
    results.json is resolved, a linked directory is not descended (as rglob does), a dangling link is
    passed over and a directory in a results.json's place is kept."""
    from analysis import common

    root = tmp_path / "runs"
    (root / "a").mkdir(parents=True)
    (root / "a" / "results.json").write_text("{}")
    (root / "b").mkdir()
    (root / "b" / "results.json").symlink_to(root / "a" / "results.json")
    (root / "c" / "results.json").mkdir(parents=True)
    (root / "d").mkdir()
    (root / "d" / "results.json").symlink_to(root / "missing.json")
    (root / "e").symlink_to(root / "a", target_is_directory=True)
    link = tmp_path / "link"
    link.symlink_to(root, target_is_directory=True)
    for d in (root, link, tree / "runs"):
        rglob = sorted({p.resolve() for p in Path(d).rglob("results.json") if p.is_file() or p.is_dir()})
        assert common.find_result_files([d]) == rglob
    assert len(common.find_result_files([link])) == 2  # a/ (b/ links to it) and c/


def test_tiny_benchmark_runs_and_writes_its_record(tree, tmp_path):
    """The benchmark's --tiny run on the tree built above (its --tree, marked built), one step."""
    (tree / ".built").write_text("88")
    record = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_grid_scale.py"), "--tiny", "--steps",
                           "status", "--tree", str(tree.parent), "--json", str(record)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(record.read_text())
    (size,) = rec["sizes"]
    assert size["runs"] == 88 and size["floor"]["status"]["seconds"] > 0 and size["floor"]["results"]["max_rss_mb"] < 100
    m = size["codes"]["this"]["status"]
    assert m["seconds"] > 0 and m["max_rss_mb"] > m["net_rss_mb"] and m["floor_ratio"] > 0
    assert size["identical"] == {} and rec["growth"] == {} and "this       status" in proc.stdout


def test_outputs_compare_byte_for_byte_but_for_each_checkouts_path(tmp_path):
    """plan's commands name main_downstream.py by the checkout's path: two checkouts' plans are the same
    when nothing else differs, and a differing byte anywhere else is found."""
    a, b = tmp_path / "a", tmp_path / "b"
    for work, repo in ((a, "/src/before"), (b, "/src/after")):
        (work / "analysis").mkdir(parents=True)
        (work / "plan.txt").write_text(f"pending  runs/x  python {repo}/main_downstream.py --seed 1\n")
        (work / "status.txt").write_text("done 1 of 1 runs\n")
        (work / "analysis" / "double_win.csv").write_text("verdict\ndouble win\n")
    assert bench.compare_outputs(a, b, ("/src/before", "/src/after")) == {
        "compared": ["plan.txt", "status.txt", "analysis/double_win.csv"], "differ": []}
    (b / "analysis" / "double_win.csv").write_text("verdict\nno double win\n")
    (b / "plan.txt").write_text("pending  runs/x  python /src/after/main_downstream.py --seed 2\n")
    assert bench.compare_outputs(a, b, ("/src/before", "/src/after"))["differ"] == ["plan.txt",
                                                                                    "analysis/double_win.csv"]
    assert bench.compare_outputs(a, a, ("/src/before", "/src/before"))["differ"] == []


def test_bad_arguments_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_grid_scale.py"), "--code",
                           f"x={tmp_path}"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "--code takes NAME=REPO" in proc.stderr and "Traceback" not in proc.stderr
