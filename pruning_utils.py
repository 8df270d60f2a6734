"""Mask math, ticket files and sparsity statistics.

A mask is a ``dict[str, torch.BoolTensor]`` keyed by parameter name (torchvision style, e.g.
``"layer1.0.conv1.weight"``); True means the weight is kept.  Every function here takes masks and
tensors and returns new masks; only :func:`apply_mask`, :func:`mask_gradients` and
:class:`MaskEnforcer` change a model.  Returned masks live on the device of the mask passed in.
"""

import builtins
import numbers

import torch
import torch.nn as nn

from utils.checkpoint import atomic_save, safe_load
from utils.errors import UserError

TICKET_FORMAT = "double-win-ticket"
TICKET_VERSION = 1
TICKET_METHODS = ("imp", "omp", "rp")
TICKET_RETRAIN = ("st", "at", None)
_TICKET_KEYS = ("format", "version", "masks", "sparsity", "round", "method", "retrain",
                "arch", "pretrain", "init", "source_dataset")
_SEED_MASK_SUFFIX = ".weight_mask"


# --------------------------------------------------------------------------- which weights

def _unwrap(model):
    """The module whose parameter names are torchvision's (DDP/DataParallel/compile add prefixes)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def prunable_names(model, include_stem=True):
    """Names of every ``nn.Conv2d`` weight, in module order; the head (Linear layers) never.

    ``include_stem=False`` leaves out the first convolution (``conv1.weight`` of a ResNet).
    """
    names = [f"{name}.weight" for name, module in _unwrap(model).named_modules()
             if isinstance(module, nn.Conv2d)]
    if not include_stem:
        names = names[1:]
    return names


def full_mask(model, include_stem=True, device="cpu"):
    """A mask keeping every prunable weight."""
    params = dict(_unwrap(model).named_parameters())
    return {n: torch.ones(params[n].shape, dtype=torch.bool, device=device)
            for n in prunable_names(model, include_stem)}


def mask_from_weights_nonzero(model, include_stem=True, device="cpu"):
    """The mask a model's current zeros describe, e.g. for an already pruned dense checkpoint."""
    params = dict(_unwrap(model).named_parameters())
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


def _flat_scores(weights, mask):
    """(|w|, kept) as flat vectors concatenated in mask order, on the weights' device."""
    scores, kept = [], []
    for name, m in mask.items():
        if name not in weights:
            raise UserError(f"no weight named '{name}' to prune; pass weights from the same "
                            "architecture as the mask (e.g. model.state_dict()).")
        w = weights[name].detach()
        if w.shape != m.shape:
            raise UserError(f"weight '{name}' has shape {tuple(w.shape)} but its mask has "
                            f"{tuple(m.shape)}; use a mask made for this architecture.")
        if not w.is_floating_point():
            raise UserError(f"weight '{name}' is {w.dtype}, not floating point; pass the model's weights.")
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


# --------------------------------------------------------------------------- changing a model

def check_mask_fits(model, mask):
    """Raise :class:`UserError` unless every mask entry is a bool tensor shaped like a model parameter."""
    _check_mask_type(mask)
    params = dict(_unwrap(model).named_parameters())
    for name, m in mask.items():
        if name not in params:
            raise UserError(f"mask entry '{name}' is not a parameter of the model; use a ticket "
                            "made for this architecture (names like 'layer1.0.conv1.weight').")
        if tuple(params[name].shape) != tuple(m.shape):
            raise UserError(f"mask for '{name}' has shape {tuple(m.shape)} but the parameter has "
                            f"{tuple(params[name].shape)}; use a ticket made for this architecture "
                            "and stem (--image-size / CIFAR stem must match).")


def apply_mask(model, mask):
    """Zero the pruned weights of ``model`` in place."""
    check_mask_fits(model, mask)
    params = dict(_unwrap(model).named_parameters())
    with torch.no_grad():
        for name, m in mask.items():
            p = params[name]
            p.mul_(m.to(device=p.device, dtype=p.dtype))


def mask_gradients(model, mask):
    """Zero the gradients of pruned weights in place (parameters without a gradient are skipped)."""
    check_mask_fits(model, mask)
    params = dict(_unwrap(model).named_parameters())
    for name, m in mask.items():
        p = params[name]
        if p.grad is not None:
            p.grad.mul_(m.to(device=p.device, dtype=p.grad.dtype))


class MaskEnforcer:
    """Keeps pruned weights exactly zero through an optimizer's momentum and weight decay.

    Call ``after_backward()`` between ``loss.backward()`` and ``optimizer.step()`` and
    ``after_step()`` right after the step.  Masks are converted once to each parameter's device
    and dtype (and again only if the model moves).
    """

    def __init__(self, model, mask):
        check_mask_fits(model, mask)
        params = dict(_unwrap(model).named_parameters())
        self._masks = dict(mask)
        self._pairs = [(params[n], self._masks[n].to(device=params[n].device, dtype=params[n].dtype))
                       for n in mask]
        self._names = list(mask)

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


def make_ticket(mask, *, round, method, retrain, arch, pretrain, init, source_dataset):
    """The ticket dict of DESIGN §5.1 (masks copied to CPU; sparsity in percent, 2 decimals).

    ``round`` is the keyword of the file format; the builtin is reached as ``builtins.round`` here.
    """
    _check_mask_type(mask)
    ticket = {"format": TICKET_FORMAT, "version": TICKET_VERSION, "masks": _cpu_masks(mask),
              "sparsity": float(builtins.round(sparsity(mask), 2)), "round": round, "method": method,
              "retrain": retrain, "arch": arch, "pretrain": pretrain, "init": init,
              "source_dataset": source_dataset}
    validate_ticket(ticket)
    return ticket


def validate_ticket(ticket, where="ticket"):
    """Raise :class:`UserError` unless ``ticket`` follows the ticket format (DESIGN §5.1)."""
    if not isinstance(ticket, dict):
        raise UserError(f"{where} is a {type(ticket).__name__}, not a ticket dict; "
                        "write tickets with pruning_utils.save_ticket.")
    if ticket.get("format") != TICKET_FORMAT:
        raise UserError(f"{where} has format {ticket.get('format')!r}, not '{TICKET_FORMAT}'; "
                        "pass a ticket written by main_imp_pretrain.py.")
    if ticket.get("version") != TICKET_VERSION:
        raise UserError(f"{where} has ticket version {ticket.get('version')!r}, but this code reads "
                        f"version {TICKET_VERSION}; re-create the ticket with this code.")
    missing = [k for k in _TICKET_KEYS if k not in ticket]
    if missing:
        raise UserError(f"{where} lacks the keys {missing}; re-create it with pruning_utils.make_ticket.")
    masks = ticket["masks"]
    if not isinstance(masks, dict) or not masks:
        raise UserError(f"{where} has no masks; re-create it with pruning_utils.make_ticket.")
    for name, m in masks.items():
        if not isinstance(name, str) or not isinstance(m, torch.Tensor):
            raise UserError(f"{where} mask entry {name!r} is not a name -> tensor pair; "
                            "re-create the ticket with pruning_utils.make_ticket.")
        if m.dtype != torch.bool:
            raise UserError(f"{where} mask '{name}' is {m.dtype}, not torch.bool; masks must be bool "
                            "tensors (convert with m != 0 and re-save).")
    s = ticket["sparsity"]
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0.0 <= s <= 100.0:
        raise UserError(f"{where} sparsity {s!r} is not a percentage in [0, 100]; re-create the ticket.")
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
    """Read a ticket file (or a seed-repo IMP checkpoint) with ``weights_only=True`` and validate it."""
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise UserError(f"'{path}' holds a {type(obj).__name__}, not a ticket dict; pass a ticket "
                        "written by main_imp_pretrain.py.")
    if "format" in obj:
        validate_ticket(obj, where=f"ticket '{path}'")
        return obj
    return _ticket_from_seed(obj, path)
