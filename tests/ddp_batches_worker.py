"""Run by tests/test_ddp_batches.py under ``torch.distributed.run`` (gloo, CPU): one training
epoch per scenario through the real TensorLoader and train_epoch, recording what each rank
trained on.  The test imports its scenarios and helpers from here.

Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_batches_worker.py OUT_DIR
"""

import sys
from pathlib import Path

import numpy as np
import torch

import models
from dataset import TensorLoader
from training.engine import train_epoch
from utils import distributed as du

# n images, per-rank batch on 2 ranks (the one-process reference trains at twice that)
SCENARIOS = {
    # the case: 450 images at global batch 128 -> 4 steps, the last one 66 images (33 per rank)
    "cifar_1pct": {"n": 450, "batch": 64, "size": 8, "model": "mlp", "lr": 0.5},
    # 451 images: the last step splits 34 / 33, so the ranks' losses must be weighted
    "uneven": {"n": 451, "batch": 64, "size": 8, "model": "mlp", "lr": 0.5},
    # 5 images at per-rank batch 1: rank 1 has nothing in the last step and joins it with an empty batch
    "empty_share": {"n": 5, "batch": 1, "size": 8, "model": "mlp", "lr": 0.5},
    # the same with BatchNorm: an empty batch must leave the running statistics alone
    "empty_share_bn": {"n": 5, "batch": 1, "size": 16, "model": "resnet_tiny", "lr": 0.05},
}


class CountingSGD(torch.optim.SGD):
    """SGD that counts its updates."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def make_images(spec):
    rng = np.random.default_rng(spec["n"])
    images = rng.integers(0, 256, (spec["n"], spec["size"], spec["size"], 3), dtype=np.uint8)
    # labels are the image ids, so what each rank trained on can be read off them
    return images, np.arange(spec["n"])


def make_model(spec):
    torch.manual_seed(0)
    if spec["model"] == "mlp":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * spec["size"] ** 2, 16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, spec["n"]))
    return models.build_model("resnet_tiny", spec["n"], cifar_stem=True)


class Recording:
    """Passes a loader's batches through and keeps the labels (image ids) of each."""

    def __init__(self, loader):
        self.loader = loader
        self.batches = []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            self.batches.append(labels.tolist())
            yield images, labels


def main(out_dir):
    info = du.init_distributed("cpu")
    for name, spec in SCENARIOS.items():
        images, labels = make_images(spec)
        model = make_model(spec)
        runner = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = CountingSGD(model.parameters(), lr=spec["lr"], momentum=0.9)
        loader = Recording(TensorLoader(images, labels, spec["batch"], train=True, image_size=spec["size"],
                                        augment="none", device="cpu", seed=3, rank=info.rank,
                                        world_size=info.world_size))
        loader.loader.set_epoch(1)
        stats = train_epoch(runner, loader, optimizer, device="cpu", progress=False)
        torch.save({"steps": optimizer.steps, "batches": loader.batches, "stats": stats,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                   Path(out_dir) / f"{name}_rank{info.rank}.pt")
    du.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
