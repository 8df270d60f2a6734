"""Set-up shared by both entry points: flags common to both stages, data, model, precision.

Keeping this in one place means stage 1 and stage 2 build data and models the same way, so a
ticket found in stage 1 always fits the model stage 2 builds from the same flags.
"""

import math
import os
from pathlib import Path

import torch

import dataset
import models
from data_loading.splits import val_size_note
from training.engine import Precision
from utils import distributed as du
from utils.cli import class_list, fraction, label
from utils.errors import Preempted, UserError
from utils.rundir import lock_run_dir, prepare_run_dir, release_locks

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
    if (getattr(args, "folder_loader", None) is None and args.dataset in dataset.FOLDER_DATASETS
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


def build_data(args, dist_info, *, batch_size, data_rate=1.0, val_size=None, notes=None):
    """The stage's data; a default validation split smaller than the paper's is said once (and added
    to ``notes``, the run's adaptations, when given)."""
    per_rank = batch_size // dist_info.world_size
    if per_rank < 1 or batch_size % dist_info.world_size:
        raise UserError(f"--batch-size {batch_size} is the global batch and must be a multiple of the "
                        f"{dist_info.world_size} processes.")
    image_size = args.image_size if args.image_size is not None else default_image_size(args.dataset)
    data = dataset.build_data(
        args.dataset, args.data, image_size=image_size, batch_size=per_rank, eval_batch_size=max(per_rank, 64),
        val_size=val_size, data_rate=data_rate, seed=args.seed, device=dist_info.device, workers=args.workers,
        augment=args.augment, classes=args.classes, rank=dist_info.rank, world_size=dist_info.world_size,
        channels_last=bool(args.channels_last), subset=getattr(args, "subset", "random"),
        subset_seed=getattr(args, "subset_seed", 0), folder_loader=getattr(args, "folder_loader", None) or "uint8")
    note = val_size_note(len(data.val_indices), val_size)
    if note is not None:
        adapted(note, notes)
    return data


def adapted(text, notes=None):
    """An adaptation the run makes to what was asked: said once, in one line, and added to ``notes``
    (which the stage records in run_info.json)."""
    log(f"note: {text}")
    if notes is not None:
        notes.append(text)


def build_model(args, data, device, load_head):
    """The model of ``--arch`` for ``data``, with θ_p from ``--init`` loaded (or fresh for 'none')."""
    model = models.build_model(args.arch, data.num_classes, cifar_stem=args.cifar_stem, mean=data.mean, std=data.std)
    info = {"format": None, "dropped_head": None}
    if str(args.init).lower() != "none":
        info = models.load_pretrained(model, args.init, load_head=load_head, load_stem=not args.reinit_stem)
        head = (f"replaced by a new {data.num_classes}-class head" + (
            "" if load_head is False else f" (θ_p's does not fit the {data.num_classes} classes)")
                if info["dropped_head"] else "loaded with it")
        stem = "; the stem is freshly initialised (--reinit-stem)" if info.get("dropped_stem") else ""
        log(f"θ_p: '{args.init}' read as a {info['format']} checkpoint; head {head}{stem}")
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, info


def resolve_precision(args, device):
    """The autocast settings of ``--amp``; on CUDA also cuDNN autotuning (``--no-cudnn-benchmark``)."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    return Precision.resolve(args.amp, device)


def wrap_model(model, args, dist_info):
    """Returns (runner, plain): ``runner`` trains (DDP when distributed), ``plain`` attacks and
    evaluates without gradient synchronisation. Both are compiled once when --compile is given."""
    plain = torch.compile(model) if args.compile else model
    runner = plain
    if dist_info.world_size > 1:
        ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        runner = torch.nn.parallel.DistributedDataParallel(plain, device_ids=ids, broadcast_buffers=True)
    return runner, plain


def log(msg):
    if du.is_primary():
        print(msg, flush=True)


def claim_dir(save_dir, dist_info):
    """The primary rank takes the run directory's lock before the stage decides whether the run there is
    finished, to be resumed or to be started: decided without it, a second process that reaches the
    directory just after a first one finished would redo the finished run over its files."""
    if dist_info.primary:
        lock_run_dir(save_dir)
    du.barrier()


def prepare_dir(save_dir, config, dist_info, *, restart=None, finished=None):
    """The primary rank locks, creates or checks the run directory first; the others then check it.

    The primary's lock on the directory (utils.rundir.RunDirLock) is held until
    ``utils.rundir.release_locks()``. ``restart`` (default: ``config["restart"]``, i.e. --restart)
    discards an unfinished run there first; ``finished`` overrides whether the directory's run
    counts as finished (default: ``utils.rundir.run_finished``: results.json, or every round's ticket).
    """
    if restart is None:
        restart = bool(config.get("restart", False))
    resumed = (prepare_run_dir(save_dir, config, primary=True, restart=restart, finished=finished)
               if dist_info.primary else None)
    du.barrier()
    if not dist_info.primary:
        resumed = prepare_run_dir(save_dir, config, primary=False)
    return resumed


class DataStub:
    """What model building needs to know about a dataset, for stages that read no images (OMP, RP)."""

    CLASSES = {"imagenet": 1000, "folder": 1000, "cifar10": 10, "cifar100": 100, "svhn": 10, "digits": 10}

    def __init__(self, args):
        if args.dataset not in self.CLASSES:
            raise UserError(f"unknown --dataset '{args.dataset}'; choose one of {', '.join(self.CLASSES)}.")
        self.num_classes = len(args.classes) if args.classes else self.CLASSES[args.dataset]
        self.mean, self.std = dataset.DATASET_STATS[args.dataset]


def data_stub(args):
    return DataStub(args)


PREEMPTED_MARKER = ".preempted"


def run_stoppable(run, args, stop):
    """``run(args, stop)`` with the stop signals turned into ``stop``'s flag for its duration, and
    every run-directory lock released afterwards, however it ends.

    A stopped run leaves ``SAVE_DIR/.preempted``: torchrun reports any failed worker as status 1,
    so the launcher (script/_launch.sh) reads the marker to tell a requeueable stop (75) from a crash.
    """
    marker = Path(args.save_dir) / PREEMPTED_MARKER
    marker.unlink(missing_ok=True)
    stop.install()
    try:
        return run(args, stop)
    except Preempted:
        if du.is_primary():
            marker.write_text("stopped on request; rerun the same command to resume\n")
        raise
    finally:
        stop.uninstall()
        release_run_locks()
        du.cleanup(sync=False)  # a no-op after the run's own cleanup; otherwise no gloo thread outlives Python


def release_run_locks():
    """Release the run-directory locks this process holds (entry points call it when they return, so
    a worker that runs many runs in one process does not keep finished runs locked)."""
    release_locks()
