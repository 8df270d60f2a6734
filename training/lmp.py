"""LMP, learned-mask pruning (HYDRA, Sehwag et al. 2020; edge-popup, Ramanujan et al. 2020).

θ_p is frozen: its weights and its BatchNorm statistics never change (BatchNorm stays in eval mode,
so the network whose mask is learned is exactly θ_p under the mask, the network stage 2 starts
from). Each prunable weight gets one real-valued score; the forward pass keeps the weights whose
scores are among the top k (globally, or per layer with ``--layerwise``), k being the kept count of
the target level, so every ticket has exactly the requested sparsity. The top-k step passes its
gradient straight through to the scores. Only the scores are trained (SGD with momentum and weight
decay, cosine learning rate within each level), on the source task with the standard or the PGD
adversarial loss.

Every level 1 − (1 − rate)^k, k = 1..rounds, is one independent run from the same |θ_p|-based
score initialisation, as HYDRA prunes a pre-trained network to one target in one pruning phase; the
levels are therefore not nested. A checkpoint is written after every epoch; a rerun resumes the
level in progress and skips the finished ones.
"""

import math

import torch
import torch.nn as nn
from torch.func import functional_call

import pruning_utils
from attacks import training_attack
from training import setup
from training.engine import lr_for_epoch, make_sgd, set_lr, train_epoch
from training.loop import Policy, Progress, ResumableRun
from utils.checkpoint import safe_load
from utils.errors import UserError

SCORE_INITS = ("scaled", "magnitude")
DEFAULT_LR = 0.1  # of the order edge-popup/HYDRA use for scores; the stage-1 default 5e-4 is IMP's, for weights


def resolve_args(args):
    """LMP's own defaults and refusals, applied by stage 1's parser (before any directory is claimed)."""
    if args.lr is None:
        args.lr = DEFAULT_LR
    if args.attack_bn == "train":
        raise UserError("--attack-bn train would change θ_p's BatchNorm statistics, which LMP keeps frozen; "
                        "drop the flag (LMP crafts its attacks with BatchNorm in eval mode).")
    args.attack_bn = "eval"


def top_k_mask(flat, keep):
    """Bool vector flagging exactly ``keep`` largest entries of the 1-D ``flat``.

    Whichever of keep / drop is smaller is selected with ``topk``, which is faster than a full
    sort; ties are broken by ``topk``, deterministically for a given input and device.
    """
    n = flat.numel()
    if not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} entries")
    if 2 * keep <= n:
        mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
        if keep:
            mask[torch.topk(flat, keep, sorted=False).indices] = True
    else:
        mask = torch.ones(n, dtype=torch.bool, device=flat.device)
        if n - keep:
            mask[torch.topk(flat, n - keep, largest=False, sorted=False).indices] = False
    return mask


class _TopKStraightThrough(torch.autograd.Function):
    """Forward: the 0/1 top-k mask of the scores. Backward: the identity (edge-popup's estimator),
    so a pruned weight whose score gradient says it would help can climb back into the top k."""

    @staticmethod
    def forward(ctx, scores, keep):
        return top_k_mask(scores, keep).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def initial_scores(weight, how):
    """Scores of one layer from its θ_p weights.

    ``magnitude``: |w| itself, so untrained scores give exactly OMP's mask.
    ``scaled`` (HYDRA's scaled init): |w| / max|w| · sqrt(6 / fan_in), which puts every layer's
    scores on the scale of a Kaiming-uniform bound; with a global top-k it also sets how the
    untrained sparsity spreads over the layers (wide-fan-in layers start lower).
    """
    score = weight.detach().abs().float().clone(memory_format=torch.contiguous_format)
    if how == "magnitude":
        return score
    if how != "scaled":
        raise UserError(f"--score-init must be one of {', '.join(SCORE_INITS)}, not '{how}'.")
    fan_in = weight[0].numel()
    peak = float(score.max())
    if peak == 0.0:  # an all-zero layer: every score equal, the top-k breaks the tie
        return score
    return score * (math.sqrt(6.0 / fan_in) / peak)


class ScoredNetwork(nn.Module):
    """θ_p (frozen, BatchNorm in eval mode) under the top-k mask of trainable scores.

    ``keep`` is an int (one global top-k over every score) or a dict name -> int (a top-k per
    layer). The only parameters that require gradients are the scores, so ``train_epoch`` and DDP
    see a model whose parameters are the scores. The base's weights are substituted through
    ``torch.func.functional_call``, not hooks: the module itself is never modified.
    """

    def __init__(self, base, names, keep, score_init="scaled"):
        super().__init__()
        params = dict(base.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise UserError(f"the model has no parameter '{missing[0]}' to learn a mask for; "
                            "build the model of the ticket's --arch.")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base.eval()
        self.names = list(names)
        self.scores = nn.ParameterList(nn.Parameter(initial_scores(params[n], score_init)) for n in self.names)
        sizes = [params[n].numel() for n in self.names]
        if isinstance(keep, dict):
            self.keep = [int(keep[n]) for n in self.names]
            bad = [(n, k, s) for n, k, s in zip(self.names, self.keep, sizes) if not 0 <= k <= s]
        else:
            self.keep = int(keep)
            bad = [] if 0 <= self.keep <= sum(sizes) else [("all layers", self.keep, sum(sizes))]
        if bad:
            name, k, s = bad[0]
            raise UserError(f"cannot keep {k} of the {s} weights of {name}; the level is out of range.")

    def train(self, mode=True):
        # θ_p's BatchNorm statistics belong to the frozen network: the base never leaves eval mode
        super().train(mode)
        self.base.eval()
        return self

    def _soft_masks(self):
        """Per-layer 0/1 masks that carry the straight-through gradient to the scores."""
        if isinstance(self.keep, list):
            return [_TopKStraightThrough.apply(s.reshape(-1), k).view(s.shape) for s, k in zip(self.scores, self.keep)]
        flat = _TopKStraightThrough.apply(torch.cat([s.reshape(-1) for s in self.scores]), self.keep)
        return [part.view(s.shape) for part, s in zip(flat.split([s.numel() for s in self.scores]), self.scores)]

    def forward(self, images):
        params = dict(self.base.named_parameters())
        masked = {n: params[n] * m for n, m in zip(self.names, self._soft_masks())}
        return functional_call(self.base, masked, (images,))

    @torch.no_grad()
    def masks(self):
        """The current mask as a ticket mask (name -> bool tensor)."""
        return {n: m.bool() for n, m in zip(self.names, self._soft_masks())}


def level_keep_counts(model, names, rounds, rate, layerwise):
    """Kept counts of levels 1..rounds: the IMP/OMP counts (per-round rounding), so an LMP
    ticket has exactly the sparsity of the IMP/OMP ticket of the same round."""
    params = dict(model.named_parameters())
    sizes = {n: params[n].numel() for n in names}
    total = sum(sizes.values())
    if layerwise:
        return [{n: s - pruning_utils.imp_pruned_count(s, k, rate) for n, s in sizes.items()}
                for k in range(1, rounds + 1)]
    return [total - pruning_utils.imp_pruned_count(total, k, rate) for k in range(1, rounds + 1)]


def run(args, model, data, writer, *, save_dir, dist_info, precision, config, log_fields, broadcast_mask, stop,
        loss_guard):
    """Every LMP level of stage 1 into ``save_dir`` (tickets, sparsity.json, log.csv, checkpoint.pt).

    ``model`` holds θ_p and is left unchanged; ``writer`` is the stage's TicketWriter;
    ``broadcast_mask(mask, k)`` makes every rank save rank 0's mask; ``stop``
    (preemption.StopRequest) and ``args.checkpoint_minutes`` checkpoint inside an epoch;
    ``loss_guard`` (engine.LossGuard) stops a loss that stays absurd.
    """
    policy = LearnedMasks(args, model, data, writer, save_dir=save_dir, dist_info=dist_info, precision=precision,
                          config=config, log_fields=log_fields, broadcast_mask=broadcast_mask)
    ResumableRun(policy, save_dir=save_dir, dist_info=dist_info, stop=stop, checkpoint_minutes=args.checkpoint_minutes,
                 loss_guard=loss_guard).run()


class LearnedMasks(Policy):
    """LMP in the resumable loop: unit k is level k, whose scores are trained ``--epochs-per-round``
    epochs (cosine learning rate within the level) and whose ticket is written at its end."""

    log_always = True  # the stage-1 directory has its log.csv even when no level trained an epoch

    def __init__(self, args, model, data, writer, *, save_dir, dist_info, precision, config, log_fields,
                 broadcast_mask):
        self.args, self.model, self.data, self.writer = args, model, data, writer
        self.save_dir, self.dist_info, self.precision, self.config = save_dir, dist_info, precision, config
        self.log_fields, self.broadcast_mask = log_fields, broadcast_mask
        self.names = pruning_utils.prunable_names(model, include_stem=not args.exclude_stem)
        self.keeps = level_keep_counts(model, self.names, args.rounds, args.rate, args.layerwise)
        self.attack = training_attack(args.retrain, args.eps, args.alpha, args.attack_steps, "eval")
        self.scaler = precision.make_scaler()
        self.net = self.optimizer = self.runner = self.plain = None
        self.resumed_state = None  # the checkpoint, until the level it stopped in has taken its scores back

    def load(self, path, device):
        state = safe_load(path, map_location=device)
        if not isinstance(state, dict) or state.get("method") != "lmp" or "level" not in state:
            raise UserError(f"'{path}' is not an LMP checkpoint of this stage; rerun with --restart to start "
                            "again, or choose another --save-dir.")
        return state

    def fresh(self):
        return Progress(1, 0)

    def restore(self, ckpt):
        self.resumed_state = ckpt
        return Progress(ckpt["level"], ckpt["epoch"], ckpt["log"], ckpt.get("partial"))

    def resumed(self, progress):
        if progress.unit > self.args.rounds:
            setup.log(f"all {self.args.rounds} LMP levels are already done in {self.save_dir}")
        else:
            where = "" if progress.partial is None else f", step {progress.partial['step']} of the next"
            setup.log(f"resuming {self.save_dir}: level {progress.unit}, {progress.epoch}/{self.args.epochs_per_round} "
                      f"epochs done{where}")

    def has_unit(self, level):
        return level <= self.args.rounds

    def epochs(self, level):
        return self.args.epochs_per_round

    def enter_unit(self, progress):
        args, level = self.args, progress.unit
        self.net = ScoredNetwork(self.model, self.names, self.keeps[level - 1], args.score_init)
        self.optimizer = make_sgd(self.net.scores.parameters(), args.lr, args.momentum, args.weight_decay,
                                  self.dist_info.device)
        state, self.resumed_state = self.resumed_state, None
        if state is not None and state.get("scores") is not None:
            with torch.no_grad():
                for s, saved in zip(self.net.scores, state["scores"]):
                    s.copy_(saved.to(s.device))
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        self.runner, self.plain = setup.wrap_model(self.net, args, self.dist_info)
        self.target = pruning_utils.imp_sparsity(level, args.rate)

    def train(self, progress, *, start_step, carry, step_hook, loss_guard):
        args, level, epoch = self.args, progress.unit, progress.epoch
        epochs = args.epochs_per_round
        self.lr = lr_for_epoch(epoch, args.lr, epochs, schedule="cosine")
        set_lr(self.optimizer, self.lr)
        self.data.train.set_epoch((level - 1) * epochs + epoch, start_batch=start_step)
        return train_epoch(self.runner, self.data.train, self.optimizer, device=self.dist_info.device,
                           attack=self.attack, attack_model=self.plain, precision=self.precision, scaler=self.scaler,
                           channels_last=args.channels_last, progress=args.progress, train_mode=False,
                           desc=f"lmp level {level}/{args.rounds} epoch {epoch + 1}/{epochs}",
                           loss_guard=loss_guard, start_step=start_step, carry=carry, step_hook=step_hook)

    def after_epoch(self, progress, stats):
        return {"round": progress.unit, "epoch": progress.epoch, "lr": self.lr, "train_loss": stats["train_loss"],
                "train_acc": stats["train_acc"], "sparsity": round(self.target, 2),
                "seconds": round(stats["seconds"], 3)}

    def end_unit(self, progress):
        level = progress.unit
        mask = self.broadcast_mask(self.net.masks(), level)
        ticket = self.writer.write(level, mask)
        rows = [r for r in progress.log if r["round"] == level]
        trained = f": loss {rows[-1]['train_loss']:.4f} acc {rows[-1]['train_acc']:.2f}" if rows else " (untrained)"
        setup.log(f"lmp level {level}/{self.args.rounds}: ticket at {ticket['sparsity']:.2f}% sparsity{trained} "
                  f"-> {self.writer.path(level)}")
        self.net = self.optimizer = self.runner = self.plain = None
        return True

    def checkpoint(self, progress):
        return {"method": "lmp", "level": progress.unit, "epoch": progress.epoch, "log": progress.log,
                "scores": None if self.net is None else [s.detach().cpu() for s in self.net.scores],
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "partial": progress.partial, "init": str(self.args.init), "init_sha256": self.config["init_sha256"]}

    def where(self, progress):
        return f"LMP level {progress.unit}, epoch {progress.epoch + 1},"

    def diverged(self, exc, progress):
        ckpt_path = self.save_dir / "checkpoint.pt"
        kept = (f"the checkpoint of level {progress.unit} after {progress.epoch} epochs is kept in '{ckpt_path}'"
                if ckpt_path.exists() else "no checkpoint was written")
        return (f"{exc} at LMP level {progress.unit}, epoch {progress.epoch + 1}; {kept}. Lower --lr and rerun "
                "with --restart or choose another --save-dir.")
