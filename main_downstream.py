"""Stage 2: fine-tune one ticket (or the dense model) on a downstream task and report SA and RA.

parse -> build -> for each epoch: train_epoch, evaluate on held-out validation, checkpoint
-> test the selected epoch -> results.json (written last, atomically).
"""

import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import attacks
import models
import pruning_utils
from training import setup, tensorboard
from training.chance import check_chance_level
from training.downstream_args import (  # noqa: F401  (stage 2's command line, reached as main_downstream.NAME)
    FLAG_CONTEXT,
    FLAG_SCOPE,
    MODEL_FILES,
    PAPER_DEFAULTS,
    build_parser,
    config_changes,
    config_for,
    first_validated_epoch,
    flag_applies,
    parse_args,
    resolve_defaults,
    run_config,
)
from training.engine import (
    LossGuard,
    Precision,
    evaluate,
    lr_for_epoch,
    make_sgd,
    set_lr,
    train_epoch,
)
from training.loop import Policy, Progress, ResumableRun
from utils import distributed as du
from utils.checkpoint import atomic_save, atomic_write_json, safe_load
from utils.cli import run_main
from utils.errors import NonFiniteOutput, UserError
from utils.preemption import StopRequest
from utils.records import read_config, read_results
from utils.rundir import git_commit
from utils.seeding import seed_everything

FAT_GUARD_DROP = 20.0  # percentage points of robust accuracy lost in one epoch = catastrophic overfitting
FAT_GUARD_STEPS = 5
LOG_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_sa", "val_ra", "seconds"]


def check_pretrain_label(args, ticket):
    """The analysis pairs tickets with dense baselines by pretrain label, so an unlabelled or
    mislabelled run is said out loud rather than discovered as a missing baseline later."""
    if ticket is None and not args.pretrain:
        setup.log("warning: a dense run without --pretrain is labelled 'unknown' and will not serve as the "
                  "baseline of any ticket in analysis/plot_curves.py; pass --pretrain std|fat|at (or PRETRAIN=...).")
    elif ticket is not None and args.pretrain and ticket.get("pretrain") not in (None, "unknown", args.pretrain):
        setup.log(f"warning: --pretrain {args.pretrain} differs from the ticket's own label "
                  f"'{ticket['pretrain']}'; results.json records {args.pretrain}.")


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
    attack = attacks.evaluation_attack(args.eps, args.test_alpha or args.alpha, FAT_GUARD_STEPS)
    return evaluate(model, [(images, labels)], device=images.device, attack=attack, precision=precision,
                    progress=False)["ra"]


def test_attack(args):
    """The robust evaluation of the reported RA (every regime), which at/fat also validate with."""
    return attacks.evaluation_attack(args.test_eps, args.test_alpha, args.test_steps)


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


def subset_record(args, data):
    """How the training images of a data rate below 1 were chosen (recorded beside the indices)."""
    return {"subset": getattr(data, "subset_rule", args.subset), "subset_seed": getattr(data, "subset_seed",
                                                                                         args.subset_seed)}


def kept_state_text(save_dir, state):
    """What a stopped run leaves behind and how to go on, stated truthfully."""
    ckpt = Path(save_dir) / "checkpoint.pt"
    partial = state.get("partial")
    if ckpt.exists() and partial:
        kept = (f"the checkpoint inside epoch {partial['epoch'] + 1} (after step {partial['step']}) is kept in '{ckpt}' "
                "and no results.json was written")
    elif ckpt.exists() and state["epoch"] > 0:
        kept = f"the checkpoint of epoch {state['epoch']} is kept in '{ckpt}' and no results.json was written"
    else:
        kept = "no checkpoint was written and no results.json either"
    return (f"{kept}. Lower --lr (or check the data and θ_p) and rerun with --restart, which discards this "
            f"run's checkpoint and config, or choose another --save-dir.")


def check_finished_config(save_dir, args):
    """A finished run is only 'already done' for the command that made it."""
    old = read_config(save_dir / "config.json")
    diffs = config_changes(old, json.loads(json.dumps(run_config(args, None))))
    if diffs:
        listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in diffs[:12])
        raise UserError(f"--save-dir '{save_dir}' holds a finished run with a different configuration ({listed}); "
                        "choose another --save-dir.")


def print_finished(save_dir):
    res = read_results(Path(save_dir) / "results.json")
    ra = "n/a" if res["ra"] is None else f"{res['ra']:.2f}"
    setup.log(f"already finished: {save_dir}: SA {res['sa']:.2f}  RA {ra}  sparsity {res['sparsity']:.2f}% "
              f"(epoch {res.get('selected_epoch', '?')})")


def main(argv=None):
    return setup.run_stoppable(run, parse_args(argv), StopRequest())


def run(args, stop):
    dist_info = du.init_distributed(args.device)
    save_dir = Path(args.save_dir)
    precision = setup.resolve_precision(args, dist_info.device)
    seed_everything(args.seed + dist_info.rank)
    notes = resolve_defaults(args)
    Precision.resolve(args.eval_amp, dist_info.device)  # a test precision the device lacks fails now, not after training
    setup.claim_dir(save_dir, dist_info)  # finished, resumed or new is decided under the lock
    if os.path.lexists(save_dir / "results.json"):
        return report_finished(args, save_dir, dist_info)
    for note in notes:
        setup.log(f"note: {note}")
    data = setup.build_data(args, dist_info, batch_size=args.batch_size, data_rate=args.data_rate,
                            val_size=args.val_size, notes=notes)
    if data.val is None:
        raise UserError("model selection needs a validation split; set --val-size to a positive number.")

    built = args
    if args.random_reinit:  # the re-initialisation ablation: the ticket's mask on the architecture's fresh weights
        built = copy.copy(args)
        built.init = "none"
    model, init_info = setup.build_model(built, data, dist_info.device, load_head=False)
    ticket = load_ticket_for(model, args.ticket, args.reinit_stem) if args.ticket else None
    mask = None if ticket is None else {k: v.to(dist_info.device) for k, v in ticket["masks"].items()}
    if mask is not None:
        pruning_utils.apply_mask(model, mask, pattern=ticket["pattern"])

    check_pretrain_label(args, ticket)
    resumed = setup.prepare_dir(save_dir, run_config(args, ticket), dist_info)
    if dist_info.primary:
        atomic_write_json({"data_rate": args.data_rate, "seed": args.seed, **subset_record(args, data),
                           "train_indices": np.asarray(data.train_indices).tolist(),
                           "val_indices": np.asarray(data.val_indices).tolist()}, save_dir / "subset_indices.json")
    if args.linear_eval:
        freeze_backbone(model)

    policy = FineTuning(args, model, mask, ticket, data, save_dir=save_dir, dist_info=dist_info, precision=precision,
                        resumed=resumed)
    progress = ResumableRun(policy, save_dir=save_dir, dist_info=dist_info, stop=stop,
                            checkpoint_minutes=args.checkpoint_minutes,
                            loss_guard=LossGuard.for_classes(args.max_loss, data.num_classes),
                            tensorboard=args.tensorboard).run()
    state = policy.state(progress)
    chance = check_chance_level(args, state, data.num_classes, kept_state_text(save_dir, state))
    finish(args, model, mask, ticket, data, policy.state(progress), policy.selection, precision,
           {**init_info, "adaptations": notes}, save_dir, dist_info, chance)
    du.cleanup()
    return 0


def report_finished(args, save_dir, dist_info):
    """A rerun of a finished run: say so, and keep nothing of it but its results."""
    if args.restart:
        raise UserError(f"--save-dir '{save_dir}' holds a finished run (results.json), which --restart never "
                        "discards; choose another --save-dir.")
    check_finished_config(save_dir, args)
    if dist_info.primary:  # files a kill between results.json and their removal left, or that a rerun no longer keeps
        remove_after_results(args, save_dir)
    print_finished(save_dir)
    return 0


class FineTuning(Policy):
    """Stage 2 in the resumable loop: one unit of ``--epochs`` epochs, each followed by FAT's guard
    and by validation and selection; the selected models are written after each checkpoint."""

    log_fields = LOG_FIELDS
    checkpoint_keys = ("model", "optimizer", "state", "rng")

    def __init__(self, args, model, mask, ticket, data, *, save_dir, dist_info, precision, resumed):
        self.args, self.model, self.mask, self.data = args, model, mask, data
        self.save_dir, self.dist_info, self.precision, self.resumed_dir = save_dir, dist_info, precision, resumed
        self.runner, self.plain = setup.wrap_model(model, args, dist_info)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_sgd(params, args.lr, args.momentum, args.weight_decay, dist_info.device)
        self.scaler = precision.make_scaler()
        self.enforcer = pruning_utils.MaskEnforcer(model, mask, pattern=ticket["pattern"]) if mask is not None else None
        self.train_attack = attacks.training_attack(args.regime, args.eps, args.alpha, args.train_steps, args.attack_bn)
        self.val_attack = test_attack(args) if args.regime != "st" else None
        self.selection = "val_sa" if args.regime == "st" else "val_ra"
        self.best = self.best_sa = self.guard = None
        level = "dense" if ticket is None else f"{ticket['sparsity']:.2f}%"
        self.desc = f"{args.dataset} {args.regime} {level}"
        self.guard_batch = None
        self.start_weights = None  # FAT's guard restores the epoch's starting weights, also after a mid-epoch resume

    def state(self, progress):
        """The run's state as the checkpoint holds it (and finish() reads it)."""
        return {"epoch": progress.epoch, "history": progress.log, "best": self.best, "best_sa": self.best_sa,
                "guard": self.guard, "stopped": self.stopped, "partial": progress.partial}

    def fresh(self):
        if self.resumed_dir:
            setup.log(f"{self.save_dir} holds this configuration but no checkpoint yet; starting at epoch 0")
        return Progress(0, 0)

    def restore(self, ckpt):
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
        self.best, self.best_sa, self.guard, self.stopped = (state["best"], state.get("best_sa"), state["guard"],
                                                             state["stopped"])
        if ckpt.get("prev_weights") is not None:
            self.start_weights = ckpt["prev_weights"]
        return Progress(0, state["epoch"], state["history"], state.get("partial"))

    def resumed(self, progress):
        if self.dist_info.primary and progress.partial is None:
            save_selected_models(self.save_dir, self.model, self.mask, self.state(progress), self.selection,
                                 resuming=True)
        where = "" if progress.partial is None else f", step {progress.partial['step']} of that epoch"
        setup.log(f"resuming {self.save_dir} at epoch {progress.epoch} of {self.args.epochs}{where}")

    def enter_unit(self, progress):
        if self.args.save_trajectory and self.dist_info.primary and progress.epoch == 0 and not progress.partial:
            save_weights(self.model, self.save_dir / "trajectory" / "start.pt")
        if self.args.regime == "fat" and self.args.fat_guard:
            self.data.train.set_epoch(0)
            self.guard_batch = tuple(t.to(self.dist_info.device) for t in next(iter(self.data.train)))

    def epochs(self, unit):
        return self.args.epochs

    def train(self, progress, *, start_step, carry, step_hook, loss_guard):
        args, epoch = self.args, progress.epoch
        self.t0 = time.perf_counter()
        self.carried_seconds = carry["seconds"] if carry else 0.0
        self.lr = lr_for_epoch(epoch, args.lr, args.epochs, args.milestones, args.schedule)
        set_lr(self.optimizer, self.lr)
        self.data.train.set_epoch(epoch, start_batch=start_step)
        if self.guard_batch is not None and carry is None:
            self.start_weights = copy.deepcopy(self.model.state_dict())
        set_train_mode(self.model, args.linear_eval)
        return train_epoch(self.runner, self.data.train, self.optimizer, device=self.dist_info.device,
                           attack=self.train_attack, attack_model=self.plain, enforcer=self.enforcer,
                           precision=self.precision, scaler=self.scaler, channels_last=args.channels_last,
                           progress=args.progress, desc=f"{self.desc} epoch {epoch + 1}/{args.epochs}", train_mode=False,
                           loss_guard=loss_guard, start_step=start_step, carry=carry, step_hook=step_hook)

    def after_epoch(self, progress, stats):
        args, epoch = self.args, progress.epoch
        row = {"epoch": epoch, "lr": self.lr, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
               "val_sa": None, "val_ra": None}
        if self.guard_batch is not None and self._guard_fired(epoch):
            return None
        if epoch >= first_validated_epoch(args):
            self._validate(progress, row)
        # an epoch resumed mid-way counts the seconds spent before the interruption too
        row["seconds"] = time.perf_counter() - self.t0 + self.carried_seconds
        if args.save_trajectory and self.dist_info.primary:
            save_weights(self.model, self.save_dir / "trajectory" / f"epoch_{epoch:03d}.pt")
        return row

    def _guard_fired(self, epoch):
        """FAT's catastrophic-overfitting guard: a collapse puts back the weights the epoch started from
        and ends the run, keeping the previous epoch."""
        acc = guard_accuracy(self.model, self.guard_batch, self.args, self.precision)
        if self.guard is not None and acc < self.guard - FAT_GUARD_DROP:
            self.model.load_state_dict(self.start_weights)
            self.stopped = (f"catastrophic overfitting in epoch {epoch + 1}: PGD accuracy on a training "
                            f"batch fell from {self.guard:.1f}% to {acc:.1f}%; kept epoch {epoch}")
            setup.log(self.stopped)
            if self.best is None:  # the guard fired before any validation: the kept epoch is the selection
                self.best = {"score": None, "epoch": epoch - 1}
            return True
        self.guard = acc
        return False

    def _validate(self, progress, row):
        args, epoch = self.args, progress.epoch
        try:
            val = evaluate(self.plain, self.data.val, device=self.dist_info.device, attack=self.val_attack,
                           precision=self.precision, channels_last=args.channels_last, progress=args.progress,
                           desc="validate")
        except NonFiniteOutput as exc:
            raise UserError(f"{exc} after epoch {epoch + 1}; {kept_state_text(self.save_dir, self.state(progress))}") \
                from None
        row["val_sa"], row["val_ra"] = val["sa"], val["ra"]
        score = row[self.selection]
        if self.best is None or score > self.best["score"]:
            self.best = {"score": score, "epoch": epoch}
        if args.keep_sa_best and args.regime != "st" and (self.best_sa is None or
                                                          row["val_sa"] > self.best_sa["score"]):
            self.best_sa = {"score": row["val_sa"], "epoch": epoch}

    def checkpoint(self, progress):
        extra = {"prev_weights": self.start_weights} if progress.partial and self.start_weights is not None else {}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "state": self.state(progress), **extra}

    def saved(self, progress):
        # after the checkpoint: a kill between the two leaves a checkpoint whose selection is the
        # epoch it holds, which a resume re-saves
        save_selected_models(self.save_dir, self.model, self.mask, self.state(progress), self.selection)

    def report(self, progress, row):
        if self.dist_info.primary:
            val_txt = "" if row["val_sa"] is None else f" val SA {row['val_sa']:.2f}" + (
                "" if row["val_ra"] is None else f" RA {row['val_ra']:.2f}")
            setup.log(f"epoch {row['epoch'] + 1}/{self.args.epochs} lr {row['lr']:.4g} loss {row['train_loss']:.4f} "
                      f"acc {row['train_acc']:.2f}{val_txt} ({row['seconds']:.1f}s)")

    def where(self, progress):
        return f"epoch {progress.epoch + 1}"

    def diverged(self, exc, progress):
        return f"{exc} in epoch {progress.epoch + 1}; {kept_state_text(self.save_dir, self.state(progress))}"


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
    """Test SA/RA of a selected model in the reported precision (fp32 unless --eval-amp)."""
    selected = safe_load(path, map_location=device)
    model.load_state_dict(selected["state_dict"])
    if mask is not None:
        verify_sparse(model, mask, f"in the selected model '{path}'")
    try:
        return evaluate(model, data.test, device=device, attack=test_attack(args), precision=precision,
                        channels_last=args.channels_last, progress=args.progress, desc="test")
    except NonFiniteOutput as exc:
        raise UserError(f"{exc} of the selected model '{path}'; no results.json was written. The run's "
                        "checkpoints are kept; inspect them, or rerun with --restart and a lower --lr.") from None


def remove_after_results(args, save_dir):
    """The retention policy, applied once results.json exists: the optimizer state is only needed to resume
    (at grid scale it is terabytes), and under --keep-model none the selected models go too (at paper scale
    ~95 MB a run, which no analysis but robustness and loss landscapes reads)."""
    names = (() if args.keep_checkpoint else ("checkpoint.pt",)) + (MODEL_FILES if args.keep_model == "none" else ())
    for name in names:
        (save_dir / name).unlink(missing_ok=True)


def precision_name(precision):
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[precision.dtype]


def finish(args, model, mask, ticket, data, state, selection, precision, init_info, save_dir, dist_info, chance):
    if mask is not None:
        verify_sparse(model, mask, "after training")
    # validation may run in the training precision; the reported numbers are fp32 unless asked otherwise
    test_precision = Precision.resolve(args.eval_amp, dist_info.device)
    test = test_selected(model, save_dir / "model_best.pt", mask, data, args, test_precision, dist_info.device)
    extra = {}
    if args.keep_sa_best and (save_dir / "model_best_sa.pt").exists():
        t = test_selected(model, save_dir / "model_best_sa.pt", mask, data, args, test_precision, dist_info.device)
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
        # the top-level keys are the contract (docs/contracts.md §3); what was resolved at run time (the
        # first validated epoch, the subset rule, the precisions) is recorded in the config
        "config": {**run_config(args, ticket), **subset_record(args, data), "eval_from": first_validated_epoch(args),
                   "val_images": len(data.val_indices),
                   "precision": {"train": precision_name(precision), "validation": precision_name(precision),
                                 "test": precision_name(test_precision)}, **chance},
        "git": git_commit(),
    }
    if dist_info.primary:
        # details beyond the results contract (docs/contracts.md §3) go beside it
        atomic_write_json({"init_format": init_info.get("format"), "dropped_head": init_info.get("dropped_head"),
                           "init_normalization": init_info.get("file_normalization"),
                           "adaptations": init_info.get("adaptations", []),
                           "test_images": test["n"], "stopped_early": state["stopped"],
                           "train_seconds": total_seconds, "world_size": dist_info.world_size, **extra},
                          save_dir / "run_info.json")
        if args.tensorboard:
            tensorboard.write_test(save_dir, max(results["selected_epoch"], 0), results["sa"], results["ra"])
        atomic_write_json(results, save_dir / "results.json")
        remove_after_results(args, save_dir)
        ra = "n/a" if results["ra"] is None else f"{results['ra']:.2f}"
        kept = "" if args.keep_model == "best" else " (no model file kept: --keep-model none)"
        setup.log(f"done: {args.dataset} {args.regime} sparsity {results['sparsity']:.2f}% rate {args.data_rate} "
                  f"seed {args.seed}: SA {results['sa']:.2f}  RA {ra}  (epoch {results['selected_epoch']}, "
                  f"{total_seconds / 60:.1f} min) -> {save_dir / 'results.json'}{kept}")
    return results


if __name__ == "__main__":
    run_main(main)
