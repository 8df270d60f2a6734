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

With ``--folder DIR`` it compares instead the paths of image folders (``--folder-loader``): pil,
torchvision's transforms on PIL images in the workers with float batches, against uint8, decode,
crop, resize and flip at uint8 in the workers with the float conversion on the device, and on a
GPU nvjpeg too (decoded and cropped there), per worker count (``--workers 1 2``), interleaved
round by round.  DIR is an image-folder tree
(``DIR/train/<class>/<image>``); when it does not exist the benchmark first fills it with
synthetic ImageNet-sized JPEGs (500 x 375 px, quality 90).  Each timed block is a whole epoch
over the same ``--batches`` x ``--batch-size`` training images.

    python benchmarks/bench_loader.py --folder /tmp/jpegs --device cpu --batch-size 64 --batches 8 \
        --workers 1 2 --json loader_folder.json
"""

import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dataset  # noqa: E402
from benchmarks import _common  # noqa: E402
from data_loading.folder_nvjpeg import gpu_decode_problem  # noqa: E402
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
    p.add_argument("--folder", type=Path, default=None,
                   help="compare the image-folder paths (pil vs uint8) on this image-folder tree instead "
                        "(DIR/train/<class>/<image>; made with synthetic 500x375 JPEGs when absent; default: none, the "
                        "tensor path)")
    p.add_argument("--image-size", type=_common.positive_int, default=224)
    p.add_argument("--native-size", type=_common.positive_int, default=None,
                   help="side of the stored array images (default 32; not with --folder)")
    p.add_argument("--batch-size", type=_common.positive_int, default=128)
    p.add_argument("--num-images", type=_common.positive_int, default=None,
                   help="images the tensor loader holds (default 50,000 on CUDA, 4,096 on the CPU); "
                        "the CPU loader's epoch is the first --batches x --batch-size of them (not with --folder)")
    p.add_argument("--batches", type=_common.positive_int, default=20, help="batches per timed block and path")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="DataLoader processes of the CPU path (default 4); with --folder, one or more counts, "
                        "each timed (default 1 2)")
    p.add_argument("--repeats", type=_common.positive_int, default=3, help="alternating rounds of the two paths")
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


def compare_array_paths(args, device, malloc_tuned):
    """The tensor loader against torchvision's PIL transforms in workers, on the same array."""
    if len(args.workers) != 1:
        raise UserError(f"--workers takes one count without --folder, not {len(args.workers)}.")
    args.workers = args.workers[0]
    args.native_size = args.native_size or 32
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
    return record


# ---------------------------------------------------------------------------- image folders

SYNTHETIC_SIZE = (500, 375)  # ImageNet's most common training image size
SYNTHETIC_QUALITY = 90
SYNTHETIC_CLASSES = 10
SYNTHETIC_UNIQUE = 512


def synthetic_photo(rng, size=SYNTHETIC_SIZE):
    """A PIL image with a photograph's mix of smooth regions and texture: JPEG files of pure noise
    decode several times slower than photographs, blank ones several times faster."""
    from PIL import Image

    width, height = size
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    fine = Image.fromarray(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)).resize(
        size, Image.BILINEAR)
    pixels = 0.7 * np.asarray(coarse, np.float32) + 0.3 * np.asarray(fine, np.float32)
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_synthetic_folder(root: Path, n: int, seed: int):
    """``n`` JPEGs in ``root/train/<class>/``, written to a sibling folder first and renamed into
    place, so an interrupted run leaves no half-made tree to be mistaken for a finished one.

    At most SYNTHETIC_UNIQUE distinct pictures (making one takes about 50 ms), the rest byte
    copies of them: a copy costs a decoder as much as a new picture, and a GPU node's benchmark
    needs tens of thousands of files within minutes."""
    import io
    import shutil

    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    rng = np.random.default_rng(seed)
    unique = []
    for i in range(n):
        if len(unique) < SYNTHETIC_UNIQUE:
            buffer = io.BytesIO()
            synthetic_photo(rng).save(buffer, "JPEG", quality=SYNTHETIC_QUALITY)
            unique.append(buffer.getvalue())
        folder = staging / "train" / f"class_{i % SYNTHETIC_CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:06d}.JPEG").write_bytes(unique[i % SYNTHETIC_UNIQUE])
    root.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(root)
    print(f"made {n} synthetic {SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]} JPEGs (quality {SYNTHETIC_QUALITY}) "
          f"in {root}")


def folder_training_set(root: Path, n: int, seed: int):
    """A fixed random draw of ``n`` images of ``root/train`` (a Subset of its ImageFolder)."""
    from data_loading.readers import image_folder

    train = image_folder(root / "train", "folder", "training")
    if len(train) < n:
        raise UserError(f"{root / 'train'} holds {len(train)} images, fewer than --batches x --batch-size "
                        f"({n}); lower either or point --folder at a fresh path to make them.")
    picked = np.random.default_rng(seed).permutation(len(train))[:n]
    return torch.utils.data.Subset(train, sorted(picked.tolist()))


def folder_loaders(images, args, device, workers, gpu_decode):
    """The pil and uint8 loaders of the same training images, as the entry points build them, and
    the nvjpeg one when ``gpu_decode``."""
    import copy

    from data_loading.augment import folder_transforms

    pil_root = copy.copy(images.dataset)  # the uint8 path ignores the transform; the pil path needs one
    pil_root.transform = folder_transforms(args.image_size, "rrc-flip")[0]
    pil_images = torch.utils.data.Subset(pil_root, images.indices)
    common = dict(train=True, device=device, seed=args.seed, workers=workers, channels_last=True,
                  image_size=args.image_size)
    loaders = {"pil": dataset.FolderLoader(pil_images, args.batch_size, pipeline="pil", **common)}
    for pipeline in ("uint8", "nvjpeg") if gpu_decode else ("uint8",):
        loaders[pipeline] = dataset.FolderLoader(images, args.batch_size, pipeline=pipeline, augment="rrc-flip",
                                                 **common)
    return loaders


def time_folder_paths(loaders, args, device):
    """Images/s of each path over ``args.repeats`` whole epochs, the two alternating which goes first."""
    for loader in loaders.values():  # warm-up: worker start-up, first decodes, kernel selection
        whole_pass(loader)
    rates = {name: [] for name in loaders}
    for r in range(args.repeats):
        names = list(loaders) if r % 2 == 0 else list(loaders)[::-1]
        for name in names:
            loaders[name].set_epoch(r + 1)
            rates[name].append(_common.timed_rate(functools.partial(whole_pass, loaders[name]), device))
    for loader in loaders.values():
        loader.close()
    return rates


def compare_folder_paths(args, device, malloc_tuned):
    n = args.batches * args.batch_size
    if not args.folder.exists():
        make_synthetic_folder(args.folder, n, args.seed)
    images = folder_training_set(args.folder, n, args.seed)
    print(f"{_common.device_name(device)} | {args.folder}: {n} images -> {args.image_size} px, "
          f"batch {args.batch_size}")
    gpu_problem = gpu_decode_problem(device)
    runs = []
    for workers in args.workers:
        rates = time_folder_paths(folder_loaders(images, args, device, workers, gpu_problem is None), args, device)
        run = {"workers": workers}
        for name, rate in rates.items():
            run[f"folder_{name}_img_s"] = _common.summary(rate)["images_per_s"]
            run[name] = _common.summary(rate)
        runs.append({**run, **_common.speedups(rates["uint8"], rates["pil"])})
        print(f"  {workers} workers: " + " | ".join(f"{name} {run[name]['images_per_s']:8.1f} img/s" for name in rates)
              + f" | uint8/pil {runs[-1]['speedup']:.2f}x (paired {runs[-1]['speedup_paired']:.2f}x)")
    most = max(runs, key=lambda run: run["workers"])
    return {
        **_common.stamp(device),
        "folder": str(args.folder), "pass_images": n, "image_size": args.image_size,
        "batch_size": args.batch_size, "batches": args.batches, "repeats": args.repeats,
        **{key: value for key, value in most.items() if key.endswith("_img_s")},
        "workers": most["workers"], "folder_runs": runs, "gpu_decode": gpu_problem or "timed as nvjpeg",
        "cpu_malloc_tuned": malloc_tuned,
    }


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.workers is not None and min(args.workers) < 0:
        raise UserError(f"--workers {min(args.workers)} must be 0 or more.")
    if args.folder is not None and (args.native_size is not None or args.num_images is not None):
        raise UserError("--native-size and --num-images size the array comparison; drop them with --folder.")
    device = _common.resolve_device(args.device)
    malloc_tuned = device.type == "cpu" and _common.steady_cpu_allocator()
    if args.folder is None:
        args.workers = args.workers or [4]
        record = compare_array_paths(args, device, malloc_tuned)
    else:
        args.workers = args.workers or [1, 2]
        record = compare_folder_paths(args, device, malloc_tuned)
    if args.json is not None:
        atomic_write_json(record, args.json)
    return record


if __name__ == "__main__":
    run_main(main)
