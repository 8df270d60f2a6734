"""Adversarial attacks in [0, 1] pixel space: PGD (ℓ∞, ℓ2), FGSM with random start, AutoAttack,
transfer attacks.

Models normalize their inputs internally, so ε and α are in pixel units and every attack feeds
the model images in [0, 1].  The attacks take gradients with respect to the input only: the
parameters are frozen for the duration of an attack, so adversarial training never finds stray
parameter gradients, and the model's train/eval mode is restored module by module afterwards.
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from utils.cli import parse_fraction, resolve_sizes  # noqa: F401  (the attacks' ε and α readers and their defaults)
from utils.distributed import unwrap_model
from utils.errors import UserError

NORMS = ("linf", "l2")
BN_MODES = (None, "eval", "train")
REGIMES = ("st", "fat", "at")  # standard, fast (FGSM-RS) and PGD adversarial training

# Guards the divisions by per-example ℓ2 norms against an all-zero gradient or perturbation.
_TINY = 1e-12


def _check_norm(norm) -> str:
    key = norm.lower() if isinstance(norm, str) else norm
    if key not in NORMS:
        raise UserError(f"attack norm {norm!r} is not supported; use 'linf' or 'l2'.")
    return key


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise UserError(f"attack steps {steps!r} is not valid; give a non-negative integer.")
    return int(steps)


@contextlib.contextmanager
def attack_mode(model: nn.Module, bn_mode: str | None = None):
    """Freeze parameters and set train/eval for an attack; restore both exactly on exit.

    ``bn_mode``: None leaves the mode as it is, "eval" uses batch-independent BN statistics,
    "train" uses batch statistics and updates the running ones (the seed code's training-time
    attack).  Gradients are enabled even under a caller's ``no_grad``/``inference_mode``.
    """
    if bn_mode not in BN_MODES:
        raise UserError(f"bn_mode {bn_mode!r} is not supported; use None, 'eval' or 'train'.")
    modes = None
    if bn_mode is not None:
        modes = [(module, module.training) for module in model.modules()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        if modes is not None:
            model.train(bn_mode == "train")
        for p in trainable:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            yield model
    finally:
        for p in trainable:
            p.requires_grad_(True)
        if modes is not None:
            # Per-module flags, not model.train(flag): a model may deliberately keep some
            # submodules (e.g. frozen BN) in a mode different from its root.
            for module, training in modes:
                module.training = training


def _batch_norms(t: torch.Tensor) -> torch.Tensor:
    """Per-example ℓ2 norms shaped to broadcast against ``t``."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1).view(-1, *([1] * (t.dim() - 1)))


def _sum_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Summed rather than averaged: per-example gradients then do not shrink with the batch
    # size, which keeps them clear of float16 underflow under autocast.  sign() and the ℓ2
    # step are scale-invariant, so the attack is the same.
    return F.cross_entropy(logits, labels, reduction="sum")


def _input_gradient(model, adv, labels, loss_fn):
    adv.requires_grad_(True)
    # Loss in float32 whatever autocast made of the logits.
    loss = loss_fn(model(adv).float(), labels)
    (grad,) = torch.autograd.grad(loss, adv)
    adv.requires_grad_(False)
    return grad


def _pgd_linf(model, x, labels, eps, alpha, steps, random_start, loss_fn):
    if random_start:
        adv = torch.empty_like(x).uniform_(-eps, eps).add_(x).clamp_(0.0, 1.0)
    else:
        adv = x.clone()
    delta = torch.empty_like(x)
    for _ in range(steps):
        grad = _input_gradient(model, adv, labels, loss_fn)
        adv.add_(grad.sign_(), alpha=alpha)
        torch.sub(adv, x, out=delta).clamp_(-eps, eps)
        torch.add(x, delta, out=adv).clamp_(0.0, 1.0)
    return adv


def _pgd_l2(model, x, labels, eps, alpha, steps, random_start, loss_fn):
    delta = torch.empty_like(x)
    if random_start:
        # Random direction, radius uniform in [0, eps] (as torchattacks' PGDL2 does).
        delta.normal_()
        radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        delta.mul_(radius.mul_(eps).div_(_batch_norms(delta).clamp_min_(_TINY)))
        adv = torch.add(x, delta).clamp_(0.0, 1.0)
    else:
        adv = x.clone()
    for _ in range(steps):
        grad = _input_gradient(model, adv, labels, loss_fn)
        grad.div_(_batch_norms(grad).clamp_min_(_TINY))
        adv.add_(grad, alpha=alpha)
        torch.sub(adv, x, out=delta)
        delta.mul_((eps / _batch_norms(delta).clamp_min_(_TINY)).clamp_max_(1.0))
        torch.add(x, delta, out=adv).clamp_(0.0, 1.0)
    return adv


def pgd_attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps, alpha,
               steps: int, random_start: bool = True, norm: str = "linf",
               bn_mode: str | None = None,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
               ) -> torch.Tensor:
    """PGD (Madry et al.) in [0, 1] pixel space; returns detached adversarial images.

    ℓ∞: random start uniform in [-ε, ε], steps of α·sign(∇), projection onto the ε-box.
    ℓ2: random start in the ε-ball, steps of α·∇/‖∇‖₂ per example, per-example projection.
    Results are clamped to [0, 1].  ``loss_fn(logits_float32, labels)`` returns the scalar
    the attack maximises (default: cross-entropy).  ``bn_mode``: see :func:`attack_mode`.
    """
    eps = parse_fraction(eps, "eps")
    alpha = parse_fraction(alpha, "alpha")
    steps = _check_steps(steps)
    norm = _check_norm(norm)
    if not images.is_floating_point():
        raise UserError(f"attack images have dtype {images.dtype}; convert them to float "
                        "in [0, 1] first.")
    loss_fn = _sum_cross_entropy if loss_fn is None else loss_fn
    run = _pgd_linf if norm == "linf" else _pgd_l2
    net = unwrap_model(model, compiled=False)
    with attack_mode(net, bn_mode):
        x = images.detach()
        # Tensors made under inference_mode cannot enter autograd; plain copies can.
        if x.is_inference():
            x = x.clone()
        if labels.is_inference():
            labels = labels.clone()
        return run(net, x, labels, eps, alpha, steps, random_start, loss_fn)


def fgsm_rs_attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps, alpha,
                   bn_mode: str | None = None) -> torch.Tensor:
    """FGSM with random start (Wong et al. 2020, "Fast is better than free").

    δ ~ U(-ε, ε), one step of α·sign(∇), δ clamped to [-ε, ε], x + δ clamped to [0, 1]:
    exactly one random-start ℓ∞ PGD step.
    """
    return pgd_attack(model, images, labels, eps, alpha, 1, random_start=True, norm="linf",
                      bn_mode=bn_mode)


@dataclass(frozen=True)
class ThreatModel:
    """One attack as training and evaluation use it: what the adversary may do (``norm``, radius
    ``eps``), how the attack searches (step ``alpha``, ``steps``, random start) and the BatchNorm
    mode it is crafted in (``bn_mode``, see :func:`attack_mode`). Calling it attacks a batch.

    FGSM-RS (Wong et al. 2020) is the one-step, random-start ℓ∞ case: :func:`fgsm_rs_attack`.
    """

    norm: str = "linf"
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    bn_mode: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "norm", _check_norm(self.norm))
        object.__setattr__(self, "eps", parse_fraction(self.eps, "eps"))
        object.__setattr__(self, "alpha", parse_fraction(self.alpha, "alpha"))
        object.__setattr__(self, "steps", _check_steps(self.steps))

    def attack(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return pgd_attack(model, images, labels, self.eps, self.alpha, self.steps,
                          random_start=self.random_start, norm=self.norm, bn_mode=self.bn_mode)

    __call__ = attack  # the engine takes any ``attack(model, images, labels)``


def training_attack(regime: str, eps, alpha, steps: int, bn_mode: str | None = "train") -> ThreatModel | None:
    """The attack that makes a training batch adversarial under ``regime``: PGD for at, FGSM-RS
    for fat, None for standard training (st)."""
    if regime == "st":
        return None
    if regime == "at":
        return ThreatModel(eps=eps, alpha=alpha, steps=steps, bn_mode=bn_mode)
    if regime == "fat":
        return ThreatModel(eps=eps, alpha=alpha, steps=1, bn_mode=bn_mode)
    raise UserError(f"regime must be one of {', '.join(REGIMES)}, not '{regime}'.")


def evaluation_attack(eps, alpha, steps: int) -> ThreatModel | None:
    """The PGD of robust evaluation (RA): random start, BatchNorm in eval mode; None for 0 steps."""
    return ThreatModel(eps=eps, alpha=alpha, steps=steps, bn_mode="eval") if steps > 0 else None


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _percent(correct, total: int) -> float:
    if total == 0:
        raise UserError("the attack evaluation received no images; check the data split "
                        "and the number of images requested.")
    return 100.0 * float(correct) / total


def attack_accuracy(model: nn.Module, batches: Iterable, attack_fn=None, device=None) -> float:
    """Accuracy (percent) in eval mode on ``attack_fn(model, images, labels)``, or clean."""
    net = unwrap_model(model, compiled=False)
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    with _eval_mode(net):
        for images, labels in batches:
            if device is not None:
                images, labels = images.to(device), labels.to(device)
            if attack_fn is not None:
                images = attack_fn(net, images, labels)
            with torch.no_grad():
                # Accumulated on the device: no host sync per batch.
                correct = correct.to(labels.device) + (net(images).argmax(1) == labels).sum()
            total += labels.numel()
    return _percent(correct, total)


def transfer_attack(source_model: nn.Module, target_models: Mapping[str, nn.Module],
                    batches: Iterable, eps, alpha, steps: int, *, random_start: bool = True,
                    norm: str = "linf") -> dict[str, float]:
    """Craft PGD on ``source_model`` (eval mode) and score every target on those images.

    Returns ``{name: accuracy percent}`` for each target plus ``"source"``: the source's own
    (white-box) accuracy on the same images.
    """
    if "source" in target_models:
        raise UserError("a transfer target is named 'source', which is the key reserved for the "
                        "source model's own accuracy; rename that target.")
    source = unwrap_model(source_model, compiled=False)
    targets = {name: unwrap_model(m, compiled=False) for name, m in target_models.items()}
    correct = {name: 0 for name in ["source", *targets]}
    total = 0
    with contextlib.ExitStack() as stack:
        for net in [source, *targets.values()]:
            stack.enter_context(_eval_mode(net))
        for images, labels in batches:
            adv = pgd_attack(source, images, labels, eps, alpha, steps,
                             random_start=random_start, norm=norm)
            with torch.no_grad():
                for name, net in [("source", source), *targets.items()]:
                    correct[name] = correct[name] + (net(adv).argmax(1) == labels).sum()
            total += labels.numel()
    return {name: _percent(value, total) for name, value in correct.items()}


# AutoAttack suites as in Croce & Hein (2020): 100 iterations per APGD/FAB run and 9 target
# classes.  torchattacks.AutoAttack itself runs its components for only 10 iterations and
# targets every other class, so the suites are assembled here from its components.
_AUTOATTACK_VERSIONS = {
    "standard": (("apgd-ce", 1), ("apgd-t", 1), ("fab-t", 1), ("square", 1)),
    "plus": (("apgd-ce", 5), ("apgd-dlr", 5), ("fab", 5), ("square", 1), ("apgd-t", 1),
             ("fab-t", 1)),
    "rand": (("apgd-ce", 1), ("apgd-dlr", 1)),
}
_AUTOATTACK_PARTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
# DLR losses divide by gaps between the top sorted logits.
_MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}
_TARGET_CLASSES = 9


def _autoattack_part(model, name, restarts, *, eps, norm, n_classes, steps, seed, eot_iter,
                     verbose):
    import torchattacks

    # n_classes - 1 targets in torchattacks; the original suite uses the 9 most likely.
    targets = min(n_classes, _TARGET_CLASSES + 1)
    common = dict(eps=eps, norm=norm, seed=seed, verbose=verbose, n_restarts=restarts)
    if name in ("apgd-ce", "apgd-dlr"):
        return torchattacks.APGD(model, steps=steps, loss=name[5:], eot_iter=eot_iter, **common)
    if name == "apgd-t":
        return torchattacks.APGDT(model, steps=steps, n_classes=targets, eot_iter=eot_iter,
                                  **common)
    if name in ("fab", "fab-t"):
        return torchattacks.FAB(model, steps=steps, multi_targeted=name == "fab-t",
                                n_classes=targets, **common)
    return torchattacks.Square(model, n_queries=5000, **common)


def _autoattack_suite(version, attacks):
    if attacks is None:
        if version not in _AUTOATTACK_VERSIONS:
            raise UserError(f"AutoAttack version {version!r} is not supported; use one of "
                            f"{', '.join(_AUTOATTACK_VERSIONS)}.")
        return _AUTOATTACK_VERSIONS[version]
    names = [attacks] if isinstance(attacks, str) else list(attacks)
    unknown = [name for name in names if name not in _AUTOATTACK_PARTS]
    if not names or unknown:
        raise UserError(f"AutoAttack attacks {attacks!r} are not valid; choose from "
                        f"{', '.join(_AUTOATTACK_PARTS)}.")
    return tuple((name, 1) for name in names)


def autoattack_eval(model: nn.Module, loader_or_batches: Iterable, eps, norm: str = "Linf",
                    version: str = "standard", n_classes: int | None = None, device=None, *,
                    attacks=None, steps: int = 100, seed: int = 0,
                    verbose: bool = False) -> float:
    """Robust accuracy (percent) under AutoAttack, with the model in eval mode.

    ``version``: "standard", "plus" or "rand"; ``attacks`` (e.g. ``["apgd-ce", "apgd-t"]``)
    replaces the version's list.  ``n_classes`` defaults to the model's output width.  The
    global RNG is left as it was (torchattacks reseeds it for every run).
    """
    import torchattacks

    eps = parse_fraction(eps, "eps")
    norm = {"linf": "Linf", "l2": "L2"}[_check_norm(norm)]
    steps = _check_steps(steps)
    suite = _autoattack_suite(version, attacks)
    net = unwrap_model(model, compiled=False)
    if device is None:
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    attack = None
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    with attack_mode(net, "eval"), torch.random.fork_rng(devices=rng_devices):
        for images, labels in loader_or_batches:
            images, labels = images.to(device), labels.to(device)
            if attack is None:
                with torch.no_grad():
                    width = net(images[:1]).shape[1]
                if n_classes is not None and n_classes != width:
                    raise UserError(f"n_classes={n_classes} but the model outputs {width} "
                                    "logits; pass the model's number of classes.")
                for name, _ in suite:
                    if width < _MIN_CLASSES.get(name, 2):
                        raise UserError(f"AutoAttack's {name} needs at least "
                                        f"{_MIN_CLASSES[name]} classes and the model has "
                                        f"{width}; choose other attacks.")
                parts = [_autoattack_part(net, name, restarts, eps=eps, norm=norm,
                                          n_classes=width, steps=steps, seed=seed,
                                          eot_iter=20 if version == "rand" else 1,
                                          verbose=verbose)
                         for name, restarts in suite]
                attack = parts[0] if len(parts) == 1 else torchattacks.MultiAttack(parts)
            adv = attack(images, labels)
            with torch.no_grad():
                correct += (net(adv).argmax(1) == labels).sum()
            total += labels.numel()
    return _percent(correct, total)
