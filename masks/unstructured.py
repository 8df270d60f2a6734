"""The unstructured pattern: magnitude (|w|) and random pruning of single weights, globally or layer by
layer, one-shot to a target sparsity (OMP / RP), and the sparsity levels of IMP rounds."""

import numbers

import torch

from masks.prunable import check_fraction, check_mask_type, count_for, weight_for
from utils.errors import UserError


def _flat_scores(weights, mask):
    """(|w|, kept) as flat vectors concatenated in mask order, on the weights' device."""
    scores, kept = [], []
    for name, m in mask.items():
        w = weight_for(weights, name, m)
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


def global_magnitude_prune(weights, mask, fraction):
    """Prune ``fraction`` of the remaining weights with the smallest |w|, globally over ``mask``.

    ``round(fraction * remaining)`` weights are pruned; pruned weights never come back.
    ``weights`` maps names to tensors (``model.state_dict()`` works).
    """
    fraction = check_fraction(fraction)
    check_mask_type(mask)
    remaining = sum(int(m.count_nonzero()) for m in mask.values())
    return _prune_smallest(weights, mask, count_for(fraction, remaining))


def layerwise_magnitude_prune(weights, mask, fraction):
    """Prune ``fraction`` of the remaining weights of each layer by |w|, layer by layer."""
    fraction = check_fraction(fraction)
    check_mask_type(mask)
    out = {}
    for name, m in mask.items():
        one = {name: m}
        out.update(_prune_smallest(weights, one, count_for(fraction, int(m.count_nonzero()))))
    return out


def random_prune(mask, fraction, generator=None):
    """Prune ``round(fraction * remaining)`` kept weights chosen uniformly at random over all layers."""
    fraction = check_fraction(fraction)
    check_mask_type(mask)
    remaining = sum(int(m.count_nonzero()) for m in mask.values())
    return _prune_random(mask, count_for(fraction, remaining), generator)


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
    check_mask_type(base_mask, "base_mask")
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
        pruned += count_for(rate, total - pruned)
    return pruned
