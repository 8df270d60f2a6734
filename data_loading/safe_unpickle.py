"""A restricted unpickler for CIFAR's pickled batches: numpy arrays, lists and strings only."""

import codecs
import pickle
from pathlib import Path

import numpy as np

from utils.errors import UserError


def _numpy_attr(*paths):
    for path in paths:
        obj = np
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ImportError(f"numpy provides none of {paths}")  # pragma: no cover


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes; no other codec is reachable."""
    if not isinstance(text, str) or encoding.lower() not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r}")
    return codecs.encode(text, "latin1")


_reconstruct = _numpy_attr("_core.multiarray._reconstruct", "core.multiarray._reconstruct")
_scalar = _numpy_attr("_core.multiarray.scalar", "core.multiarray.scalar")
_frombuffer = _numpy_attr("_core.numeric._frombuffer", "core.numeric._frombuffer")

# Everything an ndarray (or numpy scalar) pickle needs, under the module names numpy 1.x, numpy
# 2.x and Python 2 wrote; resolved here so the deprecated numpy.core shim is never imported.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None


def restricted_unpickle(path: Path, source: str):
    try:
        with open(path, "rb") as fh:
            return _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise UserError(f"refusing to read {path}: {exc} (a dataset batch only holds numpy arrays, "
                        f"lists and strings); replace it with a clean copy of {source}.") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, OverflowError, MemoryError, OSError) as exc:
        raise UserError(f"{path} is not a readable dataset batch ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); replace it with a clean copy of {source}.") from None
