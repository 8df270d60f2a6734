"""The training engine both stages share: ``train_epoch`` and ``evaluate`` returning metric dicts.

Speed choices live here once (issue 7): bf16 autocast on CUDA, channels_last, masks enforced in
place (no forward hooks), attacks that compute no parameter gradients, fused SGD on CUDA, and
metric sums kept on the device so the loop never waits for the GPU except every few dozen steps.
"""

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import attacks
from utils import distributed as du
from utils.errors import UserError

REGIMES = ("st", "fat", "at")
SYNC_EVERY = 25  # steps between host syncs: progress display and the non-finite-loss check


class NonFiniteLoss(UserError):
    """Training diverged; the caller names where and keeps the last good checkpoint."""


@dataclass
class Precision:
    """Autocast settings; ``dtype`` None means full fp32."""
    device_type: str
    dtype: torch.dtype = None

    @classmethod
    def resolve(cls, amp, device):
        device = torch.device(device)
        if amp == "auto":
            amp = "bf16" if device.type == "cuda" else "off"
        table = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if amp not in table:
            raise UserError(f"--amp must be auto, off, bf16 or fp16, not '{amp}'.")
        if amp == "fp16" and device.type != "cuda":
            raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or off on the CPU.")
        return cls(device.type, table[amp])

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def make_scaler(self):
        return torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None


@dataclass
class AttackSpec:
    """A threat model for training or evaluation: which attack, how strong."""
    kind: str  # "pgd" or "fgsm_rs"
    eps: float
    alpha: float
    steps: int = 1
    random_start: bool = True
    bn_mode: str = None  # None: leave the model's mode; "train"/"eval": force it during the attack

    def __call__(self, model, images, labels):
        if self.kind == "pgd":
            return attacks.pgd_attack(model, images, labels, self.eps, self.alpha, self.steps,
                                      random_start=self.random_start, bn_mode=self.bn_mode)
        if self.kind == "fgsm_rs":
            return attacks.fgsm_rs_attack(model, images, labels, self.eps, self.alpha, bn_mode=self.bn_mode)
        raise ValueError(self.kind)


def training_attack(regime, eps, alpha, steps, bn_mode="train"):
    """The attack that makes a training batch adversarial for a regime, or None for standard training."""
    if regime == "st":
        return None
    if regime == "at":
        return AttackSpec("pgd", eps, alpha, steps, True, bn_mode)
    if regime == "fat":
        return AttackSpec("fgsm_rs", eps, alpha, 1, True, bn_mode)
    raise UserError(f"regime must be one of {', '.join(REGIMES)}, not '{regime}'.")


def make_sgd(params, lr, momentum, weight_decay, device):
    """SGD with the fused kernel on CUDA; on CPU the per-tensor loop, which measured faster there
    than the foreach kernel (benchmarks/README.md)."""
    kwargs = {"fused": True} if torch.device(device).type == "cuda" else {"foreach": False}
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)


def lr_for_epoch(epoch, base_lr, epochs, milestones=None, schedule="step", gamma=0.1):
    """Learning rate of a (0-based) epoch: step decay at ``milestones`` or cosine annealing to 0."""
    if schedule == "cosine":
        return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    if schedule in ("step", "constant"):
        drops = sum(1 for m in (milestones or []) if epoch >= m)
        return base_lr * gamma ** drops
    raise UserError(f"--schedule must be step or cosine, not '{schedule}'.")


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def unwrap(model):
    """The module inside DDP / torch.compile wrappers (where parameters and masks live)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _to_device(images, labels, device, channels_last):
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def _bar(loader, desc, enabled):
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
                disable=not (enabled and du.is_primary()))


def train_epoch(model, loader, optimizer, *, device, attack=None, attack_model=None, enforcer=None,
                precision=None, scaler=None, channels_last=False, progress=True, desc="train",
                max_steps=None, train_mode=True):
    """One pass over ``loader``. Returns {"train_loss", "train_acc", "seconds", "images"}.

    ``attack`` turns each clean batch into the training batch (None: standard training);
    ``attack_model`` is what the attack queries (the unwrapped model under DDP);
    ``enforcer`` (pruning_utils.MaskEnforcer) keeps pruned weights at exactly zero.
    ``train_mode=False`` leaves the modes the caller set (e.g. frozen BatchNorm for linear evaluation).
    Raises NonFiniteLoss as soon as the loss stops being finite.
    """
    precision = precision or Precision(torch.device(device).type)
    attack_model = attack_model if attack_model is not None else model
    if train_mode:
        model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    bar = _bar(loader, desc, progress)
    for step, (images, labels) in enumerate(bar):
        if max_steps is not None and step >= max_steps:
            break
        images, labels = _to_device(images, labels, device, channels_last)
        if attack is not None:
            with precision.autocast():
                images = attack(attack_model, images, labels)
        with precision.autocast():
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if enforcer is not None:
                enforcer.after_backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if enforcer is not None:
                enforcer.after_backward()
            optimizer.step()
        if enforcer is not None:
            enforcer.after_step()
        n = labels.shape[0]
        seen += n
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == labels).sum()
        if (step + 1) % SYNC_EVERY == 0:
            # every rank learns that some rank diverged, so all stop together instead of the healthy
            # ones waiting in the next gradient all-reduce for a rank that has already left
            diverged = du.all_reduce_sum((~torch.isfinite(loss_sum)).to(torch.float32).reshape(1))
            running = (loss_sum / max(seen, 1)).item()
            if diverged.item() > 0:
                value = "non-finite on another rank" if math.isfinite(running) else running
                raise NonFiniteLoss(f"training loss became {value} at step {step + 1}")
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{running:.3f}", acc=f"{100.0 * correct.item() / max(seen, 1):.1f}")
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)])
    du.all_reduce_sum(totals)
    loss_total, correct_total, n_total = totals.tolist()
    if n_total == 0:
        raise UserError("the training loader produced no batches; lower --batch-size or use more data.")
    train_loss = loss_total / n_total
    if not math.isfinite(train_loss):
        raise NonFiniteLoss(f"training loss became {train_loss}")
    return {"train_loss": train_loss, "train_acc": 100.0 * correct_total / n_total,
            "seconds": time.perf_counter() - start, "images": int(n_total)}


def evaluate(model, loader, *, device, attack=None, precision=None, channels_last=False, progress=True,
             desc="eval"):
    """Clean accuracy ("sa") and, with ``attack``, accuracy on attacked images ("ra"), in percent.

    The model is put in eval mode; counts are summed over ranks.
    """
    precision = precision or Precision(torch.device(device).type)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.int64)
    robust = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    try:
        for images, labels in _bar(loader, desc, progress):
            images, labels = _to_device(images, labels, device, channels_last)
            with torch.no_grad(), precision.autocast():
                correct += (model(images).argmax(1) == labels).sum()
            if attack is not None:
                with precision.autocast():
                    adv = attack(model, images, labels)
                with torch.no_grad(), precision.autocast():
                    robust += (model(adv).argmax(1) == labels).sum()
            seen += labels.shape[0]
    finally:
        model.train(was_training)
    totals = torch.stack([correct, robust, torch.tensor(seen, device=device, dtype=torch.int64)]).double()
    du.all_reduce_sum(totals)
    c, r, n = totals.tolist()
    if n == 0:
        raise UserError("the evaluation loader produced no images; check the dataset split sizes.")
    out = {"sa": 100.0 * c / n, "n": int(n)}
    out["ra"] = 100.0 * r / n if attack is not None else None
    return out
