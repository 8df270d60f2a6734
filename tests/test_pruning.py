"""Tests for pruning_utils: mask math, enforcement during SGD, statistics and ticket files."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from torch.nn.utils import prune

import pruning_utils as pu
from masks import enforce
from utils.errors import UserError

# docs/protocol.md §1: sparsity after IMP round k, k = 1..19
PAPER_LEVELS = [20.00, 36.00, 48.80, 59.04, 67.23, 73.79, 79.03, 83.22, 86.58, 89.26, 91.41,
                93.13, 94.50, 95.60, 96.48, 97.19, 97.75, 98.20, 98.56]


class SmallNet(nn.Module):
    """Conv stem, a block, a 1x1 shortcut and a Linear head: ~170k conv weights, runs in ms."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.block = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1, bias=False), nn.ReLU(),
                                   nn.Conv2d(64, 64, 3, padding=1, bias=True))
        self.shortcut = nn.Conv2d(16, 64, 1, bias=False)
        self.conv_big = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.block(x) + self.shortcut(x))
        x = torch.relu(self.conv_big(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def _n_kept(mask):
    return sum(int(m.count_nonzero()) for m in mask.values())


def _n_pruned(mask):
    return sum(m.numel() - int(m.count_nonzero()) for m in mask.values())


def _torch_prune_mask(model, names, amount):
    """Mask from torch.nn.utils.prune.global_unstructured (the seed code's call), as bool."""
    modules = dict(model.named_modules())
    targets = [(modules[n[:-len(".weight")]], "weight") for n in names]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    return {n: modules[n[:-len(".weight")]].weight_mask.bool().clone() for n in names}


# --------------------------------------------------------------------------- names and masks

def test_prunable_names_resnet18_backbone_only(resnet18):
    names = pu.prunable_names(resnet18)
    convs = [n for n, m in resnet18.named_modules() if isinstance(m, nn.Conv2d)]
    assert names == [f"{n}.weight" for n in convs]
    assert len(names) == 20  # 17 convs + 3 downsample convs
    assert names[0] == "conv1.weight"
    assert "layer2.0.downsample.0.weight" in names
    assert not any(n.startswith("fc.") for n in names)
    assert pu.prunable_names(resnet18, include_stem=False) == names[1:]


def test_prunable_names_resnet50_and_unwrapping():
    model = torchvision.models.resnet50(num_classes=10)
    names = pu.prunable_names(model)
    assert len(names) == 53 and "layer4.0.downsample.0.weight" in names
    assert pu.prunable_names(nn.DataParallel(model)) == names


def test_full_mask_and_nonzero_mask():
    torch.manual_seed(0)
    model = SmallNet()
    mask = pu.full_mask(model)
    assert list(mask) == ["conv1.weight", "block.0.weight", "block.2.weight", "shortcut.weight",
                          "conv_big.weight"]
    assert all(m.dtype == torch.bool and bool(m.all()) for m in mask.values())
    assert mask["block.0.weight"].shape == (64, 16, 3, 3)
    assert "conv1.weight" not in pu.full_mask(model, include_stem=False)
    with torch.no_grad():
        model.shortcut.weight[:3] = 0
    nz = pu.mask_from_weights_nonzero(model)
    assert int((~nz["shortcut.weight"]).sum()) == 3 * 16
    assert bool(nz["conv1.weight"].all())


# --------------------------------------------------------------------------- magnitude pruning

@pytest.mark.slow  # torch.nn.utils.prune over 11M weights, twice: ~7 s on 2 cores
def test_global_magnitude_matches_torch_prune_two_rounds(resnet18):
    names = pu.prunable_names(resnet18)
    reference = copy.deepcopy(resnet18)
    mask1 = pu.global_magnitude_prune(resnet18.state_dict(), pu.full_mask(resnet18), 0.2)
    torch_mask1 = _torch_prune_mask(reference, names, 0.2)
    assert all(torch.equal(mask1[n], torch_mask1[n]) for n in names)
    n_total = sum(m.numel() for m in mask1.values())
    assert _n_pruned(mask1) == round(0.2 * n_total)

    # round 2: kept weights move (re-training), pruned weights are zero in both copies
    torch.manual_seed(1)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for n in names:
            orig = modules[n[:-len(".weight")]].weight_orig
            orig.add_(0.01 * torch.randn_like(orig))
            resnet18.get_parameter(n).copy_(orig)
    with torch.no_grad():
        reference.eval()(torch.zeros(1, 3, 32, 32))  # prune's forward pre-hook refreshes weight = orig * mask
    pu.apply_mask(resnet18, mask1)
    assert all(torch.equal(resnet18.get_parameter(n), modules[n[:-7]].weight) for n in names)
    mask2 = pu.global_magnitude_prune(resnet18.state_dict(), mask1, 0.2)
    torch_mask2 = _torch_prune_mask(reference, names, 0.2)
    assert all(torch.equal(mask2[n], torch_mask2[n]) for n in names)
    remaining1 = _n_kept(mask1)
    assert remaining1 - _n_kept(mask2) == round(0.2 * remaining1)
    assert pu.sparsity(mask2) == pytest.approx(36.0, abs=1e-4)


def test_pruned_weights_are_never_revived():
    torch.manual_seed(0)
    weights = {"a": torch.randn(8, 4, 3, 3), "b": torch.randn(4, 8, 1, 1)}
    mask = {"a": torch.rand(8, 4, 3, 3) > 0.5, "b": torch.ones(4, 8, 1, 1, dtype=torch.bool)}
    # pruned entries carry the LARGEST magnitudes: a reviving implementation would keep them
    big = {"a": torch.where(mask["a"], weights["a"], torch.full_like(weights["a"], 100.0)),
           "b": weights["b"]}
    for fn in (pu.global_magnitude_prune, pu.layerwise_magnitude_prune):
        new = fn(big, mask, 0.3)
        for n in mask:
            assert not bool((new[n] & ~mask[n]).any())
    zero = {"a": weights["a"] * mask["a"], "b": weights["b"]}
    assert all(torch.equal(pu.global_magnitude_prune(big, mask, 0.3)[n],
                           pu.global_magnitude_prune(zero, mask, 0.3)[n]) for n in mask)


def test_global_prune_removes_the_smallest_kept_weights():
    weights = {"x": torch.tensor([0.5, -0.1, 3.0, 0.0]).reshape(1, 1, 2, 2),
               "y": torch.tensor([-0.2, 2.0, 0.05, -4.0]).reshape(1, 1, 2, 2)}
    mask = {"x": torch.tensor([True, True, True, False]).reshape(1, 1, 2, 2),
            "y": torch.ones(1, 1, 2, 2, dtype=torch.bool)}
    new = pu.global_magnitude_prune(weights, mask, 3 / 7)  # 3 of the 7 kept: 0.05, -0.1, -0.2
    assert new["x"].reshape(-1).tolist() == [True, False, True, False]
    assert new["y"].reshape(-1).tolist() == [False, True, False, True]
    assert mask["x"].reshape(-1).tolist() == [True, True, True, False]  # input untouched


def test_ties_are_deterministic_and_exact_count():
    weights = {"a": torch.ones(4, 4, 3, 3), "b": torch.ones(2, 4, 3, 3)}
    mask = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    first = pu.global_magnitude_prune(weights, mask, 0.25)
    again = pu.global_magnitude_prune(weights, mask, 0.25)
    assert all(torch.equal(first[n], again[n]) for n in mask)
    assert _n_pruned(first) == round(0.25 * 216)


def test_tied_magnitudes_match_torch_prune():
    # coarsely quantised weights: thousands of ties straddle the pruning threshold
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.round(m.weight * 20) / 20)
    names = pu.prunable_names(model)
    reference = copy.deepcopy(model)
    ours = pu.global_magnitude_prune(model.state_dict(), pu.full_mask(model), 0.3)
    theirs = _torch_prune_mask(reference, names, 0.3)
    assert all(torch.equal(ours[n], theirs[n]) for n in names)
    total = sum(m.numel() for m in ours.values())
    assert _n_pruned(ours) == round(0.3 * total)


def test_layerwise_matches_torch_l1_per_layer():
    torch.manual_seed(0)
    model = SmallNet()
    reference = copy.deepcopy(model)
    mask = pu.layerwise_magnitude_prune(model.state_dict(), pu.full_mask(model), 0.3)
    modules = dict(reference.named_modules())
    for n, m in mask.items():
        module = modules[n[:-len(".weight")]]
        prune.l1_unstructured(module, "weight", amount=0.3)
        assert torch.equal(m, module.weight_mask.bool())
        assert int((~m).sum()) == round(0.3 * m.numel())


def test_random_prune_seeded_and_only_kept():
    mask = {"a": torch.rand(16, 8, 3, 3, generator=torch.Generator().manual_seed(3)) > 0.3,
            "b": torch.ones(8, 16, 1, 1, dtype=torch.bool)}
    kept = _n_kept(mask)
    one = pu.random_prune(mask, 0.5, torch.Generator().manual_seed(7))
    same = pu.random_prune(mask, 0.5, torch.Generator().manual_seed(7))
    other = pu.random_prune(mask, 0.5, torch.Generator().manual_seed(8))
    assert all(torch.equal(one[n], same[n]) for n in mask)
    assert not all(torch.equal(one[n], other[n]) for n in mask)
    assert kept - _n_kept(one) == round(0.5 * kept)
    assert not any(bool((one[n] & ~mask[n]).any()) for n in mask)
    # both layers lose weights: the choice is global, not confined to the first layer
    assert all(int((mask[n] & ~one[n]).sum()) > 0 for n in mask)


def test_bad_fraction_is_user_error():
    mask = {"a": torch.ones(2, 2, 1, 1, dtype=torch.bool)}
    with pytest.raises(UserError, match="fraction"):
        pu.global_magnitude_prune({"a": torch.ones(2, 2, 1, 1)}, mask, 1.5)
    with pytest.raises(UserError, match="bool"):
        pu.random_prune({"a": torch.ones(2, 2, 1, 1)}, 0.2)
    with pytest.raises(UserError, match="shape"):
        pu.global_magnitude_prune({"a": torch.ones(2, 2, 3, 3)}, mask, 0.2)


# --------------------------------------------------------------------------- IMP schedule / one-shot

def test_imp_sparsity_levels():
    assert [round(pu.imp_sparsity(k), 2) for k in range(1, 20)] == PAPER_LEVELS
    assert pu.imp_sparsity(0) == 0.0
    assert pu.imp_sparsity(2, rate=0.5) == pytest.approx(75.0)
    with pytest.raises(UserError):
        pu.imp_sparsity(-1)


@pytest.mark.slow  # ~1.3M weights, 19 rounds + 22 one-shot prunes: ~1 s idle, much more on a busy CPU
def test_19_imp_rounds_reach_paper_levels_and_one_shot_agrees():
    # ~1.3M weights, enough that count rounding cannot move the second decimal (97.185... is
    # close to the edge); distinct magnitudes so that nested pruning is tie-free
    shapes = {"conv1.weight": (64, 3, 7, 7), "layer1.conv.weight": (256, 256, 3, 3),
              "layer2.conv.weight": (256, 256, 3, 3), "layer3.conv.weight": (128, 128, 3, 3)}
    total = sum(int(np.prod(s)) for s in shapes.values())
    gen = torch.Generator().manual_seed(0)
    values = (torch.randperm(total, generator=gen) + 1).float() / total
    values = values * (torch.randint(0, 2, (total,), generator=gen) * 2 - 1)
    weights, start = {}, 0
    for name, shape in shapes.items():
        weights[name] = values[start:start + int(np.prod(shape))].reshape(shape)
        start += int(np.prod(shape))
    mask = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    for k in range(1, 20):
        previous = mask
        mask = pu.global_magnitude_prune(weights, mask, 0.2)
        assert not any(bool((mask[n] & ~previous[n]).any()) for n in mask)
        assert round(pu.sparsity(mask), 2) == PAPER_LEVELS[k - 1]
        imp_count = _n_pruned(mask)
        assert imp_count == pu.imp_pruned_count(total, k)

        one_shot = pu.prune_to_sparsity(weights, pu.imp_sparsity(k))
        one_shot_count = _n_pruned(one_shot)
        assert one_shot_count == round(pu.imp_sparsity(k) / 100 * total)
        # per-round rounding in IMP can differ from one-shot rounding by at most a weight or two
        assert abs(one_shot_count - imp_count) <= 2
        assert round(pu.sparsity(one_shot), 2) == PAPER_LEVELS[k - 1]

        if k in (1, 10, 19):
            # with weights unchanged between rounds, IMP is nested one-shot pruning: same mask
            exact = pu.prune_to_sparsity(weights, 100.0 * imp_count / total)
            assert all(torch.equal(exact[n], mask[n]) for n in mask)


def test_prune_to_sparsity_counts_and_base_mask():
    torch.manual_seed(0)
    model = SmallNet()
    weights = model.state_dict()
    total = sum(m.numel() for m in pu.full_mask(model).values())
    omp = pu.prune_to_sparsity(weights, 59.04)
    assert set(omp) == set(pu.prunable_names(model))  # fc.weight is 2-D: never pruned
    assert _n_pruned(omp) == round(0.5904 * total)
    rp = pu.prune_to_sparsity(weights, 59.04, method="random", generator=torch.Generator().manual_seed(0))
    assert _n_pruned(rp) == round(0.5904 * total)
    assert pu.mask_iou(omp, rp) < 0.9

    base = pu.full_mask(model, include_stem=False)
    base_total = sum(m.numel() for m in base.values())
    half = pu.prune_to_sparsity(weights, 50.0, base_mask=base)
    assert "conv1.weight" not in half
    more = pu.prune_to_sparsity(weights, 80.0, method="random", base_mask=half,
                                generator=torch.Generator().manual_seed(1))
    assert _n_pruned(more) == round(0.8 * base_total)
    assert not any(bool((more[n] & ~half[n]).any()) for n in half)
    with pytest.raises(UserError, match="below"):
        pu.prune_to_sparsity(weights, 10.0, base_mask=half)
    with pytest.raises(UserError, match="method"):
        pu.prune_to_sparsity(weights, 10.0, method="snip")
    with pytest.raises(UserError, match="percentage"):
        pu.prune_to_sparsity(weights, 120.0)


# --------------------------------------------------------------------------- keeping zeros at zero

def _train_steps(model, optimizer, steps, enforcer=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.rand(4, 3, 8, 8, generator=gen)
        y = torch.randint(0, 4, (4,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if enforcer is not None:
            enforcer.after_backward()
        optimizer.step()
        if enforcer is not None:
            enforcer.after_step()


def _pruned_values(model, mask):
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach()[~m] for n, m in mask.items()])


def test_mask_enforcer_keeps_pruned_weights_zero_under_momentum_and_decay():
    torch.manual_seed(0)
    model = SmallNet()
    # a dense warm-up leaves non-zero momentum buffers: masking gradients alone would not suffice
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    _train_steps(model, optimizer, 2)
    mask = pu.global_magnitude_prune(model.state_dict(), pu.full_mask(model), 0.5)
    unguarded = copy.deepcopy(model)
    unguarded_opt = torch.optim.SGD(unguarded.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    unguarded_opt.load_state_dict(optimizer.state_dict())

    pu.apply_mask(model, mask)
    pu.apply_mask(unguarded, mask)
    assert bool((_pruned_values(model, mask) == 0).all())
    kept_before = model.conv_big.weight.detach()[mask["conv_big.weight"]].clone()

    enforcer = pu.MaskEnforcer(model, mask)
    _train_steps(model, optimizer, 5, enforcer, seed=1)
    assert bool((_pruned_values(model, mask) == 0).all())
    assert not torch.equal(model.conv_big.weight.detach()[mask["conv_big.weight"]], kept_before)
    assert model.fc.weight.grad is not None and bool((model.fc.weight != 0).all())  # head untouched

    _train_steps(unguarded, unguarded_opt, 5, None, seed=1)
    assert int((_pruned_values(unguarded, mask) != 0).sum()) > 0


def test_mask_gradients_alone_from_fresh_optimizer():
    torch.manual_seed(0)
    model = SmallNet()
    mask = pu.random_prune(pu.full_mask(model), 0.6, torch.Generator().manual_seed(0))
    pu.apply_mask(model, mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.rand(4, 3, 8, 8, generator=gen)),
                                    torch.randint(0, 4, (4,), generator=gen)).backward()
        pu.mask_gradients(model, mask)
        assert bool((model.block[0].weight.grad[~mask["block.0.weight"]] == 0).all())
        optimizer.step()
    assert bool((_pruned_values(model, mask) == 0).all())


def test_mask_enforcer_follows_dtype_change():
    torch.manual_seed(0)
    model = SmallNet()
    mask = pu.random_prune(pu.full_mask(model), 0.5, torch.Generator().manual_seed(0))
    enforcer = pu.MaskEnforcer(model, mask)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    enforcer.after_step()
    assert bool((_pruned_values(model, mask) == 0).all())
    assert model.conv1.weight.dtype == torch.float64


def test_check_mask_fits_errors():
    model = SmallNet()
    good = pu.full_mask(model)
    pu.check_mask_fits(model, good)
    with pytest.raises(UserError, match="'layer9.weight' is not a parameter"):
        pu.check_mask_fits(model, dict(good, **{"layer9.weight": torch.ones(1, dtype=torch.bool)}))
    with pytest.raises(UserError, match="'shortcut.weight'.*shape"):
        pu.check_mask_fits(model, dict(good, **{"shortcut.weight": torch.ones(64, 16, 3, 3, dtype=torch.bool)}))
    with pytest.raises(UserError, match="'conv1.weight'.*bool"):
        pu.check_mask_fits(model, dict(good, **{"conv1.weight": torch.ones(16, 3, 3, 3)}))
    with pytest.raises(UserError):
        pu.apply_mask(model, {"nope.weight": torch.ones(1, dtype=torch.bool)})


# --------------------------------------------------------------------------- statistics

def test_statistics_on_hand_made_masks():
    a = torch.ones(2, 3, 2, 2, dtype=torch.bool)
    a[0, 0] = False               # one fully pruned kernel
    a[1, 2, 0, 0] = False         # one partially pruned kernel
    b = torch.tensor([True, False, False, False]).reshape(1, 1, 2, 2)
    mask = {"a": a, "b": b}
    # 24 + 4 weights, 5 + 3 pruned
    assert pu.sparsity(mask) == pytest.approx(100.0 * 8 / 28)
    assert pu.layer_sparsity(mask) == pytest.approx({"a": 100.0 * 5 / 24, "b": 75.0})
    assert pu.zero_kernels(mask) == {"a": (1, 6), "b": (0, 1)}
    assert pu.zero_kernels({"a": a, "fc": torch.zeros(3, 4, dtype=torch.bool)}) == {"a": (1, 6)}

    other = {"a": torch.ones(2, 3, 2, 2, dtype=torch.bool), "b": torch.tensor([True, True, False, False]).reshape(1, 1, 2, 2)}
    # intersection = 19 + 1 kept, union = 24 + 2
    assert pu.mask_iou(mask, other) == pytest.approx(20 / 26)
    assert pu.mask_iou(mask, mask) == 1.0
    with pytest.raises(UserError, match="different parameters"):
        pu.mask_iou(mask, {"a": a})
    with pytest.raises(UserError, match="shape"):
        pu.mask_iou(mask, {"a": a, "b": b.reshape(1, 1, 4, 1)})


# --------------------------------------------------------------------------- ticket files

def _ticket_mask():
    torch.manual_seed(0)
    model = SmallNet()
    return model, pu.global_magnitude_prune(model.state_dict(), pu.full_mask(model), 0.2)


def test_ticket_round_trip(tmp_path):
    _, mask = _ticket_mask()
    ticket = pu.make_ticket(mask, round=1, method="imp", retrain="at", arch="resnet50",
                            pretrain="fat", init="/weights/fat.pth", source_dataset="imagenet")
    assert ticket["format"] == "double-win-ticket" and ticket["version"] == 2
    assert ticket["pattern"] == "unstructured" and ticket["rewind"] == "theta_p" and "nm" not in ticket
    assert isinstance(ticket["sparsity"], float) and ticket["sparsity"] == 20.0
    path = tmp_path / "tickets" / "round_01.pt"
    pu.save_ticket(path, ticket)
    assert [p.name for p in path.parent.iterdir()] == ["round_01.pt"]  # no temp file left

    loaded = pu.load_ticket(path)
    assert set(loaded) == {"format", "version", "masks", "sparsity", "round", "method", "retrain",
                           "arch", "pretrain", "init", "source_dataset", "pattern", "rewind"}
    assert list(loaded["masks"]) == list(mask)
    assert all(torch.equal(loaded["masks"][n], mask[n]) and loaded["masks"][n].dtype == torch.bool
               for n in mask)
    assert {k: loaded[k] for k in ("round", "method", "retrain", "arch", "pretrain", "init",
                                   "source_dataset", "sparsity")} == {
        "round": 1, "method": "imp", "retrain": "at", "arch": "resnet50", "pretrain": "fat",
        "init": "/weights/fat.pth", "source_dataset": "imagenet", "sparsity": 20.0}

    plain = torch.load(path, weights_only=True)
    assert plain["format"] == "double-win-ticket"
    assert torch.equal(plain["masks"]["conv1.weight"], mask["conv1.weight"])


def test_make_ticket_rejects_bad_metadata():
    _, mask = _ticket_mask()
    meta = dict(round=1, method="imp", retrain="st", arch="resnet50", pretrain="std",
                init="x.pth", source_dataset="imagenet")
    with pytest.raises(UserError, match="method"):
        pu.make_ticket(mask, **dict(meta, method="lottery"))
    with pytest.raises(UserError, match="retrain"):
        pu.make_ticket(mask, **dict(meta, retrain="adv"))
    with pytest.raises(UserError, match="round"):
        pu.make_ticket(mask, **dict(meta, round=-2))
    omp = pu.make_ticket(mask, **dict(meta, method="omp", retrain=None))
    assert omp["retrain"] is None


def _write_raw(path, obj):
    torch.save(obj, path)
    return path


def test_load_ticket_validation_errors(tmp_path):
    _, mask = _ticket_mask()
    ticket = pu.make_ticket(mask, round=2, method="omp", retrain=None, arch="resnet50",
                            pretrain="std", init="x.pth", source_dataset="imagenet")
    float_masks = dict(ticket, masks={n: m.float() for n, m in mask.items()})
    with pytest.raises(UserError, match="not torch.bool"):
        pu.load_ticket(_write_raw(tmp_path / "float.pt", float_masks))
    with pytest.raises(UserError, match="not torch.bool"):
        pu.save_ticket(tmp_path / "never.pt", float_masks)
    assert not (tmp_path / "never.pt").exists()
    with pytest.raises(UserError, match="version"):
        pu.load_ticket(_write_raw(tmp_path / "v3.pt", dict(ticket, version=3)))
    with pytest.raises(UserError, match="format"):
        pu.load_ticket(_write_raw(tmp_path / "fmt.pt", dict(ticket, format="other")))
    missing = dict(ticket)
    del missing["arch"]
    with pytest.raises(UserError, match="arch"):
        pu.load_ticket(_write_raw(tmp_path / "missing.pt", missing))
    with pytest.raises(UserError, match="weight_mask"):
        pu.load_ticket(_write_raw(tmp_path / "dense.pt", {"conv1.weight": torch.ones(2)}))
    with pytest.raises(UserError, match="not a ticket dict"):
        pu.load_ticket(_write_raw(tmp_path / "list.pt", [torch.ones(2)]))
    with pytest.raises(UserError, match="does not exist"):
        pu.load_ticket(tmp_path / "absent.pt")


def _seed_state_dict(model, mask, prefix=""):
    """What the seed code's torch.nn.utils.prune reparametrisation puts in a state dict."""
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    for n, m in mask.items():
        prune.custom_from_mask(modules[n[:-len(".weight")]], "weight", m.float())
    state = {prefix + k: v for k, v in reference.state_dict().items()}
    return state


@pytest.mark.parametrize("layout", ["stage1", "raw", "ddp", "downstream"])
def test_load_ticket_reads_seed_checkpoints(tmp_path, layout):
    model, mask = _ticket_mask()
    if layout == "stage1":
        # main_std.py / main_adv.py: model.module.state_dict() plus bookkeeping, normalize buffers
        state = _seed_state_dict(model, mask)
        state["normalize.mean"] = torch.tensor([0.485, 0.456, 0.406])
        state["normalize.std"] = torch.tensor([0.229, 0.224, 0.225])
        obj = {"epoch": 10, "arch": "resnet18", "state_dict": state, "best_acc1": torch.tensor(71.2),
               "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
               "state_prune": 1, "init": model.state_dict()}
    elif layout == "raw":
        obj = _seed_state_dict(model, mask)
    elif layout == "ddp":
        obj = {"state_dict": _seed_state_dict(model, mask, prefix="module."),
               "best_prec1": np.float64(70.1)}
    else:
        # main_*_eval.py: nn.Sequential(normalize_layer, model) -> keys '0.mean', '1.conv1.weight_mask'
        state = _seed_state_dict(model, mask, prefix="1.")
        state["0.mean"] = torch.zeros(3)
        state["0.std"] = torch.ones(3)
        obj = {"state_dict": state, "best_sa": 80.0, "epoch": 100}
    path = _write_raw(tmp_path / "1-checkpoint.pth.tar", obj)
    ticket = pu.load_ticket(path)
    assert list(ticket["masks"]) == list(mask)
    assert all(torch.equal(ticket["masks"][n], mask[n]) and ticket["masks"][n].dtype == torch.bool
               for n in mask)
    assert ticket["method"] == "imp" and ticket["sparsity"] == 20.0
    # stage-1 files name their round; the others' round is read off the 20%-per-round level
    assert ticket["round"] == 1 and isinstance(ticket["round"], int)
    assert ticket["retrain"] is None and ticket["arch"] == "unknown"
    pu.check_mask_fits(model, ticket["masks"])
    # the imported ticket re-saves in the project's own format
    pu.save_ticket(tmp_path / "converted.pt", ticket)
    assert torch.load(tmp_path / "converted.pt", weights_only=True)["format"] == "double-win-ticket"


def test_seed_mask_with_non_binary_values_is_refused(tmp_path):
    path = _write_raw(tmp_path / "bad.pth.tar",
                      {"state_dict": {"conv1.weight_mask": torch.full((2, 3, 1, 1), 0.5)}})
    with pytest.raises(UserError, match="other than 0 and 1"):
        pu.load_ticket(path)


# --------------------------------------------------------------------------- ticket format v2 and validate_ticket

_META = dict(round=1, method="omp", retrain=None, arch="resnet_tiny", pretrain="std", init="x.pt",
             source_dataset="digits")


def test_version_1_file_reads_as_unstructured_rewound_to_theta_p(tmp_path):
    _, mask = _ticket_mask()
    v1 = pu.make_ticket(mask, **_META)
    v1 = {k: v for k, v in v1.items() if k not in ("pattern", "rewind")}
    v1["version"] = 1
    loaded = pu.load_ticket(_write_raw(tmp_path / "v1.pt", v1))
    assert loaded["pattern"] == "unstructured" and loaded["rewind"] == "theta_p" and loaded["version"] == 1
    pu.save_ticket(tmp_path / "again.pt", loaded)  # a filled-in v1 ticket still saves
    # a v2 file must say its pattern and rewind
    v2 = pu.make_ticket(mask, **_META)
    del v2["pattern"]
    with pytest.raises(UserError, match="pattern"):
        pu.load_ticket(_write_raw(tmp_path / "v2.pt", v2))
    with pytest.raises(UserError, match="version-1"):
        pu.validate_ticket(dict(v1, pattern="channel"))


def test_v2_keys_lmp_and_rewind_none():
    _, mask = _ticket_mask()
    t = pu.make_ticket(mask, **dict(_META, method="lmp", retrain="st"), rewind="none")
    assert t["method"] == "lmp" and t["rewind"] == "none" and t["version"] == 2
    # issue 24: IMP may rewind to epoch K >= 1 of its first re-training round; other values stay refused
    assert pu.make_ticket(mask, **_META, rewind="epoch_3")["rewind"] == "epoch_3"
    for bad in ("epoch_0", "epoch_x", "step_3"):
        with pytest.raises(UserError, match="rewind"):
            pu.make_ticket(mask, **_META, rewind=bad)
    with pytest.raises(UserError, match="pattern"):
        pu.make_ticket(mask, **_META, pattern="block")
    with pytest.raises(UserError, match="'nm'"):
        pu.make_ticket(mask, **_META, pattern="nm")  # N:M without [N, M]
    with pytest.raises(UserError, match="nm pattern only"):
        pu.make_ticket(mask, **_META, nm=[2, 4])


def test_lying_ticket_sparsity_is_refused(tmp_path):
    model = SmallNet()
    full = pu.full_mask(model)
    honest = pu.make_ticket(full, **_META)
    assert honest["sparsity"] == 0.0
    with pytest.raises(UserError, match="claims 64.00% sparsity but its masks prune 0.00%"):
        pu.load_ticket(_write_raw(tmp_path / "lie.pt", dict(honest, sparsity=64.0)))
    # the 2-decimal rounding of an honest ticket is within the tolerance, a 0.02-point slip is not
    mask = pu.prune_to_sparsity(model.state_dict(), 33.333, base_mask=full)
    t = pu.make_ticket(mask, **_META)
    assert abs(t["sparsity"] - pu.sparsity(mask)) > 0.0  # it really was rounded
    pu.validate_ticket(t)
    with pytest.raises(UserError, match="claims"):
        pu.validate_ticket(dict(t, sparsity=t["sparsity"] + 0.02))


@pytest.mark.parametrize("key,shape", [("fc.weight", (4, 128)), ("bn1.weight", (16,)), ("block.2.bias", (64,)),
                                       ("fc.conv_like.weight", (4, 4, 1, 1))])
def test_ticket_masking_anything_but_conv_weights_is_refused(tmp_path, key, shape):
    _, mask = _ticket_mask()
    t = pu.make_ticket(mask, **_META)
    masks = dict(t["masks"], **{key: torch.zeros(shape, dtype=torch.bool)})
    bad = dict(t, masks=masks, sparsity=round(pu.sparsity(masks), 2))
    with pytest.raises(UserError, match=f"masks '{key}', which is not a convolution weight"):
        pu.load_ticket(_write_raw(tmp_path / "bad.pt", bad))
    with pytest.raises(UserError, match=key):
        pu.make_ticket(masks, **_META)


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_sparse_layout_ticket_is_refused_in_one_line(tmp_path):
    _, mask = _ticket_mask()
    t = pu.make_ticket(mask, **_META)
    sparse = dict(t, masks={n: m.to_sparse() for n, m in t["masks"].items()})
    with pytest.raises(UserError, match="sparse_coo tensor; tickets hold dense bool masks") as info:
        pu.load_ticket(_write_raw(tmp_path / "sparse.pt", sparse))
    assert "\n" not in str(info.value)


def test_check_mask_fits_refuses_non_conv_and_warns_once_about_missing_layers(capsys):
    model = SmallNet()
    with pytest.raises(UserError, match="'fc.weight' is not a convolution weight"):
        pu.check_mask_fits(model, {"fc.weight": torch.ones(4, 128, dtype=torch.bool)})
    conv1_only = {"conv1.weight": torch.ones(16, 3, 3, 3, dtype=torch.bool)}
    enforce._COVERAGE_WARNED.clear()
    pu.check_mask_fits(model, conv1_only)
    pu.apply_mask(model, conv1_only)
    pu.MaskEnforcer(model, conv1_only)
    err = capsys.readouterr().err
    assert err.count("warning: the mask covers 1 of the model's 5 prunable conv layers") == 1
    # a ticket without only the stem (--exclude-stem) is complete
    pu.check_mask_fits(model, pu.full_mask(model, include_stem=False))
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- structured patterns

def _resnet(arch="resnet_tiny"):
    import models
    torch.manual_seed(0)
    return models.build_model(arch, 5, cifar_stem=True)


def test_channel_groups_are_the_block_internal_convs():
    import models
    groups = pu.channel_groups(pu.prunable_names(_resnet()))
    assert [g.conv for g in groups] == [f"layer{i}.0.conv1.weight" for i in range(1, 5)]
    assert groups[0] == ("layer1.0.conv1.weight", "layer1.0.bn1", "layer1.0.conv2.weight")
    bottleneck = pu.channel_groups(pu.prunable_names(models.build_model("resnet50", 3)))
    assert len(bottleneck) == 32 and ("layer1.0.conv2.weight", "layer1.0.bn2", "layer1.0.conv3.weight") in bottleneck
    assert not any("downsample" in g.conv or g.conv == "conv1.weight" for g in bottleneck)


def test_channel_masks_remove_whole_filters_and_never_a_whole_layer():
    model = _resnet()
    weights = model.state_dict()
    mask = pu.full_mask(model)
    groups = pu.channel_groups(list(mask))
    total = sum(mask[g.conv].shape[0] for g in groups)
    mask1 = pu.channel_prune(weights, mask, 0.2)
    assert pu.filter_sparsity(mask1) == pytest.approx(100 * round(0.2 * total) / total)
    for _ in range(30):  # far past the point where layers would empty out
        mask = pu.channel_prune(weights, mask, 0.5)
    for g in groups:
        alive = pu.alive_filters(mask[g.conv])
        assert int(alive.sum()) == 1  # capped: exactly one filter left per layer
        m = mask[g.conv]
        assert torch.equal(m, alive.view(-1, 1, 1, 1).expand_as(m))  # whole filters, input side untouched
        assert torch.equal(pu.alive_inputs(mask[g.next]), alive)  # the next conv's inputs follow
    for name in set(mask) - {g.conv for g in groups}:  # residual-stream convs keep every filter
        assert bool(pu.alive_filters(mask[name]).all())
    t = pu.make_ticket(mask, **_META, pattern="channel")
    assert t["pattern"] == "channel" and "nm" not in t


def test_channel_ranking_is_normalised_per_layer():
    model = _resnet()
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    # a layer scaled up 100x must not escape pruning: scores are relative to the layer's mean
    weights["layer4.0.conv1.weight"] *= 100
    plain = pu.channel_prune(model.state_dict(), pu.full_mask(model), 0.3)
    scaled = pu.channel_prune(weights, pu.full_mask(model), 0.3)
    assert all(torch.equal(plain[n], scaled[n]) for n in plain)
    # the weakest filter (relative to its layer) goes first
    w = {n: t.clone() for n, t in weights.items()}
    w["layer2.0.conv1.weight"][7] *= 1e-3
    one = pu.channel_prune(w, pu.full_mask(model), 1 / 240)  # 240 internal filters -> 1 removed
    assert not bool(pu.alive_filters(one["layer2.0.conv1.weight"])[7])
    assert pu.filter_sparsity(one) == pytest.approx(100 / 240)


def test_random_channel_prune_seeded():
    model = _resnet()
    a = pu.random_channel_prune(pu.full_mask(model), 0.5, torch.Generator().manual_seed(1))
    b = pu.random_channel_prune(pu.full_mask(model), 0.5, torch.Generator().manual_seed(1))
    c = pu.random_channel_prune(pu.full_mask(model), 0.5, torch.Generator().manual_seed(2))
    assert all(torch.equal(a[n], b[n]) for n in a) and any(not torch.equal(a[n], c[n]) for n in a)
    assert pu.filter_sparsity(a) == pytest.approx(50.0)
    pu.make_ticket(a, **dict(_META, method="rp"), pattern="channel")


def test_channel_ticket_that_is_not_whole_filters_is_refused():
    model = _resnet()
    mask = pu.channel_prune(model.state_dict(), pu.full_mask(model), 0.3)
    single = {n: m.clone() for n, m in mask.items()}
    keep = int(pu.alive_filters(mask["layer1.0.conv1.weight"]).nonzero()[0])
    single["layer1.0.conv1.weight"][keep, 0, 0, 0] = False
    with pytest.raises(UserError, match="removes single weights"):
        pu.make_ticket(single, **_META, pattern="channel")
    stream = {n: m.clone() for n, m in mask.items()}
    stream["layer1.0.conv2.weight"][3] = False  # conv2 of a basic block adds into the residual stream
    with pytest.raises(UserError, match="residual stream"):
        pu.make_ticket(stream, **_META, pattern="channel")
    loose = {n: m.clone() for n, m in mask.items()}
    loose["layer1.0.conv2.weight"][:] = True
    with pytest.raises(UserError, match="complete_channel_mask"):
        pu.make_ticket(loose, **_META, pattern="channel")
    with pytest.raises(UserError, match="no convolution inside a residual block"):
        pu.channel_prune(SmallNet().state_dict(), pu.full_mask(SmallNet()), 0.2)


def test_nm_masks_keep_exactly_n_of_every_m():
    model = _resnet()
    weights = model.state_dict()
    mask = pu.nm_prune(weights, pu.full_mask(model), 2, 4)
    assert pu.nm_dense_layers(mask, 4) == ["conv1.weight"]  # the CIFAR stem has 3*3*3 = 27 inputs
    assert bool(mask.pop("conv1.weight").all())
    for name, m in mask.items():
        kept = m.reshape(m.shape[0], -1, 4).sum(-1)
        assert bool((kept == 2).all()), name
        w = weights[name].abs().reshape(m.shape[0], -1, 4)
        groups = m.reshape(m.shape[0], -1, 4)
        # the kept two are the largest two of their group
        assert bool((w.masked_fill(~groups, float("inf")).amin(-1) >= w.masked_fill(groups, -1).amax(-1)).all())
    t = pu.make_ticket(mask, **_META, pattern="nm", nm=(2, 4))
    assert t["nm"] == [2, 4] and t["sparsity"] == 50.0
    too_many = dict(mask, **{"layer1.0.conv1.weight": torch.ones_like(mask["layer1.0.conv1.weight"])})
    with pytest.raises(UserError, match="keeps more than 2"):
        pu.make_ticket(too_many, **_META, pattern="nm", nm=[2, 4])


def test_nm_leaves_layers_whose_input_is_not_a_multiple_of_m_dense():
    import models
    model = models.build_model("resnet_tiny", 5)  # ImageNet stem: 3*7*7 = 147 inputs per filter
    mask = pu.nm_prune(model.state_dict(), pu.full_mask(model), 2, 4)
    assert pu.nm_dense_layers(mask, 4) == ["conv1.weight"] and bool(mask["conv1.weight"].all())
    random = pu.random_nm_prune(pu.full_mask(model), 1, 4, torch.Generator().manual_seed(0))
    assert all(bool((m.reshape(m.shape[0], -1, 4).sum(-1) == 1).all()) for n, m in random.items() if n != "conv1.weight")
    assert pu.parse_nm("2:4") == [2, 4]
    for bad in ("4:2", "2-4", "0:4", "a:b"):
        with pytest.raises(UserError, match="N:M"):
            pu.parse_nm(bad)


def test_channel_enforcer_keeps_removed_filters_and_their_batchnorm_zero():
    model = _resnet()
    mask = pu.channel_prune(model.state_dict(), pu.full_mask(model), 0.5)
    with torch.no_grad():  # BatchNorm starts at 1/0; make it non-trivial so zeroing is visible
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    pu.apply_mask(model, mask, pattern="channel")
    enforcer = pu.MaskEnforcer(model, mask, pattern="channel")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(0)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(torch.rand(8, 3, 16, 16)), torch.randint(0, 5, (8,)))
        opt.zero_grad()
        loss.backward()
        enforcer.after_backward()
        opt.step()
        enforcer.after_step()
    params = dict(model.named_parameters())
    for g in pu.channel_groups(list(mask)):
        dead = ~pu.alive_filters(mask[g.conv])
        assert bool(dead.any())
        assert int(params[g.conv].detach()[dead].count_nonzero()) == 0
        assert int(params[g.bn + ".weight"].detach()[dead].count_nonzero()) == 0
        assert int(params[g.bn + ".bias"].detach()[dead].count_nonzero()) == 0
        assert int(params[g.bn + ".weight"].detach()[~dead].count_nonzero()) > 0
    # the removed channels output exactly zero after their BatchNorm
    model.eval()
    out = {}
    model.layer1[0].bn1.register_forward_hook(lambda m, i, o: out.setdefault("bn", o))
    model(torch.rand(2, 3, 16, 16))
    dead = ~pu.alive_filters(mask["layer1.0.conv1.weight"])
    assert int(out["bn"][:, dead].count_nonzero()) == 0
