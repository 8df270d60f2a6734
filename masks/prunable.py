"""Which weights are prunable, what a valid mask is, and how a pruning fraction becomes a count.

A mask is a ``dict[str, torch.BoolTensor]`` keyed by parameter name (torchvision style, e.g.
``"layer1.0.conv1.weight"``); True means the weight is kept.  Every function in ``masks/`` takes
masks and tensors and returns new masks; only :mod:`masks.enforce` changes a model.  Returned masks
live on the device of the mask passed in.
"""

import numbers

import torch
import torch.nn as nn

from utils.distributed import unwrap_model
from utils.errors import UserError

# The classification head (torchvision names it fc): replaced downstream, never pruned.
HEAD_PREFIX = "fc."


def prunable_names(model, include_stem=True):
    """Names of every ``nn.Conv2d`` weight, in module order; the head (Linear layers) never.

    ``include_stem=False`` leaves out the first convolution (``conv1.weight`` of a ResNet).
    """
    names = [f"{name}.weight" for name, module in unwrap_model(model).named_modules()
             if isinstance(module, nn.Conv2d)]
    if not include_stem:
        names = names[1:]
    return names


def full_mask(model, include_stem=True, device="cpu"):
    """A mask keeping every prunable weight."""
    params = dict(unwrap_model(model).named_parameters())
    return {n: torch.ones(params[n].shape, dtype=torch.bool, device=device)
            for n in prunable_names(model, include_stem)}


def mask_from_weights_nonzero(model, include_stem=True, device="cpu"):
    """The mask a model's current zeros describe, e.g. for an already pruned dense checkpoint."""
    params = dict(unwrap_model(model).named_parameters())
    return {n: (params[n].detach() != 0).to(device) for n in prunable_names(model, include_stem)}


def check_fraction(fraction):
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
            or not 0.0 <= float(fraction) <= 1.0:
        raise UserError(f"pruning fraction {fraction!r} is not a number in [0, 1]; "
                        "pass the share of remaining weights to prune, e.g. 0.2.")
    return float(fraction)


def check_mask_type(mask, what="mask"):
    if not isinstance(mask, dict) or not mask:
        raise UserError(f"{what} must be a non-empty dict of parameter name -> bool tensor; "
                        "build one with pruning_utils.full_mask(model).")
    for name, m in mask.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            kind = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise UserError(f"{what} entry '{name}' is {kind}, not a torch.bool tensor; "
                            "convert it with (m != 0).")


def weight_for(weights, name, m):
    """``weights[name]`` (detached) checked against its mask ``m``: present, same shape, floating point."""
    if name not in weights:
        raise UserError(f"no weight named '{name}' to prune; pass weights from the same "
                        "architecture as the mask (e.g. model.state_dict()).")
    w = weights[name].detach()
    if w.shape != m.shape:
        raise UserError(f"weight '{name}' has shape {tuple(w.shape)} but its mask has "
                        f"{tuple(m.shape)}; use a mask made for this architecture.")
    if not w.is_floating_point():
        raise UserError(f"weight '{name}' is {w.dtype}, not floating point; pass the model's weights.")
    return w


def count_for(fraction, remaining):
    # Python's round, like torch.nn.utils.prune, so counts match the seed code's
    return round(fraction * remaining)
