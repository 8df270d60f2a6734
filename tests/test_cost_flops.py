"""study/flops.py counts exactly what torch does, for every architecture models.build_model accepts: its
FLOPs per image against FlopCounterMode on the real model, with and without the CIFAR stem, at even, odd
and the smallest image sizes, and its state-dict, parameter and convolution-weight counts against the model's.
Any change in models/ that the torch-free walk does not follow fails here (the forward passes run on the
meta device: shapes only, about a second for the largest ResNet)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import models
from study import cost, flops
from utils.errors import UserError

# the stage's smallest --image-size, odd sizes that strided layers round down, ImageNet's
SIZES = (8, 9, 33, 224)


def _torch_counts(arch, classes, stem, sizes):
    model = models.build_model(arch, classes, cifar_stem=stem).eval().to("meta")
    counted = {}
    for size in sizes:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, size, size, device="meta"))
        counted[size] = counter.get_total_flops()
    stored = (sum(t.numel() * t.element_size() for t in model.state_dict().values()),
              sum(t.numel() * t.element_size() for t in model.parameters()),
              sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d)))
    return counted, stored


def test_the_walk_knows_every_architecture_as_models_builds_it():
    assert set(flops.SPECS) == set(models.ARCHS)
    for arch, spec in models.ARCHS.items():
        block = {"BasicBlock": "basic", "Bottleneck": "bottleneck"}[spec.block.__name__]
        assert flops.SPECS[arch] == (block, spec.layers, spec.width_per_group, spec.stage_widths, spec.stem_width)
        assert flops.EXPANSION[block] == spec.block.expansion


@pytest.mark.parametrize("arch", list(models.ARCHS))
@pytest.mark.parametrize("stem", [False, True])
def test_flops_and_size_are_torchs(arch, stem):
    classes = 10 if arch == "resnet_tiny" else 1000 - 3 * stem  # the head's width counts: an odd one too
    counted, stored = _torch_counts(arch, classes, stem, SIZES)
    for image, expected in counted.items():
        assert flops.forward_flops(arch, classes, stem, image) == expected > 0, (arch, stem, image)
    assert flops.model_bytes(arch, classes, stem) == stored
    assert cost.forward_flops(arch, classes, stem, 33) == counted[33]
    assert cost.model_bytes(arch, classes, stem) == stored


def test_an_unknown_architecture_is_left_to_torch_which_names_the_known_ones():
    assert flops.forward_flops("no_such_net", 10, True, 32) is None
    assert flops.model_bytes("no_such_net", 10, True) is None
    for count in (lambda: cost.forward_flops("no_such_net", 10, True, 32), lambda: cost.model_bytes("no_such_net", 10, True)):
        with pytest.raises(UserError, match="unknown architecture 'no_such_net'; choose one of: resnet18"):
            count()
