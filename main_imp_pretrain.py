"""Stage 1: find tickets in pre-trained weights θ_p by IMP, OMP, random pruning or LMP.

IMP round k: prune ``--rate`` of the remaining prunable weights by global magnitude of the
current weights (round 1: of θ_p), save the ticket, rewind every weight and BatchNorm buffer to
θ_p (``--rewind none``: keep the re-trained ones; ``epoch_K``: rewind to the weights after epoch K of
round 1's re-training), then re-train ``--epochs-per-round`` epochs with the mask enforced (standard
or PGD adversarial). The last round needs no re-training: its weights would only choose a next mask.
OMP and RP give tickets at the same sparsity levels straight from θ_p, without training. LMP learns
each level's mask over θ_p's frozen weights (training/lmp.py).

Rerunning the same command resumes from the last per-epoch checkpoint and skips finished rounds.
"""

import os
import time
from pathlib import Path
from typing import NamedTuple

import torch

import attacks
import pruning_utils
from masks.ticket import parse_rewind, rewind_epoch
from training import lmp, setup, tensorboard
from training.engine import MAX_LOSS_FACTOR, MAX_LOSS_PATIENCE, LossGuard, make_sgd, set_lr, train_epoch
from training.loop import Policy, Progress, ResumableRun
from utils import distributed as du
from utils.checkpoint import atomic_write_json, file_sha256
from utils.cli import ArgumentParser, flag_applies_in, given_flags, refuse_flags_without_effect, run_main
from utils.errors import UserError
from utils.preemption import StopRequest
from utils.records import read_config, read_sparsity
from utils.rundir import write_csv
from utils.seeding import seed_everything

PAPER_DEFAULTS = {"lr": 5e-4, "weight_decay": 1e-4, "batch_size": 2048}
LOG_FIELDS = ["round", "epoch", "lr", "train_loss", "train_acc", "sparsity", "seconds"]


def build_parser():
    # the name is fixed, not taken from sys.argv: the sweep parses a grid's command lines in its own process
    p = ArgumentParser(prog=Path(__file__).name, description=__doc__)
    setup.add_common_args(p, ("imagenet", "folder", "cifar10", "cifar100", "svhn", "digits"), defaults={
        "lr": f"{PAPER_DEFAULTS['lr']:g}, the paper's IMP; {lmp.DEFAULT_LR:g} for --method lmp",
        "weight_decay": f"{PAPER_DEFAULTS['weight_decay']:g}", "batch_size": str(PAPER_DEFAULTS["batch_size"]),
        "alpha": "eps/4", "attack_bn": "train; LMP always crafts its attacks in eval mode",
        "pretrain": "'unknown', which analysis/plot_curves.py pairs with no dense baseline"})
    p.add_argument("--method", choices=["imp", "omp", "rp", "lmp"], default="imp",
                   help="imp, omp (one-shot magnitude), rp (random) or lmp (learned masks over frozen θ_p, docs/stage1.md §2)")
    p.add_argument("--retrain", choices=["st", "at"], default="st",
                   help="IMP re-training / LMP score training: standard or PGD adversarial")
    p.add_argument("--rewind", type=parse_rewind, default="theta_p",
                   help="IMP: after pruning a round, rewind weights and BatchNorm buffers to θ_p (the paper), to "
                        "epoch K of the first re-training round (epoch_K) or continue from the re-trained weights (none)")
    p.add_argument("--score-init", "--score_init", choices=list(lmp.SCORE_INITS), default="scaled",
                   help="LMP scores from θ_p: scaled (HYDRA: |w| / max|w| * sqrt(6 / fan_in) per layer) or "
                        "magnitude (|w|; untrained scores give OMP's mask)")
    p.add_argument("--lmp-recipe", choices=list(lmp.RECIPES), default=lmp.DEFAULT_RECIPE, help=lmp.RECIPE_HELP)
    p.add_argument("--freeze-bn", action="store_true", default=None, help="--lmp-recipe hydra: keep BatchNorm frozen")
    p.add_argument("--rate", type=float, default=0.2, help="fraction of the remaining weights pruned per round")
    p.add_argument("--rounds", "--pruning_times", type=int, default=19, help="sparsity levels (IMP rounds)")
    p.add_argument("--epochs-per-round", "--epochs_per_round", "--prune-epoch", "--prune_epoch",
                   dest="epochs_per_round", type=int, default=30,
                   help="IMP re-training epochs between rounds; LMP score-training epochs per level")
    p.add_argument("--attack-steps", "--attack_steps", type=int, default=3, help="PGD steps of adversarial re-training")
    p.add_argument("--exclude-stem", action="store_true", help="never prune the first convolution")
    p.add_argument("--layerwise", action="store_true",
                   help="prune each conv by the rate instead of globally: its weights (unstructured), or its filters "
                        "(channel, imp/omp: one architecture's models then share their sparsity levels)")
    p.add_argument("--pattern", choices=list(pruning_utils.PATTERNS), default="unstructured",
                   help="unstructured (single weights), channel (whole filters of block-internal convs, --rate of "
                        "the remaining filters per round) or nm (N:M groups along each filter's inputs, one level: "
                        "needs --rounds 1)")
    p.add_argument("--nm", type=pruning_utils.parse_nm, default=None,
                   help="N:M of --pattern nm: keep N of every M weights (default 2:4, NVIDIA's sparse tensor cores)")
    p.add_argument("--checkpoint-minutes", "--checkpoint_minutes", type=float, default=30.0,
                   help="also checkpoint inside an epoch every this many minutes (0 = only at epoch ends); "
                        "SIGTERM/SIGUSR1 always checkpoint at the next step and exit with status 75")
    p.add_argument("--max-loss", "--max_loss", type=float, default=None,
                   help=f"stop as diverged when the re-training loss stays above this for {MAX_LOSS_PATIENCE} steps "
                        f"(default {MAX_LOSS_FACTOR} x ln(classes), the loss of a uniform prediction)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the per-epoch curves as TensorBoard event files in SAVE_DIR/tb "
                        "(needs `pip install tensorboard`; watch with tensorboard --logdir <dir above the runs>)")
    p.set_defaults(attack_bn=None)  # resolved in parse_args: LMP keeps θ_p's BatchNorm frozen, so its default differs
    return p


def _trains(c):
    """IMP re-trains between rounds (never after the last one); LMP trains the scores of every level."""
    return (c["method"] == "lmp" or (c["method"] == "imp" and c["rounds"] > 1)) and c["epochs_per_round"] > 0


def _attacks(c):
    return _trains(c) and c["retrain"] == "at"


WHEN_TRAINING = "--method imp with --rounds 2 or more, or --method lmp; --epochs-per-round 1 or more"
TRAINS = f"applies only when stage 1 trains ({WHEN_TRAINING})"
ATTACKS = f"applies only to --retrain at when stage 1 trains ({WHEN_TRAINING})"
# Flags that act on some runs only: dest -> (applies(context), where it applies), the context being
# the run's values of FLAG_CONTEXT; every other flag acts on every run. parse_args refuses a flag
# given without effect; flag_applies answers the same question for a grid's [flags].
FLAG_CONTEXT = ("method", "retrain", "rounds", "epochs_per_round", "pattern", "init", "reinit_stem", "dataset")
FLAG_SCOPE = {
    **{dest: (_trains, TRAINS) for dest in (
        "retrain", "lr", "momentum", "weight_decay", "batch_size", "max_loss", "checkpoint_minutes", "amp",
        "compile", "channels_last", "cudnn_benchmark", "progress", "augment", "image_size", "tensorboard")},
    **{dest: (_attacks, ATTACKS) for dest in ("eps", "alpha", "attack_steps")},
    "attack_bn": (lambda c: _attacks(c) and c["method"] == "imp",
                  "applies only to --method imp with --retrain at (LMP crafts its attacks in eval mode)"),
    "epochs_per_round": (lambda c: c["method"] == "lmp" or (c["method"] == "imp" and c["rounds"] > 1),
                         "applies only to --method lmp and to imp with --rounds 2 or more (the last round "
                         "is not re-trained)"),
    "data": (lambda c: c["method"] in ("imp", "lmp") and c["dataset"] != "digits",
             "applies only to --method imp and lmp (OMP and RP read no images), and not to --dataset digits"),
    "workers": (lambda c: c["method"] in ("imp", "lmp") and c["dataset"] in (None, "imagenet", "folder"),
                "applies only to --method imp and lmp on --dataset imagenet or folder"),
    "folder_loader": (lambda c: c["method"] in ("imp", "lmp") and c["dataset"] in ("imagenet", "folder"),
                      "applies only to --method imp and lmp on --dataset imagenet or folder"),
    "rewind": (lambda c: c["method"] == "imp" and _trains(c),
               "applies only to --method imp when it re-trains (--rounds 2 or more, --epochs-per-round 1 or more)"),
    "score_init": (lambda c: c["method"] == "lmp", "applies only to --method lmp"),
    "lmp_recipe": (lambda c: c["method"] == "lmp", "applies only to --method lmp"),
    "freeze_bn": (lambda c: c["method"] == "lmp", "applies only to --method lmp with --lmp-recipe hydra"),
    "rate": (lambda c: c["pattern"] != "nm", "applies to every --pattern but nm (N:M is one level)"),
    "nm": (lambda c: c["pattern"] == "nm", "applies only to --pattern nm"),
    "layerwise": (lambda c: c["method"] != "rp" and (c["pattern"] == "unstructured"
                                                    or (c["pattern"] == "channel" and c["method"] != "lmp")),
                  "applies only to --method imp, omp or lmp with --pattern unstructured and to imp or omp with "
                  "--pattern channel"),
    "seed": (lambda c: c["method"] == "rp" or _trains(c) or str(c["init"]).lower() == "none" or c["reinit_stem"],
             f"applies only to --method rp, to random weights (--init none, --reinit-stem) and when stage 1 "
             f"trains ({WHEN_TRAINING}): masks by magnitude of θ_p are deterministic"),
    "reinit_stem": (lambda c: c["method"] != "rp" and str(c["init"]).lower() != "none",
                    "applies only with θ_p from --init, to --method imp, omp and lmp (RP's masks ignore weights)"),
}


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    setup.check_common_args(args)
    if args.method == "lmp":
        lmp.resolve_args(args, given_flags(p, argv))
    else:
        args.lmp_recipe = None
        if args.attack_bn is None:
            args.attack_bn = "train"
    if args.rewind != "theta_p" and args.method != "imp":
        raise UserError(f"--rewind {args.rewind} applies to IMP only (--method {args.method} never re-trains "
                        "weights); drop the flag or use --method imp.")
    if (rewind_epoch(args.rewind) or 0) > (args.epochs_per_round if args.rounds > 1 else 0):
        raise UserError(f"--rewind {args.rewind} rewinds to an epoch of the first re-training round, which needs "
                        "--rounds 2 or more and at least that many --epochs-per-round.")
    if args.method != "lmp":
        if args.score_init != "scaled":
            raise UserError(f"--score-init applies to --method lmp only, not {args.method}; drop the flag.")
        args.score_init = None
    for key, value in PAPER_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.alpha = attacks.resolve_sizes(args.retrain, args.eps, args.alpha)[0]
    if not 0 < args.rate < 1:
        raise UserError(f"--rate must lie strictly between 0 and 1 (the paper prunes 0.2 per round), not {args.rate}.")
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, not {args.rounds}.")
    if args.method in ("imp", "lmp") and args.epochs_per_round < 0:
        raise UserError(f"--epochs-per-round must be 0 or more, not {args.epochs_per_round}.")
    if args.attack_steps < 1:
        raise UserError(f"--attack-steps must be at least 1, not {args.attack_steps}.")
    if not args.checkpoint_minutes >= 0:
        raise UserError(f"--checkpoint-minutes must be 0 or more, not {args.checkpoint_minutes}.")
    if args.max_loss is not None and not args.max_loss > 0:
        raise UserError(f"--max-loss must be a positive number, not {args.max_loss}.")
    if args.method not in ("imp", "lmp"):
        args.retrain = None
    check_pattern_args(args)
    refuse_flags_without_effect(p, argv, FLAG_SCOPE, {k: getattr(args, k) for k in FLAG_CONTEXT})
    tensorboard.require(args.tensorboard)
    return args


def flag_applies(dest, **context):
    """Whether flag ``dest`` (e.g. "eps" or "--no-progress") acts on a run described by ``context``
    (FLAG_CONTEXT's keys, e.g. method="omp"), and where it applies: (bool, text)."""
    return flag_applies_in(build_parser, FLAG_SCOPE, FLAG_CONTEXT, dest, context)


def check_pattern_args(args):
    if args.nm is not None and args.pattern != "nm":
        raise UserError(f"--nm applies to --pattern nm only, not {args.pattern}; drop --nm or pass --pattern nm.")
    if args.pattern == "unstructured":
        return
    if args.method == "lmp" and args.pattern != "channel":
        raise UserError(f"--method lmp learns unstructured or channel (filter-wise) masks, not {args.pattern}; "
                        "pass --pattern unstructured or channel.")
    if args.layerwise and args.pattern == "nm":
        raise UserError("--layerwise applies to --pattern unstructured and channel; N:M already keeps N of every M "
                        "weights in every layer, so drop --layerwise.")
    if args.layerwise and args.method == "lmp":
        raise UserError("--method lmp --pattern channel always keeps the same share of each conv's filters (what "
                        "--layerwise asks of IMP and OMP), so drop --layerwise.")
    if args.pattern == "nm":
        if args.nm is None:
            args.nm = [2, 4]
        # N:M is one level (2:4 = 50%): a second round would give the same mask again
        if args.rounds != 1:
            raise UserError(f"--pattern nm gives one sparsity level ({args.nm[0]}:{args.nm[1]}), so it needs "
                            f"--rounds 1, not {args.rounds}.")


def broadcast_mask(mask, k=None):
    """Rank 0's mask on every rank, so ranks can never train different subnetworks.

    Each rank computes its mask from the same (DDP-synchronised) weights, so they should agree
    already; the check makes a disagreement visible instead of silently papering over it.
    """
    if not du.is_distributed():
        return mask
    flat = torch.cat([mask[n].reshape(-1) for n in sorted(mask)]).to(torch.uint8)
    agree = du.all_equal(flat)
    setup.log(f"round {k}: masks computed on {du.get_world_size()} ranks are "
              f"{'identical' if agree else 'DIFFERENT; using rank 0' + chr(39) + 's'}")
    out = {}
    for name in sorted(mask):
        t = mask[name].to(torch.uint8).contiguous()
        torch.distributed.broadcast(t, src=0)
        out[name] = t.bool()
    return out


class TicketWriter:
    """Writes tickets/round_XX.pt and sparsity.json (primary rank only)."""

    def __init__(self, save_dir, args, primary):
        self.dir = Path(save_dir) / "tickets"
        self.sparsity_path = Path(save_dir) / "sparsity.json"
        self.args = args
        self.primary = primary

    def path(self, k):
        return self.dir / f"round_{k:02d}.pt"

    def levels(self):
        """sparsity.json as {round: sparsity}; {} before the first ticket. A damaged file is one line."""
        return read_sparsity(self.sparsity_path) if os.path.lexists(self.sparsity_path) else {}

    def write(self, k, mask, keep_existing=False):
        """``keep_existing``: the ticket file on disk is left as it is (a rerun of OMP / RP that found it
        to hold this very ticket). Returns the ticket."""
        ticket = pruning_utils.make_ticket(
            {n: m.cpu() for n, m in mask.items()}, round=k, method=self.args.method, retrain=self.args.retrain,
            arch=self.args.arch, pretrain=self.args.pretrain or "unknown", init=str(self.args.init),
            source_dataset=self.args.dataset, rewind=self.args.rewind, pattern=self.args.pattern,
            nm=self.args.nm)
        if self.primary:
            if not (keep_existing and self.path(k).exists()):
                pruning_utils.save_ticket(self.path(k), ticket)
            levels = self.levels()
            levels[k] = round(float(ticket["sparsity"]), 2)
            atomic_write_json({str(r): v for r, v in sorted(levels.items())}, self.sparsity_path)
        return ticket


def next_mask(args, weights, mask, generator):
    if args.pattern == "channel":
        if args.method == "rp":
            return pruning_utils.random_channel_prune(mask, args.rate, generator)
        if args.layerwise:
            return pruning_utils.layerwise_channel_prune(weights, mask, args.rate)
        return pruning_utils.channel_prune(weights, mask, args.rate)
    if args.pattern == "nm":
        n, m = args.nm
        dense = pruning_utils.nm_dense_layers(mask, m)
        if dense:
            setup.log(f"note: {len(dense)} layer(s) have an input size that is not a multiple of {m} and stay dense "
                      f"under {n}:{m}: {', '.join(dense)}")
        if args.method == "rp":
            return pruning_utils.random_nm_prune(mask, n, m, generator)
        return pruning_utils.nm_prune(weights, mask, n, m)
    if args.method == "rp":
        return pruning_utils.random_prune(mask, args.rate, generator)
    if args.layerwise:
        return pruning_utils.layerwise_magnitude_prune(weights, mask, args.rate)
    return pruning_utils.global_magnitude_prune(weights, mask, args.rate)


def prune_without_training(args, model, writer, log_path):
    """OMP / RP: every level from θ_p itself, nested masks, the same counts as IMP's rounds.

    Levels take milliseconds, so there is no checkpoint: a rerun recomputes the masks (they are
    deterministic), keeps each ticket file already written that holds the recomputed ticket and
    writes again any other (missing, damaged, or not this run's)."""
    weights = {n: p.detach() for n, p in model.named_parameters()}
    mask = pruning_utils.full_mask(model, include_stem=not args.exclude_stem, device=next(model.parameters()).device)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for k in range(1, args.rounds + 1):
        start = time.perf_counter()
        mask = broadcast_mask(next_mask(args, weights, mask, generator), k)
        existed = writer.primary and writer.path(k).exists()
        problem = ticket_problem(writer.path(k), k, args.method, args.pattern, mask=mask) if existed else None
        ticket = writer.write(k, mask, keep_existing=existed and problem is None)
        rows.append({"round": k, "epoch": 0, "sparsity": round(float(ticket["sparsity"]), 2),
                     "seconds": round(time.perf_counter() - start, 4)})
        note = "" if not existed else f" (recomputed: {problem})" if problem else " (kept the ticket already written)"
        setup.log(f"{args.method} round {k}/{args.rounds}: sparsity {ticket['sparsity']:.2f}%{note}")
    if writer.primary:
        write_csv(rows, log_path, LOG_FIELDS)


def ticket_problem(path, k, method, pattern, listed=None, mask=None):
    """Why the ticket file ``path`` is not round ``k``'s ticket of this run, or None: it does not load or
    validate, records another round, method or pattern, has another sparsity than the ``listed`` one
    (sparsity.json's), or (``mask`` given) holds another mask than the recomputed one."""
    try:
        ticket = pruning_utils.load_ticket(path)
    except UserError as exc:
        return f"ticket '{path}' is damaged ({exc})"
    claims = {"round": k, "method": method, "pattern": pattern}
    wrong = [f"{key} {ticket.get(key)!r}" for key, want in claims.items() if ticket.get(key) != want]
    if wrong:
        return f"ticket '{path}' records {', '.join(wrong)}, not round {k} of this --method {method} run"
    if listed is not None and round(float(ticket["sparsity"]), 2) != listed:
        return f"ticket '{path}' has {ticket['sparsity']:.2f}% sparsity, but sparsity.json lists {listed:.2f}%"
    if mask is not None and (set(ticket["masks"]) != set(mask) or
                             any(not torch.equal(ticket["masks"][n], mask[n].cpu()) for n in mask)):
        return f"ticket '{path}' holds another mask than the recomputed one"
    return None


class Survey(NamedTuple):
    """What a stage-1 run directory holds (:func:`survey_tickets`)."""
    # every round's ticket exists, is that round's ticket of the run and is listed in sparsity.json;
    # None: the directory holds no stage-1 run to judge
    finished: bool
    problem: str = None  # why the run cannot go on as it is: sparsity.json unreadable, a listed ticket bad
    gap: str = None  # why an unfinished run without a problem is not finished yet
    tickets_only: bool = True  # the problem lies in ticket files (which OMP and RP recompute)


def survey_tickets(writer, save_dir):
    """The :class:`Survey` of the stage-1 run in ``save_dir``, judged by its own config.json (not by the
    command, which may differ). IMP and LMP cannot recompute an earlier round, so they report a problem."""
    path = save_dir / "config.json"
    if not path.exists():
        return Survey(None, gap="nothing was written yet")
    try:
        config = read_config(path)
    except UserError as exc:
        return Survey(None, problem=str(exc), tickets_only=False)
    rounds, method, pattern = config.get("rounds"), config.get("method"), config.get("pattern") or "unstructured"
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        return Survey(None, gap=f"'{path}' is no stage-1 configuration")
    try:
        levels = writer.levels()
    except UserError as exc:
        return Survey(False, problem=str(exc), tickets_only=False)
    gap = None
    for k in range(1, max([rounds, *levels]) + 1):
        ticket_path = writer.path(k)
        if not ticket_path.is_file():
            if k in levels:
                return Survey(False, f"'{ticket_path}' is listed in sparsity.json but missing; an earlier round "
                                     "cannot be recomputed, so restore the file or rerun with --restart to find every "
                                     f"ticket again in '{save_dir}'.")
            gap = gap or f"round {k}'s ticket is not written yet"
            continue
        problem = ticket_problem(ticket_path, k, method, pattern, levels.get(k))
        if problem:
            return Survey(False, f"{problem}; restore it or rerun with --restart.")
        if k not in levels:
            gap = gap or f"ticket '{ticket_path}' is not listed in sparsity.json"
    return Survey(gap is None, gap=gap)


def check_finite_weights(model, where):
    """Pruning by magnitude over NaN weights gives a meaningless mask: refuse to write such a ticket."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p.detach()).all():
            raise UserError(f"parameter '{name}' holds non-finite values {where}; no ticket was written for this round.")


def diverged_text(ckpt_path, k, done_epochs):
    if ckpt_path.exists():
        kept = (f"the checkpoint of round {k} after {done_epochs} epochs is kept in '{ckpt_path}' and no ticket of a "
                "later round was written")
    else:
        kept = "no checkpoint was written"
    return (f"{kept}. Lower --lr and rerun with --restart (which discards that checkpoint and the config, then "
            "starts again) or choose another --save-dir.")


def run_config(args):
    """The configuration recorded in (and checked against) config.json, with θ_p's digest."""
    config = dict(vars(args))
    if config["rewind"] == "theta_p":
        # stored as unset, which config_differences equates with the key's absence: directories made
        # before --rewind existed (all rewinding to θ_p) resume, and a change of variant is refused
        config["rewind"] = None
    if str(args.init).lower() != "none" and not Path(str(args.init)).is_file():
        raise UserError(f"--init '{args.init}' does not exist; pass the pre-trained checkpoint θ_p to prune.")
    lmp.record_recipe(config)
    config["init_sha256"] = "none" if str(args.init).lower() == "none" else file_sha256(args.init, "--init")
    return config


def check_head(args, data, init_info):
    if init_info.get("dropped_head"):  # setup.build_model has said so (the head is never pruned)
        if args.method == "lmp":
            raise UserError(f"LMP keeps θ_p frozen, head included, but θ_p's head does not fit the "
                            f"{data.num_classes} classes of --dataset {args.dataset}; pass a θ_p trained on "
                            "that label set (or --init none).")


class Retraining(Policy):
    """IMP in the resumable loop. Unit k holds round k's ticket: it re-trains it ``--epochs-per-round``
    epochs with the mask enforced and ends by pruning round k+1 from the re-trained weights, saving
    that ticket and rewinding. Unit 0 is θ_p itself, with nothing to train; the last round is never
    re-trained, since its weights would only choose a next mask."""

    log_fields = LOG_FIELDS
    checkpoint_keys = ("round", "epoch", "log", "mask", "model", "optimizer", "rng")

    def __init__(self, args, model, data, writer, *, save_dir, dist_info, precision, config):
        self.args, self.model, self.data, self.writer = args, model, data, writer
        self.save_dir, self.dist_info, self.precision, self.config = save_dir, dist_info, precision, config
        self.theta_p = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.runner, self.plain = setup.wrap_model(model, args, dist_info)
        self.attack = attacks.training_attack("at" if args.retrain == "at" else "st", args.eps, args.alpha,
                                              args.attack_steps, args.attack_bn)
        self.scaler = precision.make_scaler()
        self.mask = pruning_utils.full_mask(model, include_stem=not args.exclude_stem, device=dist_info.device)
        self.optimizer = self.enforcer = None
        self.rewind_point = None  # --rewind epoch_K: the weights after epoch K of round 1's re-training

    def _new_optimizer(self):
        args = self.args
        return make_sgd(self.model.parameters(), args.lr, args.momentum, args.weight_decay, self.dist_info.device)

    def restore(self, ckpt):
        self.mask = {n: m.to(self.dist_info.device) for n, m in ckpt["mask"].items()}
        self.model.load_state_dict(ckpt["model"])
        self.rewind_point = ckpt.get("rewind_point")
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        return Progress(ckpt["round"], ckpt["epoch"], ckpt["log"], ckpt.get("partial"))

    def resumed(self, progress):
        where = "" if progress.partial is None else f", step {progress.partial['step']} of the next"
        setup.log(f"resuming {self.save_dir}: round {progress.unit}, {progress.epoch}/{self.args.epochs_per_round} "
                  f"epochs done{where}")

    def has_unit(self, k):
        return k < self.args.rounds

    def epochs(self, k):
        return self.args.epochs_per_round if k else 0

    def enter_unit(self, progress):
        self.enforcer = pruning_utils.MaskEnforcer(self.model, self.mask, pattern=self.args.pattern)
        self.sparsity = pruning_utils.sparsity(self.mask)

    def train(self, progress, *, start_step, carry, step_hook, loss_guard):
        args, k, epoch = self.args, progress.unit, progress.epoch
        set_lr(self.optimizer, args.lr)
        self.data.train.set_epoch((k - 1) * args.epochs_per_round + epoch, start_batch=start_step)
        return train_epoch(self.runner, self.data.train, self.optimizer, device=self.dist_info.device,
                           attack=self.attack, attack_model=self.plain, enforcer=self.enforcer,
                           precision=self.precision, scaler=self.scaler, channels_last=args.channels_last,
                           progress=args.progress, desc=f"round {k}/{args.rounds} epoch {epoch + 1}/{args.epochs_per_round}",
                           loss_guard=loss_guard, start_step=start_step, carry=carry, step_hook=step_hook)

    def after_epoch(self, progress, stats):
        if progress.unit == 1 and progress.epoch + 1 == rewind_epoch(self.args.rewind):
            self.rewind_point = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return {"round": progress.unit, "epoch": progress.epoch, "lr": self.args.lr,
                "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                "sparsity": round(self.sparsity, 2), "seconds": round(stats["seconds"], 3)}

    def report(self, progress, row):
        if progress.epoch < self.args.epochs_per_round:
            return
        rows = [r for r in progress.log if r["round"] == progress.unit]
        setup.log(f"round {progress.unit}/{self.args.rounds} re-trained at {self.sparsity:.2f}%: loss "
                  f"{rows[-1]['train_loss']:.4f} acc {rows[-1]['train_acc']:.2f} in "
                  f"{sum(r['seconds'] for r in rows) / 60:.1f} min")

    def end_unit(self, progress):
        """Prune the current (re-trained) weights, save the ticket, rewind to θ_p (or, with --rewind
        none, keep the re-trained weights and BatchNorm buffers, the newly pruned ones zeroed)."""
        args, k = self.args, progress.unit
        check_finite_weights(self.model, f"after round {k}'s re-training" if k else "in θ_p")
        weights = {n: p.detach() for n, p in self.model.named_parameters()}
        self.mask = broadcast_mask(next_mask(args, weights, self.mask, None), k + 1)
        ticket = self.writer.write(k + 1, self.mask)
        if args.rewind == "theta_p":
            self.model.load_state_dict(self.theta_p)
        elif self.rewind_point is not None:  # epoch_K, from round 1 on (round 0's weights are θ_p itself)
            self.model.load_state_dict(self.rewind_point)
        pruning_utils.apply_mask(self.model, self.mask, pattern=args.pattern)
        self.optimizer = self._new_optimizer()
        setup.log(f"round {k + 1}/{args.rounds}: ticket at {ticket['sparsity']:.2f}% sparsity -> "
                  f"{self.writer.path(k + 1)}")
        return True

    def checkpoint(self, progress):
        return {"round": progress.unit, "epoch": progress.epoch, "log": progress.log,
                "model": self.model.state_dict(), "mask": {n: m.cpu() for n, m in self.mask.items()},
                "optimizer": self.optimizer.state_dict(), "rewind_point": self.rewind_point,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "init": str(self.args.init), "partial": progress.partial, "init_sha256": self.config["init_sha256"]}

    def where(self, progress):
        return f"round {progress.unit}, epoch {progress.epoch + 1},"

    def diverged(self, exc, progress):
        return (f"{exc} in round {progress.unit}, epoch {progress.epoch + 1}; "
                f"{diverged_text(self.save_dir / 'checkpoint.pt', progress.unit, progress.epoch)}")


def main(argv=None):
    return setup.run_stoppable(run, parse_args(argv), StopRequest())


def run(args, stop):
    if not args.pretrain:
        setup.log("warning: --pretrain is not set, so every ticket is labelled 'unknown' and analysis/plot_curves.py "
                  "cannot pair it with a dense baseline; pass --pretrain std|fat|at (the label of θ_p).")
    dist_info = du.init_distributed(args.device)
    save_dir = Path(args.save_dir)
    precision = setup.resolve_precision(args, dist_info.device)
    seed_everything(args.seed)  # the same on every rank: masks and head initialisation agree
    config = run_config(args)
    setup.claim_dir(save_dir, dist_info)  # finished, resumed or new is decided under the lock
    writer = TicketWriter(save_dir, args, dist_info.primary)
    survey = survey_tickets(writer, save_dir)
    if survey.finished:
        return report_finished(writer, save_dir, config, dist_info)
    recomputed = args.method in ("omp", "rp") and survey.tickets_only  # their tickets are deterministic
    problem = None if recomputed else survey.problem
    # data and θ_p are checked before config.json is written, so a mistake in either leaves none
    # behind to refuse the corrected command
    data = setup.data_stub(args) if args.method not in ("imp", "lmp") else setup.build_data(
        args, dist_info, batch_size=args.batch_size, val_size=0)
    model, init_info = setup.build_model(args, data, dist_info.device, load_head="auto")
    check_head(args, data, init_info)
    # an unfinished directory (a damaged ticket included) is one --restart may discard
    setup.prepare_dir(save_dir, config, dist_info, finished=survey.finished)
    if problem and not args.restart:
        raise UserError(problem)

    if args.method in ("omp", "rp"):
        prune_without_training(args, model, writer, save_dir / "log.csv")
        du.barrier()
        check_complete(writer, save_dir, dist_info)
        setup.log(f"done: {args.rounds} tickets in {writer.dir}")
        du.cleanup()
        return 0
    loss_guard = LossGuard.for_classes(args.max_loss, data.num_classes)
    if args.method == "lmp":
        lmp.run(args, model, data, writer, save_dir=save_dir, dist_info=dist_info, precision=precision, config=config,
                log_fields=LOG_FIELDS, broadcast_mask=broadcast_mask, stop=stop, loss_guard=loss_guard)
    else:
        policy = Retraining(args, model, data, writer, save_dir=save_dir, dist_info=dist_info, precision=precision,
                            config=config)
        ResumableRun(policy, save_dir=save_dir, dist_info=dist_info, stop=stop,
                     checkpoint_minutes=args.checkpoint_minutes, loss_guard=loss_guard, tensorboard=args.tensorboard).run()
    check_complete(writer, save_dir, dist_info)
    setup.log(f"done: {args.rounds} {args.method.upper()} tickets in {writer.dir} (sparsity.json lists the levels)")
    du.cleanup()
    return 0


def report_finished(writer, save_dir, config, dist_info):
    """A rerun of a finished run: the directory is checked against the command (a different one, or
    --restart, is refused) and left untouched."""
    setup.prepare_dir(save_dir, config, dist_info, finished=True)
    levels = writer.levels()
    setup.log(f"already finished: {save_dir}: {len(levels)} {config['method'].upper()} tickets, sparsity "
              f"{levels[min(levels)]:.2f}% to {levels[max(levels)]:.2f}% in {writer.dir}")
    du.cleanup()
    return 0


def check_complete(writer, save_dir, dist_info):
    """'done' only when the directory holds every round's ticket, as sparsity.json lists them."""
    survey = survey_tickets(writer, save_dir) if dist_info.primary else Survey(True)
    if not survey.finished:
        raise UserError(survey.problem or f"the run ended but {survey.gap}; rerun with --restart to find every "
                        "ticket again.")


if __name__ == "__main__":
    run_main(main)
