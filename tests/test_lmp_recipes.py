"""Issue 24: LMP recipes as presets (--lmp-recipe hydra / frozen-global) on resnet_tiny and digits."""

import json

import pytest
import torch

import main_imp_pretrain
import models
import pruning_utils
from masks.learned import ScoredNetwork
from tests.test_lmp import masks, stage1, theta_p  # noqa: F401  (theta_p: the fixture)
from utils.errors import UserError


def test_hydra_masks_each_layer_to_the_target_on_its_own(tmp_path, theta_p):  # noqa: F811
    out = tmp_path / "hydra"
    main_imp_pretrain.main(stage1(theta_p, out, "--method", "lmp", "--lmp-recipe", "hydra", "--rounds", "2",
                                  "--epochs-per-round", "1", "--lr", "0.5"))
    config = json.loads((out / "config.json").read_text())
    assert (config["lmp_recipe"], config["layerwise"], config["score_rank"], config["train_bn"]) == \
        ("hydra", True, "abs", True)
    assert (config["lr"], config["epochs_per_round"], config["batch_size"], config["weight_decay"]) == (0.5, 1, 32, 1e-4)
    for k, target in ((1, 0.20), (2, 0.36)):
        m = masks(out, k)
        for name, layer in m.items():
            pruned = layer.numel() - int(layer.sum())
            assert pruned == pruning_utils.imp_pruned_count(layer.numel(), k, 0.2), (name, k)
        assert abs(1 - sum(int(v.sum()) for v in m.values()) / sum(v.numel() for v in m.values()) - target) < 0.01


def test_frozen_global_is_the_default_and_differs_from_hydra_per_layer(tmp_path, theta_p):  # noqa: F811
    out = tmp_path / "default"
    main_imp_pretrain.main(stage1(theta_p, out, "--method", "lmp", "--rounds", "1", "--epochs-per-round", "0",
                                  trains=False))
    config = json.loads((out / "config.json").read_text())
    assert config.get("lmp_recipe") is None and config.get("train_bn") is None and config["layerwise"] is False
    per_layer = {n: 1 - float(v.float().mean()) for n, v in masks(out, 1).items()}
    # the √(6/fan_in) factor spreads a global top-k unevenly over layers of different fan-in
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05


def test_trained_batchnorm_moves_only_with_train_bn():
    torch.manual_seed(0)
    base = models.build_model("resnet_tiny", 3, cifar_stem=True)
    names = pruning_utils.prunable_names(base)
    x = torch.randn(8, 3, 16, 16)
    for train_bn in (False, True):
        net = ScoredNetwork(base if not train_bn else __import__("copy").deepcopy(base), names,
                            {n: 1 for n in names}, rank="abs", train_bn=train_bn).train()
        bn = next(m for m in net.base.modules() if isinstance(m, torch.nn.BatchNorm2d))
        mean = bn.running_mean.clone()
        net(x).sum().backward()
        assert (not torch.equal(mean, bn.running_mean)) == train_bn
        assert (bn.weight.grad is not None) == train_bn
        assert len(net.trainable()) == len(names) + (2 * sum(isinstance(m, torch.nn.BatchNorm2d)
                                                                for m in base.modules()) if train_bn else 0)


def test_freeze_bn_needs_the_hydra_recipe(tmp_path, theta_p):  # noqa: F811
    with pytest.raises(UserError, match="--freeze-bn applies to --lmp-recipe hydra"):
        main_imp_pretrain.parse_args(stage1(theta_p, tmp_path / "x", "--method", "lmp", "--freeze-bn"))
    args = main_imp_pretrain.parse_args(stage1(theta_p, tmp_path / "y", "--method", "lmp", "--lmp-recipe", "hydra",
                                               "--freeze-bn", "--retrain", "at"))
    assert (args.train_bn, args.attack_steps, args.layerwise) == (False, 10, True)
    with pytest.raises(UserError, match="applies only to --method lmp"):
        main_imp_pretrain.parse_args(stage1(theta_p, tmp_path / "z", "--method", "imp", "--lmp-recipe", "hydra"))


def test_channel_lmp_learns_whole_filters_per_layer(tmp_path, theta_p):  # noqa: F811
    from masks.channel import alive_filters, alive_inputs, channel_groups

    out = tmp_path / "channel"
    main_imp_pretrain.main(stage1(theta_p, out, "--method", "lmp", "--lmp-recipe", "hydra", "--pattern", "channel",
                                  "--rounds", "2"))
    ticket = pruning_utils.load_ticket(out / "tickets" / "round_02.pt")
    assert ticket["pattern"] == "channel"
    groups = channel_groups(list(ticket["masks"]))
    assert groups
    for g in groups:
        m = ticket["masks"][g.conv]
        alive = alive_filters(m)
        n = alive.numel()
        assert int(alive.sum()) == max(1, n - pruning_utils.imp_pruned_count(n, 2, 0.2)), g.conv
        assert bool(m[alive].all())  # whole filters: a kept filter keeps every weight it had
        assert torch.equal(alive_inputs(ticket["masks"][g.next]), alive)  # the removed filters' inputs go too


def test_hydra_resumes_mid_level_with_its_trained_batchnorm(tmp_path, theta_p, monkeypatch):  # noqa: F811
    """Killed mid-epoch and rerun, a hydra level ends with the uninterrupted run's mask: the
    checkpoint carries the BatchNorm the level trained, not θ_p's."""
    from training import lmp

    flags = ("--method", "lmp", "--lmp-recipe", "hydra", "--rounds", "1", "--epochs-per-round", "2", "--lr", "2")
    straight = tmp_path / "straight"
    main_imp_pretrain.main(stage1(theta_p, straight, *flags))
    real = lmp.train_epoch

    class Killed(Exception):
        pass

    def spy(model, loader, optimizer, **kw):
        if kill and kw["desc"].startswith("lmp level 1/1 epoch 2"):
            save = kw["step_hook"]

            def hook(step, carry_fn):
                save(step, carry_fn)
                if step >= 2:
                    raise Killed

            kw["step_hook"] = hook
        return real(model, loader, optimizer, **kw)

    monkeypatch.setattr(lmp, "train_epoch", spy)
    out, kill = tmp_path / "killed", True
    argv = stage1(theta_p, out, *flags, "--checkpoint-minutes", "1e-9")
    with pytest.raises(Killed):
        main_imp_pretrain.main(argv)
    kill = False
    main_imp_pretrain.main(argv)
    a, b = masks(out, 1), masks(straight, 1)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
