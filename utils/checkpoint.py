"""Reading and writing checkpoints: one safe loader, one atomic saver.

Every checkpoint is read with ``torch.load(weights_only=True)`` so a crafted pickle cannot run
code; the numpy scalar types that real published checkpoints contain are allow-listed, nothing
else.  Every file is written to a temporary name beside its target and moved into place with
``os.replace``, so a run killed mid-write leaves either the old file or the new one, never half.
"""

import json
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch

from utils.errors import UserError


def _numpy_safe_globals():
    """Numpy types that published checkpoints (e.g. ``best_prec1``) legitimately pickle.

    Files written under numpy 1.x (most published robust checkpoints) name the scalar and array
    rebuilders ``numpy.core.multiarray.*``; numpy 2 moved them to ``numpy._core``. The unpickler
    matches names exactly, so both spellings are allow-listed for the same two functions.
    """
    core = getattr(np, "_core", None) or np.core
    names = [np.dtype, np.ndarray, type(np.dtype("float64")), type(np.dtype("float32")),
             type(np.dtype("int64")), type(np.dtype("int32"))]
    for fn in (core.multiarray.scalar, core.multiarray._reconstruct):
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            names.append((fn, f"{module}.{fn.__name__}"))
    return names


def safe_load(path, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with clear errors.

    Raises :class:`UserError` when the file is missing, is not a torch checkpoint, or needs
    arbitrary unpickling (which is refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file '{path}' does not exist; pass the path of an existing .pt/.pth/.tar file.")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"refusing to load '{path}': it needs arbitrary unpickling ({str(exc).splitlines()[0][:200]}), "
            "which could run code; re-save it as a plain state dict of tensors "
            "(torch.save(model.state_dict(), path))."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise UserError(f"'{path}' is not a readable torch checkpoint ({str(exc).splitlines()[0][:200]}); "
                        "check the path and that the file was fully copied.") from None


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _atomic_write(path, write_fn, binary):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be readable like any file
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write_fn(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path):
    """``torch.save`` to a temporary file, then ``os.replace`` onto ``path``."""
    _atomic_write(path, lambda fh: torch.save(obj, fh), binary=True)


def atomic_write_json(obj, path):
    """Write ``obj`` as indented JSON, atomically."""
    _atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=False) + "\n"), binary=False)


def atomic_write_text(text, path):
    _atomic_write(path, lambda fh: fh.write(text), binary=False)
