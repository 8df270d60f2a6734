"""ResNets with torchvision's parameter names and the input normalization inside the model.

Keeping normalization inside the model means images and the attack budget ε live in [0, 1]
pixel space, and every (x - mean) / std is differentiated through by the attacks.  The mean and
std are non-persistent buffers, so ``state_dict()`` holds exactly torchvision's keys and
checkpoints move freely between this project and plain torchvision code.
"""

import numbers
from typing import NamedTuple

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from masks.prunable import HEAD_PREFIX  # noqa: F401  (models name their head fc; the masks never touch it)
from utils.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ArchSpec(NamedTuple):
    block: type
    layers: tuple
    width_per_group: int = 64
    stage_widths: tuple = (64, 128, 256, 512)
    stem_width: int = 64


ARCHS = {
    "resnet18": ArchSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": ArchSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": ArchSpec(Bottleneck, (3, 4, 6, 3)),
    "resnet101": ArchSpec(Bottleneck, (3, 4, 23, 3)),
    "resnet152": ArchSpec(Bottleneck, (3, 8, 36, 3)),
    "wide_resnet50_2": ArchSpec(Bottleneck, (3, 4, 6, 3), width_per_group=128),
    # Small nets for tests and the demo; not in torchvision.
    "resnet10": ArchSpec(BasicBlock, (1, 1, 1, 1)),
    "resnet_tiny": ArchSpec(BasicBlock, (1, 1, 1, 1), stage_widths=(16, 32, 64, 128), stem_width=16),
}


class NormalizedResNet(ResNet):
    """torchvision ``ResNet`` that normalizes its [0, 1] input itself.

    torchvision's ``__init__`` hard-codes the 64..512 widths, so the attributes its
    ``_make_layer`` reads are set here instead; module names and init match torchvision's.
    """

    def __init__(self, arch, num_classes, *, cifar_stem=False, mean=None, std=None):
        nn.Module.__init__(self)
        spec = ARCHS[arch]
        self.arch = arch
        self.num_classes = int(num_classes)
        self.cifar_stem = bool(cifar_stem)

        self._norm_layer = nn.BatchNorm2d
        self.inplanes = spec.stem_width
        self.dilation = 1
        self.groups = 1
        self.base_width = spec.width_per_group

        if self.cifar_stem:
            # 32 px inputs would shrink to 8 px after a stride-2 conv and a max-pool.
            self.conv1 = nn.Conv2d(3, spec.stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, spec.stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if self.cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for index, (width, blocks) in enumerate(zip(spec.stage_widths, spec.layers)):
            stage = self._make_layer(spec.block, width, blocks, stride=1 if index == 0 else 2)
            setattr(self, f"layer{index + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(spec.stage_widths[-1] * spec.block.expansion, self.num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

        self.register_buffer("input_mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.ones(1, 3, 1, 1), persistent=False)
        set_normalization(self, mean, std)

    def forward(self, x):
        return super().forward((x - self.input_mean) / self.input_std)

    def extra_repr(self):
        return f"arch={self.arch}, num_classes={self.num_classes}, cifar_stem={self.cifar_stem}"


def _channel_stats(values, default, what):
    if values is None:
        values = default
    try:
        tensor = torch.as_tensor(values, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"input {what} {values!r} is not a list of numbers; give three per-channel values.") from None
    if tensor.numel() != 3 or not bool(torch.isfinite(tensor).all()):
        raise UserError(f"input {what} {values!r} must be three finite per-channel (RGB) values.")
    return tensor


def set_normalization(model, mean, std):
    """Set the per-channel input mean/std (None = ImageNet's) of a model from :func:`build_model`."""
    model = getattr(model, "module", model)
    if not isinstance(getattr(model, "input_mean", None), torch.Tensor):
        raise UserError("set_normalization needs a model from models.build_model (it has no input_mean buffer).")
    mean_t = _channel_stats(mean, IMAGENET_MEAN, "mean")
    std_t = _channel_stats(std, IMAGENET_STD, "std")
    if not bool((std_t > 0).all()):
        raise UserError(f"input std {std!r} must be positive in every channel.")
    with torch.no_grad():
        model.input_mean.copy_(mean_t.view(1, 3, 1, 1))
        model.input_std.copy_(std_t.view(1, 3, 1, 1))
    return model


def build_model(arch, num_classes, *, cifar_stem=False, mean=None, std=None):
    """A :class:`NormalizedResNet` for ``arch`` (a key of :data:`ARCHS`) taking [0, 1] images."""
    if not isinstance(arch, str) or arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}.")
    return NormalizedResNet(arch, int(num_classes), cifar_stem=cifar_stem, mean=mean, std=std)
