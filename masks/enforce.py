"""Masks applied to a model: check that a mask fits it, zero its pruned weights, and keep them zero
through an optimizer's momentum and weight decay."""

import sys

import torch

from masks.patterns import derived_masks
from masks.prunable import check_mask_type, prunable_names
from utils.distributed import unwrap_model
from utils.errors import UserError

_COVERAGE_WARNED = set()


def _is_primary():
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def check_mask_fits(model, mask):
    """Raise :class:`UserError` unless every mask entry is a bool tensor shaped like a conv weight
    of the model; warn (stderr, once per process) when the mask leaves prunable layers out."""
    check_mask_type(mask)
    params = dict(unwrap_model(model).named_parameters())
    prunable = prunable_names(model)
    prunable_set = set(prunable)
    for name, m in mask.items():
        if name not in params:
            raise UserError(f"mask entry '{name}' is not a parameter of the model; use a ticket "
                            "made for this architecture (names like 'layer1.0.conv1.weight').")
        if name not in prunable_set:
            raise UserError(f"mask entry '{name}' is not a convolution weight; only the backbone's conv "
                            "weights are prunable (never the head, BatchNorm or biases), so drop that entry.")
        if tuple(params[name].shape) != tuple(m.shape):
            raise UserError(f"mask for '{name}' has shape {tuple(m.shape)} but the parameter has "
                            f"{tuple(params[name].shape)}; use a ticket made for this architecture "
                            "and stem (--image-size / CIFAR stem must match).")
    # leaving out the stem is the documented --exclude-stem / --reinit-stem choice, not a gap
    missing = [n for n in prunable[1:] if n not in mask]
    key = (type(unwrap_model(model)).__name__, tuple(missing))
    if missing and key not in _COVERAGE_WARNED and _is_primary():
        _COVERAGE_WARNED.add(key)
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        print(f"warning: the mask covers {len(prunable) - len(missing)} of the model's {len(prunable)} prunable "
              f"conv layers; the {len(missing)} left out ({shown}) stay dense, so the ticket's sparsity "
              "overstates the model's.", file=sys.stderr, flush=True)


def _derived_params(model, mask, pattern):
    """(parameter, bool mask) pairs of the pattern's derived masks (channel: BatchNorm of removed filters)."""
    params = dict(unwrap_model(model).named_parameters())
    pairs = []
    for name, m in derived_masks(mask, pattern).items():
        if name not in params or tuple(params[name].shape) != tuple(m.shape):
            raise UserError(f"the channel ticket needs BatchNorm parameter '{name}' with {m.numel()} channels, "
                            "which the model lacks; use a ticket made for this architecture.")
        pairs.append((name, params[name], m))
    return pairs


def apply_mask(model, mask, pattern=None):
    """Zero the pruned weights of ``model`` in place; ``pattern="channel"`` also zeroes the BatchNorm
    weight and bias of removed filters (:func:`derived_masks`), so those channels output exactly 0."""
    check_mask_fits(model, mask)
    params = dict(unwrap_model(model).named_parameters())
    with torch.no_grad():
        for name, m in mask.items():
            p = params[name]
            p.mul_(m.to(device=p.device, dtype=p.dtype))
        for _, p, m in _derived_params(model, mask, pattern):
            p.mul_(m.to(device=p.device, dtype=p.dtype))


def mask_gradients(model, mask):
    """Zero the gradients of pruned weights in place (parameters without a gradient are skipped)."""
    check_mask_fits(model, mask)
    params = dict(unwrap_model(model).named_parameters())
    for name, m in mask.items():
        p = params[name]
        if p.grad is not None:
            p.grad.mul_(m.to(device=p.device, dtype=p.grad.dtype))


class MaskEnforcer:
    """Keeps pruned weights exactly zero through an optimizer's momentum and weight decay.

    Call ``after_backward()`` between ``loss.backward()`` and ``optimizer.step()`` and
    ``after_step()`` right after the step.  Masks are converted once to each parameter's device
    and dtype (and again only if the model moves).  ``pattern="channel"`` also keeps the BatchNorm
    weight and bias of removed filters at zero, so a channel ticket stays structured.
    """

    def __init__(self, model, mask, pattern=None):
        check_mask_fits(model, mask)
        params = dict(unwrap_model(model).named_parameters())
        self._masks = dict(mask)
        self._names = list(mask)
        for name, _, m in _derived_params(model, mask, pattern):
            self._masks[name] = m
            self._names.append(name)
        self._pairs = [(params[n], self._masks[n].to(device=params[n].device, dtype=params[n].dtype))
                       for n in self._names]

    def _current_pairs(self):
        for i, (p, m) in enumerate(self._pairs):
            if m.device != p.device or m.dtype != p.dtype:
                m = self._masks[self._names[i]].to(device=p.device, dtype=p.dtype)
                self._pairs[i] = (p, m)
        return self._pairs

    def after_backward(self):
        with torch.no_grad():
            for p, m in self._current_pairs():
                if p.grad is not None:
                    p.grad.mul_(m)

    def after_step(self):
        with torch.no_grad():
            for p, m in self._current_pairs():
                p.mul_(m)
