"""Issue 30: RobustBench model-zoo state dicts import exactly; --tensorboard writes one point per epoch
and scalar, through a kill and a resume, and its absence is one clear error."""

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from tensorboard.backend.event_processing import event_accumulator
from torch import nn

import main_downstream
import main_imp_pretrain
import models
from study import grid as study_grid
from training import tensorboard as tb
from utils.errors import Preempted, UserError
from utils.preemption import StopRequest

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not ImageNet's: the file's own must be the ones read


class ImageNormalizer(nn.Module):
    """RobustBench's input normalizer: mean and std buffers of shape (1, 3, 1, 1)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def robustbench_model(arch, num_classes=10, seed=0, mean=MEAN, std=STD):
    """What robustbench.utils.load_model returns for an ImageNet entry: Sequential(normalize, model)."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(num_classes=num_classes)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults, so loading them shows
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return nn.Sequential(OrderedDict(normalize=ImageNormalizer(mean, std), model=net)).eval()


@pytest.fixture(scope="module")
def zoo18():
    return robustbench_model("resnet18")


@pytest.mark.parametrize("arch,layout", [("resnet18", "bare"), ("resnet18", "state_dict+module"),
                                         pytest.param("resnet50", "bare", marks=pytest.mark.slow)])
def test_robustbench_state_dict_gives_bitwise_equal_logits(tmp_path, zoo18, arch, layout):
    zoo = zoo18 if arch == "resnet18" else robustbench_model(arch)
    state = zoo.state_dict()
    if layout == "state_dict+module":
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "Salman2020Do.pt"
    torch.save(state, path)

    model = models.build_model(arch, 10)
    info = models.load_pretrained(model, path, load_head=True)
    assert info["format"] == "robustbench" and info["mask"] is None
    assert info["file_normalization"] == ([float(v) for v in torch.tensor(MEAN)], [float(v) for v in torch.tensor(STD)])
    models.set_normalization(model, *info["file_normalization"])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), zoo(x))


def test_robustbench_file_of_another_resnet_is_one_line_naming_it(tmp_path, zoo18):
    path = tmp_path / "r18.pt"
    torch.save(zoo18.state_dict(), path)
    with pytest.raises(UserError) as err:
        models.load_pretrained(models.build_model("resnet50", 10), path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "robustbench" in msg
    assert "resnet18" in msg and "--arch resnet18" in msg


@pytest.mark.parametrize("which,values", [("std", (0.2, 0.0, 0.3)), ("mean", (0.5, 0.4, 0.3, 0.2)),
                                          ("std", (0.2, float("nan"), 0.3))])
def test_robustbench_normalizer_must_be_three_positive_numbers(tmp_path, zoo18, which, values):
    state = dict(zoo18.state_dict())
    state[f"normalize.{which}"] = torch.tensor(values).view(1, -1, 1, 1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(UserError) as err:
        models.load_pretrained(models.build_model("resnet18", 10), path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and f"normalize.{which}" in msg and "three positive" in msg


# --------------------------------------------------------------------------- --tensorboard

STAGE2 = ["--dataset", "digits", "--classes", "5-9", "--init", "none", "--pretrain", "std", "--regime", "at",
          "--epochs", "3", "--lr", "0.05", "--train-steps", "1", "--test-steps", "1", "--eps", "8/255",
          "--data-rate", "0.3", "--arch", "resnet_tiny", "--cifar-stem", "--no-progress", "--batch-size", "16",
          "--tensorboard"]
EPOCH_TAGS = {"train_loss": "train/loss", "train_acc": "train/acc", "lr": "train/lr", "val_sa": "val/sa",
              "val_ra": "val/ra"}


def read_scalars(folder, purge=True):
    """{tag: [(step, value)]} as TensorBoard's reader gives them (``purge=False``: every point written)."""
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0},
                                             purge_orphaned_data=purge)
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def check_one_point_per_epoch(save_dir, tags):
    res = json.loads((save_dir / "results.json").read_text())
    history = res["history"]
    for purge in (True, False):  # also for a reader that ignores TensorBoard's purge marks
        scalars = read_scalars(save_dir / "tb", purge)
        for column, tag in tags.items():
            assert [s for s, _ in scalars[tag]] == list(range(len(history))), (tag, scalars[tag])
            assert [v for _, v in scalars[tag]] == pytest.approx([row[column] for row in history], rel=1e-6), tag
        assert scalars["test/sa"] == [(res["selected_epoch"], pytest.approx(res["sa"], rel=1e-6))]
        assert scalars["test/ra"] == [(res["selected_epoch"], pytest.approx(res["ra"], rel=1e-6))]
    return res


class StopAfter:
    """A stop signal arriving after ``n`` training steps (the handler sets the same flag)."""

    def __init__(self, n):
        self.n, self.calls, self.signal = n, 0, None

    @property
    def requested(self):
        self.calls += 1
        return self.calls > self.n

    def install(self):
        return self

    def uninstall(self):
        pass


class Killed(Exception):
    pass


@pytest.mark.slow
def test_tensorboard_curves_survive_kills_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real_epoch = tb.Board.epoch

    def die_after_checkpoint(self, row, step):  # a kill between epoch 2's checkpoint and its points
        if step == 1:
            raise Killed
        real_epoch(self, row, step)

    monkeypatch.setattr(tb.Board, "epoch", die_after_checkpoint)
    with pytest.raises(Killed):
        main_downstream.main([*STAGE2, "--save-dir", str(out)])
    assert [s for s, _ in read_scalars(out / "tb")["train/loss"]] == [0]
    monkeypatch.setattr(tb.Board, "epoch", real_epoch)
    monkeypatch.setattr(main_downstream, "StopRequest", lambda: StopAfter(3))  # then stopped inside epoch 3
    with pytest.raises(Preempted):
        main_downstream.main([*STAGE2, "--save-dir", str(out)])
    assert [s for s, _ in read_scalars(out / "tb")["train/loss"]] == [0, 1]
    monkeypatch.setattr(main_downstream, "StopRequest", StopRequest)
    assert main_downstream.main([*STAGE2, "--save-dir", str(out)]) == 0

    assert len(list((out / "tb").glob("*tfevents*"))) >= 3  # one file per process that wrote
    assert len(check_one_point_per_epoch(out, EPOCH_TAGS)["history"]) == 3


def test_a_restarted_run_drops_the_curves_of_the_run_it_replaces(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(main_downstream, "StopRequest", lambda: StopAfter(30))  # inside epoch 3
    with pytest.raises(Preempted):
        main_downstream.main([*STAGE2, "--save-dir", str(out)])
    assert len(read_scalars(out / "tb")["train/loss"]) == 2
    monkeypatch.setattr(main_downstream, "StopRequest", StopRequest)
    assert main_downstream.main([*STAGE2, "--epochs", "1", "--restart", "--save-dir", str(out)]) == 0
    check_one_point_per_epoch(out, EPOCH_TAGS)


@pytest.mark.parametrize("method", ["imp", "lmp"])
def test_stage1_writes_one_point_per_trained_epoch(tmp_path, method):
    out = tmp_path / method
    assert main_imp_pretrain.main([
        "--dataset", "digits", "--classes", "0-4", "--init", "none", "--pretrain", "std", "--method", method,
        "--rate", "0.5", "--rounds", "2", "--epochs-per-round", "1", "--lr", "0.01", "--arch", "resnet_tiny",
        "--cifar-stem", "--no-progress", "--batch-size", "64", "--tensorboard", "--save-dir", str(out)]) == 0
    rows = (out / "log.csv").read_text().splitlines()[1:]
    scalars = read_scalars(out / "tb")
    assert len(rows) == {"imp": 1, "lmp": 2}[method]
    for tag in ("train/loss", "train/acc", "train/lr", "ticket/sparsity"):
        assert [s for s, _ in scalars[tag]] == list(range(len(rows))), tag
    assert [v for _, v in scalars["ticket/sparsity"]] == [float(r.split(",")[5]) for r in rows]


def test_stage1_refuses_tensorboard_where_nothing_trains():
    with pytest.raises(UserError, match="--tensorboard"):
        main_imp_pretrain.parse_args(["--dataset", "digits", "--init", "none", "--method", "omp", "--tensorboard",
                                      "--save-dir", "x"])


def test_grid_flags_pass_tensorboard_to_every_run(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('out = "runs"\n[pretrain.std]\ninit = "none"\n[axes]\ndataset = ["digits"]\n'
                    'regime = ["st", "at"]\nseed = [1]\n[flags]\ntensorboard = true\n')
    grid = study_grid.load_grid(path)
    runs = study_grid.expand(grid)
    study_grid.check_flag_keys(grid)
    study_grid.refuse_flags_acting_nowhere(grid, runs)
    study_grid.check_flags(runs)
    assert runs and all("--tensorboard" in r.argv() for r in runs)


BLOCK_TENSORBOARD = '''import importlib.abc, sys
class _NoTensorBoard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTensorBoard())
'''


@pytest.mark.slow
def test_missing_tensorboard_is_one_line_exit_2_and_nothing_written(tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_TENSORBOARD)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    proc = subprocess.run([sys.executable, str(REPO / "main_downstream.py"), *STAGE2, "--save-dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install tensorboard" in lines[0], proc.stderr
    assert not out.exists()


def test_missing_tensorboard_is_refused_by_stage1_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what a missing package makes of it
    out = tmp_path / "run"
    with pytest.raises(UserError, match="pip install tensorboard"):
        main_imp_pretrain.main(["--dataset", "digits", "--init", "none", "--method", "imp", "--rounds", "2",
                                "--epochs-per-round", "1", "--tensorboard", "--save-dir", str(out)])
    assert not out.exists()


def test_tensorboard_never_makes_a_run_directory_another_run():
    from utils.rundir import config_differences

    old = main_downstream.config_for([*STAGE2[:-1], "--save-dir", "x"])  # written before the flag existed
    del old["tensorboard"]
    assert config_differences(old, main_downstream.config_for([*STAGE2, "--save-dir", "x"])) == []
    assert main_downstream.config_changes(old, main_downstream.config_for([*STAGE2, "--save-dir", "x"]),
                                          finished=False) == []
