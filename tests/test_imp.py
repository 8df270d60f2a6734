"""Stage 1 end to end on tiny models: OMP/RP levels, IMP rewinding, resume after SIGKILL, torchrun."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as tprune
import torchvision

import main_imp_pretrain
import models
import pruning_utils
from tests.fixtures import write_image_folder

REPO = Path(__file__).resolve().parents[1]
LEVELS = [20.00, 36.00, 48.80, 59.04, 67.23, 73.79, 79.03, 83.22, 86.58, 89.26, 91.41, 93.13, 94.50, 95.60,
          96.48, 97.19, 97.75, 98.20, 98.56]


def tiny_init(tmp_path, num_classes=3, seed=0):
    torch.manual_seed(seed)
    model = models.build_model("resnet_tiny", num_classes, cifar_stem=True)
    path = tmp_path / "theta_p.pt"
    models.save_model_checkpoint(path, model)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def folder_data(tmp_path):
    root = tmp_path / "imagenet_like"
    write_image_folder(root, classes=("ant", "bee", "cat"), n_train=8, n_val=2, size=(12, 12))
    return root


def imp_args(init, data, out, *extra):
    return ["--data", data, "--dataset", "folder", "--arch", "resnet_tiny", "--cifar-stem", "--init", init,
            "--pretrain", "std", "--image-size", "12", "--batch-size", "8", "--rounds", "3",
            "--epochs-per-round", "2", "--lr", "0.05", "--workers", "0", "--no-progress", "--save-dir", out,
            *extra]


@pytest.mark.slow
def test_omp_from_torchvision_matches_global_unstructured_and_levels(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    out = tmp_path / "omp"
    main_imp_pretrain.main(["--dataset", "cifar10", "--arch", "resnet18", "--init", str(tmp_path / "tv.pt"),
                            "--pretrain", "std", "--method", "omp", "--save-dir", str(out)])
    levels = json.loads((out / "sparsity.json").read_text())
    assert [levels[str(k)] for k in range(1, 20)] == LEVELS
    # round 1 against torch.nn.utils.prune on the same weights
    convs = [(m, "weight") for m in tv.modules() if isinstance(m, torch.nn.Conv2d)]
    tprune.global_unstructured(convs, pruning_method=tprune.L1Unstructured, amount=0.2)
    expected = {f"{n}.weight": m.weight_mask.bool() for n, m in tv.named_modules() if isinstance(m, torch.nn.Conv2d)}
    ticket = pruning_utils.load_ticket(out / "tickets" / "round_01.pt")
    assert set(ticket["masks"]) == set(expected)
    for name, m in expected.items():
        assert torch.equal(ticket["masks"][name], m), name
    last = pruning_utils.load_ticket(out / "tickets" / "round_19.pt")
    assert last["method"] == "omp" and last["retrain"] is None and last["round"] == 19
    assert round(last["sparsity"], 2) == 98.56
    # nested: a later level only removes weights
    assert all(bool((last["masks"][n] & ~ticket["masks"][n]).sum() == 0) for n in expected)


def test_random_pruning_levels_and_metadata(tmp_path):
    init, _ = tiny_init(tmp_path)
    out = tmp_path / "rp"
    argv = ["--dataset", "digits", "--arch", "resnet_tiny", "--cifar-stem", "--init", str(init),
            "--pretrain", "at", "--method", "rp", "--rounds", "5", "--save-dir", str(out)]
    main_imp_pretrain.main(argv)
    levels = json.loads((out / "sparsity.json").read_text())
    assert [levels[str(k)] for k in range(1, 6)] == LEVELS[:5]
    t = pruning_utils.load_ticket(out / "tickets" / "round_05.pt")
    assert (t["method"], t["pretrain"], t["arch"], t["source_dataset"]) == ("rp", "at", "resnet_tiny", "digits")
    assert t["init"] == str(init)
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["round"]), float(r["sparsity"])) for r in rows] == list(zip(range(1, 6), LEVELS[:5]))
    # a rerun keeps the tickets already written and recomputes the same levels
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "tickets").iterdir()}
    (out / "tickets" / "round_05.pt").unlink()
    main_imp_pretrain.main(argv)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "tickets").iterdir() if p.name != "round_05.pt"} == \
        {k: v for k, v in stamps.items() if k != "round_05.pt"}
    again = pruning_utils.load_ticket(out / "tickets" / "round_05.pt")
    assert all(torch.equal(again["masks"][n], t["masks"][n]) for n in t["masks"])


@pytest.mark.parametrize("retrain", ["st", "at"])
def test_imp_rewinds_to_theta_p_every_round(tmp_path, monkeypatch, retrain):
    init, theta_p = tiny_init(tmp_path)
    data = folder_data(tmp_path)
    seen = []
    real_train_epoch = main_imp_pretrain.train_epoch

    def spy(model, loader, optimizer, **kw):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_train_epoch(model, loader, optimizer, **kw)

    monkeypatch.setattr(main_imp_pretrain, "train_epoch", spy)
    out = tmp_path / f"imp_{retrain}"
    attack = ["--attack-steps", "2"] if retrain == "at" else []
    main_imp_pretrain.main([str(a) for a in imp_args(init, data, out, "--retrain", retrain, *attack)])
    tickets = [pruning_utils.load_ticket(out / "tickets" / f"round_{k:02d}.pt") for k in (1, 2, 3)]
    assert [round(t["sparsity"], 2) for t in tickets] == LEVELS[:3]
    assert all(t["retrain"] == retrain and t["method"] == "imp" for t in tickets)
    # rounds 1 and 2 are re-trained (2 epochs each); round 3, the last, needs no re-training
    assert len(seen) == 4
    for round_index, state in ((0, seen[0]), (1, seen[2])):
        mask = tickets[round_index]["masks"]
        for name, value in theta_p.items():
            if name in mask:
                assert torch.equal(state[name][mask[name]], value[mask[name]]), name
                assert torch.count_nonzero(state[name][~mask[name]]) == 0
            else:  # BatchNorm buffers and unpruned parameters rewind too
                assert torch.equal(state[name], value), name
    # round 2's mask was chosen from trained weights, not from θ_p: it differs from OMP's
    omp = pruning_utils.global_magnitude_prune(
        theta_p, pruning_utils.global_magnitude_prune(theta_p, {n: torch.ones_like(m) for n, m in
                                                               tickets[0]["masks"].items()}, 0.2), 0.2)
    assert any(not torch.equal(omp[n], tickets[1]["masks"][n]) for n in omp)
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert rows[0] == "round,epoch,lr,train_loss,train_acc,sparsity,seconds" and len(rows) == 5
    assert (out / "config.json").exists() and (out / "checkpoint.pt").exists()


def _cli(argv, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return [sys.executable, str(REPO / "main_imp_pretrain.py"), *map(str, argv)], env


@pytest.mark.slow
def test_sigkill_mid_round_then_rerun_gives_bit_identical_tickets(tmp_path):
    init, _ = tiny_init(tmp_path)
    data = folder_data(tmp_path)
    straight = tmp_path / "straight"
    cmd, env = _cli(imp_args(init, data, straight, "--epochs-per-round", "3"))
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    cmd, env = _cli(imp_args(init, data, killed, "--epochs-per-round", "3"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # kill inside round 2, after at least one of its epochs is checkpointed
    while time.time() < deadline:
        log = killed / "log.csv"
        if log.exists() and log.read_text().count("\n2,") >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "tickets" / "round_03.pt").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    for k in (1, 2, 3):
        a = pruning_utils.load_ticket(straight / "tickets" / f"round_{k:02d}.pt")
        b = pruning_utils.load_ticket(killed / "tickets" / f"round_{k:02d}.pt")
        assert set(a["masks"]) == set(b["masks"])
        assert all(torch.equal(a["masks"][n], b["masks"][n]) for n in a["masks"]), k
    # rerunning a finished run skips everything
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "round 3/3" not in again.stdout.replace("resuming", "")


def _children(pid):
    """PIDs whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find torchrun's workers")
def test_torchrun_max_restarts_continues_after_a_worker_is_killed(tmp_path):
    """A worker killed mid-round: torchrun restarts the group, which resumes from the checkpoint
    (each rank with its own RNG stream) and ends with the tickets of an uninterrupted run."""
    init, _ = tiny_init(tmp_path)
    data = folder_data(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def launch(out, restarts):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", str(restarts), str(REPO / "main_imp_pretrain.py"),
                *map(str, imp_args(init, data, out, "--rounds", "3", "--device", "cpu"))]

    straight = tmp_path / "straight"
    subprocess.run(launch(straight, 0), env=env, check=True, capture_output=True, timeout=300)
    crashed = tmp_path / "crashed"
    agent = subprocess.Popen(launch(crashed, 1), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((crashed / "log.csv").exists()
                                          and "\n2," in (crashed / "log.csv").read_text()):
        time.sleep(0.02)
    workers = _children(agent.pid)
    assert workers, "torchrun started no workers"
    os.kill(max(workers), signal.SIGKILL)
    out, _ = agent.communicate(timeout=300)
    assert agent.returncode == 0, out[-3000:]
    assert "resuming" in out
    for k in (1, 2, 3):
        a = pruning_utils.load_ticket(straight / "tickets" / f"round_{k:02d}.pt")["masks"]
        b = pruning_utils.load_ticket(crashed / "tickets" / f"round_{k:02d}.pt")["masks"]
        assert all(torch.equal(a[n], b[n]) for n in a), k


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    init, _ = tiny_init(tmp_path)
    data = folder_data(tmp_path)
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "main_imp_pretrain.py"),
           *map(str, imp_args(init, data, out, "--rounds", "2", "--epochs-per-round", "1", "--device", "cpu"))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("masks computed on 2 ranks are identical") == 2, proc.stdout
    assert "DIFFERENT" not in proc.stdout
    assert sorted(p.name for p in (out / "tickets").iterdir()) == ["round_01.pt", "round_02.pt"]
    assert proc.stdout.count("ticket at 20.00% sparsity") == 1  # written and announced once
    assert [round(v, 2) for v in json.loads((out / "sparsity.json").read_text()).values()] == LEVELS[:2]


def test_bad_input_exits_2(tmp_path):
    init, _ = tiny_init(tmp_path)
    base = ["--dataset", "digits", "--arch", "resnet_tiny", "--cifar-stem", "--method", "omp", "--init", init]
    cases = {
        "--rate": base + ["--rate", "1.5", "--save-dir", tmp_path / "a"],
        "--rounds": base + ["--rounds", "0", "--save-dir", tmp_path / "b"],
        "does not exist": ["--dataset", "digits", "--arch", "resnet_tiny", "--init", tmp_path / "missing.pt",
                           "--save-dir", tmp_path / "c"],
        "resnet18": ["--dataset", "digits", "--arch", "resnet18", "--init", init, "--method", "omp",
                     "--save-dir", tmp_path / "d"],
        "dataset": ["--dataset", "mnist", "--arch", "resnet_tiny", "--init", init, "--save-dir", tmp_path / "e"],
    }
    for needle, argv in cases.items():
        cmd, env = _cli(argv)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert proc.returncode == 2, (needle, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (needle, proc.stderr)
    # a rejected command claims no directory: the corrected one runs there
    assert not (tmp_path / "d" / "config.json").exists()
    fixed, env = _cli(["--dataset", "digits", "--arch", "resnet_tiny", "--cifar-stem", "--init", init, "--method",
                       "omp", "--rounds", "2", "--save-dir", tmp_path / "d"])
    assert subprocess.run(fixed, env=env, capture_output=True).returncode == 0
    # the same directory with a different configuration is refused, differences listed
    ok, env = _cli(base + ["--rounds", "2", "--save-dir", tmp_path / "f"])
    assert subprocess.run(ok, env=env, capture_output=True).returncode == 0
    cmd, env = _cli(base + ["--rounds", "3", "--save-dir", tmp_path / "f"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "rounds: 2 -> 3" in proc.stderr, proc.stderr


def test_non_finite_loss_names_round_and_epoch(tmp_path):
    init, _ = tiny_init(tmp_path)
    data = folder_data(tmp_path)
    cmd, env = _cli(imp_args(init, data, tmp_path / "nan", "--lr", "1e30"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "round 1, epoch" in proc.stderr and "--lr" in proc.stderr
    assert (tmp_path / "nan" / "tickets" / "round_01.pt").exists()
