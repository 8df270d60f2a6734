"""Image transforms: the paper's augmentation choice, batched augmentation of uint8 image tensors
on their device (uint8 NCHW in, float [0, 1] out) and the torchvision transforms of image folders."""

import math

import torch
import torch.nn.functional as F

from data_loading.catalog import FOLDER_DATASETS
from utils.errors import UserError

AUGMENTS = ("auto", "rrc-flip", "pad-crop-flip", "pad-crop", "none")


def resize_size(image_size: int) -> int:
    """The shorter-side size before the eval center crop: 256 for 224, as in the paper."""
    return int(round(image_size * 256 / 224))


def _eval_resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize(round(S*256/224)) + CenterCrop(S), or nothing when the images already are S x S."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    short = resize_size(size)
    if h <= w:
        new_h, new_w = short, int(short * w / h)
    else:
        new_h, new_w = int(short * h / w), short
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def _rrc_boxes(batch: int, height: int, width: int, generator, device,
               scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), attempts: int = 10):
    """torchvision's RandomResizedCrop box sampling, for a whole batch at once.

    Returns float tensors (top, left, box_h, box_w) of integer values.
    """
    area = float(height * width)
    s = torch.empty(batch, attempts, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(batch, attempts, device=device).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    box_w = torch.round(torch.sqrt(area * s * aspect))
    box_h = torch.round(torch.sqrt(area * s / aspect))
    ok = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first_ok = ok.to(torch.int32).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    any_ok = ok.any(dim=1)
    box_w = box_w.gather(1, first_ok).squeeze(1)
    box_h = box_h.gather(1, first_ok).squeeze(1)

    # torchvision's fallback when all attempts fail: the largest centred box within the ratios.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(height * max(ratio))), height
    else:
        fb_w, fb_h = width, height
    box_w = torch.where(any_ok, box_w, torch.full_like(box_w, fb_w))
    box_h = torch.where(any_ok, box_h, torch.full_like(box_h, fb_h))

    u = torch.rand(2, batch, device=device, generator=generator)
    top = torch.minimum(torch.floor(u[0] * (height - box_h + 1)), height - box_h)
    left = torch.minimum(torch.floor(u[1] * (width - box_w + 1)), width - box_w)
    top = torch.where(any_ok, top, torch.full_like(top, (height - fb_h) // 2))
    left = torch.where(any_ok, left, torch.full_like(left, (width - fb_w) // 2))
    return top, left, box_h, box_w


def _crop_resize(x: torch.Tensor, top, left, box_h, box_w, size: int, flip=None) -> torch.Tensor:
    """Crop a box per image, resize it bilinearly to size x size and optionally mirror it.

    One affine grid and one grid_sample for the batch; the mirror is a negated x scale.
    With align_corners=False, pixel k's edges sit at -1 + 2k/W, so a box [left, left + box_w)
    maps to x_in = (box_w / W) * x_out + (2 * left + box_w) / W - 1.  Only for upsampling
    (box no larger than size): bilinear sampling does not antialias a downscale.
    """
    b, c, h, w = x.shape
    top, left = top.to(x.dtype), left.to(x.dtype)
    box_h, box_w = box_h.to(x.dtype), box_w.to(x.dtype)
    sx, sy = box_w / w, box_h / h
    tx = (2 * left + box_w) / w - 1
    ty = (2 * top + box_h) / h - 1
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    # torchvision crops before it resizes, so its interpolation clamps at the box's outer pixel
    # centres (pixel k's centre is at -1 + (2k + 1)/W); border padding alone would clamp at the
    # image's edge and blend in the pixels just outside the box.  A mirror keeps the same box.
    low = torch.stack([(2 * left + 1) / w - 1, (2 * top + 1) / h - 1], dim=-1)
    high = torch.stack([(2 * (left + box_w) - 1) / w - 1, (2 * (top + box_h) - 1) / h - 1], dim=-1)
    grid = torch.maximum(torch.minimum(grid, high[:, None, None, :]), low[:, None, None, :])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _pad_crop(x: torch.Tensor, pad: int, generator, pad_mode: str) -> torch.Tensor:
    """Pad by ``pad`` and take a random same-size crop per image (integer shifts, exact pixels)."""
    b, c, h, w = x.shape
    mode = "constant" if pad_mode == "zeros" else "reflect"
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    shifts = torch.randint(0, 2 * pad + 1, (2, b), device=x.device, generator=generator)
    rows = shifts[0][:, None] + torch.arange(h, device=x.device)
    cols = shifts[1][:, None] + torch.arange(w, device=x.device)
    batch_idx = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: [B, H, W, C].
    out = padded[batch_idx, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def _random_flip(x: torch.Tensor, generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def default_pad(native_size: int) -> int:
    """4 px for 32 px images (the standard CIFAR recipe), scaled down for smaller images."""
    return max(1, int(round(native_size / 8)))


def resolve_augment(augment: str, name: str, image_size: int, native_size) -> str:
    """Turn 'auto' into the paper's choice: RRC+flip when upsampling, else pad-crop(-flip)."""
    if augment not in AUGMENTS:
        raise UserError(f"unknown augmentation '{augment}'; choose one of {', '.join(AUGMENTS)}.")
    if name in FOLDER_DATASETS:
        if augment in ("pad-crop-flip", "pad-crop"):
            raise UserError(f"augmentation '{augment}' is only for array datasets; use rrc-flip or none "
                            f"for '{name}'.")
        return "rrc-flip" if augment == "auto" else augment
    if augment != "auto":
        return augment
    if image_size > native_size:
        return "rrc-flip"
    # Mirrored digits are not digits.
    return "pad-crop" if name == "digits" else "pad-crop-flip"


def augment_batch(x_u8: torch.Tensor, augment: str, size: int, generator, *, pad: int, pad_mode: str,
                  dtype, channels_last: bool) -> torch.Tensor:
    """One batch of uint8 NCHW images as float [0, 1] size x size images, augmented by ``augment``
    (resolved, 'none' for evaluation) with ``generator``'s draws."""
    if len(x_u8) == 0:  # an empty share: only its shape matters (and resampling refuses 0 images)
        x = torch.zeros((0, x_u8.shape[1], size, size), device=x_u8.device)
    elif augment == "rrc-flip":
        x = x_u8.to(torch.float32).div_(255)
        top, left, box_h, box_w = _rrc_boxes(x.shape[0], x.shape[2], x.shape[3], generator, x.device)
        flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
        x = _crop_resize(x, top, left, box_h, box_w, size, flip)
    elif augment in ("pad-crop-flip", "pad-crop"):
        x_u8 = _pad_crop(x_u8, pad, generator, pad_mode)
        if augment == "pad-crop-flip":
            x_u8 = _random_flip(x_u8, generator)
        x = x_u8.to(torch.float32).div_(255)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    else:
        x = _eval_resize_crop(x_u8.to(torch.float32).div_(255), size)
    x = x.clamp_(0, 1).to(dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)


def folder_transforms(image_size: int, augment: str):
    from torchvision import transforms as T

    evaluation = T.Compose([T.Resize(resize_size(image_size)), T.CenterCrop(image_size), T.ToTensor()])
    if augment == "rrc-flip":
        train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor()])
    else:
        train = evaluation
    return train, evaluation
