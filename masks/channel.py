"""The channel pattern: whole output filters of block-internal convs, scored by normalised L1 norm or
at random.

Channel pruning removes whole output filters, but only of convolutions *internal* to a residual
block (a basic block's conv1; a bottleneck's conv1 and conv2).  The outputs of the stem, of a
block's last conv and of the downsample convs are added into the residual stream, where a removed
channel would have to be removed from every block of the stage at once to make the network
smaller; pruning them alone saves nothing a dense kernel can use, and the export could not slice
them.  Those convs keep every filter (their masks lose only the input channels that a removed
filter fed), as in Li et al. 2017 ("Pruning Filters for Efficient ConvNets"), who prune only the
first layer of each residual block for the same reason.
"""

import re
from typing import NamedTuple

import torch

from masks.prunable import check_fraction, check_mask_type, count_for, weight_for
from utils.errors import UserError

_BLOCK_CONV = re.compile(r"^(?P<block>.+)\.conv(?P<k>\d+)\.weight$")


class ChannelGroup(NamedTuple):
    """An internal conv whose filters may be removed, the BatchNorm after it and the conv it feeds."""
    conv: str   # e.g. "layer1.0.conv1.weight"
    bn: str     # module name, e.g. "layer1.0.bn1"
    next: str   # e.g. "layer1.0.conv2.weight"


def channel_groups(names):
    """The :class:`ChannelGroup` of every block-internal conv among ``names`` (torchvision ResNet names).

    A block's convs are ``<block>.conv1 .. convK``; all but the last are internal.  The stem
    (``conv1.weight``, no block) and ``downsample`` convs never are.
    """
    blocks = {}
    for name in names:
        found = _BLOCK_CONV.match(name)
        if found and ".downsample" not in found["block"]:
            blocks.setdefault(found["block"], {})[int(found["k"])] = name
    groups = []
    for block, convs in blocks.items():
        for k in sorted(convs):
            if k + 1 in convs:
                groups.append(ChannelGroup(convs[k], f"{block}.bn{k}", convs[k + 1]))
    return groups


def alive_filters(m):
    """Bool vector over output filters of a conv mask: True where the filter keeps any weight."""
    return m.reshape(m.shape[0], -1).any(dim=1)


def alive_inputs(m):
    """Bool vector over input channels of a conv mask: True where any weight reads the channel."""
    return m.transpose(0, 1).reshape(m.shape[1], -1).any(dim=1)


def require_channel_groups(mask):
    groups = channel_groups(list(mask))
    if not groups:
        raise UserError("the mask has no convolution inside a residual block (names like "
                        "'layer1.0.conv1.weight'), so there are no filters the channel pattern may remove; "
                        "use --pattern unstructured or a ResNet.")
    return groups


def complete_channel_mask(mask):
    """Add to ``mask`` the input channels that its removed filters fed.

    A filter removed from an internal conv (its whole row False) outputs nothing, so the next conv's
    weights reading that channel are dead; masking them makes the ticket count the weights the
    exported smaller network really drops and makes the function independent of the removed
    channel's BatchNorm.  Learned or hand-made channel masks go through this before make_ticket.
    """
    check_mask_type(mask)
    out = {n: m.clone() for n, m in mask.items()}
    for g in channel_groups(list(mask)):
        dead = ~alive_filters(mask[g.conv]).to(out[g.next].device)
        if out[g.next].shape[1] != dead.numel():
            raise UserError(f"'{g.next}' has {out[g.next].shape[1]} input channels but '{g.conv}' has "
                            f"{dead.numel()} filters; the mask is not of a ResNet block.")
        out[g.next][:, dead] = False
    return out


def _filter_scores(weights, mask, groups, generator):
    """Per internal conv: (scores of its filters, alive filters).  Magnitude scores are the filter's
    L1 norm over kept weights divided by the layer's mean over alive filters, so layers of different
    width and fan-in compete on one scale; ``generator`` gives random scores instead (RP)."""
    out = []
    for g in groups:
        m = mask[g.conv]
        alive = alive_filters(m).cpu()
        if generator is not None:
            device = generator.device
            score = torch.rand(m.shape[0], generator=generator, device=device, dtype=torch.float64).cpu()
        else:
            w = weight_for(weights, g.conv, m)
            l1 = (w.double().abs() * m.to(w.device)).reshape(m.shape[0], -1).sum(dim=1).cpu()
            mean = l1[alive].mean() if bool(alive.any()) else torch.tensor(0.0, dtype=torch.float64)
            score = l1 / mean if float(mean) > 0 else torch.ones_like(l1)
        out.append((score, alive))
    return out


def _best_protected(score, alive):
    """``alive`` minus the best-scoring alive filter: the candidates for removal, so no conv is emptied."""
    protected = torch.zeros_like(alive)
    if bool(alive.any()):
        protected[torch.where(alive, score, torch.full_like(score, -float("inf"))).argmax()] = True
    return alive & ~protected


def _lowest(score, candidates, count):
    """Bool vector flagging the ``count`` candidates of lowest score."""
    drop = torch.zeros_like(candidates)
    if count > 0:
        index = candidates.nonzero().squeeze(1)
        # stable sort: ties go to the earlier filter in mask order, the same on every device
        order = torch.sort(score[index], stable=True).indices
        drop[index[order[:count]]] = True
    return drop


def _remove_filters(mask, groups, drops):
    out = {n: m.clone() for n, m in mask.items()}
    for g, removed in zip(groups, drops):
        out[g.conv][removed.to(out[g.conv].device)] = False
    return complete_channel_mask(out)


def channel_prune(weights, mask, fraction, generator=None):
    """Remove ``round(fraction * alive filters)`` whole filters of block-internal convs.

    Filters are ranked globally by their per-layer-normalised L1 norm (smallest first; with a
    ``generator``, uniformly at random instead), and the best filter of every layer is never
    removed, so no layer loses all of them (the count is capped where that rule binds).  The next
    conv's input channels of removed filters are masked too (:func:`complete_channel_mask`).
    Residual-stream convs keep every filter (see this module's docstring).
    """
    fraction = check_fraction(fraction)
    check_mask_type(mask)
    groups = require_channel_groups(mask)
    scored = _filter_scores(weights, mask, groups, generator)
    flat_scores = torch.cat([score for score, _ in scored])
    flat_cand = torch.cat([_best_protected(score, alive) for score, alive in scored])
    remaining = sum(int(alive.count_nonzero()) for _, alive in scored)
    count = min(count_for(fraction, remaining), int(flat_cand.count_nonzero()))
    drop = _lowest(flat_scores, flat_cand, count)
    return _remove_filters(mask, groups, torch.split(drop, [score.numel() for score, _ in scored]))


def layerwise_channel_prune(weights, mask, fraction):
    """:func:`channel_prune` conv by conv: each block-internal conv loses ``round(fraction * its alive
    filters)`` of its lowest-scoring filters (never its last one), as ``layerwise_magnitude_prune``
    rounds per layer.  Which convs lose how many filters then depends on the shapes alone, so every
    model of one architecture gets the same weight sparsity at each level."""
    fraction = check_fraction(fraction)
    check_mask_type(mask)
    groups = require_channel_groups(mask)
    drops = []
    for score, alive in _filter_scores(weights, mask, groups, None):
        candidates = _best_protected(score, alive)
        count = min(count_for(fraction, int(alive.count_nonzero())), int(candidates.count_nonzero()))
        drops.append(_lowest(score, candidates, count))
    return _remove_filters(mask, groups, drops)


def random_channel_prune(mask, fraction, generator=None):
    """:func:`channel_prune` with filters chosen uniformly at random (RP with the channel pattern)."""
    if generator is None:
        generator = torch.Generator()
    return channel_prune({}, mask, fraction, generator=generator)
