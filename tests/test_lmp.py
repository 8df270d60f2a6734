"""LMP (learned masks over frozen θ_p) and the IMP variant --rewind none, on resnet_tiny and digits."""

import csv
import json

import pytest
import torch

import main_imp_pretrain
import models
import pruning_utils
from training import lmp
from utils.errors import UserError

LEVELS = [20.00, 36.00, 48.80]


@pytest.fixture(scope="module")
def theta_p(tmp_path_factory):
    """A 3-class resnet_tiny θ_p whose head fits digits restricted to --classes 0-2."""
    torch.manual_seed(0)
    model = models.build_model("resnet_tiny", 3, cifar_stem=True)
    path = tmp_path_factory.mktemp("init") / "theta_p.pt"
    models.save_model_checkpoint(path, model)
    return path


def stage1(init, out, *extra, trains=True):
    """``trains=False``: OMP, or LMP with --epochs-per-round 0, where the training flags have no effect."""
    training = ["--epochs-per-round", "1", "--batch-size", "32", "--no-progress"] if trains else []
    return ["--dataset", "digits", "--classes", "0-2", "--arch", "resnet_tiny", "--cifar-stem", "--init", str(init),
            "--pretrain", "std", "--rounds", "3", *training, "--save-dir", str(out), *map(str, extra)]


def masks(out, k):
    return pruning_utils.load_ticket(out / "tickets" / f"round_{k:02d}.pt")["masks"]


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


# --------------------------------------------------------------------------- the score mechanism

def test_top_k_mask_keeps_exactly_k_even_with_ties():
    flat = torch.tensor([0.5, 0.1, 0.5, 0.5, 0.2, 0.9])
    for keep in range(flat.numel() + 1):
        m = lmp.top_k_mask(flat, keep)
        assert int(m.sum()) == keep
        if 0 < keep < flat.numel():  # every kept score >= every dropped score
            assert flat[m].min() >= flat[~m].max()
    with pytest.raises(ValueError):
        lmp.top_k_mask(flat, 7)


def test_scored_network_is_theta_p_under_the_mask_and_passes_gradient_to_pruned_scores():
    torch.manual_seed(0)
    model = models.build_model("resnet_tiny", 3, cifar_stem=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = pruning_utils.prunable_names(model)
    total = sum(dict(model.named_parameters())[n].numel() for n in names)
    net = lmp.ScoredNetwork(model, names, keep=total // 2, score_init="magnitude")
    net.train()
    assert not net.base.training and all(not m.training for m in net.base.modules())
    mask = net.masks()
    assert sum(int(m.sum()) for m in mask.values()) == total // 2
    # untrained magnitude scores are OMP's mask
    omp = pruning_utils.prune_to_sparsity(dict(model.named_parameters()), 100.0 * (total - total // 2) / total,
                                          base_mask=pruning_utils.full_mask(model))
    assert same(mask, omp)
    x = torch.rand(4, 3, 8, 8)
    reference = models.build_model("resnet_tiny", 3, cifar_stem=True)
    reference.load_state_dict(before)
    pruning_utils.apply_mask(reference, mask)
    reference.eval()
    out = net(x)
    assert torch.allclose(out, reference(x), atol=1e-6)
    out.sum().backward()
    grads = [s.grad for s in net.scores]
    assert all(g is not None for g in grads)
    pruned_grad = sum(float(g[~m].abs().sum()) for g, m in zip(grads, mask.values()))
    assert pruned_grad > 0  # straight-through: pruned weights still receive a signal
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_layerwise_keeps_each_layers_count():
    torch.manual_seed(0)
    model = models.build_model("resnet_tiny", 3, cifar_stem=True)
    names = pruning_utils.prunable_names(model)
    keeps = lmp.level_keep_counts(model, names, rounds=2, rate=0.2, layerwise=True)
    net = lmp.ScoredNetwork(model, names, keeps[1])
    for n, m in net.masks().items():
        assert int(m.sum()) == keeps[1][n]
        assert m.numel() - keeps[1][n] == pruning_utils.imp_pruned_count(m.numel(), 2)


# --------------------------------------------------------------------------- stage 1 with --method lmp

def test_lmp_levels_are_exact_theta_p_is_untouched_and_training_moves_the_mask(tmp_path, theta_p, monkeypatch):
    seen = {}
    real_run = lmp.run

    def spy(args, model, *a, **kw):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        real_run(args, model, *a, **kw)
        seen["unchanged"] = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    monkeypatch.setattr(main_imp_pretrain.lmp, "run", spy)
    out = tmp_path / "lmp"
    main_imp_pretrain.main(stage1(theta_p, out, "--method", "lmp"))
    assert seen["unchanged"]  # weights, BatchNorm buffers and head of θ_p all exactly as loaded
    levels = json.loads((out / "sparsity.json").read_text())
    assert [levels[str(k)] for k in (1, 2, 3)] == LEVELS
    untrained = tmp_path / "untrained"
    main_imp_pretrain.main(stage1(theta_p, untrained, "--method", "lmp", "--epochs-per-round", "0", trains=False))
    for k in (1, 2, 3):
        ticket = pruning_utils.load_ticket(out / "tickets" / f"round_{k:02d}.pt")
        total = sum(m.numel() for m in ticket["masks"].values())
        kept = sum(int(m.sum()) for m in ticket["masks"].values())
        assert total - kept == pruning_utils.imp_pruned_count(total, k)  # exactly IMP's / OMP's count
        assert (ticket["method"], ticket["retrain"], ticket["round"]) == ("lmp", "st", k)
        assert (ticket["rewind"], ticket["pattern"], ticket["version"]) == ("theta_p", "unstructured", 2)
        assert not same(ticket["masks"], masks(untrained, k)), k  # score training changed the top-k
    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["attack_bn"], config["score_init"], config["lr"]) == ("lmp", "eval", "scaled", 0.1)
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["round"]), float(r["sparsity"])) for r in rows] == list(zip((1, 2, 3), LEVELS))


def test_lmp_masks_differ_from_omp_after_training(tmp_path, theta_p):
    omp = tmp_path / "omp"
    main_imp_pretrain.main(stage1(theta_p, omp, "--method", "omp", trains=False))
    untrained = tmp_path / "untrained"
    main_imp_pretrain.main(stage1(theta_p, untrained, "--method", "lmp", "--score-init", "magnitude",
                                  "--epochs-per-round", "0", "--rounds", "2", trains=False))
    trained = tmp_path / "trained"
    main_imp_pretrain.main(stage1(theta_p, trained, "--method", "lmp", "--score-init", "magnitude", "--rounds", "2"))
    for k in (1, 2):
        assert same(masks(untrained, k), masks(omp, k)), k  # |θ_p| scores, no training: OMP's ticket
        assert not same(masks(trained, k), masks(omp, k)), k


def test_lmp_adversarial_loss_gives_other_masks(tmp_path, theta_p):
    st, at = tmp_path / "st", tmp_path / "at"
    main_imp_pretrain.main(stage1(theta_p, st, "--method", "lmp", "--rounds", "1"))
    main_imp_pretrain.main(stage1(theta_p, at, "--method", "lmp", "--rounds", "1", "--retrain", "at",
                                  "--attack-steps", "2"))
    assert pruning_utils.load_ticket(at / "tickets" / "round_01.pt")["retrain"] == "at"
    assert not same(masks(st, 1), masks(at, 1))


def test_lmp_rerun_resumes_mid_epoch_and_skips_finished_levels(tmp_path, theta_p, monkeypatch, capsys):
    straight = tmp_path / "straight"
    main_imp_pretrain.main(stage1(theta_p, straight, "--method", "lmp", "--epochs-per-round", "2"))

    calls = []
    real_train_epoch = lmp.train_epoch

    class Killed(Exception):
        pass

    def spy(model, loader, optimizer, **kw):
        calls.append(kw["desc"])
        if kill_at and kw["desc"].startswith(kill_at):
            save_every_step = kw["step_hook"]

            def hook(step, carry_fn):  # killed right after the checkpoint of step 3, mid-epoch
                save_every_step(step, carry_fn)
                if step >= 3:
                    raise Killed

            kw["step_hook"] = hook
        return real_train_epoch(model, loader, optimizer, **kw)

    monkeypatch.setattr(lmp, "train_epoch", spy)
    out = tmp_path / "killed"
    # --checkpoint-minutes is not part of the configuration: a tiny interval checkpoints every step
    argv = stage1(theta_p, out, "--method", "lmp", "--epochs-per-round", "2", "--checkpoint-minutes", "1e-9")
    kill_at = "lmp level 2/3 epoch 2"
    with pytest.raises(Killed):
        main_imp_pretrain.main(argv)
    assert (out / "tickets" / "round_01.pt").exists() and not (out / "tickets" / "round_02.pt").exists()
    stamp = (out / "tickets" / "round_01.pt").stat().st_mtime_ns
    calls.clear()
    kill_at = None
    capsys.readouterr()
    main_imp_pretrain.main(argv)
    assert "level 2, 1/2 epochs done, step 3 of the next" in capsys.readouterr().out
    assert calls == ["lmp level 2/3 epoch 2/2", "lmp level 3/3 epoch 1/2", "lmp level 3/3 epoch 2/2"]
    assert (out / "tickets" / "round_01.pt").stat().st_mtime_ns == stamp
    for k in (1, 2, 3):  # the resumed run ends with the uninterrupted run's tickets
        assert same(masks(out, k), masks(straight, k)), k
    calls.clear()
    main_imp_pretrain.main(argv)
    assert calls == []
    with open(out / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == 6


def test_lmp_bad_flags_are_refused_before_the_directory_is_claimed(tmp_path, theta_p):
    cases = {
        "--attack-bn train": ("--method", "lmp", "--attack-bn", "train"),
        "--rewind none applies to IMP only": ("--method", "omp", "--rewind", "none"),
        "--score-init applies to --method lmp only": ("--method", "imp", "--score-init", "magnitude"),
        "head does not fit": ("--method", "lmp", "--classes", "0-3"),
    }
    for i, (needle, extra) in enumerate(cases.items()):
        out = tmp_path / str(i)
        with pytest.raises(UserError, match=needle):
            main_imp_pretrain.main(stage1(theta_p, out, *extra))
        assert not (out / "config.json").exists(), needle


# --------------------------------------------------------------------------- IMP --rewind none

def test_imp_rewind_none_continues_from_the_retrained_weights(tmp_path, theta_p, monkeypatch):
    starts = {}
    real_train_epoch = main_imp_pretrain.train_epoch

    def spy(model, loader, optimizer, **kw):
        run = "none" if current.name == "rewind_none" else "theta_p"
        starts.setdefault(run, []).append({k: v.detach().clone() for k, v in model.state_dict().items()})
        stats = real_train_epoch(model, loader, optimizer, **kw)
        starts[run].append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return stats

    monkeypatch.setattr(main_imp_pretrain, "train_epoch", spy)
    runs = {}
    for variant in ("theta_p", "none"):
        current = tmp_path / f"rewind_{variant}"
        runs[variant] = current
        main_imp_pretrain.main(stage1(theta_p, current, "--method", "imp", "--lr", "0.05", "--rewind", variant))
    # rounds 1 and 2 choose their masks from θ_p and from round 1's re-training, the same in both
    # variants; round 2's re-training starts from different weights, so round 3's mask differs
    assert same(masks(runs["none"], 1), masks(runs["theta_p"], 1))
    assert same(masks(runs["none"], 2), masks(runs["theta_p"], 2))
    assert not same(masks(runs["none"], 3), masks(runs["theta_p"], 3))
    # [start r1, end r1, start r2, end r2]: without rewinding, round 2 starts where round 1 ended
    # (masked), BatchNorm buffers included
    end1, start2 = starts["none"][1], starts["none"][2]
    mask2 = masks(runs["none"], 2)
    for name, value in end1.items():
        expected = value * mask2[name] if name in mask2 else value
        assert torch.equal(start2[name], expected), name
    theta = starts["theta_p"][0]
    assert any(not torch.equal(start2[n], theta[n]) for n in theta if n.endswith("running_mean"))
    for variant, rewind in (("theta_p", "theta_p"), ("none", "none")):
        ticket = pruning_utils.load_ticket(runs[variant] / "tickets" / "round_03.pt")
        assert ticket["method"] == "imp" and ticket["rewind"] == rewind
    config = json.loads((runs["none"] / "config.json").read_text())
    assert config["rewind"] == "none"
    # the variant is part of the configuration: switching it in the same directory is refused
    with pytest.raises(UserError, match="rewind"):
        main_imp_pretrain.main(stage1(theta_p, runs["none"], "--method", "imp", "--lr", "0.05"))


def test_trained_batchnorm_of_another_arch_is_refused_naming_the_keys():
    base = models.build_model("resnet_tiny", 5, cifar_stem=True)
    saved = lmp._bn_state(base)
    lmp.check_bn_keys(saved, base)  # its own: accepted
    fewer = {k: v for k, v in saved.items() if not k.startswith("layer4.")}
    with pytest.raises(UserError, match=r"missing keys: layer4\..*another --arch"):
        lmp.check_bn_keys(fewer, base)
    other = lmp._bn_state(models.build_model("resnet18", 5, cifar_stem=True))
    with pytest.raises(UserError, match="unexpected keys: .*another --arch"):
        lmp.check_bn_keys(other, base)
