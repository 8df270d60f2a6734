"""Images per second of the two data paths, augmenting CIFAR-sized images up to 224 px.

- tensor: dataset.TensorLoader over a uint8 array held on the device (the GPU under CUDA), one
  batched random-resized-crop + flip per batch;
- cpu: torchvision RandomResizedCrop + RandomHorizontalFlip + ToTensor on PIL images in DataLoader
  workers (dataset.FolderLoader over a torchvision-style dataset wrapping the same array), batches
  then moved to the device.

Each timed CPU block is one whole epoch over the first --batches x --batch-size images: its
persistent workers prefetch ahead, and a pass abandoned midway would leave batches in flight that
the next pass must finish and discard on its own clock (and that compete with the tensor loader
for the CPU meanwhile).  The tensor loader makes each batch only when asked, so stopping it after
--batches batches leaves nothing behind.  Both put batches in channels_last, as the entry points do.

    python benchmarks/bench_loader.py --device cuda --workers 16 --json loader.json
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dataset  # noqa: E402
from benchmarks import _common  # noqa: E402
from utils.checkpoint import atomic_write_json  # noqa: E402
from utils.cli import ArgumentParser, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402


class ArrayImages(torch.utils.data.Dataset):
    """uint8 [N, H, W, 3] images served as PIL images through a transform, like torchvision's CIFAR10."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=_common.positive_int, default=224)
    p.add_argument("--native-size", type=_common.positive_int, default=32, help="side of the stored images")
    p.add_argument("--batch-size", type=_common.positive_int, default=128)
    p.add_argument("--num-images", type=_common.positive_int, default=None,
                   help="images the tensor loader holds (default 50,000 on CUDA, 4,096 on the CPU); "
                        "the CPU loader's epoch is the first --batches x --batch-size of them")
    p.add_argument("--batches", type=_common.positive_int, default=20, help="batches per timed block and path")
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes of the CPU path")
    p.add_argument("--repeats", type=_common.positive_int, default=3, help="alternating [tensor, cpu] rounds")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the record here (default: print only)")
    return p


def take(loader, batches):
    """Pull ``batches`` batches from a fresh pass; returns the number of images.

    Only for loaders that prefetch nothing: see the module docstring."""
    seen = 0
    for i, (_, labels) in enumerate(loader):
        seen += labels.shape[0]
        if i + 1 == batches:
            break
    return seen


def whole_pass(loader):
    """Every batch of one epoch; returns the number of images."""
    return sum(labels.shape[0] for _, labels in loader)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.workers < 0:
        raise UserError(f"--workers {args.workers} must be 0 or more.")
    device = _common.resolve_device(args.device)
    malloc_tuned = device.type == "cpu" and _common.steady_cpu_allocator()
    n = args.num_images or (50_000 if device.type == "cuda" else 4_096)
    if n < args.batch_size * args.batches:
        raise UserError(f"--num-images {n} is fewer than --batches x --batch-size "
                        f"({args.batches * args.batch_size}); raise it or lower --batches.")
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, (n, args.native_size, args.native_size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.int64)
    pass_images = args.batches * args.batch_size

    tensor_loader = dataset.TensorLoader(images, labels, args.batch_size, train=True, image_size=args.image_size,
                                         augment="rrc-flip", device=device, seed=args.seed,
                                         channels_last=True)
    from torchvision import transforms as T

    transform = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor()])
    cpu_set = torch.utils.data.Subset(ArrayImages(images, labels, transform), range(pass_images))
    cpu_loader = dataset.FolderLoader(cpu_set, args.batch_size, train=True, device=device, seed=args.seed,
                                      workers=args.workers, channels_last=True)

    # warm-up: worker start-up, the device copy of the array, kernel selection
    take(tensor_loader, 2)
    whole_pass(cpu_loader)
    tensor_rates, cpu_rates = [], []
    for r in range(args.repeats):
        tensor_loader.set_epoch(r + 1)
        cpu_loader.set_epoch(r + 1)
        sides = [(lambda: take(tensor_loader, args.batches), tensor_rates),
                 (lambda: whole_pass(cpu_loader), cpu_rates)]
        for block, rates in (sides if r % 2 == 0 else sides[::-1]):
            rates.append(_common.timed_rate(block, device))
    tensor, cpu = _common.summary(tensor_rates), _common.summary(cpu_rates)
    record = {
        **_common.stamp(device),
        "image_size": args.image_size, "native_size": args.native_size, "batch_size": args.batch_size,
        "num_images": n, "batches": args.batches, "repeats": args.repeats,
        "tensor_loader": {**tensor, "augment": "rrc-flip", "on": str(device)},
        "cpu_loader": {**cpu, "workers": args.workers, "pass_images": pass_images,
                       "transforms": "RandomResizedCrop+RandomHorizontalFlip+ToTensor (PIL)"},
        **_common.speedups(tensor_rates, cpu_rates),
        "cpu_malloc_tuned": malloc_tuned,
    }
    print(f"{record['device']} | {args.native_size}->{args.image_size} px, batch {args.batch_size}")
    print(f"  tensor loader ({device})   {tensor['images_per_s']:10.1f} img/s")
    print(f"  CPU transforms ({args.workers} workers) {cpu['images_per_s']:10.1f} img/s")
    print(f"  speedup {record['speedup']:.2f}x")
    if args.json is not None:
        atomic_write_json(record, args.json)
    return record


if __name__ == "__main__":
    run_main(main)
