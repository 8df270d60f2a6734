"""The command line: the one parser (full flag names only, usage errors in one line) and the
refusal of flags that would have no effect on the run they are given to."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import main_downstream
import main_imp_pretrain
from utils.cli import ArgumentParser, given_flags, run_main
from utils.errors import UserError

try:  # Python 3.11+; the project supports 3.9 with tomli (requirements.txt)
    import tomllib
except ImportError:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _refusal(module, argv, out, capsys, monkeypatch):
    """Exit status and stderr of the stage's command line; a run that gets past parsing fails the test."""
    def no_run(*args, **kwargs):
        raise AssertionError("the command line was accepted and the run started")

    monkeypatch.setattr(module, "run", no_run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_main(module.main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert not Path(out).exists()  # nothing written, not even the run directory
    return info.value.code, err


def _one_refusal_line(code, err, *flags):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "has no effect" in lines[0] or "have no effect" in lines[0], err
    assert "applies" in lines[0] and all(flag in lines[0] for flag in flags), err
    return lines[0]


# ----------------------------------------------------------------------------- stage 2

STAGE2_REFUSED = [
    (["--regime", "st", "--train-steps", "3"], "--train-steps", "--regime at"),
    (["--regime", "fat", "--train_steps", "3"], "--train_steps", "--regime at"),  # the alias is named as typed
    (["--regime", "st", "--keep-sa-best"], "--keep-sa-best", "--regime at and fat"),
    (["--regime", "at", "--no-fat-guard"], "--no-fat-guard", "--regime fat"),
    (["--regime", "st", "--alpha", "2/255"], "--alpha", "--regime at and fat"),
    (["--regime", "st", "--train_gamma", "2/255"], "--train_gamma", "--regime at and fat"),
    (["--regime", "st", "--attack-bn", "eval"], "--attack-bn", "--regime at and fat"),
    (["--subset", "first"], "--subset", "--data-rate below 1"),
    (["--data-rate", "1", "--subset-seed", "3"], "--subset-seed", "--data-rate below 1"),
    (["--data-rate", "0.1", "--subset", "first", "--subset-seed", "3"], "--subset-seed", "--subset random"),
    (["--test-steps", "0", "--test-alpha", "2/255"], "--test-alpha", "--test-steps above 0"),
    (["--test-steps", "0", "--test-eps", "2/255"], "--test-eps", "--test-steps above 0"),
    (["--test-eps", "4/255", "--eps", "8/255"], "--eps", "without --test-eps"),
    (["--workers", "2"], "--workers", "--dataset folder"),
    (["--data", "somewhere"], "--data", "digits"),
    (["--reinit-stem"], "--reinit-stem", "--init"),
]


@pytest.mark.parametrize("extra, flag, where", STAGE2_REFUSED)
def test_stage2_refuses_a_flag_without_effect(tmp_path, capsys, monkeypatch, extra, flag, where):
    out = tmp_path / "run"
    argv = ["--dataset", "digits", "--init", "none", "--save-dir", out, *extra]
    line = _one_refusal_line(*_refusal(main_downstream, argv, out, capsys, monkeypatch), flag)
    assert where in line and line.endswith("drop it."), line


@pytest.mark.parametrize("extra", [
    ["--regime", "at", "--train-steps", "3", "--alpha", "2/255", "--keep-sa-best", "--attack-bn", "eval"],
    ["--regime", "fat", "--no-fat-guard", "--alpha", "2/255", "--train_eps", "4/255"],
    ["--data-rate", "0.1", "--subset", "random", "--subset-seed", "2"],
    ["--data-rate", "0.01", "--subset", "first"],
    ["--regime", "st", "--eps", "4/255"],  # the radius of st's robust evaluation
    ["--regime", "st", "--test-eps", "4/255", "--test-alpha", "1/255", "--test-steps", "3"],
    ["--dataset", "folder", "--data", "somewhere", "--workers", "0"],
    ["--init", "theta_p.pt", "--reinit-stem"],
    ["--ticket", "ticket.pt", "--reinit-stem"],
])
def test_stage2_accepts_flags_where_they_act(extra):
    main_downstream.parse_args(["--dataset", "digits", "--init", "none", "--save-dir", "never", *extra])


# ----------------------------------------------------------------------------- stage 1

OMP_RP_DROPPED = [["--eps", "8/255"], ["--alpha", "2/255"], ["--attack-steps", "2"], ["--lr", "0.1"],
                  ["--batch-size", "8"], ["--epochs-per-round", "2"], ["--max-loss", "10"],
                  ["--checkpoint-minutes", "5"], ["--amp", "off"], ["--compile"], ["--retrain", "st"],
                  ["--retrain", "at"], ["--no-progress"], ["--momentum", "0.5"], ["--weight-decay", "0"],
                  ["--no-channels-last"], ["--image-size", "16"], ["--augment", "none"], ["--rewind", "theta_p"],
                  ["--score-init", "scaled"]]

STAGE1_REFUSED = [
    *[(["--method", method, *flag], flag[0]) for method in ("omp", "rp") for flag in OMP_RP_DROPPED],
    (["--method", "imp", "--rounds", "1", "--lr", "0.1"], "--lr"),  # the last round is never re-trained
    (["--method", "imp", "--rounds", "1", "--epochs-per-round", "2"], "--epochs-per-round"),
    (["--method", "imp", "--rounds", "3", "--epochs-per-round", "0", "--batch-size", "8"], "--batch-size"),
    (["--method", "lmp", "--epochs-per-round", "0", "--lr", "0.1"], "--lr"),
    (["--method", "imp", "--retrain", "st", "--eps", "8/255"], "--eps"),
    (["--method", "imp", "--attack-steps", "2"], "--attack-steps"),
    (["--method", "lmp", "--retrain", "at", "--attack-bn", "eval"], "--attack-bn"),
    (["--method", "lmp", "--rewind", "theta_p"], "--rewind"),
    (["--method", "imp", "--score-init", "scaled"], "--score-init"),
    (["--method", "rp", "--layerwise"], "--layerwise"),
    (["--method", "omp", "--pattern", "nm", "--rounds", "1", "--rate", "0.5"], "--rate"),
    (["--method", "omp", "--seed", "3"], "--seed"),
    (["--method", "omp", "--dataset", "folder", "--data", "somewhere"], "--data"),
    (["--method", "imp", "--data", "somewhere"], "--data"),  # digits needs no folder
    (["--method", "imp", "--workers", "0"], "--workers"),
    (["--method", "rp", "--reinit-stem"], "--reinit-stem"),
]


@pytest.mark.parametrize("extra, flag", STAGE1_REFUSED)
def test_stage1_refuses_a_flag_without_effect(tmp_path, capsys, monkeypatch, extra, flag):
    out = tmp_path / "tickets"
    argv = ["--dataset", "digits", "--init", tmp_path / "theta_p.pt", "--save-dir", out, *extra]
    _one_refusal_line(*_refusal(main_imp_pretrain, argv, out, capsys, monkeypatch), flag)


def test_several_flags_without_effect_are_named_in_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "tickets"
    argv = ["--dataset", "digits", "--init", "theta_p.pt", "--save-dir", out, "--method", "omp",
            "--eps", "8/255", "--alpha", "2/255", "--lr", "0.1", "--retrain", "at"]
    line = _one_refusal_line(*_refusal(main_imp_pretrain, argv, out, capsys, monkeypatch),
                             "--eps", "--alpha", "--lr", "--retrain")
    assert line.endswith("drop them."), line


@pytest.mark.parametrize("extra", [
    ["--method", "imp", "--retrain", "at", "--eps", "8/255", "--alpha", "2/255", "--attack-steps", "2",
     "--attack-bn", "eval", "--lr", "0.1", "--batch-size", "8", "--epochs-per-round", "1", "--max-loss", "9",
     "--checkpoint-minutes", "1", "--amp", "off", "--no-progress", "--rewind", "none", "--seed", "2"],
    ["--method", "lmp", "--retrain", "at", "--eps", "8/255", "--score-init", "magnitude", "--lr", "0.1",
     "--layerwise"],
    ["--method", "rp", "--seed", "2", "--rate", "0.5", "--rounds", "3", "--exclude-stem"],
    ["--method", "omp", "--init", "none", "--seed", "2"],  # random weights: the seed picks them
    ["--method", "omp", "--reinit-stem", "--seed", "2", "--layerwise"],
    ["--method", "omp", "--pattern", "nm", "--nm", "2:4", "--rounds", "1"],
    ["--method", "imp", "--dataset", "folder", "--data", "somewhere", "--workers", "0"],
])
def test_stage1_accepts_flags_where_they_act(extra):
    main_imp_pretrain.parse_args(["--dataset", "digits", "--init", "theta_p.pt", "--save-dir", "never", *extra])


def test_earlier_refusals_keep_their_own_messages():
    with pytest.raises(UserError, match="--rewind none applies to IMP only"):
        main_imp_pretrain.parse_args(["--dataset", "digits", "--init", "x", "--save-dir", "o", "--method", "omp",
                                      "--rewind", "none"])
    with pytest.raises(UserError, match="--nm applies to --pattern nm only"):
        main_imp_pretrain.parse_args(["--dataset", "digits", "--init", "x", "--save-dir", "o", "--nm", "2:4"])


# ----------------------------------------------------------------------------- what the sweep asks

def test_flag_applies_answers_for_a_grid_flag():
    assert main_downstream.flag_applies("train_steps", regime="st") == (
        False, main_downstream.FLAG_SCOPE["train_steps"][1])
    assert main_downstream.flag_applies("train_steps", regime="at")[0]
    assert main_downstream.flag_applies("--no-fat-guard", regime="fat")[0]
    assert not main_downstream.flag_applies("--no-fat-guard")[0]  # the default regime is st
    assert not main_downstream.flag_applies("subset", data_rate=1.0)[0]
    assert main_downstream.flag_applies("subset", data_rate=0.1)[0]
    assert main_downstream.flag_applies("--train_eps", regime="st")[0]  # st's robust evaluation radius
    assert not main_downstream.flag_applies("eps", regime="st", test_eps=4 / 255)[0]
    assert main_downstream.flag_applies("arch", regime="st") == (True, "applies to every run")
    assert main_downstream.flag_applies("workers")[0]  # the dataset is unknown: taken to apply
    assert not main_downstream.flag_applies("workers", dataset="cifar10")[0]
    assert not main_imp_pretrain.flag_applies("eps", method="omp")[0]
    assert main_imp_pretrain.flag_applies("eps", retrain="at")[0]
    assert not main_imp_pretrain.flag_applies("lr", rounds=1)[0]
    with pytest.raises(UserError, match="'see' is not a flag of main_downstream.py"):
        main_downstream.flag_applies("see")
    with pytest.raises(TypeError, match="unknown run context method"):
        main_downstream.flag_applies("eps", method="omp")


@pytest.mark.parametrize("module", [main_downstream, main_imp_pretrain])
def test_flag_tables_name_real_flags(module):
    dests = {action.dest for action in module.build_parser()._actions}
    assert set(module.FLAG_SCOPE) <= dests and set(module.FLAG_CONTEXT) <= dests


def test_given_flags_reads_the_command_line_not_the_values():
    p = ArgumentParser()
    p.add_argument("--train-steps", "--train_steps", dest="train_steps", type=int, default=10)
    p.add_argument("--eps", default="8/255")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("rest", nargs="*")
    argv = ["--train_steps", "10", "--eps=8/255", "--", "--seed"]
    p.parse_args(argv)
    assert given_flags(p, argv) == {"train_steps": "--train_steps", "eps": "--eps"}


# ----------------------------------------------------------------------------- the one parser

def test_abbreviations_are_not_flags():
    p = main_downstream.build_parser()
    assert p.allow_abbrev is False
    with pytest.raises(SystemExit):
        p.parse_args(["--dataset", "digits", "--init", "none", "--save-dir", "o", "--see", "7"])


@pytest.mark.parametrize("script", ["main_downstream.py", "main_imp_pretrain.py"])
def test_see_7_is_refused_not_read_as_seed(tmp_path, script):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / script), "--dataset", "digits", "--init", "none",
                           "--save-dir", str(out), "--see", "7"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: unrecognized arguments: --see 7; see {script} --help"]
    assert not out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "digits", "--init", "none", "--save-dir", "o", "--regime", "pgd"],
     "argument --regime: invalid choice: 'pgd'"),
    ([], "the following arguments are required: --dataset"),
    (["--dataset", "digits", "--init", "none", "--save-dir", "o", "--eps", "8/x"], "argument --eps"),
])
def test_a_usage_error_is_one_line_with_a_pointer_to_help(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        main_downstream.parse_args(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err, err
    assert err.startswith(f"error: {needle}") and err.rstrip().endswith("; see main_downstream.py --help"), err


def test_help_keeps_the_full_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main_imp_pretrain.parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--epochs-per-round" in out and "--score-init" in out


TOOLS = ["analysis.compare_verdicts", "analysis.sources_needed", "analysis.export_ticket", "analysis.loss_landscape", "analysis.mask_stats",
         "analysis.plot_companion", "analysis.plot_curves", "analysis.robustness", "benchmarks.bench_eval_precision",
         "benchmarks.bench_inference", "benchmarks.bench_loader", "benchmarks.bench_step", "benchmarks.estimate_run"]


@pytest.mark.parametrize("name", TOOLS)
def test_every_tool_answers_a_usage_error_in_one_line(capsys, name):
    with pytest.raises(SystemExit) as info:
        importlib.import_module(name).main(["--no-such-flag"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and err.rstrip().endswith(" --help"), err


@pytest.mark.parametrize("script, argv", [("sweep.py", ["plan", "g.toml", "--work", "2"]),
                                          ("demo.py", ["--quik"])])
def test_script_parsers_take_full_names_and_answer_in_one_line(script, argv):
    proc = subprocess.run([sys.executable, str(REPO / "script" / script), *argv], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: unrecognized arguments: {' '.join(argv[-2:] if script == 'sweep.py' else argv)}; "
        f"see {script} --help"]


# ----------------------------------------------------------------------------- shipped scripts and grids

def _parse_only_python(tmp_path):
    """A PYTHON for the launch scripts that only parses the entry's command line."""
    parse = tmp_path / "parse_only.py"
    parse.write_text("import importlib, sys\nfrom pathlib import Path\n"
                     "entry = Path(sys.argv[1])\nsys.path.insert(0, str(entry.parent))\n"
                     "importlib.import_module(entry.stem).parse_args(sys.argv[2:])\nprint('parsed')\n")
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{parse}' \"$@\"\n")
    python.chmod(0o755)
    return python


@pytest.mark.parametrize("script, args", [
    ("imp_pretrain/imp_std.sh", ["theta_p.pt", "out", "imagenet"]),
    ("imp_pretrain/imp_adv.sh", ["theta_p.pt", "out", "imagenet"]),
    ("train_downstream/std.sh", ["cifar10", "theta_p.pt", "out", "none"]),
    ("train_downstream/std.sh", ["digits", "theta_p.pt", "out", "ticket.pt"]),
    ("train_downstream/adv_cifar.sh", ["cifar100", "theta_p.pt", "out", "ticket.pt"]),
    ("train_downstream/adv_svhn.sh", ["theta_p.pt", "out", "none"]),
])
def test_launch_scripts_pass_only_flags_that_act(tmp_path, script, args):
    env = {**os.environ, "PYTHON": str(_parse_only_python(tmp_path)), "NGPU": "1", "PRETRAIN": "std"}
    proc = subprocess.run(["bash", str(REPO / "script" / script), *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "parsed", proc.stderr


@pytest.mark.parametrize("grid", sorted((REPO / "script" / "grids").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_grid_flags_act_on_every_run(grid):
    spec = tomllib.loads(grid.read_text())
    axes, flags = spec["axes"], spec.get("flags", {})
    context = {k: flags[k] for k in ("subset", "test_steps", "test_eps") if k in flags}
    for dataset in axes["dataset"]:
        for regime in axes["regime"]:
            for rate in axes["data_rate"]:
                # a grid without dense runs (dense = false) has ticket runs only
                for ticket in ("none", "ticket.pt") if axes.get("dense", True) else ("ticket.pt",):
                    for key in flags:
                        applies, where = main_downstream.flag_applies(
                            "--" + key.replace("_", "-"), dataset=dataset, regime=regime, data_rate=rate,
                            ticket=ticket, init="theta_p.pt", **context)
                        assert applies, (grid.name, key, dataset, regime, rate, where)
