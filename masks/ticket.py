"""The ticket file (docs/contracts.md §1): make, validate, save and load tickets, and read the seed repository's
IMP checkpoints as tickets."""

import builtins
import numbers

import torch

from masks.family import rewind_epoch, ticket_family  # noqa: F401  (reached as masks.ticket.NAME and pruning_utils.NAME)
from masks.patterns import PATTERNS, check_pattern_masks
from masks.prunable import HEAD_PREFIX, check_mask_type
from masks.stats import sparsity
from masks.unstructured import imp_sparsity
from utils.checkpoint import atomic_save, safe_load
from utils.errors import UserError

TICKET_FORMAT = "double-win-ticket"
TICKET_VERSION = 2
TICKET_VERSIONS_READ = (1, 2)
TICKET_METHODS = ("imp", "omp", "rp", "lmp")
TICKET_RETRAIN = ("st", "at", None)
REWINDS = ("theta_p", "none")  # and "epoch_K": IMP rewinds to epoch K of its first re-training round
# the ticket stores sparsity rounded to 2 decimals (make_ticket), so a recount may differ by 0.005
SPARSITY_TOLERANCE = 0.01
_TICKET_KEYS = ("format", "version", "masks", "sparsity", "round", "method", "retrain",
                "arch", "pretrain", "init", "source_dataset")
_SEED_MASK_SUFFIX = ".weight_mask"


def _cpu_masks(mask):
    return {str(n): m.detach().to("cpu").contiguous().clone() for n, m in mask.items()}


def parse_rewind(text):
    """--rewind: "theta_p", "none" or "epoch_K"; UserError otherwise."""
    if text in REWINDS or rewind_epoch(text) is not None:
        return text
    raise UserError(f"--rewind '{text}' is not theta_p, none or epoch_K (K >= 1, an epoch of the first "
                    "re-training round); pass e.g. --rewind epoch_2.")


def make_ticket(mask, *, round, method, retrain, arch, pretrain, init, source_dataset,
                pattern="unstructured", nm=None, rewind="theta_p"):
    """The ticket dict of docs/contracts.md §1, version 2 (masks copied to CPU; sparsity in percent, 2 decimals).

    ``pattern`` is "unstructured", "channel" or "nm" (then ``nm=[N, M]``); ``rewind`` is "theta_p"
    (IMP rewinds to θ_p; also OMP/RP, which prune θ_p itself), "none" or "epoch_K" (IMP rewinds to
    epoch K of its first re-training round).
    ``round`` is the keyword of the file format; the builtin is reached as ``builtins.round`` here.
    """
    check_mask_type(mask)
    ticket = {"format": TICKET_FORMAT, "version": TICKET_VERSION, "masks": _cpu_masks(mask),
              "sparsity": float(builtins.round(sparsity(mask), 2)), "round": round, "method": method,
              "retrain": retrain, "arch": arch, "pretrain": pretrain, "init": init,
              "source_dataset": source_dataset, "pattern": pattern, "rewind": rewind}
    if nm is not None or pattern == "nm":
        ticket["nm"] = list(nm) if isinstance(nm, (list, tuple)) else nm
    validate_ticket(ticket)
    return ticket


def _check_mask_entry(name, m, where):
    if not isinstance(name, str) or not isinstance(m, torch.Tensor):
        raise UserError(f"{where} mask entry {name!r} is not a name -> tensor pair; "
                        "re-create the ticket with pruning_utils.make_ticket.")
    if m.layout != torch.strided:
        raise UserError(f"{where} mask '{name}' is a {m.layout} tensor; tickets hold dense bool masks "
                        "(convert with m.to_dense() and re-save).")
    if m.dtype != torch.bool:
        raise UserError(f"{where} mask '{name}' is {m.dtype}, not torch.bool; masks must be bool "
                        "tensors (convert with m != 0 and re-save).")
    # tickets mask the backbone's conv weights only: the head, BatchNorm and biases are never pruned
    if name.startswith(HEAD_PREFIX) or not name.endswith(".weight") or m.dim() != 4:
        raise UserError(f"{where} masks '{name}', which is not a convolution weight (the head, BatchNorm "
                        "weights and biases are never pruned); drop that entry and re-save the ticket.")


def validate_ticket(ticket, where="ticket"):
    """Raise :class:`UserError` unless ``ticket`` follows the ticket format (docs/contracts.md §1) and its
    masks back its claims: conv weights only, dense bool tensors, the recorded sparsity (to the
    0.01 points of its 2-decimal rounding) and the recorded pattern."""
    if not isinstance(ticket, dict):
        raise UserError(f"{where} is a {type(ticket).__name__}, not a ticket dict; "
                        "write tickets with pruning_utils.save_ticket.")
    if ticket.get("format") != TICKET_FORMAT:
        raise UserError(f"{where} has format {ticket.get('format')!r}, not '{TICKET_FORMAT}'; "
                        "pass a ticket written by main_imp_pretrain.py.")
    version = ticket.get("version")
    if isinstance(version, bool) or version not in TICKET_VERSIONS_READ:
        raise UserError(f"{where} has ticket version {version!r}, but this code reads versions "
                        f"{list(TICKET_VERSIONS_READ)}; re-create the ticket with this code.")
    required = _TICKET_KEYS + (("pattern", "rewind") if version >= 2 else ())
    missing = [k for k in required if k not in ticket]
    if missing:
        raise UserError(f"{where} lacks the keys {missing}; re-create it with pruning_utils.make_ticket.")
    masks = ticket["masks"]
    if not isinstance(masks, dict) or not masks:
        raise UserError(f"{where} has no masks; re-create it with pruning_utils.make_ticket.")
    for name, m in masks.items():
        _check_mask_entry(name, m, where)
    s = ticket["sparsity"]
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0.0 <= s <= 100.0:
        raise UserError(f"{where} sparsity {s!r} is not a percentage in [0, 100]; re-create the ticket.")
    actual = sparsity(masks)
    if abs(float(s) - actual) > SPARSITY_TOLERANCE + 1e-9:
        raise UserError(f"{where} claims {float(s):.2f}% sparsity but its masks prune {actual:.2f}% of their "
                        "weights; the file is damaged or was edited, re-create it with main_imp_pretrain.py.")
    r = ticket["round"]
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:
        raise UserError(f"{where} round {r!r} is not a non-negative integer; re-create the ticket.")
    if ticket["method"] not in TICKET_METHODS:
        raise UserError(f"{where} method {ticket['method']!r} is not one of {list(TICKET_METHODS)}; "
                        "re-create the ticket.")
    if ticket["retrain"] not in TICKET_RETRAIN:
        raise UserError(f"{where} retrain {ticket['retrain']!r} is not 'st', 'at' or None; re-create the ticket.")
    for key in ("arch", "pretrain", "init", "source_dataset"):
        if ticket[key] is not None and not isinstance(ticket[key], str):
            raise UserError(f"{where} field '{key}' is {type(ticket[key]).__name__}, not a string; "
                            "re-create the ticket.")
    pattern = ticket.get("pattern", "unstructured")
    if pattern not in PATTERNS:
        raise UserError(f"{where} pattern {pattern!r} is not one of {list(PATTERNS)}; re-create the ticket.")
    if ticket.get("rewind", "theta_p") not in REWINDS and rewind_epoch(ticket.get("rewind")) is None:
        raise UserError(f"{where} rewind {ticket.get('rewind')!r} is not one of {list(REWINDS)} or epoch_K; "
                        "re-create the ticket.")
    if version < 2 and (pattern != "unstructured" or ticket.get("rewind", "theta_p") != "theta_p"):
        raise UserError(f"{where} is a version-1 ticket, which is unstructured and rewound to θ_p, but says "
                        f"pattern {pattern!r} / rewind {ticket.get('rewind')!r}; save it as version 2.")
    nm = ticket.get("nm")
    if pattern == "nm":
        if (not isinstance(nm, (list, tuple)) or len(nm) != 2
                or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in nm)
                or not 0 < nm[0] < nm[1]):
            raise UserError(f"{where} has pattern 'nm' but 'nm' is {nm!r}, not [N, M] with 0 < N < M; "
                            "re-create the ticket with --nm 2:4.")
    elif nm is not None:
        raise UserError(f"{where} has 'nm' {nm!r} but pattern {pattern!r}; 'nm' belongs to the nm pattern only.")
    check_pattern_masks(masks, pattern, nm, where)


def save_ticket(path, ticket):
    """Validate ``ticket`` and write it atomically (loadable with ``torch.load(weights_only=True)``)."""
    validate_ticket(ticket)
    atomic_save(dict(ticket, masks=_cpu_masks(ticket["masks"])), path)


def _strip_prefix(names, prefix):
    if names and all(n.startswith(prefix) for n in names):
        return {n: n[len(prefix):] for n in names}
    return {n: n for n in names}


def _ticket_from_seed(obj, path):
    """Ticket dict from a seed-repo (Double-Win-LTH) checkpoint holding ``<name>.weight_mask`` tensors.

    Stage-1 checkpoints store ``model.module.state_dict()`` under ``"state_dict"`` (no prefix;
    the adversarial variant's ``normalize.mean/std`` buffers hold no masks); DDP saves add
    ``module.``; downstream checkpoints wrap the net as ``nn.Sequential(normalize, net)`` and
    so carry ``1.``.
    """
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        state = {}
    mask_keys = [k for k in state if isinstance(k, str) and k.endswith(_SEED_MASK_SUFFIX)]
    if not mask_keys:
        raise UserError(f"'{path}' is neither a double-win ticket (no 'format' key) nor a seed-repo "
                        "checkpoint (no '<name>.weight_mask' tensors); pass a ticket written by "
                        "main_imp_pretrain.py or an IMP checkpoint of the seed code.")
    renamed = _strip_prefix(mask_keys, "module.")
    inner = _strip_prefix(list(renamed.values()), "1.")
    renamed = {key: inner[short] for key, short in renamed.items()}
    masks = {}
    for key in mask_keys:
        m = state[key]
        name = renamed[key][:-len(_SEED_MASK_SUFFIX)] + ".weight"
        if not isinstance(m, torch.Tensor):
            raise UserError(f"'{path}': '{key}' is not a tensor; the file is not a seed-repo checkpoint.")
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
            raise UserError(f"'{path}': mask '{key}' holds values other than 0 and 1; "
                            "pass an IMP checkpoint whose masks are binary.")
        masks[name] = (m != 0).contiguous()
    state_prune = obj.get("state_prune") if "state_dict" in obj else None
    if isinstance(state_prune, int) and not isinstance(state_prune, bool) and state_prune >= 0:
        round_ = state_prune
    else:  # the seed code pruned 20% per round, so the level names its round
        round_ = seed_round_from_sparsity(sparsity(masks))
    return make_ticket(masks, round=round_, method="imp", retrain=None, arch="unknown",
                       pretrain="unknown", init="unknown", source_dataset="unknown")


def seed_round_from_sparsity(percent, rate=0.2, max_rounds=50):
    """The IMP round whose level 1 - (1 - rate)^k is within 0.05 points of ``percent``, else 0."""
    for k in range(max_rounds + 1):
        if abs(imp_sparsity(k, rate) - percent) < 0.05:
            return k
    return 0


def load_ticket(path):
    """Read a ticket file (or a seed-repo IMP checkpoint) with ``weights_only=True`` and validate it.

    A version-1 file reads as unstructured with rewinding to θ_p: the ``pattern`` and ``rewind``
    keys are filled in (its ``version`` stays 1, as written).
    """
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise UserError(f"'{path}' holds a {type(obj).__name__}, not a ticket dict; pass a ticket "
                        "written by main_imp_pretrain.py.")
    if "format" in obj:
        validate_ticket(obj, where=f"ticket '{path}'")
        if obj.get("version") == 1:
            obj.setdefault("pattern", "unstructured")
            obj.setdefault("rewind", "theta_p")
        return obj
    return _ticket_from_seed(obj, path)
