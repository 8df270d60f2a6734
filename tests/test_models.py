"""models/: architectures, normalization inside the model, and the checkpoint importers.

Every importer test writes a file with the real key layout of its format, produced by modules
shaped like the original code's (DataParallel wrappers, robustness' AttackerModel, advertorch's
normalizer, torch.nn.utils.prune), then checks every tensor and the outputs after loading.
"""

import copy
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune
from torchvision.models.resnet import BasicBlock, ResNet

import models
from dataset import DATASET_STATS  # noqa: E402
from models import (
    ARCHS,
    HEAD_PREFIX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    load_pretrained,
    save_model_checkpoint,
    set_normalization,
)
from utils.errors import UserError

CIFAR_MEAN, CIFAR_STD = DATASET_STATS["cifar10"]


# --------------------------------------------------------------------------- helpers

def _randomized(model, seed):
    """Give every parameter and BN buffer distinctive values, so a load that skips one shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(seed + 7)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return model


def _source(arch="resnet_tiny", num_classes=10, cifar_stem=True, seed=1):
    return _randomized(build_model(arch, num_classes, cifar_stem=cifar_stem), seed)


def _images(size=32, n=2):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def _assert_same_tensors(got, expected):
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].shape == expected[key].shape, key
        assert torch.equal(got[key], expected[key]), key


def _assert_same_outputs(a, b, size=32):
    a.eval()
    b.eval()
    x = _images(size)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-6)


def _prunable(model):
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d)]


def _prune_half(model):
    """Prune the way the seed repo does: global L1 over every conv, via torch.nn.utils.prune."""
    prune.global_unstructured(_prunable(model), pruning_method=prune.L1Unstructured, amount=0.5)
    return model


def _masks_of(model, prefix=""):
    return {f"{name}.weight"[len(prefix):]: m.weight_mask.bool().clone()
            for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name.startswith(prefix)}


def _make_pruning_permanent(model):
    for module, name in _prunable(model):
        prune.remove(module, name)
    return model


class _AdvertorchNormalize(nn.Module):
    """Key layout of advertorch's NormalizeByChannelMeanStd (buffers ``mean`` and ``std``)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))


class _InputNormalize(nn.Module):
    """Key layout of robustness.tools.helpers.InputNormalize."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("new_mean", torch.tensor(mean)[..., None, None])
        self.register_buffer("new_std", torch.tensor(std)[..., None, None])


class _Attacker(nn.Module):
    def __init__(self, model, mean, std):
        super().__init__()
        self.normalize = _InputNormalize(mean, std)
        self.model = model


class _AttackerModel(nn.Module):
    """Key layout of robustness.attacker.AttackerModel: the classifier is registered twice."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.normalizer = _InputNormalize(mean, std)
        self.model = model
        self.attacker = _Attacker(model, mean, std)


# --------------------------------------------------------------------------- architectures

@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "wide_resnet50_2"])
def test_state_dict_keys_and_shapes_equal_torchvision(arch):
    ours = build_model(arch, 7).state_dict()
    theirs = getattr(torchvision.models, arch)(num_classes=7).state_dict()
    assert list(ours) == list(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert "input_mean" not in ours and "input_std" not in ours


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet101", "resnet152"])
def test_deep_archs_equal_torchvision(arch):
    ours = build_model(arch, 3).state_dict()
    theirs = getattr(torchvision.models, arch)(num_classes=3).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_resnet10_is_torchvision_resnet_with_one_block_per_stage():
    ours = build_model("resnet10", 5).state_dict()
    theirs = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_resnet_tiny_widths_and_torchvision_names():
    state = build_model("resnet_tiny", 10).state_dict()
    assert state["conv1.weight"].shape == (16, 3, 7, 7)
    assert state["layer1.0.conv1.weight"].shape == (16, 16, 3, 3)
    assert state["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
    assert state["layer4.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert state["fc.weight"].shape == (10, 128)
    assert "layer1.0.downsample.0.weight" not in state
    assert sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                     "num_batches_tracked"))) < 400_000


def test_initialization_follows_torchvision():
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    # kaiming normal, fan_out, relu gain: std = sqrt(2 / (out_channels * k * k))
    weight = model.layer4[1].conv2.weight
    expected_std = (2.0 / (512 * 9)) ** 0.5
    assert abs(weight.std().item() / expected_std - 1) < 0.05
    assert abs(weight.mean().item()) < expected_std * 0.05


def test_model_records_its_configuration():
    model = build_model("resnet_tiny", 4, cifar_stem=True)
    assert (model.arch, model.num_classes, model.cifar_stem) == ("resnet_tiny", 4, True)
    assert isinstance(model, ResNet)
    assert HEAD_PREFIX == "fc."
    assert set(ARCHS) >= {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                          "resnet10", "resnet_tiny"}


def test_cifar_stem_keeps_32px_resolution():
    model = build_model("resnet18", 10, cifar_stem=True)
    assert model.conv1.weight.shape == (64, 3, 3, 3)
    assert model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1) and model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = tuple(output.shape)
        return hook

    model.layer1.register_forward_hook(record("layer1"))
    model.layer4.register_forward_hook(record("layer4"))
    with torch.no_grad():
        out = model.eval()(_images(32, n=1))
    assert out.shape == (1, 10)
    assert seen["layer1"][-2:] == (32, 32) and seen["layer4"][-2:] == (4, 4)

    standard = build_model("resnet18", 10)
    assert standard.conv1.weight.shape == (64, 3, 7, 7) and isinstance(standard.maxpool, nn.MaxPool2d)


def test_normalization_happens_inside_the_model():
    # torchvision's own init, not _randomized: a randomly scaled deep net forgets its input.
    torch.manual_seed(3)
    model = build_model("resnet18", 10, mean=CIFAR_MEAN, std=CIFAR_STD).eval()
    reference = torchvision.models.resnet18(num_classes=10)
    reference.load_state_dict(model.state_dict())
    reference.eval()
    x = _images(32)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = model(x)
        theirs = reference((x - mean) / std)
        unnormalized = reference(x)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, unnormalized, atol=1e-3)
    assert model.input_mean.shape == (1, 3, 1, 1) and model.input_std.shape == (1, 3, 1, 1)
    assert "input_mean" not in model.state_dict()


def test_normalization_defaults_to_imagenet_and_can_be_changed():
    model = build_model("resnet_tiny", 10)
    assert torch.allclose(model.input_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(model.input_std.flatten(), torch.tensor(IMAGENET_STD))
    set_normalization(model, CIFAR_MEAN, CIFAR_STD)
    assert torch.allclose(model.input_std.flatten(), torch.tensor(CIFAR_STD))
    clone = copy.deepcopy(model)
    assert torch.allclose(clone.input_mean.flatten(), torch.tensor(CIFAR_MEAN))


@pytest.mark.parametrize("mean,std", [((0.5, 0.5), None), (None, (0.2, 0.0, 0.2)),
                                      (("a", "b", "c"), None), ((float("nan"), 0.1, 0.1), None)])
def test_bad_normalization_is_a_user_error(mean, std):
    with pytest.raises(UserError):
        build_model("resnet_tiny", 10, mean=mean, std=std)


def test_unknown_arch_lists_valid_names():
    with pytest.raises(UserError) as err:
        build_model("resnet51", 10)
    assert "resnet51" in str(err.value)
    for name in ARCHS:
        assert name in str(err.value)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, "10", True])
def test_bad_num_classes_is_a_user_error(num_classes):
    with pytest.raises(UserError):
        build_model("resnet_tiny", num_classes)


def test_dataset_stats_cover_every_dataset():
    assert {"imagenet", "cifar10", "cifar100", "svhn", "digits"} <= set(DATASET_STATS)
    for mean, std in DATASET_STATS.values():
        assert len(mean) == 3 and len(std) == 3 and min(std) > 0


# --------------------------------------------------------------------------- importers

def test_torchvision_resnet18_state_dict(tmp_path):
    source = _randomized(torchvision.models.resnet18(num_classes=10), seed=2)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("resnet18", 10)
    info = load_pretrained(model, tmp_path / "resnet18.pth")
    assert info == {"format": "torchvision", "dropped_head": False, "dropped_stem": False, "mask": None,
                    "file_normalization": None}
    _assert_same_tensors(model.state_dict(), source.state_dict())
    set_normalization(model, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    _assert_same_outputs(model, source)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "dataparallel", "dataparallel_in_state_dict"])
def test_torchvision_state_dict_wrappings(tmp_path, wrap):
    source = _source(seed=2)
    if wrap == "plain":
        payload = source.state_dict()
    elif wrap == "state_dict":
        payload = {"state_dict": source.state_dict(), "epoch": 90, "best_acc1": torch.tensor(70.1)}
    elif wrap == "model":
        payload = {"model": source.state_dict()}
    elif wrap == "dataparallel":
        payload = nn.DataParallel(source).state_dict()
        assert next(iter(payload)).startswith("module.")
    else:
        payload = {"state_dict": nn.DataParallel(source).state_dict(), "epoch": 3}
    path = tmp_path / "tv.pth"
    torch.save(payload, path)

    model = build_model("resnet_tiny", 10, cifar_stem=True)
    info = load_pretrained(model, path)
    assert info["format"] == "torchvision"
    assert info["dropped_head"] is False and info["mask"] is None
    _assert_same_tensors(model.state_dict(), source.state_dict())
    _assert_same_outputs(model, source)


def test_old_torchvision_file_without_batch_counters_loads(tmp_path):
    source = _source()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    model = build_model("resnet_tiny", 10, cifar_stem=True)
    assert load_pretrained(model, tmp_path / "old.pth")["format"] == "torchvision"
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert value.item() == 0
        else:
            assert torch.equal(value, source.state_dict()[key]), key
    _assert_same_outputs(model, source)


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_robustness_checkpoint(tmp_path, wrapper):
    source = _source(seed=4)
    attacker_model = nn.DataParallel(_AttackerModel(source, IMAGENET_MEAN, IMAGENET_STD))
    state = attacker_model.state_dict()
    assert "module.model.conv1.weight" in state and "module.attacker.model.conv1.weight" in state
    assert "module.normalizer.new_mean" in state and "module.attacker.normalize.new_std" in state
    torch.save({wrapper: state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 90,
                "schedule": None}, tmp_path / "robust.pt")

    model = build_model("resnet_tiny", 10, cifar_stem=True, mean=CIFAR_MEAN, std=CIFAR_STD)
    info = load_pretrained(model, tmp_path / "robust.pt")
    assert info["format"] == "robustness" and info["dropped_head"] is False
    assert np.allclose(info["file_normalization"][0], IMAGENET_MEAN)
    assert np.allclose(info["file_normalization"][1], IMAGENET_STD)
    _assert_same_tensors(model.state_dict(), source.state_dict())
    # the model keeps its own (dataset) normalization; the file's normalizer is not imported
    assert torch.allclose(model.input_mean.flatten(), torch.tensor(CIFAR_MEAN))
    set_normalization(source, CIFAR_MEAN, CIFAR_STD)
    _assert_same_outputs(model, source)


@pytest.mark.parametrize("best_prec1", [torch.tensor(43.25), np.float64(43.25), np.float32(43.25)])
def test_fast_adversarial_checkpoint(tmp_path, best_prec1):
    source = _source(seed=5)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    source(_images()).sum().backward()
    optimizer.step()
    torch.save({"epoch": 15, "arch": "resnet50", "state_dict": nn.DataParallel(source).state_dict(),
                "best_prec1": best_prec1, "optimizer": optimizer.state_dict()}, tmp_path / "fast.pth.tar")

    model = build_model("resnet_tiny", 10, cifar_stem=True)
    info = load_pretrained(model, tmp_path / "fast.pth.tar")
    assert info["format"] == "fast_adversarial"
    _assert_same_tensors(model.state_dict(), source.state_dict())
    _assert_same_outputs(model, source)


def _as_written_by_numpy1(path):
    """Rewrite a torch checkpoint's pickle as numpy 1.x names its globals (``numpy.core.*``)."""
    import zipfile
    with zipfile.ZipFile(path) as zin:
        entries = [(info, zin.read(info)) for info in zin.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)


def test_checkpoint_written_under_numpy1_loads(tmp_path):
    """Published robust checkpoints were saved under numpy 1.x; their scalars must still load."""
    source = _source(seed=6)
    path = tmp_path / "fast_np1.pth.tar"
    torch.save({"epoch": 15, "arch": "resnet50", "state_dict": nn.DataParallel(source).state_dict(),
                "best_prec1": np.float64(43.25), "robust": np.array([1.5, 2.5])}, path)
    _as_written_by_numpy1(path)
    model = build_model("resnet_tiny", 10, cifar_stem=True)
    assert load_pretrained(model, path)["format"] == "fast_adversarial"
    _assert_same_tensors(model.state_dict(), source.state_dict())


def _seed_stage1_file(tmp_path, source, *, adversarial, dataparallel=False):
    """A seed-repo IMP checkpoint: main_std.py (torchvision net) or main_adv.py (net with normalize)."""
    net = copy.deepcopy(source)
    if adversarial:
        net.normalize = _AdvertorchNormalize(list(IMAGENET_MEAN), list(IMAGENET_STD))
    init = copy.deepcopy(net.state_dict())
    _prune_half(net)
    masks = _masks_of(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=5e-4, momentum=0.9)
    state = nn.DataParallel(net).state_dict() if dataparallel else net.state_dict()
    assert any(k.endswith("conv1.weight_orig") for k in state) and any(k.endswith("weight_mask") for k in state)
    path = tmp_path / "1-checkpoint.pth.tar"
    torch.save({"epoch": 10, "arch": "resnet18", "state_dict": state, "best_acc1": torch.tensor(61.5),
                "optimizer": optimizer.state_dict(), "state_prune": 1, "init": init}, path)
    _make_pruning_permanent(net)
    if adversarial:
        del net.normalize
    return path, net, masks


@pytest.mark.parametrize("adversarial", [False, True])
@pytest.mark.parametrize("dataparallel", [False, True])
def test_seed_imp_checkpoint(tmp_path, adversarial, dataparallel):
    source = _source(seed=6)
    path, expected, masks = _seed_stage1_file(tmp_path, source, adversarial=adversarial, dataparallel=dataparallel)

    model = build_model("resnet_tiny", 10, cifar_stem=True)
    info = load_pretrained(model, path)
    assert info["format"] == "seed"
    _assert_same_tensors(model.state_dict(), expected.state_dict())
    _assert_same_outputs(model, expected)

    assert set(info["mask"]) == {n for n, p in model.named_parameters() if p.dim() == 4}
    assert "layer1.0.conv1.weight" in info["mask"] and "layer2.0.downsample.0.weight" in info["mask"]
    for name, keep in info["mask"].items():
        assert keep.dtype == torch.bool and torch.equal(keep, masks[name])
        weight = model.state_dict()[name]
        assert torch.count_nonzero(weight[~keep]) == 0
    kept = sum(int(m.sum()) for m in info["mask"].values())
    total = sum(m.numel() for m in info["mask"].values())
    assert abs(kept / total - 0.5) < 0.01
    if adversarial:
        assert np.allclose(info["file_normalization"][0], IMAGENET_MEAN)
    else:
        assert info["file_normalization"] is None


def test_seed_downstream_adversarial_checkpoint(tmp_path):
    """main_adv_eval.py saves nn.Sequential(normalizer, pruned model): keys 0.mean, 1.conv1.weight_orig."""
    source = _source(seed=8)
    net = copy.deepcopy(source)
    _prune_half(net)
    wrapped = nn.Sequential(_AdvertorchNormalize(list(CIFAR_MEAN), list(CIFAR_STD)), net)
    masks = _masks_of(net)
    state = wrapped.state_dict()
    assert "0.mean" in state and "1.conv1.weight_orig" in state and "1.fc.weight" in state
    torch.save({"best_sa": 80.0, "best_ra": 45.0, "result": {"train": [50.0], "ta": [1], "ra": [1]},
                "epoch": 100, "state_dict": state, "optimizer": torch.optim.SGD(net.parameters(), 0.1).state_dict(),
                "scheduler": {"milestones": {50: 1}, "last_epoch": 100}}, tmp_path / "model_RA_best.pth.tar")
    _make_pruning_permanent(net)

    model = build_model("resnet_tiny", 10, cifar_stem=True, mean=CIFAR_MEAN, std=CIFAR_STD)
    info = load_pretrained(model, tmp_path / "model_RA_best.pth.tar")
    assert info["format"] == "seed"
    assert np.allclose(info["file_normalization"][1], CIFAR_STD)
    assert all(torch.equal(info["mask"][k], masks[k]) for k in masks)
    _assert_same_tensors(model.state_dict(), net.state_dict())
    set_normalization(net, CIFAR_MEAN, CIFAR_STD)
    _assert_same_outputs(model, net)


def test_seed_checkpoint_with_orphan_mask_is_refused(tmp_path):
    net = _prune_half(copy.deepcopy(_source()))
    state = net.state_dict()
    del state["layer1.0.conv1.weight_orig"]
    torch.save({"state_dict": state}, tmp_path / "broken.pth.tar")
    with pytest.raises(UserError, match="layer1.0.conv1.weight_mask"):
        load_pretrained(build_model("resnet_tiny", 10, cifar_stem=True), tmp_path / "broken.pth.tar")


def test_own_format_round_trip(tmp_path):
    source = _source(seed=9)
    set_normalization(source, CIFAR_MEAN, CIFAR_STD)
    path = tmp_path / "sub" / "model.pt"
    save_model_checkpoint(path, source, epoch=4)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "double-win-model" and raw["version"] == 1
    assert (raw["arch"], raw["num_classes"], raw["cifar_stem"], raw["epoch"]) == ("resnet_tiny", 10, True, 4)
    assert list(raw["state_dict"]) == list(source.state_dict())
    assert os.listdir(path.parent) == ["model.pt"]

    model = build_model("resnet_tiny", 10, cifar_stem=True, mean=CIFAR_MEAN, std=CIFAR_STD)
    info = load_pretrained(model, path)
    assert info["format"] == "double-win" and info["dropped_head"] is False and info["mask"] is None
    assert np.allclose(info["file_normalization"][0], CIFAR_MEAN)
    _assert_same_tensors(model.state_dict(), source.state_dict())
    _assert_same_outputs(model, source)


def test_own_format_refuses_other_arch(tmp_path):
    save_model_checkpoint(tmp_path / "m.pt", _source(arch="resnet_tiny"))
    with pytest.raises(UserError, match="resnet_tiny.*resnet10"):
        load_pretrained(build_model("resnet10", 10, cifar_stem=True), tmp_path / "m.pt")


def test_own_format_refuses_other_stem(tmp_path):
    save_model_checkpoint(tmp_path / "m.pt", _source(cifar_stem=True))
    with pytest.raises(UserError, match="CIFAR stem"):
        load_pretrained(build_model("resnet_tiny", 10, cifar_stem=False), tmp_path / "m.pt")


def test_own_format_refuses_unknown_version(tmp_path):
    save_model_checkpoint(tmp_path / "m.pt", _source())
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    raw["version"] = 2
    torch.save(raw, tmp_path / "m.pt")
    with pytest.raises(UserError, match="version"):
        load_pretrained(build_model("resnet_tiny", 10, cifar_stem=True), tmp_path / "m.pt")


def test_ticket_file_given_as_weights_is_refused(tmp_path):
    torch.save({"format": "double-win-ticket", "version": 1, "masks": {"conv1.weight": torch.ones(1, dtype=torch.bool)}},
               tmp_path / "round_01.pt")
    with pytest.raises(UserError, match="ticket"):
        load_pretrained(build_model("resnet_tiny", 10), tmp_path / "round_01.pt")


# --------------------------------------------------------------------------- the head

def test_head_of_other_shape_is_dropped_in_auto_mode(tmp_path):
    source = _source(num_classes=10, seed=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = build_model("resnet_tiny", 4, cifar_stem=True)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIX)}
    info = load_pretrained(model, tmp_path / "w.pth")
    assert info["dropped_head"] is True
    for key, value in model.state_dict().items():
        if key.startswith(HEAD_PREFIX):
            assert torch.equal(value, head_before[key])
        else:
            assert torch.equal(value, source.state_dict()[key]), key


def test_head_required_but_different_is_a_user_error(tmp_path):
    torch.save(_source(num_classes=10).state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"fc\.weight"):
        load_pretrained(build_model("resnet_tiny", 4, cifar_stem=True), tmp_path / "w.pth", load_head=True)


def test_head_required_but_absent_is_a_user_error(tmp_path):
    state = {k: v for k, v in _source().state_dict().items() if not k.startswith(HEAD_PREFIX)}
    torch.save(state, tmp_path / "backbone.pth")
    with pytest.raises(UserError, match="head"):
        load_pretrained(build_model("resnet_tiny", 10, cifar_stem=True), tmp_path / "backbone.pth", load_head=True)
    model = build_model("resnet_tiny", 10, cifar_stem=True)
    assert load_pretrained(model, tmp_path / "backbone.pth")["dropped_head"] is True


def test_head_never_loaded_when_told_so(tmp_path):
    source = _source()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = build_model("resnet_tiny", 10, cifar_stem=True)
    fc_before = model.fc.weight.detach().clone()
    info = load_pretrained(model, tmp_path / "w.pth", load_head=False)
    assert info["dropped_head"] is True
    assert torch.equal(model.fc.weight, fc_before)
    assert torch.equal(model.layer4[0].conv2.weight, source.layer4[0].conv2.weight)

    model = build_model("resnet_tiny", 10, cifar_stem=True)
    assert load_pretrained(model, tmp_path / "w.pth", load_head=True)["dropped_head"] is False
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_imagenet_stem_into_cifar_stem_model_when_told_to_skip_it(tmp_path):
    source = _source(cifar_stem=False, seed=11)
    path, expected, _ = _seed_stage1_file(tmp_path, source, adversarial=True)
    model = build_model("resnet_tiny", 10, cifar_stem=True)
    stem_before = model.conv1.weight.detach().clone()
    info = load_pretrained(model, path, load_stem=False)
    assert info["dropped_stem"] is True and info["dropped_head"] is False
    assert torch.equal(model.conv1.weight, stem_before)
    assert "conv1.weight" not in info["mask"] and "layer1.0.conv1.weight" in info["mask"]
    reference = expected.state_dict()
    for key, value in model.state_dict().items():
        if key != "conv1.weight":
            assert torch.equal(value, reference[key]), key


# --------------------------------------------------------------------------- mismatches

def test_resnet18_file_into_resnet50_names_keys_and_arch(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError) as err:
        load_pretrained(build_model("resnet50", 10), tmp_path / "r18.pth")
    message = str(err.value)
    assert "missing keys" in message and "layer1.0.conv3.weight" in message
    assert "shape mismatches" in message
    assert "looks like resnet18" in message and "--arch resnet50" in message


def test_one_missing_and_one_unexpected_key_are_named(tmp_path):
    state = _source().state_dict()
    del state["layer2.0.bn1.running_var"]
    state["layer2.0.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(UserError) as err:
        load_pretrained(build_model("resnet_tiny", 10, cifar_stem=True), tmp_path / "w.pth")
    message = str(err.value)
    assert "1 missing keys (layer2.0.bn1.running_var)" in message
    assert "1 unexpected keys (layer2.0.extra.weight)" in message


def test_many_mismatches_are_counted_not_all_listed(tmp_path):
    state = {f"features.{i}.weight": torch.zeros(2) for i in range(30)}
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(UserError) as err:
        load_pretrained(build_model("resnet_tiny", 10), tmp_path / "other.pth")
    message = str(err.value)
    assert "30 unexpected keys" in message and "features.0.weight" in message
    assert "features.29.weight" not in message
    assert "does not look like any known architecture" in message


def test_cifar_stem_mismatch_is_explained(tmp_path):
    torch.save(_source(cifar_stem=True).state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserError) as err:
        load_pretrained(build_model("resnet_tiny", 10, cifar_stem=False), tmp_path / "w.pth")
    assert "conv1.weight" in str(err.value) and "CIFAR stem" in str(err.value)


def test_failed_load_leaves_the_model_untouched(tmp_path):
    state = _source().state_dict()
    del state["layer4.0.bn2.weight"]
    torch.save(state, tmp_path / "w.pth")
    model = build_model("resnet_tiny", 10, cifar_stem=True)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError):
        load_pretrained(model, tmp_path / "w.pth")
    _assert_same_tensors(model.state_dict(), before)


# --------------------------------------------------------------------------- unsafe and bad files

class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": _Exploit(marker)}}, path)
    with pytest.raises(UserError, match="arbitrary unpickling"):
        load_pretrained(build_model("resnet_tiny", 10), path)
    assert not marker.exists()

    # The payload is live: an unrestricted load would have run it.
    proof = tmp_path / "proof"
    torch.save({"x": _Exploit(proof)}, tmp_path / "proof.pth")
    torch.load(tmp_path / "proof.pth", weights_only=False)
    assert proof.exists()


def test_garbage_and_missing_files_are_user_errors(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError):
        load_pretrained(build_model("resnet_tiny", 10), tmp_path / "junk.pth")
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained(build_model("resnet_tiny", 10), tmp_path / "absent.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(UserError, match="not a state dict"):
        load_pretrained(build_model("resnet_tiny", 10), tmp_path / "list.pth")
    torch.save({"state_dict": {"conv1.weight": "text"}}, tmp_path / "strings.pth")
    with pytest.raises(UserError, match="not named tensors"):
        load_pretrained(build_model("resnet_tiny", 10), tmp_path / "strings.pth")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_file_is_not_a_checkpoint(tmp_path):
    with open(tmp_path / "plain.pkl", "wb") as fh:
        pickle.dump({"conv1.weight": [1, 2, 3]}, fh)
    with pytest.raises(UserError):
        load_pretrained(build_model("resnet_tiny", 10), tmp_path / "plain.pkl")


def test_public_names(tmp_path):
    """The names the package hands on work through ``models.``: build, normalize, save, load, inspect."""
    assert {"resnet18", "resnet50", "resnet_tiny"} <= set(models.ARCHS)
    net = models.build_model("resnet_tiny", 3, cifar_stem=True)
    assert isinstance(net, models.NormalizedResNet)
    assert (net.arch, net.num_classes, net.cifar_stem) == ("resnet_tiny", 3, True)
    assert [n for n, _ in net.named_parameters() if n.startswith(models.HEAD_PREFIX)] == ["fc.weight", "fc.bias"]
    assert torch.equal(net.input_mean.flatten(), torch.tensor(models.IMAGENET_MEAN))
    assert torch.equal(net.input_std.flatten(), torch.tensor(models.IMAGENET_STD))
    assert models.set_normalization(net, CIFAR_MEAN, CIFAR_STD) is net
    assert torch.equal(net.input_mean.flatten(), torch.tensor(CIFAR_MEAN))
    assert torch.equal(net.input_std.flatten(), torch.tensor(CIFAR_STD))
    assert models.guess_arch(net.state_dict()) == ("resnet_tiny", True)

    _randomized(net, 4)
    models.save_model_checkpoint(tmp_path / "m.pt", net, epoch=2)
    again = models.build_model("resnet_tiny", 3, cifar_stem=True)
    info = models.load_pretrained(again, tmp_path / "m.pt")
    assert info["format"] == "double-win" and info["dropped_head"] is False
    assert np.allclose(info["file_normalization"][0], CIFAR_MEAN)
    _assert_same_tensors(again.state_dict(), net.state_dict())

    state = net.state_dict()
    models.check_finite_state(state, "m.pt")
    state["fc.bias"][0] = float("nan")
    with pytest.raises(UserError, match="'fc.bias'"):
        models.check_finite_state(state, "m.pt")


# --------------------------------------------------------------------------- damaged θ_p (issue 15)

def _damaged(tmp_path, key, value):
    state = _source().state_dict()
    state[key].view(-1)[3] = value
    path = tmp_path / "damaged.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("key,value,words", [
    ("layer1.0.bn1.running_var", float("nan"), "non-finite"),
    ("bn1.running_mean", float("inf"), "non-finite"),
    ("layer2.0.bn2.running_var", -0.5, "negative"),
    ("conv1.weight", float("nan"), "non-finite"),
    ("layer1.0.conv2.weight", float("-inf"), "non-finite"),
])
def test_non_finite_weights_or_bn_statistics_are_refused_and_leave_the_model_alone(tmp_path, key, value, words):
    path = _damaged(tmp_path, key, value)
    target = build_model("resnet_tiny", 10, cifar_stem=True)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(UserError, match=words) as err:
        load_pretrained(target, path)
    assert f"'{key}'" in str(err.value) and str(path) in str(err.value)
    _assert_same_tensors(target.state_dict(), before)


def test_first_damaged_tensor_is_named_in_any_format(tmp_path):
    source = _source()
    state = {f"module.model.{k}": v.clone() for k, v in source.state_dict().items()}  # robustness layout
    state["module.model.layer1.0.conv1.weight"].view(-1)[0] = float("nan")
    state["module.model.layer3.0.bn1.running_var"].view(-1)[0] = float("nan")
    torch.save({"model": state, "epoch": 3}, tmp_path / "robust.pt")
    with pytest.raises(UserError, match=r"'layer1\.0\.conv1\.weight'"):
        load_pretrained(build_model("resnet_tiny", 10, cifar_stem=True), tmp_path / "robust.pt")


def test_a_damaged_head_that_is_not_loaded_does_not_matter(tmp_path):
    path = _damaged(tmp_path, "fc.weight", float("nan"))
    info = load_pretrained(build_model("resnet_tiny", 10, cifar_stem=True), path, load_head=False)
    assert info["dropped_head"] is True
    with pytest.raises(UserError, match="'fc.weight'"):
        load_pretrained(build_model("resnet_tiny", 10, cifar_stem=True), path, load_head=True)
