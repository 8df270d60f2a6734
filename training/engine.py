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

from training.common_args import MAX_LOSS_FACTOR, MAX_LOSS_PATIENCE
from utils import distributed as du
from utils.errors import NonFiniteLoss, NonFiniteOutput, UserError

SYNC_EVERY = 25  # steps between host syncs: progress display and the non-finite-loss check


def uniform_loss(num_classes):
    """Cross-entropy of a uniform prediction: the scale against which a training loss is judged."""
    return math.log(max(2, int(num_classes)))


class LossGuard:
    """Stops training whose loss stays above ``bound`` for ``patience`` consecutive steps.

    A loss can stay finite and still be garbage (lr 30 gave 9e13 and a 'finished' run at chance),
    so a non-finite check alone is not enough. The count lives on the device and is read only at
    the engine's sync points, so the check costs no extra host synchronisation; it carries across
    epochs, because a tiny epoch may have fewer steps than ``patience``.
    """

    def __init__(self, bound, patience=MAX_LOSS_PATIENCE):
        self.bound = float(bound)
        self.patience = int(patience)
        self.consecutive = None
        self.longest = None
        self.device = torch.device("cpu")

    @classmethod
    def for_classes(cls, max_loss, num_classes):
        """The guard of ``--max-loss``; unset, MAX_LOSS_FACTOR times the loss of a uniform prediction."""
        return cls(max_loss or MAX_LOSS_FACTOR * uniform_loss(num_classes), MAX_LOSS_PATIENCE)

    def update(self, loss):
        if self.consecutive is None:
            self.consecutive = torch.zeros((), device=loss.device, dtype=torch.int64)
            self.longest = torch.zeros((), device=loss.device, dtype=torch.int64)
        over = loss.detach() > self.bound
        self.consecutive = torch.where(over, self.consecutive + 1, torch.zeros_like(self.consecutive))
        self.longest = torch.maximum(self.longest, self.consecutive)

    def check(self):
        """Raise NonFiniteLoss (divergence) when the bound held for ``patience`` steps on any rank.
        A collective: every rank calls it at the same points, also one that has seen no images yet."""
        if self.longest is None:
            flag = torch.zeros(1, device=self.device)
        else:
            flag = (self.longest >= self.patience).to(torch.float32).reshape(1)
        hit = du.all_reduce_sum(flag)
        if hit.item() > 0:
            raise NonFiniteLoss(f"training loss stayed above {self.bound:.4g} (--max-loss) for {self.patience} "
                                "consecutive steps")

    def state_dict(self):
        return {"consecutive": None if self.consecutive is None else int(self.consecutive.item())}

    def load_state_dict(self, state):
        if state and state.get("consecutive") is not None:
            self.consecutive = torch.tensor(int(state["consecutive"]))
            self.longest = torch.zeros((), dtype=torch.int64)

    def to(self, device):
        self.device = torch.device(device)
        if self.consecutive is not None:
            self.consecutive = self.consecutive.to(device)
            self.longest = self.longest.to(device)
        return self


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
                max_steps=None, train_mode=True, loss_guard=None, start_step=0, carry=None, step_hook=None):
    """One pass over ``loader``. Returns {"train_loss", "train_acc", "seconds", "images"}.

    ``attack`` turns each clean batch into the training batch (None: standard training);
    ``attack_model`` is what the attack queries (the unwrapped model under DDP);
    ``enforcer`` (pruning_utils.MaskEnforcer) keeps pruned weights at exactly zero.
    ``train_mode=False`` leaves the modes the caller set (e.g. frozen BatchNorm for linear evaluation).
    ``loss_guard`` (LossGuard) stops a loss that stays finite but absurd.
    Mid-epoch resume: the loader was positioned at batch ``start_step`` (``set_epoch(e, start_batch=)``)
    and ``carry`` holds the sums of the steps already taken (:func:`epoch_carry`).
    ``step_hook(step, carry_fn)`` runs after every step (``carry_fn()`` gives the sums so far); it may
    save a checkpoint and raise :class:`utils.errors.Preempted`.
    Raises NonFiniteLoss as soon as the loss stops being finite.
    """
    precision = precision or Precision(torch.device(device).type)
    attack_model = attack_model if attack_model is not None else model
    if train_mode:
        model.train()
    start, loss_sum, correct, seen = _carried_sums(carry, device)
    world_size = du.get_world_size()
    step_sizes = loader.step_sizes() if world_size > 1 and hasattr(loader, "step_sizes") else None
    if loss_guard is not None:
        loss_guard.to(device)
    bar = _bar(loader, desc, progress)
    for step, (images, labels) in enumerate(bar, start=start_step):
        if max_steps is not None and step >= max_steps:
            break
        images, labels = _to_device(images, labels, device, channels_last)
        n = labels.shape[0]
        if attack is not None and n:
            with precision.autocast():
                images = attack(attack_model, images, labels)
        with precision.autocast():
            logits = model(images)
            # a rank left without images in an epoch's last step (dataset.train_step_bounds) still
            # joins the step with a zero loss that reaches every parameter, so DDP's all-reduce completes
            loss = F.cross_entropy(logits.float(), labels) if n else logits.float().sum()
        global_n = step_sizes[step] if step_sizes is not None else None
        _optimizer_step(_rank_objective(loss, n, world_size, global_n, logits.device), optimizer, scaler, enforcer)
        seen += n
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == labels).sum()
        if loss_guard is not None and n:
            loss_guard.update(loss)
        if (step + 1) % SYNC_EVERY == 0:
            _sync_point(step, loss_sum, correct, seen, loss_guard, bar)
        if step_hook is not None:
            step_hook(step + 1, lambda ls=loss_sum, c=correct, n=seen: epoch_carry(ls, c, n, start))
    if loss_guard is not None:
        loss_guard.check()
    return _epoch_stats(loss_sum, correct, seen, device, start)


def _carried_sums(carry, device):
    """The clock start and the running sums of an epoch, from a mid-epoch ``carry`` (or zero)."""
    carry = carry or {}
    start = time.perf_counter() - float(carry.get("seconds", 0.0))
    loss_sum = torch.tensor(float(carry.get("loss_sum", 0.0)), device=device, dtype=torch.float64)
    correct = torch.tensor(int(carry.get("correct", 0)), device=device, dtype=torch.int64)
    seen = int(carry.get("seen", 0))
    if du.get_world_size() > 1 and du.get_rank() != 0:
        # the carried sums are the global ones of the steps already taken: counted once, on rank 0
        loss_sum.zero_()
        correct.zero_()
        seen = 0
    return start, loss_sum, correct, seen


def _rank_objective(loss, n, world_size, global_n, device):
    """What this rank back-propagates. DDP averages gradients over ranks whose batches differ in size
    in an epoch's last step; weighting each rank's mean loss by n * world / global n makes that
    average the gradient of the mean loss over the whole global batch (``global_n`` None: unknown)."""
    if world_size == 1:
        return loss
    if global_n is not None:
        return loss * (n * world_size / global_n)
    # a loader without a known step plan: ask the other ranks
    global_n = du.all_reduce_sum(torch.full((1,), float(n), device=device))
    return loss * (n * world_size / global_n)[0]


def _optimizer_step(objective, optimizer, scaler, enforcer):
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(objective).backward()
        if enforcer is not None:
            enforcer.after_backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        objective.backward()
        if enforcer is not None:
            enforcer.after_backward()
        optimizer.step()
    if enforcer is not None:
        enforcer.after_step()


def _sync_point(step, loss_sum, correct, seen, loss_guard, bar):
    """Every SYNC_EVERY steps: the loss guard, the divergence check over all ranks, the progress bar."""
    if loss_guard is not None:
        loss_guard.check()
    # every rank learns that some rank diverged, so all stop together instead of the healthy
    # ones waiting in the next gradient all-reduce for a rank that has already left
    diverged = du.all_reduce_sum((~torch.isfinite(loss_sum)).to(torch.float32).reshape(1))
    running = (loss_sum / max(seen, 1)).item()
    if diverged.item() > 0:
        value = "non-finite on another rank" if math.isfinite(running) else running
        raise NonFiniteLoss(f"training loss became {value} at step {step + 1}")
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{running:.3f}", acc=f"{100.0 * correct.item() / max(seen, 1):.1f}")


def _epoch_stats(loss_sum, correct, seen, device, start):
    """The epoch's totals over all ranks, checked: no batches at all is a set-up mistake, a
    non-finite mean loss a divergence."""
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


def epoch_carry(loss_sum, correct, seen, start):
    """The sums of a partial epoch over all ranks, in plain types, for a mid-epoch checkpoint (a
    collective and a host sync; every rank calls it at the same step). A resume puts them back on
    rank 0 only, so each image of the epoch is counted once."""
    totals = torch.stack([loss_sum.double(), correct.double(),
                          torch.tensor(float(seen), device=loss_sum.device, dtype=torch.float64)])
    du.all_reduce_sum(totals)
    loss_total, correct_total, n_total = totals.tolist()
    return {"loss_sum": loss_total, "correct": int(round(correct_total)), "seen": int(round(n_total)),
            "seconds": time.perf_counter() - start}


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
    broken = torch.zeros((), device=device, dtype=torch.int64)  # images with a non-finite logit
    seen = 0
    try:
        for images, labels in _bar(loader, desc, progress):
            images, labels = _to_device(images, labels, device, channels_last)
            with torch.no_grad(), precision.autocast():
                logits = model(images)
                correct += (logits.argmax(1) == labels).sum()
                broken += (~torch.isfinite(logits).all(1)).sum()
            if attack is not None:
                with precision.autocast():
                    adv = attack(model, images, labels)
                with torch.no_grad(), precision.autocast():
                    robust += (model(adv).argmax(1) == labels).sum()
            seen += labels.shape[0]
    finally:
        model.train(was_training)
    totals = torch.stack([correct, robust, torch.tensor(seen, device=device, dtype=torch.int64), broken]).double()
    du.all_reduce_sum(totals)
    c, r, n, bad = totals.tolist()
    if n == 0:
        raise UserError("the evaluation loader produced no images; check the dataset split sizes.")
    if bad:
        # argmax of NaN logits is an arbitrary class, so the 'accuracy' would be noise, not a result
        raise NonFiniteOutput(f"the model gave non-finite logits for {int(bad)} of {int(n)} images in {desc}")
    out = {"sa": 100.0 * c / n, "n": int(n)}
    out["ra"] = 100.0 * r / n if attack is not None else None
    return out
