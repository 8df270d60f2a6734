"""The one distributed module: process-group set-up, rank queries, reductions, barrier.

Works unchanged as a single process (no ``torchrun``): every function then degrades to the
obvious single-process answer, so the engine never branches on "am I distributed".
"""

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def primary(self):
        return self.rank == 0


def unwrap_model(model, compiled=True):
    """The module inside DDP / DataParallel (and, with ``compiled``, torch.compile) wrappers: the one
    whose parameter names are torchvision's. Attacks pass ``compiled=False``: they run on the DDP-free
    module so that no gradient-reduction hook or buffer sync fires, and keep the compiled graph."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif compiled and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def resolve_device(name):
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error, not a fallback."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu or run on a GPU node.")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise UserError(f"--device must be auto, cpu or cuda[:N], not '{name}'.")
    return torch.device(name)


def init_distributed(device="auto", timeout_minutes=60):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone.

    NCCL on CUDA, gloo on CPU. Each process uses the GPU of its LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        index = local_rank if world_size > 1 else (dev.index or 0)
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        options = {"timeout": timeout, "device_id": dev if dev.type == "cuda" else None}
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        # each node's agent counts its own restarts (a healthy node that re-joins counts none), so
        # a per-attempt name is only shared by every rank when one agent runs them all
        one_node = os.environ.get("LOCAL_WORLD_SIZE") == str(world_size)
        if attempt is None or not one_node:
            dist.init_process_group(backend=backend, **options)
        else:
            # torchrun's agent keeps one store across restarts of the group, so the addresses the
            # previous attempt's ranks published are still in it, and a restarted rank can read a
            # dead peer's address before its successor overwrites it (seen: gloo "connection refused"
            # or a hang in most restarts, with gloo on this CPU). A prefix per attempt keeps them apart.
            store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"attempt_{attempt}", store),
                                    rank=rank, world_size=world_size, **options)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_primary():
    return get_rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op alone) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj):
    """A list of every rank's ``obj``, indexed by rank (``[obj]`` alone)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_equal(tensor):
    """True when ``tensor`` is bitwise identical on every rank (used to prove masks agree)."""
    if not is_distributed():
        return True
    t = tensor.detach().float().reshape(-1)
    lo, hi = t.clone(), t.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def cleanup(sync=True):
    """Leave the process group. ``sync`` first waits for every rank: a rank that tears the group down
    while rank 0 still writes its results can abort rank 0's gloo threads at exit (seen once in CI as
    SIGABRT, "terminate called without an active exception"). Paths that fail pass ``sync=False``:
    the other ranks may never reach the barrier."""
    if is_distributed():
        if sync:
            dist.barrier()
        dist.destroy_process_group()
