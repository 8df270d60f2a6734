"""The sparsity patterns a ticket may declare: the masks each pattern implies beyond the conv weights,
and the check that a ticket's masks really follow its pattern."""

import torch

from masks.channel import alive_filters, alive_inputs, channel_groups
from masks.nm import nm_groups_fit
from utils.errors import UserError

PATTERNS = ("unstructured", "channel", "nm")


def derived_masks(mask, pattern):
    """Masks the pattern implies beyond the ticket's conv weights: for ``channel``, the BatchNorm
    weight and bias of every removed filter (so the channel outputs exactly zero).  Tickets never
    store these; :func:`apply_mask` and :class:`MaskEnforcer` derive them."""
    if pattern in (None, "unstructured", "nm"):
        return {}
    if pattern != "channel":
        raise UserError(f"unknown sparsity pattern {pattern!r}; use one of {list(PATTERNS)}.")
    out = {}
    for g in channel_groups(list(mask)):
        alive = alive_filters(mask[g.conv])
        out[f"{g.bn}.weight"] = alive.clone()
        out[f"{g.bn}.bias"] = alive.clone()
    return out


def check_pattern_masks(masks, pattern, nm, where):
    """The masks really follow the ticket's pattern (a channel ticket the export can slice; N:M
    groups a sparse kernel can run)."""
    if pattern == "nm":
        n, m = nm
        for name, t in masks.items():
            if nm_groups_fit(t.shape, m):
                kept = t.reshape(t.shape[0], -1, m).sum(dim=-1)
                if bool((kept > n).any()):
                    raise UserError(f"{where} says N:M {n}:{m} but mask '{name}' keeps more than {n} of some "
                                    f"group of {m}; re-create the ticket with --pattern nm.")
    elif pattern == "channel":
        internal = {g.conv for g in channel_groups(list(masks))}
        for name, t in masks.items():
            out_alive, in_alive = alive_filters(t), alive_inputs(t)
            whole = out_alive.view(-1, 1, 1, 1) & in_alive.view(1, -1, 1, 1)
            if not torch.equal(t, whole.expand_as(t)):
                raise UserError(f"{where} says channel pattern but mask '{name}' removes single weights, not "
                                "whole filters; re-create the ticket with --pattern channel.")
            if name not in internal and not bool(out_alive.all()):
                raise UserError(f"{where} removes filters of '{name}', which feeds the residual stream; the "
                                "channel pattern removes filters of block-internal convs only.")
        for g in channel_groups(list(masks)):
            fed = alive_inputs(masks[g.next])
            if bool((fed & ~alive_filters(masks[g.conv])).any()):
                raise UserError(f"{where}: '{g.next}' still reads channels whose filters '{g.conv}' removed; "
                                "pass the mask through pruning_utils.complete_channel_mask.")
