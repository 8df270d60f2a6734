"""Sparsity and structure statistics of masks: pruned share overall and per layer, empty kernels,
removed filters, and the overlap of two masks."""

from masks.channel import alive_filters, require_channel_groups
from masks.prunable import check_mask_type
from utils.errors import UserError


def sparsity(mask):
    """Percent of the masked weights that are pruned."""
    check_mask_type(mask)
    total = sum(m.numel() for m in mask.values())
    kept = sum(int(m.count_nonzero()) for m in mask.values())
    return 100.0 * (total - kept) / total


def layer_sparsity(mask):
    """Percent pruned per layer."""
    check_mask_type(mask)
    return {n: 100.0 * (m.numel() - int(m.count_nonzero())) / m.numel() for n, m in mask.items()}


def zero_kernels(mask):
    """For each conv mask [out, in, kh, kw]: (kernels fully pruned, kernels); a kernel is one [kh, kw] slice."""
    check_mask_type(mask)
    out = {}
    for n, m in mask.items():
        if m.dim() != 4:
            continue
        kernels = m.reshape(m.shape[0] * m.shape[1], -1)
        out[n] = (int((~kernels.any(dim=1)).count_nonzero()), kernels.shape[0])
    return out


def filter_sparsity(mask):
    """Percent of the filters of block-internal convs that are removed (the channel pattern's level)."""
    check_mask_type(mask)
    groups = require_channel_groups(mask)
    total = sum(mask[g.conv].shape[0] for g in groups)
    removed = sum(int((~alive_filters(mask[g.conv])).count_nonzero()) for g in groups)
    return 100.0 * removed / total


def mask_iou(a, b):
    """|a ∩ b| / |a ∪ b| over kept weights; 1.0 when both keep nothing (identical masks)."""
    check_mask_type(a, "first mask")
    check_mask_type(b, "second mask")
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
