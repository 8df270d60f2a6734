"""torch.compile and bf16 autocast checked against eager fp32, and the benchmarks' records.

CUDA variants run only where a GPU is present.  The compile tests use inductor; on a CPU without
a C++ compiler inductor cannot build its kernels, and they fall back to the aot_eager backend
(same Dynamo capture and AOT autograd split, eager kernels) so the capture is still checked.
"""

import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import models
import pruning_utils
from attacks import ThreatModel, training_attack
from benchmarks import bench_loader, bench_step, estimate_run
from training.engine import Precision, evaluate, make_sgd, train_epoch
from utils.errors import UserError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU"))]
# fp32 compiled vs eager: inductor fuses and reorders reductions; GPU kernels differ more
TOL = {"cpu": dict(rtol=1e-4, atol=1e-5), "cuda": dict(rtol=1e-3, atol=1e-4)}
BATCH, SIZE, CLASSES = 8, 16, 5


@pytest.fixture
def strict_fp32(monkeypatch):
    """fp32 comparisons on a GPU without TF32, so eager and compiled convolutions both round as fp32."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _backend(device):
    if device == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "aot_eager"
    return "inductor"


def _tiny(device, seed=0):
    torch.manual_seed(seed)
    return models.build_model("resnet_tiny", CLASSES, cifar_stem=True).to(device)


def _batches(count, device, seed=1, batch=BATCH, size=SIZE):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 3, size, size, generator=gen).to(device),
             torch.randint(0, CLASSES, (batch,), generator=gen).to(device)) for _ in range(count)]


def _pruned(model, percent):
    mask = pruning_utils.prune_to_sparsity(model.state_dict(), percent)
    pruning_utils.apply_mask(model, mask)
    return mask


def _pruned_entries(model, mask):
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach()[~m.to(params[n].device)].flatten() for n, m in mask.items()])


# --------------------------------------------------------------------------- torch.compile

@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_forward_backward_matches_eager(device, strict_fp32):
    eager = _tiny(device)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend=_backend(device))
    (x, y), = _batches(1, device)
    eager.train()
    compiled.train()

    logits_e = eager(x)
    F.cross_entropy(logits_e, y).backward()
    logits_c = compiled(x)
    F.cross_entropy(logits_c, y).backward()

    torch.testing.assert_close(logits_c, logits_e, **TOL[device])
    grads_c = dict(twin.named_parameters())
    for name, p in eager.named_parameters():
        assert grads_c[name].grad is not None, name
        torch.testing.assert_close(grads_c[name].grad, p.grad, rtol=10 * TOL[device]["rtol"],
                                   atol=10 * TOL[device]["atol"], msg=lambda m, n=name: f"{n}: {m}")
    buffers_c = dict(twin.named_buffers())
    for name, b in eager.named_buffers():
        torch.testing.assert_close(buffers_c[name], b, **TOL[device])


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_engine_steps_match_eager(device, strict_fp32):
    eager = _tiny(device)
    mask = _pruned(eager, 50.0)
    twin = copy.deepcopy(eager)
    start = {k: v.clone() for k, v in eager.state_dict().items()}
    compiled = torch.compile(twin, backend=_backend(device))
    batches = _batches(3, device)
    precision = Precision.resolve("off", device)
    stats = []
    for runner, model in ((eager, eager), (compiled, twin)):
        optimizer = make_sgd(model.parameters(), 0.05, 0.9, 5e-4, device)
        stats.append(train_epoch(runner, batches, optimizer, device=device, enforcer=pruning_utils.MaskEnforcer(model, mask),
                                 precision=precision, progress=False, max_steps=3))

    assert stats[0]["images"] == stats[1]["images"] == 3 * BATCH
    assert math.isclose(stats[0]["train_loss"], stats[1]["train_loss"], rel_tol=1e-3)
    after_c = twin.state_dict()
    moved = False
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(after_c[name], value, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        moved = moved or (value.is_floating_point() and not torch.equal(value, start[name]))
    assert moved, "three SGD steps left every weight unchanged"
    assert bool((_pruned_entries(twin, mask) == 0).all())


@pytest.mark.slow
def test_compiled_adversarial_training_and_pgd_evaluation_match_eager():
    eager = _tiny("cpu")
    mask = _pruned(eager, 50.0)
    twin = copy.deepcopy(eager)
    # aot_eager: Dynamo capture and the AOT autograd split of the attack's input gradients, cheaply
    compiled = torch.compile(twin, backend="aot_eager")
    batches = _batches(2, "cpu")
    train_attack = training_attack("at", 8 / 255, 2 / 255, 2)
    eval_attack = ThreatModel(eps=8 / 255, alpha=2 / 255, steps=2, random_start=True, bn_mode="eval")
    precision = Precision.resolve("off", "cpu")
    results = []
    for runner, model in ((eager, eager), (compiled, twin)):
        torch.manual_seed(3)  # the same PGD random starts on both sides
        optimizer = make_sgd(model.parameters(), 0.05, 0.9, 5e-4, "cpu")
        stats = train_epoch(runner, batches, optimizer, device="cpu", attack=train_attack, attack_model=runner,
                            enforcer=pruning_utils.MaskEnforcer(model, mask), precision=precision,
                            channels_last=True, progress=False)
        scores = evaluate(runner, batches, device="cpu", attack=eval_attack, precision=precision,
                          channels_last=True, progress=False)
        results.append((stats, scores))

    (stats_e, scores_e), (stats_c, scores_c) = results
    assert stats_e["images"] == stats_c["images"] == 2 * BATCH
    assert math.isclose(stats_c["train_loss"], stats_e["train_loss"], rel_tol=1e-3)
    one_image = 100.0 / (2 * BATCH)  # a sign step on a near-zero input gradient may flip one prediction
    assert abs(stats_c["train_acc"] - stats_e["train_acc"]) <= one_image
    assert abs(scores_c["sa"] - scores_e["sa"]) <= one_image
    assert abs(scores_c["ra"] - scores_e["ra"]) <= one_image
    assert scores_e["ra"] < scores_e["sa"]  # the evaluation attack really attacked
    after_c = twin.state_dict()
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(after_c[name], value, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert bool((_pruned_entries(twin, mask) == 0).all())


# --------------------------------------------------------------------------- bf16 autocast

@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_forward_close_to_fp32(device):
    model = _tiny(device)
    images = torch.cat([x for x, _ in _batches(8, device)])
    with torch.no_grad():
        model.train()
        for x in images.split(16):
            model(x)  # running BatchNorm statistics that match these inputs
        model.eval()
        reference = model(images)
        with Precision.resolve("bf16", device).autocast():
            low = model(images)

    assert low.dtype == torch.bfloat16  # autocast really ran the layers in bf16
    low = low.float()
    relative = (torch.linalg.vector_norm(low - reference) / torch.linalg.vector_norm(reference)).item()
    assert relative < 5e-2
    agreement = (low.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement >= 0.9
    assert not torch.equal(low, reference)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_train_epoch_keeps_pruned_weights_zero(device):
    model = _tiny(device)
    mask = _pruned(model, 70.0)
    channels_last = True  # the entry points' default on every device
    model.to(memory_format=torch.channels_last)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    handle = model.layer1[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    optimizer = make_sgd(model.parameters(), 0.05, 0.9, 5e-4, device)
    try:
        stats = train_epoch(model, _batches(3, device), optimizer, device=device,
                            attack=training_attack("at", 8 / 255, 2 / 255, 2),
                            enforcer=pruning_utils.MaskEnforcer(model, mask),
                            precision=Precision.resolve("bf16", device), channels_last=channels_last,
                            progress=False, max_steps=2)
    finally:
        handle.remove()

    assert stats["images"] == 2 * BATCH and math.isfinite(stats["train_loss"])
    # two steps, each with two attack passes and one training pass, all under bf16
    assert seen == [torch.bfloat16] * 6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert bool((_pruned_entries(model, mask) == 0).all())
    params = dict(model.named_parameters())
    kept_moved = [not torch.equal(params[n].detach()[m], start[n][m]) for n, m in mask.items()]
    assert any(kept_moved)


def test_bf16_training_steps_track_fp32_and_keep_pruned_weights_zero():
    batches = _batches(4, "cpu")
    losses, updates = {}, {}
    for amp in ("off", "bf16"):
        model = _tiny("cpu").to(memory_format=torch.channels_last)
        mask = _pruned(model, 70.0)
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = make_sgd(model.parameters(), 0.05, 0.9, 5e-4, "cpu")
        enforcer = pruning_utils.MaskEnforcer(model, mask)
        precision = Precision.resolve(amp, "cpu")
        losses[amp] = [train_epoch(model, [batch], optimizer, device="cpu", enforcer=enforcer, precision=precision,
                                   channels_last=True, progress=False)["train_loss"] for batch in batches]
        assert bool((_pruned_entries(model, mask) == 0).all()), amp
        updates[amp] = torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(model.parameters(), start)])

    assert losses["bf16"] != losses["off"]  # bf16 really ran and rounded
    for step, (low, full) in enumerate(zip(losses["bf16"], losses["off"])):
        assert math.isclose(low, full, rel_tol=5e-2), (step, losses)
    # per tensor, bf16's rounded gradients leave 10-45% of fp32's four-step update unmatched
    # (measured), but the model as a whole must move the same way
    assert F.cosine_similarity(updates["bf16"], updates["off"], dim=0).item() > 0.9


# --------------------------------------------------------------------------- benchmarks (no speed asserted)

TINY_STEP = ["--arch", "resnet_tiny", "--cifar-stem", "--num-classes", "5", "--image-size", "16",
             "--batch-size", "4", "--sparsity", "50", "--attack-steps", "1", "--eval-steps", "1",
             "--iters", "1", "--eval-batches", "1", "--warmup", "1", "--repeats", "1", "--device", "cpu"]


def _positive(value):
    return isinstance(value, float) and value > 0 and math.isfinite(value)


def test_benchmarks_write_records(tmp_path, capsys):
    step_path, loader_path = tmp_path / "step.json", tmp_path / "loader.json"
    bench_step.main(TINY_STEP + ["--regime", "at", "--json", str(step_path)])
    step = json.loads(step_path.read_text())
    for key in ("device", "arch", "image_size", "batch_size", "regime", "engine", "reference", "speedup", "mfu",
                "eval_pgd20", "sparsity", "date", "torch"):
        assert key in step, key
    assert (step["arch"], step["image_size"], step["batch_size"], step["regime"]) == ("resnet_tiny", 16, 4, "at")
    assert _positive(step["engine"]["images_per_s"]) and _positive(step["reference"]["images_per_s"])
    assert _positive(step["speedup"])
    assert step["mfu"] is None  # CPU without --peak-tflops
    for side in ("engine", "reference"):
        assert _positive(step["eval_pgd20"][side]["images_per_s"])
    assert step["sparsity"] == pytest.approx(50.0, abs=0.01)
    assert step["engine_pruned_weights_zero"] is True
    # a training step (attack pass + full backward) outweighs evaluation (clean + attack + adversarial pass)
    assert _positive(step["eval_pgd20"]["flops_per_image"])
    assert step["train_flops_per_image"] > step["eval_pgd20"]["flops_per_image"]

    fat = bench_step.main(TINY_STEP + ["--regime", "fat", "--skip-eval", "--peak-tflops", "2.0"])
    assert fat["eval_pgd20"] is None
    assert fat["mfu"] == pytest.approx(fat["train_flops_per_image"] * fat["engine"]["images_per_s"] / 2e12)
    # one FGSM step costs as much as one PGD step
    assert fat["train_flops_per_image"] == step["train_flops_per_image"]

    loader = bench_loader.main(["--image-size", "24", "--native-size", "8", "--batch-size", "4", "--num-images", "16",
                                "--batches", "2", "--workers", "0", "--repeats", "1", "--device", "cpu",
                                "--json", str(loader_path)])
    on_disk = json.loads(loader_path.read_text())
    assert on_disk == json.loads(json.dumps(loader))
    for key in ("device", "image_size", "batch_size", "tensor_loader", "cpu_loader", "speedup", "date", "torch"):
        assert key in on_disk, key
    assert _positive(on_disk["tensor_loader"]["images_per_s"]) and _positive(on_disk["cpu_loader"]["images_per_s"])

    est = estimate_run.main([str(step_path), "--loader", str(loader_path), "--epochs", "10", "--eval-from", "4"])
    r_train, r_eval = step["engine"]["images_per_s"], step["eval_pgd20"]["engine"]["images_per_s"]
    r_data = on_disk["tensor_loader"]["images_per_s"]
    expected = (10 * 45_000 / r_train + 6 * 5_000 / r_eval + 10_000 / r_eval
                + (10 * 45_000 + 6 * 5_000 + 10_000) / r_data) / 60
    assert est["total_min"] == pytest.approx(expected)
    assert "total" in capsys.readouterr().out


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 NVL", 835.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200 NVL", 835.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0)])
def test_peak_table_tells_the_h100_variants_apart(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    args = bench_step.build_parser().parse_args([])
    assert bench_step.peak_tflops(args, torch.device("cuda")) == peak  # a device name only; no GPU is touched


class _TrackerRenamed(bench_step.FlopCounterMode):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.module_tracker = self.__dict__.pop("mod_tracker")


class _TrackerAskedForMore(bench_step.FlopCounterMode):
    def __enter__(self):
        self.mod_tracker.is_bw  # noqa: B018 - as a later PyTorch might
        return super().__enter__()


@pytest.mark.parametrize("counter, needs", [(_TrackerRenamed, "no mod_tracker.parents"),
                                            (_TrackerAskedForMore, "needs mod_tracker.is_bw")])
def test_changed_flop_counter_internals_leave_mfu_out_with_a_note(monkeypatch, capsys, counter, needs):
    monkeypatch.setattr(bench_step, "FlopCounterMode", counter)
    record = bench_step.main(TINY_STEP + ["--regime", "st", "--skip-eval", "--peak-tflops", "2.0"])
    assert record["mfu"] is None and record["train_flops_per_image"] is None
    assert _positive(record["engine"]["images_per_s"])
    err = capsys.readouterr().err
    assert needs in err and "MFU" in err


def test_estimate_counts_validated_epochs_and_refuses_wrong_records(tmp_path):
    assert estimate_run.validated_epochs(100, 45) == 55
    assert estimate_run.validated_epochs(100, 0) == 100
    assert estimate_run.validated_epochs(100, 500) == 1  # the last epoch is always validated
    st = {"regime": "st", "engine": {"images_per_s": 10.0}, "eval_pgd20": None}
    path = tmp_path / "st.json"
    path.write_text(json.dumps(st))
    with pytest.raises(UserError, match="--regime at"):
        estimate_run.main([str(path)])
    with pytest.raises(UserError, match="does not exist"):
        estimate_run.main([str(tmp_path / "missing.json")])


# --------------------------------------------------------------------------- cuDNN autotuning

@pytest.mark.parametrize("argv, expected", [([], True), (["--no-cudnn-benchmark"], False)])
def test_cudnn_autotuning_follows_the_flag_on_cuda_only(monkeypatch, argv, expected):
    import argparse

    from training import setup

    parser = argparse.ArgumentParser()
    setup.add_common_args(parser, ("digits",))
    args = parser.parse_args(["--dataset", "digits", "--init", "none", "--save-dir", "x"] + argv)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not expected)
    setup.resolve_precision(args, "cpu")
    assert torch.backends.cudnn.benchmark is (not expected)  # the CPU leaves cuDNN alone
    precision = setup.resolve_precision(args, "cuda")  # a device name only; no GPU is touched
    assert torch.backends.cudnn.benchmark is expected
    assert precision.dtype == torch.bfloat16
