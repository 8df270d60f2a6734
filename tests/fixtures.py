"""Small datasets written in the real on-disk formats (CIFAR python batches, SVHN .mat, ImageFolder)."""

import pickle

import numpy as np
import scipy.io
from PIL import Image


def _dump(path, obj, protocol=2):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)


def _undump(path):
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="bytes")


def write_cifar10(root, per_batch=6, n_test=8, seed=0):
    """Five training batches and a test batch laid out like cifar-10-python.tar.gz."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    datas, labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        lab = [int(v) for v in rng.integers(0, 10, per_batch)]
        _dump(folder / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(),
                                            b"labels": lab, b"data": data,
                                            b"filenames": [f"img{j}.png".encode() for j in range(per_batch)]})
        datas.append(data)
        labels += lab
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in rng.integers(0, 10, n_test)]
    _dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels,
                                  b"data": test, b"filenames": [b"t.png"] * n_test})
    return np.concatenate(datas), np.array(labels), test, np.array(test_labels)


def write_cifar100(root, n_train=20, n_test=6, seed=1):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [f // 5 for f in fine]
        _dump(folder / name, {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(),
                              b"fine_labels": fine, b"coarse_labels": coarse, b"data": data})
        out += [data, np.array(fine)]
    return out


def write_svhn(root, n_train=10, n_test=5, seed=2):
    rng = np.random.default_rng(seed)
    out = []
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10  # make sure the digit-0 case is present
        scipy.io.savemat(str(root / name), {"X": x, "y": y})
        out += [x, y]
    return out


def write_image_folder(root, classes=("ant", "bee", "cat"), n_train=5, n_val=2, size=(12, 10)):
    rng = np.random.default_rng(3)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{c}_{i}.png")


def write_truncated_jpeg(path, size=(24, 20), keep=0.5, seed=4):
    """A JPEG cut off part-way through its compressed data, as an interrupted copy leaves it:
    the header still opens, decoding fails."""
    import io

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: int(len(data) * keep)])
