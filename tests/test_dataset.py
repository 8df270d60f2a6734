"""dataset.py: readers on real on-disk formats, splits, subsets and the batched loaders."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dataset
from dataset import DATASET_STATS, TensorLoader, build_data, data_rate_subset, default_val_size, load_arrays

# ---------------------------------------------------------------------------- fixtures
from tests.fixtures import (  # noqa: E402
    _dump,
    _undump,
    write_cifar10,
    write_cifar100,
    write_image_folder,
    write_svhn,
    write_truncated_jpeg,
)
from utils.errors import UserError


def _collect(loader):
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------------- readers

def test_cifar10_reader_shapes_labels_and_pixel_order(tmp_path):
    data, labels, test, test_labels = write_cifar10(tmp_path)
    # One bright pixel at channel 1, row 2, column 5 of the first image, in CHW row-major order.
    data0 = np.zeros(3072, dtype=np.uint8)
    data0[1 * 1024 + 2 * 32 + 5] = 201
    batch = _undump(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    batch[b"data"][0] = data0
    _dump(tmp_path / "cifar-10-batches-py" / "data_batch_1", batch)
    data[0] = data0

    arrays = load_arrays("cifar10", tmp_path)
    assert arrays.train_x.shape == (30, 32, 32, 3) and arrays.train_x.dtype == np.uint8
    assert arrays.test_x.shape == (8, 32, 32, 3)
    assert arrays.train_y.dtype == np.int64
    np.testing.assert_array_equal(arrays.train_y, labels)
    np.testing.assert_array_equal(arrays.test_y, test_labels)
    assert arrays.train_x[0, 2, 5, 1] == 201 and int(arrays.train_x[0].sum()) == 201
    np.testing.assert_array_equal(arrays.train_x, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(arrays.test_x[3], test[3].reshape(3, 32, 32).transpose(1, 2, 0))
    assert arrays.num_classes == 10 and arrays.native_size == 32


def test_cifar10_root_may_be_the_extracted_folder_itself(tmp_path):
    data, labels, _, _ = write_cifar10(tmp_path)
    arrays = load_arrays("cifar10", tmp_path / "cifar-10-batches-py")
    np.testing.assert_array_equal(arrays.train_y, labels)


def test_cifar100_reader_uses_fine_labels(tmp_path):
    train, fine, test, test_fine = write_cifar100(tmp_path)
    arrays = load_arrays("cifar100", tmp_path)
    assert arrays.num_classes == 100
    np.testing.assert_array_equal(arrays.train_y, fine)
    np.testing.assert_array_equal(arrays.test_y, test_fine)
    np.testing.assert_array_equal(arrays.train_x[7], train[7].reshape(3, 32, 32).transpose(1, 2, 0))


def test_protocol5_pickles_are_also_read(tmp_path):
    train, fine, test, test_fine = write_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-python"
    for name in ("train", "test"):
        obj = _undump(folder / name)
        obj[b"fine_labels"] = np.asarray(obj[b"fine_labels"], dtype=np.int64)
        _dump(folder / name, obj, protocol=5)
    np.testing.assert_array_equal(load_arrays("cifar100", tmp_path).train_y, fine)


def test_svhn_reader_maps_label_10_to_0_and_keeps_pixel_order(tmp_path):
    x, y, tx, ty = write_svhn(tmp_path)
    arrays = load_arrays("svhn", tmp_path)
    assert arrays.train_x.shape == (10, 32, 32, 3) and arrays.test_x.shape == (5, 32, 32, 3)
    assert arrays.train_y[0] == 0
    expected = y[:, 0].astype(np.int64) % 10
    np.testing.assert_array_equal(arrays.train_y, expected)
    assert arrays.train_y.min() >= 0 and arrays.train_y.max() <= 9
    assert arrays.train_x[4, 3, 7, 2] == x[3, 7, 2, 4]
    np.testing.assert_array_equal(arrays.test_x[2], tx[..., 2])


@pytest.mark.parametrize("name,writer,remove,expected", [
    ("cifar10", write_cifar10, "cifar-10-batches-py/test_batch", "test_batch"),
    ("cifar10", write_cifar10, "cifar-10-batches-py/data_batch_3", "data_batch_3"),
    ("cifar100", write_cifar100, "cifar-100-python/train", "cifar-100-python/train"),
    ("svhn", write_svhn, "test_32x32.mat", "test_32x32.mat"),
])
def test_missing_file_names_the_file_and_its_source(tmp_path, name, writer, remove, expected):
    writer(tmp_path)
    (tmp_path / remove).unlink()
    with pytest.raises(UserError, match=expected) as info:
        load_arrays(name, tmp_path)
    assert "http" in str(info.value)


def test_empty_or_absent_root_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data_batch_1"):
        load_arrays("cifar10", tmp_path)
    with pytest.raises(UserError, match="--data"):
        load_arrays("svhn", None)
    with pytest.raises(UserError, match="does not exist"):
        load_arrays("cifar100", tmp_path / "nowhere")


class _RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Execs:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.mark.parametrize("protocol", [2, 5])
def test_crafted_pickle_is_refused_and_not_executed(tmp_path, protocol):
    write_cifar10(tmp_path)
    marker_shell = tmp_path / "shell_ran"
    marker_exec = tmp_path / "exec_ran"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    _dump(batch, {b"data": _RunsShell(f"touch {marker_shell}"), b"labels": [0]}, protocol)
    with pytest.raises(UserError, match="refusing"):
        load_arrays("cifar10", tmp_path)
    _dump(batch, {b"labels": _Execs(f"open({str(marker_exec)!r}, 'w').close()")}, protocol)
    with pytest.raises(UserError, match="refusing"):
        load_arrays("cifar10", tmp_path)
    assert not marker_shell.exists() and not marker_exec.exists()


def test_malformed_batches_are_user_errors(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(b"this is not a pickle at all")
    with pytest.raises(UserError, match="data_batch_2"):
        load_arrays("cifar10", tmp_path)
    _dump(batch, {b"labels": [1, 2]})
    with pytest.raises(UserError, match="b'data'"):
        load_arrays("cifar10", tmp_path)
    _dump(batch, {b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]})
    with pytest.raises(UserError, match="3072"):
        load_arrays("cifar10", tmp_path)
    full = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}, protocol=2)
    batch.write_bytes(full[: len(full) // 2])
    with pytest.raises(UserError, match="data_batch_2"):
        load_arrays("cifar10", tmp_path)


def test_corrupt_svhn_file_is_a_user_error(tmp_path):
    write_svhn(tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes(b"garbage" * 50)
    with pytest.raises(UserError, match="train_32x32.mat"):
        load_arrays("svhn", tmp_path)


def test_digits_arrays_and_fixed_stratified_split():
    arrays = load_arrays("digits")
    assert arrays.native_size == 8 and arrays.num_classes == 10
    assert arrays.train_x.shape[1:] == (8, 8, 3) and arrays.train_x.dtype == np.uint8
    assert arrays.train_x.max() == 255 and arrays.train_x.min() == 0
    np.testing.assert_array_equal(arrays.train_x[..., 0], arrays.train_x[..., 2])
    assert len(arrays.train_y) + len(arrays.test_y) == 1797
    for c in range(10):
        n_test, n_all = (arrays.test_y == c).sum(), (arrays.test_y == c).sum() + (arrays.train_y == c).sum()
        assert n_test == n_all // 5
    again = load_arrays("digits")
    np.testing.assert_array_equal(again.test_x, arrays.test_x)
    # Documented stats: recomputable from the data they describe.
    from sklearn.datasets import load_digits
    every = np.round(load_digits().images * 255 / 16).astype(np.uint8) / 255.0
    mean, std = DATASET_STATS["digits"]
    assert abs(every.mean() - mean[0]) < 1e-4 and abs(every.std() - std[0]) < 1e-4


def test_class_subset_relabels_in_the_given_order():
    full = load_arrays("digits")
    sub = load_arrays("digits", classes=[5, 6, 7, 8, 9])
    assert sub.num_classes == 5
    assert set(sub.train_y.tolist()) == {0, 1, 2, 3, 4} and set(sub.test_y.tolist()) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(full.train_y[sub.train_source_index], sub.train_y + 5)
    np.testing.assert_array_equal(full.train_x[sub.train_source_index], sub.train_x)
    reordered = load_arrays("digits", classes=[9, 0])
    np.testing.assert_array_equal(full.train_y[reordered.train_source_index],
                                  np.where(reordered.train_y == 0, 9, 0))
    for bad in ([], [3, 3], [10], ["a"], 5):
        with pytest.raises(UserError):
            load_arrays("digits", classes=bad)


# ---------------------------------------------------------------------------- splits

def test_default_val_size_follows_the_paper_and_scales_down():
    assert default_val_size("cifar10", 50000) == 5000
    assert default_val_size("cifar100", 50000) == 5000
    assert default_val_size("svhn", 73257) == 5000
    assert default_val_size("imagenet", 1281167) == 5000
    assert default_val_size("digits", 1442) == 144
    assert default_val_size("cifar10", 30) == 3
    with pytest.raises(UserError, match="unknown dataset"):
        default_val_size("mnist", 10)


def test_validation_is_the_last_training_images(tmp_path):
    data, labels, _, _ = write_cifar10(tmp_path)
    d = build_data("cifar10", tmp_path, batch_size=4, val_size=7)
    np.testing.assert_array_equal(d.val_indices, np.arange(23, 30))
    np.testing.assert_array_equal(d.train_indices, np.arange(23))
    x, y = _collect(d.val)
    expected = torch.from_numpy(data[23:].reshape(-1, 3, 32, 32)).float() / 255
    torch.testing.assert_close(x, expected)
    np.testing.assert_array_equal(y.numpy(), labels[23:])
    assert d.train.dataset_size == 23 and d.test.dataset_size == 8
    assert build_data("cifar10", tmp_path, batch_size=4).val_indices.tolist() == [27, 28, 29]
    with pytest.raises(UserError, match="validation size"):
        build_data("cifar10", tmp_path, batch_size=4, val_size=30)


def test_val_size_zero_gives_no_validation_loader():
    d = build_data("digits", batch_size=64, val_size=0)
    assert d.val is None and len(d.val_indices) == 0
    assert d.train.dataset_size == len(d.train_indices) == 1442


def test_data_rate_subset_is_class_balanced_and_seeded():
    labels = np.repeat(np.arange(10), 100)
    labels = np.concatenate([labels, np.full(3, 10)])  # a rare class still keeps one image
    pool = np.arange(len(labels))
    ten = data_rate_subset(labels, pool, 0.1, seed=0)
    one = data_rate_subset(labels, pool, 0.01, seed=0)
    assert ten.dtype == np.int64 and np.all(np.diff(ten) > 0)
    assert np.bincount(labels[ten]).tolist() == [10] * 10 + [1]
    assert np.bincount(labels[one]).tolist() == [1] * 11
    np.testing.assert_array_equal(ten, data_rate_subset(labels, pool, 0.1, seed=0))
    assert not np.array_equal(ten, data_rate_subset(labels, pool, 0.1, seed=1))
    assert not np.array_equal(one, data_rate_subset(labels, pool, 0.01, seed=1))
    np.testing.assert_array_equal(data_rate_subset(labels, pool, 1.0, seed=5), pool)
    # Only indices from the pool are drawn.
    part = np.arange(0, len(labels), 2)
    assert set(data_rate_subset(labels, part, 0.1, seed=0).tolist()) <= set(part.tolist())


@pytest.mark.parametrize("rate", [0, -0.1, 1.5, float("nan"), "0.1", True])
def test_data_rate_outside_unit_interval_is_refused(rate):
    with pytest.raises(UserError, match="data rate"):
        data_rate_subset(np.zeros(5, int), np.arange(5), rate, seed=0)


def test_build_data_records_the_subset_it_trains_on():
    a = build_data("digits", batch_size=16, data_rate=0.1, seed=3)
    b = build_data("digits", batch_size=16, data_rate=0.1, seed=3)
    np.testing.assert_array_equal(a.train_indices, b.train_indices)
    assert a.train.dataset_size == len(a.train_indices)
    assert abs(len(a.train_indices) - 130) <= 10
    assert set(a.train_indices.tolist()).isdisjoint(a.val_indices.tolist())
    assert (a.subset_rule, a.subset_seed) == ("random", 0)


@pytest.fixture(scope="module")
def cifar_2000(tmp_path_factory):
    """A CIFAR-10 fixture of 2,000 training images, so 1% of its 1,800-image training split is 18."""
    root = tmp_path_factory.mktemp("cifar_2000")
    data, labels, _, _ = write_cifar10(root, per_batch=400, n_test=4)
    return root, data, labels


def test_training_seeds_share_the_data_limited_subset(cifar_2000):
    root, _, labels = cifar_2000
    runs = [build_data("cifar10", root, batch_size=8, data_rate=0.01, seed=s) for s in (1, 2, 3)]
    for run in runs[1:]:
        np.testing.assert_array_equal(run.train_indices, runs[0].train_indices)
    first_labels = torch.cat([y for _, y in runs[0].train])
    assert not torch.equal(first_labels, torch.cat([y for _, y in runs[1].train]))  # the order still varies
    kept = runs[0].train_indices
    assert set(labels[kept].tolist()) == set(labels[:1800].tolist())  # class-balanced: every class present
    assert set(kept.tolist()) <= set(range(1800))
    other = build_data("cifar10", root, batch_size=8, data_rate=0.01, seed=1, subset_seed=1)
    assert not np.array_equal(other.train_indices, kept)
    assert other.subset_seed == 1 and other.subset_rule == "random"
    np.testing.assert_array_equal(other.val_indices, runs[0].val_indices)
    # the draw is tied to the dataset and the rate too, not only to the subset seed
    digits = [build_data("digits", batch_size=8, data_rate=rate, seed=s).train_indices
              for rate, s in ((0.1, 0), (0.1, 5), (0.2, 0))]
    np.testing.assert_array_equal(digits[0], digits[1])
    assert not set(digits[0].tolist()) <= set(digits[2].tolist())


def test_subset_first_is_the_first_images_of_the_training_split(cifar_2000):
    root, data, labels = cifar_2000
    d = build_data("cifar10", root, batch_size=32, data_rate=0.01, subset="first", seed=4, augment="none")
    np.testing.assert_array_equal(d.train_indices, np.arange(18))  # round(0.01 * 1,800)
    np.testing.assert_array_equal(d.val_indices, np.arange(1800, 2000))
    assert d.subset_rule == "first"
    x, y = d.train.images.cpu(), d.train.labels.cpu()
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), data[:18].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y.numpy(), labels[:18])
    tiny = build_data("cifar10", root, batch_size=4, data_rate=0.0001, subset="first")
    np.testing.assert_array_equal(tiny.train_indices, [0])  # at least one image
    whole = build_data("cifar10", root, batch_size=4, data_rate=1.0, subset="first")
    np.testing.assert_array_equal(whole.train_indices, np.arange(1800))


@pytest.mark.parametrize("kwargs,match", [({"subset": "last"}, "subset rule"), ({"subset_seed": -1}, "--subset-seed"),
                                          ({"subset_seed": 1.5}, "--subset-seed")])
def test_bad_subset_arguments_are_refused(kwargs, match):
    with pytest.raises(UserError, match=match):
        build_data("digits", batch_size=8, data_rate=0.1, **kwargs)


def test_folder_subsets_follow_the_same_rules(tmp_path):
    write_image_folder(tmp_path, n_train=10, n_val=1)
    kwargs = dict(image_size=16, batch_size=4, workers=0, val_size=6, data_rate=0.5)
    a, b = (build_data("folder", tmp_path, seed=s, **kwargs) for s in (0, 1))
    np.testing.assert_array_equal(a.train_indices, b.train_indices)
    assert not np.array_equal(a.train_indices, build_data("folder", tmp_path, subset_seed=3, **kwargs).train_indices)
    first = build_data("folder", tmp_path, subset="first", **kwargs)
    # the first half of the training split in its (fixed, class-mixing) split order
    split = np.random.default_rng(dataset.FOLDER_SPLIT_SEED).permutation(30)[:24]
    np.testing.assert_array_equal(first.train_indices, np.sort(split[:12]))
    assert first.subset_rule == "first" and a.subset_rule == "random"


# ---------------------------------------------------------------------------- TensorLoader

def _images(n=16, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("augment,size", [("rrc-flip", 48), ("pad-crop-flip", 32), ("pad-crop", 32),
                                          ("none", 32), ("none", 40), ("rrc-flip", 32), ("pad-crop-flip", 24)])
def test_tensor_loader_output_shape_dtype_and_range(augment, size):
    loader = TensorLoader(_images(10), np.arange(10), 4, train=True, image_size=size, augment=augment,
                          device="cpu", seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 3  # the partial last batch is trained on, as in the seed code
    for (x, y), n in zip(batches, (4, 4, 2)):
        assert x.shape == (n, 3, size, size) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert x.min() >= 0 and x.max() <= 1
        assert x.max() > 0.5  # really scaled from 0..255, not left as 0..1 of bytes


def test_tensor_loader_batch_count_and_channels_last():
    loader = TensorLoader(_images(10), np.arange(10), 4, train=False, image_size=32, augment="none",
                          device="cpu", seed=0, channels_last=True, dtype=torch.float16)
    sizes = [len(y) for _, y in loader]
    assert sizes == [4, 4, 2] and len(loader) == 3
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float16
    tiny = TensorLoader(_images(3), np.arange(3), 8, train=True, image_size=32, augment="none",
                        device="cpu", seed=0)
    assert [len(y) for _, y in tiny] == [3]  # a subset smaller than a batch still trains


def test_tensor_loader_same_seed_and_epoch_replays_and_epochs_differ():
    def epoch_batches(seed, epoch):
        loader = TensorLoader(_images(12), np.arange(12), 6, train=True, image_size=40, augment="rrc-flip",
                              device="cpu", seed=seed)
        loader.set_epoch(epoch)
        return _collect(loader)

    x0, y0 = epoch_batches(0, 0)
    x0b, y0b = epoch_batches(0, 0)
    x1, y1 = epoch_batches(0, 1)
    xs, ys = epoch_batches(1, 0)
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    assert not torch.equal(y0, y1) and not torch.equal(y0, ys)
    # Same image, different epoch: different crop.
    order0, order1 = y0.argsort(), y1.argsort()
    assert not torch.allclose(x0[order0], x1[order1])


def test_pad_crop_changes_across_epochs():
    loader = TensorLoader(_images(8), np.arange(8), 8, train=True, image_size=32, augment="pad-crop",
                          device="cpu", seed=0)
    x0, y0 = _collect(loader)
    loader.set_epoch(1)
    x1, y1 = _collect(loader)
    assert not torch.equal(x0[y0.argsort()], x1[y1.argsort()])
    # A pad-crop is a shift: every output pixel is an input pixel or padding zero.
    src = torch.from_numpy(_images(8)).permute(0, 3, 1, 2).float() / 255
    values = set(src.flatten().tolist()) | {0.0}
    assert set(x0.flatten().tolist()) <= values


@pytest.mark.parametrize("n,world,batch", [(12, 3, 2), (13, 4, 2), (3, 4, 2), (450, 2, 64), (5, 2, 1)])
def test_training_rank_shards_use_every_image_once_in_the_same_steps(n, world, batch):
    steps = []
    for rank in range(world):
        loader = TensorLoader(_images(n, size=8), np.arange(n), batch, train=True, image_size=8, augment="none",
                              device="cpu", seed=7, rank=rank, world_size=world)
        loader.set_epoch(2)
        steps.append([y.tolist() for _, y in loader])
        assert len(steps[-1]) == len(loader) == -(-n // (batch * world))  # every rank takes every step
        torch.testing.assert_close(loader.indices(2), torch.tensor(sum(steps[-1], []), dtype=torch.int64))
    used = sum((sum(s, []) for s in steps), [])
    assert sorted(used) == list(range(n))  # no image dropped, none repeated to pad
    for step in zip(*steps):
        sizes = [len(part) for part in step]
        assert max(sizes) - min(sizes) <= 1  # each global batch split as evenly as possible
    # the global batches are those of one process at the global batch size, in the same order
    alone = TensorLoader(_images(n, size=8), np.arange(n), batch * world, train=True, image_size=8,
                         augment="none", device="cpu", seed=7)
    alone.set_epoch(2)
    if n != 3:  # 3 images on 4 ranks: the single process keeps its 3-image step whole as well
        assert [sorted(y.tolist()) for _, y in alone] == [sorted(sum(step, [])) for step in zip(*steps)]


def test_step_plan_keeps_the_partial_step_and_never_leaves_a_lone_image():
    assert dataset.train_step_bounds(450, 128) == [0, 128, 256, 384, 450]
    assert dataset.train_step_bounds(450, 64, 2) == [0, 128, 256, 384, 450]
    assert dataset.train_step_bounds(512, 128) == [0, 128, 256, 384, 512]
    assert dataset.train_step_bounds(7, 16) == [0, 7]
    # less than half a batch left for the last step: the last two steps share their images evenly
    assert dataset.train_step_bounds(129, 128) == [0, 65, 129]
    assert dataset.train_step_bounds(65, 64) == [0, 33, 65]
    assert dataset.train_step_bounds(385, 64, 2) == [0, 128, 256, 321, 385]
    assert dataset.train_step_bounds(448, 128) == [0, 128, 256, 384, 448]  # exactly half a batch: kept
    assert dataset.train_step_bounds(683, 128)[-2:] == [640, 683]  # SVHN 1%: 43 images are plenty, kept
    assert dataset.train_step_bounds(450, 64)[-3:] == [384, 417, 450]  # CIFAR 1% under ST: 33 + 33, not 64 + 2
    # too small a batch to lend from: the last step leaves rank 1 empty (the engine runs a zero-size step)
    assert dataset.train_step_bounds(5, 1, 2) == [0, 2, 4, 5]
    assert [dataset._rank_share(4, 5, r, 2) for r in (0, 1)] == [(4, 5), (5, 5)]
    assert [dataset._rank_share(384, 451, r, 2) for r in (0, 1)] == [(384, 418), (418, 451)]


@pytest.mark.parametrize("augment,size", [("rrc-flip", 16), ("pad-crop-flip", 8), ("none", 12), ("none", 8)])
def test_an_empty_share_is_a_zero_size_batch_of_the_right_shape(augment, size):
    loader = TensorLoader(_images(5, size=8), np.arange(5), 1, train=True, image_size=size, augment=augment,
                          device="cpu", seed=0, rank=1, world_size=2, channels_last=True)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [1, 1, 0]
    x, y = batches[-1]
    assert x.shape == (0, 3, size, size) and x.dtype == torch.float32 and y.dtype == torch.int64


def _epoch(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch=start_batch)
    return list(loader)


@pytest.mark.parametrize("augment,size,rank,world", [("rrc-flip", 48, 0, 1), ("pad-crop-flip", 32, 0, 1),
                                                     ("rrc-flip", 48, 1, 2), ("pad-crop-flip", 32, 1, 2)])
def test_resumed_epoch_yields_the_batches_of_an_uninterrupted_one(augment, size, rank, world):
    loader = TensorLoader(_images(23), np.arange(23), 3, train=True, image_size=size, augment=augment,
                          device="cpu", seed=5, rank=rank, world_size=world)
    full = _epoch(loader, 3)
    assert len(full) == len(loader)
    for k in (1, 2, len(full) - 1, len(full)):
        resumed = _epoch(loader, 3, start_batch=k)
        assert len(loader) == len(full)  # len keeps meaning the whole epoch
        assert len(resumed) == len(full) - k
        for (x, y), (xr, yr) in zip(full[k:], resumed):
            assert torch.equal(y, yr) and torch.equal(x, xr)
    assert len(_epoch(loader, 3)) == len(full)  # set_epoch without start_batch starts over
    # a different epoch draws different augmentations for the same batch position
    assert not torch.equal(_epoch(loader, 4)[1][0], full[1][0])
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(3, start_batch=len(full) + 1)


def test_evaluation_rank_shards_score_each_image_once():
    shards = [torch.cat([y for _, y in TensorLoader(_images(13, size=8), np.arange(13), 4, train=False,
                                                       image_size=8, augment="none", device="cpu", seed=0,
                                                       rank=r, world_size=4)]).tolist() for r in range(4)]
    assert sorted(sum(shards, [])) == list(range(13))


def test_eval_transform_is_deterministic_resize_then_center_crop():
    images = _images(5)
    loader = TensorLoader(images, np.arange(5), 5, train=False, image_size=56, augment="none",
                          device="cpu", seed=0)
    x1, _ = _collect(loader)
    x2, _ = _collect(loader)
    assert torch.equal(x1, x2)
    # Resize(round(56*256/224)=64) + CenterCrop(56), as Resize(256) + CenterCrop(224).
    src = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    resized = F.interpolate(src, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(x1, resized[..., 4:60, 4:60])
    same = TensorLoader(images, np.arange(5), 5, train=False, image_size=32, augment="rrc-flip",
                        device="cpu", seed=0)
    torch.testing.assert_close(_collect(same)[0], src)  # native size: identity, never augmented


def _left_dark_right_bright(n, size=32):
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    images[:, :, size // 2:, :] = 255
    images[:, :, :, 1] = np.linspace(0, 255, size, dtype=np.uint8)[None, None, :]
    return images


def _ramp_slope(x):
    """Channel 1 is a left-to-right ramp, so its slope between interior columns (never padding,
    whatever the shift) tells whether an image was mirrored."""
    width = x.shape[-1]
    return x[:, 1, :, 3 * width // 4].mean(1) - x[:, 1, :, width // 4].mean(1)


@pytest.mark.parametrize("augment,size", [("pad-crop-flip", 32), ("rrc-flip", 48)])
def test_flip_mirrors_some_images_and_not_others(augment, size):
    loader = TensorLoader(_left_dark_right_bright(64), np.arange(64), 64, train=True, image_size=size,
                          augment=augment, device="cpu", seed=0)
    x, _ = _collect(loader)
    slope = _ramp_slope(x)
    assert (slope > 0).sum() >= 10 and (slope < 0).sum() >= 10


def test_pad_crop_without_flip_never_mirrors():
    loader = TensorLoader(_left_dark_right_bright(64), np.arange(64), 64, train=True, image_size=32,
                          augment="pad-crop", device="cpu", seed=0)
    x, _ = _collect(loader)
    assert (_ramp_slope(x) > 0).all()


def test_crop_resize_of_the_whole_image_equals_bilinear_resize_and_flip_mirrors():
    x = torch.rand(3, 3, 16, 16)
    full = torch.zeros(3), torch.zeros(3), torch.full((3,), 16.0), torch.full((3,), 16.0)
    out = dataset._crop_resize(x, *full, 40)
    torch.testing.assert_close(out, F.interpolate(x, size=(40, 40), mode="bilinear", align_corners=False))
    flipped = dataset._crop_resize(x, *full, 16, flip=torch.tensor([True, False, True]))
    torch.testing.assert_close(flipped[0], x[0].flip(2))
    torch.testing.assert_close(flipped[1], x[1])
    # A same-size box is an exact copy of those pixels.
    box = dataset._crop_resize(x, torch.full((3,), 2.0), torch.full((3,), 5.0), torch.full((3,), 8.0),
                               torch.full((3,), 8.0), 8)
    torch.testing.assert_close(box, x[:, :, 2:10, 5:13])


@pytest.mark.parametrize("size,boxes", [
    # (top, left, height, width, flip): small boxes blown up 3-6x, boxes on every image edge, a full image
    (32, [(3, 5, 9, 11, False), (3, 5, 9, 11, True), (0, 0, 7, 5, True), (7, 2, 25, 30, False)]),
    (64, [(11, 17, 9, 11, False), (23, 21, 9, 11, True), (20, 0, 12, 15, False), (0, 0, 32, 32, True)]),
])
def test_crop_resize_matches_torchvision_resized_crop(size, boxes):
    import torchvision.transforms.functional as TF

    x = torch.rand(len(boxes), 3, 32, 32, generator=torch.Generator().manual_seed(size))
    top, left, h, w = (torch.tensor([float(b[i]) for b in boxes]) for i in range(4))
    flip = torch.tensor([b[4] for b in boxes])
    out = dataset._crop_resize(x, top, left, h, w, size, flip)
    for i, (t, left_, bh, bw, mirrored) in enumerate(boxes):
        expected = TF.resized_crop(x[i], t, left_, bh, bw, [size, size], antialias=True)
        if mirrored:
            expected = TF.hflip(expected)
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-4,
                                   msg=lambda m, box=boxes[i]: f"box {box}: {m}")


def test_rrc_flip_that_would_downscale_is_refused():
    with pytest.raises(UserError, match="image size 24.*--image-size 32"):
        TensorLoader(_images(4), np.arange(4), 2, train=True, image_size=24, augment="rrc-flip",
                     device="cpu", seed=0)
    # evaluation never crops randomly, so a smaller evaluation size stays allowed
    evaluation = TensorLoader(_images(4), np.arange(4), 2, train=False, image_size=24, augment="rrc-flip",
                              device="cpu", seed=0)
    assert next(iter(evaluation))[0].shape == (2, 3, 24, 24)


def test_random_resized_crop_boxes_follow_torchvision_ranges():
    gen = torch.Generator().manual_seed(0)
    top, left, h, w = dataset._rrc_boxes(4000, 32, 32, gen, "cpu")
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    assert area.min() >= 0.05 and area.max() <= 1.0
    assert 0.45 < area.mean() < 0.6  # uniform scale in (0.08, 1) -> about 0.54
    assert torch.equal(top, top.round()) and torch.equal(w, w.round())


def test_tensor_loader_rejects_bad_settings():
    with pytest.raises(UserError, match="batch size"):
        TensorLoader(_images(4), np.arange(4), 0, train=True, image_size=32, augment="none", device="cpu", seed=0)
    with pytest.raises(UserError, match="image size"):
        TensorLoader(_images(4), np.arange(4), 2, train=True, image_size=-1, augment="none", device="cpu", seed=0)


# ---------------------------------------------------------------------------- build_data

def test_build_data_on_digits_and_classes_subset():
    d = build_data("digits", batch_size=32)
    assert d.num_classes == 10 and d.native_size == 8 and d.image_size == 8
    assert d.augment == "pad-crop" and d.mean == DATASET_STATS["digits"][0]
    x, y = next(iter(d.train))
    assert x.shape == (32, 3, 8, 8)

    sub = build_data("digits", batch_size=32, classes=[5, 6, 7, 8, 9], image_size=16)
    assert sub.num_classes == 5 and sub.augment == "rrc-flip"
    _, ys = _collect(sub.test)
    assert set(ys.tolist()) == {0, 1, 2, 3, 4}
    full = load_arrays("digits")
    original = full.train_y[sub.train_indices]
    assert set(original.tolist()) == {5, 6, 7, 8, 9}
    # The recorded indices point at the images the loader serves, relabelled by position.
    served = TensorLoader(full.train_x[sub.train_indices], original - 5, 4096, train=False,
                          image_size=8, augment="none", device="cpu", seed=0)
    assert torch.equal(_collect(served)[1], torch.from_numpy(original - 5))


def test_build_data_auto_augment_and_image_size(tmp_path):
    write_cifar10(tmp_path)
    up = build_data("cifar10", tmp_path, batch_size=4, image_size=64)
    assert up.augment == "rrc-flip" and next(iter(up.train))[0].shape == (4, 3, 64, 64)
    assert next(iter(up.test))[0].shape == (4, 3, 64, 64)
    native = build_data("cifar10", tmp_path, batch_size=4)
    assert native.augment == "pad-crop-flip" and native.image_size == 32
    assert native.mean == DATASET_STATS["cifar10"][0]
    with pytest.raises(UserError, match="augmentation"):
        build_data("cifar10", tmp_path, batch_size=4, augment="mixup")


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(UserError, match="cifar10, cifar100, svhn, digits, folder, imagenet"):
        build_data("mnist", "/tmp", batch_size=4)


# ---------------------------------------------------------------------------- image folders

def test_folder_loaders_follow_the_same_interface(tmp_path):
    write_image_folder(tmp_path)
    d = build_data("folder", tmp_path, image_size=16, batch_size=4, workers=0, val_size=3)
    assert d.num_classes == 3 and d.image_size == 16 and d.augment == "rrc-flip"
    assert d.mean == DATASET_STATS["imagenet"][0]
    assert len(d.val_indices) == 3 and len(d.train_indices) == 12
    assert set(d.train_indices.tolist()).isdisjoint(d.val_indices.tolist())
    d.train.set_epoch(0)
    x, y = next(iter(d.train))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64
    order0 = torch.cat([y for _, y in d.train])
    d.train.set_epoch(0)
    assert torch.equal(order0, torch.cat([y for _, y in d.train]))
    assert len(d.train) == 3
    xt, yt = _collect(d.test)
    assert xt.shape == (6, 3, 16, 16) and yt.tolist() == [0, 0, 1, 1, 2, 2]
    xt2, _ = _collect(d.test)
    assert torch.equal(xt, xt2)

    sub = build_data("folder", tmp_path, image_size=16, batch_size=4, workers=0, classes=[2, 0], val_size=0)
    assert sub.num_classes == 2 and sub.val is None
    _, ys = _collect(sub.test)
    assert ys.tolist() == [1, 1, 0, 0]
    _, ytrain = _collect(build_data("folder", tmp_path, image_size=16, batch_size=20, workers=0,
                                    classes=[2, 0], val_size=0).train)
    assert sorted(ytrain.tolist()) == [0] * 5 + [1] * 5


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_training_resumes_mid_epoch_with_the_same_augmentations(tmp_path, workers):
    write_image_folder(tmp_path, n_train=6, n_val=1)
    d = build_data("folder", tmp_path, image_size=16, batch_size=4, workers=workers, val_size=0, seed=2)
    assert d.augment == "rrc-flip"
    full = _epoch(d.train, 1)
    assert [len(y) for _, y in full] == [4, 4, 4, 4, 2]
    resumed = _epoch(d.train, 1, start_batch=3)
    assert len(resumed) == 2 and len(d.train) == 5
    for (x, y), (xr, yr) in zip(full[3:], resumed):
        assert torch.equal(y, yr) and torch.equal(x, xr)
    again = _epoch(d.train, 1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again))  # draws do not depend on the worker
    other = _epoch(d.train, 2)
    assert not torch.equal(torch.cat([x for x, _ in other]), torch.cat([x for x, _ in full]))


def test_folder_training_shards_use_every_image_once(tmp_path):
    write_image_folder(tmp_path, n_train=3, n_val=1)
    steps = []
    for rank in range(2):
        d = build_data("folder", tmp_path, image_size=16, batch_size=1, workers=0, val_size=0, rank=rank,
                       world_size=2, augment="none")
        d.train.set_epoch(0)
        steps.append([(x.shape, y.tolist()) for x, y in d.train])
        assert len(steps[-1]) == len(d.train) == 5
    assert [s for s, _ in steps[0]] == [(1, 3, 16, 16)] * 5
    # 9 images in steps of 2: the last step has one image, for rank 0; rank 1 gets a zero-size batch
    assert [s for s, _ in steps[1]] == [(1, 3, 16, 16)] * 4 + [(0, 3, 16, 16)]
    labels = sum((y for s in steps for _, y in s), [])
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_folder_with_flat_val_or_missing_split_is_refused(tmp_path):
    write_image_folder(tmp_path)
    for png in (tmp_path / "val").rglob("*.png"):
        png.rename(tmp_path / "val" / png.name)
    for d in (tmp_path / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    with pytest.raises(UserError, match="class subfolders"):
        build_data("imagenet", tmp_path, image_size=16, batch_size=4, workers=0)
    with pytest.raises(UserError, match="train"):
        build_data("folder", tmp_path / "val", image_size=16, batch_size=4, workers=0)


@pytest.mark.parametrize("name,expected", [
    ("cifar10", "cifar-10-batches-py/data_batch_1"), ("cifar100", "cifar-100-python/train"),
    ("svhn", "train_32x32.mat"), ("folder", "train/<class>/<image> and val/<class>/<image>"),
    ("imagenet", "ILSVRC2012"),
])
def test_missing_data_folder_names_what_it_should_hold(tmp_path, name, expected):
    for root, problem in ((tmp_path / "nowhere", "does not exist"), (None, "read from local files")):
        with pytest.raises(UserError) as info:
            build_data(name, root, batch_size=4, workers=0)
        message = str(info.value)
        assert problem in message and expected in message and "--data" in message and "\n" not in message


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_test_image_is_one_line_before_training(tmp_path, workers):
    write_image_folder(tmp_path)
    bad = tmp_path / "val" / "bee" / "bee_9.jpg"
    write_truncated_jpeg(bad)
    with pytest.raises(UserError) as info:
        build_data("folder", tmp_path, image_size=16, batch_size=4, workers=workers)
    message = str(info.value)
    assert str(bad) in message and "truncated" in message and message.startswith("test image")
    assert "\n" not in message and "Traceback" not in message
    write_truncated_jpeg(tmp_path / "val" / "ant" / "ant_9.jpg")
    with pytest.raises(UserError, match="1 more test images fail too"):
        build_data("folder", tmp_path, image_size=16, batch_size=4, workers=0)


def test_corrupt_image_held_out_for_validation_is_found_before_training(tmp_path):
    from torchvision.datasets import ImageFolder

    write_image_folder(tmp_path, n_train=3, n_val=1)
    held_out = int(np.random.default_rng(dataset.FOLDER_SPLIT_SEED).permutation(9)[-1])  # val_size 1
    bad = Path(ImageFolder(str(tmp_path / "train")).samples[held_out][0])
    write_truncated_jpeg(bad)  # PIL reads the content, whatever the file's suffix says
    with pytest.raises(UserError) as info:
        build_data("folder", tmp_path, image_size=16, batch_size=4, workers=0, val_size=1)
    assert str(info.value).startswith(f"validation image {bad} cannot be decoded")


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_training_image_stops_the_first_epoch_with_one_line(tmp_path, workers):
    write_image_folder(tmp_path)
    bad = tmp_path / "train" / "cat" / "cat_9.jpg"
    write_truncated_jpeg(bad)
    d = build_data("folder", tmp_path, image_size=16, batch_size=4, workers=workers, val_size=0)
    d.train.set_epoch(0)
    with pytest.raises(UserError) as info:
        list(d.train)
    message = str(info.value)
    assert str(bad) in message and message.startswith("training image") and "\n" not in message
    with pytest.raises(UserError, match="cat_9.jpg"):  # the loader stays usable after stopping its workers
        list(d.train)


@pytest.mark.parametrize("limit", [1000, 700])  # 1,600 pixels: above the warning limit / above twice it
def test_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch, limit):
    from PIL import Image

    write_image_folder(tmp_path)  # 12x10 px images stay under either limit
    big = tmp_path / "val" / "ant" / "ant_9.png"
    Image.new("RGB", (40, 40)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(UserError) as info:
        build_data("folder", tmp_path, image_size=16, batch_size=4, workers=0)
    message = str(info.value)
    assert str(big) in message and "DecompressionBomb" in message and "\n" not in message
    big.unlink()
    Image.new("RGB", (40, 40)).save(tmp_path / "train" / "ant" / "ant_9.png")
    d = build_data("folder", tmp_path, image_size=16, batch_size=4, workers=0, val_size=0)
    d.train.set_epoch(0)
    with pytest.raises(UserError, match="ant_9.png.*DecompressionBomb"):
        list(d.train)


def test_folder_datasets_are_not_array_datasets(tmp_path):
    with pytest.raises(UserError, match="build_data"):
        load_arrays("imagenet", tmp_path)
    write_image_folder(tmp_path)
    with pytest.raises(UserError, match="array datasets"):
        build_data("folder", tmp_path, batch_size=4, workers=0, augment="pad-crop")
