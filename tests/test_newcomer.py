"""What a newcomer meets (issue 25): the retention policy for model files, the install's package list
and entry points, a default in every --help, --help and --data on every shell script, and the
adaptations a run makes to its request said once and recorded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import main_downstream
import models
from study.grid import build_grid, check_flags, expand
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "resnet_tiny", "--cifar-stem", "--no-progress", "--batch-size", "64", "--no-channels-last"]


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "init.pt"
    models.save_model_checkpoint(path, models.build_model("resnet_tiny", 10, cifar_stem=True))
    return path


def _digits_run(init, out, *extra):
    argv = ["--dataset", "digits", "--init", init, "--pretrain", "std", "--regime", "st", "--epochs", "1",
            "--test-steps", "0", "--save-dir", out, *TINY, *extra]
    return main_downstream.main([str(a) for a in argv])


# -- retention ---------------------------------------------------------------------------------------

def test_keep_model_none_removes_the_model_files_once_results_exist_and_a_rerun_applies_it(init, tmp_path, capsys):
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    _digits_run(init, kept)
    assert (kept / "model_best.pt").is_file() and not (kept / "checkpoint.pt").exists()
    _digits_run(init, dropped, "--keep-model", "none")
    assert "no model file kept" in capsys.readouterr().out
    assert sorted(p.name for p in dropped.iterdir() if p.suffix == ".pt") == []
    results = json.loads((dropped / "results.json").read_text())
    assert results["config"]["keep_model"] == "none"
    # the retention setting is not another run: a rerun of the finished run with the other setting is
    # "already finished", and a rerun asking for none removes a model that an earlier run kept
    _digits_run(init, dropped, "--keep-model", "best")
    _digits_run(init, kept, "--keep-model", "none")
    assert "already finished" in capsys.readouterr().out
    assert not (kept / "model_best.pt").exists() and (kept / "results.json").is_file()


def test_a_trajectory_without_its_centre_model_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="--keep-model best") as info:
        main_downstream.parse_args(["--dataset", "digits", "--init", "none", "--save-dir", str(tmp_path / "r"),
                                    "--save-trajectory", "--keep-model", "none"])
    assert "\n" not in str(info.value)
    with pytest.raises(SystemExit) as info:  # a model the run does not make
        main_downstream.main(["--dataset", "digits", "--init", "none", "--save-dir", str(tmp_path / "r"),
                              "--keep-model", "last"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and "--keep-model" in err
    assert not (tmp_path / "r").exists()


def _grid(tmp_path, **flags):
    spec = {"out": "runs", "pretrain": {"std": {"init": "none"}},
            "axes": {"dataset": ["digits"], "regime": ["st"], "seed": [1, 2]},
            "flags": {"arch": "resnet_tiny", "epochs": 1, **flags}}
    return build_grid(spec, tmp_path, tmp_path / "grid.toml")


def test_sweep_runs_keep_no_model_unless_the_grid_asks(tmp_path):
    runs = expand(_grid(tmp_path))
    assert [r.keep_model for r in runs] == ["none", "none"]
    assert all(r.argv()[r.argv().index("--keep-model") + 1] == "none" for r in runs)
    assert main_downstream.config_for(runs[0].argv())["keep_model"] == "none"
    for spelling in ("keep_model", "keep-model"):
        kept = expand(_grid(tmp_path, **{spelling: "best"}))
        assert [r.keep_model for r in kept] == ["best", "best"]
        assert main_downstream.config_for(kept[0].argv())["keep_model"] == "best"
    # a figure that reads the trajectory needs the model it centres on
    with pytest.raises(UserError, match='keep_model = "best"'):
        check_flags(expand(_grid(tmp_path, save_trajectory=True)))
    check_flags(expand(_grid(tmp_path, save_trajectory=True, keep_model="best")))
    with pytest.raises(UserError, match="keep-model"):
        check_flags(expand(_grid(tmp_path, keep_model="all")))


def test_a_finished_sweep_run_is_not_stale_for_its_retention_setting():
    old = main_downstream.config_for(["--dataset", "digits", "--init", "none", "--save-dir", "x"])
    del old["keep_model"]  # a run made before the flag existed kept its model
    new = main_downstream.config_for(["--dataset", "digits", "--init", "none", "--save-dir", "x",
                                      "--keep-model", "none"])
    assert main_downstream.config_changes(old, new) == []


# -- help ----------------------------------------------------------------------------------------------

CLIS = ["main_downstream.py", "main_imp_pretrain.py", "script/sweep.py", "script/demo.py",
        *(f"analysis/{n}.py" for n in ("export_ticket", "loss_landscape", "plot_curves", "compare_verdicts", "sources_needed",
                                       "paper_vs_ours", "robustness", "mask_stats", "plot_companion")),
        *(f"benchmarks/{n}.py" for n in ("bench_loader", "bench_step", "bench_eval_precision", "bench_inference",
                                         "estimate_run"))]


class _Parsed(Exception):
    pass


def _parser_of(path, monkeypatch):
    """The ArgumentParser a command-line tool builds, caught as it parses (nothing runs)."""
    import importlib.util

    import utils.cli

    caught = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise _Parsed

    monkeypatch.setattr(utils.cli.ArgumentParser, "parse_args", catch)
    spec = importlib.util.spec_from_file_location(f"cli_{Path(path).stem}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(_Parsed):
        module.main([])
    return caught[-1]


@pytest.mark.parametrize("path", CLIS)
def test_every_option_of_every_tool_says_its_default_in_help(path, monkeypatch):
    import argparse

    parser = _parser_of(path, monkeypatch)
    formatter = parser._get_formatter()
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.nargs != 0 and not a.required and a.help is not argparse.SUPPRESS
               and "default" not in formatter._get_help_string(a).lower()]
    assert missing == [], f"{path}: --help states no default for {missing}"
    text = parser.format_help()
    assert "%(default)" not in text and "default: None" not in text


def test_stage_help_names_the_defaults_a_newcomer_looks_for():
    import main_imp_pretrain

    text = " ".join(main_imp_pretrain.build_parser().format_help().split())
    for needle in ("--lr LR SGD learning rate (default: 0.0005", "(default: 0.2)", "(default: 19)", "(default: 30)",
                   "(default: 2048)", "(default: 8/255)", "(default: eps/4)", "(default: resnet50)", "(default: 1)",
                   "(default: 3)", "folder = your own image-folder tree"):
        assert needle in text, needle
    text = " ".join(main_downstream.build_parser().format_help().split())
    assert "Default: best for a direct run; runs launched by script/sweep.py get none" in text
    assert "(default: per regime and dataset, listed below)" in text


# -- shell scripts ----------------------------------------------------------------------------------------

SCRIPTS = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("script/*.sh"), *REPO.glob("script/*/*.sh")])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_shell_script_answers_help(script):
    proc = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "#" not in proc.stdout.splitlines()[0]
    if script != "script/_launch.sh":
        assert "usage:" in proc.stdout


def test_demo_help_states_the_seeds_the_demo_runs():
    sys.path.insert(0, str(REPO / "script"))
    try:
        import demo
    finally:
        sys.path.remove(str(REPO / "script"))
    proc = subprocess.run(["bash", "script/demo.sh", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable})
    text = " ".join(proc.stdout.split())
    assert f"{len(demo.settings(False)['seeds'])} seeds each (two with --quick)" in text
    assert len(demo.settings(True)["seeds"]) == 2
    assert f"{('', 'one', 'two', 'three')[demo.settings(False)['replicas']]} of each (seeds 1, 2, 3; two with --quick)" \
        in text and demo.settings(True)["replicas"] == 2


def _recording_python(tmp_path):
    """A PYTHON for the scripts that records the entry point's argv instead of running it."""
    record = tmp_path / "argv.json"
    fake = tmp_path / "fakepython"
    fake.write_text("#!/usr/bin/env bash\n"
                    'if [ "$1" = "-c" ]; then echo 0; exit 0; fi\n'
                    f"'{sys.executable}' -c 'import json,sys; json.dump(sys.argv[2:], open(\"{record}\", \"w\"))' \"$@\"\n")
    fake.chmod(0o755)
    return fake, record


@pytest.mark.parametrize("env, extra, used, said", [
    ({}, ["--data", "/mine"], "/mine", "from --data"),
    ({"DATA_DIR": "/env"}, [], "/env", "from the environment variable DATA_DIR"),
    ({"DATA_DIR": "/env"}, ["--data=/mine"], "/mine", "from --data"),
    ({}, [], "data", "the default; pass --data DIR"),
])
def test_stage2_scripts_take_data_as_a_flag_and_say_which_folder_they_use(tmp_path, env, extra, used, said):
    fake, record = _recording_python(tmp_path)
    base = {k: v for k, v in os.environ.items() if k != "DATA_DIR"}
    proc = subprocess.run(["bash", "script/train_downstream/adv_svhn.sh", "INIT.pt", str(tmp_path / "r"), "none",
                           *extra], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**base, **env, "PYTHON": str(fake), "PRETRAIN": "std"})
    assert proc.returncode == 0, proc.stderr
    assert said in proc.stderr and proc.stderr.count("data:") == 1
    argv = json.loads(record.read_text())
    given = [a.split("=", 1)[1] if a.startswith("--data=") else argv[i + 1]
             for i, a in enumerate(argv) if a == "--data" or a.startswith("--data=")]
    assert given[-1] == used


def test_stage1_scripts_take_data_as_a_flag_or_the_older_third_argument(tmp_path):
    fake, record = _recording_python(tmp_path)
    env = {**os.environ, "PYTHON": str(fake), "PRETRAIN": "at", "NGPU": "1"}
    for args in (["--data", "/imagenet", "--rounds", "2"], ["/imagenet", "--rounds", "2"]):
        proc = subprocess.run(["bash", "script/imp_pretrain/imp_adv.sh", "INIT.pt", str(tmp_path / "s"), *args],
                              capture_output=True, text=True, cwd=REPO, timeout=60, env=env)
        assert proc.returncode == 0 and "data: /imagenet" in proc.stderr, proc.stderr
        argv = json.loads(record.read_text())
        assert argv[argv.index("--data") + 1] == "/imagenet"
        assert argv[len(argv) - argv[::-1].index("--rounds")] == "2"  # the last one, which argparse keeps
        assert int(argv[argv.index("--workers") + 1]) <= len(os.sched_getaffinity(0))
    record.unlink()
    proc = subprocess.run(["bash", "script/imp_pretrain/imp_adv.sh", "INIT.pt", str(tmp_path / "s"), "--rounds", "2"],
                          capture_output=True, text=True, cwd=REPO, timeout=60, env=env)
    assert proc.returncode == 2 and "--data DIR" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not record.exists()


# -- adaptations said once and recorded --------------------------------------------------------------------

def test_a_small_validation_split_a_late_eval_from_and_the_checkpoint_format_are_said_once_and_recorded(
        tmp_path, init, capsys):
    from tests.fixtures import write_cifar10

    write_cifar10(tmp_path / "data", per_batch=40, n_test=20)  # 200 training images
    out = tmp_path / "run"
    main_downstream.main([str(a) for a in [
        "--data", tmp_path / "data", "--dataset", "cifar10", "--init", init, "--pretrain", "at", "--regime", "at",
        "--epochs", "1", "--train-steps", "1", "--test-steps", "1", "--image-size", "32", "--save-dir", out,
        *TINY, "--allow-chance"]])  # random images: chance level by design
    lines = capsys.readouterr().out.splitlines()
    said = {key: [ln for ln in lines if key in ln] for key in ("validation holds out 20 training images",
                                                              "first validated epoch, 45, is past the last",
                                                              "read as a double-win checkpoint; head replaced")}
    assert all(len(found) == 1 for found in said.values()), said
    info = json.loads((out / "run_info.json").read_text())
    assert len(info["adaptations"]) == 2 and info["init_format"] == "double-win" and info["dropped_head"] is True
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["eval_from"] == 0 and config["val_images"] == 20  # what was used, not what the protocol says


def test_an_eval_from_past_the_last_epoch_is_refused_when_given():
    base = ["--dataset", "cifar10", "--init", "none", "--regime", "at", "--save-dir", "x", "--epochs", "10"]
    with pytest.raises(UserError, match="choose 9 or less"):
        main_downstream.resolve_defaults(main_downstream.parse_args([*base, "--eval-from", "10"]))
    assert main_downstream.resolve_defaults(main_downstream.parse_args([*base, "--eval-from", "9"])) == []
    notes = main_downstream.resolve_defaults(main_downstream.parse_args(base))
    assert len(notes) == 1 and "only the last epoch (9)" in notes[0]


def test_default_workers_never_exceed_the_cpus_of_the_process(monkeypatch):
    from training import setup

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert setup.default_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert setup.default_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert setup.default_workers() == setup.DEFAULT_WORKERS
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    parser = main_downstream.build_parser()
    assert parser.get_default("workers") == setup.DEFAULT_WORKERS
    assert "here 4" in " ".join(parser.format_help().split())


# -- install -------------------------------------------------------------------------------------------------

def _pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_install_lists_every_top_level_module_and_package_and_its_commands_resolve():
    spec = _pyproject()
    setuptools = spec["tool"]["setuptools"]
    modules = {p.stem for p in REPO.glob("*.py")}
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()} - {"tests", "benchmarks"}
    assert set(setuptools["py-modules"]) == modules
    assert set(setuptools["packages"]) == packages | {"double_win_script"}
    assert setuptools["package-dir"] == {"double_win_script": "script"}
    sys.path.insert(0, str(REPO / "script"))
    try:
        import entry
    finally:
        sys.path.remove(str(REPO / "script"))
    scripts = spec["project"]["scripts"]
    assert set(scripts) == set(entry.COMMANDS)
    for command, target in scripts.items():
        module, function = target.split(":")
        assert module == "double_win_script.entry" and callable(getattr(entry, function)), command
        assert callable(entry._module(entry.COMMANDS[command]).main), command
    # a user mistake through a command is the tool's one line and exit status 2
    with pytest.raises(SystemExit) as info:
        entry.run("dwl-transfer", ["--dataset", "digits", "--init", "none", "--save-dir", "x", "--eps", "bad"])
    assert info.value.code == 2


@pytest.mark.slow
def test_a_built_wheel_holds_the_layout_and_the_commands(tmp_path):
    import shutil
    import zipfile

    source = tmp_path / "src"  # a copy, so the build leaves nothing in the clone
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__",
                                                                ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("double_win_lth-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    setuptools = _pyproject()["tool"]["setuptools"]
    assert {f"{m}.py" for m in setuptools["py-modules"]} | set(setuptools["packages"]) <= tops
    assert not {"tests", "benchmarks", "script"} & tops
    assert {"analysis/paper_numbers.toml", "double_win_script/grids/fig3.toml",
            "double_win_script/train_downstream/std.sh", "double_win_script/_launch.sh"} <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for command in _pyproject()["project"]["scripts"]:
        assert f"{command} = double_win_script.entry:" in entry_points
