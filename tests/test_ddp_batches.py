"""Training epochs keep the partial last batch, on one process and over DDP (issue 13.2).

An epoch makes ceil(n / global batch) updates on every rank, uses every image exactly once, and
the DDP update of a step equals the one-process update on the same global batch, also when the
ranks' shares of the last step differ in size or one rank's share is empty.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataset import TensorLoader
from tests.ddp_batches_worker import SCENARIOS, CountingSGD, make_images, make_model
from training.engine import train_epoch

REPO = Path(__file__).resolve().parents[1]


def test_450_images_at_batch_128_make_4_updates_on_one_process():
    spec = SCENARIOS["cifar_1pct"]
    images, labels = make_images(spec)
    model = make_model(spec)
    optimizer = CountingSGD(model.parameters(), lr=0.1)
    loader = TensorLoader(images, labels, 128, train=True, image_size=8, augment="pad-crop-flip", device="cpu",
                          seed=0)
    assert len(loader) == 4
    seen = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen.append(sorted(torch.cat([y for _, y in loader]).tolist()))
        stats = train_epoch(model, loader, optimizer, device="cpu", progress=False)
        assert stats["images"] == 450
    assert optimizer.steps == 8
    assert seen[0] == seen[1] == list(range(450))


def _one_process_reference(spec, global_batches):
    """Train the same initial model on the given global batches (image ids) in one process."""
    images, _ = make_images(spec)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    model = make_model(spec)
    optimizer = CountingSGD(model.parameters(), lr=spec["lr"], momentum=0.9)
    batches = [(x_all[ids], torch.tensor(ids)) for ids in global_batches]
    stats = train_epoch(model, batches, optimizer, device="cpu", progress=False)
    return model.state_dict(), stats, optimizer.steps


@pytest.mark.slow
def test_two_process_epoch_uses_every_image_once_and_matches_one_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "ddp_batches_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, spec in SCENARIOS.items():
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        steps = -(-spec["n"] // (2 * spec["batch"]))
        if name == "cifar_1pct":
            assert steps == 4
        for r in ranks:
            assert r["steps"] == len(r["batches"]) == steps, name  # every rank takes part in every step
            assert r["stats"]["images"] == spec["n"]
        used = sorted(i for r in ranks for batch in r["batches"] for i in batch)
        assert used == list(range(spec["n"])), name  # each image exactly once: nothing dropped or padded
        global_batches = [a + b for a, b in zip(ranks[0]["batches"], ranks[1]["batches"])]
        if name == "empty_share_bn":
            assert ranks[1]["batches"][-1] == []
            for key, value in ranks[1]["state"].items():
                assert torch.isfinite(value.float()).all(), key  # BatchNorm kept its statistics finite
                if key in dict(make_model(spec).named_parameters()):
                    torch.testing.assert_close(value, ranks[0]["state"][key])  # DDP kept the ranks in sync
            continue
        if name == "uneven":
            assert [len(ranks[0]["batches"][-1]), len(ranks[1]["batches"][-1])] == [34, 33]
        if name == "empty_share":
            assert [len(ranks[0]["batches"][-1]), len(ranks[1]["batches"][-1])] == [1, 0]
        state, stats, ref_steps = _one_process_reference(spec, global_batches)
        assert ref_steps == steps
        for key, value in state.items():
            for r in ranks:
                # the weighted DDP average is the gradient of the mean loss over the global batch
                torch.testing.assert_close(r["state"][key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        for r in ranks:  # the epoch's metrics are summed over ranks, not averaged over unequal shares
            assert r["stats"]["train_loss"] == pytest.approx(stats["train_loss"], rel=1e-6)
            assert r["stats"]["train_acc"] == pytest.approx(stats["train_acc"])
