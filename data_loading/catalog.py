"""Which datasets exist and the fixed facts of each: per-channel statistics, native image size,
class count."""

from utils.errors import UserError

ARRAY_DATASETS = ("cifar10", "cifar100", "svhn", "digits")
FOLDER_DATASETS = ("folder", "imagenet")
DATASETS = ARRAY_DATASETS + FOLDER_DATASETS

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


def check_name(name: str):
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}.")
