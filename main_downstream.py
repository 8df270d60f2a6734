"""Stage 2: fine-tune one ticket (or the dense model) on a downstream task and report SA and RA.

parse -> build -> for each epoch: train_epoch, evaluate on held-out validation, checkpoint
-> test the selected epoch -> results.json (written last, atomically).
"""

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

import models
import pruning_utils
from utils import distributed as du
from utils import setup
from utils.checkpoint import atomic_save, atomic_write_json, safe_load
from utils.cli import ArgumentParser, fraction, int_list, run_main
from utils.engine import (AttackSpec, NonFiniteLoss, evaluate, lr_for_epoch, make_sgd, set_lr, train_epoch,
                          training_attack)
from utils.errors import UserError
from utils.rundir import NON_SEMANTIC_KEYS, config_differences, git_commit, write_csv
from utils.seeding import gather_rng_states, restore_rank_rng_state, seed_everything

# The paper's downstream protocol (DESIGN.md §2); flags left unset take these.
PAPER_DEFAULTS = {
    "st": {"lr": 0.001, "batch_size": 64, "epochs": 150, "milestones": [50, 100], "schedule": "step",
           "weight_decay": 5e-4},
    "at": {"lr": 0.1, "batch_size": 128, "epochs": 100, "milestones": [50, 75], "schedule": "step",
           "weight_decay": 5e-4},
}
PAPER_DEFAULTS["fat"] = dict(PAPER_DEFAULTS["at"])
SVHN_ADVERSARIAL = {"lr": 0.01, "epochs": 80, "schedule": "cosine", "milestones": []}
FAT_GUARD_DROP = 20.0  # percentage points of robust accuracy lost in one epoch = catastrophic overfitting
FAT_GUARD_STEPS = 5
LOG_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_sa", "val_ra", "seconds"]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    setup.add_common_args(p, ("cifar10", "cifar100", "svhn", "folder", "digits"))
    p.add_argument("--ticket", "--tickets_file", "--mask", dest="ticket", default=None,
                   help="ticket file from stage 1 (or the seed repo); omit or 'none' for the dense baseline")
    p.add_argument("--regime", choices=["st", "fat", "at"], default="st")
    p.add_argument("--data-rate", "--data_rate", "--data_number", dest="data_rate", type=float, default=1.0,
                   help="fraction of the training split used (class-balanced, seeded): 1.0, 0.1, 0.01 "
                        "(the seed repo called it --data_number)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--milestones", "--decreasing_lr", "--decreasing-lr", dest="milestones", type=int_list, default=None,
                   help="epochs at which the lr is multiplied by 0.1, e.g. 50,75")
    p.add_argument("--schedule", choices=["step", "cosine"], default=None,
                   help="lr schedule (default: step at --milestones; cosine for SVHN adversarial training)")
    p.add_argument("--val-size", "--val_size", type=int, default=None,
                   help="training images held out for validation (default: the last 5,000 for CIFAR/SVHN)")
    p.add_argument("--train-steps", "--train_steps", "--train_step", type=int, default=10,
                   help="PGD steps of adversarial training")
    # the seed repo's names for the training attack's radius and step (same as --eps / --alpha)
    p.add_argument("--train_eps", dest="eps", type=fraction, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--train_gamma", dest="alpha", type=fraction, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--test-eps", "--test_eps", dest="test_eps", type=fraction, default=None,
                   help="radius of the robust evaluation (default: --eps)")
    p.add_argument("--test-steps", "--test_steps", "--test_step", type=int, default=20,
                   help="PGD steps of the robust evaluation (RA) of every regime; at/fat also validate with it; "
                        "0 = report no RA (st only)")
    p.add_argument("--test-alpha", "--test_alpha", "--test_gamma", dest="test_alpha", type=fraction, default=None,
                   help="PGD step size for evaluation, e.g. 2/255 or 0.0078 (default: the test radius / 4, 2/255 at 8/255)")
    p.add_argument("--eval-from", "--eval_from", type=int, default=0,
                   help="validate from this epoch on (the seed scripts used 45)")
    p.add_argument("--no-fat-guard", dest="fat_guard", action="store_false",
                   help="fat: do not stop on catastrophic overfitting")
    p.add_argument("--linear-eval", "--linear_eval", action="store_true",
                   help="freeze the backbone (weights and BatchNorm statistics) and train only the head")
    p.add_argument("--save-trajectory", action="store_true",
                   help="keep the weights of every epoch (for analysis/loss_landscape.py)")
    p.add_argument("--keep-sa-best", action="store_true",
                   help="adversarial regimes: also test the epoch with the best validation SA")
    args = p.parse_args(argv)
    setup.check_common_args(args)
    return args


def resolve_defaults(args, n_train_full=None):
    """Fill unset flags from the paper's protocol for this regime and dataset."""
    defaults = dict(PAPER_DEFAULTS[args.regime])
    if args.dataset == "svhn" and args.regime in ("at", "fat"):
        svhn = dict(SVHN_ADVERSARIAL)
        if args.milestones is not None:  # explicit --milestones mean a step schedule, even on SVHN
            del svhn["schedule"], svhn["milestones"]
        defaults.update(svhn)
    if args.schedule == "cosine" and args.milestones:
        raise UserError("--milestones only apply to --schedule step; drop one of the two.")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.alpha is None:  # the paper's 2/255 at ε = 8/255; FGSM-RS takes 1.25 ε (Wong et al.)
        args.alpha = 1.25 * args.eps if args.regime == "fat" else args.eps / 4
    if args.test_eps is None:
        args.test_eps = args.eps
    if args.test_alpha is None:
        args.test_alpha = args.test_eps / 4
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, not {args.epochs}.")
    if not 0 < args.data_rate <= 1:
        raise UserError(f"--data-rate must lie in (0, 1], not {args.data_rate}; use 1.0, 0.1 or 0.01.")
    if args.regime != "st" and args.test_steps == 0:
        raise UserError(f"--regime {args.regime} selects the epoch by validation RA, so --test-steps must be at least 1.")
    if args.train_steps < 1 or args.test_steps < 0:
        raise UserError("--train-steps must be at least 1 and --test-steps at least 0.")
    if args.ticket is not None and str(args.ticket).lower() == "none":
        args.ticket = None


def check_pretrain_label(args, ticket):
    """The analysis pairs tickets with dense baselines by pretrain label, so an unlabelled or
    mislabelled run is said out loud rather than discovered as a missing baseline later."""
    if ticket is None and not args.pretrain:
        setup.log("warning: a dense run without --pretrain is labelled 'unknown' and will not serve as the "
                  "baseline of any ticket in analysis/plot_curves.py; pass --pretrain std|fat|at (or PRETRAIN=...).")
    elif ticket is not None and args.pretrain and ticket.get("pretrain") not in (None, "unknown", args.pretrain):
        setup.log(f"warning: --pretrain {args.pretrain} differs from the ticket's own label "
                  f"'{ticket['pretrain']}'; results.json records {args.pretrain}.")


def run_config(args, ticket):
    cfg = {k: v for k, v in vars(args).items()}
    cfg["ticket_sparsity"] = None if ticket is None else float(ticket["sparsity"])
    return cfg


def load_ticket_for(model, path, reinit_stem=False):
    ticket = pruning_utils.load_ticket(path)
    if reinit_stem:  # the stem is not θ_p's, so its mask has nothing to select
        ticket["masks"].pop("conv1.weight", None)
    pruning_utils.check_mask_fits(model, ticket["masks"])
    return ticket


def verify_sparse(model, mask, where):
    """Fail loudly if any pruned weight is not exactly zero."""
    params = dict(model.named_parameters())
    for name, m in mask.items():
        revived = int((params[name].detach()[~m.to(params[name].device)] != 0).sum())
        if revived:
            raise RuntimeError(f"{revived} pruned weights of {name} are non-zero {where}; this is a bug, please report it.")


def guard_accuracy(model, batch, args, precision):
    """FAT's catastrophic-overfitting check: PGD accuracy on one fixed training batch."""
    images, labels = batch
    attack = AttackSpec("pgd", args.eps, args.test_alpha or args.alpha, FAT_GUARD_STEPS, True, "eval")
    return evaluate(model, [(images, labels)], device=images.device, attack=attack, precision=precision,
                    progress=False)["ra"]


def freeze_backbone(model):
    for name, p in model.named_parameters():
        if not name.startswith(models.HEAD_PREFIX):
            p.requires_grad_(False)


def set_train_mode(model, linear_eval):
    model.train()
    if linear_eval:  # backbone statistics stay those of θ_p
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def check_finished_config(save_dir, args):
    """A finished run is only 'already done' for the command that made it."""
    old = json.loads((save_dir / "config.json").read_text())
    derived = {"ticket_sparsity"}
    diffs = config_differences(old, json.loads(json.dumps(vars(args))), NON_SEMANTIC_KEYS | derived)
    if diffs:
        listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in diffs[:12])
        raise UserError(f"--save-dir '{save_dir}' holds a finished run with a different configuration ({listed}); "
                        "choose another --save-dir.")


def print_finished(save_dir):
    res = json.loads((Path(save_dir) / "results.json").read_text())
    ra = "n/a" if res["ra"] is None else f"{res['ra']:.2f}"
    setup.log(f"already finished: {save_dir}: SA {res['sa']:.2f}  RA {ra}  sparsity {res['sparsity']:.2f}% "
              f"(epoch {res['selected_epoch']})")


def main(argv=None):
    args = parse_args(argv)
    dist_info = du.init_distributed(args.device)
    save_dir = Path(args.save_dir)
    precision = setup.resolve_precision(args, dist_info.device)
    seed_everything(args.seed + dist_info.rank)
    resolve_defaults(args)
    if (save_dir / "results.json").exists():
        check_finished_config(save_dir, args)
        print_finished(save_dir)
        return 0
    data = setup.build_data(args, dist_info, batch_size=args.batch_size, data_rate=args.data_rate,
                            val_size=args.val_size)
    if data.val is None:
        raise UserError("model selection needs a validation split; set --val-size to a positive number.")

    model, init_info = setup.build_model(args, data, dist_info.device, load_head=False)
    ticket = load_ticket_for(model, args.ticket, args.reinit_stem) if args.ticket else None
    mask = None if ticket is None else {k: v.to(dist_info.device) for k, v in ticket["masks"].items()}
    if mask is not None:
        pruning_utils.apply_mask(model, mask)

    check_pretrain_label(args, ticket)
    config = run_config(args, ticket)
    resumed = setup.prepare_dir(save_dir, config, dist_info)
    if dist_info.primary:
        atomic_write_json({"data_rate": args.data_rate, "seed": args.seed,
                           "train_indices": np.asarray(data.train_indices).tolist(),
                           "val_indices": np.asarray(data.val_indices).tolist()}, save_dir / "subset_indices.json")

    if args.linear_eval:
        freeze_backbone(model)
    runner, plain = setup.wrap_model(model, args, dist_info)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_sgd(params, args.lr, args.momentum, args.weight_decay, dist_info.device)
    scaler = precision.make_scaler()
    enforcer = pruning_utils.MaskEnforcer(model, mask) if mask is not None else None
    train_attack = training_attack(args.regime, args.eps, args.alpha, args.train_steps, args.attack_bn)
    eval_attack = (AttackSpec("pgd", args.test_eps, args.test_alpha, args.test_steps, True, "eval")
                   if args.regime != "st" and args.test_steps > 0 else None)
    selection = "val_sa" if args.regime == "st" else "val_ra"

    state = {"epoch": 0, "history": [], "best": None, "best_sa": None, "guard": None, "stopped": None}
    ckpt_path = save_dir / "checkpoint.pt"

    def save_checkpoint():
        """The per-epoch checkpoint first, then the selected models it points to: a kill between the
        two leaves a checkpoint whose selection is the epoch it holds, which a resume re-saves."""
        rng = gather_rng_states()
        if dist_info.primary:
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "state": state, "rng": rng}, ckpt_path)
            save_selected_models(save_dir, model, mask, state, selection)
        du.barrier()

    if ckpt_path.exists():
        ckpt = safe_load(ckpt_path, map_location=dist_info.device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
        restore_rank_rng_state(ckpt["rng"], dist_info.rank)
        if dist_info.primary:
            save_selected_models(save_dir, model, mask, state, selection, resuming=True)
        setup.log(f"resuming {save_dir} at epoch {state['epoch']} of {args.epochs}")
    elif resumed:
        setup.log(f"{save_dir} holds this configuration but no checkpoint yet; starting at epoch 0")

    if args.save_trajectory and dist_info.primary and state["epoch"] == 0:
        save_weights(model, save_dir / "trajectory" / "start.pt")

    guard_batch = None
    if args.regime == "fat" and args.fat_guard:
        data.train.set_epoch(0)
        guard_batch = next(iter(data.train))
        guard_batch = tuple(t.to(dist_info.device) for t in guard_batch)

    level = "dense" if ticket is None else f"{ticket['sparsity']:.2f}%"
    desc_base = f"{args.dataset} {args.regime} {level}"
    while state["epoch"] < args.epochs and not state["stopped"]:
        epoch = state["epoch"]
        t0 = time.perf_counter()
        lr = lr_for_epoch(epoch, args.lr, args.epochs, args.milestones, args.schedule)
        set_lr(optimizer, lr)
        data.train.set_epoch(epoch)
        prev_weights = copy.deepcopy(model.state_dict()) if guard_batch is not None else None
        set_train_mode(model, args.linear_eval)
        try:
            stats = train_epoch(runner, data.train, optimizer, device=dist_info.device, attack=train_attack,
                                attack_model=plain, enforcer=enforcer, precision=precision, scaler=scaler,
                                channels_last=args.channels_last, progress=args.progress,
                                desc=f"{desc_base} epoch {epoch + 1}/{args.epochs}", train_mode=False)
        except NonFiniteLoss as exc:
            raise UserError(f"{exc} in epoch {epoch + 1}; the last good checkpoint is kept in '{save_dir}'. "
                            "Lower --lr (or check the data) and rerun.") from None
        row = {"epoch": epoch, "lr": lr, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
               "val_sa": None, "val_ra": None}
        if guard_batch is not None:
            acc = guard_accuracy(model, guard_batch, args, precision)
            if state["guard"] is not None and acc < state["guard"] - FAT_GUARD_DROP:
                model.load_state_dict(prev_weights)
                state["stopped"] = (f"catastrophic overfitting in epoch {epoch + 1}: PGD accuracy on a training "
                                    f"batch fell from {state['guard']:.1f}% to {acc:.1f}%; kept epoch {epoch}")
                setup.log(state["stopped"])
                if state["best"] is None:  # the guard fired before any validation: the kept epoch is the selection
                    state["best"] = {"score": None, "epoch": epoch - 1}
                save_checkpoint()  # a resume must not train past the collapse
                break
            state["guard"] = acc
        if epoch >= args.eval_from or epoch == args.epochs - 1:
            val = evaluate(plain, data.val, device=dist_info.device,
                           attack=eval_attack, precision=precision, channels_last=args.channels_last,
                           progress=args.progress, desc="validate")
            row["val_sa"], row["val_ra"] = val["sa"], val["ra"]
            score = row[selection]
            if state["best"] is None or score > state["best"]["score"]:
                state["best"] = {"score": score, "epoch": epoch}
            if args.keep_sa_best and args.regime != "st" and (state["best_sa"] is None or
                                                              row["val_sa"] > state["best_sa"]["score"]):
                state["best_sa"] = {"score": row["val_sa"], "epoch": epoch}
        row["seconds"] = time.perf_counter() - t0
        state["history"].append(row)
        state["epoch"] = epoch + 1
        if dist_info.primary:  # before the checkpoint: a kill in between re-runs this epoch and rewrites both
            if args.save_trajectory:
                save_weights(model, save_dir / "trajectory" / f"epoch_{epoch:03d}.pt")
            write_csv(state["history"], save_dir / "log.csv", LOG_FIELDS)
        save_checkpoint()
        if dist_info.primary:
            val_txt = "" if row["val_sa"] is None else f" val SA {row['val_sa']:.2f}" + (
                "" if row["val_ra"] is None else f" RA {row['val_ra']:.2f}")
            setup.log(f"epoch {epoch + 1}/{args.epochs} lr {lr:.4g} loss {row['train_loss']:.4f} "
                      f"acc {row['train_acc']:.2f}{val_txt} ({row['seconds']:.1f}s)")
        du.barrier()

    du.barrier()
    finish(args, model, mask, ticket, data, state, selection, precision, init_info, save_dir, dist_info)
    du.cleanup()
    return 0


def save_weights(model, path):
    """A plain state dict on the CPU: what analysis/loss_landscape.py reads as a trajectory point."""
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def save_selected_models(save_dir, model, mask, state, selection, resuming=False):
    """Write model_best.pt (and model_best_sa.pt) when the selection is the epoch ``model`` holds.

    A selection only changes to the newest epoch (or, after FAT's guard, to the restored one), so
    the weights in hand are the ones to keep. ``resuming``: the files are checked against the
    checkpoint's selection, and one that a kill left behind is re-saved."""
    held_epoch = state["epoch"] - 1  # the epoch whose weights ``model`` holds
    for key, name, sel in (("best", "model_best.pt", selection), ("best_sa", "model_best_sa.pt", "val_sa")):
        best = state.get(key)
        if best is None:
            continue
        path = save_dir / name
        on_disk = (safe_load(path).get("epoch") if path.exists() else None) if resuming else None
        if resuming and on_disk == best["epoch"]:
            continue
        if best["epoch"] != held_epoch:
            if resuming:
                raise UserError(f"'{path}' holds epoch {on_disk} but '{save_dir / 'checkpoint.pt'}' selected epoch "
                                f"{best['epoch']} (the files were changed by hand, or an older version of this "
                                "tool was killed between writing them); rerun into a new --save-dir.")
            continue
        models.save_model_checkpoint(path, model, mask=mask, epoch=best["epoch"], selection=sel)


def test_selected(model, path, mask, data, args, precision, device):
    selected = safe_load(path, map_location=device)
    model.load_state_dict(selected["state_dict"])
    if mask is not None:
        verify_sparse(model, mask, f"in the selected model '{path}'")
    attack = (AttackSpec("pgd", args.test_eps, args.test_alpha, args.test_steps, True, "eval")
              if args.test_steps > 0 else None)
    return evaluate(model, data.test, device=device, attack=attack, precision=precision,
                    channels_last=args.channels_last, progress=args.progress, desc="test")


def finish(args, model, mask, ticket, data, state, selection, precision, init_info, save_dir, dist_info):
    if mask is not None:
        verify_sparse(model, mask, "after training")
    test = test_selected(model, save_dir / "model_best.pt", mask, data, args, precision, dist_info.device)
    extra = {}
    if args.keep_sa_best and (save_dir / "model_best_sa.pt").exists():
        t = test_selected(model, save_dir / "model_best_sa.pt", mask, data, args, precision, dist_info.device)
        extra = {"sa_best": {"epoch": state["best_sa"]["epoch"], "sa": t["sa"], "ra": t["ra"]}}
    total_seconds = sum(r["seconds"] for r in state["history"])
    results = {
        "dataset": args.dataset, "arch": args.arch,
        "pretrain": args.pretrain or (ticket or {}).get("pretrain") or "unknown",
        "init": args.init, "ticket": str(args.ticket) if ticket is not None else None,
        "method": ticket["method"] if ticket is not None else "dense",
        "sparsity": float(ticket["sparsity"]) if ticket is not None else 0.0,
        "regime": args.regime, "data_rate": args.data_rate, "seed": args.seed,
        "sa": test["sa"], "ra": test["ra"],
        "selected_epoch": state["best"]["epoch"], "selection": selection,
        "history": state["history"],
        "config": run_config(args, ticket), "git": git_commit(),
    }
    if dist_info.primary:
        # details beyond the results contract (DESIGN.md §5.3) go beside it
        atomic_write_json({"init_format": init_info.get("format"), "dropped_head": init_info.get("dropped_head"),
                           "test_images": test["n"], "stopped_early": state["stopped"],
                           "train_seconds": total_seconds, "world_size": dist_info.world_size, **extra},
                          save_dir / "run_info.json")
        atomic_write_json(results, save_dir / "results.json")
        ra = "n/a" if results["ra"] is None else f"{results['ra']:.2f}"
        setup.log(f"done: {args.dataset} {args.regime} sparsity {results['sparsity']:.2f}% rate {args.data_rate} "
                  f"seed {args.seed}: SA {results['sa']:.2f}  RA {ra}  (epoch {results['selected_epoch']}, "
                  f"{total_seconds / 60:.1f} min) -> {save_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    run_main(main)
