"""The uint8 path of image folders: DataLoader workers decode each file to uint8, draw its random
resized crop, cut it out, resize it to the training size and mirror it, all at uint8, and stack
the images channels-last; the batch crosses to the device as uint8 (a quarter of float32's
bytes), where it becomes float in one pass.

The resize stays in the worker: a crop's size differs from image to image, so on the device it
would be one interpolation call per image, and torch's antialiased uint8 resize (the kernel
torchvision's tensor ``resize`` uses) takes about a third of the time of the float resize the
device would have to run (0.8 ms against 3 ms for a 300 px crop to 224 px, one CPU core), and it
runs spread over the workers instead of in the training process.

Each training image's draws come from a generator seeded by (epoch seed, place in the epoch) and
are made in the order of the PIL path (crop box, then flip), with the same calls, so both paths
cut the same boxes and mirror the same images; they differ only in the resize's rounding.
"""

import functools
import io
import math
import warnings

import torch

from data_loading.augment import resize_size
from data_loading.folder_common import BadImage, is_image_folder, unwrap_subset
from data_loading.streams import mix_seed

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10


@functools.lru_cache(maxsize=8)
def _log_ratio_bounds(ratio):
    # the bounds as float32 values, as torchvision draws them, so the draws match bit for bit
    bounds = torch.log(torch.tensor(ratio, dtype=torch.float32))
    return float(bounds[0]), float(bounds[1])


def rrc_box(height: int, width: int, generator, scale=RRC_SCALE, ratio=RRC_RATIO):
    """A random resized crop's box (top, left, box height, box width) in a height x width image.

    The distribution of torchvision's ``RandomResizedCrop``: up to RRC_ATTEMPTS draws of an area
    fraction uniform in ``scale`` and an aspect ratio log-uniform in ``ratio``, the first box
    that fits placed uniformly at random; when none fits, the largest centred box whose aspect
    ratio lies within ``ratio``.  Every draw is one float32 (or int64) tensor draw from
    ``generator``, in torchvision's order, so a generator in the state of torch's global one
    gives the box ``RandomResizedCrop.get_params`` gives.
    """
    area = height * width
    low, high = _log_ratio_bounds(tuple(ratio))
    for _ in range(RRC_ATTEMPTS):
        fraction = torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(low, high, generator=generator)).item()
        box_w = int(round(math.sqrt(area * fraction * aspect)))
        box_h = int(round(math.sqrt(area * fraction / aspect)))
        if 0 < box_w <= width and 0 < box_h <= height:
            top = int(torch.randint(0, height - box_h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - box_w + 1, (1,), generator=generator).item())
            return top, left, box_h, box_w
    shape = width / height
    if shape < min(ratio):
        box_w, box_h = width, int(round(width / min(ratio)))
    elif shape > max(ratio):
        box_w, box_h = int(round(height * max(ratio))), height
    else:
        box_w, box_h = width, height
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def read_header(path):
    """(the file's bytes, its PIL image with only the header read).  PIL's decompression-bomb
    check refuses an oversized image here, before anything is decoded (its warning raised as an
    error, as on the PIL path)."""
    from PIL import Image

    with open(path, "rb") as f:
        data = bytearray(f.read())
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return data, Image.open(io.BytesIO(data))


def is_plain_jpeg(image) -> bool:
    """Whether libjpeg decodes the file straight to RGB (CMYK is left to PIL, as the PIL path
    converts it)."""
    return image.format == "JPEG" and image.mode in ("RGB", "L")


def read_rgb_u8(path) -> torch.Tensor:
    """The image at ``path`` as uint8 [3, H, W] RGB, whatever its suffix says.

    Baseline RGB and grayscale JPEGs go through torchvision's libjpeg decoder (grayscale
    replicated to three channels); everything else (CMYK JPEGs, PNGs, ...) and every file that
    decoder refuses through PIL, as the PIL path reads them, so a broken file fails with PIL's
    message.
    """
    data, image = read_header(path)
    if is_plain_jpeg(image):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            with warnings.catch_warnings():
                # torchvision 0.29 announces its decoders' move to TorchCodec on every call
                warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
                return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL decodes it, or names the problem in its own words
    return torch.from_numpy(_rgb_array(image)).permute(2, 0, 1)


def _rgb_array(image):
    import numpy as np

    return np.array(image.convert("RGB"))


def resize_u8(image: torch.Tensor, size) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    return F.resize(image, list(size), antialias=True)


def eval_crop_u8(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to resize_size(size), then the centre size x size crop: the PIL
    path's evaluation transform, at uint8."""
    height, width = image.shape[-2:]
    short = resize_size(size)
    if height <= width:
        new_h, new_w = short, int(short * width / height)
    else:
        new_h, new_w = int(short * height / width), short
    image = resize_u8(image, (new_h, new_w))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image[:, top:top + size, left:left + size]


def train_crop_u8(image: torch.Tensor, size: int, generator):
    """(the random resized crop of ``image`` at size x size, whether to mirror it): the PIL
    path's RandomResizedCrop + RandomHorizontalFlip draws, the crop resized at uint8."""
    top, left, box_h, box_w = rrc_box(image.shape[-2], image.shape[-1], generator)
    flip = bool(torch.rand(1, generator=generator).item() < 0.5)
    return resize_u8(image[:, top:top + box_h, left:left + box_w], (size, size)), flip


class Uint8Items(torch.utils.data.Dataset):
    """The items the uint8 path's DataLoader fetches, by the keys of FolderLoader's plan:
    (uint8 [size, size, 3] image, label).  ``augment`` is the resolved augmentation of training
    ('rrc-flip' or 'none'); evaluation keys (plain positions) always take the centre crop.  A
    file that fails to decode comes back as a :class:`BadImage`.

    Images leave the worker channels-last (HWC), so the batch they are stacked into is already
    in the training's memory format, and mirrored: the resize leaves its output channels-first,
    so the worker copies every image once anyway, and reading it mirrored in that copy costs
    nothing, where a batched flip on the device would be one more pass over the batch (on the CPU
    device, a third of the training process's share of the path).
    """

    def __init__(self, dataset, image_size: int, augment: str):
        root, _ = unwrap_subset(dataset, 0)
        if not is_image_folder(root):
            raise ValueError("the uint8 folder path reads ImageFolder datasets (with .samples) only")
        self.dataset, self.image_size, self.augment = dataset, int(image_size), augment

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        generator = None
        if isinstance(key, tuple):
            key, epoch_seed, place = key
            generator = torch.Generator().manual_seed(mix_seed(epoch_seed, place))
        root, i = unwrap_subset(self.dataset, key)
        path, target = root.samples[i]
        try:
            image = read_rgb_u8(path)
        except Exception as exc:  # PIL's format plugins raise many exception types for a malformed file
            return BadImage.of(path, exc)
        flip = False
        if generator is not None and self.augment == "rrc-flip":
            image, flip = train_crop_u8(image, self.image_size, generator)
        else:
            image = eval_crop_u8(image, self.image_size)
        image = image.permute(1, 2, 0)
        if root.target_transform is not None:
            target = root.target_transform(target)
        return (image.flip(1) if flip else image).contiguous(), target


def finish_batch(images_hwc: torch.Tensor, *, device, dtype, channels_last: bool):
    """A worker's uint8 [B, H, W, 3] batch on ``device`` as float [0, 1] [B, 3, H, W] in ``dtype``
    and the requested memory format: the values ``ToTensor`` gives (x / 255 in float32).  The
    batch arrives channels-last; a contiguous layout is made while the pixels are still uint8."""
    images = images_hwc.to(device, non_blocking=True).permute(0, 3, 1, 2)
    if not channels_last:
        images = images.contiguous()
    return images.to(torch.float32).div_(255).to(dtype)
