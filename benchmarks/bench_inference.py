"""Inference speed of tickets: dense vs unstructured-masked vs channel-exported vs 2:4 semi-structured.

Every variant is the same ResNet (random weights: speed does not depend on their values) in eval
mode under ``torch.inference_mode``: ``dense``; ``unstructured_S`` (global magnitude mask at S%,
zeros held in dense tensors, i.e. what stage 2 produces); ``channel_S`` (a channel ticket removing
S% of the block-internal filters, exported to a smaller dense ResNet by
``pruning_utils.export_channel_model``); and on a GPU of compute capability >= 8.0 ``nm_2:4``
(``pruning_utils.to_semi_structured``: im2col + cuSPARSELt/CUTLASS sparse GEMMs) with its masked
dense twin ``nm_2:4_masked``.  Variants are timed in alternation, the order rotating every round, so
a burst of load on a shared machine hits them alike; medians and per-round ratios to dense are
reported.

    python benchmarks/bench_inference.py --arch resnet18 --image-size 224 --device cpu --threads 1 \\
        --json inference_cpu.json
"""

import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import models  # noqa: E402
import pruning_utils as pu  # noqa: E402
from benchmarks import _common  # noqa: E402
from benchmarks.bench_step import FlopCountUnavailable, flop_counter  # noqa: E402
from utils.checkpoint import atomic_write_json  # noqa: E402
from utils.cli import ArgumentParser, int_list, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402

GPU_BATCH, CPU_BATCH = 256, 16


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 stem for native 32 px inputs")
    p.add_argument("--num-classes", type=_common.positive_int, default=1000)
    p.add_argument("--image-size", type=_common.positive_int, default=224)
    p.add_argument("--batch-size", type=_common.positive_int, default=None,
                   help=f"throughput batch (default {GPU_BATCH} on a GPU, {CPU_BATCH} on the CPU, where {GPU_BATCH} "
                        "images of 224 px take minutes per pass)")
    p.add_argument("--channel-sparsities", type=int_list, default=[50, 70, 90],
                   help="percent of block-internal filters removed, one exported variant each")
    p.add_argument("--unstructured-sparsities", type=int_list, default=[90],
                   help="percent of conv weights masked (global magnitude), one variant each")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=_common.positive_int, default=None, help="CPU threads (torch.set_num_threads; default: PyTorch's own)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="auto = fp16 on CUDA (the 2:4 kernels' type, used by every variant alike), fp32 on the CPU")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=True,
                   help="NHWC inputs and weights (default on, as in the entry points)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--latency-iters", type=_common.positive_int, default=10, help="batch-1 passes per timed block")
    p.add_argument("--throughput-iters", type=_common.positive_int, default=2, help="full-batch passes per timed block")
    p.add_argument("--warmup", type=_common.positive_int, default=2, help="untimed passes of each kind per variant")
    p.add_argument("--repeats", type=_common.positive_int, default=5, help="rounds over all variants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the record here (default: print only)")
    return p


def resolve_dtype(text, device):
    if text == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[text]


def count_flops(model, x):
    """FLOPs of one forward pass as the kernels run it (dense kernels count masked zeros too)."""
    try:
        with torch.inference_mode(), flop_counter() as counter:
            model(x)
        return counter.get_total_flops()
    except (FlopCountUnavailable, RuntimeError, NotImplementedError) as exc:
        print(f"note: FLOPs not counted for one variant ({str(exc).splitlines()[0][:120]})", file=sys.stderr)
        return None


def build_variants(args, device, dtype):
    """[(name, model, info)] in eval mode on ``device``."""
    torch.manual_seed(args.seed)
    dense = models.build_model(args.arch, args.num_classes, cifar_stem=args.cifar_stem).eval()
    full = pu.full_mask(dense)
    conv_total = sum(m.numel() for m in full.values())
    variants = [("dense", dense, {"conv_weights_kept": conv_total})]
    for s in args.unstructured_sparsities:
        model = copy.deepcopy(dense)
        mask = pu.prune_to_sparsity(dense.state_dict(), float(s), base_mask=full)
        pu.apply_mask(model, mask)
        variants.append((f"unstructured_{s}", model, {"sparsity": pu.sparsity(mask),
                                                      "conv_weights_kept": sum(int(m.sum()) for m in mask.values())}))
    for s in args.channel_sparsities:
        if not 0 <= s < 100:
            raise UserError(f"--channel-sparsities {s} is not a percentage in [0, 100).")
        mask = pu.channel_prune(dense.state_dict(), full, s / 100.0)
        masked = copy.deepcopy(dense)
        pu.apply_mask(masked, mask, pattern="channel")
        small, _ = pu.export_channel_model(masked, mask)
        variants.append((f"channel_{s}", small.eval(), {"filter_sparsity": pu.filter_sparsity(mask),
                                                        "sparsity": pu.sparsity(mask),
                                                        "conv_weights_kept": sum(int(m.sum()) for m in mask.values())}))
    if device.type == "cuda":
        try:
            pu.check_semi_structured_support(device)
        except UserError as exc:
            print(f"note: no 2:4 rows: {exc}", file=sys.stderr)
        else:
            mask = pu.nm_prune(dense.state_dict(), full, 2, 4)
            masked = copy.deepcopy(dense)
            pu.apply_mask(masked, mask)
            info = {"sparsity": pu.sparsity(mask), "conv_weights_kept": sum(int(m.sum()) for m in mask.values())}
            sparse = copy.deepcopy(masked).to(device, dtype)
            converted, kept_dense = pu.to_semi_structured(sparse, mask)
            variants.append(("nm_2:4_masked", masked, dict(info)))
            variants.append(("nm_2:4", sparse, dict(info, semi_structured_convs=len(converted),
                                                   dense_convs=kept_dense)))
    out = []
    for name, model, info in variants:
        # the semi-structured copy is already on the device in its dtype, and its sparse weights
        # implement matmuls only, not the copies .to() would make
        if name != "nm_2:4":
            model = model.to(device, dtype)
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
        info["params"] = sum(p.numel() for p in model.parameters())
        out.append((name, model.eval(), info))
    return out


def timed(model, x, iters, device):
    """Seconds per pass over ``iters`` passes."""
    with torch.inference_mode():
        _common.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        _common.synchronize(device)
    return (time.perf_counter() - start) / iters


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = _common.resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu" and dtype != torch.float32:
        raise UserError("--dtype fp16/bf16 on the CPU measures emulation, not the tickets; use fp32 there.")
    malloc_tuned = _common.steady_cpu_allocator() if device.type == "cpu" else None
    batch = args.batch_size or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)
    variants = build_variants(args, device, dtype)
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(args.seed)
    one = torch.rand(1, 3, args.image_size, args.image_size, generator=g).to(device, dtype)
    many = torch.rand(batch, 3, args.image_size, args.image_size, generator=g).to(device, dtype)
    one, many = one.contiguous(memory_format=memory), many.contiguous(memory_format=memory)

    for _, model, info in variants:
        info["flops_per_image"] = count_flops(model, one)
        for _ in range(args.warmup):
            timed(model, one, 1, device)
        timed(model, many, 1, device)
    latency = {name: [] for name, _, _ in variants}
    throughput = {name: [] for name, _, _ in variants}
    for r in range(args.repeats):
        shift = r % len(variants)
        for name, model, _ in variants[shift:] + variants[:shift]:
            latency[name].append(1000 * timed(model, one, args.latency_iters, device))
            throughput[name].append(batch / timed(model, many, args.throughput_iters, device))

    rows = []
    for name, _, info in variants:
        lat, thr = latency[name], throughput[name]
        rows.append({"variant": name, **info,
                     "latency_ms": statistics.median(lat), "latency_runs": [round(v, 3) for v in lat],
                     "throughput_images_per_s": statistics.median(thr), "throughput_runs": [round(v, 2) for v in thr],
                     # per-round ratios to dense, then their median: robust to bursts of load
                     "latency_speedup_paired": statistics.median(d / v for d, v in zip(latency["dense"], lat)),
                     "throughput_speedup_paired": statistics.median(v / d for d, v in zip(throughput["dense"], thr))})
    record = {**_common.stamp(device), "arch": args.arch, "cifar_stem": args.cifar_stem, "image_size": args.image_size,
              "num_classes": args.num_classes, "dtype": str(dtype).replace("torch.", ""),
              "channels_last": args.channels_last, "throughput_batch": batch, "latency_batch": 1,
              "threads": torch.get_num_threads() if device.type == "cpu" else None, "cpu_malloc_tuned": malloc_tuned,
              "repeats": args.repeats, "latency_iters": args.latency_iters,
              "throughput_iters": args.throughput_iters, "rows": rows}
    report(record)
    if args.json is not None:
        atomic_write_json(record, args.json)
    return 0


def report(rec):
    print(f"{rec['device']} | {rec['arch']} {rec['image_size']}px {rec['dtype']} | latency batch 1, "
          f"throughput batch {rec['throughput_batch']} | {rec['repeats']} rounds")
    print(f"{'variant':<18}{'params':>12}{'GFLOPs/img':>12}{'latency ms':>12}{'x dense':>9}{'img/s':>10}{'x dense':>9}")
    for row in rec["rows"]:
        flops = "n/a" if row["flops_per_image"] is None else f"{row['flops_per_image'] / 1e9:.3f}"
        print(f"{row['variant']:<18}{row['params']:>12,}{flops:>12}{row['latency_ms']:>12.2f}"
              f"{row['latency_speedup_paired']:>9.2f}{row['throughput_images_per_s']:>10.1f}"
              f"{row['throughput_speedup_paired']:>9.2f}")


if __name__ == "__main__":
    run_main(main)
