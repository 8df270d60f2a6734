"""Stage 2's command line: its flags, the paper's defaults per regime and dataset (filled in for every
flag left unset), where each flag acts (a flag without effect on a run is refused), and the config a
command records in its run directory, which the sweep compares with what a grid would run now."""

import argparse
import json

from training import tensorboard
from training.common_args import MAX_LOSS_FACTOR, MAX_LOSS_PATIENCE, add_common_args, check_common_args
from utils.cli import (
    ArgumentParser,
    flag_applies_in,
    fraction,
    int_list,
    refuse_flags_without_effect,
    resolve_sizes,
)
from utils.errors import UserError
from utils.rundir import NON_SEMANTIC_KEYS, config_differences

DESCRIPTION = """Stage 2: fine-tune one ticket (or the dense model) on a downstream task and report SA and RA.

parse -> build -> for each epoch: train_epoch, evaluate on held-out validation, checkpoint
-> test the selected epoch -> results.json (written last, atomically)."""

# The paper's downstream protocol (docs/protocol.md §1); flags left unset take these.
PAPER_DEFAULTS = {
    "st": {"lr": 0.001, "batch_size": 64, "epochs": 150, "milestones": [50, 100], "schedule": "step",
           "weight_decay": 5e-4},
    "at": {"lr": 0.1, "batch_size": 128, "epochs": 100, "milestones": [50, 75], "schedule": "step",
           "weight_decay": 5e-4},
}
PAPER_DEFAULTS["fat"] = dict(PAPER_DEFAULTS["at"])
SVHN_ADVERSARIAL = {"lr": 0.01, "epochs": 80, "schedule": "cosine", "milestones": []}
# --linear-eval: Salman et al. 2020's fixed-feature transfer (a linear head on frozen features, the
# protocol the companion paper's linear evaluation follows; docs/companion.md): SGD momentum 0.9,
# batch 64, weight decay 5e-4, 150 epochs, lr ×0.1 every 50; lr 0.01, the larger of their grid
# {0.01, 0.001}, as a freshly initialised head gains little at 0.001 under the step decay
LINEAR_EVAL_DEFAULTS = {"lr": 0.01, "batch_size": 64, "epochs": 150, "milestones": [50, 100], "schedule": "step",
                        "weight_decay": 5e-4}
# First validated epoch (the seed code's scripts; docs/contracts.md §4: "45 for CIFAR AT, 0 otherwise"):
# CIFAR PGD-adversarial runs select among epochs >= 45; SVHN AT, FAT (which the seed code did not
# have) and every standard run from epoch 0.
EVAL_FROM_ADVERSARIAL = {"cifar10": 45, "cifar100": 45}
# --keep-model: which model files a finished run keeps (the sweep passes "none" unless a grid asks)
KEEP_MODEL = ("best", "none")
MODEL_FILES = ("model_best.pt", "model_best_sa.pt")


def _regime_defaults_text():
    lines = ["defaults per regime (the paper's protocol, docs/protocol.md §1; flags given win):"]
    for regime in ("st", "at", "fat"):
        d = PAPER_DEFAULTS[regime]
        lines.append(f"  {regime}: --lr {d['lr']} --batch-size {d['batch_size']} --epochs {d['epochs']} "
                     f"--milestones {','.join(map(str, d['milestones']))} --weight-decay {d['weight_decay']}"
                     + (" --eval-from 45 on CIFAR, 0 elsewhere" if regime == "at" else " --eval-from 0"))
    s = SVHN_ADVERSARIAL
    lines.append(f"  svhn at/fat: --lr {s['lr']} --epochs {s['epochs']} --schedule cosine --eval-from 0")
    lines.append("  --alpha: eps/4 (at), 1.25 eps (fat); --test-eps: --eps; --test-alpha: test eps / 4")
    d = LINEAR_EVAL_DEFAULTS
    lines.append(f"  --linear-eval (every regime; Salman et al. 2020's fixed-feature transfer): --lr {d['lr']} "
                 f"--batch-size {d['batch_size']} --epochs {d['epochs']} --milestones 50,100 "
                 f"--weight-decay {d['weight_decay']}")
    return "\n".join(lines)


def build_parser():
    # the name is fixed, not taken from sys.argv: the sweep parses a grid's command lines in its own process
    p = ArgumentParser(prog="main_downstream.py", description=DESCRIPTION, epilog=_regime_defaults_text(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    per_regime = "per regime and dataset, listed below"
    add_common_args(p, ("cifar10", "cifar100", "svhn", "folder", "digits"), defaults={
        "lr": per_regime, "weight_decay": per_regime, "batch_size": per_regime,
        "alpha": "eps/4 under --regime at, 1.25 eps under fat",
        "pretrain": "the ticket's own label; a dense run without it is 'unknown', the baseline of no ticket"})
    p.add_argument("--ticket", "--tickets_file", "--mask", dest="ticket", default=None,
                   help="ticket file from stage 1 (or the seed repo); omit or 'none' for the dense baseline "
                        "(default: none)")
    p.add_argument("--regime", choices=["st", "fat", "at"], default="st",
                   help="fine-tuning: st standard, fat fast adversarial (FGSM-RS), at PGD adversarial")
    p.add_argument("--data-rate", "--data_rate", "--data_number", dest="data_rate", type=float, default=1.0,
                   help="fraction of the training split used: 1.0, 0.1, 0.01 (the seed repo called it --data_number)")
    p.add_argument("--subset", choices=["random", "first"], default="random",
                   help="which images a data rate below 1 keeps: 'random' = a class-balanced draw fixed by "
                        "--subset-seed and shared by every training seed; 'first' = the first N images of the "
                        "training split, exactly as the seed code")
    p.add_argument("--subset-seed", "--subset_seed", type=int, default=0,
                   help="seed of the 'random' subset (vary it only to study subset variance on purpose)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default: {per_regime})")
    p.add_argument("--milestones", "--decreasing_lr", "--decreasing-lr", dest="milestones", type=int_list, default=None,
                   help=f"epochs at which the lr is multiplied by 0.1, e.g. 50,75 (default: {per_regime})")
    p.add_argument("--schedule", choices=["step", "cosine"], default=None,
                   help="lr schedule (default: step at --milestones; cosine for SVHN adversarial training)")
    p.add_argument("--val-size", "--val_size", type=int, default=None,
                   help="training images held out for validation (default: the last 5,000 for CIFAR/SVHN; 10%% of "
                        "a training split under 50,000 images, with a note)")
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
    p.add_argument("--eval-from", "--eval_from", type=int, default=None,
                   help="validate (and select) from this epoch on, counted from 0 (default per protocol: 45 for "
                        "CIFAR at, 0 otherwise; a protocol value past the last epoch becomes the last epoch, with a "
                        "note; a given one past it is refused)")
    p.add_argument("--eval-amp", "--eval_amp", choices=["off", "bf16", "fp16"], default="off",
                   help="precision of the reported test SA/RA (default off = fp32; validation uses --amp)")
    p.add_argument("--max-loss", "--max_loss", type=float, default=None,
                   help=f"stop as diverged when the training loss stays above this for {MAX_LOSS_PATIENCE} steps "
                        f"(default {MAX_LOSS_FACTOR} x the loss of a uniform prediction, ln(classes))")
    p.add_argument("--checkpoint-minutes", "--checkpoint_minutes", type=float, default=30.0,
                   help="also checkpoint inside an epoch every this many minutes (0 = only at epoch ends)")
    p.add_argument("--no-fat-guard", dest="fat_guard", action="store_false",
                   help="fat: do not stop on catastrophic overfitting")
    p.add_argument("--random-reinit", action="store_true", default=None,
                   help="the re-initialisation ablation: the ticket's mask on the architecture's freshly initialised "
                        "weights instead of θ_p's (--init only names the ticket's source); its runs are the family "
                        "<method>-reinit in the analysis")
    p.add_argument("--linear-eval", "--linear_eval", action="store_true",
                   help="freeze the backbone (weights and BatchNorm statistics) and train only the head, with "
                        "Salman et al. 2020's fixed-feature defaults (below)")
    add_output_args(p)
    return p


def add_output_args(p):
    """What a run keeps and writes beside results.json."""
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep checkpoint.pt (optimizer state) after results.json is written (default: removed)")
    p.add_argument("--keep-model", choices=KEEP_MODEL, default="best",
                   help="model files kept once results.json is written: best = model_best.pt (and model_best_sa.pt), "
                        "which analysis/robustness.py and loss_landscape.py read; none = remove them. Default: best "
                        "for a direct run; runs launched by script/sweep.py get none unless the grid's [flags] says "
                        "keep_model = \"best\"")
    p.add_argument("--save-trajectory", action="store_true",
                   help="keep the weights of every epoch (for analysis/loss_landscape.py, which centres them on "
                        "model_best.pt, so it needs --keep-model best)")
    p.add_argument("--keep-sa-best", action="store_true",
                   help="adversarial regimes: also test the epoch with the best validation SA")
    p.add_argument("--allow-chance", action="store_true", default=argparse.SUPPRESS,
                   help="write results.json even when the selected model is at chance level (an expected outcome, "
                        "e.g. an extreme random ticket); without it such a run fails with exit status 2")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the per-epoch curves and the final test SA/RA as TensorBoard event files in SAVE_DIR/tb "
                        "(needs `pip install tensorboard`; watch with tensorboard --logdir <dir above the runs>)")


def _regime(*regimes):
    return lambda c: c["regime"] in regimes


def _robust_test(c):
    return c["test_steps"] > 0


# Flags that act on some runs only: dest -> (applies(context), where it applies), the context being
# the run's values of FLAG_CONTEXT; every other flag acts on every run. parse_args refuses a flag
# given without effect; flag_applies answers the same question for a sweep's [flags].
FLAG_CONTEXT = ("regime", "data_rate", "subset", "test_steps", "test_eps", "dataset", "ticket", "init")
TESTS_RA = "applies only with --test-steps above 0 (the robust evaluation)"
FLAG_SCOPE = {
    "subset": (lambda c: c["data_rate"] < 1, "applies only to a --data-rate below 1"),
    "subset_seed": (lambda c: c["data_rate"] < 1 and c["subset"] == "random",
                    "applies only to --subset random at a --data-rate below 1"),
    "train_steps": (_regime("at"), "applies only to --regime at (fat trains with one FGSM step, st without attacks)"),
    "alpha": (_regime("at", "fat"), "applies only to --regime at and fat (the step of the training attack)"),
    "attack_bn": (_regime("at", "fat"), "applies only to --regime at and fat (the training attack)"),
    "keep_sa_best": (_regime("at", "fat"), "applies only to --regime at and fat (st selects by validation SA)"),
    "fat_guard": (_regime("fat"), "applies only to --regime fat"),
    "eps": (lambda c: c["regime"] != "st" or (c["test_eps"] is None and _robust_test(c)),
            "applies to --regime at and fat, and under st only as the radius of the robust evaluation "
            "(without --test-eps, with --test-steps above 0)"),
    "test_eps": (_robust_test, TESTS_RA),
    "test_alpha": (_robust_test, TESTS_RA),
    "workers": (lambda c: c["dataset"] in (None, "folder"),
                "applies only to --dataset folder (the other datasets are held in memory)"),
    "folder_loader": (lambda c: c["dataset"] == "folder", "applies only to --dataset folder"),
    "data": (lambda c: c["dataset"] != "digits", "applies to every --dataset but digits (bundled with scikit-learn)"),
    "random_reinit": (lambda c: str(c["ticket"]).lower() != "none", "applies only with a --ticket (whose mask it keeps)"),
    "reinit_stem": (lambda c: str(c["init"]).lower() != "none" or str(c["ticket"]).lower() != "none",
                    "applies only with θ_p from --init or with a --ticket (whose stem mask it drops)"),
}


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_common_args(args)
    if args.save_trajectory and args.keep_model == "none":
        raise UserError("--save-trajectory keeps weights for analysis/loss_landscape.py, which centres them on "
                        "model_best.pt, but --keep-model none removes it; use --keep-model best (keep_model = "
                        "\"best\" in a grid's [flags]) or drop --save-trajectory.")
    refuse_flags_without_effect(p, argv, FLAG_SCOPE, {k: getattr(args, k) for k in FLAG_CONTEXT})
    tensorboard.require(args.tensorboard)
    return args


def flag_applies(dest, **context):
    """Whether flag ``dest`` (e.g. "train_steps" or "--no-fat-guard") acts on a run described by
    ``context`` (FLAG_CONTEXT's keys, e.g. regime="st", data_rate=0.1), and where it applies: (bool, text)."""
    return flag_applies_in(build_parser, FLAG_SCOPE, FLAG_CONTEXT, dest, context)


def resolve_defaults(args, n_train_full=None):
    """Fill unset flags from the paper's protocol for this regime and dataset. Returns the adaptations
    made to the request (sentences), which the run says and records."""
    notes = []
    eval_from_given = args.eval_from is not None
    defaults = dict(PAPER_DEFAULTS[args.regime])
    if args.dataset == "svhn" and args.regime in ("at", "fat"):
        svhn = dict(SVHN_ADVERSARIAL)
        if args.milestones is not None:  # explicit --milestones mean a step schedule, even on SVHN
            del svhn["schedule"], svhn["milestones"]
        defaults.update(svhn)
    if args.linear_eval:
        defaults.update(LINEAR_EVAL_DEFAULTS)
    if args.schedule == "cosine" and args.milestones:
        raise UserError("--milestones only apply to --schedule step; drop one of the two.")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.alpha, args.test_eps, args.test_alpha = resolve_sizes(args.regime, args.eps, args.alpha, args.test_eps,
                                                                       args.test_alpha)
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
    if args.eval_from is None:
        args.eval_from = EVAL_FROM_ADVERSARIAL.get(args.dataset, 0) if args.regime == "at" else 0
    if args.eval_from < 0:
        raise UserError(f"--eval-from must be 0 or more, not {args.eval_from}.")
    if args.eval_from > args.epochs - 1:
        if eval_from_given:
            raise UserError(f"--eval-from {args.eval_from} is past the last epoch: --epochs {args.epochs} trains "
                            f"epochs 0 to {args.epochs - 1}; choose {args.epochs - 1} or less.")
        notes.append(f"the protocol's first validated epoch, {args.eval_from}, is past the last of --epochs "
                     f"{args.epochs}, so only the last epoch ({args.epochs - 1}) is validated and selected")
    if args.max_loss is not None and not args.max_loss > 0:
        raise UserError(f"--max-loss must be a positive number, not {args.max_loss}.")
    if not args.checkpoint_minutes >= 0:
        raise UserError(f"--checkpoint-minutes must be 0 or more, not {args.checkpoint_minutes}.")
    if args.subset_seed < 0:
        raise UserError(f"--subset-seed must be 0 or more, not {args.subset_seed}.")
    return notes


def first_validated_epoch(args):
    """The epoch selection starts at: --eval-from, or the last epoch when the protocol's is past it."""
    return min(args.eval_from, args.epochs - 1)


def run_config(args, ticket):
    cfg = {k: v for k, v in vars(args).items()}
    cfg["ticket_sparsity"] = None if ticket is None else float(ticket["sparsity"])
    return cfg


# config.json keys read from a run's inputs (its ticket), not set by its command
DERIVED_KEYS = frozenset({"ticket_sparsity"})


def config_for(argv):
    """The config.json a run of ``argv`` records (its DERIVED_KEYS left None), reading no file:
    what script/sweep.py compares an existing run directory with (config_changes)."""
    args = parse_args(argv)
    resolve_defaults(args)
    return json.loads(json.dumps(run_config(args, None)))


def config_changes(old, new, finished=True):
    """(key, old, new) for every setting in which a run directory's config ``old`` is another run than
    ``new`` (a config_for). A finished run is compared on the settings that act on it (FLAG_SCOPE: a
    flag without effect on it cannot make it another run); an unfinished one, which a rerun resumes,
    on every setting, as the directory check of a resume does."""
    diffs = config_differences(old, new, NON_SEMANTIC_KEYS | DERIVED_KEYS)
    if not finished:
        return diffs
    context = {k: new.get(k) for k in FLAG_CONTEXT}
    return [d for d in diffs if d[0] not in FLAG_SCOPE or FLAG_SCOPE[d[0]][0](context)]
