"""Seeding and RNG state capture, so a resumed run continues the same random stream."""

import random

import numpy as np
import torch

from utils import distributed as du


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state_for_checkpoint():
    """RNG state in plain types only, so the checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    """Undo :func:`rng_state_for_checkpoint`. The state may have been loaded with a CUDA
    ``map_location``; the setters take CPU byte tensors only, so everything comes back to the host."""
    torch.set_rng_state(state["torch"].cpu())
    np_s = state["numpy"]
    np.random.set_state(("MT19937", np_s["key"].cpu().numpy().astype(np.uint32), np_s["pos"], np_s["has_gauss"],
                         np_s["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def gather_rng_states():
    """Every rank's RNG state, as a list indexed by rank (collective: all ranks must call it)."""
    return du.all_gather_object(rng_state_for_checkpoint())


def restore_rank_rng_state(states, rank):
    """Restore this rank's entry of :func:`gather_rng_states`; a checkpoint written with another
    number of processes restores rank 0's state on every rank (the stream then differs, the run does not)."""
    if isinstance(states, dict):  # checkpoints of older versions held one state
        states = [states]
    restore_rng_state(states[rank] if rank < len(states) else states[0])
