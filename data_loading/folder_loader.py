"""The loader of image-folder datasets: a DataLoader with the same epoch plan as the tensor
loader, seeded per image so a resumed epoch replays exactly, and the up-front decode check of the
evaluation splits."""

import numbers
import warnings

import torch

from data_loading.batching import (
    check_positive_int,
    check_rank,
    check_start_batch,
    epoch_order,
    epoch_step_sizes,
    eval_spans,
    train_spans,
)
from data_loading.folder_common import BadImage, is_image_folder, unwrap_subset
from data_loading.folder_nvjpeg import EncodedItems, assemble_batch, collate_encoded
from data_loading.folder_uint8 import Uint8Items, finish_batch
from data_loading.streams import STREAM_AUGMENT, mix_seed
from utils.errors import UserError

# how image files become batches: FolderLoader's ``pipeline``, the entry points' --folder-loader
PIPELINES = ("uint8", "pil", "nvjpeg")


def _open_image(path, decode):
    """``decode(path)`` with PIL's decompression-bomb warning raised as an error, so an oversized
    file stops the run instead of being decoded into gigabytes of memory."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return decode(path)


class _FolderItems(torch.utils.data.Dataset):
    """The items FolderLoader's DataLoader fetches, by key.

    A key is a dataset position, or for training (position, epoch seed, place in the epoch): the
    transform's random draws are then seeded per item, so they depend neither on which worker
    decodes the item nor on what it decoded before, and a resumed epoch redraws them exactly.
    An image-folder file that fails to decode comes back as a :class:`BadImage`.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, epoch_seed, place = key
            # the main process's RNG drives training attacks when there are no workers: keep it
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(epoch_seed, place))
                return self._item(index)
        return self._item(key)

    def _item(self, index):
        root, i = unwrap_subset(self.dataset, index)
        if not is_image_folder(root):
            return self.dataset[index]
        path, target = root.samples[i]
        try:
            sample = _open_image(path, root.loader)
        except Exception as exc:  # PIL's format plugins raise many exception types for a malformed file
            return BadImage.of(path, exc)
        if root.transform is not None:
            sample = root.transform(sample)
        if root.target_transform is not None:
            target = root.target_transform(target)
        return sample, target


def _collate_checked(items):
    for item in items:
        if isinstance(item, BadImage):
            return item
    return torch.utils.data.default_collate(items)


class _FolderPlan(torch.utils.data.Sampler):
    """FolderLoader's epoch plan and its DataLoader's batch sampler: the current epoch's batches
    of item keys from the start batch on.  Empty shares are left out (a DataLoader cannot fetch
    an empty batch); FolderLoader yields those itself.  It holds no reference to the loader: a
    loader <-> sampler cycle would leave an abandoned iterator to the cycle collector, whose
    worker shutdown then waits out its join timeouts (10 s seen)."""

    def __init__(self, n, batch_size, train, seed, rank, world_size):
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0

    def spans(self):
        if self.train:
            return train_spans(self.n, self.batch_size, self.rank, self.world_size)
        return eval_spans(self.n, self.batch_size, self.rank, self.world_size)

    def keys(self, epoch: int) -> list:
        """This rank's batches of item keys for ``epoch``, the whole epoch, empty shares included."""
        spans = self.spans()
        if self.train:
            order = epoch_order(self.seed, epoch, self.n).tolist()
            epoch_seed = mix_seed(self.seed, epoch, STREAM_AUGMENT)
            return [[(order[p], epoch_seed, p) for p in range(a, b)] for a, b in spans]
        shard = range(self.rank, self.n, self.world_size)
        return [list(shard[a:b]) for a, b in spans]

    def __iter__(self):
        for keys in self.keys(self.epoch)[self.start_batch:]:
            if keys:
                yield keys

    def __len__(self):
        return sum(1 for a, b in self.spans()[self.start_batch:] if b > a)


class FolderLoader:
    """A DataLoader over an image-folder dataset that behaves like :class:`TensorLoader`.

    The same epoch plan: every rank takes part in the same :func:`train_step_bounds` steps, each
    step's images split across ranks without padding (an empty share comes out as a zero-size
    batch), and evaluation shards strided and unpadded.  The order depends on (seed, epoch), each
    image's augmentation draws on (seed, epoch, its place in the epoch), whatever worker decodes
    it, so ``set_epoch(epoch, start_batch=k)`` resumes an epoch exactly.  A file that fails to
    decode, or exceeds PIL's decompression-bomb limit, raises one UserError naming it.  Batches
    are moved to ``device``.  ``image_size`` (the transforms' output size) shapes empty batches;
    None reads it from the first item.

    ``pipeline``: 'pil' applies the dataset's own transform to PIL images in the workers and
    moves float batches; 'uint8' (:mod:`data_loading.folder_uint8`) ignores that transform,
    crops, resizes and mirrors at uint8 in the workers by ``augment`` ('rrc-flip' or 'none',
    training only) to ``image_size``, which it needs, and converts to float on ``device``;
    'nvjpeg' (:mod:`data_loading.folder_nvjpeg`, a CUDA ``device`` only: see its
    ``resolve_pipeline``) decodes and crops on the GPU instead.  All draw the same boxes and flips.
    """

    def __init__(self, dataset, batch_size, *, train, device, seed, workers=4, rank=0, world_size=1,
                 channels_last=False, dtype=torch.float32, prefetch_factor=4, image_size=None,
                 pipeline="pil", augment="rrc-flip"):
        from torch.utils.data import DataLoader

        check_positive_int(batch_size, "batch size", "--batch-size")
        check_rank(rank, world_size)
        if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 0:
            raise UserError(f"worker count {workers!r} must be 0 or more; fix --workers.")
        if len(dataset) == 0:
            raise UserError("a data split is empty; lower the validation size or raise the data rate.")
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
        self.dataset = dataset
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.train = bool(train)
        self.image_size = image_size
        self.channels_last = channels_last
        self.dtype = dtype
        self.plan = _FolderPlan(len(dataset), int(batch_size), self.train, int(seed), int(rank), int(world_size))
        kwargs = dict(batch_sampler=self.plan, num_workers=int(workers),
                      pin_memory=self.device.type == "cuda", collate_fn=_collate_checked)
        if workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor)
        # its own generator: every new iterator draws a base seed, and drawing it from the global RNG
        # (which the training attacks use) would make a resumed run, which makes one iterator more,
        # differ from an uninterrupted one; items are seeded per position, so the base seed is unused
        kwargs["generator"] = torch.Generator()
        if pipeline == "pil":
            items = _FolderItems(dataset)
        else:
            check_positive_int(image_size, "image size", "--image-size")
            items = (EncodedItems if pipeline == "nvjpeg" else Uint8Items)(
                dataset, image_size, augment if self.train else "none")
            if pipeline == "nvjpeg":
                kwargs.update(collate_fn=collate_encoded, pin_memory=False)
        self.loader = DataLoader(items, **kwargs)

    def set_epoch(self, epoch: int, start_batch: int = 0):
        """Iterate ``epoch`` from its batch ``start_batch`` on (mid-epoch resume); ``len`` stays
        the whole epoch's batch count."""
        self.plan.epoch = int(epoch)
        self.plan.start_batch = check_start_batch(start_batch, len(self))

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    @property
    def dataset_size(self) -> int:
        return self.plan.n

    def __len__(self) -> int:
        return len(self.plan.spans())

    def step_sizes(self) -> list:
        """The global batch size of each training step (all ranks together), known on every rank."""
        return epoch_step_sizes(self.plan.n, self.plan.batch_size, self.plan.world_size)

    def close(self):
        """Stop the worker processes now; the next iteration starts new ones.  Left to the
        garbage collector (an iteration abandoned with an exception), the shutdown waits out its
        join timeouts, 10 s for two workers."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def _empty_batch(self, memory_format):
        if self.image_size is not None:
            shape = (3, int(self.image_size), int(self.image_size))
        else:
            first = _FolderItems(self.dataset)[0]
            if isinstance(first, BadImage):
                raise UserError(first.message())
            shape = tuple(first[0].shape)
        images = torch.zeros((0, *shape), dtype=self.dtype, device=self.device)
        return images.contiguous(memory_format=memory_format), torch.zeros(0, dtype=torch.int64, device=self.device)

    def _on_device(self, images, memory_format):
        """A worker's batch of images as float images on the device, in ``memory_format``."""
        if self.pipeline == "pil":
            images = images.to(self.device, non_blocking=True).to(self.dtype)
            return images.contiguous(memory_format=memory_format)
        if self.pipeline == "nvjpeg":
            images = assemble_batch(images, self.image_size, self.device)
            if isinstance(images, BadImage):
                self.close()
                raise UserError(images.message("training" if self.train else ""))
        return finish_batch(images, device=self.device, dtype=self.dtype, channels_last=self.channels_last)

    def __iter__(self):
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        spans, start = self.plan.spans(), self.plan.start_batch
        for batch in self.loader:
            if isinstance(batch, BadImage):
                self.close()
                raise UserError(batch.message("training" if self.train else ""))
            images, labels = batch
            yield self._on_device(images, memory_format), labels.to(self.device, non_blocking=True)
        # only the last step can leave a rank an empty share (every earlier step is a full global batch)
        if start < len(spans) and spans[-1][0] == spans[-1][1]:
            yield self._empty_batch(memory_format)


class _ImageCheck(torch.utils.data.Dataset):
    """Decodes one image-folder file and returns None, or the message naming it when it fails."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        from PIL import Image

        root, i = unwrap_subset(self.dataset, index)
        path = root.samples[i][0]

        def decode(p):
            with Image.open(p) as image:
                # JPEGs decode at 1/8 scale: the whole compressed stream is still read, so a
                # truncated file still fails, in a fraction of a full decode's time
                image.draft("RGB", (1, 1))
                image.load()

        try:
            _open_image(path, decode)
        except Exception as exc:  # PIL's format plugins raise many exception types for a malformed file
            return BadImage.of(path, exc)
        return None


def check_images(dataset, what: str, *, workers=0, rank=0, world_size=1):
    """Decode every image of an image-folder split this rank evaluates (its strided shard) and
    raise one UserError naming the first file that fails, on every rank.

    Evaluation splits are read only at validation (possibly many epochs in) and at the very end,
    so a bad file there would otherwise surface after the whole training run.
    """
    from torch.utils.data import DataLoader

    from utils import distributed as du

    shard = list(range(rank, len(dataset), world_size))
    loader = DataLoader(_ImageCheck(dataset), batch_size=64, sampler=shard, num_workers=int(workers),
                        collate_fn=list)
    bad = [item for batch in loader for item in batch if item is not None]
    found = [(bad[0] if bad else None, len(bad))]
    if world_size > 1 and du.is_distributed():
        found = du.all_gather_object(found[0])
    total = sum(count for _, count in found)
    first = next((b for b, _ in found if b is not None), None)
    if first is not None:
        more = f" ({total - 1} more {what} images fail too)" if total > 1 else ""
        raise UserError(first.message(what)[:-1] + more + ".")
