"""Set-up shared by both entry points: data, model, precision (and the flags common to both stages,
from training/common_args.py).

Keeping this in one place means stage 1 and stage 2 build data and models the same way, so a
ticket found in stage 1 always fits the model stage 2 builds from the same flags.
"""

from pathlib import Path

import torch

import dataset
import models
from data_loading.splits import val_size_note
from training.common_args import (  # noqa: F401  (both stages' flags, reached as setup.NAME)
    DEFAULT_WORKERS,
    add_common_args,
    check_common_args,
    default_image_size,
    default_workers,
)
from training.engine import Precision
from utils import distributed as du
from utils.errors import Preempted, UserError
from utils.rundir import lock_run_dir, prepare_run_dir, release_locks


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
