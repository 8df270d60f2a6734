"""The epoch plan both loaders share: how a training epoch is cut into optimizer steps and each
step shared among ranks, the evaluation shards, the epoch order, and checks of the numbers that
shape them."""

import math
import numbers

import torch

from data_loading.streams import STREAM_ORDER, mix_seed
from utils.errors import UserError

# the fewest images per rank a training step may end an epoch with (see train_step_bounds)
MIN_LAST_STEP = 16


def train_step_bounds(n: int, batch_size: int, world_size: int = 1) -> list[int]:
    """Where each optimizer step of a training epoch begins in the epoch's order, then ``n``.

    ``batch_size`` is per rank.  A step takes the next ``batch_size * world_size`` images (the
    global batch) and the last step the rest, so an epoch has ceil(n / global batch) steps and
    uses every image exactly once: none dropped, none repeated to pad (the seed code's behaviour:
    CIFAR-10 at 1%, 450 images at batch 128, makes 4 updates; SVHN at 1%, 683 images, ends on 43).
    One exception keeps BatchNorm healthy: when fewer than ``MIN_LAST_STEP`` images per rank (and
    less than half a global batch) are left, the last two steps share their images evenly instead
    (65 images at batch 64: 33 + 32, not 64 + 1).  A step of a few images gives BatchNorm
    statistics of a few samples, and its running statistics, which evaluation uses, then take a 10%
    step towards them at the end of every epoch: on the digits demo's 10% runs that cost about 30
    points of accuracy; one image with a 1x1 feature map cannot be normalised at all.  The step
    count never changes.
    """
    global_batch = batch_size * world_size
    steps = max(1, math.ceil(n / global_batch))
    bounds = [s * global_batch for s in range(steps)] + [n]
    rest = n - bounds[-2]
    if steps > 1 and 2 * rest < global_batch and rest < MIN_LAST_STEP * world_size:
        bounds[-2] = n - (global_batch + rest) // 2
    return bounds


def epoch_step_sizes(n: int, batch_size: int, world_size: int) -> list:
    bounds = train_step_bounds(n, batch_size, world_size)
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _rank_share(start: int, stop: int, rank: int, world_size: int) -> tuple[int, int]:
    """``rank``'s contiguous part of positions [start, stop): sizes differ by at most one, the
    first ranks take the extra images, and a rank's part is empty only when the step has fewer
    images than there are ranks."""
    size, extra = divmod(stop - start, world_size)
    lo = start + rank * size + min(rank, extra)
    return lo, lo + size + (1 if rank < extra else 0)


def train_spans(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    bounds = train_step_bounds(n, batch_size, world_size)
    return [_rank_share(a, b, rank, world_size) for a, b in zip(bounds, bounds[1:])]


def eval_spans(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """Batches over this rank's strided, unpadded shard, as position ranges into that shard."""
    shard = len(range(rank, n, world_size))
    return [(a, min(a + batch_size, shard)) for a in range(0, shard, batch_size)]


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The training order of an epoch: the same on every rank, so the ranks' shares never overlap."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, STREAM_ORDER)))


def check_start_batch(start_batch, length: int) -> int:
    if (isinstance(start_batch, bool) or not isinstance(start_batch, numbers.Integral)
            or not 0 <= start_batch <= length):
        raise ValueError(f"start_batch {start_batch!r} must be a whole number from 0 to the epoch's {length} batches")
    return int(start_batch)


def check_rank(rank, world_size):
    if not (isinstance(world_size, numbers.Integral) and world_size >= 1
            and isinstance(rank, numbers.Integral) and 0 <= rank < world_size):
        raise ValueError(f"rank {rank!r} / world size {world_size!r} is not a valid process layout")


def check_positive_int(value, what: str, flag: str):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UserError(f"{what} {value!r} must be a positive whole number; fix {flag}.")
