"""benchmarks/gpu_suite.sh in its tiny CPU mode, and benchmarks/gpu_table.py on what it leaves."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_table
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
# every run the suite makes, and the record each leaves; None: skipped without CUDA (or in --tiny)
RUNS = {"cuda_tests": None, "folder_tests": None, "step_at": "step_at.json", "step_st": "step_st.json",
        "step_at_compile": None, "loader": "loader.json", "loader_folder": "loader_folder.json",
        "cifar_data": "cifar/cifar-10-batches-py/test_batch", "downstream_eager": "downstream_eager/results.json",
        "downstream_compile": "downstream_compile/results.json", "downstream_check": "downstream_check.json",
        "precision": "precision.json", "inference": "inference.json", "estimate": "estimate.json"}


def _suite(*args, timeout=300):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("SUITE_DEVICE", None)
    return subprocess.run(["bash", str(SUITE), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "out"
    return out, _suite(out, "--device", "cpu", "--tiny")


@pytest.mark.slow
def test_tiny_suite_leaves_every_record_and_a_summary(tiny_run):
    out, proc = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((out / "suite.json").read_text())
    assert [row["run"] for row in summary] == list(RUNS)
    for row in summary:
        record = RUNS[row["run"]]
        if record is None:
            assert row["status"] == "skipped", row
            continue
        assert row["status"] == "ok" and row["record"] == record, row
        if record.endswith(".json"):
            assert isinstance(json.loads((out / record).read_text()), dict)
    table = proc.stdout[proc.stdout.rindex("run  "):].splitlines()
    assert [line.split()[0] for line in table[1:]] == list(RUNS)
    # the CUDA-only parts say so in one line each, and leave nothing behind
    assert proc.stdout.count("skipped (CUDA-only tests; the device is cpu)") == 1
    assert not (out / "cuda_tests.json").exists() and not (out / "step_at_compile.json").exists()
    check = json.loads((out / "downstream_check.json").read_text())
    assert check["agree"] is True and check["second_run_compiled"] is False
    assert json.loads((out / "step_at.json").read_text())["arch"] == "resnet_tiny"


@pytest.mark.slow
def test_gpu_table_renders_the_tiny_records(tiny_run, capsys):
    out, _ = tiny_run
    lines, missing = gpu_table.render(out)
    assert missing == ["cuda_tests.json", "step_at_compile.json"]
    rows = lines[1:]  # lines[0]: the header and its rule
    assert len(rows) == 9 and all(row.count(" | ") == 5 for row in rows)
    assert all(row.split(" | ")[4] == torch.__version__ for row in rows)
    assert any(row.startswith("| PGD-20 evaluation") and "(PGD-2)" in row for row in rows)
    assert any("(both runs eager) | — |" in row for row in rows)
    gpu_table.main([str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith(gpu_table.HEADER) and "Not measured (no record): cuda_tests.json" in printed


def test_gpu_table_marks_missed_and_met_targets(tmp_path):
    stamp = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.9.0", "date": "2026-12-07"}
    (tmp_path / "step_at.json").write_text(json.dumps({**stamp, "attack_steps": 10, "speedup": 6.1,
                                                       "engine": {"images_per_s": 1500.0},
                                                       "eval_pgd20": {"steps": 20, "engine": {"images_per_s": 650.0}}}))
    (tmp_path / "estimate.json").write_text(json.dumps({"device": stamp["device"], "total_min": 70.0}))
    lines, missing = gpu_table.render(tmp_path)
    assert lines[1] == ("| PGD-10 AT step ≥ 1,300 img/s and ≥ 5x the reference | 1,500 img/s (PGD-10), 6.10x | yes "
                        "| NVIDIA H100 80GB HBM3 | 2.9.0 | 2026-12-07 |")
    assert lines[2].startswith("| PGD-20 evaluation ≥ 700 img/s | 650 img/s (PGD-20) | **no** |")
    assert lines[3].endswith("| 70.0 min | yes | NVIDIA H100 80GB HBM3 | 2.9.0 | 2026-12-07 |")  # the step's stamp
    assert "loader.json" in missing and "step_at.json" not in missing
    (tmp_path / "estimate.json").write_text("{}")
    with pytest.raises(UserError, match="estimate.json lacks what its row needs"):
        gpu_table.render(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--tiny", "--device"], "--device needs a value"),
    (["nopart"], "unknown part 'nopart'"),
])
def test_suite_refuses_bad_arguments_in_one_line(tmp_path, args, message):
    proc = _suite(tmp_path / "out", *args, timeout=30)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr
    assert not (tmp_path / "out").exists()
