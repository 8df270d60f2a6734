"""Issue 24: script/grids/companion_*.toml, one grid (per architecture or IMP variant) per figure of
the companion paper, read by the real grid reader over stage-1 directories in the real format."""

import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

from study.grid import check_flag_keys, check_flags, expand, load_grid, refuse_flags_acting_nowhere

REPO = Path(__file__).resolve().parents[1]
GRIDS = sorted((REPO / "script" / "grids").glob("companion_*.toml"))
LEVELS = {str(k): round(100 * (1 - 0.8 ** k), 2) for k in range(1, 22)}  # 21 rounds: 20.00 ... 99.08
# stage-1 directory suffix -> its config.json (what the grid reader and the analysis read)
KINDS = {"omp": {"method": "omp", "retrain": None}, "omp_channel": {"method": "omp", "pattern": "channel"},
         "imp": {"method": "imp", "retrain": "st"}, "imp_norewind": {"method": "imp", "retrain": "st", "rewind": "none"},
         "imp_rew2": {"method": "imp", "retrain": "st", "rewind": "epoch_2"},
         "lmp": {"method": "lmp", "retrain": "st", "lmp_recipe": "hydra"}}


def _spec(path):
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _tree(tmp_path):
    (tmp_path / "weights").mkdir()
    for path in GRIDS:
        for table in _spec(path)["pretrain"].values():
            (tmp_path / table["init"]).write_bytes(b"")
            for t in table["tickets"]:
                d = tmp_path / t
                if d.exists():
                    continue
                (d / "tickets").mkdir(parents=True)
                (d / "config.json").write_text(json.dumps(KINDS[d.name.split("_", 1)[1]]))
                (d / "sparsity.json").write_text(json.dumps(LEVELS))
                for k in LEVELS:
                    (d / "tickets" / f"round_{int(k):02d}.pt").write_bytes(b"")
        shutil.copy(path, tmp_path / path.name)


def test_every_figure_has_its_grids_in_todays_format():
    names = {p.stem for p in GRIDS}
    assert {n.split("_")[1] for n in names} == {"fig1", "fig2", "fig3", "fig4", "fig5"}
    for path in GRIDS:
        spec, text = _spec(path), path.read_text(encoding="utf-8")
        assert set(spec) <= {"out", "pretrain", "axes", "flags"} and set(spec["pretrain"]) == {"std", "at"}
        assert spec["axes"]["dataset"] == ["cifar10", "cifar100"] and spec["axes"]["rounds"] == "all"
        for key in ("lr", "epochs", "milestones", "batch_size", "weight_decay", "schedule"):
            assert key not in spec["flags"]
        assert "Choices where the caption is silent" in text and "--rounds 21" in text
        runs = int(text.split(" main_downstream.py runs.")[0].rsplit("= ", 1)[1])
        per = int(spec["axes"]["dense"]) + 21 * len(spec["pretrain"]["at"]["tickets"])
        assert runs == per * 2 * 2 * len(spec["axes"]["seed"]), path.name
    archs = {p.stem: _spec(p)["flags"]["arch"] for p in GRIDS}
    assert archs["companion_fig1_resnet18"] == archs["companion_fig5_resnet18"] == "resnet18"
    assert archs["companion_fig3"] == archs["companion_fig1_resnet50"] == "resnet50"


def test_the_real_reader_takes_them_and_shared_directories_run_one_command(tmp_path):
    _tree(tmp_path)
    commands, families = defaultdict(set), defaultdict(set)
    for path in GRIDS:
        grid = load_grid(tmp_path / path.name)
        check_flag_keys(grid)
        runs = expand(grid)
        refuse_flags_acting_nowhere(grid, runs)
        check_flags(runs)
        assert max(r.sparsity for r in runs) == 99.08 and len({r.run_dir for r in runs}) == len(runs)
        for r in runs:
            argv = r.argv()
            commands[r.run_dir].add(tuple(argv))
            families[path.stem].add(Path(r.run_dir).relative_to(grid.out).parts[4])
            arch = argv[argv.index("--arch") + 1]
            assert arch in path.stem if path.stem.startswith(("companion_fig1", "companion_fig5")) else arch == "resnet50"
        flags = " ".join(runs[0].argv())
        assert ("--linear-eval" in flags) == (path.stem == "companion_fig2")
        assert ("--random-reinit" in flags) == (path.stem == "companion_fig4_reinit")
    assert all(len(c) == 1 for c in commands.values())  # a directory two grids share is one run
    assert families["companion_fig3"] == {"dense", "omp_channel"} and families["companion_fig5_resnet50"] == {"dense", "lmp"}
    assert families["companion_fig4_rew2"] == {"imp"}  # the variants' own trees: no dense runs
