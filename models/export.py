"""Tickets that run faster: a channel ticket exported to a physically smaller dense ResNet, and a 2:4
ticket's convs run as semi-structured sparse GEMMs.

A channel ticket's every block-internal conv keeps only its alive filters, its BatchNorm those
channels, and the conv it feeds those input channels.  The widths are recorded in the checkpoint as
``channels`` ({"layer1.0.conv1": 40, ...}), so :func:`load_exported` can rebuild the smaller shape
and load it with ``models.load_pretrained``.  A 2:4 ticket runs its convs as im2col + a
semi-structured sparse GEMM on GPUs whose sparse tensor cores support it; semi-structured tensors
cannot be stored in a weights_only checkpoint, so the portable artifact is the masked dense
checkpoint and the conversion happens on the GPU at load.

This module imports ``masks``, which imports ``models.resnet``; so ``models/__init__`` must never
import it.
"""

import numbers

import torch
import torch.nn as nn

import models
from masks.channel import alive_filters, channel_groups, require_channel_groups
from masks.enforce import check_mask_fits
from masks.nm import nm_groups_fit
from masks.patterns import check_pattern_masks
from masks.prunable import check_mask_type, prunable_names
from utils.checkpoint import safe_load
from utils.distributed import unwrap_model
from utils.errors import UserError


def _conv_module_name(weight_name):
    return weight_name[:-len(".weight")]


def _replace_module(model, name, module):
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def build_exported_model(arch, num_classes, channels, *, cifar_stem=False, mean=None, std=None):
    """A :func:`models.build_model` ResNet whose block-internal convs have the output widths in
    ``channels`` ({conv module name: filters}); BatchNorms and the convs they feed follow."""
    model = models.build_model(arch, num_classes, cifar_stem=cifar_stem, mean=mean, std=std)
    if not isinstance(channels, dict):
        raise UserError(f"exported widths {channels!r} are not a dict of conv name -> filters; re-export the ticket.")
    groups = channel_groups(prunable_names(model))
    internal = {_conv_module_name(g.conv): g for g in groups}
    unknown = sorted(set(channels) - set(internal))
    if unknown:
        raise UserError(f"exported widths name '{unknown[0]}', which is not a block-internal conv of {arch}; "
                        "pass the --arch the ticket was exported from.")
    modules = dict(model.named_modules())
    out_width, in_width = {}, {}
    for name, g in internal.items():
        width = channels.get(name, modules[name].out_channels)
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) \
                or not 1 <= width <= modules[name].out_channels:
            raise UserError(f"exported width of '{name}' is {width!r}, not 1..{modules[name].out_channels}; "
                            "the checkpoint is damaged, re-export the ticket.")
        out_width[name] = int(width)
        in_width[_conv_module_name(g.next)] = int(width)
    with torch.no_grad():
        for name in sorted(set(out_width) | set(in_width)):
            conv = modules[name]
            _replace_module(model, name, nn.Conv2d(
                in_width.get(name, conv.in_channels), out_width.get(name, conv.out_channels), conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None))
        for name, g in internal.items():
            bn = modules[g.bn]
            _replace_module(model, g.bn, nn.BatchNorm2d(out_width[name], eps=bn.eps, momentum=bn.momentum))
    return model


def export_channel_model(model, mask):
    """The physically smaller dense copy of ``model`` under the channel mask ``mask`` (a
    :func:`build_exported_model` net), whose outputs equal the masked model's; ``model`` is not changed.

    Returns ``(small_model, channels)``.
    """
    check_mask_type(mask)
    check_mask_fits(model, mask)
    check_pattern_masks(mask, "channel", None, "the mask")
    src = unwrap_model(model)
    groups = [g for g in channel_groups(list(mask)) if g.next in mask]
    if not groups:
        require_channel_groups({})  # the one error message for "nothing to slice"
    keep = {g.conv: alive_filters(mask[g.conv]).nonzero().squeeze(1).cpu() for g in groups}
    channels = {_conv_module_name(g.conv): int(keep[g.conv].numel()) for g in groups}
    small = build_exported_model(src.arch, src.num_classes, channels, cifar_stem=src.cifar_stem)
    small.input_mean.copy_(src.input_mean)
    small.input_std.copy_(src.input_std)
    by_bn = {g.bn: keep[g.conv] for g in groups}
    by_next = {g.next: keep[g.conv] for g in groups}
    state = {}
    for key, value in src.state_dict().items():
        value = value.detach().cpu().clone()
        if key in mask:
            value = value * mask[key].cpu().to(value.dtype)
        module, _, leaf = key.rpartition(".")
        if f"{module}.weight" in keep:
            value = value.index_select(0, keep[f"{module}.weight"])
        if module in by_bn and leaf != "num_batches_tracked":
            value = value.index_select(0, by_bn[module])
        if key in by_next:
            value = value.index_select(1, by_next[key])
        state[key] = value
    small.load_state_dict(state, strict=True)
    return small.to(next(src.parameters()).device), channels


def load_exported(path, map_location="cpu"):
    """Rebuild and load a checkpoint written by ``analysis/export_ticket.py`` (a channel ticket's
    smaller ResNet) with ``models.load_pretrained``."""
    raw = safe_load(path)
    if not isinstance(raw, dict) or raw.get("format") != "double-win-model" or not isinstance(raw.get("channels"), dict):
        raise UserError(f"'{path}' is not an exported channel ticket (no 'channels' widths); export one with "
                        "analysis/export_ticket.py.")
    for key in ("arch", "num_classes"):
        if key not in raw:
            raise UserError(f"'{path}' lacks '{key}'; it is damaged, re-export the ticket.")
    model = build_exported_model(raw["arch"], raw["num_classes"], raw["channels"],
                                 cifar_stem=bool(raw.get("cifar_stem")), mean=raw.get("input_mean"),
                                 std=raw.get("input_std"))
    models.load_pretrained(model, path, load_head=True)
    return model.to(map_location)


def check_semi_structured_support(device):
    """Raise :class:`UserError` unless ``device`` can run 2:4 semi-structured sparse kernels
    (an NVIDIA GPU of compute capability 8.0 or newer)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise UserError(f"2:4 semi-structured sparse kernels need an NVIDIA GPU of compute capability 8.0 or newer "
                        f"(Ampere, Hopper), not the {device.type.upper()}; run this on such a GPU with --device cuda "
                        "(elsewhere the masked dense checkpoint is the ticket's runnable form).")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        raise UserError(f"2:4 semi-structured sparse kernels need compute capability 8.0 or newer, but "
                        f"{torch.cuda.get_device_name(device)} has {major}.{minor}; use an Ampere or newer GPU.")


class SemiStructuredConv2d(nn.Module):
    """A conv run as im2col (``F.unfold``) times a 2-D weight [out, in*kh*kw], so the weight can be a
    semi-structured sparse tensor (2:4 along in*kh*kw, the ticket's N:M grouping)."""

    def __init__(self, conv, weight_2d):
        super().__init__()
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        if conv.groups != 1 or isinstance(conv.padding, str):
            raise UserError("only ungrouped convs with numeric padding run semi-structured; keep this layer dense.")
        self.out_channels = conv.out_channels
        self.weight = nn.Parameter(weight_2d, requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if (kh, kw, ph, pw) == (1, 1, 0, 0):
            cols = x[:, :, ::sh, ::sw].permute(0, 2, 3, 1).reshape(-1, c)
        else:
            cols = nn.functional.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding,
                                        stride=self.stride).transpose(1, 2).reshape(-1, c * kh * kw)
        out = nn.functional.linear(cols.contiguous(), self.weight, self.bias)
        return out.reshape(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)


def to_semi_structured(model, mask, convert=None):
    """Replace the convs of a 2:4 ticket's masked ``model`` by :class:`SemiStructuredConv2d` in place.

    ``convert`` turns a 2-D masked weight into the sparse tensor (default
    ``torch.sparse.to_sparse_semi_structured``; the GPU check is the caller's, see
    :func:`check_semi_structured_support`).  Layers whose shapes the sparse kernels refuse, or whose
    groups are not 2:4 (the stem), stay dense.  Returns ``(converted names, dense names)``.
    """
    check_mask_fits(model, mask)
    if convert is None:
        convert = torch.sparse.to_sparse_semi_structured
    src = unwrap_model(model)
    converted, dense = [], []
    for name, m in mask.items():
        conv = src.get_submodule(_conv_module_name(name))
        weight = (conv.weight.detach() * m.to(conv.weight.device, conv.weight.dtype)).reshape(conv.out_channels, -1)
        fits = nm_groups_fit(m.shape, 4) and bool((m.reshape(m.shape[0], -1, 4).sum(-1) <= 2).all())
        if not fits:
            dense.append(name)
            continue
        try:
            sparse = convert(weight.contiguous())
        except RuntimeError:  # the kernels' shape/dtype limits (e.g. rows a multiple of 32)
            dense.append(name)
            continue
        _replace_module(src, _conv_module_name(name), SemiStructuredConv2d(conv, sparse))
        converted.append(name)
    return converted, dense
