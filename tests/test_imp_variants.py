"""Issue 24: IMP rewinding to epoch K of the first re-training round, and stage 2's random
re-initialisation ablation, each a family (verdict row) of its own; digits and resnet_tiny."""

import json

import pytest
import torch

import main_downstream
import main_imp_pretrain
import pruning_utils as pu
from analysis.table import verdict_rows
from tests.test_downstream import TINY, make_ticket
from tests.test_lmp import stage1, theta_p  # noqa: F401  (theta_p: the fixture)
from utils.checkpoint import safe_load
from utils.errors import UserError

CONV = "layer1.0.conv1.weight"


def test_rewind_epoch_k_restarts_later_rounds_from_round_one_epoch_k(tmp_path, theta_p, monkeypatch):  # noqa: F811
    starts = []  # (round, epoch, weights of CONV as each epoch starts)
    real = main_imp_pretrain.train_epoch

    def spy(model, loader, optimizer, **kw):
        plain = model.module if hasattr(model, "module") else model
        starts.append((kw["desc"].split()[1], kw["desc"].split()[3], dict(plain.named_parameters())[CONV].detach().clone()))
        return real(model, loader, optimizer, **kw)

    monkeypatch.setattr(main_imp_pretrain, "train_epoch", spy)
    out = tmp_path / "rew"
    main_imp_pretrain.main(stage1(theta_p, out, "--method", "imp", "--rewind", "epoch_1", "--epochs-per-round", "2",
                                  "--lr", "0.05"))
    by = {(r, e): w for r, e, w in starts}
    after_epoch_1 = by[("1/3", "2/2")]  # round 1, as its second epoch starts
    mask2 = pu.load_ticket(out / "tickets" / "round_02.pt")["masks"][CONV]
    assert torch.equal(by[("2/3", "1/2")], after_epoch_1 * mask2)
    assert not torch.equal(after_epoch_1, by[("1/3", "1/2")])  # epoch 1 did move the weights
    assert pu.load_ticket(out / "tickets" / "round_02.pt")["rewind"] == "epoch_1"
    assert json.loads((out / "config.json").read_text())["rewind"] == "epoch_1"


@pytest.mark.parametrize("argv, message", [
    (("--rewind", "epoch_3", "--epochs-per-round", "2"), "at least that many --epochs-per-round"),
    (("--rewind", "epoch_0"), "is not theta_p, none or epoch_K"),
])
def test_bad_rewind_epochs_are_refused(tmp_path, theta_p, argv, message):  # noqa: F811
    with pytest.raises(UserError, match=message):
        main_imp_pretrain.parse_args(stage1(theta_p, tmp_path / "x", "--method", "imp", *argv))


def test_each_variant_is_its_own_verdict_row(tmp_path, theta_p):  # noqa: F811
    rew = tmp_path / "stage1"
    main_imp_pretrain.main(stage1(theta_p, rew, "--method", "imp", "--rewind", "epoch_1", "--rounds", "2"))
    ticket, init, _ = make_ticket(tmp_path, sparsity=20.0, num_classes=3)
    common = ["--dataset", "digits", "--classes", "0-2", "--init", init, "--pretrain", "at", "--regime", "st",
              "--epochs", "1", "--test-steps", "0", *TINY]
    runs = tmp_path / "runs"
    for name, extra in (("imp", ["--ticket", ticket]), ("reinit", ["--ticket", ticket, "--random-reinit"]),
                        ("rew1", ["--ticket", rew / "tickets" / "round_02.pt"])):
        main_downstream.main([str(a) for a in common + extra + ["--save-dir", runs / name, "--save-trajectory"]])
    config = json.loads((runs / "reinit" / "results.json").read_text())["config"]
    assert config["random_reinit"] is True and json.loads((runs / "imp" / "results.json").read_text())["config"].get(
        "random_reinit") is None
    # the ablation starts from fresh weights under the same mask; the plain run from θ_p under it
    theta = safe_load(init)["state_dict"][CONV]
    mask = pu.load_ticket(ticket)["masks"][CONV]
    assert torch.equal(safe_load(runs / "imp" / "trajectory" / "start.pt")[CONV], theta * mask)
    fresh = safe_load(runs / "reinit" / "trajectory" / "start.pt")[CONV]
    assert not torch.equal(fresh, theta * mask) and torch.count_nonzero(fresh[~mask]) == 0
    assert sorted(r["method"] for r in verdict_rows([runs])) == ["imp", "imp-reinit", "imp-rew1"]


def test_linear_eval_takes_the_fixed_feature_recipe_and_flags_win():
    from training import downstream_args as da

    base = ["--dataset", "digits", "--init", "none", "--save-dir", "unused", "--regime", "st"]
    for regime in ("st", "at"):
        args = da.parse_args(base[:-1] + [regime, "--linear-eval"])
        da.resolve_defaults(args)
        got = {k: getattr(args, k) for k in da.LINEAR_EVAL_DEFAULTS}
        assert got == {"lr": 0.01, "batch_size": 64, "epochs": 150, "milestones": [50, 100], "schedule": "step",
                       "weight_decay": 5e-4}, regime
    args = da.parse_args(base + ["--linear-eval", "--lr", "0.1"])
    da.resolve_defaults(args)
    assert (args.lr, args.epochs) == (0.1, 150)
    args = da.parse_args(base)
    da.resolve_defaults(args)
    assert args.lr == 0.001  # full fine-tuning keeps the paper's rate
