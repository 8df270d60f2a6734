"""Tests for attacks.py: threat-model constraints, side effects on the model, agreement with
torchattacks, and the evaluation helpers."""

import math

import pytest
import torch
import torch.distributed as dist
import torchattacks
import torchvision
from sklearn.datasets import load_digits
from torch import nn

import attacks
from attacks import (
    ThreatModel,
    attack_accuracy,
    autoattack_eval,
    fgsm_rs_attack,
    parse_fraction,
    pgd_attack,
    transfer_attack,
)
from utils.errors import UserError

EPS = 8 / 255
ALPHA = 2 / 255


class SmallCNN(nn.Module):
    """Conv + BN + dropout: enough structure to see mode and running-stat changes."""

    def __init__(self, num_classes=3, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Linear(8, num_classes)
        self.seen_training = []

    def forward(self, x):
        self.seen_training.append(self.training)
        x = torch.relu(self.bn(self.conv(x)))
        x = self.drop(x).mean(dim=(2, 3))
        return self.fc(x)


def _batch(n=4, size=16, channels=3, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, size, size, generator=g),
            torch.randint(0, classes, (n,), generator=g))


@pytest.fixture(scope="module")
def digits():
    """A small MLP trained for a moment on sklearn's bundled 8x8 digits, plus held-out data."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_x, train_y, test_x, test_y = x[:1400], y[:1400], x[1400:1528], y[1400:1528]
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(train_x), train_y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model, test_x, test_y


def _accuracy(model, x, y):
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


# ---------------------------------------------------------------- parse_fraction


@pytest.mark.parametrize("text, expected", [
    ("8/255", 8 / 255), ("2/255", 2 / 255), ("0.0314", 0.0314), (0.0314, 0.0314),
    (" 8 / 255 ", 8 / 255), ("0", 0.0), (1, 1.0), ("1e-2", 0.01), (".5", 0.5),
    ("0.5/2", 0.25),
])
def test_parse_fraction_accepts(text, expected):
    assert parse_fraction(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text", [
    "8//255", "abc", "1/0", "-0.1", -0.1, "8/255/2", "", "nan", "inf", float("inf"),
    float("nan"), "__import__('os')", "8/-255", True, None, [8, 255], "1e999",
])
def test_parse_fraction_rejects(text):
    with pytest.raises(UserError) as info:
        parse_fraction(text, name="eps")
    message = str(info.value)
    assert repr(text) in message and "8/255" in message and "0.0314" in message


# ---------------------------------------------------------------- constraints


@pytest.mark.parametrize("random_start", [True, False])
def test_linf_result_in_ball_and_image_range(random_start):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, y = _batch()
    x_before = x.clone()
    adv = pgd_attack(model, x, y, EPS, ALPHA, steps=5, random_start=random_start)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert torch.equal(x, x_before)  # the caller's batch is not touched
    assert (adv - x).abs().max() <= EPS + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() > EPS / 2  # it actually moved


@pytest.mark.parametrize("random_start", [True, False])
def test_l2_result_in_ball_and_image_range(random_start):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, y = _batch()
    eps = 0.5
    adv = pgd_attack(model, x, y, eps, 0.2, steps=5, random_start=random_start, norm="l2")
    norms = (adv - x).flatten(1).norm(dim=1)
    assert (norms <= eps + 1e-5).all()
    assert norms.min() > 0.2  # each example moved, not only the batch as a whole
    assert adv.min() >= 0 and adv.max() <= 1


def test_zero_steps_without_random_start_returns_the_images():
    model = SmallCNN().eval()
    x, y = _batch()
    assert torch.equal(pgd_attack(model, x, y, EPS, ALPHA, 0, random_start=False), x)


def test_fgsm_rs_in_ball_and_is_one_random_start_pgd_step():
    model = SmallCNN().eval()
    x, y = _batch()
    torch.manual_seed(3)
    adv = fgsm_rs_attack(model, x, y, EPS, 1.25 * EPS)
    assert (adv - x).abs().max() <= EPS + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    torch.manual_seed(3)
    same = pgd_attack(model, x, y, EPS, 1.25 * EPS, 1, random_start=True)
    assert torch.equal(adv, same)


def test_attacks_lower_accuracy_of_trained_model(digits):
    model, x, y = digits
    clean = _accuracy(model, x, y)
    assert clean > 85
    torch.manual_seed(0)
    linf = _accuracy(model, pgd_attack(model, x, y, 0.1, 0.025, 10), y)
    l2 = _accuracy(model, pgd_attack(model, x, y, 1.0, 0.25, 10, norm="l2"), y)
    fgsm = _accuracy(model, fgsm_rs_attack(model, x, y, 0.1, 0.125), y)
    assert linf < clean - 30
    assert l2 < clean - 30
    assert fgsm < clean - 20
    assert linf <= fgsm + 5  # ten steps are no weaker than one


def test_more_steps_give_higher_loss(digits):
    model, x, y = digits
    losses = []
    for steps in (0, 1, 10):
        adv = pgd_attack(model, x, y, 0.1, 0.02, steps, random_start=False)
        with torch.no_grad():
            losses.append(nn.functional.cross_entropy(model(adv), y).item())
    assert losses[0] < losses[1] < losses[2]


def test_custom_loss_fn_is_maximised(digits):
    model, x, y = digits
    target = torch.zeros_like(y)

    def towards_zero(logits, labels):  # a targeted attack: maximise -CE to class 0
        return -nn.functional.cross_entropy(logits, target)

    adv = pgd_attack(model, x, y, 0.2, 0.02, 20, loss_fn=towards_zero)
    with torch.no_grad():
        assert (model(x).argmax(1) == 0).float().mean() < 0.2
        assert (model(adv).argmax(1) == 0).float().mean() > 0.5


# ---------------------------------------------------------------- agreement with torchattacks


@pytest.mark.parametrize("random_start", [False, True])
def test_linf_matches_torchattacks_pgd(random_start):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, y = _batch(n=8)
    torch.manual_seed(11)
    ours = pgd_attack(model, x, y, EPS, ALPHA, 7, random_start=random_start)
    torch.manual_seed(11)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=7,
                              random_start=random_start)(x, y)
    assert not torch.equal(theirs, x)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_l2_matches_torchattacks_pgdl2():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, y = _batch(n=8)
    ours = pgd_attack(model, x, y, 0.5, 0.1, 7, random_start=False, norm="l2")
    theirs = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=7, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_resnet18_matches_torchattacks_pgd():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x, y = _batch()
    ours = pgd_attack(model, x, y, EPS, ALPHA, 3, random_start=False)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=3, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- side effects on the model


def test_parameter_grads_neither_created_nor_changed():
    torch.manual_seed(0)
    model = SmallCNN().train()
    x, y = _batch()
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.5)
    for attack in (lambda: pgd_attack(model, x, y, EPS, ALPHA, 3),
                   lambda: pgd_attack(model, x, y, 0.5, 0.1, 3, norm="l2"),
                   lambda: fgsm_rs_attack(model, x, y, EPS, ALPHA)):
        attack()
        for name, p in model.named_parameters():
            if name == "fc.weight":
                assert torch.equal(p.grad, torch.full_like(p, 0.5))
            else:
                assert p.grad is None, name


def test_requires_grad_flags_restored_including_frozen():
    model = SmallCNN().eval()
    model.conv.weight.requires_grad_(False)  # frozen by the user: must stay frozen
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = _batch()
    pgd_attack(model, x, y, EPS, ALPHA, 2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert before["conv.weight"] is False and before["fc.weight"] is True


def test_requires_grad_restored_when_the_attack_fails():
    model = SmallCNN().eval()
    x, _ = _batch()
    with pytest.raises(IndexError):
        pgd_attack(model, x, torch.tensor([0, 1, 2, 7]), EPS, ALPHA, 2)  # label out of range
    assert all(p.requires_grad for p in model.parameters())


def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("bn_mode", [None, "eval", "train"])
@pytest.mark.parametrize("setup", ["train", "eval", "mixed"])
def test_train_eval_mode_restored(bn_mode, setup):
    model = SmallCNN()
    model.train(setup == "train")
    if setup == "mixed":
        model.train()
        model.bn.eval()  # e.g. frozen BN during fine-tuning
    before = _modes(model)
    x, y = _batch()
    model.seen_training.clear()
    pgd_attack(model, x, y, EPS, ALPHA, 2, bn_mode=bn_mode)
    assert _modes(model) == before
    expected = model.training if bn_mode is None else bn_mode == "train"
    assert model.seen_training == [expected, expected]


def test_mixed_mode_kept_during_attack_when_bn_mode_none():
    model = SmallCNN().train()
    model.bn.eval()
    stats = model.bn.running_mean.clone()
    x, y = _batch()
    pgd_attack(model, x, y, EPS, ALPHA, 2)
    assert torch.equal(model.bn.running_mean, stats)  # its BN stayed in eval mode


@pytest.mark.parametrize("start_mode", ["train", "eval"])
def test_bn_mode_train_updates_running_stats_and_eval_does_not(start_mode):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).train(start_mode == "train")
    x, y = _batch()
    stats = model.bn1.running_mean.clone()
    batches = model.bn1.num_batches_tracked.clone()
    pgd_attack(model, x, y, EPS, ALPHA, 2, bn_mode="eval")
    assert torch.equal(model.bn1.running_mean, stats)
    assert torch.equal(model.bn1.num_batches_tracked, batches)
    pgd_attack(model, x, y, EPS, ALPHA, 2, bn_mode="train")
    assert not torch.equal(model.bn1.running_mean, stats)
    assert model.bn1.num_batches_tracked == batches + 2
    assert model.training == (start_mode == "train")


def test_bn_mode_changes_the_result():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, y = _batch()
    with torch.no_grad():  # make running stats differ clearly from one batch's statistics
        model.bn.running_mean.fill_(3.0)
    a = pgd_attack(model, x, y, EPS, ALPHA, 3, random_start=False, bn_mode="eval")
    b = pgd_attack(model, x, y, EPS, ALPHA, 3, random_start=False, bn_mode="train")
    assert not torch.equal(a, b)


# ---------------------------------------------------------------- calling contexts


def test_works_under_bfloat16_autocast():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv = pgd_attack(model, x, y, EPS, ALPHA, 3)
        fast = fgsm_rs_attack(model, x, y, EPS, ALPHA)
    for out in (adv, fast):
        assert out.dtype == torch.float32 and not out.requires_grad
        assert torch.isfinite(out).all()
        assert (out - x).abs().max() <= EPS + 1e-6
        assert out.min() >= 0 and out.max() <= 1
    with torch.no_grad():
        clean_loss = nn.functional.cross_entropy(model(x), y)
        adv_loss = nn.functional.cross_entropy(model(adv), y)
    assert adv_loss > clean_loss
    assert all(p.grad is None for p in model.parameters())


def test_works_under_no_grad_and_inference_mode():
    model = SmallCNN().eval()
    x, y = _batch()
    reference = pgd_attack(model, x, y, EPS, ALPHA, 3, random_start=False)
    with torch.no_grad():
        assert torch.equal(pgd_attack(model, x, y, EPS, ALPHA, 3, random_start=False),
                           reference)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        adv = pgd_attack(model, xi, yi, EPS, ALPHA, 3, random_start=False)
    assert torch.equal(adv, reference)
    assert torch.is_grad_enabled()


def test_ddp_wrapped_model_is_attacked_through_its_module(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        model = SmallCNN()
        wrapped = nn.parallel.DistributedDataParallel(model)
        wrapped.eval()
        x, y = _batch()
        via_ddp = pgd_attack(wrapped, x, y, EPS, ALPHA, 3, random_start=False)
        direct = pgd_attack(model, x, y, EPS, ALPHA, 3, random_start=False)
        assert torch.equal(via_ddp, direct)
        assert all(p.grad is None and p.requires_grad for p in wrapped.parameters())
        assert not wrapped.training and not model.training
    finally:
        dist.destroy_process_group()


def test_threat_model_attack_matches_function():
    model = SmallCNN().eval()
    x, y = _batch()
    threat = ThreatModel(norm="L2", eps="1/2", alpha=0.1, steps=3)
    assert threat.norm == "l2" and threat.eps == 0.5
    torch.manual_seed(5)
    a = threat.attack(model, x, y)
    torch.manual_seed(5)
    b = pgd_attack(model, x, y, 0.5, 0.1, 3, norm="l2")
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [
    dict(norm="l1"), dict(bn_mode="training"), dict(eps=-0.1), dict(alpha="2//255"),
    dict(steps=-1), dict(steps=2.5), dict(steps=True),
])
def test_bad_arguments_raise_user_error(kwargs):
    model = SmallCNN().eval()
    x, y = _batch()
    args = dict(eps=EPS, alpha=ALPHA, steps=2)
    args.update(kwargs)
    with pytest.raises(UserError):
        pgd_attack(model, x, y, **args)
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training


def test_integer_images_rejected():
    model = SmallCNN().eval()
    with pytest.raises(UserError, match="float"):
        pgd_attack(model, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2).long(),
                   EPS, ALPHA, 1)


def test_threat_model_validates():
    with pytest.raises(UserError):
        ThreatModel(norm="l0")
    with pytest.raises(UserError):
        ThreatModel(eps="eight")


def test_training_and_evaluation_attacks_are_threat_models_of_the_regime():
    model = SmallCNN()
    x, y = _batch()
    assert attacks.training_attack("st", EPS, ALPHA, 3) is None
    assert attacks.evaluation_attack(EPS, ALPHA, 0) is None
    pgd = attacks.training_attack("at", EPS, ALPHA, 3)
    fast = attacks.training_attack("fat", EPS, 1.25 * EPS, 3, bn_mode="eval")
    test = attacks.evaluation_attack(EPS, ALPHA, 5)
    assert (pgd.steps, pgd.bn_mode, fast.steps, fast.bn_mode) == (3, "train", 1, "eval")
    assert (test.steps, test.bn_mode, test.random_start, test.norm) == (5, "eval", True, "linf")
    for threat, reference in ((pgd, lambda: pgd_attack(model, x, y, EPS, ALPHA, 3, bn_mode="train")),
                              (fast, lambda: fgsm_rs_attack(model, x, y, EPS, 1.25 * EPS, bn_mode="eval")),
                              (test, lambda: pgd_attack(model, x, y, EPS, ALPHA, 5, bn_mode="eval"))):
        torch.manual_seed(7)
        got = threat(model, x, y)
        torch.manual_seed(7)
        assert torch.equal(got, reference())
    with pytest.raises(UserError, match="regime"):
        attacks.training_attack("trades", EPS, ALPHA, 3)


def test_one_rule_for_unset_attack_sizes():
    eps = 8 / 255
    assert attacks.resolve_sizes("at", eps) == (eps / 4, eps, eps / 4)
    assert attacks.resolve_sizes("st", eps) == (eps / 4, eps, eps / 4)
    assert attacks.resolve_sizes("fat", eps) == (1.25 * eps, eps, eps / 4)
    assert attacks.resolve_sizes("fat", eps, 0.01, 4 / 255) == (0.01, 4 / 255, 1 / 255)
    assert attacks.resolve_sizes("at", eps, 0.01, 4 / 255, 0.002) == (0.01, 4 / 255, 0.002)


# ---------------------------------------------------------------- evaluation helpers


def _split(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def test_attack_accuracy_clean_and_attacked(digits):
    model, x, y = digits
    model.train()
    try:
        clean = attack_accuracy(model, _split(x, y, 50))
        assert clean == pytest.approx(_accuracy(model.eval(), x, y))
        model.train()
        robust = attack_accuracy(
            model, _split(x, y, 50),
            lambda m, xb, yb: pgd_attack(m, xb, yb, 0.1, 0.025, 10))
        assert model.training
    finally:
        model.eval()
    assert 0 <= robust < clean - 30


def test_attack_accuracy_rejects_empty():
    with pytest.raises(UserError, match="no images"):
        attack_accuracy(SmallCNN(), [])


def test_transfer_attack(digits):
    model, x, y = digits
    torch.manual_seed(0)
    stranger = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).train()
    batches = _split(x, y, 64)
    torch.manual_seed(1)
    result = transfer_attack(model, {"same": model, "stranger": stranger}, batches,
                             0.1, 0.025, 10)
    assert set(result) == {"source", "same", "stranger"}
    assert all(0 <= v <= 100 for v in result.values())
    assert result["same"] == result["source"]  # the same network scores the same images
    assert result["source"] < _accuracy(model, x, y) - 30
    assert stranger.training and not model.training
    torch.manual_seed(1)
    white_box = attack_accuracy(model, batches,
                                lambda m, xb, yb: pgd_attack(m, xb, yb, 0.1, 0.025, 10))
    assert white_box == pytest.approx(result["source"])
    with pytest.raises(UserError, match="source"):
        transfer_attack(model, {"source": stranger}, batches, 0.1, 0.025, 1)


def test_autoattack_eval_custom_suite(digits):
    model, x, y = digits
    model.train()
    rng = torch.get_rng_state()
    try:
        robust = autoattack_eval(model, _split(x[:64], y[:64], 32), 0.1,
                                 attacks=["apgd-ce", "apgd-t"], steps=20)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    clean = _accuracy(model, x[:64], y[:64])
    assert 0 <= robust < clean - 30
    # at least as strong as PGD-10 at the same budget on these images
    torch.manual_seed(0)
    pgd = _accuracy(model, pgd_attack(model, x[:64], y[:64], 0.1, 0.025, 10), y[:64])
    assert robust <= pgd + 5


def test_autoattack_eval_standard_large_eps(digits):
    model, x, y = digits
    # At this budget APGD-CE breaks every image, so the suite stops early: fast.
    robust = autoattack_eval(model, [(x[:16], y[:16])], 0.3, n_classes=10)
    assert robust == 0.0


@pytest.mark.slow
def test_autoattack_eval_standard_full_suite(digits):
    model, x, y = digits
    threads = torch.get_num_threads()
    # Thousands of tiny Square/FAB steps: thread hand-offs would cost more than the maths.
    torch.set_num_threads(1)
    try:
        robust = autoattack_eval(model, [(x[:8], y[:8])], "8/255", n_classes=10)
    finally:
        torch.set_num_threads(threads)
    assert 0 < robust <= _accuracy(model, x[:8], y[:8])


def test_autoattack_eval_l2_single_attack(digits):
    model, x, y = digits
    robust = autoattack_eval(model, [(x[:32], y[:32])], 1.0, norm="L2", attacks="apgd-ce",
                             steps=10)
    assert 0 <= robust < _accuracy(model, x[:32], y[:32]) - 30


@pytest.mark.parametrize("kwargs, match", [
    (dict(version="fast"), "version"),
    (dict(attacks=["apgd-ce", "pgd"]), "attacks"),
    (dict(n_classes=100), "n_classes"),
    (dict(norm="l1"), "norm"),
])
def test_autoattack_eval_rejects_bad_arguments(digits, kwargs, match):
    model, x, y = digits
    with pytest.raises(UserError, match=match):
        autoattack_eval(model, [(x[:4], y[:4])], EPS, **kwargs)
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_autoattack_eval_needs_enough_classes_for_targeted_dlr():
    model = SmallCNN(num_classes=3).eval()
    x, y = _batch()
    with pytest.raises(UserError, match="apgd-t"):
        autoattack_eval(model, [(x, y)], EPS)


def test_module_constants():
    assert attacks.NORMS == ("linf", "l2")
    assert math.isclose(ThreatModel().eps, 8 / 255)
