"""script/sweep.py: grid files, plan/print/status, the local backend (interrupted and resumed) and
the SLURM backend against a fake sbatch."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "script" / "sweep.py"
DIGITS = ["--dataset", "digits", "--arch", "resnet_tiny", "--cifar-stem"]


def _load_sweep():
    spec = importlib.util.spec_from_file_location("sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()


def _sweep(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, str(SWEEP), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kw)


@pytest.fixture(scope="module")
def tickets(tmp_path_factory):
    """Two pre-trainings, each a θ_p file and an OMP ticket directory with two rounds (50%, 75%)."""
    import dataset
    import main_imp_pretrain
    import models
    root = tmp_path_factory.mktemp("sweep_src")
    mean, std = dataset.DATASET_STATS["digits"]
    for k, label in enumerate(("std", "at")):
        torch.manual_seed(k)
        model = models.build_model("resnet_tiny", 5, cifar_stem=True, mean=mean, std=std)
        models.save_model_checkpoint(root / f"{label}.pt", model)
        assert main_imp_pretrain.main(DIGITS + [
            "--classes", "0-4", "--init", str(root / f"{label}.pt"), "--pretrain", label, "--method", "omp",
            "--rate", "0.5", "--rounds", "2", "--save-dir", str(root / f"{label}_omp")]) in (0, None)
    return root


def write_grid(root, out, extra_axes="", flags=None, name="grid.toml"):
    """2 pretrain labels x (2 rounds + dense) x 2 regimes x 2 seeds = 24 runs, a few SGD steps each."""
    flags = flags or {}
    lines = [f'out = "{out}"',
             '[pretrain.std]', 'init = "std.pt"', 'tickets = ["std_omp"]',
             '[pretrain.at]', 'init = "at.pt"', 'tickets = ["at_omp"]',
             '[axes]', 'dataset = ["digits"]', 'regime = ["st", "at"]', 'seed = [1, 2]', extra_axes,
             '[flags]', 'arch = "resnet_tiny"', 'cifar_stem = true', 'classes = "5-9"', 'epochs = 2',
             'lr = 0.05', 'milestones = [1]', 'batch_size = 128', 'eps = "32/255"', 'alpha = "8/255"',
             'train_steps = 1', 'test_steps = 2', 'no_progress = true', 'channels_last = false']
    lines += [f"{k} = {json.dumps(v)}" for k, v in flags.items()]
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _comparable(path):
    res = json.loads(Path(path).read_text())
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in res["history"]]
    return res["sa"], res["ra"], res["selected_epoch"], history


# --------------------------------------------------------------------------- the grid file

def test_plan_lists_every_run_with_its_command(tickets):
    grid = write_grid(tickets, "runs_plan", name="plan.toml")
    proc = _sweep("plan", grid)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    end = lines.index("24 runs: 0 done, 24 pending")  # then the cost of the plan (study/cost.py)
    assert lines[end + 1].startswith("cost of ") and any("GPU-hours" in ln for ln in lines[end:])
    body = lines[:end]
    assert len(body) == 24 and all(ln.startswith("pending  ") for ln in body)
    dirs = [ln.split()[1] for ln in body]
    assert len(set(dirs)) == 24
    out = (tickets / "runs_plan").resolve()
    assert str(out / "digits" / "rate1" / "at" / "std" / "omp" / "s75.00" / "seed2") in dirs
    assert str(out / "digits" / "rate1" / "st" / "at" / "dense" / "seed1") in dirs
    line = next(ln for ln in body if "/st/at/omp/s50.00/seed1" in ln)
    # the protocol values (lr schedule etc.) are main_downstream.py's; the grid passes only what it sets
    for piece in ("main_downstream.py", "--dataset digits", f"--init {tickets / 'at.pt'}", "--pretrain at",
                  f"--ticket {tickets / 'at_omp' / 'tickets' / 'round_01.pt'}", "--regime st", "--data-rate 1.0",
                  "--seed 1", "--cifar-stem", "--milestones 1", "--eps 32/255", "--no-progress"):
        assert piece in line, piece
    assert "--channels-last" not in line  # false -> omitted
    dense = next(ln for ln in body if "/at/std/dense/seed2" in ln)
    assert "--ticket none" in dense

    printed = _sweep("run", grid, "--print")
    assert printed.returncode == 0, printed.stderr
    commands = printed.stdout.strip().splitlines()
    assert commands == [ln.split(None, 2)[2] for ln in body]
    assert not (tickets / "runs_plan").exists()  # plan and --print run nothing


def test_expected_runs_and_rounds_axis(tickets):
    grid = write_grid(tickets, "runs_exp", extra_axes="rounds = [2]\ndata_rate = [1.0, 0.1]\ndense = false",
                      name="exp.toml")
    runs = sweep.expected_runs(grid)
    assert len(runs) == 2 * 1 * 2 * 2 * 2  # pretrains x rounds x regimes x seeds x rates
    assert set(runs[0]) == {"dataset", "data_rate", "pretrain", "method", "sparsity", "regime", "seed", "run_dir"}
    assert {r["sparsity"] for r in runs} == {75.0}
    assert {r["method"] for r in runs} == {"omp"}
    assert {r["data_rate"] for r in runs} == {1.0, 0.1}
    assert any("/rate0.1/" in r["run_dir"] for r in runs)


@pytest.mark.parametrize("edit, needle", [
    (lambda t: "bogus = 1\n" + t, "unknown key(s) bogus"),
    (lambda t: t.replace('init = "std.pt"', 'init = "nowhere.pt"'), "nowhere.pt' does not exist"),
    (lambda t: t.replace('tickets = ["at_omp"]', 'tickets = ["no_such_dir"]'), "no_such_dir' does not exist"),
    (lambda t: t.replace('seed = [1, 2]', 'seed = []'), "[axes] seed is empty"),
    (lambda t: t.replace('regime = ["st", "at"]', 'regime = ["st", "pgd"]'), "regime holds 'pgd'"),
    (lambda t: t.replace('[axes]', '[axes]\nrounds = [7]'), "round(s) [7] are not in"),
    (lambda t: t.replace('[axes]', '[axes]\nsparsity = [50]'), "unknown key(s) in [axes]: sparsity"),
    (lambda t: t + "regime = \"at\"\n", "[flags] sets 'regime'"),
    (lambda t: t + "lrr = 0.1\n", "main_downstream.py rejects the grid's flags"),
    (lambda t: t.replace("out = ", "out = [1] #"), "needs out ="),
])
def test_grid_errors_are_one_line_and_exit_2(tickets, tmp_path, edit, needle):
    good = write_grid(tickets, "runs_bad", name="good.toml").read_text()
    bad = tickets / f"bad_{abs(hash(needle))}.toml"
    bad.write_text(edit(good))
    for command in ("plan", "run", "status"):
        proc = _sweep(command, bad)
        if needle.startswith("main_downstream.py rejects") and command == "status":
            continue  # status does not run anything, so it does not ask main_downstream.py
        if needle.endswith("does not exist") and command == "plan":  # plan works before its inputs exist
            name = needle.split("'")[0]
            assert proc.returncode == 0, proc.stderr
            assert any(ln.startswith("missing: [pretrain.") and f"/{name}'" in ln for ln in proc.stdout.splitlines())
            continue
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert needle in proc.stderr, (command, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tickets / "runs_bad").exists()


def test_missing_grid_and_bad_toml(tmp_path):
    proc = _sweep("plan", tmp_path / "nope.toml")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "broken.toml").write_text("out = \n")
    proc = _sweep("status", tmp_path / "broken.toml")
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr


def test_flag_args_contract():
    assert sweep.flag_args({"cifar_stem": True, "compile": False, "milestones": [50, 75], "lr": 0.001,
                            "eps": "8/255", "batch_size": 64}) == [
        "--cifar-stem", "--milestones", "50,75", "--lr", "0.001", "--eps", "8/255", "--batch-size", "64"]


# --------------------------------------------------------------------------- local backend

@pytest.mark.slow
def test_interrupted_sweep_resumes_to_the_same_results(tickets):
    reference = write_grid(tickets, "runs_ref", name="ref.toml")
    proc = _sweep("run", reference, "--workers", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ref_runs = sweep.expand(sweep.load_grid(reference))
    assert all(r.done for r in ref_runs)

    grid = write_grid(tickets, "runs_int", name="int.toml")
    runs = sweep.expand(sweep.load_grid(grid))
    sweeper = subprocess.Popen([sys.executable, str(SWEEP), "run", str(grid), "--workers", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    deadline = time.monotonic() + 240
    while sum(r.done for r in runs) < 6 and time.monotonic() < deadline and sweeper.poll() is None:
        time.sleep(0.05)
    assert sweeper.poll() is None, "the sweep ended before it could be interrupted: " + sweeper.stdout.read()
    sweeper.send_signal(signal.SIGTERM)
    output, _ = sweeper.communicate(timeout=120)
    assert sweeper.returncode == 75, output
    assert "rerun the same command to resume" in output
    finished = sum(r.done for r in runs)
    assert 6 <= finished < len(runs), output
    # nothing that looks finished was left behind by the stopped runs
    for r in runs:
        assert r.done or not (r.run_dir / "results.json").exists()

    status = _sweep("status", grid)
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip().splitlines()[-1].startswith(f"done {finished} of 24 runs")

    again = _sweep("run", grid, "--workers", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{finished} of 24 runs already finished, skipped" in again.stdout
    for ref, run in zip(ref_runs, runs):
        assert ref.run_dir.relative_to(tickets / "runs_ref") == run.run_dir.relative_to(tickets / "runs_int")
        assert _comparable(ref.run_dir / "results.json") == _comparable(run.run_dir / "results.json"), run.run_dir

    status = _sweep("status", grid)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.strip().splitlines()
    assert lines[-1] == "done 24 of 24 runs (0 failed, 0 pending, 0 running)"
    header = next(ln for ln in lines if ln.startswith("dataset"))
    assert header.split()[:10] == ["dataset", "rate", "pretrain", "method", "regime", "runs", "done", "running",
                                   "failed", "pending"]
    table = lines[lines.index(header) + 1:lines.index("")]
    assert len(table) == 8  # (std, at) x (dense, omp) x (st, at)
    omp_rows = [ln.split() for ln in table if " omp " in ln]
    assert len(omp_rows) == 4 and all(row[5:10] == ["4", "4", "0", "0", "0"] for row in omp_rows)
    assert all(row[-1] in ("KB", "MB") and float(row[-2]) > 0 for row in omp_rows)  # bytes on disk per run
    # a third run does nothing at all
    third = _sweep("run", grid, "--workers", "2")
    assert third.returncode == 0 and "24 of 24 runs already finished, skipped" in third.stdout


def test_failed_run_is_retried_recorded_and_reported(tickets):
    # a validation split larger than the training split fails inside main_downstream.py, after parsing
    grid = tickets / "fail.toml"
    grid.write_text('out = "runs_fail"\n[pretrain.std]\ninit = "std.pt"\n'
                    '[axes]\ndataset = ["digits"]\nregime = ["st"]\nseed = [1]\n'
                    '[flags]\narch = "resnet_tiny"\ncifar_stem = true\nclasses = "5-9"\nepochs = 1\n'
                    'val_size = 100000\nno_progress = true\n')
    proc = _sweep("run", grid, "--workers", "1", "--retries", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "will retry" in proc.stdout and "FAILED" in proc.stdout
    run_dir = tickets / "runs_fail" / "digits" / "rate1" / "st" / "std" / "dense" / "seed1"
    log = (run_dir / ".sweep.log").read_text()
    assert log.count("# sweep: attempt") == 2 and "val-size" in log.lower().replace("_", "-")
    assert json.loads((run_dir / ".sweep-failed.json").read_text())["attempts"] == 2
    status = _sweep("status", grid)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.strip().splitlines()
    assert lines[-1] == "done 0 of 1 runs (1 failed, 0 pending, 0 running)"
    failed_line = next(ln for ln in lines if ln.strip().startswith(str(run_dir)))
    assert "error:" in failed_line


def test_a_run_held_by_another_process_is_left_alone_and_shown_running(tickets):
    grid = tickets / "held.toml"
    grid.write_text('out = "runs_held"\n[pretrain.std]\ninit = "std.pt"\n'
                    '[axes]\ndataset = ["digits"]\nregime = ["st"]\nseed = [1]\n'
                    '[flags]\narch = "resnet_tiny"\ncifar_stem = true\nclasses = "5-9"\nepochs = 1\n'
                    'no_progress = true\n')
    run_dir = tickets / "runs_held" / "digits" / "rate1" / "st" / "std" / "dense" / "seed1"
    with sweep.sweep_lock(run_dir) as mine:  # as another sweep's worker would
        assert mine
        proc = _sweep("run", grid, "--workers", "1")
        status = _sweep("status", grid)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 held by another process" in proc.stdout and f"{os.getpid()}@" in proc.stdout
    assert not (run_dir / "config.json").exists() and not (run_dir / ".sweep-failed.json").exists()
    assert status.stdout.strip().splitlines()[-1] == "done 0 of 1 runs (0 failed, 0 pending, 1 running)"
    assert sweep.lock_holder(run_dir) is None  # released with the holder


# --------------------------------------------------------------------------- SLURM backend

def test_slurm_backend_submits_one_array_with_preemption_signal(tickets, tmp_path):
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    capture = tmp_path / "captured"
    capture.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\ncp "$1" "{capture}/script_$$.sh"\necho "$@" > "{capture}/args_$$"\n'
                    'echo "Submitted batch job 4242"\n')
    fake.chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; it only runs on the nodes
    (bin_dir / "srun").chmod(0o755)
    for name in ("squeue", "sacct", "scancel", "scontrol"):  # must never be needed to submit
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "{name} $@" >> "{capture}/unexpected"\nexit 1\n')
        tool.chmod(0o755)
    grid = write_grid(tickets, "runs_slurm", name="slurm.toml")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = _sweep("run", grid, "--backend", "slurm", "--slurm-partition", "gpu", "--slurm-time", "4:00:00",
                  "--slurm-array-parallelism", "8", "--slurm-option", "account=proj",
                  "--slurm-option", "cpus-per-task=6", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scripts = list(capture.glob("script_*.sh"))
    assert len(scripts) == 1, "one sbatch call: a single job array"
    text = scripts[0].read_text()
    for line in ("#SBATCH --array=0-23%8", "#SBATCH --gpus-per-task=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --signal=USR2@120", "#SBATCH --partition=gpu", "#SBATCH --time=240",
                 "#SBATCH --account=proj", "#SBATCH --cpus-per-task=6"):
        assert line in text.splitlines(), (line, text)
    assert not (capture / "unexpected").exists()

    # each task's command: the pickled submissions submitit hands to the array's tasks
    from submitit.core.utils import DelayedSubmission
    pickles = sorted((tickets / "runs_slurm" / ".submitit").rglob("*_submitted.pkl"))
    assert len(pickles) == 24
    commands = set()
    for pkl in pickles:
        task = DelayedSubmission.load(pkl).function
        assert hasattr(task, "checkpoint")  # submitit requeues checkpointable tasks on the signal
        commands.add(" ".join(task.command()[1:]))
    planned = _sweep("run", grid, "--print").stdout.strip().splitlines()
    assert commands == {ln.split(None, 1)[1] for ln in planned}


def test_slurm_task_checkpoint_stops_the_run_and_requeues_itself(tmp_path):
    submitit = pytest.importorskip("submitit")
    task = sweep.SlurmRun(["--save-dir", str(tmp_path)], tmp_path, sys.executable, stop_grace_s=20)
    ready = tmp_path / "ready"
    task._proc = subprocess.Popen([sys.executable, "-c",
                                   "import signal, sys, time, pathlib\n"
                                   "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
                                   f"pathlib.Path({str(ready)!r}).touch()\n"
                                   "time.sleep(60)"])
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    again = task.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission) and again.function is task
    assert task.stopped_status == 75  # asked with SIGTERM, the run saved and exited
    assert "_proc" not in task.__getstate__() or task.__getstate__()["_proc"] is None


def test_slurm_task_runs_its_command_and_records_failure(tickets):
    grid = tickets / "task.toml"
    grid.write_text('out = "runs_task"\n[pretrain.std]\ninit = "std.pt"\n'
                    '[axes]\ndataset = ["digits"]\nregime = ["st"]\nseed = [1]\n'
                    '[flags]\narch = "resnet_tiny"\ncifar_stem = true\nclasses = "5-9"\nepochs = 1\n'
                    'no_progress = true\n')
    (run,) = sweep.expand(sweep.load_grid(grid))
    assert sweep.SlurmRun(run.argv(), run.run_dir, sys.executable, 20)() == 0
    assert run.done and "main_downstream.py" in (run.run_dir / ".sweep.log").read_text()
    argv = run.argv()
    argv[argv.index("--save-dir") + 1] = str(run.run_dir.parent / "bad")
    bad = sweep.SlurmRun(argv + ["--val-size", "100000"], run.run_dir.parent / "bad", sys.executable, 20)
    with pytest.raises(RuntimeError, match="failed with status"):
        bad()
    assert json.loads((run.run_dir.parent / "bad" / ".sweep-failed.json").read_text())["exit_status"] != 0


def test_slurm_time_limit_signal_stops_the_run_inside_the_task(tmp_path):
    """As on a node: SIGUSR2 reaches the task (and its run, which ignores it); submitit's handler
    calls checkpoint(), which has the run save (SIGTERM -> status 75) before the task is requeued."""
    pytest.importorskip("submitit")
    started = tmp_path / "started"
    fake_python = tmp_path / "python"
    fake_python.write_text(  # stands in for `python main_downstream.py ...`: saves and exits 75 on SIGTERM
        f"#!/bin/sh\nexec {sys.executable} -c \"import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
        f"pathlib.Path('{started}').touch()\n"
        "time.sleep(60)\n\" \"$@\"\n")
    fake_python.chmod(0o755)
    task = sweep.SlurmRun(["--save-dir", str(tmp_path / "run")], tmp_path / "run", str(fake_python), 30)

    class Requeued(Exception):
        pass

    def submitit_handler(signum, frame):  # what submitit's SignalHandler does, minus scontrol
        task.requeue_with = task.checkpoint()
        raise Requeued

    def deliver():
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(task._proc.pid, signal.SIGUSR2)  # slurm signals every process of the step
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGUSR2)

    import threading
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        threading.Thread(target=deliver, daemon=True).start()
        with pytest.raises(Requeued):
            task()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert task.stopped_status == 75  # alive after its SIGUSR2, stopped by the forwarded SIGTERM
    assert task.requeue_with.function is task
    assert "# sweep: slurm job (no SLURM_JOB_ID) on " in (tmp_path / "run" / ".sweep.log").read_text()


def test_slurm_backend_without_submitit_is_a_clear_error(tickets, tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "submitit.py").write_text("raise ImportError('blocked for the test')\n")
    grid = write_grid(tickets, "runs_nosubmitit", name="nosub.toml")
    env = dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = _sweep("run", grid, "--backend", "slurm", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "pip install -r requirements-slurm.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_slurm_time_parsing():
    assert sweep.parse_minutes("240") == 240
    assert sweep.parse_minutes("4:00:00") == 240
    assert sweep.parse_minutes("1-00:30:00") == 24 * 60 + 30
    assert sweep.parse_minutes("30:30") == 31  # SLURM reads M:S
    assert sweep.parse_minutes("1-2") == 26 * 60
    with pytest.raises(sweep.UserError):
        sweep.parse_minutes("soon")


@pytest.mark.parametrize("argv, needle", [
    (["status", "g.toml", "--workers", "2"], "--workers apply only to `run`"),
    (["run", "g.toml", "--slurm-time", "60"], "--slurm-time apply only to --backend slurm"),
    (["run", "g.toml", "--backend", "slurm", "--retries", "3"], "--retries apply only to --backend local"),
])
def test_flags_that_would_be_ignored_are_refused(argv, needle):
    proc = _sweep(*argv)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_grid_flags_reach_only_the_runs_they_act_on(tickets):
    """[flags] holds every run's extras; a flag without effect on a run (--train-steps and --alpha on st
    runs) is left out of that run's command, since main_downstream.py refuses it, and plan says so."""
    grid = write_grid(tickets, "runs_scope", name="scope.toml")
    proc = _sweep("plan", grid)
    assert proc.returncode == 0, proc.stderr
    body = [ln.split(None, 2) for ln in proc.stdout.splitlines() if ln.startswith("pending")]
    assert len(body) == 24
    for _, run_dir, command in body:
        adversarial = "/rate1/at/" in run_dir
        assert ("--train-steps 1" in command) == adversarial and ("--alpha 8/255" in command) == adversarial
    assert "note: --train-steps: left out of 12 of 24 runs, where it has no effect" in proc.stderr
    assert "note: --alpha: left out of 12 of 24 runs" in proc.stderr
