"""The flags both entry points share, their checks and the defaults their help states: torch-free, so
the sweep parses a grid's stage-2 command lines (plan, status) without loading torch. training/setup.py
hands these on to the stages; the torch-bound set-up (data, model, precision) stays there."""

import math
import os

from data_loading.catalog import FOLDER_DATASETS
from utils.cli import class_list, fraction, label
from utils.errors import UserError

# --max-loss's default, which both stages' --help state and training.engine.LossGuard applies
MAX_LOSS_FACTOR = 100  # a loss 100x that of a uniform prediction is divergence, not learning
MAX_LOSS_PATIENCE = 10  # ... when it lasts this many consecutive steps

FOLDER_HELP = ("folder = your own image-folder tree: --data holds train/ and val/, each with one subfolder per "
               "class (the same names in both); images are resized to --image-size and normalised with "
               "ImageNet's statistics")
# DataLoader processes per rank when --workers is not given (folder datasets only); fewer on a
# machine with fewer CPUs, where more would only compete for them (PyTorch warns about it)
DEFAULT_WORKERS = 4


def available_cpus():
    """The CPUs this process may run on (its affinity mask, which SLURM and taskset set), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def default_workers():
    """DEFAULT_WORKERS, or the CPUs available to each of the node's processes (torchrun's
    LOCAL_WORLD_SIZE) if that is fewer: at least 0 (loading in the main process)."""
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return min(DEFAULT_WORKERS, available_cpus() // ranks)


def add_common_args(p, datasets, defaults=None):
    """Flags both entry points share (docs/contracts.md §4), with the seed repo's underscore aliases.

    ``defaults``: dest -> what the stage uses for a flag left unset (lr, weight_decay, batch_size,
    alpha, attack_bn, pretrain), said in its --help."""
    said = dict(defaults or {})

    def text(dest, words):
        return f"{words} (default: {said[dest]})" if dest in said else words

    p.add_argument("--data", default=None, help="dataset root folder (default: none; needed by every --dataset but "
                                                "digits, which comes with scikit-learn)")
    p.add_argument("--dataset", required=True, choices=datasets, help=FOLDER_HELP if "folder" in datasets else None)
    p.add_argument("--folder-loader", choices=["uint8", "pil", "nvjpeg"], default=None,
                   help="how image folders are read: uint8 (default; decode, crop, resize and flip at uint8 in "
                        "the loader workers, float on the device), pil (torchvision's PIL transforms, float "
                        "batches; the same crops and flips) or nvjpeg (as uint8, but decoded and cropped on the "
                        "GPU; uint8 where it cannot); docs/stage1.md")
    p.add_argument("--classes", type=class_list, default=None,
                   help="use only these classes of the dataset, relabelled 0..k-1 (e.g. 0-4 or 5,6,7; default: all)")
    p.add_argument("--arch", default="resnet50", help="resnet18/34/50/101/152, wide_resnet50_2, resnet10, resnet_tiny")
    p.add_argument("--cifar-stem", "--cifar_stem", action="store_true",
                   help="3x3 stride-1 stem without max-pool, for native 32 px inputs")
    p.add_argument("--reinit-stem", action="store_true",
                   help="keep a freshly initialised first conv instead of θ_p's (needed to put ImageNet "
                        "weights into a --cifar-stem model); the ticket's stem mask is then ignored")
    p.add_argument("--init", "--pretrained", dest="init", required=True,
                   help="pre-trained weights θ_p (torchvision, robustness, fast_adversarial, seed or ours; "
                        "docs/checkpoints.md); 'none' trains from random initialisation")
    p.add_argument("--pretrain", type=label, default=None,
                   help=text("pretrain", "label of the pre-training, e.g. std, fat, at (letters, digits, '.', "
                                         "'_', '-': it names folders)"))
    p.add_argument("--image-size", "--image_size", type=int, default=None,
                   help="input resolution (default: 224 for CIFAR/SVHN as in the paper and for image folders, "
                        "native for digits)")
    p.add_argument("--augment", default="auto", choices=["auto", "rrc-flip", "pad-crop-flip", "pad-crop", "none"],
                   help="training augmentation; auto = random-resized crop and flip when images are upsampled (the "
                        "paper's 224 px) and for image folders, else pad-crop-flip (pad-crop for digits)")
    p.add_argument("--lr", type=float, default=None, help=text("lr", "SGD learning rate"))
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", "--weight_decay", type=float, default=None,
                   help=text("weight_decay", "SGD weight decay"))
    p.add_argument("--batch-size", "--batch_size", type=int, default=None,
                   help=text("batch_size", "global batch size over all GPUs"))
    p.add_argument("--eps", type=fraction, default=8 / 255,
                   help="attack radius in [0,1] pixels, e.g. 8/255 (default: 8/255)")
    p.add_argument("--alpha", type=fraction, default=None, help=text("alpha", "attack step size, e.g. 2/255"))
    p.add_argument("--attack-bn", "--attack_bn", choices=["train", "eval"], default="train",
                   help=text("attack_bn", "BatchNorm mode while crafting training attacks (the seed code used train)"))
    p.add_argument("--seed", type=int, default=1, help="seed of the run's randomness (initialisation, order, attacks)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help=f"loader processes per GPU process (folder datasets only; default: {DEFAULT_WORKERS}, or the "
                        f"CPUs available to each process if fewer: here {default_workers()})")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="autocast precision; auto = bf16 on CUDA, off on CPU")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=True,
                   help="NHWC memory format (the default: faster on CUDA and on the CPU, benchmarks/README.md)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
                   help="turn off cuDNN autotuning (on by default on CUDA; off makes the kernel choice repeatable)")
    p.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    p.add_argument("--save-dir", "--save_dir", dest="save_dir", required=True)
    p.add_argument("--restart", action="store_true",
                   help="discard the unfinished run in --save-dir (checkpoint, config, log, tickets; each is "
                        "printed) and start afresh, e.g. after a divergence; a finished run is never discarded")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return p


def _flag(name):
    return "--" + name.replace("_", "-")


def check_common_args(args):
    """Refuse values that would crash deep inside training or silently compute nonsense.

    Optional stage-specific attributes (``test_eps``, ``test_alpha``) are checked when present."""
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a positive finite number, not {args.lr}.")
    if args.weight_decay is not None and not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UserError(f"--weight-decay must be a non-negative finite number, not {args.weight_decay}.")
    if not 0 <= args.momentum < 1:  # also refuses NaN; momentum 1 never forgets a gradient and diverges
        raise UserError(f"--momentum must lie in [0, 1), not {args.momentum}; the paper uses 0.9.")
    if not 0 <= args.seed < 2 ** 32:  # numpy's seed range
        raise UserError(f"--seed must lie in [0, 2**32), not {args.seed}.")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, not {args.workers}.")
    if (getattr(args, "folder_loader", None) is None and args.dataset in FOLDER_DATASETS
            and getattr(args, "method", "imp") in ("imp", "lmp")):  # stage 2 has no --method; it reads images
        args.folder_loader = "uint8"  # recorded in config.json: PIL-path runs differ in the resize's rounding
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {args.batch_size}.")
    if args.image_size is not None and args.image_size < 8:
        raise UserError(f"--image-size must be at least 8 pixels, not {args.image_size}.")
    for name in ("eps", "test_eps"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f"{_flag(name)} must lie in [0, 1] (pixel scale, e.g. 8/255), not {value}.")
    for name in ("alpha", "test_alpha"):
        value = getattr(args, name, None)
        if value is not None and not 0 < value <= 1:
            raise UserError(f"{_flag(name)} must lie in (0, 1] (pixel scale, e.g. 2/255), not {value}.")


def default_image_size(name):
    """The paper upsamples CIFAR/SVHN to 224; small demo data stays native."""
    return {"cifar10": 224, "cifar100": 224, "svhn": 224, "imagenet": 224, "folder": 224}.get(name)
