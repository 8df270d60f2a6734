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

The pieces live in data_loading/, one concept a module; this entry assembles them and keeps
every name callers use reachable here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data_loading.augment import AUGMENTS, _crop_resize, _rrc_boxes, folder_transforms, resize_size, resolve_augment
from data_loading.batching import MIN_LAST_STEP, _rank_share, check_positive_int, train_step_bounds
from data_loading.catalog import (
    ARRAY_DATASETS,
    DATASET_STATS,
    DATASETS,
    FOLDER_DATASETS,
    FOLDER_DEFAULT_IMAGE_SIZE,
    NATIVE_SIZE,
    NUM_CLASSES,
    check_name,
)
from data_loading.folder_loader import PIPELINES, FolderLoader, check_images
from data_loading.folder_nvjpeg import resolve_pipeline
from data_loading.readers import ArrayData, Relabel, check_classes, image_folder, load_arrays, require_root
from data_loading.splits import (
    FOLDER_SPLIT_SEED,
    PAPER_VAL_SIZE,
    SUBSET_RULES,
    check_subset,
    data_rate_subset,
    default_val_size,
    resolve_val_size,
    subset_draw_seed,
    training_subset,
)
from data_loading.tensor_loader import TensorLoader
from utils.errors import UserError

__all__ = [
    "ARRAY_DATASETS", "AUGMENTS", "DATASETS", "DATASET_STATS", "FOLDER_DATASETS", "FOLDER_DEFAULT_IMAGE_SIZE",
    "FOLDER_SPLIT_SEED", "MIN_LAST_STEP", "NATIVE_SIZE", "NUM_CLASSES", "PAPER_VAL_SIZE", "PIPELINES", "SUBSET_RULES",
    "ArrayData", "Data", "FolderLoader", "TensorLoader", "build_data", "build_folder_loaders", "check_images",
    "data_rate_subset", "default_val_size", "load_arrays", "resize_size", "resolve_augment", "subset_draw_seed",
    "train_step_bounds", "training_subset",
    # not public, but tests reach into them through this module
    "_crop_resize", "_rank_share", "_rrc_boxes",
]


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


def build_folder_loaders(name: str, root, *, image_size=None, batch_size, eval_batch_size=None,
                         val_size=None, data_rate=1.0, seed=0, device="cpu", workers=4, augment="auto",
                         classes=None, rank=0, world_size=1, channels_last=False, subset="random",
                         subset_seed=0, folder_loader="uint8") -> Data:
    """Loaders for ``<root>/train`` and ``<root>/val`` image folders.

    The validation split is the last ``val_size`` images of a fixed (FOLDER_SPLIT_SEED)
    permutation of the train folder's sorted samples: the sorted list is grouped by class,
    so its literal tail would be a few whole classes missing from training.  The training split
    is the rest in that permutation's order, so ``subset='first'`` keeps its first N images
    (sorted by class they would be a few whole classes).  Every test and validation image is
    decoded once before training (:func:`check_images`); a bad training image stops the first
    epoch, which reads them all, with the same one-line error.  ``folder_loader`` picks how
    files become batches (FolderLoader's ``pipeline``: 'uint8', 'pil' or 'nvjpeg', which falls
    back to 'uint8' with one printed line where the device cannot decode JPEGs).
    """
    check_subset(subset, subset_seed)
    if folder_loader not in PIPELINES:
        raise UserError(f"unknown folder loader '{folder_loader}'; choose one of {', '.join(PIPELINES)}.")
    folder_loader = resolve_pipeline(folder_loader, device, announce=rank == 0)
    root = require_root(name, root)
    image_size = FOLDER_DEFAULT_IMAGE_SIZE if image_size is None else image_size
    check_positive_int(image_size, "image size", "--image-size")
    augment = resolve_augment(augment, name, image_size, None)

    train_set = image_folder(root / "train", name, "training")
    test_set = image_folder(root / "val", name, "test (val)")
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
        picked = check_classes(classes, num_classes, name)
        relabel = Relabel({c: i for i, c in enumerate(picked)})
        train_set.target_transform = relabel
        test_set.target_transform = relabel
        pool = pool[np.isin(train_targets, picked)]
        test_idx = test_idx[np.isin(test_targets, picked)]
        num_classes = len(picked)

    n_val = resolve_val_size(name, len(pool), val_size)
    shuffled = pool[np.random.default_rng(FOLDER_SPLIT_SEED).permutation(len(pool))]
    val_indices = np.sort(shuffled[len(pool) - n_val:])
    train_indices = training_subset(name, train_targets, shuffled[:len(pool) - n_val], data_rate, subset,
                                    subset_seed)

    from torch.utils.data import Subset

    eval_set = copy.copy(train_set)
    if folder_loader == "pil":
        train_tf, eval_tf = folder_transforms(image_size, augment)
        eval_set.transform = eval_tf
        train_set.transform = train_tf
        test_set.transform = eval_tf
    eval_bs = batch_size if eval_batch_size is None else eval_batch_size
    common = dict(device=device, seed=seed, workers=workers, rank=rank, world_size=world_size,
                  channels_last=channels_last, image_size=int(image_size), pipeline=folder_loader,
                  augment=augment)
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
               world_size=1, channels_last=False, subset="random", subset_seed=0, folder_loader="uint8") -> Data:
    """Train / validation / test loaders for one dataset, following the paper's protocol.

    Validation = the last ``val_size`` training images (default: :func:`default_val_size`;
    0 means no validation loader).  ``data_rate`` < 1 keeps part of the rest (validation stays
    whole), chosen by ``subset`` (:func:`training_subset`): 'random', a class-balanced draw
    seeded by (``subset_seed``, dataset, rate) and never by the training ``seed``, so every
    training seed gets the same images; 'first', the first round(rate * n) images of the
    training split, as the seed code.  ``seed`` drives the training order and augmentation.
    ``folder_loader`` ('uint8', 'pil' or 'nvjpeg') is how image folders are read (build_folder_loaders).
    ``batch_size`` is per rank.  ``image_size`` None means the native size.
    """
    check_name(name)
    check_subset(subset, subset_seed)
    if name in FOLDER_DATASETS:
        return build_folder_loaders(name, root, image_size=image_size, batch_size=batch_size,
                                    eval_batch_size=eval_batch_size, val_size=val_size, data_rate=data_rate,
                                    seed=seed, device=device, workers=workers, augment=augment,
                                    classes=classes, rank=rank, world_size=world_size,
                                    channels_last=channels_last, subset=subset, subset_seed=subset_seed,
                                    folder_loader=folder_loader)
    check_positive_int(batch_size, "batch size", "--batch-size")
    if eval_batch_size is not None:
        check_positive_int(eval_batch_size, "evaluation batch size", "--eval-batch-size")
    arrays = load_arrays(name, root, classes)
    image_size = arrays.native_size if image_size is None else image_size
    check_positive_int(image_size, "image size", "--image-size")
    augment = resolve_augment(augment, name, image_size, arrays.native_size)

    n_train = len(arrays.train_y)
    n_val = resolve_val_size(name, n_train, val_size)
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
