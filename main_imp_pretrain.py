"""Stage 1: find tickets in pre-trained weights θ_p by IMP, OMP or random pruning.

IMP round k: prune ``--rate`` of the remaining prunable weights by global magnitude of the
current weights (round 1: of θ_p), save the ticket, rewind every weight and BatchNorm buffer to
θ_p, then re-train ``--epochs-per-round`` epochs with the mask enforced (standard or PGD
adversarial). The last round needs no re-training: its weights would only choose a next mask.
OMP and RP give tickets at the same sparsity levels straight from θ_p, without training.

Rerunning the same command resumes from the last per-epoch checkpoint and skips finished rounds.
"""

import hashlib
import json
import time
from pathlib import Path

import torch

import pruning_utils
from utils import distributed as du
from utils import setup
from utils.checkpoint import atomic_save, atomic_write_json, safe_load
from utils.cli import ArgumentParser, run_main
from utils.engine import NonFiniteLoss, make_sgd, set_lr, train_epoch, training_attack
from utils.errors import UserError
from utils.rundir import write_csv
from utils.seeding import gather_rng_states, restore_rank_rng_state, seed_everything

PAPER_DEFAULTS = {"lr": 5e-4, "weight_decay": 1e-4, "batch_size": 2048}
LOG_FIELDS = ["round", "epoch", "lr", "train_loss", "train_acc", "sparsity", "seconds"]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    setup.add_common_args(p, ("imagenet", "folder", "cifar10", "cifar100", "svhn", "digits"))
    p.add_argument("--method", choices=["imp", "omp", "rp"], default="imp")
    p.add_argument("--retrain", choices=["st", "at"], default="st", help="IMP re-training: standard or PGD adversarial")
    p.add_argument("--rate", type=float, default=0.2, help="fraction of the remaining weights pruned per round")
    p.add_argument("--rounds", "--pruning_times", type=int, default=19)
    p.add_argument("--epochs-per-round", "--epochs_per_round", "--prune-epoch", "--prune_epoch",
                   dest="epochs_per_round", type=int, default=30)
    p.add_argument("--attack-steps", "--attack_steps", type=int, default=3, help="PGD steps of adversarial re-training")
    p.add_argument("--exclude-stem", action="store_true", help="never prune the first convolution")
    p.add_argument("--layerwise", action="store_true", help="prune each layer by the rate instead of globally")
    args = p.parse_args(argv)
    setup.check_common_args(args)
    for key, value in PAPER_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.alpha is None:  # the paper's 2/255 at ε = 8/255
        args.alpha = args.eps / 4
    if not 0 < args.rate < 1:
        raise UserError(f"--rate must lie strictly between 0 and 1 (the paper prunes 0.2 per round), not {args.rate}.")
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, not {args.rounds}.")
    if args.method == "imp" and args.epochs_per_round < 0:
        raise UserError(f"--epochs-per-round must be 0 or more, not {args.epochs_per_round}.")
    if args.attack_steps < 1:
        raise UserError(f"--attack-steps must be at least 1, not {args.attack_steps}.")
    if args.method != "imp":
        args.retrain = None
    return args


def fingerprint(path):
    """A digest of θ_p's file, so a resumed run can prove it rewinds to the same weights."""
    if str(path).lower() == "none":
        return "none"
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise UserError(f"--init '{path}' cannot be read ({exc.strerror}); check the path and its permissions.") from None
    return h.hexdigest()


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

    def write(self, k, mask, keep_existing=False):
        """``keep_existing``: a ticket file already on disk is left as it is (a rerun of OMP / RP)."""
        ticket = pruning_utils.make_ticket(
            {n: m.cpu() for n, m in mask.items()}, round=k, method=self.args.method, retrain=self.args.retrain,
            arch=self.args.arch, pretrain=self.args.pretrain or "unknown", init=str(self.args.init),
            source_dataset=self.args.dataset)
        if self.primary:
            if not (keep_existing and self.path(k).exists()):
                pruning_utils.save_ticket(self.path(k), ticket)
            levels = json.loads(self.sparsity_path.read_text()) if self.sparsity_path.exists() else {}
            levels[str(k)] = round(float(ticket["sparsity"]), 2)
            atomic_write_json(dict(sorted(levels.items(), key=lambda kv: int(kv[0]))), self.sparsity_path)
        return ticket


def next_mask(args, weights, mask, generator):
    if args.method == "rp":
        return pruning_utils.random_prune(mask, args.rate, generator)
    if args.layerwise:
        return pruning_utils.layerwise_magnitude_prune(weights, mask, args.rate)
    return pruning_utils.global_magnitude_prune(weights, mask, args.rate)


def prune_without_training(args, model, writer, log_path):
    """OMP / RP: every level from θ_p itself, nested masks, the same counts as IMP's rounds.

    Levels take milliseconds, so there is no checkpoint: a rerun recomputes the masks (they are
    deterministic) and keeps the ticket files already written."""
    weights = {n: p.detach() for n, p in model.named_parameters()}
    mask = pruning_utils.full_mask(model, include_stem=not args.exclude_stem, device=next(model.parameters()).device)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for k in range(1, args.rounds + 1):
        start = time.perf_counter()
        existed = writer.path(k).exists()
        mask = broadcast_mask(next_mask(args, weights, mask, generator), k)
        ticket = writer.write(k, mask, keep_existing=True)
        rows.append({"round": k, "epoch": 0, "sparsity": round(float(ticket["sparsity"]), 2),
                     "seconds": round(time.perf_counter() - start, 4)})
        note = " (kept the ticket already written)" if existed else ""
        setup.log(f"{args.method} round {k}/{args.rounds}: sparsity {ticket['sparsity']:.2f}%{note}")
    if writer.primary:
        write_csv(rows, log_path, LOG_FIELDS)


def main(argv=None):
    args = parse_args(argv)
    dist_info = du.init_distributed(args.device)
    save_dir = Path(args.save_dir)
    precision = setup.resolve_precision(args, dist_info.device)
    seed_everything(args.seed)  # the same on every rank: masks and head initialisation agree
    config = dict(vars(args))
    if str(args.init).lower() != "none" and not Path(str(args.init)).is_file():
        raise UserError(f"--init '{args.init}' does not exist; pass the pre-trained checkpoint θ_p to prune.")
    config["init_sha256"] = fingerprint(args.init)
    # data and θ_p are checked before the run directory is claimed, so a mistake in either leaves
    # no config.json behind to refuse the corrected command
    data = setup.data_stub(args) if args.method != "imp" else setup.build_data(
        args, dist_info, batch_size=args.batch_size, val_size=0)
    model, init_info = setup.build_model(args, data, dist_info.device, load_head="auto")
    if init_info.get("dropped_head"):
        setup.log(f"note: θ_p's head does not fit the {data.num_classes} classes of --dataset {args.dataset}; "
                  "a new head is initialised (the head is never pruned)")
    setup.prepare_dir(save_dir, config, dist_info)
    writer = TicketWriter(save_dir, args, dist_info.primary)

    if args.method != "imp":
        prune_without_training(args, model, writer, save_dir / "log.csv")
        du.barrier()
        setup.log(f"done: {args.rounds} tickets in {writer.dir}")
        du.cleanup()
        return 0

    theta_p = {k: v.detach().clone() for k, v in model.state_dict().items()}
    runner, plain = setup.wrap_model(model, args, dist_info)
    attack = training_attack("at" if args.retrain == "at" else "st", args.eps, args.alpha, args.attack_steps,
                             args.attack_bn)
    scaler = precision.make_scaler()

    ckpt_path = save_dir / "checkpoint.pt"
    optimizer = None
    if ckpt_path.exists():
        ckpt = safe_load(ckpt_path, map_location=dist_info.device)
        k, done_epochs, log_rows = ckpt["round"], ckpt["epoch"], ckpt["log"]
        mask = {n: m.to(dist_info.device) for n, m in ckpt["mask"].items()}
        model.load_state_dict(ckpt["model"])
        optimizer = make_sgd(model.parameters(), args.lr, args.momentum, args.weight_decay, dist_info.device)
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        restore_rank_rng_state(ckpt["rng"], dist_info.rank)
        setup.log(f"resuming {save_dir}: round {k}, {done_epochs}/{args.epochs_per_round} epochs done")
    else:
        k, done_epochs, log_rows = 0, args.epochs_per_round, []
        mask = pruning_utils.full_mask(model, include_stem=not args.exclude_stem, device=dist_info.device)

    def save_checkpoint():
        rng = gather_rng_states()
        if dist_info.primary:
            atomic_save({"round": k, "epoch": done_epochs, "log": log_rows, "model": model.state_dict(),
                         "mask": {n: m.cpu() for n, m in mask.items()}, "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "rng": rng, "init": str(args.init),
                         "init_sha256": config["init_sha256"]}, ckpt_path)
        du.barrier()

    while True:
        if done_epochs >= args.epochs_per_round or k == args.rounds:
            if k == args.rounds:
                break
            # next round: prune the current (trained) weights, save the ticket, rewind to θ_p
            weights = {n: p.detach() for n, p in model.named_parameters()}
            k += 1
            mask = broadcast_mask(next_mask(args, weights, mask, None), k)
            ticket = writer.write(k, mask)
            model.load_state_dict(theta_p)
            pruning_utils.apply_mask(model, mask)
            optimizer = make_sgd(model.parameters(), args.lr, args.momentum, args.weight_decay, dist_info.device)
            done_epochs = 0
            setup.log(f"round {k}/{args.rounds}: ticket at {ticket['sparsity']:.2f}% sparsity -> {writer.path(k)}")
            if k == args.rounds:
                save_checkpoint()
                break
            save_checkpoint()
        enforcer = pruning_utils.MaskEnforcer(model, mask)
        sparsity = pruning_utils.sparsity(mask)
        while done_epochs < args.epochs_per_round:
            epoch = done_epochs
            set_lr(optimizer, args.lr)
            data.train.set_epoch((k - 1) * args.epochs_per_round + epoch)
            try:
                stats = train_epoch(runner, data.train, optimizer, device=dist_info.device, attack=attack,
                                    attack_model=plain, enforcer=enforcer, precision=precision, scaler=scaler,
                                    channels_last=args.channels_last, progress=args.progress,
                                    desc=f"round {k}/{args.rounds} epoch {epoch + 1}/{args.epochs_per_round}")
            except NonFiniteLoss as exc:
                raise UserError(f"{exc} in round {k}, epoch {epoch + 1}; the last good checkpoint is kept in "
                                f"'{ckpt_path}'. Lower --lr and rerun.") from None
            done_epochs += 1
            log_rows.append({"round": k, "epoch": epoch, "lr": args.lr, "train_loss": stats["train_loss"],
                             "train_acc": stats["train_acc"], "sparsity": round(sparsity, 2),
                             "seconds": round(stats["seconds"], 3)})
            save_checkpoint()
            if dist_info.primary:
                write_csv(log_rows, save_dir / "log.csv", LOG_FIELDS)
        round_rows = [r for r in log_rows if r["round"] == k]
        if round_rows:
            last = round_rows[-1]
            setup.log(f"round {k}/{args.rounds} re-trained at {sparsity:.2f}%: loss {last['train_loss']:.4f} "
                      f"acc {last['train_acc']:.2f} in {sum(r['seconds'] for r in round_rows) / 60:.1f} min")

    du.barrier()
    setup.log(f"done: {args.rounds} IMP tickets in {writer.dir} (sparsity.json lists the levels)")
    du.cleanup()
    return 0


if __name__ == "__main__":
    run_main(main)
