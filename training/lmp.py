"""LMP, learned-mask pruning (HYDRA, Sehwag et al. 2020; edge-popup, Ramanujan et al. 2020).

θ_p's weights are frozen. Each prunable weight gets one real-valued score; the forward pass keeps
the weights whose scores are among the top k (globally, or per layer), k being the kept count of
the target level, so every ticket has exactly the requested sparsity. The top-k step passes its
gradient straight through to the scores, which are trained (SGD with momentum and weight decay,
cosine learning rate within each level) on the source task with the standard or the PGD loss.

Two recipes (``--lmp-recipe``, :data:`RECIPES`; a flag given on the command line wins over its
recipe's value):

- ``frozen-global`` (the default, and LMP's only recipe before presets existed): global top-k over
  the raw scores, BatchNorm frozen in eval mode (the network whose mask is learned is exactly θ_p
  under the mask, the one stage 2 starts from), stage 1's IMP settings for the rest.
- ``hydra``: HYDRA's pruning phase as its code configures it (docs/companion.md): a top-k of |s| per
  layer, BatchNorm trained while pruning unless ``--freeze-bn`` (on a copy of θ_p: the ticket keeps
  the mask only, so stage 2 still starts from θ_p's BatchNorm), 20 epochs, batch 128 (256 on
  ImageNet), PGD-10 (HYDRA's CIFAR configs use TRADES with β = 6; this pipeline has no TRADES loss,
  so the adversarial recipe is PGD-10 cross-entropy).

Every level 1 − (1 − rate)^k, k = 1..rounds, is one independent run from the same |θ_p|-based
score initialisation, as HYDRA prunes a pre-trained network to one target in one pruning phase; the
levels are therefore not nested. A checkpoint is written after every epoch; a rerun resumes the
level in progress and skips the finished ones.
"""

import copy

import torch

import pruning_utils
from attacks import training_attack
from masks.learned import SCORE_INITS, FilterScoredNetwork, ScoredNetwork, top_k_mask  # noqa: F401  (SCORE_INITS, top_k_mask: LMP's public names)
from training import setup
from training.engine import lr_for_epoch, make_sgd, set_lr, train_epoch
from training.loop import Policy, Progress, ResumableRun
from utils.checkpoint import safe_load
from utils.errors import UserError

DEFAULT_LR = 0.1  # of the order edge-popup/HYDRA use for scores; the stage-1 default 5e-4 is IMP's, for weights
DEFAULT_RECIPE = "frozen-global"

# flag dest -> value; "score_rank" and "train_bn" have no flag of their own. None: stage 1's default.
RECIPES = {
    "frozen-global": {"lr": DEFAULT_LR, "layerwise": False, "score_rank": "score", "train_bn": False,
                      "epochs_per_round": None, "batch_size": None, "attack_steps": None, "weight_decay": None},
    # inspire-group/hydra: models/layers.py ranks |scores| per layer, the README prunes for 20 epochs;
    # its configs (as issue 24 quotes them): SGD lr 0.1, momentum 0.9, wd 1e-4, cosine, batch 128
    # (ImageNet 256), TRADES with PGD-10 on CIFAR, here PGD-10 cross-entropy
    "hydra": {"lr": DEFAULT_LR, "momentum": 0.9, "weight_decay": 1e-4, "epochs_per_round": 20, "batch_size": 128,
              "attack_steps": 10, "layerwise": True, "score_rank": "abs", "train_bn": True},
}
HYDRA_IMAGENET_BATCH = 256
RECIPE_HELP = ("LMP preset (docs/companion.md): frozen-global (global top-k, BatchNorm frozen, IMP's batch and epochs) "
               "or hydra (HYDRA's: |s| top-k per layer, BatchNorm trained, 20 epochs, batch 128, PGD-10 with "
               "--retrain at, not TRADES); flags given explicitly win over the preset")


def record_recipe(config):
    """config.json records the frozen-global recipe (LMP's only one before presets) as unset, so
    LMP directories made before --lmp-recipe existed resume as they are."""
    for key, old in (("lmp_recipe", DEFAULT_RECIPE), ("score_rank", "score"), ("train_bn", False)):
        if config.get(key) == old:
            config[key] = None


def resolve_args(args, given=()):
    """LMP's recipe, defaults and refusals, applied by stage 1's parser (before any directory is
    claimed); ``given``: the dests of the flags given on the command line, which win over the recipe."""
    recipe = RECIPES[args.lmp_recipe]
    for key, value in recipe.items():
        if key in ("score_rank", "train_bn") or key in given or value is None:
            continue
        if key == "layerwise" and args.pattern != "unstructured":
            continue  # the channel pattern has its own per-layer rule (--layerwise is refused with it)
        if key == "attack_steps" and args.retrain != "at":
            continue  # no attack is crafted: the recipe's PGD steps would only clutter config.json
        if key == "batch_size" and args.lmp_recipe == "hydra" and args.dataset == "imagenet":
            value = HYDRA_IMAGENET_BATCH
        setattr(args, key, value)
    args.score_rank = recipe["score_rank"]
    if args.freeze_bn and not recipe["train_bn"]:
        raise UserError(f"--freeze-bn applies to --lmp-recipe hydra; --lmp-recipe {args.lmp_recipe} always keeps "
                        "BatchNorm frozen, so drop the flag.")
    args.train_bn = recipe["train_bn"] and not args.freeze_bn
    if args.attack_bn == "train":
        raise UserError("--attack-bn train would change BatchNorm statistics while attacks are crafted; drop the "
                        "flag (LMP crafts its attacks with BatchNorm in eval mode, as HYDRA's TRADES does).")
    args.attack_bn = "eval"


def _bn_keys(base):
    """The keys of BatchNorm's part of ``base``'s state (affine parameters and running statistics)."""
    bn = {name for name, m in base.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    return {k for k in base.state_dict() if k.rsplit(".", 1)[0] in bn}


def _bn_state(base):
    """BatchNorm's part of ``base``'s state, on the CPU."""
    keys = _bn_keys(base)
    return {k: v.detach().cpu() for k, v in base.state_dict().items() if k in keys}


def check_bn_keys(saved, base):
    """Refuse a checkpoint's BatchNorm state (``_bn_state`` of another run) whose keys are not exactly
    ``base``'s BatchNorm keys: it was written for another architecture."""
    wanted = _bn_keys(base)
    unexpected, missing = sorted(set(saved) - wanted), sorted(wanted - set(saved))
    if unexpected or missing:
        raise UserError(f"the checkpoint's trained BatchNorm does not fit this model (unexpected keys: "
                        f"{', '.join(unexpected[:3]) or 'none'}; missing keys: {', '.join(missing[:3]) or 'none'}); "
                        "it was written by another --arch. Rerun with --restart or another --save-dir.")


def level_keep_counts(model, names, rounds, rate, layerwise, pattern="unstructured"):
    """Kept counts of levels 1..rounds: the IMP/OMP counts (per-round rounding), so an LMP
    ticket has exactly the sparsity of the IMP/OMP ticket of the same round. ``pattern``
    "channel": kept filters of each block-internal conv (at least one), per layer."""
    params = dict(model.named_parameters())
    if pattern == "channel":
        from masks.channel import require_channel_groups

        filters = {g.conv: params[g.conv].shape[0] for g in require_channel_groups({n: params[n] for n in names})}
        return [{n: max(1, f - pruning_utils.imp_pruned_count(f, k, rate)) for n, f in filters.items()}
                for k in range(1, rounds + 1)]
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
        self.keeps = level_keep_counts(model, self.names, args.rounds, args.rate, args.layerwise, args.pattern)
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
        # trained BatchNorm starts every level from θ_p's, which self.model keeps unchanged
        base = copy.deepcopy(self.model) if args.train_bn else self.model
        network = FilterScoredNetwork if args.pattern == "channel" else ScoredNetwork
        self.net = network(base, self.names, self.keeps[level - 1], args.score_init, rank=args.score_rank,
                                 train_bn=args.train_bn)
        self.optimizer = make_sgd(self.net.trainable(), args.lr, args.momentum, args.weight_decay,
                                  self.dist_info.device)
        state, self.resumed_state = self.resumed_state, None
        if state is not None and state.get("scores") is not None:
            with torch.no_grad():
                for s, saved in zip(self.net.scores, state["scores"]):
                    s.copy_(saved.to(s.device))
            if state.get("base_bn") is not None:
                # only BatchNorm's tensors were saved, so every other key is missing by design (strict=False)
                check_bn_keys(state["base_bn"], base)
                base.load_state_dict(state["base_bn"], strict=False)
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
                           channels_last=args.channels_last, progress=args.progress, train_mode=args.train_bn,
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
                "base_bn": None if self.net is None or not self.args.train_bn else _bn_state(self.net.base),
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
