"""Architectures with the input normalization inside, and importers of pre-trained checkpoints."""

from models.pretrained import check_finite_state, guess_arch, load_pretrained, save_model_checkpoint
from models.resnet import (
    ARCHS,
    HEAD_PREFIX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NormalizedResNet,
    build_model,
    set_normalization,
)

__all__ = [
    "ARCHS", "HEAD_PREFIX", "IMAGENET_MEAN", "IMAGENET_STD", "NormalizedResNet",
    "build_model", "check_finite_state", "guess_arch", "load_pretrained", "save_model_checkpoint", "set_normalization",
]
