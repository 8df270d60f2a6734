"""Re-evaluate saved downstream models: clean SA, PGD RA, AutoAttack and transfer attacks.

    python analysis/robustness.py RUN_DIRS... --out OUT_DIR [--data DIR] [--max-images N]
        [--autoattack] [--transfer-source PATH [--transfer-arch NAME]]

Each run directory (a --save-dir of main_downstream.py, or a folder above several) holds
config.json and model_best.pt; the model is rebuilt from the config (architecture, stem, image
size, classes) with the normalization it was trained with, and scored on the first --max-images
test images in eval mode.  RA is PGD-``--steps`` (default 20, ℓ∞, the run's ε, α = 2/255, random
start); AutoAttack goes through attacks.autoattack_eval; the transfer attack (the paper's Table
A2) crafts PGD on a separate robust model (--transfer-source, any checkpoint format
models.load_pretrained reads, classifying the same classes) and scores each run on those images.
Every attack is seeded (--seed), so all runs face the same random starts.
Evaluation runs in fp32 by default (on CUDA with TF32 off too, so the numbers are those of full
precision); ``--eval-amp bf16|fp16`` autocasts the forward passes for speed, at the risk of a
weaker attack.  The precision used is recorded in every row (``eval_precision``).
Writes robustness.csv and robustness.md.
"""

import contextlib
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/robustness.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import common  # noqa: E402
from utils import records  # noqa: E402
from utils.checkpoint import atomic_write_text  # noqa: E402
from utils.cli import ArgumentParser  # noqa: E402
from utils.errors import UserError  # noqa: E402

FIELDS = ["run", "dataset", "arch", "pretrain", "method", "sparsity", "regime", "data_rate", "seed", "n_images", "eps",
          "sa", "ra_pgd", "ra_autoattack", "transfer_acc", "transfer_source_acc", "reported_sa", "reported_ra",
          "eval_precision"]
PRECISION_NAMES = {"off": "fp32", "bf16": "bf16", "fp16": "fp16"}


def find_run_dirs(items):
    runs = []
    for item in items:
        p = Path(item)
        if not p.is_dir():
            raise UserError(f"run directory '{p}' does not exist; pass --save-dir folders of main_downstream.py.")
        found = [p] if (p / "model_best.pt").is_file() else sorted(f.parent for f in p.rglob("model_best.pt"))
        if not found:
            raise UserError(f"no model_best.pt in or below '{p}'; pass finished runs of main_downstream.py made with "
                            "--keep-model best (a sweep's runs keep none unless the grid's [flags] say keep_model = "
                            "\"best\").")
        runs.extend(found)
    unique = []
    for r in runs:
        if r.resolve() not in {u.resolve() for u in unique}:
            unique.append(r)
    return unique


def _data_key(config, data_root):
    return (config.get("dataset"), str(data_root if data_root is not None else config.get("data")),
            common.run_image_size(config), str(config.get("classes")), config.get("val_size"))


def load_transfer_source(path, arch, cifar_stem, data, device):
    """The robust source model of the transfer attack, classifying ``data``'s classes."""
    import models
    from utils.checkpoint import safe_load

    raw = safe_load(path)
    own = isinstance(raw, dict) and raw.get("format") == "double-win-model"
    if arch is None:
        if not own:
            raise UserError(f"cannot tell the architecture of --transfer-source '{path}'; pass --transfer-arch "
                            "(e.g. resnet18).")
        arch = raw.get("arch")
    if own:
        cifar_stem = bool(raw.get("cifar_stem"))
    mean = raw.get("input_mean") if own else None
    std = raw.get("input_std") if own else None
    model = models.build_model(arch, data.num_classes, cifar_stem=cifar_stem, mean=mean or data.mean,
                               std=std or data.std)
    models.load_pretrained(model, path, load_head=True)
    return model.to(device).eval()


@contextlib.contextmanager
def eval_precision(amp, device):
    """Autocast for ``--eval-amp``; "off" is true fp32 (TF32 disabled on CUDA while it runs)."""
    import torch

    from training.engine import Precision

    precision = Precision.resolve(amp, device)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if precision.dtype is None:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        with precision.autocast():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _seeded(seed, device):
    import torch

    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def evaluate_run(run_dir, args, device, data_cache, source_cache):
    import pruning_utils as pu

    config = common.read_run_config(run_dir)
    results = {}
    if (run_dir / "results.json").exists():  # a directory in its place is damage, not absence
        results = records.read_results(run_dir / "results.json")
    key = _data_key(config, args.data)
    if key not in data_cache:
        data_cache.clear()  # one dataset in memory at a time
        data = common.build_run_data(config, args.data, batch_size=args.batch_size, device=device)
        data_cache[key] = (data, common.take_images(data.test, args.max_images))
    data, batches = data_cache[key]
    model, mask, _ = common.load_run_model(run_dir, config, data, device)

    eps = args.eps if args.eps is not None else float(config.get("test_eps") or config.get("eps", 8 / 255))
    alpha = args.alpha if args.alpha is not None else float(config.get("test_alpha") or 2 / 255)
    n_images = sum(len(y) for _, y in batches)
    row = {"run": str(run_dir), "dataset": config.get("dataset"), "arch": config.get("arch"),
           "pretrain": results.get("pretrain", config.get("pretrain")),
           "method": results.get("method", "dense" if mask is None else "ticket"),
           "sparsity": round(pu.sparsity(mask), 2) if mask else 0.0,
           "regime": results.get("regime", config.get("regime")), "data_rate": results.get("data_rate", config.get("data_rate")),
           "seed": results.get("seed", config.get("seed")), "n_images": n_images, "eps": round(eps, 6),
           "reported_sa": results.get("sa"), "reported_ra": results.get("ra"),
           "eval_precision": PRECISION_NAMES[args.eval_amp]}
    with eval_precision(args.eval_amp, device):
        _score(row, model, batches, key, data, eps, alpha, args, device, source_cache)
    return row


def _score(row, model, batches, key, data, eps, alpha, args, device, source_cache):
    import attacks

    row["sa"] = round(attacks.attack_accuracy(model, batches), 4)
    _seeded(args.seed, device)
    row["ra_pgd"] = round(attacks.attack_accuracy(
        model, batches, attack_fn=lambda m, x, y: attacks.pgd_attack(m, x, y, eps, alpha, args.steps)), 4)
    if args.autoattack:
        row["ra_autoattack"] = round(attacks.autoattack_eval(
            model, batches, eps, version=args.autoattack_version, attacks=args.autoattack_attacks,
            steps=args.autoattack_steps, seed=args.seed, device=device), 4)
    if args.transfer_source is not None:
        if key not in source_cache:
            source_cache.clear()
            source_cache[key] = load_transfer_source(args.transfer_source, args.transfer_arch,
                                                     args.transfer_cifar_stem, data, device)
        _seeded(args.seed, device)
        accs = attacks.transfer_attack(source_cache[key], {"target": model}, batches, eps, alpha,
                                       args.transfer_steps)
        row["transfer_acc"] = round(accs["target"], 4)
        row["transfer_source_acc"] = round(accs["source"], 4)


def parse_args(argv=None):
    from utils.cli import parse_fraction

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="OUT_DIR")
    p.add_argument("--data", default=None, help="dataset root (default: the run's own --data)")
    p.add_argument("--max-images", type=int, default=1000, help="test images scored per run (0 = all; default 1000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eps", default=None, help="attack radius, e.g. 8/255 (default: the run's --eps)")
    p.add_argument("--alpha", default=None, help="PGD step, e.g. 2/255 (default: the run's test alpha)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps of RA (default 20)")
    p.add_argument("--autoattack", action="store_true", help="also run AutoAttack")
    p.add_argument("--autoattack-version", default="standard", choices=["standard", "plus", "rand"])
    p.add_argument("--autoattack-attacks", default=None,
                   help="comma-separated AutoAttack parts replacing the version's list, e.g. apgd-ce,apgd-t (default: the version's own)")
    p.add_argument("--autoattack-steps", type=int, default=100)
    p.add_argument("--transfer-source", default=None, metavar="PATH",
                   help="robust model crafting the transfer attack (same classes as the runs; default: none, no transfer "
                        "attack)")
    p.add_argument("--transfer-arch", default=None,
                   help="its architecture (default: read from the file, as this project's model files record it)")
    p.add_argument("--transfer-cifar-stem", action="store_true", help="the source uses the 3x3 CIFAR stem")
    p.add_argument("--transfer-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-amp", default="off", choices=sorted(PRECISION_NAMES),
                   help="precision of the evaluation: off = fp32 (default, the reported numbers' precision), "
                        "bf16 or fp16 (CUDA only) autocast for speed")
    args = p.parse_args(argv)
    args.eps = None if args.eps is None else common.check_eps(parse_fraction(args.eps, "--eps"), args.eps)
    args.alpha = None if args.alpha is None else parse_fraction(args.alpha, "--alpha")
    if args.max_images < 0:
        raise UserError(f"--max-images must be 0 (all) or a positive number, not {args.max_images}.")
    args.max_images = args.max_images or None
    if args.batch_size < 1 or args.steps < 0 or args.transfer_steps < 0:
        raise UserError("--batch-size must be at least 1 and --steps / --transfer-steps at least 0.")
    if args.autoattack_attacks is not None:
        args.autoattack_attacks = [a.strip() for a in args.autoattack_attacks.split(",") if a.strip()]
    if args.transfer_source is not None and not Path(args.transfer_source).is_file():
        raise UserError(f"--transfer-source '{args.transfer_source}' does not exist; pass a robust model checkpoint.")
    return args


def main(argv=None):
    args = parse_args(argv)
    from utils.distributed import resolve_device

    device = resolve_device(args.device)
    from training.engine import Precision

    Precision.resolve(args.eval_amp, device)  # fp16 on a CPU is refused before any model is loaded
    runs = find_run_dirs(args.runs)
    data_cache, source_cache, rows = {}, {}, []
    for run_dir in runs:
        print(f"evaluating {run_dir} ...", flush=True)
        rows.append(evaluate_run(run_dir, args, device, data_cache, source_cache))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = common.write_csv(rows, out / "robustness.csv", FIELDS)
    settings = (f"precision {PRECISION_NAMES[args.eval_amp]}; PGD-{args.steps} (seed {args.seed}); AutoAttack: "
                f"{(args.autoattack_version + ' ' + str(args.autoattack_attacks or '')) if args.autoattack else 'not run'}; "
                f"transfer: {args.transfer_source or 'not run'}"
                + (f" (PGD-{args.transfer_steps})" if args.transfer_source else "")
                + f"; images per run: {args.max_images or 'all'}; accuracies in percent.")
    table = common.markdown_table(rows, FIELDS)
    atomic_write_text("# Robustness of saved downstream models\n\n" + table + "\n" + settings + "\n", out / "robustness.md")
    print(table, end="")
    print(settings)
    print(f"wrote {csv_path} and {out / 'robustness.md'}")
    return 0


if __name__ == "__main__":
    from utils.cli import run_main

    sys.exit(run_main(main))
