"""Time one training step (ST, FAT or PGD AT) and PGD-20 evaluation: our engine vs a seed-style reference.

The engine side runs the real pieces (models.build_model, masks applied in place with a
MaskEnforcer, Precision, channels_last, make_sgd, training_attack, train_epoch / evaluate,
optionally torch.compile).  The reference is written here the way the seed code trained: fp32
eager, torch.nn.utils.prune forward hooks that recompute every masked weight on every pass, an
advertorch-style PGD loop (delta.requires_grad, loss.backward() onto the input, sign step, clamp)
with parameter gradients switched off and BatchNorm left in train mode, non-foreach SGD, and a
loss/accuracy read back to the host every step.  Both run in one process on the same synthetic
batches, alternating block by block after a warm-up; the medians are reported.

    python benchmarks/bench_step.py --arch resnet50 --image-size 224 --batch-size 128 \\
        --sparsity 89.26 --regime at --device cuda --json step_at.json
"""

import contextlib
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import models  # noqa: E402
import pruning_utils  # noqa: E402
from attacks import REGIMES, evaluation_attack, training_attack  # noqa: E402
from benchmarks import _common  # noqa: E402
from training.engine import Precision, evaluate, make_sgd, train_epoch  # noqa: E402
from utils.checkpoint import atomic_write_json  # noqa: E402
from utils.cli import ArgumentParser, fraction, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; matched in order as
# substrings of torch.cuda.get_device_name, so each lower-clocked variant (NVL, PCIe) must come
# before the bare name it contains, which stands for the SXM part.
PEAK_BF16_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                    ("H100", 989.0), ("A100", 312.0))

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 stem for native 32 px inputs")
    p.add_argument("--num-classes", type=_common.positive_int, default=10)
    p.add_argument("--image-size", type=_common.positive_int, default=224)
    p.add_argument("--batch-size", type=_common.positive_int, default=128)
    p.add_argument("--sparsity", type=float, default=89.26, help="percent of conv weights pruned (magnitude)")
    p.add_argument("--regime", choices=REGIMES, default="at")
    p.add_argument("--attack-steps", type=_common.positive_int, default=10, help="PGD steps of the AT regime")
    p.add_argument("--eval-steps", type=_common.positive_int, default=20, help="PGD steps of the evaluation")
    p.add_argument("--eps", type=fraction, default=8 / 255)
    p.add_argument("--alpha", type=fraction, default=2 / 255)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="engine precision; auto = bf16 on CUDA, fp32 on the CPU (the reference is always fp32)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=True,
                   help="engine memory format NHWC (default on, as in the entry points)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", help="run the engine's model through torch.compile")
    p.add_argument("--iters", type=_common.positive_int, default=10, help="training steps per timed block")
    p.add_argument("--eval-batches", type=_common.positive_int, default=4, help="batches per timed evaluation block")
    p.add_argument("--warmup", type=_common.positive_int, default=2, help="untimed steps (and batches) per side first")
    p.add_argument("--repeats", type=_common.positive_int, default=5, help="alternating [engine, reference] rounds")
    p.add_argument("--skip-eval", action="store_true", help="time only the training step")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s for the MFU (default: bf16 peak of a known GPU; none on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the record here (default: print only)")
    return p


# --------------------------------------------------------------------------- the seed-style reference

def add_prune_hooks(model, mask):
    """torch.nn.utils.prune reparametrisation, as the seed's ``prune_model_custom`` set it up."""
    from torch.nn.utils import prune

    for name, module in model.named_modules():
        key = f"{name}.weight"
        if isinstance(module, nn.Conv2d) and key in mask:
            prune.custom_from_mask(module, "weight", mask[key].to(module.weight.device))
    return model


@contextlib.contextmanager
def no_param_grad(model):
    """advertorch's ``ctx_noparamgrad``: parameters stop requiring gradients during the attack."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def seed_pgd(model, x, y, eps, alpha, steps):
    """advertorch ``LinfPGDAttack.perturb`` (rand_init, summed cross-entropy), in the model's current mode."""
    with no_param_grad(model), torch.enable_grad():
        delta = torch.zeros_like(x).uniform_(-eps, eps)
        delta = (x + delta).clamp(0.0, 1.0) - x
        delta.requires_grad_(True)
        for _ in range(steps):
            loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            loss.backward()
            with torch.no_grad():
                stepped = (delta + alpha * delta.grad.sign()).clamp(-eps, eps)
                delta.copy_((x + stepped).clamp(0.0, 1.0) - x)
            delta.grad.zero_()
        return (x + delta).clamp(0.0, 1.0).detach()


class SeedReference:
    """The seed code's training and evaluation loops over a model carrying prune hooks."""

    def __init__(self, model, mask, regime, eps, alpha, attack_steps, eval_steps):
        self.model = add_prune_hooks(model, mask)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM,
                                         weight_decay=WEIGHT_DECAY, foreach=False)
        self.train_steps = {"st": 0, "fat": 1, "at": attack_steps}[regime]
        self.eps, self.alpha, self.eval_steps = eps, alpha, eval_steps

    def train(self, batches):
        self.model.train()
        seen = loss_sum = correct = 0
        for x, y in batches:
            if self.train_steps:
                x = seed_pgd(self.model, x, y, self.eps, self.alpha, self.train_steps)
            out = self.model(x)
            loss = F.cross_entropy(out, y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            # the seed's AverageMeter read both back every step
            loss_sum += loss.item() * y.shape[0]
            correct += (out.argmax(1) == y).sum().item()
            seen += y.shape[0]
        return seen

    def evaluate(self, batches):
        self.model.eval()
        seen = correct = robust = 0
        for x, y in batches:
            with torch.no_grad():
                correct += (self.model(x).argmax(1) == y).sum().item()
            adv = seed_pgd(self.model, x, y, self.eps, self.alpha, self.eval_steps)
            with torch.no_grad():
                robust += (self.model(adv).argmax(1) == y).sum().item()
            seen += y.shape[0]
        return seen


# --------------------------------------------------------------------------- our engine

class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker: only the total is needed here, and the
    tracker's backward hooks reject torch.autograd.grad on a leaf input, which the attacks use."""
    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FlopCountUnavailable(RuntimeError):
    """This PyTorch's FlopCounterMode no longer has the internals the stand-in replaces."""


def flop_counter():
    counter = FlopCounterMode(display=False)
    if not hasattr(getattr(counter, "mod_tracker", None), "parents"):
        raise FlopCountUnavailable(f"torch {torch.__version__}'s FlopCounterMode has no mod_tracker.parents "
                                   "to replace")
    counter.mod_tracker = _GlobalOnly()
    return counter


class Engine:
    """The engine as main_downstream drives it, minus data loading and checkpoints."""

    def __init__(self, model, mask, args, device):
        self.device = device
        self.precision = Precision.resolve(args.amp, device)
        self.channels_last = bool(args.channels_last)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.mask = mask
        self.runner = torch.compile(model) if args.compile else model
        self.optimizer = make_sgd(model.parameters(), LR, MOMENTUM, WEIGHT_DECAY, device)
        self.scaler = self.precision.make_scaler()
        self.enforcer = pruning_utils.MaskEnforcer(model, mask)
        self.attack = training_attack(args.regime, args.eps, args.alpha, args.attack_steps, "train")
        self.eval_attack = evaluation_attack(args.eps, args.alpha, args.eval_steps)

    def layout(self, batches):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return [(x.contiguous(memory_format=fmt), y) for x, y in batches]

    def train(self, batches, model=None, optimizer=None, enforcer=None):
        runner = self.runner if model is None else model
        stats = train_epoch(runner, batches, optimizer or self.optimizer, device=self.device, attack=self.attack,
                            attack_model=runner, enforcer=enforcer or self.enforcer, precision=self.precision,
                            scaler=self.scaler, channels_last=self.channels_last, progress=False,
                            max_steps=len(batches))
        return stats["images"]

    def evaluate(self, batches, model=None, clean=False):
        out = evaluate(self.runner if model is None else model, batches, device=self.device,
                       attack=None if clean else self.eval_attack, precision=self.precision,
                       channels_last=self.channels_last, progress=False)
        return out["n"]

    def count_flops(self, batch):
        """FLOPs of one training step (attack passes included) and of one evaluation batch.

        Counted on an uncompiled copy, so the benchmarked model and optimizer stay untouched."""
        model = copy.deepcopy(self.model)
        optimizer = make_sgd(model.parameters(), LR, MOMENTUM, WEIGHT_DECAY, self.device)
        enforcer = pruning_utils.MaskEnforcer(model, self.mask)
        try:
            with flop_counter() as counter:
                self.train([batch], model=model, optimizer=optimizer, enforcer=enforcer)
            train_flops = counter.get_total_flops()
            with flop_counter() as counter:
                self.evaluate([batch], model=model)
        except AttributeError as exc:
            # a later PyTorch asking the stand-in for more than it provides; any other missing
            # attribute is a real bug and propagates
            if not isinstance(exc.obj, _GlobalOnly):
                raise
            raise FlopCountUnavailable(f"torch {torch.__version__}'s FlopCounterMode needs "
                                       f"mod_tracker.{exc.name}, which the stand-in lacks") from None
        return train_flops, counter.get_total_flops()

    def pruned_weights_zero(self):
        params = dict(self.model.named_parameters())
        return all(bool((params[n].detach()[~m.to(params[n].device)] == 0).all()) for n, m in self.mask.items())


# --------------------------------------------------------------------------- the benchmark

def peak_tflops(args, device):
    if args.peak_tflops is not None:
        if not args.peak_tflops > 0:
            raise UserError(f"--peak-tflops {args.peak_tflops} must be a positive number of TFLOP/s.")
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    print(f"note: no peak TFLOP/s known for '{name}'; pass --peak-tflops to get an MFU.", file=sys.stderr)
    return None


def make_batches(count, batch_size, image_size, num_classes, device, generator):
    """``count`` list entries cycling over at most four distinct random batches (inputs in [0, 1])."""
    pool = [(torch.rand(batch_size, 3, image_size, image_size, generator=generator).to(device),
             torch.randint(0, num_classes, (batch_size,), generator=generator).to(device))
            for _ in range(min(count, 4))]
    return [pool[i % len(pool)] for i in range(count)]


def alternate(engine_fn, reference_fn, repeats, device):
    """Median images/s of each side over ``repeats`` rounds; the order flips every round."""
    engine_rates, reference_rates = [], []
    for r in range(repeats):
        sides = [(engine_fn, engine_rates), (reference_fn, reference_rates)]
        for fn, rates in (sides if r % 2 == 0 else sides[::-1]):
            rates.append(_common.timed_rate(fn, device))
    return (_common.summary(engine_rates), _common.summary(reference_rates),
            _common.speedups(engine_rates, reference_rates))


def _sgd_kind(optimizer):
    defaults = optimizer.defaults
    return "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "for-loop"


def _mfu(flops_per_image, rate, peak):
    return None if peak is None or flops_per_image is None else flops_per_image * rate / (peak * 1e12)


def _per_image(flops, batch_size):
    return None if flops is None else flops / batch_size


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.sparsity < 100.0:
        raise UserError(f"--sparsity {args.sparsity} must be a percentage in [0, 100), e.g. 89.26.")
    device = _common.resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    malloc_tuned = device.type == "cpu" and _common.steady_cpu_allocator()
    peak = peak_tflops(args, device)
    torch.manual_seed(args.seed)

    base = models.build_model(args.arch, args.num_classes, cifar_stem=args.cifar_stem).to(device)
    mask = pruning_utils.prune_to_sparsity(base.state_dict(), args.sparsity)
    pruning_utils.apply_mask(base, mask)
    reference = SeedReference(copy.deepcopy(base), mask, args.regime, args.eps, args.alpha,
                              args.attack_steps, args.eval_steps)
    engine = Engine(base, mask, args, device)

    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, args.image_size, args.num_classes, device, gen)
    ref_train = make_batches(args.iters, *shape)
    eng_train = engine.layout(ref_train)
    ref_warm = make_batches(args.warmup, *shape)
    eng_warm = engine.layout(ref_warm)
    try:
        train_flops, eval_flops = engine.count_flops(eng_train[0])
    except FlopCountUnavailable as exc:
        print(f"note: {exc}; FLOPs and MFU are left out (null) until _GlobalOnly in "
              f"benchmarks/bench_step.py is updated for this PyTorch.", file=sys.stderr)
        train_flops = eval_flops = None

    engine.train(eng_warm)
    reference.train(ref_warm)
    train_engine, train_reference, train_speedups = alternate(lambda: engine.train(eng_train), lambda: reference.train(ref_train),
                                              args.repeats, device)
    train_fpi = _per_image(train_flops, args.batch_size)
    train_engine["mfu"] = _mfu(train_fpi, train_engine["images_per_s"], peak)
    train_reference["mfu"] = _mfu(train_fpi, train_reference["images_per_s"], peak)

    eval_record = clean_record = None
    if not args.skip_eval:
        ref_eval = make_batches(args.eval_batches, *shape)
        eng_eval = engine.layout(ref_eval)
        engine.evaluate(eng_warm)
        reference.evaluate(ref_warm)
        eval_engine, eval_reference, eval_speedups = alternate(lambda: engine.evaluate(eng_eval),
                                                lambda: reference.evaluate(ref_eval), args.repeats, device)
        eval_fpi = _per_image(eval_flops, args.batch_size)
        eval_engine["mfu"] = _mfu(eval_fpi, eval_engine["images_per_s"], peak)
        eval_reference["mfu"] = _mfu(eval_fpi, eval_reference["images_per_s"], peak)
        eval_record = {"steps": args.eval_steps, "engine": eval_engine, "reference": eval_reference,
                       **eval_speedups, "mfu": eval_engine["mfu"], "flops_per_image": eval_fpi}
        # a standard run validates on clean images only: study/cost.py prices that part at this rate
        clean_record = {"engine": _common.summary([_common.timed_rate(lambda: engine.evaluate(eng_eval, clean=True),
                                                                      device) for _ in range(args.repeats)])}

    record = {
        **_common.stamp(device),
        "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size, "regime": args.regime,
        "engine": train_engine, "reference": train_reference,
        **train_speedups, "mfu": train_engine["mfu"],
        "eval_pgd20": eval_record, "eval_clean": clean_record,
        "sparsity": pruning_utils.sparsity(mask), "cifar_stem": args.cifar_stem, "num_classes": args.num_classes,
        "attack_steps": {"st": 0, "fat": 1, "at": args.attack_steps}[args.regime],
        "train_flops_per_image": train_fpi, "peak_tflops": peak,
        "engine_config": {"precision": str(engine.precision.dtype or torch.float32).replace("torch.", ""),
                          "channels_last": engine.channels_last, "compile": args.compile,
                          "sgd": _sgd_kind(engine.optimizer)},
        "iters": args.iters, "eval_batches": args.eval_batches, "warmup": args.warmup, "repeats": args.repeats,
        "engine_pruned_weights_zero": engine.pruned_weights_zero(), "cpu_malloc_tuned": malloc_tuned,
    }
    _report(record)
    if args.json is not None:
        atomic_write_json(record, args.json)
    return record


def _report(rec):
    def line(what, part):
        mfu = "" if part.get("mfu") is None else f", MFU {100 * part['mfu']:.1f}%"
        return f"  {what:<10} {part['images_per_s']:10.1f} img/s{mfu}"

    print(f"{rec['device']} | {rec['arch']} {rec['image_size']}px batch {rec['batch_size']} "
          f"sparsity {rec['sparsity']:.2f}% | engine {json.dumps(rec['engine_config'])}")
    print(f"train step, regime {rec['regime']} ({rec['attack_steps']} attack steps): "
          f"speedup {rec['speedup']:.2f}x (paired {rec['speedup_paired']:.2f}x, best {rec['speedup_best']:.2f}x)")
    print(line("engine", rec["engine"]))
    print(line("reference", rec["reference"]))
    if rec["eval_pgd20"] is not None:
        ev = rec["eval_pgd20"]
        print(f"evaluation, clean + PGD-{ev['steps']}: speedup {ev['speedup']:.2f}x "
              f"(paired {ev['speedup_paired']:.2f}x, best {ev['speedup_best']:.2f}x)")
        print(line("engine", ev["engine"]))
        print(line("reference", ev["reference"]))
        print("evaluation, clean images only (a standard run's validation):")
        print(line("engine", rec["eval_clean"]["engine"]))


if __name__ == "__main__":
    run_main(main)
