"""The loader of array datasets: the whole uint8 image set held on the training device, each
batch augmented there at once."""

from typing import Optional

import numpy as np
import torch

from data_loading.augment import AUGMENTS, augment_batch, default_pad
from data_loading.batching import (
    check_positive_int,
    check_rank,
    check_start_batch,
    epoch_order,
    epoch_step_sizes,
    eval_spans,
    train_spans,
    train_step_bounds,
)
from data_loading.streams import STREAM_AUGMENT, mix_seed
from utils.errors import UserError


class TensorLoader:
    """Batches of an in-memory uint8 image set, augmented on its device, one batch at a time.

    ``images_u8``: numpy array or tensor, NHWC ([N, H, W, 3], as :func:`load_arrays` gives) or
    NCHW ([N, 3, H, W]); the images are moved to ``device`` once.  ``batch_size`` is per rank.

    Training: every rank iterates the same :func:`train_step_bounds` steps, each step's images
    split across the ranks without padding, so every image is used exactly once per epoch and
    the partial last step is kept.  A rank's batch can therefore be smaller than the others' in
    the last step, or even empty (only when that step holds fewer images than there are ranks);
    the engine weights each rank's loss by its batch size and runs an empty batch as a
    zero-size step.  The order depends on (seed, epoch), the augmentation draws on (seed, epoch,
    rank, batch index), so an epoch replays identically after a resume and
    ``set_epoch(epoch, start_batch=k)`` yields exactly its batches k, k+1, ...  Evaluation
    shards are strided and unpadded, so every image is scored exactly once: reduce sums, not means.
    Yields (float images [B, 3, S, S] in [0, 1] on device, int64 labels on device).
    """

    def __init__(self, images_u8, labels, batch_size, *, train, image_size, augment, device,
                 seed, rank=0, world_size=1, channels_last=False, dtype=torch.float32, pad_mode="zeros"):
        check_positive_int(batch_size, "batch size", "--batch-size")
        check_positive_int(image_size, "image size", "--image-size")
        check_rank(rank, world_size)
        if augment not in AUGMENTS or augment == "auto":
            raise ValueError(f"TensorLoader needs a resolved augmentation, got {augment!r}")
        if pad_mode not in ("zeros", "reflect"):
            raise ValueError(f"pad_mode must be 'zeros' or 'reflect', got {pad_mode!r}")
        self.device = torch.device(device)
        if isinstance(images_u8, np.ndarray):
            images_u8 = torch.from_numpy(np.ascontiguousarray(images_u8))
        images = torch.as_tensor(images_u8)
        if images.dtype != torch.uint8 or images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
            raise ValueError(f"images must be uint8 [N, H, W, 3] or [N, 3, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        images = images.to(self.device)
        if images.shape[3] == 3:
            images = images.permute(0, 3, 1, 2)
        self.images = images.contiguous()
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).to(self.device)
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.images) == 0:
            raise UserError("a data split is empty; lower the validation size or raise the data rate.")
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.image_size = int(image_size)
        self.native_size = int(self.images.shape[-1])
        self.augment = augment if self.train else "none"
        height, width = self.images.shape[-2:]
        if self.augment == "rrc-flip" and self.image_size < max(height, width):
            # A crop can be the whole image, so a smaller output shrinks some crops; 'auto' picks
            # rrc-flip only to upsample, so per-crop antialiasing here would serve no default run.
            raise UserError(f"rrc-flip on {height}x{width} px array images only upsamples, but image size "
                            f"{self.image_size} would shrink large crops without antialiasing; use "
                            f"--image-size {max(height, width)} or more, or --augment pad-crop-flip.")
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.channels_last = channels_last
        self.dtype = dtype
        self.pad_mode = pad_mode
        self.pad = default_pad(self.native_size)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0):
        """Iterate ``epoch`` from its batch ``start_batch`` on (mid-epoch resume); ``len`` stays
        the whole epoch's batch count."""
        self.epoch = int(epoch)
        self.start_batch = check_start_batch(start_batch, len(self))

    @property
    def dataset_size(self) -> int:
        return len(self.images)

    def _plan(self, epoch: int):
        """(order on CPU, this rank's (start, stop) range into it for each batch)."""
        n = len(self.images)
        if self.train:
            return epoch_order(self.seed, epoch, n), train_spans(n, self.batch_size, self.rank, self.world_size)
        return (torch.arange(self.rank, n, self.world_size),
                eval_spans(n, self.batch_size, self.rank, self.world_size))

    def indices(self, epoch: Optional[int] = None) -> torch.Tensor:
        """This rank's image indices (CPU int64) for an epoch, in iteration order."""
        order, spans = self._plan(self.epoch if epoch is None else int(epoch))
        return torch.cat([order[a:b] for a, b in spans] + [order[:0]])

    def __len__(self) -> int:
        n = len(self.images)
        if self.train:
            return len(train_step_bounds(n, self.batch_size, self.world_size)) - 1
        return len(eval_spans(n, self.batch_size, self.rank, self.world_size))

    def step_sizes(self) -> list:
        """The global batch size of each training step (all ranks together), known on every rank."""
        return epoch_step_sizes(len(self.images), self.batch_size, self.world_size)

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        order, spans = self._plan(epoch)
        # one copy per epoch; slicing it on the device then costs no host synchronisation
        order = order.to(self.device)
        for b in range(start, len(spans)):
            lo, hi = spans[b]
            idx = order[lo:hi]
            generator = None
            if self.augment != "none":
                # a generator per batch, not one stream per epoch, so batch b's draws do not depend
                # on the batches before it and a resumed epoch redraws them exactly
                generator = torch.Generator(device=self.device)
                generator.manual_seed(mix_seed(self.seed, epoch, self.rank, b, STREAM_AUGMENT))
            images = augment_batch(self.images.index_select(0, idx), self.augment, self.image_size, generator,
                                   pad=self.pad, pad_mode=self.pad_mode, dtype=self.dtype,
                                   channels_last=self.channels_last)
            yield images, self.labels.index_select(0, idx)
