"""Does bf16 autocast weaken the PGD-20 evaluation? RA of one model under fp32 and under bf16, side by side.

The reported test RA of main_downstream.py is fp32 by default (``--eval-amp`` chooses bf16 for
speed). This benchmark measures what that choice costs and buys on the same model and the same
test images: SA and RA with the attack and the scoring both in fp32, both in bf16, and the
attack crafted in bf16 but scored in fp32 (which isolates a weaker *attack* from noisier
*scoring*), plus the seconds each took. Every variant starts PGD from the same random seed.

    python benchmarks/bench_eval_precision.py --dataset cifar10 --data data --arch resnet50 \\
        --init runs/c10/at/dense/s1/model_best.pt --num-images 2000 --device cuda --json eval_precision.json

``--init`` is a fine-tuned model whose head fits the dataset (a stage-2 ``model_best.pt``), so SA
and RA mean something; ``--ticket`` applies a ticket's masks first. On the CPU it runs too (bf16
autocast exists there), but the question is a GPU one: ResNet-50 at 224 px on an H100/H200.
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import dataset  # noqa: E402
import models  # noqa: E402
import pruning_utils  # noqa: E402
from attacks import evaluation_attack  # noqa: E402
from benchmarks import _common  # noqa: E402
from training.engine import Precision, evaluate  # noqa: E402
from utils.checkpoint import atomic_write_json  # noqa: E402
from utils.cli import ArgumentParser, class_list, fraction, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits", choices=["cifar10", "cifar100", "svhn", "digits", "folder"])
    p.add_argument("--data", default=None, help="dataset root folder (default: none; needed by every dataset but digits)")
    p.add_argument("--classes", type=class_list, default=None, help="only these classes, e.g. 0-4 (default: all)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--cifar-stem", action="store_true")
    p.add_argument("--image-size", type=_common.positive_int, default=None,
                   help="input resolution (default: 224, native for digits)")
    p.add_argument("--init", required=True, help="a fine-tuned model whose head fits the dataset (model_best.pt)")
    p.add_argument("--ticket", default=None, help="apply this ticket's masks before evaluating (default: none)")
    p.add_argument("--num-images", type=_common.positive_int, default=2000, help="test images evaluated")
    p.add_argument("--batch-size", type=_common.positive_int, default=256)
    p.add_argument("--eps", type=fraction, default=8 / 255, help="PGD radius (default: 8/255)")
    p.add_argument("--alpha", type=fraction, default=None, help="PGD step (default eps / 4)")
    p.add_argument("--steps", type=_common.positive_int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write the record here (default: print only)")
    return p


class _FirstImages:
    """The first ``limit`` images of a loader (the test order is fixed, so every variant sees the same)."""

    def __init__(self, loader, limit):
        self.loader, self.limit = loader, limit

    def __iter__(self):
        left = self.limit
        for images, labels in self.loader:
            if left <= 0:
                return
            yield images[:left], labels[:left]
            left -= len(labels)


class _CraftIn:
    """An attack crafted under one precision and scored by ``evaluate`` under another."""

    def __init__(self, spec, precision):
        self.spec, self.precision = spec, precision

    def __call__(self, model, images, labels):
        with self.precision.autocast():
            return self.spec(model, images, labels)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not 0 <= args.eps <= 1:
        raise UserError(f"--eps must lie in [0, 1] (pixel scale), not {args.eps}.")
    device = _common.resolve_device(args.device)
    image_size = args.image_size or {"digits": None}.get(args.dataset, 224)
    data = dataset.build_data(args.dataset, args.data, image_size=image_size, batch_size=args.batch_size,
                              eval_batch_size=args.batch_size, val_size=0, device=device, classes=args.classes,
                              workers=4)
    model = models.build_model(args.arch, data.num_classes, cifar_stem=args.cifar_stem, mean=data.mean, std=data.std)
    models.load_pretrained(model, args.init, load_head=True)
    if args.ticket:
        ticket = pruning_utils.load_ticket(args.ticket)
        pruning_utils.check_mask_fits(model, ticket["masks"])
        pruning_utils.apply_mask(model, ticket["masks"])
    model.to(device).eval()
    alpha = args.alpha if args.alpha is not None else args.eps / 4
    spec = evaluation_attack(args.eps, alpha, args.steps)
    fp32 = Precision(device.type, None)
    bf16 = Precision(device.type, torch.bfloat16)
    images = _FirstImages(data.test, args.num_images)
    variants = {
        "fp32": (spec, fp32),  # the reported default
        "bf16": (spec, bf16),  # --eval-amp bf16: attack and scoring in bf16
        "bf16_attack_fp32_score": (_CraftIn(spec, bf16), fp32),  # is the attack itself weaker?
    }
    rows = {}
    for name, (attack, precision) in variants.items():
        torch.manual_seed(args.seed)  # the same random starts for every variant
        _common.synchronize(device)
        start = time.perf_counter()
        out = evaluate(model, images, device=device, attack=attack, precision=precision, progress=False,
                       desc=name)
        _common.synchronize(device)
        rows[name] = {"sa": out["sa"], "ra": out["ra"], "images": out["n"],
                      "seconds": round(time.perf_counter() - start, 3)}
    record = {**_common.stamp(device), "arch": args.arch, "dataset": args.dataset, "init": args.init,
              "ticket": args.ticket, "eps": args.eps, "alpha": alpha, "steps": args.steps, "results": rows,
              "ra_bf16_minus_fp32": rows["bf16"]["ra"] - rows["fp32"]["ra"],
              "ra_bf16_attack_minus_fp32": rows["bf16_attack_fp32_score"]["ra"] - rows["fp32"]["ra"],
              "speedup_bf16": rows["fp32"]["seconds"] / max(rows["bf16"]["seconds"], 1e-9)}
    print(f"{record['device']}  {args.arch} on {rows['fp32']['images']} {args.dataset} test images, "
          f"PGD-{args.steps} eps {args.eps:.4f}")
    for name, r in rows.items():
        print(f"  {name:24s} SA {r['sa']:6.2f}  RA {r['ra']:6.2f}  {r['seconds']:8.2f} s")
    print(f"  RA(bf16) - RA(fp32) = {record['ra_bf16_minus_fp32']:+.2f} points; attack crafted in bf16, scored in "
          f"fp32: {record['ra_bf16_attack_minus_fp32']:+.2f}; bf16 speed-up {record['speedup_bf16']:.2f}x")
    if args.json:
        atomic_write_json(record, Path(args.json))
    return record


if __name__ == "__main__":
    run_main(main)
    sys.exit(0)
