"""Mask math, ticket files and sparsity statistics.

A mask is a ``dict[str, torch.BoolTensor]`` keyed by parameter name (torchvision style, e.g.
``"layer1.0.conv1.weight"``); True means the weight is kept.  Every function here takes masks and
tensors and returns new masks; only :func:`apply_mask`, :func:`mask_gradients` and
:class:`MaskEnforcer` change a model.  Returned masks live on the device of the mask passed in.
"""

import builtins
import numbers
import re
import sys
from typing import NamedTuple

import torch
import torch.nn as nn

from models.resnet import HEAD_PREFIX
from utils.checkpoint import atomic_save, safe_load
from utils.distributed import unwrap_model
from utils.errors import UserError

TICKET_FORMAT = "double-win-ticket"
TICKET_VERSION = 2
TICKET_VERSIONS_READ = (1, 2)
TICKET_METHODS = ("imp", "omp", "rp", "lmp")
TICKET_RETRAIN = ("st", "at", None)
PATTERNS = ("unstructured", "channel", "nm")
REWINDS = ("theta_p", "none")
# the ticket stores sparsity rounded to 2 decimals (make_ticket), so a recount may differ by 0.005
SPARSITY_TOLERANCE = 0.01
_TICKET_KEYS = ("format", "version", "masks", "sparsity", "round", "method", "retrain",
                "arch", "pretrain", "init", "source_dataset")
_SEED_MASK_SUFFIX = ".weight_mask"


# --------------------------------------------------------------------------- which weights

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


# --------------------------------------------------------------------------- pruning

def _check_fraction(fraction):
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
            or not 0.0 <= float(fraction) <= 1.0:
        raise UserError(f"pruning fraction {fraction!r} is not a number in [0, 1]; "
                        "pass the share of remaining weights to prune, e.g. 0.2.")
    return float(fraction)


def _check_mask_type(mask, what="mask"):
    if not isinstance(mask, dict) or not mask:
        raise UserError(f"{what} must be a non-empty dict of parameter name -> bool tensor; "
                        "build one with pruning_utils.full_mask(model).")
    for name, m in mask.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            kind = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise UserError(f"{what} entry '{name}' is {kind}, not a torch.bool tensor; "
                            "convert it with (m != 0).")


def _weight_for(weights, name, m):
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


def _flat_scores(weights, mask):
    """(|w|, kept) as flat vectors concatenated in mask order, on the weights' device."""
    scores, kept = [], []
    for name, m in mask.items():
        w = _weight_for(weights, name, m)
        scores.append(w.reshape(-1).abs())
        kept.append(m.reshape(-1).to(w.device))
    return torch.cat(scores), torch.cat(kept)


def _split_like(mask, flat):
    """Cut a flat bool vector back into per-layer masks on each input mask's device."""
    out, start = {}, 0
    for name, m in mask.items():
        out[name] = flat[start:start + m.numel()].reshape(m.shape).to(m.device).clone()
        start += m.numel()
    return out


def _smallest_kept(scores, kept, count):
    """Bool vector flagging the ``count`` kept entries of smallest score.

    When the choice is unique (no tie straddles the count-th value) ``kthvalue`` finds it, much
    faster than a large ``topk``.  Otherwise the tie is broken by ``torch.topk(largest=False)``
    on the kept scores in mask order, the very call ``torch.nn.utils.prune.global_unstructured``
    with ``L1Unstructured`` makes, so masks equal the seed code's in every case.  Both paths
    are deterministic for a given input and device.
    """
    drop = torch.zeros_like(kept)
    if count <= 0:
        return drop
    # pruned entries score +inf, so they can never be chosen while count <= kept entries
    masked = scores.masked_fill(~kept, float("inf"))
    threshold = torch.kthvalue(masked, count).values
    below = masked < threshold
    at = masked == threshold
    if int(below.count_nonzero()) + int(at.count_nonzero()) == count:
        return below | at
    kept_index = kept.nonzero().squeeze(1)
    drop[kept_index[torch.topk(scores[kept_index], k=count, largest=False).indices]] = True
    return drop


def _prune_smallest(weights, mask, count):
    """Prune the ``count`` kept weights of smallest |w| across all of ``mask``."""
    scores, kept = _flat_scores(weights, mask)
    return _split_like(mask, kept & ~_smallest_kept(scores, kept, count))


def _prune_random(mask, count, generator):
    kept = torch.cat([m.reshape(-1).cpu() for m in mask.values()])
    drop = torch.zeros_like(kept)
    if count > 0:
        kept_index = kept.nonzero().squeeze(1)
        # randperm on the generator's device, so a CUDA generator works too
        device = generator.device if generator is not None else "cpu"
        chosen = torch.randperm(kept_index.numel(), generator=generator, device=device)[:count]
        drop[kept_index[chosen.cpu()]] = True
    return _split_like(mask, kept & ~drop)


def _count_for(fraction, remaining):
    # Python's round, like torch.nn.utils.prune, so counts match the seed code's
    return round(fraction * remaining)


def global_magnitude_prune(weights, mask, fraction):
    """Prune ``fraction`` of the remaining weights with the smallest |w|, globally over ``mask``.

    ``round(fraction * remaining)`` weights are pruned; pruned weights never come back.
    ``weights`` maps names to tensors (``model.state_dict()`` works).
    """
    fraction = _check_fraction(fraction)
    _check_mask_type(mask)
    remaining = sum(int(m.count_nonzero()) for m in mask.values())
    return _prune_smallest(weights, mask, _count_for(fraction, remaining))


def layerwise_magnitude_prune(weights, mask, fraction):
    """Prune ``fraction`` of the remaining weights of each layer by |w|, layer by layer."""
    fraction = _check_fraction(fraction)
    _check_mask_type(mask)
    out = {}
    for name, m in mask.items():
        one = {name: m}
        out.update(_prune_smallest(weights, one, _count_for(fraction, int(m.count_nonzero()))))
    return out


def random_prune(mask, fraction, generator=None):
    """Prune ``round(fraction * remaining)`` kept weights chosen uniformly at random over all layers."""
    fraction = _check_fraction(fraction)
    _check_mask_type(mask)
    remaining = sum(int(m.count_nonzero()) for m in mask.values())
    return _prune_random(mask, _count_for(fraction, remaining), generator)


def prune_to_sparsity(weights, target_percent, method="magnitude", generator=None, base_mask=None):
    """One-shot pruning (OMP / RP) to ``target_percent`` of the prunable weights being zero.

    Exactly ``round(target_percent / 100 * total)`` weights end up pruned, ``total`` being the
    size of ``base_mask``.  Without ``base_mask`` every 4-D ``*.weight`` (conv kernel) in ``weights``
    is prunable; pass ``full_mask(model, include_stem=False)`` to choose otherwise.  Weights already
    pruned in ``base_mask`` stay pruned.
    """
    if method not in ("magnitude", "random"):
        raise UserError(f"unknown pruning method '{method}'; use 'magnitude' or 'random'.")
    if isinstance(target_percent, bool) or not isinstance(target_percent, numbers.Real) \
            or not 0.0 <= float(target_percent) <= 100.0:
        raise UserError(f"target sparsity {target_percent!r} is not a percentage in [0, 100]; "
                        "pass e.g. 89.26.")
    if base_mask is None:
        base_mask = {n: torch.ones(w.shape, dtype=torch.bool) for n, w in weights.items()
                     if n.endswith(".weight") and isinstance(w, torch.Tensor) and w.dim() == 4}
        if not base_mask:
            raise UserError("no 4-D convolution weights found to prune; pass the model's "
                            "state_dict or an explicit base_mask.")
    _check_mask_type(base_mask, "base_mask")
    total = sum(m.numel() for m in base_mask.values())
    already = total - sum(int(m.count_nonzero()) for m in base_mask.values())
    target = round(float(target_percent) / 100.0 * total)
    if target < already:
        raise UserError(f"target sparsity {target_percent}% is below the base mask's "
                        f"{100.0 * already / total:.2f}%; pass a higher target or no base_mask.")
    if method == "magnitude":
        return _prune_smallest(weights, base_mask, target - already)
    return _prune_random(base_mask, target - already, generator)


def imp_sparsity(round, rate=0.2):
    """Sparsity in percent after ``round`` IMP rounds that each prune ``rate`` of the rest."""
    if isinstance(round, bool) or not isinstance(round, numbers.Integral) or round < 0:
        raise UserError(f"IMP round {round!r} is not a non-negative integer; pass e.g. 3.")
    if not 0.0 <= rate < 1.0:
        raise UserError(f"pruning rate {rate!r} is not in [0, 1); pass e.g. 0.2.")
    return 100.0 * (1.0 - (1.0 - rate) ** int(round))


def imp_pruned_count(total, rounds, rate=0.2):
    """Weights pruned after ``rounds`` IMP rounds over ``total`` weights, with per-round rounding.

    ``prune_to_sparsity(w, 100 * imp_pruned_count(N, k) / N)`` reproduces IMP's count exactly;
    ``imp_sparsity(k)`` alone can differ from it by a weight or two of rounding.
    """
    pruned = 0
    for _ in range(rounds):
        pruned += _count_for(rate, total - pruned)
    return pruned


# --------------------------------------------------------------------------- structured patterns
#
# Channel pruning removes whole output filters, but only of convolutions *internal* to a residual
# block (a basic block's conv1; a bottleneck's conv1 and conv2).  The outputs of the stem, of a
# block's last conv and of the downsample convs are added into the residual stream, where a removed
# channel would have to be removed from every block of the stage at once to make the network
# smaller; pruning them alone saves nothing a dense kernel can use, and the export could not slice
# them.  Those convs keep every filter (their masks lose only the input channels that a removed
# filter fed), as in Li et al. 2017 ("Pruning Filters for Efficient ConvNets"), who prune only the
# first layer of each residual block for the same reason.

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


def _channel_groups_of(mask):
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
    _check_mask_type(mask)
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
            w = _weight_for(weights, g.conv, m)
            l1 = (w.double().abs() * m.to(w.device)).reshape(m.shape[0], -1).sum(dim=1).cpu()
            mean = l1[alive].mean() if bool(alive.any()) else torch.tensor(0.0, dtype=torch.float64)
            score = l1 / mean if float(mean) > 0 else torch.ones_like(l1)
        out.append((score, alive))
    return out


def channel_prune(weights, mask, fraction, generator=None):
    """Remove ``round(fraction * alive filters)`` whole filters of block-internal convs.

    Filters are ranked globally by their per-layer-normalised L1 norm (smallest first; with a
    ``generator``, uniformly at random instead), and the best filter of every layer is never
    removed, so no layer loses all of them (the count is capped where that rule binds).  The next
    conv's input channels of removed filters are masked too (:func:`complete_channel_mask`).
    Residual-stream convs keep every filter (see the comment above :func:`channel_groups`).
    """
    fraction = _check_fraction(fraction)
    _check_mask_type(mask)
    groups = _channel_groups_of(mask)
    scored = _filter_scores(weights, mask, groups, generator)
    scores, candidates = [], []
    for score, alive in scored:
        protected = torch.zeros_like(alive)
        if bool(alive.any()):
            protected[torch.where(alive, score, torch.full_like(score, -float("inf"))).argmax()] = True
        scores.append(score)
        candidates.append(alive & ~protected)
    flat_scores, flat_cand = torch.cat(scores), torch.cat(candidates)
    remaining = sum(int(alive.count_nonzero()) for _, alive in scored)
    count = min(_count_for(fraction, remaining), int(flat_cand.count_nonzero()))
    drop = torch.zeros_like(flat_cand)
    if count > 0:
        index = flat_cand.nonzero().squeeze(1)
        # stable sort: ties go to the earlier filter in mask order, the same on every device
        order = torch.sort(flat_scores[index], stable=True).indices
        drop[index[order[:count]]] = True
    out = {n: m.clone() for n, m in mask.items()}
    start = 0
    for g, (score, _) in zip(groups, scored):
        removed = drop[start:start + score.numel()]
        start += score.numel()
        out[g.conv][removed.to(out[g.conv].device)] = False
    return complete_channel_mask(out)


def random_channel_prune(mask, fraction, generator=None):
    """:func:`channel_prune` with filters chosen uniformly at random (RP with the channel pattern)."""
    if generator is None:
        generator = torch.Generator()
    return channel_prune({}, mask, fraction, generator=generator)


def filter_sparsity(mask):
    """Percent of the filters of block-internal convs that are removed (the channel pattern's level)."""
    _check_mask_type(mask)
    groups = _channel_groups_of(mask)
    total = sum(mask[g.conv].shape[0] for g in groups)
    removed = sum(int((~alive_filters(mask[g.conv])).count_nonzero()) for g in groups)
    return 100.0 * removed / total


def parse_nm(text):
    """'2:4' -> [2, 4]; UserError unless 0 < N < M."""
    parts = str(text).split(":")
    try:
        n, m = (int(v) for v in parts)
    except ValueError:
        raise UserError(f"N:M sparsity '{text}' is not two whole numbers like 2:4; pass e.g. --nm 2:4.") from None
    if not 0 < n < m:
        raise UserError(f"N:M sparsity '{text}' must keep 0 < N < M weights of every M; pass e.g. --nm 2:4.")
    return [n, m]


def _check_nm(n, m):
    for v in (n, m):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise UserError(f"N:M values {n!r}:{m!r} are not whole numbers; pass e.g. 2:4.")
    if not 0 < n < m:
        raise UserError(f"N:M sparsity {n}:{m} must keep 0 < N < M weights of every M; pass e.g. 2:4.")
    return int(n), int(m)


def nm_groups_fit(shape, m):
    """Whether a conv weight of ``shape`` splits into groups of ``m`` along in_channels*kh*kw."""
    fan_in = 1
    for d in shape[1:]:
        fan_in *= int(d)
    return fan_in % m == 0


def nm_dense_layers(mask, m):
    """Names of mask layers the N:M pattern leaves dense (input dimension not a multiple of M)."""
    return [n for n, t in mask.items() if not nm_groups_fit(t.shape, m)]


def nm_prune(weights, mask, n, m, generator=None):
    """Keep the ``n`` largest-|w| weights of every group of ``m`` consecutive weights along each
    filter's flattened input dimension (in_channels*kh*kw, the layout of NVIDIA's 2:4 kernels).

    Weights already pruned in ``mask`` stay pruned (a group then keeps fewer than ``n``).  Layers
    whose input dimension is not a multiple of ``m`` (a ResNet stem: 3*7*7 = 147) stay as they are,
    dense under a full mask: padding them would give groups the sparse kernels cannot use.
    With a ``generator`` the ``n`` kept weights are chosen at random (RP).
    """
    n, m = _check_nm(n, m)
    _check_mask_type(mask)
    out = {}
    for name, msk in mask.items():
        if not nm_groups_fit(msk.shape, m):
            out[name] = msk.clone()
            continue
        rows = msk.shape[0]
        if generator is not None:
            scores = torch.rand(msk.numel(), generator=generator, device=generator.device,
                                dtype=torch.float64).to(msk.device).reshape(msk.shape)
        else:
            w = _weight_for(weights, name, msk)
            scores = w.double().abs().to(msk.device)
        grouped = scores.masked_fill(~msk, -float("inf")).reshape(rows, -1, m)
        order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros(grouped.shape, dtype=torch.bool, device=msk.device)
        keep.scatter_(-1, order[..., :n], True)
        out[name] = (keep.reshape(msk.shape) & msk).clone()
    return out


def random_nm_prune(mask, n, m, generator=None):
    """:func:`nm_prune` keeping ``n`` random weights of every ``m`` (RP with the N:M pattern)."""
    if generator is None:
        generator = torch.Generator()
    return nm_prune({}, mask, n, m, generator=generator)


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


def _check_pattern_masks(masks, pattern, nm, where):
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


# --------------------------------------------------------------------------- changing a model

_COVERAGE_WARNED = set()


def _is_primary():
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def check_mask_fits(model, mask):
    """Raise :class:`UserError` unless every mask entry is a bool tensor shaped like a conv weight
    of the model; warn (stderr, once per process) when the mask leaves prunable layers out."""
    _check_mask_type(mask)
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


# --------------------------------------------------------------------------- statistics

def sparsity(mask):
    """Percent of the masked weights that are pruned."""
    _check_mask_type(mask)
    total = sum(m.numel() for m in mask.values())
    kept = sum(int(m.count_nonzero()) for m in mask.values())
    return 100.0 * (total - kept) / total


def layer_sparsity(mask):
    """Percent pruned per layer."""
    _check_mask_type(mask)
    return {n: 100.0 * (m.numel() - int(m.count_nonzero())) / m.numel() for n, m in mask.items()}


def zero_kernels(mask):
    """For each conv mask [out, in, kh, kw]: (kernels fully pruned, kernels); a kernel is one [kh, kw] slice."""
    _check_mask_type(mask)
    out = {}
    for n, m in mask.items():
        if m.dim() != 4:
            continue
        kernels = m.reshape(m.shape[0] * m.shape[1], -1)
        out[n] = (int((~kernels.any(dim=1)).count_nonzero()), kernels.shape[0])
    return out


def mask_iou(a, b):
    """|a ∩ b| / |a ∪ b| over kept weights; 1.0 when both keep nothing (identical masks)."""
    _check_mask_type(a, "first mask")
    _check_mask_type(b, "second mask")
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise UserError(f"the masks cover different parameters (e.g. '{only[0]}'); compare "
                        "tickets of the same architecture.")
    inter = union = 0
    for n in a:
        if a[n].shape != b[n].shape:
            raise UserError(f"masks for '{n}' differ in shape ({tuple(a[n].shape)} vs "
                            f"{tuple(b[n].shape)}); compare tickets of the same architecture.")
        x, y = a[n], b[n].to(a[n].device)
        inter += int((x & y).count_nonzero())
        union += int((x | y).count_nonzero())
    return 1.0 if union == 0 else inter / union


# --------------------------------------------------------------------------- ticket files

def _cpu_masks(mask):
    return {str(n): m.detach().to("cpu").contiguous().clone() for n, m in mask.items()}


def ticket_family(method, pattern="unstructured", nm=None):
    """The name under which analysis and sweeps group a ticket's runs: its method, with the sparsity
    pattern appended when it is structured ("omp_channel", "imp_nm2of4"), so that channel and
    unstructured tickets of one method never share a curve or a verdict row."""
    if pattern in (None, "unstructured"):
        return method
    if pattern == "nm":
        return f"{method}_nm{nm[0]}of{nm[1]}" if nm else f"{method}_nm"
    return f"{method}_{pattern}"


def make_ticket(mask, *, round, method, retrain, arch, pretrain, init, source_dataset,
                pattern="unstructured", nm=None, rewind="theta_p"):
    """The ticket dict of DESIGN §5.1, version 2 (masks copied to CPU; sparsity in percent, 2 decimals).

    ``pattern`` is "unstructured", "channel" or "nm" (then ``nm=[N, M]``); ``rewind`` is "theta_p"
    (IMP rewinds to θ_p; also OMP/RP, which prune θ_p itself) or "none".
    ``round`` is the keyword of the file format; the builtin is reached as ``builtins.round`` here.
    """
    _check_mask_type(mask)
    ticket = {"format": TICKET_FORMAT, "version": TICKET_VERSION, "masks": _cpu_masks(mask),
              "sparsity": float(builtins.round(sparsity(mask), 2)), "round": round, "method": method,
              "retrain": retrain, "arch": arch, "pretrain": pretrain, "init": init,
              "source_dataset": source_dataset, "pattern": pattern, "rewind": rewind}
    if nm is not None or pattern == "nm":
        ticket["nm"] = list(nm) if isinstance(nm, (list, tuple)) else nm
    validate_ticket(ticket)
    return ticket


def _check_mask_entry(name, m, where):
    if not isinstance(name, str) or not isinstance(m, torch.Tensor):
        raise UserError(f"{where} mask entry {name!r} is not a name -> tensor pair; "
                        "re-create the ticket with pruning_utils.make_ticket.")
    if m.layout != torch.strided:
        raise UserError(f"{where} mask '{name}' is a {m.layout} tensor; tickets hold dense bool masks "
                        "(convert with m.to_dense() and re-save).")
    if m.dtype != torch.bool:
        raise UserError(f"{where} mask '{name}' is {m.dtype}, not torch.bool; masks must be bool "
                        "tensors (convert with m != 0 and re-save).")
    # tickets mask the backbone's conv weights only: the head, BatchNorm and biases are never pruned
    if name.startswith(HEAD_PREFIX) or not name.endswith(".weight") or m.dim() != 4:
        raise UserError(f"{where} masks '{name}', which is not a convolution weight (the head, BatchNorm "
                        "weights and biases are never pruned); drop that entry and re-save the ticket.")


def validate_ticket(ticket, where="ticket"):
    """Raise :class:`UserError` unless ``ticket`` follows the ticket format (DESIGN §5.1) and its
    masks back its claims: conv weights only, dense bool tensors, the recorded sparsity (to the
    0.01 points of its 2-decimal rounding) and the recorded pattern."""
    if not isinstance(ticket, dict):
        raise UserError(f"{where} is a {type(ticket).__name__}, not a ticket dict; "
                        "write tickets with pruning_utils.save_ticket.")
    if ticket.get("format") != TICKET_FORMAT:
        raise UserError(f"{where} has format {ticket.get('format')!r}, not '{TICKET_FORMAT}'; "
                        "pass a ticket written by main_imp_pretrain.py.")
    version = ticket.get("version")
    if isinstance(version, bool) or version not in TICKET_VERSIONS_READ:
        raise UserError(f"{where} has ticket version {version!r}, but this code reads versions "
                        f"{list(TICKET_VERSIONS_READ)}; re-create the ticket with this code.")
    required = _TICKET_KEYS + (("pattern", "rewind") if version >= 2 else ())
    missing = [k for k in required if k not in ticket]
    if missing:
        raise UserError(f"{where} lacks the keys {missing}; re-create it with pruning_utils.make_ticket.")
    masks = ticket["masks"]
    if not isinstance(masks, dict) or not masks:
        raise UserError(f"{where} has no masks; re-create it with pruning_utils.make_ticket.")
    for name, m in masks.items():
        _check_mask_entry(name, m, where)
    s = ticket["sparsity"]
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0.0 <= s <= 100.0:
        raise UserError(f"{where} sparsity {s!r} is not a percentage in [0, 100]; re-create the ticket.")
    actual = sparsity(masks)
    if abs(float(s) - actual) > SPARSITY_TOLERANCE + 1e-9:
        raise UserError(f"{where} claims {float(s):.2f}% sparsity but its masks prune {actual:.2f}% of their "
                        "weights; the file is damaged or was edited, re-create it with main_imp_pretrain.py.")
    r = ticket["round"]
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:
        raise UserError(f"{where} round {r!r} is not a non-negative integer; re-create the ticket.")
    if ticket["method"] not in TICKET_METHODS:
        raise UserError(f"{where} method {ticket['method']!r} is not one of {list(TICKET_METHODS)}; "
                        "re-create the ticket.")
    if ticket["retrain"] not in TICKET_RETRAIN:
        raise UserError(f"{where} retrain {ticket['retrain']!r} is not 'st', 'at' or None; re-create the ticket.")
    for key in ("arch", "pretrain", "init", "source_dataset"):
        if ticket[key] is not None and not isinstance(ticket[key], str):
            raise UserError(f"{where} field '{key}' is {type(ticket[key]).__name__}, not a string; "
                            "re-create the ticket.")
    pattern = ticket.get("pattern", "unstructured")
    if pattern not in PATTERNS:
        raise UserError(f"{where} pattern {pattern!r} is not one of {list(PATTERNS)}; re-create the ticket.")
    if ticket.get("rewind", "theta_p") not in REWINDS:
        raise UserError(f"{where} rewind {ticket.get('rewind')!r} is not one of {list(REWINDS)}; "
                        "re-create the ticket.")
    if version < 2 and (pattern != "unstructured" or ticket.get("rewind", "theta_p") != "theta_p"):
        raise UserError(f"{where} is a version-1 ticket, which is unstructured and rewound to θ_p, but says "
                        f"pattern {pattern!r} / rewind {ticket.get('rewind')!r}; save it as version 2.")
    nm = ticket.get("nm")
    if pattern == "nm":
        if (not isinstance(nm, (list, tuple)) or len(nm) != 2
                or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in nm)
                or not 0 < nm[0] < nm[1]):
            raise UserError(f"{where} has pattern 'nm' but 'nm' is {nm!r}, not [N, M] with 0 < N < M; "
                            "re-create the ticket with --nm 2:4.")
    elif nm is not None:
        raise UserError(f"{where} has 'nm' {nm!r} but pattern {pattern!r}; 'nm' belongs to the nm pattern only.")
    _check_pattern_masks(masks, pattern, nm, where)


def save_ticket(path, ticket):
    """Validate ``ticket`` and write it atomically (loadable with ``torch.load(weights_only=True)``)."""
    validate_ticket(ticket)
    atomic_save(dict(ticket, masks=_cpu_masks(ticket["masks"])), path)


def _strip_prefix(names, prefix):
    if names and all(n.startswith(prefix) for n in names):
        return {n: n[len(prefix):] for n in names}
    return {n: n for n in names}


def _ticket_from_seed(obj, path):
    """Ticket dict from a seed-repo (Double-Win-LTH) checkpoint holding ``<name>.weight_mask`` tensors.

    Stage-1 checkpoints store ``model.module.state_dict()`` under ``"state_dict"`` (no prefix;
    the adversarial variant's ``normalize.mean/std`` buffers hold no masks); DDP saves add
    ``module.``; downstream checkpoints wrap the net as ``nn.Sequential(normalize, net)`` and
    so carry ``1.``.
    """
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        state = {}
    mask_keys = [k for k in state if isinstance(k, str) and k.endswith(_SEED_MASK_SUFFIX)]
    if not mask_keys:
        raise UserError(f"'{path}' is neither a double-win ticket (no 'format' key) nor a seed-repo "
                        "checkpoint (no '<name>.weight_mask' tensors); pass a ticket written by "
                        "main_imp_pretrain.py or an IMP checkpoint of the seed code.")
    renamed = _strip_prefix(mask_keys, "module.")
    inner = _strip_prefix(list(renamed.values()), "1.")
    renamed = {key: inner[short] for key, short in renamed.items()}
    masks = {}
    for key in mask_keys:
        m = state[key]
        name = renamed[key][:-len(_SEED_MASK_SUFFIX)] + ".weight"
        if not isinstance(m, torch.Tensor):
            raise UserError(f"'{path}': '{key}' is not a tensor; the file is not a seed-repo checkpoint.")
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
            raise UserError(f"'{path}': mask '{key}' holds values other than 0 and 1; "
                            "pass an IMP checkpoint whose masks are binary.")
        masks[name] = (m != 0).contiguous()
    state_prune = obj.get("state_prune") if "state_dict" in obj else None
    if isinstance(state_prune, int) and not isinstance(state_prune, bool) and state_prune >= 0:
        round_ = state_prune
    else:  # the seed code pruned 20% per round, so the level names its round
        round_ = seed_round_from_sparsity(sparsity(masks))
    return make_ticket(masks, round=round_, method="imp", retrain=None, arch="unknown",
                       pretrain="unknown", init="unknown", source_dataset="unknown")


def seed_round_from_sparsity(percent, rate=0.2, max_rounds=50):
    """The IMP round whose level 1 - (1 - rate)^k is within 0.05 points of ``percent``, else 0."""
    for k in range(max_rounds + 1):
        if abs(imp_sparsity(k, rate) - percent) < 0.05:
            return k
    return 0


def load_ticket(path):
    """Read a ticket file (or a seed-repo IMP checkpoint) with ``weights_only=True`` and validate it.

    A version-1 file reads as unstructured with rewinding to θ_p: the ``pattern`` and ``rewind``
    keys are filled in (its ``version`` stays 1, as written).
    """
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise UserError(f"'{path}' holds a {type(obj).__name__}, not a ticket dict; pass a ticket "
                        "written by main_imp_pretrain.py.")
    if "format" in obj:
        validate_ticket(obj, where=f"ticket '{path}'")
        if obj.get("version") == 1:
            obj.setdefault("pattern", "unstructured")
            obj.setdefault("rewind", "theta_p")
        return obj
    return _ticket_from_seed(obj, path)


# --------------------------------------------------------------------------- tickets that run faster
#
# A channel ticket becomes a physically smaller dense ResNet: every block-internal conv keeps only
# its alive filters, its BatchNorm those channels, and the conv it feeds those input channels.  The
# widths are recorded in the checkpoint as ``channels`` ({"layer1.0.conv1": 40, ...}), so
# :func:`load_exported` can rebuild the smaller shape and load it with ``models.load_pretrained``.
# A 2:4 ticket runs its convs as im2col + a semi-structured sparse GEMM on GPUs whose sparse tensor
# cores support it; semi-structured tensors cannot be stored in a weights_only checkpoint, so the
# portable artifact is the masked dense checkpoint and the conversion happens on the GPU at load.

def _conv_module_name(weight_name):
    return weight_name[:-len(".weight")]


def _replace_module(model, name, module):
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def build_exported_model(arch, num_classes, channels, *, cifar_stem=False, mean=None, std=None):
    """A :func:`models.build_model` ResNet whose block-internal convs have the output widths in
    ``channels`` ({conv module name: filters}); BatchNorms and the convs they feed follow."""
    import models
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
    _check_mask_type(mask)
    check_mask_fits(model, mask)
    _check_pattern_masks(mask, "channel", None, "the mask")
    src = unwrap_model(model)
    groups = [g for g in channel_groups(list(mask)) if g.next in mask]
    if not groups:
        _channel_groups_of({})  # the one error message for "nothing to slice"
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
    import models
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
