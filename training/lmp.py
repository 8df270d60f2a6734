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

import torch

import pruning_utils
from attacks import training_attack
from masks.learned import SCORE_INITS, ScoredNetwork, top_k_mask  # noqa: F401  (SCORE_INITS, top_k_mask: LMP's public names)
from training import setup
from training.engine import lr_for_epoch, make_sgd, set_lr, train_epoch
from training.loop import Policy, Progress, ResumableRun
from utils.checkpoint import safe_load
from utils.errors import UserError

DEFAULT_LR = 0.1  # of the order edge-popup/HYDRA use for scores; the stage-1 default 5e-4 is IMP's, for weights


def resolve_args(args):
    """LMP's own defaults and refusals, applied by stage 1's parser (before any directory is claimed)."""
    if args.lr is None:
        args.lr = DEFAULT_LR
    if args.attack_bn == "train":
        raise UserError("--attack-bn train would change θ_p's BatchNorm statistics, which LMP keeps frozen; "
                        "drop the flag (LMP crafts its attacks with BatchNorm in eval mode).")
    args.attack_bn = "eval"


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
                 loss_guard=loss_guard, tensorboard=args.tensorboard).run()


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
