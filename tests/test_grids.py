"""script/grids/fig3.toml, fig4.toml, fig5.toml: each encodes its figure of the paper, and the three
share one run tree in which a run two figures share has one directory."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
GRIDS = REPO / "script" / "grids"
NAMES = ("fig3", "fig4", "fig5")
LEVELS = 19  # IMP/OMP/RP rounds of 20%: 20.00% ... 98.56%
# what each stage-1 directory name stands for: (method, re-training)
KINDS = {"imp_st": ("imp", "st"), "imp_at": ("imp", "at"), "omp": ("omp", None), "rp": ("rp", None)}


def _grid(name):
    return tomllib.loads((GRIDS / f"{name}.toml").read_text(encoding="utf-8"))


def _kind(ticket_dir):
    """'tickets/at_imp_at' -> ('at', 'imp_at')."""
    label, _, kind = Path(ticket_dir).name.partition("_")
    assert kind in KINDS, f"ticket directory {ticket_dir} is not named PRETRAIN_{{imp_st,imp_at,omp,rp}}"
    return label, kind


def _arms(spec):
    return {(label, _kind(t)[1]) for label, table in spec["pretrain"].items() for t in table["tickets"]}


def _count(spec):
    axes = spec["axes"]
    cells = sum(int(axes.get("dense", True)) + LEVELS * len(t["tickets"]) for t in spec["pretrain"].values())
    return cells * len(axes["dataset"]) * len(axes["regime"]) * len(axes.get("data_rate", [1.0])) * len(axes["seed"])


@pytest.mark.parametrize("name", NAMES)
def test_only_the_grid_format_of_today(name):
    spec = _grid(name)
    assert set(spec) <= {"out", "pretrain", "axes", "flags", "stage1"}  # stage1: the ticket directories it makes
    assert set(spec["axes"]) <= {"dataset", "regime", "data_rate", "seed", "rounds", "dense"}
    for table in spec["pretrain"].values():
        assert set(table) <= {"init", "tickets"}
    assert spec["axes"]["dataset"] == ["cifar10", "cifar100", "svhn"]
    assert spec["axes"]["seed"] == [1, 2, 3]  # "three independent replicates" (§4)
    assert spec["axes"]["rounds"] == "all" and spec["axes"]["dense"] is True
    for key in ("lr", "epochs", "milestones", "batch_size", "weight_decay", "schedule", "eval_from"):
        assert key not in spec["flags"]  # the protocol lives in main_downstream.py only


def test_fig3_imp_st_from_three_pretrainings_and_rp_from_at_only():
    spec = _grid("fig3")
    assert _arms(spec) == {("std", "imp_st"), ("fat", "imp_st"), ("at", "imp_st"), ("at", "rp")}
    assert not any(kind == "omp" for _, kind in _arms(spec))
    assert spec["axes"]["regime"] == ["st", "at"] and spec["axes"]["data_rate"] == [1.0]


def test_fig4_at_only_full_data_with_an_adversarially_retrained_imp_arm():
    spec = _grid("fig4")
    assert list(spec["pretrain"]) == ["at"]
    assert _arms(spec) == {("at", "imp_st"), ("at", "imp_at"), ("at", "omp"), ("at", "rp")}
    assert spec["axes"]["data_rate"] == [1.0] and spec["axes"]["regime"] == ["st", "at"]


def test_fig5_imp_st_from_three_pretrainings_at_three_data_rates():
    spec = _grid("fig5")
    assert _arms(spec) == {("std", "imp_st"), ("fat", "imp_st"), ("at", "imp_st")}
    assert spec["axes"]["data_rate"] == [1.0, 0.1, 0.01]
    assert spec["axes"]["regime"] == ["at"]  # adversarial downstream training (§1; caption: SA and RA)


def test_one_run_tree_and_one_path_per_input():
    specs = {name: _grid(name) for name in NAMES}
    assert len({s["out"] for s in specs.values()}) == 1
    assert len({json.dumps(s["flags"], sort_keys=True) for s in specs.values()}) == 1  # a shared run is one command
    inits, kinds = {}, {}
    for spec in specs.values():
        for label, table in spec["pretrain"].items():
            assert inits.setdefault(label, table["init"]) == table["init"]
            for t in table["tickets"]:
                owner, kind = _kind(t)
                assert owner == label  # a directory's tickets belong to the θ_p of its table
                assert kinds.setdefault((label, kind), t) == t


@pytest.mark.parametrize("name, runs", [("fig3", 1422), ("fig4", 1386), ("fig5", 1620)])
def test_the_header_states_the_run_count(name, runs):
    assert _count(_grid(name)) == runs
    text = (GRIDS / f"{name}.toml").read_text(encoding="utf-8")
    stated = re.search(r"= ([\d,]+) main_downstream\.py runs", text)
    assert stated and int(stated.group(1).replace(",", "")) == runs


def _load_sweep():
    spec = importlib.util.spec_from_file_location("sweep_for_grids", REPO / "script" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shared_runs_have_one_directory_in_the_real_reader(tmp_path):
    """Stage-1 directories in the real format (sparsity.json, config.json, ticket files named per
    round); the grids copied next to them, as a user does."""
    levels = {str(k): round(100 * (1 - 0.8 ** k), 2) for k in range(1, LEVELS + 1)}
    (tmp_path / "weights").mkdir()
    for name in NAMES:
        spec = _grid(name)
        for table in spec["pretrain"].values():
            (tmp_path / table["init"]).write_bytes(b"")
            for t in table["tickets"]:
                d = tmp_path / t
                if d.exists():
                    continue
                (d / "tickets").mkdir(parents=True)
                method, retrain = KINDS[_kind(t)[1]]
                (d / "config.json").write_text(json.dumps({"method": method, "retrain": retrain}))
                (d / "sparsity.json").write_text(json.dumps(levels))
                for k in levels:
                    (d / "tickets" / f"round_{int(k):02d}.pt").write_bytes(b"")
        shutil.copy(GRIDS / f"{name}.toml", tmp_path / f"{name}.toml")
    sweep = _load_sweep()
    runs = {name: sweep.expected_runs(tmp_path / f"{name}.toml") for name in NAMES}
    dirs = {name: {r["run_dir"] for r in rs} for name, rs in runs.items()}
    assert {name: len(d) for name, d in dirs.items()} == {"fig3": 1422, "fig4": 1386, "fig5": 1620}
    assert len(dirs["fig3"] & dirs["fig4"]) == 702  # θ_AT at 100%: dense, IMP-ST, RP
    assert len(dirs["fig3"] & dirs["fig5"]) == 540  # the AT-regime runs at 100%
    assert len(dirs["fig3"] | dirs["fig4"] | dirs["fig5"]) == 3186
    families = {Path(d).relative_to(tmp_path / "runs" / "study").parts[4] for d in dirs["fig4"]}
    assert families == {"dense", "imp", "imp-at", "omp", "rp"}
    assert {r["pretrain"] for r in runs["fig4"]} == {"at"} and {r["data_rate"] for r in runs["fig4"]} == {1.0}
    assert max(r["sparsity"] for r in runs["fig3"]) == 98.56
    plan = subprocess.run([sys.executable, str(REPO / "script" / "sweep.py"), "plan", str(tmp_path / "fig4.toml")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert plan.returncode == 0, plan.stderr
    line = plan.stdout.splitlines()[0]
    assert "--arch resnet50" in line and f"--data {tmp_path / 'data'}" in line and "--lr" not in line
