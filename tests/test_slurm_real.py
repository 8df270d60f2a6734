"""The SLURM backend against a real one-node SLURM cluster on this machine (tests/slurm/cluster.sh).

They need Debian's slurmctld, slurmd, slurm-client and munge packages and root; .ci/run installs the
packages where it can, and the tests skip with the reason where the cluster cannot be started."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "script" / "sweep.py"
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("submitit")
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "squeue") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"SLURM packages not installed ({', '.join(missing)} missing); .ci/run installs them")
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster's daemons run as root")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True,
                             timeout=60)
    if started.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, timeout=60)
        pytest.skip(f"the one-node SLURM cluster did not start: {started.stderr.strip()[-300:]}")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the task sets it from its CPUs
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["scancel", "-u", "root"], env=env, capture_output=True, timeout=60)
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A θ_p file and an OMP ticket directory of two rounds (digits, tiny ResNet)."""
    import torch

    import dataset
    import main_imp_pretrain
    import models
    root = tmp_path_factory.mktemp("slurm_src")
    mean, std = dataset.DATASET_STATS["digits"]
    torch.manual_seed(0)
    models.save_model_checkpoint(root / "std.pt", models.build_model("resnet_tiny", 5, cifar_stem=True,
                                                                   mean=mean, std=std))
    assert main_imp_pretrain.main(["--dataset", "digits", "--arch", "resnet_tiny", "--cifar-stem", "--classes", "0-4",
                                   "--init", str(root / "std.pt"), "--pretrain", "std", "--method", "omp",
                                   "--rate", "0.5", "--rounds", "2", "--save-dir", str(root / "std_omp")]) in (0, None)
    return root


def grid_file(root, name, out, epochs, tickets=True):
    lines = [f'out = "{out}"', "[pretrain.std]", 'init = "std.pt"', 'tickets = ["std_omp"]' if tickets else "",
             "[axes]", 'dataset = ["digits"]', 'regime = ["st"]', "seed = [1]", "dense = true",
             "[flags]", 'arch = "resnet_tiny"', "cifar_stem = true", 'classes = "5-9"', f"epochs = {epochs}",
             "lr = 0.05", f"milestones = [{epochs // 2}]", "batch_size = 32", "no_progress = true",
             "channels_last = false"]
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep(env, *args, cwd):
    return subprocess.run([sys.executable, str(SWEEP), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def comparable(path):
    res = json.loads(Path(path).read_text())
    return res["sa"], res["ra"], res["selected_epoch"], [
        {k: v for k, v in row.items() if k != "seconds"} for row in res["history"]]


def epochs_logged(run_dir):
    log = Path(run_dir) / "log.csv"
    return max(0, len(log.read_text().splitlines()) - 1) if log.exists() else 0


def test_cpu_partition_grid_completes_and_a_rerun_submits_nothing_twice(cluster, source, tmp_path):
    grid = grid_file(source, "cpu.toml", "runs_cpu", epochs=2)
    # started outside the repository: the tasks must still import the project
    first = sweep(cluster, "run", grid, "--backend", "slurm", "--slurm-gpus-per-task", "0", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "as job array" in first.stdout and "tasks" in first.stdout, first.stdout
    again = sweep(cluster, "run", grid, "--backend", "slurm", "--slurm-gpus-per-task", "0", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "not submitted again" in again.stdout and "submitted 3" not in again.stdout, again.stdout
    out = source / "runs_cpu"
    wait_for(lambda: len(list(out.rglob("results.json"))) == 3, 240, "three results.json")
    status = sweep(cluster, "status", grid, cwd=tmp_path)
    assert "done 3 of 3 runs (0 failed" in status.stdout, status.stdout
    assert not list(out.rglob(".sweep-failed.json"))
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster, capture_output=True,
                                        text=True).stdout.strip(), 60, "the array to leave the queue")
    log = next(out.rglob(".sweep.log")).read_text()
    assert "# sweep: slurm job " in log and "threads: 1 (the task's CPUs)" in log, log


@pytest.mark.parametrize("how", ["signal", "requeue"])
def test_a_run_preempted_mid_run_is_requeued_and_ends_as_an_uninterrupted_one(cluster, source, tmp_path, how):
    grid = grid_file(source, f"pre_{how}.toml", f"runs_pre_{how}", epochs=12, tickets=False)
    first = sweep(cluster, "run", grid, "--backend", "slurm", "--slurm-gpus-per-task", "0",
                  "--slurm-signal-delay", "30", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "as job " in first.stdout and "array" not in first.stdout, first.stdout  # one run: a plain job
    job = first.stdout.split("as job ", 1)[1].split(";")[0].strip()
    run_dir = source / f"runs_pre_{how}" / "digits" / "rate1" / "st" / "std" / "dense" / "seed1"
    wait_for(lambda: epochs_logged(run_dir) >= 2, 180, "two epochs of the run")
    if how == "signal":  # what a time limit (--signal=USR2@T) or a preemption notice delivers
        subprocess.run(["scancel", "--signal=USR2", f"{job}.0"], env=cluster, check=True, timeout=30)
    else:
        subprocess.run(["scontrol", "requeue", job], env=cluster, check=True, timeout=30)
    wait_for(lambda: (run_dir / "results.json").exists(), 300, "the requeued run to finish")
    log = (run_dir / ".sweep.log").read_text()
    assert log.count("# sweep: slurm job") == 2, log  # started twice: before and after the requeue
    assert "resuming" in log, log

    # the uninterrupted reference: the same command, one thread as the task had
    reference = tmp_path / "reference"
    argv = next(line for line in log.splitlines() if "main_downstream.py" in line and line.startswith("# /"))[2:]
    cmd = argv.split()
    cmd[cmd.index("--save-dir") + 1] = str(reference)
    env = dict(cluster, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert comparable(run_dir / "results.json") == comparable(reference / "results.json")
