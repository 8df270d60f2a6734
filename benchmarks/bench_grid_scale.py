"""The grid at study scale: `sweep.py plan`, `sweep.py status` and `analysis/plot_curves.py --grid`
on a synthetic study of N finished stage-2 runs, against the cost of reading what each must read.

The tree is built in the true on-disk formats: a grid file (Fig. 3's layout, 3 datasets x data
rates 1.0 and 0.1 x ST/AT x (3 dense + 19 IMP levels of 3 pre-trainings + 19 RP levels), 948 runs
per seed; the number of seeds gives N), θ_p files (models.save_model_checkpoint), stage-1 ticket
directories (sparsity.json, config.json, tickets/round_XX.pt through masks.ticket.save_ticket) and
one run directory per run holding what main_downstream.py leaves: config.json (the config the grid
gives the run, main_downstream.config_for plus its ticket's sparsity), results.json with a 100-epoch
history (indented as utils.checkpoint.atomic_write_json writes it), log.csv and run_info.json.

Each step runs in its own process; its wall time and peak memory (max RSS, os.wait4) are set
against, measured in the same benchmark run:
- the floor: a process that reads once each file the step must read per run (status: results.json,
  config.json, log.csv, and a listing of the run directory for its disk column; the analysis:
  results.json), holding nothing;
- the imports: a process that only imports what the step imports (torch among them), a cost
  that does not grow with the grid.
Reported per step: seconds, MB, the ratio to the floor, the ratio of what grows with the grid
(step minus imports) to the floor, and the growth from the smallest to the largest N.

``--code NAME=REPO`` (repeatable) times several checkouts on the same tree in one run (e.g.
before=/path/to/main after=.), and compares their outputs (status's text, every CSV, the .md and
warnings.txt of the analysis) byte by byte.

    python benchmarks/bench_grid_scale.py --runs 3000,10000,31000 --code before=../main --code after=. \
        --json grid_scale.json
    python benchmarks/bench_grid_scale.py --tiny        # seconds: the test suite runs this
"""

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._machine import cpu_model  # noqa: E402
from utils.cli import ArgumentParser, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402

EPOCHS = 100
LEVEL_ELEMENTS = 10_000  # mask entries of a synthetic ticket: a sparsity of 2 decimals is exact
# Fig. 3's layout (script/grids/fig3.toml) with a second data rate; TINY: a grid the test suite builds in seconds
# (knee: the sparsity where tickets start to fall behind; noise: the seeds' spread, which TINY keeps
# far below every difference, so each of its supports is 0 or 1 however the resamples are drawn)
FULL = {"datasets": ["cifar10", "cifar100", "svhn"], "rates": [1.0, 0.1], "rounds": 19,
        "pretrains": {"std": ["imp"], "fat": ["imp"], "at": ["imp", "rp"]}, "knee": 60.0, "noise": 0.35}
TINY = {"datasets": ["cifar10"], "rates": [1.0, 0.1], "rounds": 3, "pretrains": {"std": ["imp"], "at": ["imp", "rp"]},
        "knee": 30.0, "noise": 0.01}
SA = {"cifar10": 93.0, "cifar100": 76.0, "svhn": 95.5}


def runs_per_seed(layout):
    cells = sum(1 + layout["rounds"] * len(methods) for methods in layout["pretrains"].values())
    return len(layout["datasets"]) * len(layout["rates"]) * 2 * cells


# --------------------------------------------------------------------------- the tree

def _level(k):
    return round(100.0 * (1.0 - 0.8 ** k), 2)


def _write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_stage1(root, layout):
    """θ_p files and stage-1 directories, in the formats main_imp_pretrain.py writes."""
    import torch

    import models
    from masks.ticket import make_ticket, save_ticket

    (root / "weights").mkdir(parents=True)
    model = models.build_model("resnet_tiny", 10, cifar_stem=True)
    for label in layout["pretrains"]:
        models.save_model_checkpoint(root / "weights" / f"{label}.pt", model)
    for label, methods in layout["pretrains"].items():
        for method in methods:
            d = root / "tickets" / f"{label}_{method}"
            (d / "tickets").mkdir(parents=True)
            levels = {k: _level(k) for k in range(1, layout["rounds"] + 1)}
            for k, s in levels.items():
                mask = torch.ones(LEVEL_ELEMENTS, dtype=torch.bool)
                mask[: round(s * LEVEL_ELEMENTS / 100)] = False
                ticket = make_ticket({"conv1.weight": mask.view(100, 100, 1, 1)}, round=k, method=method,
                                     retrain="st" if method == "imp" else None, arch="resnet50", pretrain=label,
                                     init=str(root / "weights" / f"{label}.pt"), source_dataset="imagenet")
                save_ticket(d / "tickets" / f"round_{k:02d}.pt", ticket)
            _write_json(d / "sparsity.json", {str(k): s for k, s in levels.items()})
            _write_json(d / "config.json", {"method": method, "retrain": "st" if method == "imp" else None,
                                            "pattern": "unstructured", "nm": None, "rounds": layout["rounds"],
                                            "arch": "resnet50", "pretrain": label, "dataset": "imagenet"})


def _grid_text(layout, seeds, out):
    lines = [f'out = "{out}"']
    for label, methods in layout["pretrains"].items():
        tickets = ", ".join(f'"tickets/{label}_{m}"' for m in methods)
        lines += [f"[pretrain.{label}]", f'init = "weights/{label}.pt"', f"tickets = [{tickets}]"]
    lines += ["[axes]", f"dataset = {json.dumps(layout['datasets'])}", 'regime = ["st", "at"]',
              f"data_rate = {json.dumps(layout['rates'])}", f"seed = {json.dumps(list(range(1, seeds + 1)))}",
              'rounds = "all"', "dense = true", "[flags]", 'data = "data"', 'arch = "resnet50"']
    return "\n".join(lines) + "\n"


def _accuracies(run, rng, layout):
    """(SA, RA) of a synthetic run: a dataset's level, lower under AT, falling at high sparsity."""
    sa = SA[run.dataset] - (8.0 if run.regime == "at" else 0.0) - (3.0 if run.data_rate < 1 else 0.0)
    ra = 48.0 if run.regime == "at" else None
    drop = 0.0 if run.method == "dense" else max(0.0, run.sparsity - layout["knee"]) ** 2 / 300.0 - 0.4
    drop += 1.5 if run.method == "rp" else 0.0
    sa = min(100.0, sa - drop + rng.normal(0.0, layout["noise"]))
    if ra is not None:
        ra = ra - drop * (0.5 if run.pretrain == "at" else 1.0) + rng.normal(0.0, layout["noise"])
    return round(sa, 2), None if ra is None else round(ra, 2)


def _history(rng, sa, ra):
    rows = []
    for epoch in range(EPOCHS):
        val = epoch >= 45 or epoch == EPOCHS - 1
        rows.append({"epoch": epoch, "lr": 0.1 * 0.1 ** (epoch >= 50) * 0.1 ** (epoch >= 75),
                     "train_loss": float(rng.uniform(0.05, 2.0)), "train_acc": float(rng.uniform(40, 100)),
                     "val_sa": float(sa + rng.normal(0, 0.5)) if val else None,
                     "val_ra": (None if ra is None else float(ra + rng.normal(0, 0.5))) if val else None,
                     "seconds": float(rng.uniform(20, 60))})
    return rows


def _run_files(run, config, rng, layout):
    """(results.json object, log.csv text, run_info.json object) of a finished run, as finish() writes them."""
    from main_downstream import LOG_FIELDS
    from utils.rundir import csv_text

    sa, ra = _accuracies(run, rng, layout)
    history = _history(rng, sa, ra)
    best = max(range(45, EPOCHS), key=lambda e: history[e]["val_sa"])
    results = {"dataset": run.dataset, "arch": "resnet50", "pretrain": run.pretrain, "init": run.init,
               "ticket": str(run.ticket) if run.ticket else None, "method": run.method if run.ticket else "dense",
               "sparsity": run.sparsity, "regime": run.regime, "data_rate": run.data_rate, "seed": run.seed,
               "sa": sa, "ra": ra, "selected_epoch": best, "selection": "val_ra" if ra is not None else "val_sa",
               "history": history,
               "config": {**config, "subset": None, "subset_seed": 0, "eval_from": config.get("eval_from"),
                          "precision": {"train": "bf16", "validation": "bf16", "test": "fp32"}},
               "git": "0" * 40}
    info = {"init_format": "double-win-model", "dropped_head": True, "test_images": 10000, "stopped_early": False,
            "train_seconds": sum(r["seconds"] for r in history), "world_size": 1}
    return results, csv_text(history, LOG_FIELDS), info


def _configs(runs):
    """The config.json of every run (main_downstream.config_for plus the ticket's sparsity). The
    stage's parser runs once per grid point with seed 1; a run of another seed differs from it only
    in its seed and directory (checked on the first run of every other seed)."""
    import main_downstream

    base, out, checked = {}, [], set()
    for run in runs:
        key = (run.dataset, run.data_rate, run.regime, run.pretrain, run.method, run.sparsity)
        if key not in base:
            base[key] = (run, main_downstream.config_for(run.argv()))
        first, cfg = base[key]
        cfg = dict(cfg, seed=run.seed, save_dir=str(run.run_dir), ticket_sparsity=run.sparsity if run.ticket else None)
        if run.seed not in checked and run is not first:
            checked.add(run.seed)
            real = dict(main_downstream.config_for(run.argv()), ticket_sparsity=cfg["ticket_sparsity"])
            if real != cfg:
                raise RuntimeError(f"the patched config of {run.run_dir} is not config_for's")
        out.append(cfg)
    return out


def build_tree(root, layout, seeds):
    """The study tree below ``root``: grid.toml (every run finished), grid_plan.toml (the same grid,
    nothing run yet), stage-1 files and run directories. Returns the number of runs."""
    import numpy as np

    from study.grid import expand, load_grid

    root = Path(root)
    _write_stage1(root, layout)
    (root / "grid.toml").write_text(_grid_text(layout, seeds, "runs"))
    (root / "grid_plan.toml").write_text(_grid_text(layout, seeds, "runs_not_started"))
    runs = expand(load_grid(root / "grid.toml"))
    rng = np.random.default_rng(0)
    for run, config in zip(runs, _configs(runs)):
        results, log, info = _run_files(run, config, rng, layout)
        run.run_dir.mkdir(parents=True)
        _write_json(run.run_dir / "config.json", config)
        _write_json(run.run_dir / "run_info.json", info)
        (run.run_dir / "log.csv").write_text(log)
        _write_json(run.run_dir / "results.json", results)
    (root / "run_dirs.txt").write_text("".join(f"{r.run_dir}\n" for r in runs))
    return len(runs)


# --------------------------------------------------------------------------- measuring

# The floor, run by a bare interpreter (no module of this project, so none of their imports):
# prints the seconds it took to read once each file a step must read per run, holding nothing.
FLOOR = """
import json, os, sys, time
kind, tree = sys.argv[1], sys.argv[2]
dirs = open(os.path.join(tree, "run_dirs.txt")).read().splitlines()
start = time.perf_counter()
for d in dirs:
    json.loads(open(os.path.join(d, "results.json"), encoding="utf-8").read())
    if kind == "status":
        json.loads(open(os.path.join(d, "config.json"), encoding="utf-8").read())
        open(os.path.join(d, "log.csv"), encoding="utf-8").read()
        for root, _, files in os.walk(d):
            for name in files:
                os.lstat(os.path.join(root, name))
print(time.perf_counter() - start)
"""


def _measure(argv, cwd, stdout_path=None):
    """(wall seconds, max RSS in MB, exit status, stderr tail) of one process."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    out = open(stdout_path, "w") if stdout_path else subprocess.DEVNULL
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.PIPE, env=env)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if stdout_path:
            out.close()
    return wall, usage.ru_maxrss / 1024, proc.returncode, err.decode("utf-8", "replace")[-2000:]


# What each step imports whatever the grid's size: sweep.py's modules and stage 2's parser (plan's analytic
# estimate counts FLOPs without torch since issue 29: study/flops.py), status also the verdicts' analysis
# code (torch-free since issue 29; the code before loaded torch through pruning_utils)
SWEEP_IMPORTS = "import study.local, study.pipeline, study.slurm, study.status, study.cost, training.downstream_args"
IMPORTS = {"plan": f"{SWEEP_IMPORTS}, study.flops",
           "status": f"{SWEEP_IMPORTS}, analysis.table",
           "analysis": "import matplotlib.pyplot, analysis.plot_curves"}


def run_step(step, repo, tree, work):
    """Measure one step of checkout ``repo`` on ``tree``; its outputs go below ``work``."""
    repo, tree, work = Path(repo).resolve(), Path(tree).resolve(), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if step == "analysis":
        argv = [sys.executable, str(repo / "analysis" / "plot_curves.py"), str(tree / "runs"), "--grid",
                str(tree / "grid.toml"), "--out", str(work / "analysis")]
    else:
        grid = tree / ("grid_plan.toml" if step == "plan" else "grid.toml")
        argv = [sys.executable, str(repo / "script" / "sweep.py"), step, str(grid)]
    wall, rss, rc, err = _measure(argv, repo, work / f"{step}.txt")
    if rc != 0:
        raise UserError(f"{step} of '{repo}' exited with {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    code = f"import sys; sys.path.insert(0, {str(repo)!r}); {IMPORTS[step]}"
    imp_wall, imp_rss, rc, err = _measure([sys.executable, "-c", code], repo)
    if rc != 0:
        raise UserError(f"importing the modules of {step} from '{repo}' failed: {err.strip()[-300:]}")
    return {"seconds": round(wall, 3), "max_rss_mb": round(rss, 1), "import_seconds": round(imp_wall, 3),
            "import_max_rss_mb": round(imp_rss, 1)}


def _same(a, b, repos):
    """Whether two output files hold the same bytes, each checkout's own path (plan's commands name
    main_downstream.py by it) read as one."""
    if not (a.is_file() and b.is_file()):
        return False
    return a.read_bytes().replace(os.fsencode(repos[0]), b"REPO") == b.read_bytes().replace(os.fsencode(repos[1]), b"REPO")


def compare_outputs(work_a, work_b, repos):
    """The output files of two checkouts' steps that differ (plan's and status's text, analysis tables and
    CSVs); ``repos``: the two checkouts' resolved paths."""
    names = [n for n in ("plan.txt", "status.txt") if (Path(work_a) / n).is_file() or (Path(work_b) / n).is_file()]
    analysis = Path(work_a) / "analysis"
    if analysis.is_dir():
        names += sorted(f"analysis/{p.name}" for p in analysis.iterdir() if p.suffix in (".csv", ".md", ".txt"))
    names += sorted(f"analysis/{p.name}" for p in (Path(work_b) / "analysis").glob("*")
                    if p.suffix in (".csv", ".md", ".txt") and f"analysis/{p.name}" not in names)
    return {"compared": names,
            "differ": [n for n in names if not _same(Path(work_a, n), Path(work_b, n), repos)]}


def build_in_child(tree, tiny, seeds):
    """build_tree in a child process: this one stays small (no torch), so the processes it starts
    to measure do not inherit its memory in their peak (a forked child's RSS counts until exec)."""
    shutil.rmtree(tree, ignore_errors=True)
    start = time.perf_counter()
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
            f"import bench_grid_scale as b; from pathlib import Path; "
            f"t = Path({str(tree)!r}); n = b.build_tree(t, b.{'TINY' if tiny else 'FULL'}, {seeds}); "
            f"(t / '.built').write_text(str(n))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"building the tree in '{tree}' failed: {proc.stderr.strip()[-500:]}")
    n = int((tree / ".built").read_text())
    print(f"built {n:,} runs in {tree} ({time.perf_counter() - start:.0f} s)", flush=True)


def floor_in_child(kind, tree):
    """(seconds, max RSS MB) of the floor read in a child process (so its memory is its own)."""
    out = Path(tempfile.mkdtemp()) / "floor.txt"
    try:
        wall, rss, rc, err = _measure([sys.executable, "-c", FLOOR, kind, str(tree)], ROOT, out)
        if rc != 0:
            raise UserError(f"the floor read failed: {err.strip()[-300:]}")
        return float(out.read_text()), rss
    finally:
        shutil.rmtree(out.parent)


def measure_size(tree, n_runs, codes, steps, work, repeat=1):
    """One record per checkout: every step with its ratios to the floor, and the output comparison.
    With ``repeat`` > 1 the checkouts take turns, round after round, and each step keeps its fastest
    round (and its fastest import): on a shared machine the slow rounds are other work's."""
    floors = {kind: floor_in_child(kind, tree) for kind in ("results", "status")}
    record = {"runs": n_runs, "floor": {k: {"seconds": round(s, 3), "max_rss_mb": round(m, 1)}
                                        for k, (s, m) in floors.items()}, "codes": {}}
    rounds = {name: {step: [] for step in steps} for name, _ in codes}
    for _ in range(repeat):
        for name, repo in codes:
            for step in steps:
                rounds[name][step].append(run_step(step, repo, tree, Path(work) / name))
    for name, _ in codes:
        record["codes"][name] = {}
        for step in steps:
            ms = rounds[name][step]
            m = dict(min(ms, key=lambda x: x["seconds"]), import_seconds=min(x["import_seconds"] for x in ms),
                     rounds_seconds=[x["seconds"] for x in ms])
            base = floors["status" if step == "status" else "results"][0]
            m["floor_ratio"] = round(m["seconds"] / base, 2)
            m["net_floor_ratio"] = round(max(m["seconds"] - m["import_seconds"], 0.0) / base, 2)
            m["net_rss_mb"] = round(m["max_rss_mb"] - m["import_max_rss_mb"], 1)
            record["codes"][name][step] = m
    names = [n for n, _ in codes]
    repos = {name: str(Path(repo).resolve()) for name, repo in codes}
    record["identical"] = {f"{a} vs {b}": compare_outputs(Path(work) / a, Path(work) / b, (repos[a], repos[b]))
                           for a, b in zip(names, names[1:])}
    return record


def growth(records):
    """Per checkout and step: the factor from the smallest to the largest grid, beside the runs' factor."""
    if len(records) < 2:
        return {}
    lo, hi = records[0], records[-1]
    out = {"runs": round(hi["runs"] / lo["runs"], 2)}
    for name in hi["codes"]:
        for step, m in hi["codes"][name].items():
            m0 = lo["codes"][name][step]
            net0 = max(m0["seconds"] - m0["import_seconds"], 1e-3)
            out[f"{name}.{step}"] = {"seconds": round(m["seconds"] / m0["seconds"], 2),
                                     "net_seconds": round(max(m["seconds"] - m["import_seconds"], 0) / net0, 2),
                                     "net_rss_mb": round(max(m["net_rss_mb"], 1) / max(m0["net_rss_mb"], 1), 2)}
    return out


def _machine():
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": load, "python": platform.python_version()}


def print_record(rec):
    print(f"\n{rec['runs']:,} runs: floor results.json {rec['floor']['results']['seconds']:.2f} s "
          f"({rec['floor']['results']['max_rss_mb']:.0f} MB), status's files {rec['floor']['status']['seconds']:.2f} s")
    print(f"{'code':10} {'step':9} {'s':>8} {'MB':>7} {'imports s':>9} {'imports MB':>10} {'x floor':>8} "
          f"{'net x floor':>11} {'net MB':>7}")
    for name, steps in rec["codes"].items():
        for step, m in steps.items():
            print(f"{name:10} {step:9} {m['seconds']:8.2f} {m['max_rss_mb']:7.0f} {m['import_seconds']:9.2f} "
                  f"{m['import_max_rss_mb']:10.0f} {m['floor_ratio']:8.2f} {m['net_floor_ratio']:11.2f} "
                  f"{m['net_rss_mb']:7.0f}")
    for pair, cmp in rec["identical"].items():
        verdict = "identical" if not cmp["differ"] else f"DIFFER: {', '.join(cmp['differ'])}"
        print(f"outputs {pair}: {len(cmp['compared'])} files {verdict}")


# --------------------------------------------------------------------------- entry point

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="3000,10000,31000",
                   help="comma-separated grid sizes (rounded to whole seeds of 948 runs; default 3000,10000,31000)")
    p.add_argument("--tiny", action="store_true", help="one tiny grid (2 seeds of 38 runs), for the test suite")
    p.add_argument("--code", action="append", default=[], metavar="NAME=REPO",
                   help="a checkout to time (repeatable; default: this one as 'this')")
    p.add_argument("--steps", default="plan,status,analysis", help="comma-separated steps (plan, status, analysis)")
    p.add_argument("--tree", default=None, metavar="DIR",
                   help="build the trees below DIR and keep them (reused when already built); default: a "
                        "temporary folder, removed afterwards")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every step, the checkouts taking turns; the fastest round counts (default 1)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the record here")
    p.add_argument("--keep-outputs", default=None, metavar="DIR",
                   help="copy every checkout's outputs (status.txt, plan.txt, analysis/) to DIR/SIZE/NAME")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(x) for x in args.runs.split(",") if x.strip()]
    except ValueError:
        p.error(f"--runs takes comma-separated numbers of runs, not {args.runs!r}")
    if not args.sizes or min(args.sizes) < 1:
        p.error("--runs needs at least one positive number")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.step_list = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in args.step_list if s not in IMPORTS]
    if unknown or not args.step_list:
        p.error(f"--steps takes plan, status and analysis, not {unknown or args.steps!r}")
    args.codes = []
    for spec in args.code or [f"this={ROOT}"]:
        name, sep, repo = spec.partition("=")
        if not sep or not name or not (Path(repo) / "script" / "sweep.py").is_file():
            p.error(f"--code takes NAME=REPO with REPO a checkout of this project (holding script/sweep.py), "
                    f"not {spec!r}")
        args.codes.append((name, repo))
    return args


def main(argv=None):
    args = parse_args(argv)
    layout = TINY if args.tiny else FULL
    sizes = [2 * runs_per_seed(layout)] if args.tiny else args.sizes
    base = Path(args.tree) if args.tree else Path(tempfile.mkdtemp(prefix="grid_scale_"))
    records = []
    try:
        for size in sizes:
            seeds = max(1, round(size / runs_per_seed(layout)))
            tree = base / f"{'tiny' if args.tiny else 'full'}_{seeds}seeds"
            if not (tree / ".built").is_file():
                build_in_child(tree, args.tiny, seeds)
            n = int((tree / ".built").read_text())
            work = Path(tempfile.mkdtemp(prefix="outputs_", dir=base))
            records.append(measure_size(tree, n, args.codes, args.step_list, work, args.repeat))
            print_record(records[-1])
            if args.keep_outputs:
                shutil.copytree(work, Path(args.keep_outputs) / str(n), dirs_exist_ok=True)
            shutil.rmtree(work)
    finally:
        if not args.tree:
            shutil.rmtree(base, ignore_errors=True)
    record = {"date": datetime.date.today().isoformat(), "machine": _machine(), "steps": args.step_list,
              "repeat": args.repeat,
              "codes": dict(args.codes), "sizes": records, "growth": growth(records)}
    if record["growth"]:
        print("\ngrowth smallest -> largest grid:", json.dumps(record["growth"]))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
