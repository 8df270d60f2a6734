"""The cost of a study before it runs (study/cost.py, `script/sweep.py plan`): GPU-hours from a bench_step.py
record and from the finished runs of the run tree, disk, several grid files sharing one tree, the
--seeds/--datasets/--levels subset (which `run` honours too), and the refusals of bad input."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from study import cost
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "script" / "sweep.py"
# digits (scikit-learn): 1,442 training images of which 144 are held out for validation, 355 test images
TRAIN, VAL, TEST = 1298, 144, 355
FLAGS = ['arch = "resnet_tiny"', "cifar_stem = true", "epochs = 3", "eval_from = 1", "batch_size = 128",
         "train_steps = 1", "test_steps = 2", "no_progress = true", "channels_last = false"]


def _load_sweep():
    spec = importlib.util.spec_from_file_location("sweep_cost", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()


def _grid(root, out="runs", axes=(), pretrain=None, name="grid.toml", flags=FLAGS):
    pretrain = pretrain or ['[pretrain.std]', 'init = "none"']
    lines = [f'out = "{out}"', *pretrain, "[axes]", *axes, "[flags]", *flags]
    if not any(a.startswith("dataset") for a in axes):
        lines.insert(lines.index("[axes]") + 1, 'dataset = ["digits"]')
    for key, value in (("regime", '["at"]'), ("seed", "[1]")):
        if not any(a.startswith(key) for a in axes):
            lines.insert(lines.index("[axes]") + 1, f"{key} = {value}")
    path = Path(root) / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _bench(path, regime="at", train=0.1298, robust=0.144, clean=None, **changes):
    """A bench_step.py --json record with the fields the cost reads (rates in images/s)."""
    record = {"device": "test GPU", "arch": "resnet_tiny", "image_size": 8, "batch_size": 128, "regime": regime,
              "cifar_stem": True, "num_classes": 10, "attack_steps": {"st": 0, "fat": 1, "at": 1}[regime],
              "engine": {"images_per_s": train}, "reference": {"images_per_s": train / 5}, "speedup": 5.0,
              "eval_pgd20": {"steps": 2, "engine": {"images_per_s": robust}},
              "eval_clean": None if clean is None else {"engine": {"images_per_s": clean}}}
    record.update(changes)
    Path(path).write_text(json.dumps(record))
    return path


def _runs(grid):
    return sweep.expand(sweep.load_grid(grid))


def _plan(capsys, *argv):
    """(the plan's lines up to its total, the cost report after them): both on stdout."""
    assert sweep.main(["plan", *map(str, argv)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    end = next(i for i, line in enumerate(lines) if re.match(r"\d+ runs: ", line)) + 1
    return lines[:end], "\n".join(lines[end:]) + "\n"


def _total(err, name):
    return next(line for line in err.splitlines() if line.startswith(f"{name}: "))


def test_digits_split_sizes_are_the_readers():
    """The image counts the bench source uses are the dataset's own."""
    from data_loading.readers import _load_digits

    train_x, _, test_x, _, _ = _load_digits()
    assert (cost.TRAIN_SPLIT["digits"], cost.TEST_SPLIT["digits"]) == (len(train_x), len(test_x))


# --------------------------------------------------------------------------- source (a): a bench record

def test_bench_record_gives_known_hours(tmp_path, capsys):
    # adversarial run: 3 epochs of 1,298 images at 0.1298 img/s = 30,000 s; epochs 1 and 2 validated
    # (--eval-from 1) on 144 images at 0.144 img/s = 2,000 s; the test, 355 images at 0.144 img/s
    grid = _grid(tmp_path, axes=["data_rate = [1.0, 0.1]"])
    bench = _bench(tmp_path / "step_at.json")
    pricer = cost.Pricer([tmp_path / "runs"], [bench])
    full, tenth = _runs(grid)
    expected_full = 3 * TRAIN / 0.1298 + 2 * VAL / 0.144 + TEST / 0.144
    expected_tenth = 3 * 130 / 0.1298 + 2 * VAL / 0.144 + TEST / 0.144  # round(0.1 x 1,298) = 130 images
    assert pricer.estimate(full).seconds == pytest.approx(expected_full)
    assert pricer.estimate(tenth).seconds == pytest.approx(expected_tenth)
    assert pricer.estimate(full).source == f"bench {bench} (test GPU)"

    out, err = _plan(capsys, grid, "--bench", bench)
    assert out[-1] == "2 runs: 0 done, 2 pending"  # one line per run and the total
    assert err.startswith(f"cost of {grid}:\n")  # then the report
    row = next(line for line in err.splitlines() if line.startswith("digits   1 "))
    assert f" {cost.hours_text(expected_full)} " in row and "[1]" in row
    hours = cost.hours_text(expected_full + expected_tenth)
    assert f"2 runs (0 done), {hours} GPU-hours ({hours} for the runs not done)" in _total(err, str(grid))
    assert f"[1] bench {bench} (test GPU)" in err


def test_standard_runs_need_the_clean_evaluation_rate(tmp_path):
    """A standard run validates clean images (eval_clean) but tests under PGD (eval_pgd20)."""
    grid = _grid(tmp_path, axes=['regime = ["st"]'], flags=[f for f in FLAGS if not f.startswith("train_steps")])
    (run,) = _runs(grid)
    old = cost.Pricer([tmp_path / "runs"], [_bench(tmp_path / "old.json", regime="st")])
    assert old.estimate(run).source.startswith("analytic: ")  # an old record without eval_clean prices no st run
    new = cost.Pricer([tmp_path / "runs"], [_bench(tmp_path / "st.json", regime="st", train=2.0, clean=72.0)])
    # epochs 1 and 2 validated (--eval-from 1) on clean images; the test under PGD-2 (--test-steps 2)
    assert new.estimate(run).seconds == pytest.approx(3 * TRAIN / 2.0 + 2 * VAL / 72.0 + TEST / 0.144)


def test_real_bench_step_record_prices_a_grid(tmp_path):
    """bench_step.py's own record (its true format) is read and used as it stands."""
    from benchmarks import bench_step

    path = tmp_path / "step_st.json"
    record = bench_step.main(["--arch", "resnet_tiny", "--cifar-stem", "--num-classes", "10", "--image-size", "8",
                              "--batch-size", "4", "--regime", "st", "--eval-steps", "2", "--iters", "1",
                              "--eval-batches", "1", "--warmup", "1", "--repeats", "1", "--device", "cpu",
                              "--json", str(path)])
    assert record["eval_clean"]["engine"]["images_per_s"] > 0
    grid = _grid(tmp_path, axes=['regime = ["st"]'], flags=[f for f in FLAGS if not f.startswith("train_steps")])
    (run,) = _runs(grid)
    est = cost.Pricer([tmp_path / "runs"], [path]).estimate(run)
    r_train, r_clean = record["engine"]["images_per_s"], record["eval_clean"]["engine"]["images_per_s"]
    r_robust = record["eval_pgd20"]["engine"]["images_per_s"]
    assert est.seconds == pytest.approx(3 * TRAIN / r_train + 2 * VAL / r_clean + TEST / r_robust)


def test_no_source_prices_by_counted_flops_and_says_which_benchmark_to_run(tmp_path, capsys):
    grid = _grid(tmp_path)
    _, err = _plan(capsys, grid)
    assert "no GPU-hour estimate" not in _total(err, str(grid))
    assert ("analytic: " in err and "per image, counted, at an assumed 250 TFLOP/s achieved" in err
            and "run python benchmarks/bench_step.py --regime at --arch resnet_tiny --image-size 8 --cifar-stem "
            "--attack-steps 1 --eval-steps 2 --batch-size 128 --json FILE and pass --bench FILE") in err, err
    (run,) = _runs(grid)
    p = cost.profile(run)
    f = cost.forward_flops("resnet_tiny", 10, True, 8)
    train, val, test = cost.images(p)
    # the run's FLOPs: 3 epochs of (step 3F + 1 PGD step 2F), 2 validated epochs and the test (clean F,
    # PGD-2 then F), at 250 TFLOP/s; 10x the rate gives a tenth of the time
    expected = (3 * train * 5 * f + 2 * val * (f + 5 * f) + test * (f + 5 * f)) / 250e12
    assert cost.Pricer([tmp_path / "runs"]).estimate(run).seconds == pytest.approx(expected)
    assert cost.Pricer([tmp_path / "runs"], tflops=2500).estimate(run).seconds == pytest.approx(expected / 10)
    # a record of another architecture prices nothing: never a number from the wrong model
    _, err = _plan(capsys, grid, "--bench", _bench(tmp_path / "r50.json", arch="resnet50"))
    assert "analytic: " in err and "] bench " not in err.split("time sources:")[1]


def test_flops_and_size_counted_on_the_meta_device_are_the_real_models():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import models

    for arch, classes, stem, size in (("resnet_tiny", 10, True, 8), ("resnet18", 100, False, 64)):
        model = models.build_model(arch, classes, cifar_stem=stem).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.rand(1, 3, size, size))
        assert cost.forward_flops(arch, classes, stem, size) == counter.get_total_flops() > 0
        assert cost.model_bytes(arch, classes, stem) == (
            sum(t.numel() * t.element_size() for t in model.state_dict().values()),
            sum(t.numel() * t.element_size() for t in model.parameters()),
            sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d)))


# --------------------------------------------------------------------------- source (b): finished runs

def _finish(run, seconds, world=2, model_bytes=5000):
    """A finished run directory in main_downstream.py's formats: config.json (the stage's own config_for),
    results.json with its history, run_info.json, log.csv and a model file."""
    import main_downstream

    config = main_downstream.config_for(run.argv())
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.json").write_text(json.dumps(config))
    history = [{"epoch": e, "lr": 0.1, "train_loss": 1.0, "train_acc": 50.0, "val_sa": 50.0 if e >= 1 else None,
                "val_ra": 40.0 if e >= 1 else None, "seconds": s} for e, s in enumerate(seconds)]
    results = {"dataset": run.dataset, "arch": "resnet_tiny", "pretrain": run.pretrain, "init": "none",
               "ticket": None, "method": "dense", "sparsity": 0.0, "regime": run.regime, "data_rate": run.data_rate,
               "seed": run.seed, "sa": 50.0, "ra": 40.0, "selected_epoch": 2, "selection": "val_ra",
               "history": history, "config": {**config, "eval_from": 1}, "git": None}
    (run.run_dir / "results.json").write_text(json.dumps(results))
    (run.run_dir / "run_info.json").write_text(json.dumps({"test_images": TEST, "train_seconds": sum(seconds),
                                                           "world_size": world}))
    rows = ["epoch,lr,train_loss,train_acc,val_sa,val_ra,seconds"]
    rows += [",".join(str("" if h[k] is None else h[k]) for k in ("epoch", "lr", "train_loss", "train_acc", "val_sa",
                                                                   "val_ra", "seconds")) for h in history]
    (run.run_dir / "log.csv").write_text("\n".join(rows) + "\n")
    (run.run_dir / "model_best.pt").write_bytes(b"\0" * model_bytes)
    return sum(p.stat().st_size for p in run.run_dir.iterdir())


def test_finished_runs_give_known_hours_and_disk(tmp_path, capsys):
    """Epochs cost 3,600 s x data rate of training and 1,800 s of validation, on 2 GPUs: fitted from runs at
    rates 1 and 0.1, the run at 0.01 costs 2 x (3 x 36 + 2 x 1,800) = 7,416 GPU-seconds."""
    grid = _grid(tmp_path, axes=["data_rate = [1.0, 0.1, 0.01]"])
    full, tenth, hundredth = _runs(grid)
    sizes = [_finish(r, [3600 * r.data_rate, 3600 * r.data_rate + 1800, 3600 * r.data_rate + 1800],
                     model_bytes=n) for r, n in ((full, 4000), (tenth, 6000))]
    bench = _bench(tmp_path / "step_at.json")  # finished runs win over a bench record
    pricer = cost.Pricer([tmp_path / "runs"], [bench])
    est = pricer.estimate(hundredth)
    assert est.seconds == pytest.approx(7416.0)
    assert est.source == "2 finished digits/at/resnet_tiny runs"
    assert cost.hours_text(7416) == "2.1" and cost.hours_text(360) == "0.100" and cost.hours_text(4e5) == "111"
    assert (est.disk, est.disk_source) == (sum(sizes) / 2, "finished runs")
    assert pricer.estimate(full).seconds == pytest.approx(2 * (3 * 3600 + 2 * 1800))

    out, err = _plan(capsys, grid, "--bench", bench)
    assert out[-1] == "3 runs: 2 done, 1 pending"
    total = 2 * (3 * 3600 + 2 * 1800) + 2 * (3 * 360 + 2 * 1800) + 7416.0
    assert (f"3 runs (2 done), {cost.hours_text(total)} GPU-hours ({cost.hours_text(7416)} for the runs not done)"
            in _total(err, str(grid)))


def test_one_rate_fully_validated_scales_whole_epochs_and_says_so():
    a, b, note = cost.fit([(1.0, True, 100.0), (1.0, True, 110.0)])
    assert (a, b) == (pytest.approx(105.0), 0.0) and "not separable" in note
    a, b, note = cost.fit([(1.0, False, 30.0), (1.0, True, 40.0), (0.1, True, 13.0)])
    assert (a, b, note) == (pytest.approx(30.0), pytest.approx(10.0), "")


def test_disk_from_the_parameter_count(tmp_path):
    """Without finished runs: model_best.pt (the weights) plus the records; --keep-checkpoint adds the
    weights and their momentum, a ticket run the mask in its model file."""
    import models

    model = models.build_model("resnet_tiny", 10, cifar_stem=True)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(t.numel() * t.element_size() for t in model.parameters())
    records = cost.RECORD_BYTES + 3 * cost.EPOCH_BYTES + (4 + 6) * (TRAIN + VAL)
    (run,) = _runs(_grid(tmp_path))  # a sweep's run keeps no model file by default (--keep-model none)
    assert cost.Pricer([tmp_path / "runs"]).estimate(run).disk == records
    (best,) = _runs(_grid(tmp_path, out="best", flags=FLAGS + ['keep_model = "best"'], name="best.toml"))
    assert cost.Pricer([tmp_path / "best"]).estimate(best).disk == state + records
    (kept,) = _runs(_grid(tmp_path, out="kept", flags=FLAGS + ["keep_checkpoint = true", 'keep_model = "best"'],
                          name="kept.toml"))
    assert cost.Pricer([tmp_path / "kept"]).estimate(kept).disk == 2 * state + params + records


# --------------------------------------------------------------------------- several grid files, one tree

def test_grid_files_sharing_runs_are_counted_once(tmp_path, capsys):
    a = _grid(tmp_path, axes=["seed = [1, 2]"], name="a.toml")
    b = _grid(tmp_path, axes=["seed = [2, 3]"], name="b.toml")
    bench = _bench(tmp_path / "step_at.json")
    one = 3 * TRAIN / 0.1298 + 2 * VAL / 0.144 + TEST / 0.144
    out, err = _plan(capsys, a, b, "--bench", bench)
    assert out[-1] == "3 runs: 0 done, 3 pending"
    assert f"2 runs (0 done), {cost.hours_text(2 * one)} GPU-hours" in _total(err, str(a))
    assert f"2 runs (0 done), {cost.hours_text(2 * one)} GPU-hours" in _total(err, str(b))
    assert (f"all 2 grid files (1 runs shared between them counted once): 3 runs (0 done), "
            f"{cost.hours_text(3 * one)} GPU-hours") in err


# --------------------------------------------------------------------------- a smaller study

def _ticket_dir(root, levels, name="std_omp"):
    d = Path(root) / name
    (d / "tickets").mkdir(parents=True)
    (d / "sparsity.json").write_text(json.dumps({str(k): v for k, v in levels.items()}))
    (d / "config.json").write_text(json.dumps({"method": "omp", "retrain": None, "pattern": "unstructured"}))
    for k in levels:
        (d / "tickets" / f"round_{k:02d}.pt").write_bytes(b"")
    return d


@pytest.fixture
def subset_grid(tmp_path):
    _ticket_dir(tmp_path, {1: 20.0, 2: 36.0, 3: 48.8})
    return _grid(tmp_path, axes=['dataset = ["digits", "cifar10"]', "seed = [1, 2, 3]"],
                 pretrain=['[pretrain.std]', 'init = "none"', 'tickets = ["std_omp"]'])


def test_subset_plans_and_runs_only_the_chosen_runs(subset_grid, capsys):
    out, err = _plan(capsys, subset_grid, "--seeds", "1,2", "--datasets", "digits", "--levels", "2")
    # digits x (the dense baseline + round 2) x seeds 1, 2
    assert out[-1] == "4 runs: 0 done, 4 pending"
    dirs = sorted(line.split()[1] for line in out[:-1])
    assert [d.split("/runs/")[1] for d in dirs] == [
        "digits/rate1/at/std/dense/seed1", "digits/rate1/at/std/dense/seed2",
        "digits/rate1/at/std/omp/s36.00/seed1", "digits/rate1/at/std/omp/s36.00/seed2"]
    assert "4 runs (0 done)" in _total(err, str(subset_grid))
    # `run` honours the same subset: --print writes the commands it would run, and only those
    assert sweep.main(["run", str(subset_grid), "--print", "--seeds", "1,2", "--datasets", "digits",
                       "--levels", "2"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert sorted(c.split(" --save-dir ")[1].split()[0] for c in commands) == dirs
    assert sweep.main(["status", str(subset_grid), "--datasets", "digits", "--seeds", "3"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done 0 of 4 runs")


@pytest.mark.parametrize("argv, needles", [
    (["--seeds", "1,7"], ["--seeds names 7, which the grid file has not (it has 1, 2, 3)"]),
    (["--datasets", "svhn"], ["--datasets names svhn", "(it has cifar10, digits)"]),
    (["--levels", "4"], ["--levels names 4", "(it has 1, 2, 3)"]),
])
def test_a_subset_the_grid_does_not_have_is_refused(subset_grid, capsys, argv, needles):
    for command in (["plan"], ["run", "--print"]):
        with pytest.raises(UserError) as info:
            sweep.main([command[0], str(subset_grid), *command[1:], *argv])
        assert "\n" not in str(info.value) and all(n in str(info.value) for n in needles), str(info.value)
    assert capsys.readouterr().out == ""  # refused before anything is listed


# --------------------------------------------------------------------------- no torch in plan and status

def _imported(argv):
    """(stdout, every module the command imported): `python -X importtime` names each on stderr."""
    proc = subprocess.run([sys.executable, "-X", "importtime", str(SWEEP), *map(str, argv)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                         if line.startswith("import time:")}


def test_plan_and_status_load_no_torch_where_finished_runs_price_the_grid(tmp_path):
    """plan and status of a grid of existing tickets ask the stage's parser and read the run tree without
    torch (importing it was most of plan at 31,000 runs, issue 29); the analytic estimate, for runs that no
    finished run nor bench record prices, counts a known architecture's FLOPs and size without it too
    (study/flops.py); only an architecture that walk does not know loads torch to build the model."""
    _ticket_dir(tmp_path, {1: 20.0})
    grid = _grid(tmp_path, axes=["seed = [1, 2]"], pretrain=['[pretrain.std]', 'init = "none"', 'tickets = ["std_omp"]'])
    out, modules = _imported(["plan", grid])
    assert "analytic: " in out and "torch" not in modules, sorted(m for m in modules if m.startswith("torch"))
    unknown = _grid(tmp_path, flags=[f for f in FLAGS if not f.startswith("arch")] + ['arch = "no_such_net"'],
                    name="unknown.toml")
    proc = subprocess.run([sys.executable, "-X", "importtime", str(SWEEP), "plan", str(unknown)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    # the check above sees torch where it is loaded: the fallback for an unknown architecture loads it
    assert proc.returncode == 2 and "unknown architecture 'no_such_net'" in proc.stderr
    assert "torch" in {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                       if line.startswith("import time:")}
    _finish(next(r for r in _runs(grid) if r.ticket is None and r.seed == 1), [10.0, 12.0, 12.0])
    out, modules = _imported(["plan", grid])  # the finished run prices every run: time and disk
    assert "[1] 1 finished digits/at/resnet_tiny run" in out and "analytic" not in out, out
    assert "torch" not in modules, sorted(m for m in modules if m.startswith("torch"))
    out, modules = _imported(["status", grid])
    assert "verdicts: no group is finished yet" in out and out.strip().endswith("done 1 of 4 runs (0 failed, 3 pending, "
                                                                                "0 running)"), out
    assert "torch" not in modules, sorted(m for m in modules if m.startswith("torch"))


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("content, needle", [
    ("not json", "is not readable JSON"),
    ("[1, 2]", "holds a JSON list"),
    (json.dumps({"regime": "at", "arch": "resnet50"}), "its 'image_size' is None"),
    (json.dumps({"total_min": 70.0, "train_rate": 9.0}), "its 'regime' is None"),  # estimate_run.py's output
])
def test_a_record_that_is_not_bench_steps_is_refused(tmp_path, capsys, content, needle):
    path = tmp_path / "bench.json"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        sweep.main(["plan", str(_grid(tmp_path)), "--bench", str(path)])
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert capsys.readouterr().out == ""
    broken = _bench(tmp_path / "zero.json", train=0)
    with pytest.raises(UserError, match="no positive engine.images_per_s"):
        cost.read_bench(broken)


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2_from_the_command_line(tmp_path):
    grid = _grid(tmp_path)
    (tmp_path / "bad.json").write_text("[]")
    for argv, needle in ((["plan", grid, "--bench", tmp_path / "bad.json"], "not a benchmarks/bench_step.py"),
                         (["status", grid, grid], "more than one grid file applies only to `plan`")):
        proc = subprocess.run([sys.executable, str(SWEEP), *map(str, argv)], capture_output=True, text=True,
                              cwd=REPO, timeout=300)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert needle in proc.stderr and proc.stdout == "", (needle, proc.stderr)


@pytest.mark.parametrize("argv, needle", [
    (["run", "g.toml", "--bench", "b.json"], "--bench applies only to `plan`; drop it from `run`"),
    (["run", "g.toml", "h.toml"], "more than one grid file applies only to `plan`"),
    (["plan", "g.toml", "--levels", ""], "--levels needs at least one value"),
    (["plan", "g.toml", "--seeds", "x"], "expected comma-separated integers"),
])
def test_misplaced_or_empty_cost_options_are_usage_errors(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        sweep.parse_args(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
