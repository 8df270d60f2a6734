"""Learned masks (LMP): scores over a frozen network, whose top k give the mask.

Each prunable weight gets one real-valued score; the forward pass keeps the weights whose scores
are among the top k (globally, or per layer), so every mask has exactly the requested number of
kept weights. The top-k step passes its gradient straight through to the scores (edge-popup,
Ramanujan et al. 2020; HYDRA, Sehwag et al. 2020). Training the scores is training/lmp.py's.
"""

import math

import torch
import torch.nn as nn
from torch.func import functional_call

from utils.errors import UserError

SCORE_INITS = ("scaled", "magnitude")


def top_k_mask(flat, keep):
    """Bool vector flagging exactly ``keep`` largest entries of the 1-D ``flat``.

    Whichever of keep / drop is smaller is selected with ``topk``, which is faster than a full
    sort; ties are broken by ``topk``, deterministically for a given input and device.
    """
    n = flat.numel()
    if not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} entries")
    if 2 * keep <= n:
        mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
        if keep:
            mask[torch.topk(flat, keep, sorted=False).indices] = True
    else:
        mask = torch.ones(n, dtype=torch.bool, device=flat.device)
        if n - keep:
            mask[torch.topk(flat, n - keep, largest=False, sorted=False).indices] = False
    return mask


class _TopKStraightThrough(torch.autograd.Function):
    """Forward: the 0/1 top-k mask of the scores. Backward: the identity (edge-popup's estimator),
    so a pruned weight whose score gradient says it would help can climb back into the top k."""

    @staticmethod
    def forward(ctx, scores, keep):
        return top_k_mask(scores, keep).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def initial_scores(weight, how):
    """Scores of one layer from its θ_p weights.

    ``magnitude``: |w| itself, so untrained scores give exactly OMP's mask.
    ``scaled`` (HYDRA's scaled init): |w| / max|w| · sqrt(6 / fan_in), which puts every layer's
    scores on the scale of a Kaiming-uniform bound; with a global top-k it also sets how the
    untrained sparsity spreads over the layers (wide-fan-in layers start lower).
    """
    score = weight.detach().abs().float().clone(memory_format=torch.contiguous_format)
    if how == "magnitude":
        return score
    if how != "scaled":
        raise UserError(f"--score-init must be one of {', '.join(SCORE_INITS)}, not '{how}'.")
    fan_in = weight[0].numel()
    peak = float(score.max())
    if peak == 0.0:  # an all-zero layer: every score equal, the top-k breaks the tie
        return score
    return score * (math.sqrt(6.0 / fan_in) / peak)


class ScoredNetwork(nn.Module):
    """θ_p (frozen, BatchNorm in eval mode) under the top-k mask of trainable scores.

    ``keep`` is an int (one global top-k over every score) or a dict name -> int (a top-k per
    layer). The only parameters that require gradients are the scores, so ``train_epoch`` and DDP
    see a model whose parameters are the scores. The base's weights are substituted through
    ``torch.func.functional_call``, not hooks: the module itself is never modified.
    """

    def __init__(self, base, names, keep, score_init="scaled"):
        super().__init__()
        params = dict(base.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise UserError(f"the model has no parameter '{missing[0]}' to learn a mask for; "
                            "build the model of the ticket's --arch.")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base.eval()
        self.names = list(names)
        self.scores = nn.ParameterList(nn.Parameter(initial_scores(params[n], score_init)) for n in self.names)
        sizes = [params[n].numel() for n in self.names]
        if isinstance(keep, dict):
            self.keep = [int(keep[n]) for n in self.names]
            bad = [(n, k, s) for n, k, s in zip(self.names, self.keep, sizes) if not 0 <= k <= s]
        else:
            self.keep = int(keep)
            bad = [] if 0 <= self.keep <= sum(sizes) else [("all layers", self.keep, sum(sizes))]
        if bad:
            name, k, s = bad[0]
            raise UserError(f"cannot keep {k} of the {s} weights of {name}; the level is out of range.")

    def train(self, mode=True):
        # θ_p's BatchNorm statistics belong to the frozen network: the base never leaves eval mode
        super().train(mode)
        self.base.eval()
        return self

    def _soft_masks(self):
        """Per-layer 0/1 masks that carry the straight-through gradient to the scores."""
        if isinstance(self.keep, list):
            return [_TopKStraightThrough.apply(s.reshape(-1), k).view(s.shape) for s, k in zip(self.scores, self.keep)]
        flat = _TopKStraightThrough.apply(torch.cat([s.reshape(-1) for s in self.scores]), self.keep)
        return [part.view(s.shape) for part, s in zip(flat.split([s.numel() for s in self.scores]), self.scores)]

    def forward(self, images):
        params = dict(self.base.named_parameters())
        masked = {n: params[n] * m for n, m in zip(self.names, self._soft_masks())}
        return functional_call(self.base, masked, (images,))

    @torch.no_grad()
    def masks(self):
        """The current mask as a ticket mask (name -> bool tensor)."""
        return {n: m.bool() for n, m in zip(self.names, self._soft_masks())}
