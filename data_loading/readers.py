"""Readers of each dataset's original on-disk format: CIFAR python batches, SVHN .mat files,
scikit-learn's digits (array datasets, read whole into uint8 NHWC arrays) and ImageFolder trees
(streamed later by the folder loader); class subsets of both."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from data_loading.catalog import FOLDER_DATASETS, NATIVE_SIZE, check_name
from data_loading.safe_unpickle import restricted_unpickle
from utils.errors import UserError

_CIFAR10_SOURCE = ("the 'CIFAR-10 python version' archive (cifar-10-python.tar.gz) from "
                   "https://www.cs.toronto.edu/~kriz/cifar.html, extracted")
_CIFAR100_SOURCE = ("the 'CIFAR-100 python version' archive (cifar-100-python.tar.gz) from "
                    "https://www.cs.toronto.edu/~kriz/cifar.html, extracted")
_SVHN_SOURCE = ("the SVHN 'Format 2: Cropped Digits' file of the same name from "
                "http://ufldl.stanford.edu/housenumbers/")


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


def require_root(name: str, root) -> Path:
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
    batch = restricted_unpickle(path, source)
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
    base = _dataset_dir(require_root(which, root), folder, train_files[0])

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
    root = require_root("svhn", root)
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


def check_classes(classes, num_classes: int, name: str) -> list[int]:
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
    check_name(name)
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
        picked = check_classes(classes, num_classes, name)
        keep, train_y = _select_classes(train_y, picked)
        train_x, source_index = train_x[keep], source_index[keep]
        keep_test, test_y = _select_classes(test_y, picked)
        test_x = test_x[keep_test]
        num_classes = len(picked)
    return ArrayData(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                     num_classes=num_classes, native_size=NATIVE_SIZE[name],
                     train_source_index=source_index)


class Relabel:
    """Picklable target transform (DataLoader workers need it) for class subsets."""

    def __init__(self, mapping: dict):
        self.mapping = dict(mapping)

    def __call__(self, target):
        return self.mapping[target]


def image_folder(path: Path, name: str, what: str):
    from torchvision.datasets import ImageFolder

    hint = _IMAGENET_HINT if name == "imagenet" else _FOLDER_HINT
    if not path.is_dir():
        raise UserError(f"expected the {what} folder {path} ({hint}); pass its parent folder with --data.")
    try:
        return ImageFolder(str(path))
    except FileNotFoundError as exc:
        raise UserError(f"{path} is not usable as the {what} split ({str(exc)[:200]}); it must hold "
                        f"class subfolders of images ({hint}).") from None
