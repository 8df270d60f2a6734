"""Importers of pre-trained ResNet checkpoints, mapped onto torchvision's parameter names.

Formats read (detected from the file's structure, never from its name):

* ``torchvision`` - a plain ``state_dict`` (``conv1.weight`` ...), possibly wrapped in
  ``{"state_dict": ...}`` or ``{"model": ...}`` and possibly ``module.``-prefixed (DataParallel).
* ``robustness`` - MadryLab robustness / robust-models-transfer: ``{"model": sd, "epoch": ...}``
  (older files: ``{"state_dict": sd}``) with ``module.model.<name>``, a duplicate copy under
  ``module.attacker.model.<name>`` and input normalizers under ``module.normalizer.`` and
  ``module.attacker.normalize.``.
* ``robustbench`` - the ``state_dict()`` of a model from RobustBench's ``load_model`` (its ImageNet
  zoo): ``nn.Sequential(normalize=ImageNormalizer, model=ResNet)``, so ``normalize.mean`` and
  ``normalize.std`` (shape (1, 3, 1, 1)) beside ``model.<name>``.
* ``fast_adversarial`` - locuslab fast_adversarial ImageNet: ``{"state_dict": {"module.<name>"},
  "epoch", "arch", "best_prec1", "optimizer"}``.
* ``seed`` - the VITA-Group Double-Win-LTH checkpoints, written by ``torch.nn.utils.prune``:
  pruned convs as ``<name>.weight_orig`` and ``<name>.weight_mask``; its ImageNet AT model
  carries an advertorch normalizer as ``normalize.mean``/``normalize.std``, and its downstream
  AT runs save ``nn.Sequential(normalizer, model)`` as ``0.mean``, ``0.std``, ``1.<name>``.
* ``double-win`` - this project's own file, written by :func:`save_model_checkpoint`.

The input normalizers stored in files are not loaded: the model normalizes its input itself
with the statistics of the dataset it is used on (on ImageNet these are the files' own).  They are
reported in the returned info (``file_normalization``), which stage 2 records in run_info.json.
"""

import torch

from models.resnet import ARCHS, HEAD_PREFIX, Bottleneck, NormalizedResNet
from utils.checkpoint import atomic_save, safe_load
from utils.distributed import unwrap_model
from utils.errors import UserError

MODEL_FORMAT = "double-win-model"
MODEL_FORMAT_VERSION = 1

STEM_PREFIX = "conv1."
_SHOWN = 4  # names listed per kind of mismatch; the rest are counted


def save_model_checkpoint(path, model, **extra):
    """Write ``model``'s weights in the ``double-win-model`` format, atomically.

    ``extra`` entries (plain Python values or tensors, so the file stays loadable with
    ``weights_only=True``) are stored beside the weights, e.g. ``epoch=3``.
    """
    model = unwrap_model(model)
    payload = {
        "format": MODEL_FORMAT,
        "version": MODEL_FORMAT_VERSION,
        "arch": model.arch,
        "num_classes": int(model.num_classes),
        "cifar_stem": bool(model.cifar_stem),
        "input_mean": [float(v) for v in model.input_mean.flatten()],
        "input_std": [float(v) for v in model.input_std.flatten()],
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    clash = sorted(set(extra) & set(payload))
    if clash:
        raise ValueError(f"save_model_checkpoint: extra keys {clash} would overwrite the format's own fields")
    payload.update(extra)
    atomic_save(payload, path)


# --------------------------------------------------------------------------- format decoding

def _strip_prefix(state, prefix):
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _as_list(tensor):
    return None if tensor is None else [float(v) for v in tensor.flatten()]


def _inner_state_dict(raw, path):
    # robustness wraps its weights in "model", most other trainers in "state_dict".
    state = raw
    for wrapper in ("model", "state_dict"):
        if isinstance(raw.get(wrapper), dict):
            state = raw[wrapper]
            break
    return _tensor_dict(state, path)


def _tensor_dict(state, path):
    bad = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise UserError(f"'{path}' is not a model checkpoint: entries {bad[:_SHOWN]} are not named tensors; "
                        "pass a torchvision/robustness/robustbench/fast_adversarial/seed-repo/double-win weights file.")
    if not state:
        raise UserError(f"'{path}' holds no weights; pass a checkpoint with a model state dict.")
    return state


def _is_robustness(state):
    return (any(k.startswith("model.") for k in state)
            and all(k.startswith(("model.", "attacker.", "normalizer.")) for k in state))


def _is_robustbench(state):
    return ("normalize.mean" in state and "normalize.std" in state
            and all(k.startswith("model.") for k in state if k not in ("normalize.mean", "normalize.std")))


def _from_robustbench(state, path):
    stats = []
    for name in ("normalize.mean", "normalize.std"):
        values = state[name].flatten()
        if values.numel() != 3 or not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
            shown = [float(v) for v in values[:_SHOWN]] + (["..."] if values.numel() > _SHOWN else [])
            raise UserError(f"'{path}' (robustbench format): {name} holds {values.numel()} value(s) {shown}, not three "
                            "positive numbers (one per RGB channel); the file is damaged or not a RobustBench "
                            "ImageNet model, save it again with torch.save(model.state_dict(), path).")
        stats.append(_as_list(values))
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return weights, tuple(stats)


def _is_seed_sequential(state):
    return "0.mean" in state and "0.std" in state and all(k.startswith(("0.", "1.")) for k in state)


def _is_seed(state):
    return (_is_seed_sequential(state) or "normalize.mean" in state
            or any(k.endswith((".weight_orig", ".weight_mask")) for k in state))


def _from_robustness(state):
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    # attacker.model.* is the same module registered twice; attacker.normalize.* and
    # normalizer.* hold the dataset statistics the model now applies itself.
    return weights, (_as_list(state.get("normalizer.new_mean")), _as_list(state.get("normalizer.new_std")))


def _from_seed(state, path):
    normalization = (None, None)
    if _is_seed_sequential(state):
        normalization = (_as_list(state["0.mean"]), _as_list(state["0.std"]))
        state = {(k[2:] if k.startswith("1.") else k): v for k, v in state.items() if k not in ("0.mean", "0.std")}
    if "normalize.mean" in state:
        normalization = (_as_list(state.get("normalize.mean")), _as_list(state.get("normalize.std")))
        state = {k: v for k, v in state.items() if not k.startswith("normalize.")}

    weights, mask = {}, {}
    for key, value in state.items():
        if key.endswith(".weight_orig"):
            name = key[: -len("_orig")]
            mask_key = name + "_mask"
            if mask_key not in state:
                raise UserError(f"'{path}' has {key} without {mask_key}; the seed-repo checkpoint is incomplete, "
                                "re-export it with both tensors of every pruned layer.")
            keep = state[mask_key]
            if keep.shape != value.shape:
                raise UserError(f"'{path}': {mask_key} has shape {list(keep.shape)} but {key} has "
                                f"{list(value.shape)}; the checkpoint is corrupt.")
            # prune's forward uses weight_orig * weight_mask; do the same once, so pruned
            # weights arrive as exact zeros.
            weights[name] = value * keep.to(value.dtype)
            mask[name] = keep != 0
        elif key.endswith(".weight_mask"):
            if key[: -len("_mask")] + "_orig" not in state:
                raise UserError(f"'{path}' has {key} without its weight_orig; the seed-repo checkpoint is "
                                "incomplete, re-export it with both tensors of every pruned layer.")
        else:
            weights[key] = value
    clash = sorted(set(mask) & {k for k in state if not k.endswith(("_orig", "_mask"))})
    if clash:
        raise UserError(f"'{path}' holds both a pruned and a plain copy of {clash[:_SHOWN]}; it is not a "
                        "seed-repo checkpoint this importer understands.")
    return weights, normalization, mask


def _decode(raw, path, model):
    """Return (format, torchvision-named weights, (mean, std) or Nones, mask or None)."""
    declared = raw.get("format")
    if isinstance(declared, str):
        if declared == "double-win-ticket":
            raise UserError(f"'{path}' is a ticket (a pruning mask), not model weights; pass it as --ticket "
                            "and give the pre-trained weights as --init.")
        if declared != MODEL_FORMAT:
            raise UserError(f"'{path}' declares format {declared!r}, which this version cannot read; "
                            f"expected {MODEL_FORMAT!r} or a torchvision-style checkpoint.")
        if raw.get("version") != MODEL_FORMAT_VERSION:
            raise UserError(f"'{path}' is {MODEL_FORMAT} version {raw.get('version')!r} but this code reads "
                            f"version {MODEL_FORMAT_VERSION}; use the code version that wrote it.")
        arch = raw.get("arch")
        if arch is not None and arch != model.arch:
            raise UserError(f"'{path}' holds a {arch} model but the model is {model.arch}; pass --arch {arch}.")
        stem = raw.get("cifar_stem")
        if stem is not None and bool(stem) != bool(model.cifar_stem):
            raise UserError(f"'{path}' was saved {'with' if stem else 'without'} the CIFAR stem but the model is "
                            f"built {'with' if model.cifar_stem else 'without'} it; build the model the same way.")
        if not isinstance(raw.get("state_dict"), dict):
            raise UserError(f"'{path}' is a {MODEL_FORMAT} file without a state_dict; it is damaged, re-create it.")
        weights = _tensor_dict(raw["state_dict"], path)
        return "double-win", weights, (raw.get("input_mean"), raw.get("input_std")), None

    state = _strip_prefix(_inner_state_dict(raw, path), "module.")
    # before the seed repo's files, whose ImageNet model also carries normalize.mean/std
    if _is_robustbench(state):
        weights, normalization = _from_robustbench(state, path)
        return "robustbench", weights, normalization, None
    if _is_robustness(state):
        weights, normalization = _from_robustness(state)
        return "robustness", weights, normalization, None
    if _is_seed(state):
        weights, normalization, mask = _from_seed(state, path)
        return "seed", weights, normalization, (mask or None)
    if "best_prec1" in raw:
        return "fast_adversarial", state, (None, None), None
    return "torchvision", state, (None, None), None


# --------------------------------------------------------------------------- architecture hints

def _signature_of_state(state):
    """((blocks per stage, bottleneck?, layer1 inner width, stem width), CIFAR stem?) of a file."""
    blocks = []
    for stage in range(1, 5):
        indices = {k.split(".")[1] for k in state if k.startswith(f"layer{stage}.")}
        blocks.append(len({i for i in indices if i.isdigit()}))
    conv1 = state.get("conv1.weight")
    inner = state.get("layer1.0.conv1.weight")
    if conv1 is None or inner is None or conv1.dim() != 4 or inner.dim() != 4:
        return None
    return (tuple(blocks), "layer1.0.conv3.weight" in state, int(inner.shape[0]), int(conv1.shape[0])), \
        int(conv1.shape[-1]) == 3


def _signature_of_spec(spec):
    bottleneck = spec.block is Bottleneck
    inner = spec.stage_widths[0] * spec.width_per_group // 64 if bottleneck else spec.stage_widths[0]
    return tuple(spec.layers), bottleneck, inner, spec.stem_width


def guess_arch(state):
    """(arch name or None, uses CIFAR stem or None) of a torchvision-named state dict."""
    found = _signature_of_state(state)
    if found is None:
        return None, None
    signature, cifar_stem = found
    for name, spec in ARCHS.items():
        if _signature_of_spec(spec) == signature:
            return name, cifar_stem
    return None, cifar_stem


def _listing(names, what):
    shown = ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
    return f"{len(names)} {what} ({shown})"


def _mismatch_error(path, fmt, model, state, missing, unexpected, reshaped):
    parts = []
    if missing:
        parts.append(_listing(missing, "missing keys"))
    if unexpected:
        parts.append(_listing(unexpected, "unexpected keys"))
    if reshaped:
        parts.append(_listing([f"{k}: file {a} vs model {b}" for k, a, b in reshaped], "shape mismatches"))
    arch, cifar_stem = guess_arch(state)
    stem_words = {True: " with the CIFAR stem", False: "", None: ""}
    if arch is not None and arch != model.arch:
        hint = (f"the checkpoint looks like {arch}{stem_words[cifar_stem]} but --arch {model.arch} was asked for; "
                f"pass --arch {arch} or a {model.arch} checkpoint")
    elif arch is not None and cifar_stem is not None and cifar_stem != model.cifar_stem:
        hint = (f"the checkpoint is {arch} {'with' if cifar_stem else 'without'} the CIFAR stem (3x3 conv1, "
                f"no max-pool) but the model is built {'with' if model.cifar_stem else 'without'} it; "
                "build the model the same way")
    elif arch is not None:
        hint = (f"its layout is {arch}'s but some tensors differ, so it comes from a modified network "
                "or is damaged; pass an unmodified checkpoint")
    else:
        hint = (f"it does not look like any known architecture ({', '.join(ARCHS)}); check that --arch "
                f"{model.arch} is the checkpoint's architecture and that the file is a ResNet checkpoint")
    return UserError(f"'{path}' ({fmt} format) does not fit the {model.arch} model: {'; '.join(parts)}; {hint}.")


# --------------------------------------------------------------------------- loading

def check_finite_state(state, path):
    """Refuse weights that would train into garbage instead of failing: a NaN/inf weight or
    BatchNorm statistic, or a negative running variance (its square root is NaN in eval mode).

    Raises :class:`UserError` naming ``path`` and the first offending tensor in ``state``'s order."""
    for key, value in state.items():
        if not torch.is_floating_point(value) or value.is_sparse:
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise UserError(f"'{path}' is damaged: '{key}' holds {bad} non-finite value(s) (NaN or inf) among "
                            f"{value.numel()}; use an intact copy of the pre-trained weights.")
        if key.endswith("running_var") and bool((value < 0).any()):
            raise UserError(f"'{path}' is damaged: the BatchNorm variance '{key}' holds "
                            f"{int((value < 0).sum())} negative value(s); use an intact copy of the pre-trained weights.")



def load_pretrained(model, path, *, load_head="auto", load_stem=True):
    """Load the weights and BatchNorm buffers in ``path`` into ``model`` (a :func:`build_model` net).

    ``load_head``: True = the head must load, False = never load it (it is replaced for transfer),
    "auto" = load it when its shapes fit, otherwise keep the model's own.  Every backbone tensor
    must be present with the right shape; anything else raises :class:`UserError`.
    ``load_stem=False`` keeps the model's own ``conv1`` (an ImageNet 7x7 stem cannot go into a
    CIFAR-stem model; the seed repo re-initialized it the same way).

    Returns ``{"format", "dropped_head", "dropped_stem", "mask" (seed files: name -> bool tensor
    of the loaded pruned weights, else None), "file_normalization" ((mean, std) lists of the file's
    own input normalizer, or None)}``.
    """
    if load_head not in (True, False, "auto"):
        raise ValueError(f"load_head must be True, False or 'auto', got {load_head!r}")
    if load_stem not in (True, False):
        raise ValueError(f"load_stem must be True or False, got {load_stem!r}")
    model = unwrap_model(model)
    if not isinstance(model, NormalizedResNet):
        raise TypeError("load_pretrained expects a model made by models.build_model")
    raw = safe_load(path)
    if not isinstance(raw, dict):
        raise UserError(f"'{path}' holds a {type(raw).__name__}, not a state dict; pass a model checkpoint.")
    fmt, state, (file_mean, file_std), mask = _decode(raw, path, model)

    target = model.state_dict()
    head_target = {k for k in target if k.startswith(HEAD_PREFIX)}
    head_file = {k for k in state if k.startswith(HEAD_PREFIX)}
    head_fits = head_file == head_target and all(state[k].shape == target[k].shape for k in head_target)
    if load_head is True and not head_fits:
        found = {k: list(state[k].shape) for k in sorted(head_file)} or "no head"
        wanted = {k: list(target[k].shape) for k in sorted(head_target)}
        raise UserError(f"'{path}' head {found} does not fit the model's head {wanted}; build the model with the "
                        "checkpoint's number of classes or load it without the head.")
    use_head = load_head is not False and head_fits
    skipped = set() if use_head else set(head_target)
    if not load_stem:
        skipped |= {k for k in target if k.startswith(STEM_PREFIX)}

    missing, unexpected, reshaped = [], [], []
    for key, value in target.items():
        if key in head_target or key in skipped:
            continue
        if key not in state:
            # Files saved before PyTorch 0.4.1 have no BN batch counters; the counter only
            # matters when BN momentum is None, so starting it at zero is harmless.
            if not key.endswith("num_batches_tracked"):
                missing.append(key)
        elif state[key].shape != value.shape:
            reshaped.append((key, list(state[key].shape), list(value.shape)))
    unexpected = [k for k in state if k not in target and k not in head_file]
    if missing or unexpected or reshaped:
        raise _mismatch_error(path, fmt, model, state, missing, unexpected, reshaped)

    merged = {}
    for key, value in target.items():
        if key in skipped:
            merged[key] = value
        elif key in state:
            merged[key] = state[key]
        else:
            merged[key] = torch.zeros_like(value)
    check_finite_state({k: v for k, v in merged.items() if k in state and k not in skipped}, path)
    model.load_state_dict(merged, strict=True)

    normalization = None
    if file_mean is not None and file_std is not None:
        normalization = (list(file_mean), list(file_std))
    if mask is not None:
        mask = {k: v.clone() for k, v in mask.items() if k not in skipped} or None
    return {"format": fmt, "dropped_head": not use_head, "dropped_stem": not load_stem, "mask": mask,
            "file_normalization": normalization}
