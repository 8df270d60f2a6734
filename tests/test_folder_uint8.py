"""The uint8 image-folder path: torchvision's crop distribution, batches equal to a per-image
reference, every image RGB, and the same order, sharding and resume as the PIL path."""

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from data_loading.folder_uint8 import Uint8Items, read_rgb_u8, rrc_box
from data_loading.streams import mix_seed
from utils.errors import UserError

from .fixtures import write_image_folder, write_truncated_jpeg


def _photo(width, height, seed):
    """Smooth content with some texture, so JPEG artefacts stay small, as in photographs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, 3) + rng.uniform(-2, 2, 3) * x[..., None] + rng.uniform(-2, 2, 3) * y[..., None]
    return np.clip(base + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)


def _jpeg_folder(root, n_train=4, n_val=2, size=(40, 30)):
    for split, n in (("train", n_train), ("val", n_val)):
        for c, cls in enumerate(("ant", "bee", "cat")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_photo(*size, seed=100 * c + i)).save(root / split / cls / f"{i}.JPEG", quality=90)


@pytest.mark.parametrize("height,width", [(375, 500), (30, 40), (7, 5), (1, 40), (40, 1), (1, 1), (3, 2)])
def test_crop_boxes_are_torchvisions_draw_for_draw(height, width):
    from torchvision.transforms import RandomResizedCrop

    image = torch.empty(3, height, width)
    for seed in range(100):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        expected_flip = torch.rand(1).item()
        generator = torch.Generator().manual_seed(seed)
        top, left, box_h, box_w = rrc_box(height, width, generator)
        assert (top, left, box_h, box_w) == expected
        assert torch.rand(1, generator=generator).item() == expected_flip  # the same draws consumed
        assert 0 <= top and top + box_h <= height and 0 <= left and left + box_w <= width


def test_crop_falls_back_to_the_centred_box_within_the_ratios():
    # a 3 x 200 strip fits none of the drawn boxes (every one is 6 px high or more): the largest
    # box of aspect ratio 4:3 (3:4 when standing), centred
    for seed in range(20):
        assert rrc_box(3, 200, torch.Generator().manual_seed(seed)) == (0, 98, 3, 4)
        assert rrc_box(200, 3, torch.Generator().manual_seed(seed)) == (98, 0, 4, 3)


def _reference_epoch(train_set, keys, size):
    """Each image as the uint8 path promises it: PIL's RGB pixels, torchvision's box and flip from
    the per-item seed, torchvision's functional resize on the uint8 crop, then [0, 1]."""
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as F

    root, indices = train_set.dataset, train_set.indices
    images, labels = [], []
    for index, epoch_seed, place in keys:
        path, label = root.samples[indices[index]]
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        torch.manual_seed(mix_seed(epoch_seed, place))
        top, left, box_h, box_w = RandomResizedCrop.get_params(pixels, [0.08, 1.0], [3 / 4, 4 / 3])
        crop = F.resized_crop(pixels, top, left, box_h, box_w, [size, size], antialias=True)
        if torch.rand(1) < 0.5:
            crop = crop.flip(-1)
        images.append(crop.float() / 255)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def test_training_batches_equal_the_per_image_reference_and_the_pil_paths_crops(tmp_path):
    _jpeg_folder(tmp_path)
    size = 16
    new, old = (dataset.build_data("folder", tmp_path, image_size=size, batch_size=5, workers=0, val_size=0, seed=3,
                                   channels_last=True, folder_loader=path) for path in ("uint8", "pil"))
    assert isinstance(new.train.loader.dataset, Uint8Items)
    for loader in (new.train, old.train):
        loader.set_epoch(1)
    batches = list(new.train)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (12, 3, size, size)
    assert all(b[0].is_contiguous(memory_format=torch.channels_last) for b in batches)
    keys = sum(new.train.plan.keys(1), [])
    ref_x, ref_y = _reference_epoch(new.train.dataset, keys, size)
    assert torch.equal(y, ref_y)
    assert (x - ref_x).abs().max() <= 1 / 255 + 1e-6  # the resize's rounding, at most
    # the PIL path cuts the same boxes and flips the same images: only the resize differs
    old_x = torch.cat([b[0] for b in old.train])
    assert torch.equal(torch.cat([b[1] for b in old.train]), y)
    assert (old_x - x).abs().max() <= 1 / 255 + 1e-6
    new.train.set_epoch(2)
    assert (torch.cat([b[0] for b in new.train]) - x).abs().max() > 0.2  # a new epoch draws anew


def test_evaluation_is_the_pil_paths_resize_and_centre_crop(tmp_path):
    _jpeg_folder(tmp_path, size=(40, 30))
    new, old = (dataset.build_data("folder", tmp_path, image_size=16, batch_size=4, workers=0, val_size=3,
                                   folder_loader=path) for path in ("uint8", "pil"))
    for a, b in ((new.test, old.test), (new.val, old.val)):
        xa, ya = map(torch.cat, zip(*a))
        xb, yb = map(torch.cat, zip(*b))
        assert torch.equal(ya, yb) and xa.shape == xb.shape == (len(ya), 3, 16, 16)
        assert (xa - xb).abs().max() <= 1 / 255 + 1e-6


def test_grayscale_cmyk_and_png_named_jpeg_come_out_rgb(tmp_path):
    rgb = Image.fromarray(_photo(20, 12, seed=0))
    files = {"gray.JPEG": rgb.convert("L"), "cmyk.JPEG": rgb.convert("CMYK"), "png.JPEG": rgb,
             "palette.JPEG": rgb.convert("P")}
    for name, image in files.items():
        image.save(tmp_path / name, format="PNG" if name.startswith(("png", "palette")) else "JPEG", quality=90)
        pixels = read_rgb_u8(tmp_path / name)
        expected = np.array(Image.open(tmp_path / name).convert("RGB"))
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 12, 20), name
        assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(expected)), name
    gray = read_rgb_u8(tmp_path / "gray.JPEG")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_odd_files_train_through_the_loader_as_rgb(tmp_path):
    _jpeg_folder(tmp_path, n_train=2, n_val=1)
    Image.fromarray(_photo(40, 30, 7)).convert("L").save(tmp_path / "train" / "ant" / "gray.JPEG")
    Image.fromarray(_photo(40, 30, 8)).convert("CMYK").save(tmp_path / "train" / "bee" / "cmyk.JPEG")
    Image.fromarray(_photo(40, 30, 9)).save(tmp_path / "train" / "cat" / "png.JPEG", format="PNG")
    d = dataset.build_data("folder", tmp_path, image_size=16, batch_size=3, workers=0, val_size=0)
    d.train.set_epoch(0)
    x = torch.cat([b[0] for b in d.train])
    assert x.shape == (9, 3, 16, 16)


@pytest.mark.parametrize("workers", [0, 2])
def test_order_resume_and_shards_follow_the_pil_path(tmp_path, workers):
    _jpeg_folder(tmp_path, n_train=3, n_val=1)
    kwargs = dict(image_size=16, batch_size=2, val_size=0, seed=5)
    new = dataset.build_data("folder", tmp_path, workers=workers, **kwargs)
    old = dataset.build_data("folder", tmp_path, workers=0, folder_loader="pil", **kwargs)
    new.train.set_epoch(4)
    old.train.set_epoch(4)
    full = list(new.train)
    assert [y.tolist() for _, y in full] == [y.tolist() for _, y in old.train]
    new.train.set_epoch(4, start_batch=3)
    resumed = list(new.train)
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], resumed))
    new.train.close()
    labels, shapes = [], []
    for rank in range(2):
        d = dataset.build_data("folder", tmp_path, workers=0, rank=rank, world_size=2, **kwargs)
        d.train.set_epoch(4)
        batches = list(d.train)
        labels += [y for _, y in batches]
        shapes.append([tuple(x.shape) for x, _ in batches])
    assert sorted(torch.cat(labels).tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # 9 images in global steps of 4: 4, 3, 2 (the last two share their 5 images), split 2+2, 2+1, 1+1
    assert shapes == [[(2, 3, 16, 16), (2, 3, 16, 16), (1, 3, 16, 16)],
                      [(2, 3, 16, 16), (1, 3, 16, 16), (1, 3, 16, 16)]]


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_training_jpeg_stops_the_epoch_with_one_line(tmp_path, workers):
    _jpeg_folder(tmp_path, n_train=2, n_val=1)
    bad = tmp_path / "train" / "bee" / "zz.JPEG"
    write_truncated_jpeg(bad)
    d = dataset.build_data("folder", tmp_path, image_size=16, batch_size=2, workers=workers, val_size=0)
    d.train.set_epoch(0)
    with pytest.raises(UserError) as info:
        list(d.train)
    message = str(info.value)
    assert message.startswith(f"training image {bad} cannot be decoded") and "truncated" in message
    assert "\n" not in message


def test_folder_loader_flag_is_recorded_and_refused_where_it_does_nothing():
    import main_downstream
    import main_imp_pretrain

    common = ["--init", "none", "--save-dir", "never"]
    args = main_downstream.parse_args(["--dataset", "folder", "--data", "x", *common])
    assert args.folder_loader == "uint8"
    args = main_imp_pretrain.parse_args(["--dataset", "imagenet", "--data", "x", "--folder-loader", "pil", *common])
    assert args.folder_loader == "pil"
    assert main_downstream.parse_args(["--dataset", "digits", *common]).folder_loader is None
    with pytest.raises(UserError, match="--folder-loader has no effect"):
        main_downstream.parse_args(["--dataset", "digits", "--folder-loader", "pil", *common])
    with pytest.raises(UserError, match="--folder-loader has no effect"):
        main_imp_pretrain.parse_args(["--dataset", "imagenet", "--method", "omp", "--folder-loader", "uint8",
                                      *common])
    # OMP reads no images: nothing recorded, so its run directories match those made before the flag
    assert main_imp_pretrain.parse_args(["--dataset", "imagenet", "--method", "omp", *common]).folder_loader is None


def test_a_run_made_before_the_flag_resumes_only_on_the_pil_path():
    from utils.rundir import config_differences

    before = {"dataset": "imagenet", "seed": 1}  # image folders were read through PIL then
    assert config_differences(before, {**before, "folder_loader": "pil"}) == []
    assert config_differences(before, {**before, "folder_loader": "uint8"}) == [("folder_loader", "<absent>", "uint8")]
    # runs that read no image folder record nothing, so they match directories made before the flag
    assert config_differences({"dataset": "cifar10"}, {"dataset": "cifar10", "folder_loader": None}) == []


def test_gpu_decode_falls_back_to_the_cpu_path_with_one_line(tmp_path, capsys):
    _jpeg_folder(tmp_path, n_train=2, n_val=1)
    d = dataset.build_data("folder", tmp_path, image_size=16, batch_size=3, workers=0, val_size=1,
                           folder_loader="nvjpeg", device="cpu")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("--folder-loader nvjpeg: cannot decode on the GPU")
    assert d.train.pipeline == d.val.pipeline == d.test.pipeline == "uint8"


@pytest.mark.parametrize("train", [True, False])
def test_gpu_decode_path_cuts_what_the_uint8_path_cuts(tmp_path, train):
    """The nvjpeg path's logic, run where it can: on CUDA as meant, else with the batched
    decode on the CPU (identical pixels there; on the GPU within the resize's rounding)."""
    _jpeg_folder(tmp_path, n_train=3, n_val=1)
    Image.fromarray(_photo(40, 30, 7)).convert("L").save(tmp_path / "train" / "ant" / "gray.JPEG")
    Image.fromarray(_photo(40, 30, 9)).save(tmp_path / "train" / "cat" / "png.JPEG", format="PNG")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d = dataset.build_data("folder", tmp_path, image_size=16, batch_size=4, workers=0, val_size=0, device=device)
    split = d.train if train else d.test
    gpu = dataset.FolderLoader(split.dataset, 4, train=train, device=device, seed=0, workers=0, image_size=16,
                               pipeline="nvjpeg")
    for loader in (split, gpu):
        loader.set_epoch(3)
    x, y = map(torch.cat, zip(*split))
    xg, yg = map(torch.cat, zip(*gpu))
    assert torch.equal(y, yg) and xg.shape == x.shape
    assert (xg - x).abs().max() <= (1 / 255 + 1e-6 if device == "cuda" else 0)
    from torchvision.datasets import ImageFolder

    pngs = tmp_path / "pngs"
    write_image_folder(pngs, n_train=2, n_val=1)  # batches without one JPEG for nvJPEG
    only_png = dataset.FolderLoader(ImageFolder(str(pngs / "train")), 4, train=train, device=device, seed=0,
                                    workers=0, image_size=16, pipeline="nvjpeg")
    assert [tuple(x.shape) for x, _ in only_png] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    write_truncated_jpeg(tmp_path / "train" / "bee" / "zz.JPEG")
    broken = dataset.FolderLoader(ImageFolder(str(tmp_path / "train")), 4, train=train, device=device, seed=0,
                                  workers=0, image_size=16, pipeline="nvjpeg")
    with pytest.raises(UserError, match="zz.JPEG cannot be decoded"):
        list(broken)


def test_loader_benchmark_compares_the_folder_paths(tmp_path):
    from benchmarks import bench_loader

    folder, out = tmp_path / "jpegs", tmp_path / "loader.json"
    record = bench_loader.main(["--folder", str(folder), "--image-size", "16", "--batch-size", "2", "--batches", "2",
                                "--workers", "0", "1", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    files = sorted(folder.glob("train/*/*.JPEG"))
    assert len(files) == 4 and Image.open(files[0]).size == (500, 375)
    assert [run["workers"] for run in record["folder_runs"]] == [0, 1]
    for key in ("folder_pil_img_s", "folder_uint8_img_s"):
        assert record[key] == record["folder_runs"][1][key] > 0
    assert "folder_nvjpeg_img_s" not in record and "not a CUDA GPU" in record["gpu_decode"]
    with pytest.raises(UserError, match="--native-size and --num-images"):
        bench_loader.main(["--folder", str(folder), "--num-images", "8"])
    with pytest.raises(UserError, match="fewer than --batches x --batch-size"):
        bench_loader.main(["--folder", str(folder), "--batch-size", "4", "--batches", "2", "--device", "cpu"])
