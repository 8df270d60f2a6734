"""analysis/robustness.py and analysis/loss_landscape.py on a tiny trained ticket (digits, 8 px)."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

import dataset
import models
import pruning_utils as pu
from analysis import loss_landscape, robustness
from utils.checkpoint import atomic_save, atomic_write_json, safe_load
from utils.errors import UserError

EPOCHS = 3


def _train(model, data, opt, enforcer, run):
    atomic_save({k: v.detach().clone() for k, v in model.state_dict().items()}, run / "trajectory" / "start.pt")
    for epoch in range(EPOCHS):
        data.train.set_epoch(epoch)
        model.train()
        for images, labels in data.train:
            opt.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            enforcer.after_backward()
            opt.step()
            enforcer.after_step()
        atomic_save({k: v.detach().clone() for k, v in model.state_dict().items()},
                    run / "trajectory" / f"epoch_{epoch:03d}.pt")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory as main_downstream.py leaves it: a 50% ticket trained briefly on digits."""
    run = tmp_path_factory.mktemp("runs") / "digits_at_s1"
    torch.manual_seed(0)
    data = dataset.build_data("digits", image_size=8, batch_size=64, seed=1)
    model = models.build_model("resnet_tiny", data.num_classes, cifar_stem=True, mean=data.mean, std=data.std)
    mask = pu.prune_to_sparsity({n: p.detach() for n, p in model.named_parameters()}, 50.0,
                                base_mask=pu.full_mask(model))
    pu.apply_mask(model, mask)
    enforcer = pu.MaskEnforcer(model, mask)
    opt = torch.optim.Adam(model.parameters(), lr=0.003)  # ~94% test accuracy in 3 epochs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net gains nothing from threads and stalls when the CPU is shared
    try:
        _train(model, data, opt, enforcer, run)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    models.save_model_checkpoint(run / "model_best.pt", model, mask=mask, epoch=EPOCHS - 1, selection="val_ra")
    config = {"data": None, "dataset": "digits", "classes": None, "arch": "resnet_tiny", "cifar_stem": True,
              "init": "none", "pretrain": "at", "image_size": 8, "augment": "auto", "val_size": None, "seed": 1,
              "workers": 0, "eps": 8 / 255, "alpha": 2 / 255, "test_alpha": 2 / 255, "test_steps": 20,
              "regime": "at", "data_rate": 1.0, "ticket": "tickets/round_03.pt", "ticket_sparsity": 50.0}
    atomic_write_json(config, run / "config.json")
    atomic_write_json({"dataset": "digits", "arch": "resnet_tiny", "pretrain": "at", "init": "none",
                       "ticket": "tickets/round_03.pt", "method": "imp", "sparsity": 50.0, "regime": "at",
                       "data_rate": 1.0, "seed": 1, "sa": 12.5, "ra": 3.5, "selected_epoch": EPOCHS - 1,
                       "selection": "val_ra", "history": [], "config": config, "git": None}, run / "results.json")
    return run


def _first_images(n):
    data = dataset.build_data("digits", image_size=8, batch_size=64, eval_batch_size=64, seed=1)
    xs, ys = zip(*data.test)
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- robustness

def test_robustness_rebuilds_the_model_and_scores_it(tiny_run, tmp_path):
    out = tmp_path / "rob"
    assert robustness.main([str(tiny_run.parent), "--out", str(out), "--max-images", "48", "--steps", "5",
                            "--batch-size", "32", "--autoattack", "--autoattack-attacks", "apgd-ce",
                            "--autoattack-steps", "3", "--transfer-source", str(tiny_run / "model_best.pt"),
                            "--transfer-steps", "3", "--device", "cpu"]) == 0
    (row,) = _read_csv(out / "robustness.csv")
    assert row["n_images"] == "48" and float(row["sparsity"]) == 50.0
    assert (row["pretrain"], row["method"], row["regime"], row["reported_sa"]) == ("at", "imp", "at", "12.5")
    # the same weights scored directly: the rebuild (arch, stem, size, normalization) is right
    model = models.build_model("resnet_tiny", 10, cifar_stem=True, mean=dataset.DATASET_STATS["digits"][0],
                               std=dataset.DATASET_STATS["digits"][1])
    models.load_pretrained(model, tiny_run / "model_best.pt", load_head=True)
    model.eval()
    images, labels = _first_images(48)
    with torch.no_grad():
        expected = 100.0 * float((model(images).argmax(1) == labels).float().mean())
    assert float(row["sa"]) == pytest.approx(expected, abs=1e-3)
    assert float(row["sa"]) > 70.0  # trained, far from chance
    assert float(row["ra_pgd"]) < float(row["sa"])
    assert float(row["ra_autoattack"]) <= float(row["sa"])
    # the source is the model itself, so the transfer attack is white-box: both accuracies agree
    assert row["transfer_acc"] == row["transfer_source_acc"]
    assert float(row["transfer_acc"]) < float(row["sa"])
    assert str(tiny_run) in (out / "robustness.md").read_text()
    assert row["eval_precision"] == "fp32" and "precision fp32" in (out / "robustness.md").read_text()


def test_robustness_bad_inputs(tiny_run, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        robustness.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model_best.pt"):
        robustness.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    plain = tmp_path / "plain.pt"
    torch.save(models.build_model("resnet_tiny", 10, cifar_stem=True).state_dict(), plain)
    with pytest.raises(UserError, match="--transfer-arch"):
        robustness.main([str(tiny_run), "--out", str(tmp_path / "o"), "--max-images", "8", "--steps", "1",
                         "--transfer-source", str(plain), "--device", "cpu"])


def test_robustness_precision_is_fp32_unless_asked(tiny_run, tmp_path, monkeypatch):
    import attacks

    seen = []
    real = attacks.attack_accuracy

    def spy(*a, **kw):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return real(*a, **kw)

    monkeypatch.setattr(attacks, "attack_accuracy", spy)
    base = [str(tiny_run), "--max-images", "32", "--steps", "2", "--device", "cpu"]
    robustness.main(base + ["--out", str(tmp_path / "fp32")])
    assert seen == [torch.float32, torch.float32]
    seen.clear()
    robustness.main(base + ["--out", str(tmp_path / "bf16"), "--eval-amp", "bf16"])
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert not torch.is_autocast_enabled("cpu")  # left as it was
    (full,), (low,) = (_read_csv(tmp_path / o / "robustness.csv") for o in ("fp32", "bf16"))
    assert (full["eval_precision"], low["eval_precision"]) == ("fp32", "bf16")
    assert abs(float(full["sa"]) - float(low["sa"])) <= 10.0  # same model, rounding only
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        robustness.main(base + ["--out", str(tmp_path / "fp16"), "--eval-amp", "fp16"])
    assert not (tmp_path / "fp16").exists()


def test_analysis_eps_must_lie_in_unit_range(tiny_run, tmp_path):
    for eps in ("8", "1.5", "300/255"):
        with pytest.raises(UserError, match=r"outside \[0, 1\]"):
            robustness.main([str(tiny_run), "--out", str(tmp_path / "o"), "--eps", eps, "--device", "cpu"])
        with pytest.raises(UserError, match=r"outside \[0, 1\]"):
            loss_landscape.main([str(tiny_run), "--out", str(tmp_path / "o"), "--eps", eps, "--device", "cpu"])
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- loss landscape

def _tiny_model_and_mask(tiny_run):
    ckpt = safe_load(tiny_run / "model_best.pt")
    model = models.build_model("resnet_tiny", 10, cifar_stem=True)
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt["mask"]


def test_directions_follow_mask_and_filter_norms(tiny_run):
    model, mask = _tiny_model_and_mask(tiny_run)
    d1, d2 = loss_landscape.filter_normalized_directions(model, mask, seed=3)
    again, _ = loss_landscape.filter_normalized_directions(model, mask, seed=3)
    params = dict(model.named_parameters())
    for name, w in params.items():
        if w.dim() <= 1:
            assert not d1[name].any() and not d2[name].any(), name  # BN and biases stay put
            continue
        if name in mask:
            assert not d1[name][~mask[name]].any(), name  # pruned entries stay pruned
        w_norm = w.detach().reshape(w.shape[0], -1).norm(dim=1)
        d_norm = d1[name].reshape(w.shape[0], -1).norm(dim=1)
        assert torch.allclose(d_norm, w_norm, rtol=1e-4, atol=1e-6), name
        assert torch.equal(d1[name], again[name])
    assert not torch.equal(d1["layer1.0.conv1.weight"], d2["layer1.0.conv1.weight"])


def test_projection_recovers_known_coordinates(tiny_run):
    model, mask = _tiny_model_and_mask(tiny_run)
    d1, d2 = loss_landscape.filter_normalized_directions(model, mask, seed=0)
    center = {k: v.clone() for k, v in model.state_dict().items()}
    moved = {k: (v + 0.3 * d1[k] - 0.2 * d2[k]) if k in d1 else v for k, v in center.items()}
    x, y, residual = loss_landscape.project(moved, center, d1, d2)
    assert (x, y) == (pytest.approx(0.3, abs=1e-6), pytest.approx(-0.2, abs=1e-6))
    assert residual < 1e-6
    off = dict(moved)
    off["fc.weight"] = moved["fc.weight"] + torch.randn_like(moved["fc.weight"])
    assert loss_landscape.project(off, center, d1, d2)[2] > 0.01


def test_loss_landscape_end_to_end(tiny_run, tmp_path):
    out = tmp_path / "ll"
    assert loss_landscape.main([str(tiny_run), "--out", str(out), "--grid", "3", "--num-images", "32",
                                "--pgd-steps", "3", "--device", "cpu"]) == 0
    land = json.loads((out / "landscape.json").read_text())
    assert land["x"] == [-1.0, 0.0, 1.0] and land["settings"]["num_images"] == 32
    clean, pgd = land["loss_clean"], land["loss_pgd"]
    assert len(clean) == 3 and all(len(r) == 3 for r in clean)
    corners = [clean[0][0], clean[0][2], clean[2][0], clean[2][2]]
    assert clean[1][1] < min(corners)  # a trained ticket sits in a basin
    assert pgd[1][1] > clean[1][1]  # adversarial images cost more
    traj = land["trajectory"]
    assert [p["epoch"] for p in traj] == [-1] + list(range(EPOCHS))  # -1: the weights before fine-tuning
    # the last epoch is the saved model: it projects onto the centre exactly
    assert abs(traj[-1]["x"]) < 1e-9 and abs(traj[-1]["y"]) < 1e-9 and traj[-1]["residual"] < 1e-9
    assert traj[0]["residual"] > 0
    assert len(_read_csv(out / "landscape.csv")) == 9
    assert len(_read_csv(out / "trajectory.csv")) == EPOCHS + 1
    assert (out / "landscape.png").stat().st_size > 5000


def test_loss_landscape_pca_plane_holds_the_trajectory_and_reattack(tiny_run, tmp_path):
    random_out, pca_out, fixed_out = tmp_path / "random", tmp_path / "pca", tmp_path / "fixed"
    common = ["--grid", "3", "--num-images", "32", "--pgd-steps", "2", "--device", "cpu"]
    loss_landscape.main([str(tiny_run), "--out", str(random_out), *common])
    loss_landscape.main([str(tiny_run), "--out", str(fixed_out), "--directions", "pca", *common])
    assert loss_landscape.main([str(tiny_run), "--out", str(pca_out), "--directions", "pca", "--reattack",
                                *common]) == 0
    rand, pca = (json.loads((o / "landscape.json").read_text()) for o in (random_out, pca_out))
    assert "principal directions" in pca["settings"]["directions"] and pca["settings"]["reattack"] is True
    # a random plane misses the path almost entirely; the principal plane holds most of it
    # (measured: residuals 1.0 against 0.07 / 0.004 / 0.56, the last for an epoch next to the centre)
    residuals = {name: [p["residual"] for p in land["trajectory"][:-1]] for name, land in (("rand", rand), ("pca", pca))}
    assert min(residuals["rand"]) > 0.9
    assert sum(residuals["pca"]) / len(residuals["pca"]) < 0.3
    last = pca["trajectory"][-1]  # the saved model is the centre
    assert abs(last["x"]) < 1e-4 and abs(last["y"]) < 1e-4
    reach = max(max(abs(p["x"]), abs(p["y"])) for p in pca["trajectory"])
    assert pca["settings"]["range"] == pytest.approx(1.25 * reach)
    # attacked anew at every point, the PGD loss is above the clean loss everywhere, and off the
    # centre above the loss of images crafted once at the centre (which no longer fit the weights)
    fixed = json.loads((fixed_out / "landscape.json").read_text())
    assert fixed["settings"]["reattack"] is False
    for clean_row, pgd_row in zip(pca["loss_clean"], pca["loss_pgd"]):
        assert all(p > c for c, p in zip(clean_row, pgd_row))
    corners = [(0, 0), (0, 2), (2, 0), (2, 2)]
    assert all(pca["loss_pgd"][i][j] > fixed["loss_pgd"][i][j] for i, j in corners)


def test_loss_landscape_pca_needs_a_trajectory(tiny_run, tmp_path):
    run = tmp_path / "short"
    run.mkdir()
    for name in ("config.json", "results.json", "model_best.pt"):
        (run / name).write_bytes((tiny_run / name).read_bytes())
    (run / "trajectory").mkdir()
    (run / "trajectory" / "epoch_000.pt").write_bytes((tiny_run / "trajectory" / "epoch_000.pt").read_bytes())
    with pytest.raises(UserError, match="at least 3 saved weights"):
        loss_landscape.main([str(run), "--out", str(tmp_path / "o"), "--directions", "pca", "--device", "cpu"])


def test_loss_landscape_bad_inputs(tiny_run, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        loss_landscape.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--grid"):
        loss_landscape.main([str(tiny_run), "--out", str(tmp_path / "o"), "--grid", "1"])
    no_model = tmp_path / "run"
    no_model.mkdir()
    (no_model / "config.json").write_text((tiny_run / "config.json").read_text())
    with pytest.raises(UserError, match="model_best.pt"):
        loss_landscape.main([str(no_model), "--out", str(tmp_path / "o"), "--device", "cpu"])
