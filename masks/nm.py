"""The N:M pattern: keep N of every M consecutive weights along a filter's flattened input dimension
(2:4 is what NVIDIA's sparse tensor cores run), by |w| or at random."""

import numbers

import torch

from masks.prunable import check_mask_type, weight_for
from utils.errors import UserError


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
    check_mask_type(mask)
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
            w = weight_for(weights, name, msk)
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
