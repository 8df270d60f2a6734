"""Datasets and loaders for both stages.

Array datasets (cifar10, cifar100, svhn, digits) are read from their original files into uint8
NHWC arrays and served by :class:`TensorLoader`, which keeps the images on the training device
and augments a whole batch with one ``grid_sample`` call.  Image-folder datasets (folder,
imagenet) stream from disk through torchvision's ``ImageFolder`` and a ``DataLoader``, wrapped
by :class:`FolderLoader` so the engine drives both the same way (``set_epoch``, ``len``, iterate
``(images in [0, 1] on device, int64 labels)``).

Splits follow the paper: the validation set is the last ``val_size`` training images (CIFAR
45,000/5,000, SVHN 68,257/5,000) and data-limited runs keep a fraction of the remaining training
images: by default a class-balanced draw seeded by (subset seed, dataset, rate) alone, so every
training seed of a study trains on the same images, or exactly the first N images as the seed
code did.  Nothing is ever downloaded.

Training epochs keep every image exactly once: ceil(n / global batch) steps, the partial last
step included (the seed code's behaviour), each step's global batch split across ranks without
padding.  Augmentation draws depend only on (seed, epoch, rank, batch) (TensorLoader) or
(seed, epoch, position in the epoch) (FolderLoader), so ``set_epoch(epoch, start_batch=k)``
resumes an interrupted epoch with exactly the batches an uninterrupted one yields from k on.
"""

from __future__ import annotations

import codecs
import copy
import math
import numbers
import pickle
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import UserError

ARRAY_DATASETS = ("cifar10", "cifar100", "svhn", "digits")
FOLDER_DATASETS = ("folder", "imagenet")
DATASETS = ARRAY_DATASETS + FOLDER_DATASETS
AUGMENTS = ("auto", "rrc-flip", "pad-crop-flip", "pad-crop", "none")

# Per-channel mean/std of training images in [0, 1]; CIFAR and SVHN use the values the seed
# repo's downstream scripts normalized with, so results stay comparable.  The digits entry was computed once over
# all 1,797 images of sklearn.datasets.load_digits() after the same 0..16 -> 0..255 uint8
# scaling load_arrays uses: mean 0.30531, std 0.37589 (identical for the 3 replicated channels).
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASET_STATS = {
    "imagenet": _IMAGENET_STATS,
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1201, 0.1231, 0.1052)),
    "digits": ((0.3053, 0.3053, 0.3053), (0.3759, 0.3759, 0.3759)),
    "folder": _IMAGENET_STATS,
}

NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "svhn": 32, "digits": 8}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "digits": 10}
FOLDER_DEFAULT_IMAGE_SIZE = 224

# The paper's held-out validation size for full-size datasets.
PAPER_VAL_SIZE = 5000
# The folder split must not depend on the run seed (every run of a study sees the same
# validation images), so it is fixed here.
FOLDER_SPLIT_SEED = 0

_CIFAR10_SOURCE = ("the 'CIFAR-10 python version' archive (cifar-10-python.tar.gz) from "
                   "https://www.cs.toronto.edu/~kriz/cifar.html, extracted")
_CIFAR100_SOURCE = ("the 'CIFAR-100 python version' archive (cifar-100-python.tar.gz) from "
                    "https://www.cs.toronto.edu/~kriz/cifar.html, extracted")
_SVHN_SOURCE = ("the SVHN 'Format 2: Cropped Digits' file of the same name from "
                "http://ufldl.stanford.edu/housenumbers/")

# Seed-mixing stream ids, so the data order, the augmentation draws and the subset draw never
# share a stream.
_STREAM_ORDER = 1
_STREAM_AUGMENT = 2
_STREAM_SUBSET = 3

SUBSET_RULES = ("random", "first")


# --------------------------------------------------------------------------------------------
# Restricted unpickling of CIFAR batches
# --------------------------------------------------------------------------------------------

def _numpy_attr(*paths):
    for path in paths:
        obj = np
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ImportError(f"numpy provides none of {paths}")  # pragma: no cover


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes; no other codec is reachable."""
    if not isinstance(text, str) or encoding.lower() not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r}")
    return codecs.encode(text, "latin1")


_reconstruct = _numpy_attr("_core.multiarray._reconstruct", "core.multiarray._reconstruct")
_scalar = _numpy_attr("_core.multiarray.scalar", "core.multiarray.scalar")
_frombuffer = _numpy_attr("_core.numeric._frombuffer", "core.numeric._frombuffer")

# Everything an ndarray (or numpy scalar) pickle needs, under the module names numpy 1.x, numpy
# 2.x and Python 2 wrote; resolved here so the deprecated numpy.core shim is never imported.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None


def _restricted_unpickle(path: Path, source: str):
    try:
        with open(path, "rb") as fh:
            return _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise UserError(f"refusing to read {path}: {exc} (a dataset batch only holds numpy arrays, "
                        f"lists and strings); replace it with a clean copy of {source}.") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, OverflowError, MemoryError, OSError) as exc:
        raise UserError(f"{path} is not a readable dataset batch ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); replace it with a clean copy of {source}.") from None


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------

@dataclass
class ArrayData:
    """A whole array dataset in memory: images uint8 [N, H, W, 3], labels int64."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    native_size: int
    # Position of each kept training image in the dataset's own training files; differs from
    # arange(N) only when a class subset was selected.
    train_source_index: Optional[np.ndarray] = None


def _require_file(path: Path, source: str) -> Path:
    if not path.is_file():
        raise UserError(f"expected {path} ({source}); pass the folder that holds it with --data.")
    return path


_IMAGENET_HINT = ("the ILSVRC2012 archives extracted, with val/ sorted into one subfolder per class "
                  "(e.g. by the widely used valprep.sh)")
_FOLDER_HINT = "an ImageFolder tree: one subfolder per class holding that class's images"

# What a --data folder must hold, for the messages that refuse a missing one.
_ROOT_CONTENTS = {
    "cifar10": f"cifar-10-batches-py/data_batch_1 ... data_batch_5 and test_batch ({_CIFAR10_SOURCE})",
    "cifar100": f"cifar-100-python/train and cifar-100-python/test ({_CIFAR100_SOURCE})",
    "svhn": f"train_32x32.mat and test_32x32.mat ({_SVHN_SOURCE})",
    "folder": f"train/<class>/<image> and val/<class>/<image> ({_FOLDER_HINT})",
    "imagenet": f"train/<class>/<image> and val/<class>/<image> ({_IMAGENET_HINT})",
}


def _require_root(name: str, root) -> Path:
    if root is None or str(root) == "":
        raise UserError(f"dataset '{name}' is read from local files; pass with --data the folder that "
                        f"holds {_ROOT_CONTENTS[name]}.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; pass with --data the folder that holds "
                        f"{_ROOT_CONTENTS[name]}.")
    return root


def _dataset_dir(root: Path, folder: str, probe: str) -> Path:
    """Accept both the parent of the extracted archive folder and that folder itself."""
    if root.name == folder or ((root / probe).is_file() and not (root / folder).is_dir()):
        return root
    return root / folder


def _read_cifar_batch(path: Path, label_key: bytes, num_classes: int, source: str):
    batch = _restricted_unpickle(path, source)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise UserError(f"{path} lacks the b'data' and {label_key!r} entries of a CIFAR batch; "
                        f"replace it with a clean copy of {source}.")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32
            or labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer)):
        raise UserError(f"{path} does not hold uint8 data [N, 3072] with N integer labels "
                        f"(got data {data.dtype} {data.shape}, labels {labels.shape}); "
                        f"replace it with a clean copy of {source}.")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{path} has labels outside 0..{num_classes - 1}; replace it with a clean "
                        f"copy of {source}.")
    # Rows are channel-major 32x32 planes (all R, then G, then B).
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _load_cifar(root, which: str):
    if which == "cifar10":
        folder, train_files, test_file = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch"
        label_key, num_classes, source = b"labels", 10, _CIFAR10_SOURCE
    else:
        folder, train_files, test_file = "cifar-100-python", ["train"], "test"
        label_key, num_classes, source = b"fine_labels", 100, _CIFAR100_SOURCE
    base = _dataset_dir(_require_root(which, root), folder, train_files[0])

    def read(files):
        parts = [_read_cifar_batch(_require_file(base / f, source), label_key, num_classes, source)
                 for f in files]
        return (np.ascontiguousarray(np.concatenate([p[0] for p in parts])),
                np.concatenate([p[1] for p in parts]))

    # Check every file exists before reading any, so a partial copy fails fast.
    for f in train_files + [test_file]:
        _require_file(base / f, source)
    train_x, train_y = read(train_files)
    test_x, test_y = read([test_file])
    return train_x, train_y, test_x, test_y, num_classes


def _read_svhn_mat(path: Path):
    import scipy.io
    from scipy.io.matlab import MatReadError

    try:
        mat = scipy.io.loadmat(str(path))
    except (MatReadError, ValueError, TypeError, OSError, NotImplementedError, KeyError) as exc:
        raise UserError(f"{path} is not a readable MATLAB file ({type(exc).__name__}: {str(exc)[:200]}); "
                        f"replace it with a clean copy of {_SVHN_SOURCE}.") from None
    x, y = mat.get("X"), mat.get("y")
    if (x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8
            or y.size != x.shape[3]):
        raise UserError(f"{path} does not hold X uint8 [32, 32, 3, N] and y [N, 1]; "
                        f"replace it with a clean copy of {_SVHN_SOURCE}.")
    labels = y.reshape(-1).astype(np.int64)
    # SVHN stores digit 0 as label 10.
    labels[labels == 10] = 0
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{path} has labels outside 1..10; replace it with a clean copy of {_SVHN_SOURCE}.")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels


def _load_svhn(root):
    root = _require_root("svhn", root)
    train_path = _require_file(root / "train_32x32.mat", _SVHN_SOURCE)
    test_path = _require_file(root / "test_32x32.mat", _SVHN_SOURCE)
    train_x, train_y = _read_svhn_mat(train_path)
    test_x, test_y = _read_svhn_mat(test_path)
    return train_x, train_y, test_x, test_y, 10


def _load_digits():
    """scikit-learn's bundled 8x8 digits with a fixed stratified split.

    The test set is every fifth image of each class (positions 4, 9, 14, ... in that class's
    original order): 20% per class, deterministic without any random number generator, so it
    cannot drift between library versions.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=3))
    labels = bunch.target.astype(np.int64)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        is_test[np.flatnonzero(labels == c)[4::5]] = True
    return images[~is_test], labels[~is_test], images[is_test], labels[is_test], 10


def _check_classes(classes, num_classes: int, name: str) -> list[int]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (Sequence, np.ndarray)):
        raise UserError(f"classes must be a list of label numbers of '{name}', got {classes!r}.")
    picked = list(classes)
    if not picked:
        raise UserError(f"classes is empty; list at least one label number of '{name}' (0..{num_classes - 1}).")
    for c in picked:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= int(c) < num_classes:
            raise UserError(f"class {c!r} is not a label of '{name}'; use label numbers 0..{num_classes - 1}.")
    picked = [int(c) for c in picked]
    if len(set(picked)) != len(picked):
        raise UserError(f"classes {picked} lists a label twice; list each label of '{name}' once.")
    return picked


def _select_classes(labels: np.ndarray, classes: list[int]):
    """Indices of the images whose label is in ``classes`` and their new labels 0..k-1."""
    lookup = np.full(max(int(labels.max(initial=0)), max(classes)) + 1, -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    new = lookup[labels]
    keep = np.flatnonzero(new >= 0)
    return keep, new[keep]


def load_arrays(name: str, root=None, classes=None) -> ArrayData:
    """Read an array dataset from its original files (digits needs no root).

    ``classes`` (original label numbers) keeps only those classes, relabelled 0..k-1 in the
    given order.
    """
    _check_name(name)
    if name in FOLDER_DATASETS:
        raise UserError(f"'{name}' is an image-folder dataset streamed from disk, not loaded as "
                        "arrays; use build_data for it.")
    if name in ("cifar10", "cifar100"):
        train_x, train_y, test_x, test_y, num_classes = _load_cifar(root, name)
    elif name == "svhn":
        train_x, train_y, test_x, test_y, num_classes = _load_svhn(root)
    else:
        train_x, train_y, test_x, test_y, num_classes = _load_digits()
    source_index = np.arange(len(train_y), dtype=np.int64)
    if classes is not None:
        picked = _check_classes(classes, num_classes, name)
        keep, train_y = _select_classes(train_y, picked)
        train_x, source_index = train_x[keep], source_index[keep]
        keep_test, test_y = _select_classes(test_y, picked)
        test_x = test_x[keep_test]
        num_classes = len(picked)
    return ArrayData(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                     num_classes=num_classes, native_size=NATIVE_SIZE[name],
                     train_source_index=source_index)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

def _check_name(name: str):
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}.")


def default_val_size(name: str, n_train: int) -> int:
    """The paper's 5,000 held-out images for full-size sets, else 10% of the training images.

    The 5,000 applies from 50,000 training images up (CIFAR's 50,000, SVHN's 73,257, ImageNet);
    anything smaller (test fixtures, digits, class subsets) keeps 10% so a training set remains.
    """
    _check_name(name)
    if n_train >= 10 * PAPER_VAL_SIZE:
        return PAPER_VAL_SIZE
    return int(math.floor(0.1 * n_train + 0.5))


def _resolve_val_size(name: str, n_train: int, val_size) -> int:
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


def _check_subset(subset, subset_seed):
    if subset not in SUBSET_RULES:
        raise UserError(f"unknown subset rule {subset!r}; choose one of {', '.join(SUBSET_RULES)} (--subset).")
    if isinstance(subset_seed, bool) or not isinstance(subset_seed, numbers.Integral) or subset_seed < 0:
        raise UserError(f"subset seed {subset_seed!r} must be a whole number, 0 or more; fix --subset-seed.")


def subset_draw_seed(name: str, rate, subset_seed: int) -> int:
    """The seed of a 'random' subset: (subset seed, dataset, rate), never the training seed, so
    every training seed of a study trains on the same images and only the run's own noise
    enters the seed-to-seed spread."""
    return _mix_seed(_STREAM_SUBSET, subset_seed, zlib.crc32(name.encode()), int(round(float(rate) * 10**9)))


def training_subset(name: str, labels, pool, rate, subset="random", subset_seed=0) -> np.ndarray:
    """The data-limited training images, as sorted int64 positions into ``labels``.

    ``pool``: the training split (after the validation hold-out) in its own order.  'random'
    keeps a class-balanced draw (:func:`data_rate_subset`) seeded by :func:`subset_draw_seed`;
    'first' keeps exactly the first round(rate * len(pool)) images of the pool (at least one),
    the seed code's rule.
    """
    _check_rate(rate)
    _check_subset(subset, subset_seed)
    pool = np.asarray(pool, dtype=np.int64)
    if subset == "first":
        keep = max(1, int(math.floor(rate * len(pool) + 0.5)))
        return np.sort(pool[:keep])
    return data_rate_subset(labels, np.sort(pool), rate, subset_draw_seed(name, rate, subset_seed))


# --------------------------------------------------------------------------------------------
# Batched image transforms (uint8 NCHW in, float [0, 1] out)
# --------------------------------------------------------------------------------------------

def _mix_seed(*parts) -> int:
    state = np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1])) & ((1 << 63) - 1)


def resize_size(image_size: int) -> int:
    """The shorter-side size before the eval center crop: 256 for 224, as in the paper."""
    return int(round(image_size * 256 / 224))


def _eval_resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize(round(S*256/224)) + CenterCrop(S), or nothing when the images already are S x S."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    short = resize_size(size)
    if h <= w:
        new_h, new_w = short, int(short * w / h)
    else:
        new_h, new_w = int(short * h / w), short
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def _rrc_boxes(batch: int, height: int, width: int, generator, device,
               scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), attempts: int = 10):
    """torchvision's RandomResizedCrop box sampling, for a whole batch at once.

    Returns float tensors (top, left, box_h, box_w) of integer values.
    """
    area = float(height * width)
    s = torch.empty(batch, attempts, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(batch, attempts, device=device).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    box_w = torch.round(torch.sqrt(area * s * aspect))
    box_h = torch.round(torch.sqrt(area * s / aspect))
    ok = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first_ok = ok.to(torch.int32).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    any_ok = ok.any(dim=1)
    box_w = box_w.gather(1, first_ok).squeeze(1)
    box_h = box_h.gather(1, first_ok).squeeze(1)

    # torchvision's fallback when all attempts fail: the largest centred box within the ratios.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(height * max(ratio))), height
    else:
        fb_w, fb_h = width, height
    box_w = torch.where(any_ok, box_w, torch.full_like(box_w, fb_w))
    box_h = torch.where(any_ok, box_h, torch.full_like(box_h, fb_h))

    u = torch.rand(2, batch, device=device, generator=generator)
    top = torch.minimum(torch.floor(u[0] * (height - box_h + 1)), height - box_h)
    left = torch.minimum(torch.floor(u[1] * (width - box_w + 1)), width - box_w)
    top = torch.where(any_ok, top, torch.full_like(top, (height - fb_h) // 2))
    left = torch.where(any_ok, left, torch.full_like(left, (width - fb_w) // 2))
    return top, left, box_h, box_w


def _crop_resize(x: torch.Tensor, top, left, box_h, box_w, size: int, flip=None) -> torch.Tensor:
    """Crop a box per image, resize it bilinearly to size x size and optionally mirror it.

    One affine grid and one grid_sample for the batch; the mirror is a negated x scale.
    With align_corners=False, pixel k's edges sit at -1 + 2k/W, so a box [left, left + box_w)
    maps to x_in = (box_w / W) * x_out + (2 * left + box_w) / W - 1.  Only for upsampling
    (box no larger than size): bilinear sampling does not antialias a downscale.
    """
    b, c, h, w = x.shape
    top, left = top.to(x.dtype), left.to(x.dtype)
    box_h, box_w = box_h.to(x.dtype), box_w.to(x.dtype)
    sx, sy = box_w / w, box_h / h
    tx = (2 * left + box_w) / w - 1
    ty = (2 * top + box_h) / h - 1
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    # torchvision crops before it resizes, so its interpolation clamps at the box's outer pixel
    # centres (pixel k's centre is at -1 + (2k + 1)/W); border padding alone would clamp at the
    # image's edge and blend in the pixels just outside the box.  A mirror keeps the same box.
    low = torch.stack([(2 * left + 1) / w - 1, (2 * top + 1) / h - 1], dim=-1)
    high = torch.stack([(2 * (left + box_w) - 1) / w - 1, (2 * (top + box_h) - 1) / h - 1], dim=-1)
    grid = torch.maximum(torch.minimum(grid, high[:, None, None, :]), low[:, None, None, :])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _pad_crop(x: torch.Tensor, pad: int, generator, pad_mode: str) -> torch.Tensor:
    """Pad by ``pad`` and take a random same-size crop per image (integer shifts, exact pixels)."""
    b, c, h, w = x.shape
    mode = "constant" if pad_mode == "zeros" else "reflect"
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    shifts = torch.randint(0, 2 * pad + 1, (2, b), device=x.device, generator=generator)
    rows = shifts[0][:, None] + torch.arange(h, device=x.device)
    cols = shifts[1][:, None] + torch.arange(w, device=x.device)
    batch_idx = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: [B, H, W, C].
    out = padded[batch_idx, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def _random_flip(x: torch.Tensor, generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _default_pad(native_size: int) -> int:
    """4 px for 32 px images (the standard CIFAR recipe), scaled down for smaller images."""
    return max(1, int(round(native_size / 8)))


def resolve_augment(augment: str, name: str, image_size: int, native_size) -> str:
    """Turn 'auto' into the paper's choice: RRC+flip when upsampling, else pad-crop(-flip)."""
    if augment not in AUGMENTS:
        raise UserError(f"unknown augmentation '{augment}'; choose one of {', '.join(AUGMENTS)}.")
    if name in FOLDER_DATASETS:
        if augment in ("pad-crop-flip", "pad-crop"):
            raise UserError(f"augmentation '{augment}' is only for array datasets; use rrc-flip or none "
                            f"for '{name}'.")
        return "rrc-flip" if augment == "auto" else augment
    if augment != "auto":
        return augment
    if image_size > native_size:
        return "rrc-flip"
    # Mirrored digits are not digits.
    return "pad-crop" if name == "digits" else "pad-crop-flip"


def _check_positive_int(value, what: str, flag: str):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UserError(f"{what} {value!r} must be a positive whole number; fix {flag}.")


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

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


def _step_sizes(n: int, batch_size: int, world_size: int) -> list:
    bounds = train_step_bounds(n, batch_size, world_size)
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _rank_share(start: int, stop: int, rank: int, world_size: int) -> tuple[int, int]:
    """``rank``'s contiguous part of positions [start, stop): sizes differ by at most one, the
    first ranks take the extra images, and a rank's part is empty only when the step has fewer
    images than there are ranks."""
    size, extra = divmod(stop - start, world_size)
    lo = start + rank * size + min(rank, extra)
    return lo, lo + size + (1 if rank < extra else 0)


def _train_spans(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    bounds = train_step_bounds(n, batch_size, world_size)
    return [_rank_share(a, b, rank, world_size) for a, b in zip(bounds, bounds[1:])]


def _eval_spans(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """Batches over this rank's strided, unpadded shard, as position ranges into that shard."""
    shard = len(range(rank, n, world_size))
    return [(a, min(a + batch_size, shard)) for a in range(0, shard, batch_size)]


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The training order of an epoch: the same on every rank, so the ranks' shares never overlap."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix_seed(seed, epoch, _STREAM_ORDER)))


def _check_start_batch(start_batch, length: int) -> int:
    if (isinstance(start_batch, bool) or not isinstance(start_batch, numbers.Integral)
            or not 0 <= start_batch <= length):
        raise ValueError(f"start_batch {start_batch!r} must be a whole number from 0 to the epoch's {length} batches")
    return int(start_batch)


def _check_rank(rank, world_size):
    if not (isinstance(world_size, numbers.Integral) and world_size >= 1
            and isinstance(rank, numbers.Integral) and 0 <= rank < world_size):
        raise ValueError(f"rank {rank!r} / world size {world_size!r} is not a valid process layout")


class TensorLoader:
    """Batches of an in-memory uint8 image set, augmented on its device, one batch at a time.

    ``images_u8``: numpy array or tensor, NHWC ([N, H, W, 3], as :func:`load_arrays` gives) or
    NCHW ([N, 3, H, W]); the images are moved to ``device`` once.  ``batch_size`` is per rank.

    Training: every rank iterates the same :func:`train_step_bounds` steps, each step's images
    split across the ranks without padding, so every image is used exactly once per epoch and
    the partial last step is kept.  A rank's batch can therefore be smaller than the others' in
    the last step, or even empty (only when that step holds fewer images than there are ranks);
    the engine weights each rank's loss by its batch size and runs an empty batch as a
    zero-size step.  The order depends on (seed, epoch), the augmentation draws on (seed, epoch,
    rank, batch index), so an epoch replays identically after a resume and
    ``set_epoch(epoch, start_batch=k)`` yields exactly its batches k, k+1, ...  Evaluation
    shards are strided and unpadded, so every image is scored exactly once: reduce sums, not means.
    Yields (float images [B, 3, S, S] in [0, 1] on device, int64 labels on device).
    """

    def __init__(self, images_u8, labels, batch_size, *, train, image_size, augment, device,
                 seed, rank=0, world_size=1, channels_last=False, dtype=torch.float32, pad_mode="zeros"):
        _check_positive_int(batch_size, "batch size", "--batch-size")
        _check_positive_int(image_size, "image size", "--image-size")
        _check_rank(rank, world_size)
        if augment not in AUGMENTS or augment == "auto":
            raise ValueError(f"TensorLoader needs a resolved augmentation, got {augment!r}")
        if pad_mode not in ("zeros", "reflect"):
            raise ValueError(f"pad_mode must be 'zeros' or 'reflect', got {pad_mode!r}")
        self.device = torch.device(device)
        if isinstance(images_u8, np.ndarray):
            images_u8 = torch.from_numpy(np.ascontiguousarray(images_u8))
        images = torch.as_tensor(images_u8)
        if images.dtype != torch.uint8 or images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
            raise ValueError(f"images must be uint8 [N, H, W, 3] or [N, 3, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        images = images.to(self.device)
        if images.shape[3] == 3:
            images = images.permute(0, 3, 1, 2)
        self.images = images.contiguous()
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).to(self.device)
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.images) == 0:
            raise UserError("a data split is empty; lower the validation size or raise the data rate.")
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.image_size = int(image_size)
        self.native_size = int(self.images.shape[-1])
        self.augment = augment if self.train else "none"
        height, width = self.images.shape[-2:]
        if self.augment == "rrc-flip" and self.image_size < max(height, width):
            # A crop can be the whole image, so a smaller output shrinks some crops; 'auto' picks
            # rrc-flip only to upsample, so per-crop antialiasing here would serve no default run.
            raise UserError(f"rrc-flip on {height}x{width} px array images only upsamples, but image size "
                            f"{self.image_size} would shrink large crops without antialiasing; use "
                            f"--image-size {max(height, width)} or more, or --augment pad-crop-flip.")
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.channels_last = channels_last
        self.dtype = dtype
        self.pad_mode = pad_mode
        self.pad = _default_pad(self.native_size)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0):
        """Iterate ``epoch`` from its batch ``start_batch`` on (mid-epoch resume); ``len`` stays
        the whole epoch's batch count."""
        self.epoch = int(epoch)
        self.start_batch = _check_start_batch(start_batch, len(self))

    @property
    def dataset_size(self) -> int:
        return len(self.images)

    def _plan(self, epoch: int):
        """(order on CPU, this rank's (start, stop) range into it for each batch)."""
        n = len(self.images)
        if self.train:
            return _epoch_order(self.seed, epoch, n), _train_spans(n, self.batch_size, self.rank, self.world_size)
        return (torch.arange(self.rank, n, self.world_size),
                _eval_spans(n, self.batch_size, self.rank, self.world_size))

    def indices(self, epoch: Optional[int] = None) -> torch.Tensor:
        """This rank's image indices (CPU int64) for an epoch, in iteration order."""
        order, spans = self._plan(self.epoch if epoch is None else int(epoch))
        return torch.cat([order[a:b] for a, b in spans] + [order[:0]])

    def __len__(self) -> int:
        n = len(self.images)
        if self.train:
            return len(train_step_bounds(n, self.batch_size, self.world_size)) - 1
        return len(_eval_spans(n, self.batch_size, self.rank, self.world_size))

    def step_sizes(self) -> list:
        """The global batch size of each training step (all ranks together), known on every rank."""
        return _step_sizes(len(self.images), self.batch_size, self.world_size)

    def _transform(self, x_u8: torch.Tensor, generator) -> torch.Tensor:
        size = self.image_size
        if len(x_u8) == 0:  # an empty share: only its shape matters (and resampling refuses 0 images)
            x = torch.zeros((0, x_u8.shape[1], size, size), device=x_u8.device)
        elif self.augment == "rrc-flip":
            x = x_u8.to(torch.float32).div_(255)
            top, left, box_h, box_w = _rrc_boxes(x.shape[0], x.shape[2], x.shape[3], generator, x.device)
            flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
            x = _crop_resize(x, top, left, box_h, box_w, size, flip)
        elif self.augment in ("pad-crop-flip", "pad-crop"):
            x_u8 = _pad_crop(x_u8, self.pad, generator, self.pad_mode)
            if self.augment == "pad-crop-flip":
                x_u8 = _random_flip(x_u8, generator)
            x = x_u8.to(torch.float32).div_(255)
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        else:
            x = _eval_resize_crop(x_u8.to(torch.float32).div_(255), size)
        x = x.clamp_(0, 1).to(self.dtype)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory_format)

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        order, spans = self._plan(epoch)
        # one copy per epoch; slicing it on the device then costs no host synchronisation
        order = order.to(self.device)
        for b in range(start, len(spans)):
            lo, hi = spans[b]
            idx = order[lo:hi]
            generator = None
            if self.augment != "none":
                # a generator per batch, not one stream per epoch, so batch b's draws do not depend
                # on the batches before it and a resumed epoch redraws them exactly
                generator = torch.Generator(device=self.device)
                generator.manual_seed(_mix_seed(self.seed, epoch, self.rank, b, _STREAM_AUGMENT))
            yield self._transform(self.images.index_select(0, idx), generator), self.labels.index_select(0, idx)


class _Relabel:
    """Picklable target transform (DataLoader workers need it) for class subsets."""

    def __init__(self, mapping: dict):
        self.mapping = dict(mapping)

    def __call__(self, target):
        return self.mapping[target]


def _unwrap_subset(dataset, index: int):
    """The innermost dataset under (possibly nested) Subsets, and ``index`` mapped into it."""
    from torch.utils.data import Subset

    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    return dataset, int(index)


def _is_image_folder(dataset) -> bool:
    return hasattr(dataset, "samples") and hasattr(dataset, "loader")


@dataclass
class _BadImage:
    """A file that failed to decode, returned by a worker instead of raising: an exception raised
    in a DataLoader worker reaches the main process wrapped in a multi-line traceback."""

    path: str
    problem: str

    @classmethod
    def of(cls, path, exc: BaseException):
        return cls(str(path), " ".join(f"{type(exc).__name__}: {exc}".split())[:300])

    def message(self, what: str = "") -> str:
        where = f"{what} image" if what else "image"
        return (f"{where} {self.path} cannot be decoded ({self.problem}); replace it with a good copy "
                "or remove it from the folder.")


def _open_image(path, decode):
    """``decode(path)`` with PIL's decompression-bomb warning raised as an error, so an oversized
    file stops the run instead of being decoded into gigabytes of memory."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return decode(path)


class _FolderItems(torch.utils.data.Dataset):
    """The items FolderLoader's DataLoader fetches, by key.

    A key is a dataset position, or for training (position, epoch seed, place in the epoch): the
    transform's random draws are then seeded per item, so they depend neither on which worker
    decodes the item nor on what it decoded before, and a resumed epoch redraws them exactly.
    An image-folder file that fails to decode comes back as a :class:`_BadImage`.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, epoch_seed, place = key
            # the main process's RNG drives training attacks when there are no workers: keep it
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix_seed(epoch_seed, place))
                return self._item(index)
        return self._item(key)

    def _item(self, index):
        root, i = _unwrap_subset(self.dataset, index)
        if not _is_image_folder(root):
            return self.dataset[index]
        path, target = root.samples[i]
        try:
            sample = _open_image(path, root.loader)
        except Exception as exc:  # PIL's format plugins raise many exception types for a malformed file
            return _BadImage.of(path, exc)
        if root.transform is not None:
            sample = root.transform(sample)
        if root.target_transform is not None:
            target = root.target_transform(target)
        return sample, target


def _collate_checked(items):
    for item in items:
        if isinstance(item, _BadImage):
            return item
    return torch.utils.data.default_collate(items)


class _FolderPlan(torch.utils.data.Sampler):
    """FolderLoader's epoch plan and its DataLoader's batch sampler: the current epoch's batches
    of item keys from the start batch on.  Empty shares are left out (a DataLoader cannot fetch
    an empty batch); FolderLoader yields those itself.  It holds no reference to the loader: a
    loader <-> sampler cycle would leave an abandoned iterator to the cycle collector, whose
    worker shutdown then waits out its join timeouts (10 s seen)."""

    def __init__(self, n, batch_size, train, seed, rank, world_size):
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0

    def spans(self):
        if self.train:
            return _train_spans(self.n, self.batch_size, self.rank, self.world_size)
        return _eval_spans(self.n, self.batch_size, self.rank, self.world_size)

    def keys(self, epoch: int) -> list:
        """This rank's batches of item keys for ``epoch``, the whole epoch, empty shares included."""
        spans = self.spans()
        if self.train:
            order = _epoch_order(self.seed, epoch, self.n).tolist()
            epoch_seed = _mix_seed(self.seed, epoch, _STREAM_AUGMENT)
            return [[(order[p], epoch_seed, p) for p in range(a, b)] for a, b in spans]
        shard = range(self.rank, self.n, self.world_size)
        return [list(shard[a:b]) for a, b in spans]

    def __iter__(self):
        for keys in self.keys(self.epoch)[self.start_batch:]:
            if keys:
                yield keys

    def __len__(self):
        return sum(1 for a, b in self.spans()[self.start_batch:] if b > a)


class FolderLoader:
    """A DataLoader over an image-folder dataset that behaves like :class:`TensorLoader`.

    The same epoch plan: every rank takes part in the same :func:`train_step_bounds` steps, each
    step's images split across ranks without padding (an empty share comes out as a zero-size
    batch), and evaluation shards strided and unpadded.  The order depends on (seed, epoch), each
    image's augmentation draws on (seed, epoch, its place in the epoch), whatever worker decodes
    it, so ``set_epoch(epoch, start_batch=k)`` resumes an epoch exactly.  A file that fails to
    decode, or exceeds PIL's decompression-bomb limit, raises one UserError naming it.  Batches
    are moved to ``device``.  ``image_size`` (the transforms' output size) shapes empty batches;
    None reads it from the first item.
    """

    def __init__(self, dataset, batch_size, *, train, device, seed, workers=4, rank=0, world_size=1,
                 channels_last=False, dtype=torch.float32, prefetch_factor=4, image_size=None):
        from torch.utils.data import DataLoader

        _check_positive_int(batch_size, "batch size", "--batch-size")
        _check_rank(rank, world_size)
        if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 0:
            raise UserError(f"worker count {workers!r} must be 0 or more; fix --workers.")
        if len(dataset) == 0:
            raise UserError("a data split is empty; lower the validation size or raise the data rate.")
        self.dataset = dataset
        self.device = torch.device(device)
        self.train = bool(train)
        self.image_size = image_size
        self.channels_last = channels_last
        self.dtype = dtype
        self.plan = _FolderPlan(len(dataset), int(batch_size), self.train, int(seed), int(rank), int(world_size))
        kwargs = dict(batch_sampler=self.plan, num_workers=int(workers),
                      pin_memory=self.device.type == "cuda", collate_fn=_collate_checked)
        if workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor)
        # its own generator: every new iterator draws a base seed, and drawing it from the global RNG
        # (which the training attacks use) would make a resumed run, which makes one iterator more,
        # differ from an uninterrupted one; items are seeded per position, so the base seed is unused
        kwargs["generator"] = torch.Generator()
        self.loader = DataLoader(_FolderItems(dataset), **kwargs)

    def set_epoch(self, epoch: int, start_batch: int = 0):
        """Iterate ``epoch`` from its batch ``start_batch`` on (mid-epoch resume); ``len`` stays
        the whole epoch's batch count."""
        self.plan.epoch = int(epoch)
        self.plan.start_batch = _check_start_batch(start_batch, len(self))

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    @property
    def dataset_size(self) -> int:
        return self.plan.n

    def __len__(self) -> int:
        return len(self.plan.spans())

    def step_sizes(self) -> list:
        """The global batch size of each training step (all ranks together), known on every rank."""
        return _step_sizes(self.plan.n, self.plan.batch_size, self.plan.world_size)

    def close(self):
        """Stop the worker processes now; the next iteration starts new ones.  Left to the
        garbage collector (an iteration abandoned with an exception), the shutdown waits out its
        join timeouts, 10 s for two workers."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def _empty_batch(self, memory_format):
        if self.image_size is not None:
            shape = (3, int(self.image_size), int(self.image_size))
        else:
            first = _FolderItems(self.dataset)[0]
            if isinstance(first, _BadImage):
                raise UserError(first.message())
            shape = tuple(first[0].shape)
        images = torch.zeros((0, *shape), dtype=self.dtype, device=self.device)
        return images.contiguous(memory_format=memory_format), torch.zeros(0, dtype=torch.int64, device=self.device)

    def __iter__(self):
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        spans, start = self.plan.spans(), self.plan.start_batch
        for batch in self.loader:
            if isinstance(batch, _BadImage):
                self.close()
                raise UserError(batch.message("training" if self.train else ""))
            images, labels = batch
            images = images.to(self.device, non_blocking=True).to(self.dtype)
            yield images.contiguous(memory_format=memory_format), labels.to(self.device, non_blocking=True)
        # only the last step can leave a rank an empty share (every earlier step is a full global batch)
        if start < len(spans) and spans[-1][0] == spans[-1][1]:
            yield self._empty_batch(memory_format)


class _ImageCheck(torch.utils.data.Dataset):
    """Decodes one image-folder file and returns None, or the message naming it when it fails."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        from PIL import Image

        root, i = _unwrap_subset(self.dataset, index)
        path = root.samples[i][0]

        def decode(p):
            with Image.open(p) as image:
                # JPEGs decode at 1/8 scale: the whole compressed stream is still read, so a
                # truncated file still fails, in a fraction of a full decode's time
                image.draft("RGB", (1, 1))
                image.load()

        try:
            _open_image(path, decode)
        except Exception as exc:  # PIL's format plugins raise many exception types for a malformed file
            return _BadImage.of(path, exc)
        return None


def check_images(dataset, what: str, *, workers=0, rank=0, world_size=1):
    """Decode every image of an image-folder split this rank evaluates (its strided shard) and
    raise one UserError naming the first file that fails, on every rank.

    Evaluation splits are read only at validation (possibly many epochs in) and at the very end,
    so a bad file there would otherwise surface after the whole training run.
    """
    from torch.utils.data import DataLoader

    from utils import distributed as du

    shard = list(range(rank, len(dataset), world_size))
    loader = DataLoader(_ImageCheck(dataset), batch_size=64, sampler=shard, num_workers=int(workers),
                        collate_fn=list)
    bad = [item for batch in loader for item in batch if item is not None]
    found = [(bad[0] if bad else None, len(bad))]
    if world_size > 1 and du.is_distributed():
        found = du.all_gather_object(found[0])
    total = sum(count for _, count in found)
    first = next((b for b, _ in found if b is not None), None)
    if first is not None:
        more = f" ({total - 1} more {what} images fail too)" if total > 1 else ""
        raise UserError(first.message(what)[:-1] + more + ".")


# --------------------------------------------------------------------------------------------
# One entry point
# --------------------------------------------------------------------------------------------

@dataclass
class Data:
    """Everything a run needs from its dataset; indices refer to the original training set."""

    train: object
    val: Optional[object]
    test: object
    num_classes: int
    mean: tuple
    std: tuple
    native_size: Optional[int]  # None for image folders (no single native size)
    image_size: int
    train_indices: np.ndarray
    val_indices: np.ndarray
    name: str = ""
    augment: str = ""
    subset_rule: str = "random"  # how the data-limited training images were chosen (SUBSET_RULES)
    subset_seed: int = 0


def _folder_transforms(image_size: int, augment: str):
    from torchvision import transforms as T

    evaluation = T.Compose([T.Resize(resize_size(image_size)), T.CenterCrop(image_size), T.ToTensor()])
    if augment == "rrc-flip":
        train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor()])
    else:
        train = evaluation
    return train, evaluation


def _image_folder(path: Path, name: str, what: str):
    from torchvision.datasets import ImageFolder

    hint = _IMAGENET_HINT if name == "imagenet" else _FOLDER_HINT
    if not path.is_dir():
        raise UserError(f"expected the {what} folder {path} ({hint}); pass its parent folder with --data.")
    try:
        return ImageFolder(str(path))
    except FileNotFoundError as exc:
        raise UserError(f"{path} is not usable as the {what} split ({str(exc)[:200]}); it must hold "
                        f"class subfolders of images ({hint}).") from None


def build_folder_loaders(name: str, root, *, image_size=None, batch_size, eval_batch_size=None,
                         val_size=None, data_rate=1.0, seed=0, device="cpu", workers=4, augment="auto",
                         classes=None, rank=0, world_size=1, channels_last=False, subset="random",
                         subset_seed=0) -> Data:
    """Loaders for ``<root>/train`` and ``<root>/val`` image folders.

    The validation split is the last ``val_size`` images of a fixed (FOLDER_SPLIT_SEED)
    permutation of the train folder's sorted samples: the sorted list is grouped by class,
    so its literal tail would be a few whole classes missing from training.  The training split
    is the rest in that permutation's order, so ``subset='first'`` keeps its first N images
    (sorted by class they would be a few whole classes).  Every test and validation image is
    decoded once before training (:func:`check_images`); a bad training image stops the first
    epoch, which reads them all, with the same one-line error.
    """
    _check_subset(subset, subset_seed)
    root = _require_root(name, root)
    image_size = FOLDER_DEFAULT_IMAGE_SIZE if image_size is None else image_size
    _check_positive_int(image_size, "image size", "--image-size")
    augment = resolve_augment(augment, name, image_size, None)
    train_tf, eval_tf = _folder_transforms(image_size, augment)

    train_set = _image_folder(root / "train", name, "training")
    test_set = _image_folder(root / "val", name, "test (val)")
    if test_set.classes != train_set.classes:
        only_train = sorted(set(train_set.classes) - set(test_set.classes))[:5]
        only_test = sorted(set(test_set.classes) - set(train_set.classes))[:5]
        raise UserError(f"{root}/train and {root}/val have different class subfolders (only in train: "
                        f"{only_train}, only in val: {only_test}); give both the same classes.")
    num_classes = len(train_set.classes)
    train_targets = np.asarray(train_set.targets, dtype=np.int64)
    test_targets = np.asarray(test_set.targets, dtype=np.int64)
    pool = np.arange(len(train_targets), dtype=np.int64)
    test_idx = np.arange(len(test_targets), dtype=np.int64)
    if classes is not None:
        picked = _check_classes(classes, num_classes, name)
        relabel = _Relabel({c: i for i, c in enumerate(picked)})
        train_set.target_transform = relabel
        test_set.target_transform = relabel
        pool = pool[np.isin(train_targets, picked)]
        test_idx = test_idx[np.isin(test_targets, picked)]
        num_classes = len(picked)

    n_val = _resolve_val_size(name, len(pool), val_size)
    shuffled = pool[np.random.default_rng(FOLDER_SPLIT_SEED).permutation(len(pool))]
    val_indices = np.sort(shuffled[len(pool) - n_val:])
    train_indices = training_subset(name, train_targets, shuffled[:len(pool) - n_val], data_rate, subset,
                                    subset_seed)

    from torch.utils.data import Subset

    eval_set = copy.copy(train_set)
    eval_set.transform = eval_tf
    train_set.transform = train_tf
    test_set.transform = eval_tf
    eval_bs = batch_size if eval_batch_size is None else eval_batch_size
    common = dict(device=device, seed=seed, workers=workers, rank=rank, world_size=world_size,
                  channels_last=channels_last, image_size=int(image_size))
    test_subset = Subset(test_set, test_idx.tolist())
    val_subset = Subset(eval_set, val_indices.tolist())
    check_images(test_subset, "test", workers=workers, rank=rank, world_size=world_size)
    if n_val:
        check_images(val_subset, "validation", workers=workers, rank=rank, world_size=world_size)
    train = FolderLoader(Subset(train_set, train_indices.tolist()), batch_size, train=True, **common)
    val = FolderLoader(val_subset, eval_bs, train=False, **common) if n_val else None
    test = FolderLoader(test_subset, eval_bs, train=False, **common)
    mean, std = DATASET_STATS[name]
    return Data(train=train, val=val, test=test, num_classes=num_classes, mean=mean, std=std,
                native_size=None, image_size=int(image_size), train_indices=train_indices,
                val_indices=val_indices, name=name, augment=augment, subset_rule=subset,
                subset_seed=int(subset_seed))


def build_data(name: str, root=None, *, image_size=None, batch_size, eval_batch_size=None, val_size=None,
               data_rate=1.0, seed=0, device="cpu", workers=4, augment="auto", classes=None, rank=0,
               world_size=1, channels_last=False, subset="random", subset_seed=0) -> Data:
    """Train / validation / test loaders for one dataset, following the paper's protocol.

    Validation = the last ``val_size`` training images (default: :func:`default_val_size`;
    0 means no validation loader).  ``data_rate`` < 1 keeps part of the rest (validation stays
    whole), chosen by ``subset`` (:func:`training_subset`): 'random', a class-balanced draw
    seeded by (``subset_seed``, dataset, rate) and never by the training ``seed``, so every
    training seed gets the same images; 'first', the first round(rate * n) images of the
    training split, as the seed code.  ``seed`` drives the training order and augmentation.
    ``batch_size`` is per rank.  ``image_size`` None means the native size.
    """
    _check_name(name)
    _check_subset(subset, subset_seed)
    if name in FOLDER_DATASETS:
        return build_folder_loaders(name, root, image_size=image_size, batch_size=batch_size,
                                    eval_batch_size=eval_batch_size, val_size=val_size, data_rate=data_rate,
                                    seed=seed, device=device, workers=workers, augment=augment,
                                    classes=classes, rank=rank, world_size=world_size,
                                    channels_last=channels_last, subset=subset, subset_seed=subset_seed)
    _check_positive_int(batch_size, "batch size", "--batch-size")
    if eval_batch_size is not None:
        _check_positive_int(eval_batch_size, "evaluation batch size", "--eval-batch-size")
    arrays = load_arrays(name, root, classes)
    image_size = arrays.native_size if image_size is None else image_size
    _check_positive_int(image_size, "image size", "--image-size")
    augment = resolve_augment(augment, name, image_size, arrays.native_size)

    n_train = len(arrays.train_y)
    n_val = _resolve_val_size(name, n_train, val_size)
    val_pos = np.arange(n_train - n_val, n_train, dtype=np.int64)
    train_pos = training_subset(name, arrays.train_y, np.arange(n_train - n_val, dtype=np.int64), data_rate,
                                subset, subset_seed)

    eval_bs = batch_size if eval_batch_size is None else eval_batch_size
    common = dict(image_size=image_size, device=device, seed=seed, rank=rank, world_size=world_size,
                  channels_last=channels_last)
    train = TensorLoader(arrays.train_x[train_pos], arrays.train_y[train_pos], batch_size, train=True,
                         augment=augment, **common)
    val = (TensorLoader(arrays.train_x[val_pos], arrays.train_y[val_pos], eval_bs, train=False,
                        augment="none", **common) if n_val else None)
    test = TensorLoader(arrays.test_x, arrays.test_y, eval_bs, train=False, augment="none", **common)
    mean, std = DATASET_STATS[name]
    source = arrays.train_source_index
    return Data(train=train, val=val, test=test, num_classes=arrays.num_classes, mean=mean, std=std,
                native_size=arrays.native_size, image_size=int(image_size),
                train_indices=source[train_pos], val_indices=source[val_pos], name=name, augment=augment,
                subset_rule=subset, subset_seed=int(subset_seed))
