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


SCORE_RANKS = ("score", "abs")


class ScoredNetwork(nn.Module):
    """θ_p (frozen, BatchNorm in eval mode unless ``train_bn``) under the top-k mask of trainable scores.

    ``keep`` is an int (one global top-k over every score) or a dict name -> int (a top-k per
    layer). ``rank`` "score" keeps the largest scores, "abs" the largest |s| (HYDRA's GetSubnet,
    the gradient passing through the absolute value). The parameters that require gradients are
    the scores, and with ``train_bn`` BatchNorm's affine parameters too (HYDRA trains them while
    pruning unless --freeze-bn; its running statistics then follow the batches as well): pass the
    base a copy of θ_p then, since its BatchNorm changes. The base's weights are substituted through
    ``torch.func.functional_call``, not hooks: the conv weights themselves are never modified.
    """

    def __init__(self, base, names, keep, score_init="scaled", rank="score", train_bn=False):
        super().__init__()
        if rank not in SCORE_RANKS:
            raise ValueError(f"rank must be one of {SCORE_RANKS}, not {rank!r}")
        self.rank, self.train_bn = rank, train_bn
        params = dict(base.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise UserError(f"the model has no parameter '{missing[0]}' to learn a mask for; "
                            "build the model of the ticket's --arch.")
        for p in base.parameters():
            p.requires_grad_(False)
        if train_bn:
            for p in self.bn_parameters(base):
                p.requires_grad_(True)
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

    @staticmethod
    def bn_parameters(base):
        return [p for m in base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()]

    def trainable(self):
        """The parameters the optimizer steps: the scores, and BatchNorm's with ``train_bn``."""
        return list(self.scores) + (self.bn_parameters(self.base) if self.train_bn else [])

    def train(self, mode=True):
        # frozen: θ_p's BatchNorm statistics belong to the network stage 2 starts from, so the base
        # never leaves eval mode; with train_bn it follows ``mode`` like any network in training
        super().train(mode)
        if not self.train_bn:
            self.base.eval()
        return self

    def _ranked(self, s):
        return s.abs().reshape(-1) if self.rank == "abs" else s.reshape(-1)

    def _soft_masks(self):
        """Per-layer 0/1 masks that carry the straight-through gradient to the scores."""
        if isinstance(self.keep, list):
            return [_TopKStraightThrough.apply(self._ranked(s), k).view(s.shape) for s, k in zip(self.scores, self.keep)]
        flat = _TopKStraightThrough.apply(torch.cat([self._ranked(s) for s in self.scores]), self.keep)
        return [part.view(s.shape) for part, s in zip(flat.split([s.numel() for s in self.scores]), self.scores)]

    def forward(self, images):
        params = dict(self.base.named_parameters())
        masked = {n: params[n] * m for n, m in zip(self.names, self._soft_masks())}
        return functional_call(self.base, masked, (images,))

    @torch.no_grad()
    def masks(self):
        """The current mask as a ticket mask (name -> bool tensor)."""
        return {n: m.bool() for n, m in zip(self.names, self._soft_masks())}


class FilterScoredNetwork(ScoredNetwork):
    """Filter-wise LMP (``--pattern channel``): one score per output filter of every block-internal
    conv (masks/channel.py's groups), a top-k of them per layer (``keep``: conv name -> kept
    filters, at least one), the other convs whole. A removed filter also masks the next conv's
    input channel it fed, in the forward pass as in the ticket (masks.channel.complete_channel_mask),
    so the scores learn the function the exported smaller network computes.

    A filter's initial score is the mean of its weights' initial scores (``score_init``).
    """

    def __init__(self, base, names, keep, score_init="scaled", rank="score", train_bn=False):
        from masks.channel import require_channel_groups

        params = dict(base.named_parameters())
        self.groups = require_channel_groups({n: params[n] for n in names if n in params})
        super().__init__(base, names, {n: params[n].numel() for n in names}, score_init, rank, train_bn)
        self.scores = nn.ParameterList(
            nn.Parameter(initial_scores(params[g.conv], score_init).reshape(params[g.conv].shape[0], -1).mean(1))
            for g in self.groups)
        self.filter_keep = [int(keep[g.conv]) for g in self.groups]
        bad = [(g.conv, k, s.numel()) for g, k, s in zip(self.groups, self.filter_keep, self.scores)
               if not 1 <= k <= s.numel()]
        if bad:
            name, k, s = bad[0]
            raise UserError(f"cannot keep {k} of the {s} filters of {name}; the level is out of range.")

    def _soft_masks(self):
        params = dict(self.base.named_parameters())
        out = {n: torch.ones_like(params[n]) for n in self.names}
        for g, s, k in zip(self.groups, self.scores, self.filter_keep):
            kept = _TopKStraightThrough.apply(self._ranked(s), k)
            out[g.conv] = out[g.conv] * kept.view(-1, 1, 1, 1)
            out[g.next] = out[g.next] * kept.view(1, -1, 1, 1)
        return [out[n] for n in self.names]
