"""Reading and writing checkpoints: one safe loader, one atomic saver.

Every checkpoint is read with ``torch.load(weights_only=True)`` so a crafted pickle cannot run
code; the numpy scalar types that real published checkpoints contain are allow-listed, nothing
else.  Every file is written to a temporary name beside its target and moved into place with
``os.replace``, so a run killed mid-write leaves either the old file or the new one, never half.
"""

import errno
import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np

from utils.errors import UserError

# torch is imported by the two functions that read or write a torch file: the atomic JSON and text
# writers here also serve utils.rundir, which the sweep's plan and status load without torch


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


# torch's boilerplate around the one line that says what is wrong with a file
_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "Re-running",
                "In PyTorch 2.6", "return Unpickler(")


def _reason(exc):
    """The informative line of a loader exception (some have none: EOFError() is empty)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_BOILERPLATE)]
    text = (useful or lines or [""])[0]
    text = text.replace("WeightsUnpickler error:", "").strip()
    name = type(exc).__name__
    return f"{name}: {text[:200]}" if text else name


def safe_load(path, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with clear errors.

    Every way ``path`` can fail to be a checkpoint raises one :class:`UserError` naming the file:
    missing, a directory or other non-file, unreadable, empty, not a torch file (text, random
    bytes, a foreign zip, a truncated download), or a file that needs arbitrary unpickling (which
    is refused, never executed).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"'{path}' is a directory, not a checkpoint file; pass the path of a .pt/.pth/.tar file.")
    if not path.exists():
        raise UserError(f"checkpoint file '{path}' does not exist; pass the path of an existing .pt/.pth/.tar file.")
    if not path.is_file():  # a FIFO or device would block or stream forever
        raise UserError(f"'{path}' is not a regular file; pass the path of a .pt/.pth/.tar checkpoint file.")
    try:
        with open(path, "rb") as fh:
            empty = fh.read(1) == b""
    except OSError as exc:
        raise UserError(f"checkpoint file '{path}' cannot be read ({exc.strerror or _reason(exc)}); "
                        "fix its permissions or pass another file.") from None
    if empty:
        raise UserError(f"checkpoint file '{path}' is empty (0 bytes), e.g. from an interrupted copy; "
                        "copy or download it again.")
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc) or "global" in str(exc):
            raise UserError(
                f"refusing to load '{path}': it needs arbitrary unpickling ({_reason(exc)}), "
                "which could run code; re-save it as a plain state dict of tensors "
                "(torch.save(model.state_dict(), path))."
            ) from None
        raise UserError(f"'{path}' is not a torch checkpoint ({_reason(exc)}); check the path and that the file "
                        "was fully copied.") from None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes torch raise is one bad-file error
        raise UserError(f"'{path}' is not a readable torch checkpoint ({_reason(exc)}); check the path and that "
                        "the file was fully copied.") from None


def read_resume_checkpoint(path, device, keys):
    """A run's own resume checkpoint, or one clear error: a torch file of another shape (a foreign
    file copied over it, another stage's checkpoint) is not a resume point."""
    ckpt = safe_load(path, map_location=device)
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"'{path}' is not a checkpoint of this stage (it lacks {missing}); rerun with --restart to "
                        "discard it, or choose another --save-dir.")
    return ckpt


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _atomic_write(path, write_fn, binary):
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be readable like any file
            write_fn(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if _zip_writer_failure(exc):
            # torch.save's zip writer reports a failed write (a full disk, mostly) as a RuntimeError
            # without an errno: it is the same failure as an OSError from write(), so it reads the same
            detail = str(exc).strip().splitlines()[0].rpartition("] . ")[2][:200]
            raise OSError(errno.ENOSPC, f"the write failed, most likely for lack of space (torch: {detail})",
                          str(path)) from exc
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename != str(path):
            # name the file the user knows, not the temporary (nor none: a full disk fails in write)
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise


def _zip_writer_failure(exc):
    """A failed write inside torch.save: its zip writer (PytorchStreamWriter, inline_container.cc)
    raises a RuntimeError that names no errno."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text)


def atomic_save(obj, path):
    """``torch.save`` to a temporary file, then ``os.replace`` onto ``path``."""
    import torch

    _atomic_write(path, lambda fh: torch.save(obj, fh), binary=True)


def atomic_write_json(obj, path):
    """Write ``obj`` as indented JSON, atomically."""
    _atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=False) + "\n"), binary=False)


def atomic_write_text(text, path):
    _atomic_write(path, lambda fh: fh.write(text), binary=False)


def file_sha256(path, flag):
    """A digest of a file a run depends on (θ_p), so a resumed run can prove it reads the same bytes."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise UserError(f"{flag} '{path}' cannot be read ({exc.strerror}); check the path and its permissions.") from None
    return h.hexdigest()
