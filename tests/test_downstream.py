"""Stage 2 end to end on tiny models: contract of results.json, sparsity kept, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main_downstream
import models
import pruning_utils
from tests.fixtures import write_cifar10
from utils.checkpoint import safe_load
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RESULT_KEYS = {"dataset", "arch", "pretrain", "init", "ticket", "method", "sparsity", "regime", "data_rate",
               "seed", "sa", "ra", "selected_epoch", "selection", "history", "config", "git"}
HISTORY_KEYS = {"epoch", "lr", "train_loss", "train_acc", "val_sa", "val_ra", "seconds"}
TINY = ["--arch", "resnet_tiny", "--cifar-stem", "--no-progress", "--batch-size", "32"]


def make_ticket(tmp_path, sparsity=50.0, num_classes=5, seed=0):
    model = models.build_model("resnet_tiny", num_classes, cifar_stem=True)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    mask = pruning_utils.prune_to_sparsity(
        weights, sparsity, method="magnitude",
        base_mask=pruning_utils.full_mask(model))
    ticket = pruning_utils.make_ticket(mask, round=3, method="imp", retrain="st", arch="resnet_tiny",
                                       pretrain="at", init="θ_p.pt", source_dataset="digits")
    path = tmp_path / "ticket.pt"
    pruning_utils.save_ticket(path, ticket)
    init = tmp_path / "init.pt"
    models.save_model_checkpoint(init, model)
    return path, init, ticket


def run(argv):
    return main_downstream.main([str(a) for a in argv])


def check_contract(res, regime, ra=True):
    assert set(res) == RESULT_KEYS
    assert res["regime"] == regime
    assert res["selection"] == ("val_sa" if regime == "st" else "val_ra")
    assert 0 <= res["sa"] <= 100
    if ra:
        assert 0 <= res["ra"] <= 100
    else:
        assert res["ra"] is None
    assert all(set(h) == HISTORY_KEYS for h in res["history"])
    assert res["selected_epoch"] in [h["epoch"] for h in res["history"] if h["val_sa"] is not None]


@pytest.mark.parametrize("regime", ["st", "fat", "at"])
def test_regimes_on_digits_write_the_results_contract(tmp_path, regime):
    ticket, init, meta = make_ticket(tmp_path)
    out = tmp_path / "run"
    train_steps = ["--train-steps", "2"] if regime == "at" else []  # fat takes one FGSM step, st none
    run(["--dataset", "digits", "--classes", "5-9", "--init", init, "--ticket", ticket, "--regime", regime,
         "--epochs", "2", "--lr", "0.05", *train_steps, "--eps", "8/255",
         "--test-steps", "2", "--test-alpha", "2/255", "--save-trajectory", "--save-dir", out, *TINY])
    res = json.loads((out / "results.json").read_text())
    check_contract(res, regime)
    # the trajectory starts with the weights before fine-tuning, then one file per epoch
    assert sorted(p.name for p in (out / "trajectory").iterdir()) == ["epoch_000.pt", "epoch_001.pt", "start.pt"]
    assert res["config"]["test_alpha"] == pytest.approx(2 / 255)
    assert res["sparsity"] == pytest.approx(meta["sparsity"])
    assert res["method"] == "imp" and res["pretrain"] == "at" and res["dataset"] == "digits"
    assert res["ticket"] == str(ticket) and res["data_rate"] == 1.0 and len(res["history"]) == 2
    assert res["config"]["eps"] == pytest.approx(8 / 255)
    # the selected model keeps the ticket's zeros exactly
    best = safe_load(out / "model_best.pt")
    for name, m in meta["masks"].items():
        assert torch.count_nonzero(best["state_dict"][name][~m]) == 0
    assert (out / "log.csv").read_text().count("\n") == 3
    assert (out / "config.json").exists() and (out / "subset_indices.json").exists()


@pytest.mark.parametrize("regime", ["st", "fat", "at"])
def test_regimes_on_cifar10_fixture_with_reduced_data_rate(tmp_path, regime):
    write_cifar10(tmp_path / "data", per_batch=40, n_test=20)
    ticket, init, meta = make_ticket(tmp_path, num_classes=10)
    out = tmp_path / "run"
    train_steps = ["--train-steps", "1"] if regime == "at" else []  # fat takes one FGSM step, st none
    run(["--data", tmp_path / "data", "--dataset", "cifar10", "--init", init, "--ticket", ticket,
         "--regime", regime, "--epochs", "1", *train_steps, "--test-steps", "1", "--image-size", "32",
         "--data-rate", "0.5", "--save-dir", out, *TINY, "--allow-chance"])  # random images and labels: chance by design
    res = json.loads((out / "results.json").read_text())
    check_contract(res, regime)
    assert res["data_rate"] == 0.5 and res["dataset"] == "cifar10"
    idx = json.loads((out / "subset_indices.json").read_text())
    assert len(idx["val_indices"]) == 20  # 10% of the 200 training images, the last ones
    assert idx["val_indices"] == list(range(180, 200))
    assert len(idx["train_indices"]) < 180


def test_pruned_weights_stay_zero_with_momentum_and_weight_decay(tmp_path):
    ticket, init, meta = make_ticket(tmp_path, sparsity=80.0)
    out = tmp_path / "run"
    run(["--dataset", "digits", "--init", init, "--ticket", ticket, "--regime", "st", "--epochs", "2",
         "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "5e-3", "--keep-checkpoint", "--save-dir", out, *TINY])
    ckpt = safe_load(out / "checkpoint.pt")
    start = safe_load(init)["state_dict"]
    changed = 0
    for name, m in meta["masks"].items():
        assert torch.count_nonzero(ckpt["model"][name][~m]) == 0, name
        changed += int((ckpt["model"][name][m] != start[name][m]).sum())
    assert changed > 0  # the kept weights did train
    assert any(len(s.get("momentum_buffer", [])) if isinstance(s.get("momentum_buffer"), list) else 1
               for s in ckpt["optimizer"]["state"].values())


def test_dense_baseline_and_rerun_of_finished_run(tmp_path, capsys):
    _, init, _ = make_ticket(tmp_path)
    out = tmp_path / "run"
    args = ["--dataset", "digits", "--init", init, "--pretrain", "std", "--regime", "st", "--epochs", "1",
            "--test-steps", "0", "--save-dir", out, *TINY]
    run(args)
    res = json.loads((out / "results.json").read_text())
    assert res["ticket"] is None and res["sparsity"] == 0.0 and res["method"] == "dense"
    check_contract(res, "st", ra=False)  # --test-steps 0: no RA
    stamp = (out / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    run(args)
    assert "already finished" in capsys.readouterr().out
    assert (out / "results.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="different configuration"):
        run([*args, "--seed", "2"])


def test_paper_defaults_and_seed_spellings_parse():
    base = ["--dataset", "cifar10", "--init", "x.pt", "--save-dir", "out"]
    args = main_downstream.parse_args(base)
    assert (args.data_rate, args.test_steps, args.train_steps, args.eval_from) == (1.0, 20, 10, None)
    assert args.eps == pytest.approx(8 / 255) and args.test_eps is None
    main_downstream.resolve_defaults(args)
    assert args.eval_from == 0  # st selects from epoch 0 (CIFAR at: 45, tests/test_fidelity.py)
    assert (args.alpha, args.test_eps, args.test_alpha) == pytest.approx((2 / 255, 8 / 255, 2 / 255))
    seed = main_downstream.parse_args(base + [
        "--data_number", "0.1", "--decreasing_lr", "50,75", "--regime", "at", "--train_eps", "0.0313",
        "--train_gamma", "0.0078", "--train_step", "7", "--test_eps", "4/255", "--test_gamma", "1/255",
        "--test_step", "30"])
    assert seed.data_rate == 0.1 and seed.milestones == [50, 75]
    assert (seed.eps, seed.alpha, seed.test_eps, seed.test_alpha) == pytest.approx((0.0313, 0.0078, 4 / 255, 1 / 255))
    assert (seed.train_steps, seed.test_steps) == (7, 30)


def test_svhn_adversarial_schedule_follows_explicit_milestones():
    base = ["--dataset", "svhn", "--init", "x.pt", "--save-dir", "out", "--regime", "at"]
    paper = main_downstream.parse_args(base)
    main_downstream.resolve_defaults(paper)
    assert (paper.schedule, paper.lr, paper.epochs) == ("cosine", 0.01, 80)
    stepped = main_downstream.parse_args(base + ["--decreasing_lr", "40,60"])
    main_downstream.resolve_defaults(stepped)
    # only the schedule changes: SVHN's lr and length stay
    assert (stepped.schedule, stepped.milestones, stepped.lr, stepped.epochs) == ("step", [40, 60], 0.01, 80)
    with pytest.raises(UserError, match="--milestones"):
        main_downstream.resolve_defaults(main_downstream.parse_args(base + ["--schedule", "cosine",
                                                                            "--milestones", "40"]))


def test_fat_guard_stops_keeps_the_previous_epoch_and_a_rerun_does_not_train_past_it(tmp_path, monkeypatch):
    ticket, init, _ = make_ticket(tmp_path)
    out = tmp_path / "run"
    guard = iter([60.0, 55.0, 5.0, 50.0, 50.0])  # epoch 3 collapses: 55% -> 5% PGD accuracy
    monkeypatch.setattr(main_downstream, "guard_accuracy", lambda *a, **k: next(guard))
    args = ["--dataset", "digits", "--init", init, "--ticket", ticket, "--pretrain", "at", "--regime", "fat",
            "--epochs", "5", "--lr", "0.05", "--test-steps", "1", "--keep-checkpoint", "--save-dir", out, *TINY]
    run(args)
    res = json.loads((out / "results.json").read_text())
    info = json.loads((out / "run_info.json").read_text())
    assert "catastrophic overfitting in epoch 3" in info["stopped_early"]
    assert [h["epoch"] for h in res["history"]] == [0, 1] and res["selected_epoch"] in (0, 1)
    ckpt = safe_load(out / "checkpoint.pt")
    assert ckpt["state"]["stopped"] and ckpt["state"]["epoch"] == 2
    # a crash after the guard fired (results.json not yet written) must not resume training
    (out / "results.json").unlink()
    run(args)
    again = json.loads((out / "results.json").read_text())
    assert [h["epoch"] for h in again["history"]] == [0, 1] and again["sa"] == res["sa"]


def test_resume_re_saves_a_selected_model_a_kill_left_behind(tmp_path):
    ticket, init, meta = make_ticket(tmp_path)
    model = models.build_model("resnet_tiny", 5, cifar_stem=True)
    pruning_utils.apply_mask(model, meta["masks"])
    models.save_model_checkpoint(tmp_path / "model_best.pt", model, epoch=0, selection="val_ra")
    # the checkpoint of epoch 2 selected epoch 2, but the kill came before model_best.pt was rewritten
    state = {"epoch": 3, "best": {"score": 40.0, "epoch": 2}, "best_sa": None}
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    main_downstream.save_selected_models(tmp_path, model, meta["masks"], state, "val_ra", resuming=True)
    best = safe_load(tmp_path / "model_best.pt")
    assert best["epoch"] == 2 and torch.equal(best["state_dict"]["fc.weight"], model.fc.weight)
    # a selection that is neither on disk nor the epoch in hand cannot be repaired: refused
    state = {"epoch": 5, "best": {"score": 40.0, "epoch": 3}, "best_sa": None}
    with pytest.raises(UserError, match="new --save-dir"):
        main_downstream.save_selected_models(tmp_path, model, meta["masks"], state, "val_ra", resuming=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rng_state_loaded_onto_the_gpu_restores(tmp_path):
    from utils.checkpoint import atomic_save
    from utils.seeding import gather_rng_states, restore_rank_rng_state
    torch.zeros(1, device="cuda")
    atomic_save({"rng": gather_rng_states()}, tmp_path / "c.pt")
    expected, expected_gpu = torch.rand(3), torch.rand(3, device="cuda")
    restore_rank_rng_state(safe_load(tmp_path / "c.pt", map_location="cuda")["rng"], 0)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(torch.rand(3, device="cuda"), expected_gpu)


def test_linear_eval_trains_only_the_head(tmp_path):
    _, init, _ = make_ticket(tmp_path)
    out = tmp_path / "run"
    run(["--dataset", "digits", "--init", init, "--pretrain", "std", "--regime", "st", "--epochs", "1",
         "--lr", "0.1", "--linear-eval", "--save-dir", out, *TINY])
    start = safe_load(init)["state_dict"]
    best = safe_load(out / "model_best.pt")["state_dict"]
    for name, value in start.items():
        if not name.startswith("fc."):
            assert torch.equal(best[name], value), name


def _resume_args(init, ticket, out):
    return [sys.executable, str(REPO / "main_downstream.py"), "--dataset", "digits", "--init", str(init),
            "--ticket", str(ticket), "--regime", "at", "--epochs", "4", "--lr", "0.05", "--train-steps", "1",
            "--test-steps", "1", "--seed", "3", "--save-dir", str(out), *TINY]


@pytest.mark.slow
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    ticket, init, _ = make_ticket(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    straight = tmp_path / "straight"
    subprocess.run(_resume_args(init, ticket, straight), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_resume_args(init, ticket, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "log.csv").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()
    subprocess.run(_resume_args(init, ticket, killed), check=True, env=env, capture_output=True)
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert (a["sa"], a["ra"], a["selected_epoch"]) == (b["sa"], b["ra"], b["selected_epoch"])


def _cli(argv):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "main_downstream.py"), *map(str, argv)],
                          capture_output=True, text=True, env=env)


def test_bad_input_exits_2_with_one_clear_line_and_no_results(tmp_path):
    ticket, init, meta = make_ticket(tmp_path)
    base = ["--init", init, "--epochs", "1", *TINY]
    cases = {
        "cifar-10-batches-py": ["--dataset", "cifar10", "--data", tmp_path, "--save-dir", tmp_path / "a"],
        "data-rate": ["--dataset", "digits", "--data-rate", "1.5", "--save-dir", tmp_path / "b"],
        "eps": ["--dataset", "digits", "--eps", "eight/255", "--save-dir", tmp_path / "c"],
        "resnet18": ["--dataset", "digits", "--ticket", ticket, "--save-dir", tmp_path / "d", "--arch", "resnet18"],
    }
    # a mask that is not boolean
    bad = dict(meta, masks={k: v.float() for k, v in meta["masks"].items()})
    torch.save(bad, tmp_path / "float_ticket.pt")
    cases["bool"] = ["--dataset", "digits", "--ticket", tmp_path / "float_ticket.pt", "--save-dir", tmp_path / "e"]
    for needle, extra in cases.items():
        proc = _cli(base + extra)
        assert proc.returncode == 2, (needle, proc.stderr)
        assert needle in proc.stderr, (needle, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not (Path(extra[extra.index("--save-dir") + 1]) / "results.json").exists()


def test_divergence_and_config_change_exit_2(tmp_path):
    _, init, _ = make_ticket(tmp_path)
    out = tmp_path / "run"
    proc = _cli(["--dataset", "digits", "--init", init, "--epochs", "2", "--lr", "1e30", "--save-dir", out, *TINY])
    assert proc.returncode == 2 and "loss" in proc.stderr and "--lr" in proc.stderr, proc.stderr
    assert not (out / "results.json").exists()
    proc = _cli(["--dataset", "digits", "--init", init, "--epochs", "3", "--lr", "0.01", "--save-dir", out, *TINY])
    assert proc.returncode == 2 and "different configuration" in proc.stderr and "epochs" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    """One run over two gloo processes: the global batch is split, counts are summed over ranks,
    every rank's RNG state is gathered into the checkpoint, and only rank 0 writes."""
    ticket, init, meta = make_ticket(tmp_path)
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "main_downstream.py"), "--dataset", "digits", "--classes", "5-9", "--init", str(init),
           "--ticket", str(ticket), "--regime", "at", "--epochs", "2", "--lr", "0.05", "--train-steps", "1",
           "--test-steps", "1", "--device", "cpu", "--keep-checkpoint", "--save-dir", str(out), *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    check_contract(res, "at")
    assert proc.stdout.count("done: digits at") == 1  # reported once, by rank 0
    assert json.loads((out / "run_info.json").read_text())["world_size"] == 2
    ckpt = safe_load(out / "checkpoint.pt")
    assert isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # seeds differ per rank
    best = safe_load(out / "model_best.pt")
    for name, m in meta["masks"].items():
        assert torch.count_nonzero(best["state_dict"][name][~m]) == 0
    # killed after the last checkpoint but before results.json: the rerun restores each rank's own
    # RNG stream, so the test attack's random starts, and the result, come out the same
    (out / "results.json").unlink()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout
    res2 = json.loads((out / "results.json").read_text())
    assert (res2["sa"], res2["ra"], res2["selected_epoch"]) == (res["sa"], res["ra"], res["selected_epoch"])
