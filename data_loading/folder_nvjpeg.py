"""The GPU-decode variant of the uint8 path (``--folder-loader nvjpeg``): the workers read each
JPEG's bytes and header and draw its crop and flip from the header's size (the draws the uint8
path makes, in the same order); the training process decodes the batch's JPEGs at once on the
GPU (nvJPEG, through torchvision's ``decode_jpeg(device='cuda')``), then crops, resizes (torch's
antialiased resize on the GPU, rounded back to uint8) and mirrors each image there.  Files
libjpeg does not read straight to RGB (grayscale and CMYK JPEGs, PNGs) are decoded and cropped in
the worker as on the uint8 path and join the batch ready-made.  Where the GPU cannot decode (no
CUDA device, a torchvision without nvJPEG), the uint8 path is used after one printed line.
"""

import sys
import warnings
from dataclasses import dataclass

import torch

from data_loading.folder_common import BadImage, unwrap_subset
from data_loading.folder_uint8 import (
    Uint8Items,
    eval_crop_u8,
    is_plain_jpeg,
    read_header,
    read_rgb_u8,
    resize_u8,
    rrc_box,
)
from data_loading.streams import mix_seed


@dataclass
class EncodedJpeg:
    """A JPEG still to decode, with its crop box (None: the evaluation crop) and flip."""

    data: torch.Tensor
    box: tuple | None
    flip: bool
    path: str


def _decode_on(device, data):
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 announces its decoders' move to TorchCodec on every call
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def gpu_decode_problem(device):
    """None when ``device`` decodes JPEGs, else why not (for the one line that says so)."""
    import io

    import numpy as np
    from PIL import Image

    device = torch.device(device)
    if device.type != "cuda":
        return f"the device is {device}, not a CUDA GPU"
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "JPEG")
    try:
        _decode_on(device, [torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)])
    except (RuntimeError, NotImplementedError) as exc:
        return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    return None


def resolve_pipeline(pipeline: str, device, announce: bool) -> str:
    """``pipeline``, or 'uint8' for 'nvjpeg' where the GPU cannot decode (said in one line on
    stderr when ``announce``)."""
    if pipeline != "nvjpeg":
        return pipeline
    problem = gpu_decode_problem(device)
    if problem is None:
        return pipeline
    if announce:
        print(f"--folder-loader nvjpeg: cannot decode on the GPU ({problem}); decoding in the loader "
              "workers on the CPU instead (--folder-loader uint8).", file=sys.stderr, flush=True)
    return "uint8"


class EncodedItems(Uint8Items):
    """The nvjpeg path's items: (EncodedJpeg, label) for plain JPEGs, else as the uint8 path."""

    def __getitem__(self, key):
        generator = None
        if isinstance(key, tuple):
            index, epoch_seed, place = key
            generator = torch.Generator().manual_seed(mix_seed(epoch_seed, place))
        else:
            index = key
        root, i = unwrap_subset(self.dataset, index)
        path, target = root.samples[i]
        try:
            data, image = read_header(path)
        except Exception as exc:  # PIL's format plugins raise many exception types for a malformed file
            return BadImage.of(path, exc)
        if not is_plain_jpeg(image) or image.mode != "RGB":
            return super().__getitem__(key)  # the same draws, from a fresh generator of the same seed
        box, flip = None, False
        if generator is not None and self.augment == "rrc-flip":
            box = rrc_box(image.height, image.width, generator)
            flip = bool(torch.rand(1, generator=generator).item() < 0.5)
        if root.target_transform is not None:
            target = root.target_transform(target)
        return EncodedJpeg(torch.frombuffer(data, dtype=torch.uint8), box, flip, str(path)), target


def collate_encoded(items):
    for item in items:
        if isinstance(item, BadImage):
            return item
    return [image for image, _ in items], torch.tensor([label for _, label in items], dtype=torch.int64)


def _finish_one(image, item: EncodedJpeg, size: int):
    if item.box is None:
        image = eval_crop_u8(image, size)
    else:
        top, left, box_h, box_w = item.box
        image = resize_u8(image[:, top:top + box_h, left:left + box_w], (size, size))
    return (image.flip(-1) if item.flip else image).permute(1, 2, 0)


def assemble_batch(payloads, size: int, device):
    """The batch as uint8 [B, size, size, 3] on ``device``, or the BadImage of a file that fails.

    A batch nvJPEG refuses is decoded again image by image on the CPU, which names the file."""
    out = torch.empty((len(payloads), size, size, 3), dtype=torch.uint8, device=device)
    encoded = [i for i, p in enumerate(payloads) if isinstance(p, EncodedJpeg)]
    for i, p in enumerate(payloads):
        if not isinstance(p, EncodedJpeg):
            out[i] = p.to(device, non_blocking=True)
    try:
        decoded = _decode_on(device, [payloads[i].data for i in encoded]) if encoded else []
    except RuntimeError:
        decoded = []
        for i in encoded:
            try:
                decoded.append(read_rgb_u8(payloads[i].path).to(device))
            except Exception as exc:  # PIL's format plugins raise many exception types
                return BadImage.of(payloads[i].path, exc)
    for i, image in zip(encoded, decoded):
        out[i] = _finish_one(image, payloads[i], size)
    return out
