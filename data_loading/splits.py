"""The validation hold-out and the data-limited training subsets."""

import math
import numbers
import zlib

import numpy as np

from data_loading.catalog import check_name
from data_loading.streams import STREAM_SUBSET, mix_seed
from utils.errors import UserError

# The paper's held-out validation size for full-size datasets.
PAPER_VAL_SIZE = 5000
# The folder split must not depend on the run seed (every run of a study sees the same
# validation images), so it is fixed here.
FOLDER_SPLIT_SEED = 0

SUBSET_RULES = ("random", "first")


def default_val_size(name: str, n_train: int) -> int:
    """The paper's 5,000 held-out images for full-size sets, else 10% of the training images.

    The 5,000 applies from 50,000 training images up (CIFAR's 50,000, SVHN's 73,257, ImageNet);
    anything smaller (test fixtures, digits, class subsets) keeps 10% so a training set remains.
    """
    check_name(name)
    if n_train >= 10 * PAPER_VAL_SIZE:
        return PAPER_VAL_SIZE
    return int(math.floor(0.1 * n_train + 0.5))


def val_size_note(n_val: int, requested) -> "str | None":
    """The sentence to tell the user when the default hold-out is smaller than the paper's 5,000
    (a training split under 50,000 images); None when it is the paper's or was asked for."""
    if requested is not None or n_val >= PAPER_VAL_SIZE:
        return None
    return (f"validation holds out {n_val} training images, 10% of a training split under {10 * PAPER_VAL_SIZE:,} "
            f"images (the paper's {PAPER_VAL_SIZE:,} applies from there up); --val-size N sets it")


def resolve_val_size(name: str, n_train: int, val_size) -> int:
    if val_size is None:
        val_size = default_val_size(name, n_train)
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Integral) or not 0 <= val_size < n_train:
        raise UserError(f"validation size {val_size!r} must be a whole number from 0 to {n_train - 1} "
                        f"('{name}' has {n_train} training images).")
    return int(val_size)


def data_rate_subset(labels, indices, rate, seed) -> np.ndarray:
    """A class-balanced random fraction of ``indices`` (positions into ``labels``).

    Each class present keeps round(rate * count) of its images, at least one; the draw uses a
    numpy Generator seeded with ``seed``, so the same arguments give the same subset.
    Returns sorted int64 indices.
    """
    _check_rate(rate)
    labels = np.asarray(labels)
    indices = np.asarray(indices, dtype=np.int64)
    rng = np.random.default_rng(int(seed))
    pool_labels = labels[indices]
    chosen = []
    for c in np.unique(pool_labels):
        members = indices[pool_labels == c]
        keep = min(len(members), max(1, int(math.floor(rate * len(members) + 0.5))))
        chosen.append(rng.permutation(members)[:keep])
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _check_rate(rate):
    if (isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not math.isfinite(rate)
            or not 0 < rate <= 1):
        raise UserError(f"data rate {rate!r} must be a fraction in (0, 1], e.g. 0.1 for 10% of the training split.")


def check_subset(subset, subset_seed):
    if subset not in SUBSET_RULES:
        raise UserError(f"unknown subset rule {subset!r}; choose one of {', '.join(SUBSET_RULES)} (--subset).")
    if isinstance(subset_seed, bool) or not isinstance(subset_seed, numbers.Integral) or subset_seed < 0:
        raise UserError(f"subset seed {subset_seed!r} must be a whole number, 0 or more; fix --subset-seed.")


def subset_draw_seed(name: str, rate, subset_seed: int) -> int:
    """The seed of a 'random' subset: (subset seed, dataset, rate), never the training seed, so
    every training seed of a study trains on the same images and only the run's own noise
    enters the seed-to-seed spread."""
    return mix_seed(STREAM_SUBSET, subset_seed, zlib.crc32(name.encode()), int(round(float(rate) * 10**9)))


def training_subset(name: str, labels, pool, rate, subset="random", subset_seed=0) -> np.ndarray:
    """The data-limited training images, as sorted int64 positions into ``labels``.

    ``pool``: the training split (after the validation hold-out) in its own order.  'random'
    keeps a class-balanced draw (:func:`data_rate_subset`) seeded by :func:`subset_draw_seed`;
    'first' keeps exactly the first round(rate * len(pool)) images of the pool (at least one),
    the seed code's rule.
    """
    _check_rate(rate)
    check_subset(subset, subset_seed)
    pool = np.asarray(pool, dtype=np.int64)
    if subset == "first":
        keep = max(1, int(math.floor(rate * len(pool) + 0.5)))
        return np.sort(pool[:keep])
    return data_rate_subset(labels, np.sort(pool), rate, subset_draw_seed(name, rate, subset_seed))
