"""Protocol fidelity (issue 13): selection start per protocol on every entry path, what results.json
records, the stage-1 scripts' refusal without a pretrain label, and the help text."""

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

import main_downstream
import main_imp_pretrain

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "resnet_tiny", "--cifar-stem", "--no-progress", "--batch-size", "32"]


def resolved(argv):
    args = main_downstream.parse_args(argv)
    main_downstream.resolve_defaults(args)
    return args


EXPECTED_EVAL_FROM = [("cifar10", "at", 45), ("cifar100", "at", 45), ("cifar10", "fat", 0), ("svhn", "at", 0),
                      ("svhn", "fat", 0), ("cifar10", "st", 0), ("cifar100", "st", 0), ("svhn", "st", 0),
                      ("digits", "at", 0)]
EXPECTED_EVAL_FROM_MAP = [((d, r), e) for d, r, e in EXPECTED_EVAL_FROM]


@pytest.mark.parametrize("dataset,regime,expected", EXPECTED_EVAL_FROM)
def test_eval_from_follows_the_protocol_when_called_directly(dataset, regime, expected):
    args = resolved(["--dataset", dataset, "--init", "none", "--regime", regime, "--save-dir", "x"])
    assert args.eval_from == expected
    # a user value wins
    assert resolved(["--dataset", dataset, "--init", "none", "--regime", regime, "--eval-from", "7",
                     "--save-dir", "x"]).eval_from == 7


def _fake_python(tmp_path):
    """An interpreter stand-in that records the entry point's argv instead of running it."""
    record = tmp_path / "argv.json"
    fake = tmp_path / "fakepython"
    fake.write_text("#!/usr/bin/env bash\n"
                    'if [ "$1" = "-c" ]; then echo 0; exit 0; fi\n'
                    f'python3 -c \'import json,sys; json.dump(sys.argv[2:], open("{record}", "w"))\' "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake, record


SCRIPT_CASES = [(["script/train_downstream/adv_cifar.sh", "cifar10"], "cifar10", "at"),
                (["script/train_downstream/adv_cifar.sh", "cifar100"], "cifar100", "at"),
                (["script/train_downstream/adv_svhn.sh"], "svhn", "at"),
                (["script/train_downstream/std.sh", "cifar10"], "cifar10", "st"),
                (["script/train_downstream/std.sh", "svhn"], "svhn", "st")]


@pytest.mark.parametrize("script,dataset,regime", SCRIPT_CASES)
def test_scripts_resolve_the_same_protocol_as_direct_calls(tmp_path, script, dataset, regime):
    fake, record = _fake_python(tmp_path)
    env = {**os.environ, "PYTHON": str(fake), "PRETRAIN": "std"}
    subprocess.run(["bash", *script, "INIT.pt", str(tmp_path / "run"), "none"], cwd=REPO, env=env, check=True)
    argv = json.loads(record.read_text())
    via_script = resolved(argv)
    direct = resolved(["--dataset", dataset, "--init", "INIT.pt", "--regime", regime,
                       "--save-dir", str(tmp_path / "run"), "--image-size", "224"])
    expected = dict(EXPECTED_EVAL_FROM_MAP)[(dataset, regime)]
    assert via_script.eval_from == direct.eval_from == expected
    for key in ("lr", "epochs", "milestones", "schedule", "batch_size", "weight_decay", "eps", "alpha",
                "train_steps", "test_steps", "momentum"):
        assert getattr(via_script, key) == getattr(direct, key), key


@pytest.mark.parametrize("script", ["script/imp_pretrain/imp_std.sh", "script/imp_pretrain/imp_adv.sh"])
def test_stage1_scripts_refuse_to_run_without_a_pretrain_label(tmp_path, script):
    fake, record = _fake_python(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PRETRAIN"}
    env["PYTHON"] = str(fake)
    out = subprocess.run(["bash", script, "INIT.pt", str(tmp_path / "s"), "DATA"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "PRETRAIN" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not record.exists()  # nothing was launched
    # with the label (environment or flag) the script launches, passing it through
    for extra_env, extra_args in (({"PRETRAIN": "at"}, []), ({}, ["--pretrain", "at"])):
        subprocess.run(["bash", script, "INIT.pt", str(tmp_path / "s"), "DATA", *extra_args], cwd=REPO,
                       env={**env, **extra_env}, check=True)
        argv = json.loads(record.read_text())
        assert argv[argv.index("--pretrain") + 1] == "at"


def test_stage1_warns_without_pretrain(tmp_path, capsys):
    main_imp_pretrain.main(["--dataset", "digits", "--classes", "0-4", "--init", "none", "--method", "omp",
                            "--rounds", "1", "--save-dir", str(tmp_path / "omp"), "--arch", "resnet_tiny",
                            "--cifar-stem"])
    assert "--pretrain is not set" in capsys.readouterr().out


def test_help_prints_each_regimes_defaults(capsys):
    with pytest.raises(SystemExit):
        main_downstream.parse_args(["--help"])
    text = capsys.readouterr().out
    for line in ("st: --lr 0.001 --batch-size 64 --epochs 150", "at: --lr 0.1 --batch-size 128 --epochs 100",
                 "svhn at/fat: --lr 0.01 --epochs 80 --schedule cosine"):
        assert line in text


def test_results_record_precision_subset_and_eval_from(tmp_path):
    out = tmp_path / "run"
    main_downstream.main(["--dataset", "digits", "--classes", "5-9", "--init", "none", "--pretrain", "std",
                          "--regime", "st", "--epochs", "2", "--lr", "0.05", "--data-rate", "0.5",
                          "--test-steps", "1", "--save-dir", str(out), *TINY])
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert cfg["eval_from"] == 0
    assert cfg["subset"] == "random" and cfg["subset_seed"] == 0
    assert cfg["precision"] == {"train": "fp32", "validation": "fp32", "test": "fp32"}
    indices = json.loads((out / "subset_indices.json").read_text())
    assert indices["subset"] == "random" and indices["subset_seed"] == 0
    # the optimizer state is gone once the result is written; the selected model stays
    assert not (out / "checkpoint.pt").exists() and (out / "model_best.pt").exists()


def test_keep_checkpoint_keeps_it(tmp_path):
    out = tmp_path / "run"
    main_downstream.main(["--dataset", "digits", "--classes", "5-9", "--init", "none", "--pretrain", "std",
                          "--regime", "st", "--epochs", "1", "--lr", "0.05", "--test-steps", "0",
                          "--keep-checkpoint", "--save-dir", str(out), *TINY])
    assert (out / "checkpoint.pt").exists()


def test_eval_amp_fp16_is_refused_on_the_cpu_before_training(tmp_path):
    from utils.errors import UserError
    with pytest.raises(UserError, match="fp16"):
        main_downstream.main(["--dataset", "digits", "--classes", "5-9", "--init", "none", "--regime", "st",
                              "--eval-amp", "fp16", "--device", "cpu", "--save-dir", str(tmp_path / "r"), *TINY])
    assert not (tmp_path / "r").exists()


def test_training_seeds_share_the_data_limited_subset(tmp_path):
    def indices(seed, *extra):
        out = tmp_path / f"s{seed}{''.join(extra)}"
        main_downstream.main(["--dataset", "digits", "--classes", "5-9", "--init", "none", "--pretrain", "std",
                              "--regime", "st", "--epochs", "1", "--lr", "0.05", "--data-rate", "0.1",
                              "--test-steps", "0", "--seed", str(seed), *extra, "--save-dir", str(out), *TINY,
                              "--allow-chance"])  # one epoch on 10% of the data may end at chance level
        return json.loads((out / "subset_indices.json").read_text())

    a, b = indices(1), indices(2)
    assert a["train_indices"] == b["train_indices"] and a["seed"] != b["seed"]
    first = indices(3, "--subset", "first")
    assert first["subset"] == "first"
    assert first["train_indices"] == sorted(first["train_indices"])
    assert indices(4, "--subset-seed", "5")["train_indices"] != a["train_indices"]


def test_eval_precision_benchmark_compares_fp32_and_bf16_on_one_model(tmp_path):
    from benchmarks import bench_eval_precision
    out = tmp_path / "run"
    main_downstream.main(["--dataset", "digits", "--classes", "5-9", "--init", "none", "--pretrain", "std",
                          "--regime", "st", "--epochs", "1", "--lr", "0.05", "--test-steps", "0",
                          "--save-dir", str(out), *TINY])
    record = bench_eval_precision.main(["--dataset", "digits", "--classes", "5-9", "--arch", "resnet_tiny",
                                        "--cifar-stem", "--init", str(out / "model_best.pt"), "--steps", "2",
                                        "--num-images", "40", "--device", "cpu", "--json", str(tmp_path / "r.json")])
    rows = record["results"]
    assert set(rows) == {"fp32", "bf16", "bf16_attack_fp32_score"}
    assert all(r["images"] == 40 for r in rows.values())
    # fp32 scoring of the same clean images gives the same SA whichever precision crafted the attack
    assert rows["fp32"]["sa"] == rows["bf16_attack_fp32_score"]["sa"]
    assert json.loads((tmp_path / "r.json").read_text())["steps"] == 2
