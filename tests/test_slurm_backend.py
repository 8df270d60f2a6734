"""The SLURM backend's fixes found against a real cluster, each against fake SLURM commands (fast);
tests/test_slurm_real.py runs the same paths on a real one-node cluster."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from study import slurm
from tests.test_sweep import sweep, tickets, write_grid  # noqa: F401  (tickets is a fixture)

RESULT = ('{"dataset": "digits", "arch": "resnet_tiny", "pretrain": "std", "method": "dense", "sparsity": 0.0, '
          '"regime": "st", "data_rate": 1.0, "seed": 1, "sa": 90.0, "ra": null}\n')


def run_sweep(monkeypatch, capsys, env, *args):
    """`sweep.py ARGS` in this process (the fake SLURM commands on PATH): (exit status, stdout, stderr)."""
    monkeypatch.setenv("PATH", env["PATH"])
    try:
        rc = sweep.main([str(a) for a in args])
    except slurm.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        rc = 2
    out = capsys.readouterr()
    return rc, out.out, out.err


def fake_slurm(tmp_path, sbatch_exit=0, squeue_lines=()):
    """sbatch that records its script and answers job 77 (or fails), squeue that prints ``squeue_lines``."""
    bin_dir, capture = tmp_path / "bin", tmp_path / "captured"
    bin_dir.mkdir(parents=True)
    capture.mkdir()
    answer = 'echo "Submitted batch job 77"' if sbatch_exit == 0 else \
        'echo "sbatch: error: Invalid generic resource (gres) specification" >&2'
    tools = {"sbatch": f'cp "$1" "{capture}/script_$$.sh"\n{answer}\nexit {sbatch_exit}',
             "srun": "exit 1",
             "squeue": "cat <<'END'\n" + "\n".join(squeue_lines) + "\nEND"}
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"), capture


def test_gpus_per_task_zero_asks_for_no_gpu_and_option_spellings_mean_the_same(tickets, tmp_path, monkeypatch,  # noqa: F811
                                                                               capsys):
    pytest.importorskip("submitit")
    env, capture = fake_slurm(tmp_path)
    grid = write_grid(tickets, "runs_cpu_part", name="cpu_part.toml")
    rc, out, err = run_sweep(monkeypatch, capsys, env, "run", grid, "--backend", "slurm", "--slurm-gpus-per-task",
                             "0", "--slurm-option", "cpus_per_task=2", "--slurm-option=--mem-per-cpu=1G")
    assert rc == 0, err
    (script,) = capture.glob("script_*.sh")
    lines = script.read_text().splitlines()
    assert not [ln for ln in lines if "gpus" in ln or "gres" in ln], lines
    assert "#SBATCH --cpus-per-task=2" in lines and "#SBATCH --mem-per-cpu=1G" in lines
    assert "as job array 77 (tasks 77_0 to 77_23)" in out, out
    # the option's two spellings mean the same, and say what the flag says
    for spelling in ("gpus-per-task=0", "gpus_per_task=0", "--gpus-per-task=0"):
        env_i, capture_i = fake_slurm(tmp_path / spelling)
        out_dir = f"runs_opt_{len(spelling)}_{spelling[0]}"
        rc, _, err = run_sweep(monkeypatch, capsys, env_i, "run", write_grid(tickets, out_dir, name=f"{out_dir}.toml"),
                               "--backend", "slurm", f"--slurm-option={spelling}")
        assert rc == 0, err
        (script_i,) = capture_i.glob("script_*.sh")
        assert not [ln for ln in script_i.read_text().splitlines() if "gpus" in ln], spelling
    with pytest.raises(slurm.UserError, match="one task on one node"):
        slurm.slurm_options(["ntasks-per-node=4"])


def test_runs_queued_from_an_earlier_submission_are_not_submitted_again(tickets, tmp_path, monkeypatch,  # noqa: F811
                                                                        capsys):
    pytest.importorskip("submitit")
    env, capture = fake_slurm(tmp_path)
    grid = write_grid(tickets, "runs_requeue", name="requeue.toml")
    assert run_sweep(monkeypatch, capsys, env, "run", grid, "--backend", "slurm")[0] == 0
    # every task of array 77 still queued or running: nothing goes out again
    queued = [f"77_{i} {'RUNNING' if i < 2 else 'PENDING'}" for i in range(24)]
    env2, capture2 = fake_slurm(tmp_path / "again", squeue_lines=queued)
    rc, out, err = run_sweep(monkeypatch, capsys, env2, "run", grid, "--backend", "slurm")
    assert rc == 0, err
    assert "24 runs are queued or running already (jobs 77_0" in out, out
    assert not list(capture2.glob("script_*.sh"))
    # the array has left the queue (and nothing finished): every run goes out once more
    env3, capture3 = fake_slurm(tmp_path / "third", squeue_lines=["77_3 COMPLETED"])
    rc, out, err = run_sweep(monkeypatch, capsys, env3, "run", grid, "--backend", "slurm")
    assert rc == 0 and "submitted 24 runs" in out, out + err
    assert len(list(capture3.glob("script_*.sh"))) == 1


def test_a_refused_submission_leaves_no_task_files(tickets, tmp_path, monkeypatch, capsys):  # noqa: F811
    pytest.importorskip("submitit")
    env, _ = fake_slurm(tmp_path, sbatch_exit=1)
    grid = write_grid(tickets, "runs_refused", name="refused.toml")
    rc, _, err = run_sweep(monkeypatch, capsys, env, "run", grid, "--backend", "slurm")
    assert rc == 2 and "sbatch refused" in err and "gres" in err, err
    folder = tickets / "runs_refused" / ".submitit"
    assert not folder.exists() or not any(folder.rglob("*")), sorted(folder.rglob("*"))
    assert not list((tickets / "runs_refused").rglob(slurm.JOB_FILE))


def test_a_single_run_is_reported_as_a_plain_job(tickets, tmp_path, monkeypatch, capsys):  # noqa: F811
    pytest.importorskip("submitit")
    env, _ = fake_slurm(tmp_path)
    grid = tickets / "single.toml"
    grid.write_text('out = "runs_single"\n[pretrain.std]\ninit = "std.pt"\n[axes]\ndataset = ["digits"]\n'
                    'regime = ["st"]\nseed = [1]\n[flags]\narch = "resnet_tiny"\ncifar_stem = true\n'
                    'classes = "5-9"\nepochs = 1\nno_progress = true\n')
    rc, out, err = run_sweep(monkeypatch, capsys, env, "run", grid, "--backend", "slurm")
    assert rc == 0, err
    assert "submitted 1 run as job 77;" in out and "array" not in out, out


def test_job_label_and_threads_follow_the_allocation():
    assert slurm.job_label({"SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "15"}) == "job 12_3"
    assert slurm.job_label({"SLURM_JOB_ID": "15"}) == "job 15"
    env, note = slurm.task_environment({"SLURM_CPUS_PER_TASK": "4", "SLURM_CPUS_ON_NODE": "8"})
    assert env["OMP_NUM_THREADS"] == "4" and "4" in note
    env, _ = slurm.task_environment({"SLURM_CPUS_ON_NODE": "1"})
    assert env["OMP_NUM_THREADS"] == "1"
    env, _ = slurm.task_environment({"SLURM_CPUS_PER_TASK": "4", "OMP_NUM_THREADS": "2"})
    assert env["OMP_NUM_THREADS"] == "2"  # set by the user: kept


def test_a_signal_that_arrives_as_the_run_finishes_does_not_requeue(tmp_path):
    pytest.importorskip("submitit")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(RESULT)
    task = slurm.SlurmRun(["--save-dir", str(run_dir)], run_dir, sys.executable, stop_grace_s=5)
    task._proc = subprocess.Popen([sys.executable, "-c", "pass"])
    task._proc.wait()
    assert task.checkpoint() is None  # submitit then ends the job instead of requeueing it
    (run_dir / "results.json").unlink()
    assert task.checkpoint() is not None


def test_slurm_options_reject_malformed_items():
    pytest.importorskip("submitit")
    with pytest.raises(slurm.UserError, match="KEY=VALUE"):
        slurm.slurm_options(["account"])
    params, extra = slurm.slurm_options(["cpus-per-task=3", "some-site-flag=x", "time=10"])
    assert params == {"cpus_per_task": "3", "time": "10"} and extra == {"some_site_flag": "x"}
    assert Path(slurm.__file__).name == "slurm.py"
