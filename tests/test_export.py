"""Exporting structured tickets (issue 14 item 4): a channel ticket as a smaller dense ResNet with the
masked model's outputs, loadable by the importers; 2:4 tickets refused off a capable GPU."""

import copy
import json

import pytest
import torch
from torch import nn

import models
import pruning_utils as pu
from analysis import export_ticket
from utils.checkpoint import safe_load
from utils.errors import UserError


def _randomise_batchnorm(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=g) - 0.5)
                mod.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def _channel_ticket(model, fraction, tmp_path=None, **meta):
    mask = pu.channel_prune(model.state_dict(), pu.full_mask(model), fraction)
    ticket = pu.make_ticket(mask, round=1, method="omp", retrain=None, arch=model.arch, pretrain="std",
                            init="θ_p.pt", source_dataset="imagenet", pattern="channel")
    if tmp_path is not None:
        pu.save_ticket(tmp_path / "ticket.pt", ticket)
    return mask, ticket


@pytest.mark.parametrize("arch,cifar_stem,size", [("resnet_tiny", True, 16), ("resnet18", False, 32),
                                                  ("resnet50", False, 32)])
def test_exported_channel_model_gives_the_masked_models_logits(arch, cifar_stem, size):
    torch.manual_seed(0)
    model = _randomise_batchnorm(models.build_model(arch, 7, cifar_stem=cifar_stem)).eval()
    mask, _ = _channel_ticket(model, 0.6)
    dense = copy.deepcopy(model)
    masked = model
    pu.apply_mask(masked, mask, pattern="channel")
    small, channels = pu.export_channel_model(masked, mask)
    small.eval()
    groups = pu.channel_groups(list(mask))
    for g in groups:
        kept = int(pu.alive_filters(mask[g.conv]).sum())
        assert channels[g.conv[:-len(".weight")]] == kept
        assert small.get_submodule(g.conv[:-len(".weight")]).out_channels == kept
        assert small.get_submodule(g.bn).num_features == kept
        assert small.get_submodule(g.next[:-len(".weight")]).in_channels == kept
    # the smaller net's weights are exactly the kept ones of the masked net
    assert sum(p.numel() for n, p in small.named_parameters() if n in mask) == sum(int(m.sum()) for m in mask.values())
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=0, atol=1e-5)
        # the masking really changed the function, so the equality above is not the dense net's
        assert not torch.allclose(masked(x), dense(x), atol=1e-3)


def test_export_command_writes_a_checkpoint_the_importers_load(tmp_path, capsys):
    torch.manual_seed(0)
    model = _randomise_batchnorm(models.build_model("resnet_tiny", 5, cifar_stem=True)).eval()
    models.save_model_checkpoint(tmp_path / "theta.pt", model)
    mask, ticket = _channel_ticket(model, 0.5, tmp_path)
    out = tmp_path / "small.pt"
    assert export_ticket.main([str(tmp_path / "ticket.pt"), "--init", str(tmp_path / "theta.pt"), "--arch",
                               "resnet_tiny", "--num-classes", "5", "--cifar-stem", "--out", str(out)]) == 0
    assert "parameters instead of" in capsys.readouterr().out
    raw = safe_load(out)
    assert raw["format"] == "double-win-model" and raw["pattern"] == "channel"
    loaded = pu.load_exported(out).eval()
    # the same through the importer directly, into the smaller shape the checkpoint records
    again = pu.build_exported_model("resnet_tiny", 5, raw["channels"], cifar_stem=True)
    models.load_pretrained(again, out, load_head=True)
    again.eval()
    pu.apply_mask(model, mask, pattern="channel")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    # a full-size model cannot take it silently
    with pytest.raises(UserError, match="does not fit"):
        models.load_pretrained(models.build_model("resnet_tiny", 5, cifar_stem=True), out)
    with pytest.raises(UserError, match="not an exported channel ticket"):
        pu.load_exported(tmp_path / "theta.pt")


def test_export_refuses_unstructured_and_2_4_on_the_cpu(tmp_path):
    model = models.build_model("resnet_tiny", 5, cifar_stem=True)
    models.save_model_checkpoint(tmp_path / "theta.pt", model)
    common = ["--init", str(tmp_path / "theta.pt"), "--arch", "resnet_tiny", "--num-classes", "5", "--cifar-stem"]
    nm = pu.nm_prune(model.state_dict(), pu.full_mask(model), 2, 4)
    pu.save_ticket(tmp_path / "nm.pt", pu.make_ticket(nm, round=1, method="omp", retrain=None, arch="resnet_tiny",
                                                      pretrain="std", init="x", source_dataset="digits",
                                                      pattern="nm", nm=[2, 4]))
    with pytest.raises(UserError, match="compute capability 8.0 or newer .* not the CPU") as info:
        export_ticket.main([str(tmp_path / "nm.pt"), *common, "--out", str(tmp_path / "nm_out.pt")])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "nm_out.pt").exists()
    with pytest.raises(UserError, match="not the CPU"):
        pu.check_semi_structured_support("cpu")
    un = pu.prune_to_sparsity(model.state_dict(), 50.0, base_mask=pu.full_mask(model))
    pu.save_ticket(tmp_path / "un.pt", pu.make_ticket(un, round=1, method="omp", retrain=None, arch="resnet_tiny",
                                                      pretrain="std", init="x", source_dataset="digits"))
    with pytest.raises(UserError, match="unstructured ticket has no faster dense form"):
        export_ticket.main([str(tmp_path / "un.pt"), *common, "--out", str(tmp_path / "un_out.pt")])


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (7, 2, 3)])
def test_im2col_conv_matches_the_conv(kernel, stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, kernel, stride=stride, padding=padding, bias=True)
    layer = pu.SemiStructuredConv2d(conv, conv.weight.detach().reshape(16, -1).clone())
    x = torch.rand(2, 8, 11, 11)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


def test_to_semi_structured_layout_with_a_dense_stand_in_for_the_gpu_kernel():
    """On the CPU the sparse conversion is replaced by identity: this checks which layers convert and
    that the im2col form of a 2:4-masked net gives its logits; the kernels themselves need a GPU."""
    torch.manual_seed(0)
    model = _randomise_batchnorm(models.build_model("resnet_tiny", 5)).eval()  # ImageNet stem: 147 inputs
    mask = pu.nm_prune(model.state_dict(), pu.full_mask(model), 2, 4)
    pu.apply_mask(model, mask)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    seen = []
    converted, dense = pu.to_semi_structured(model, mask, convert=lambda w: seen.append(w) or w.clone())
    assert dense == ["conv1.weight"] and len(converted) == len(mask) - 1
    assert all(bool((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).le(2).all()) for w in seen)
    assert isinstance(model.layer1[0].conv1, pu.SemiStructuredConv2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-5)


def test_inference_benchmark_record_is_well_formed(tmp_path, capsys):
    from benchmarks import bench_inference
    out = tmp_path / "inf.json"
    assert bench_inference.main(["--arch", "resnet_tiny", "--cifar-stem", "--image-size", "16", "--device", "cpu",
                                 "--batch-size", "4", "--channel-sparsities", "50,90", "--unstructured-sparsities", "50",
                                 "--repeats", "2", "--latency-iters", "1", "--throughput-iters", "1", "--warmup", "1",
                                 "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    rows = {r["variant"]: r for r in rec["rows"]}
    assert list(rows) == ["dense", "unstructured_50", "channel_50", "channel_90"]  # no 2:4 rows on the CPU
    assert rec["throughput_batch"] == 4 and rec["dtype"] == "float32"
    assert rows["unstructured_50"]["params"] == rows["dense"]["params"]
    assert rows["unstructured_50"]["flops_per_image"] == rows["dense"]["flops_per_image"]  # dense kernels
    assert rows["dense"]["params"] > rows["channel_50"]["params"] > rows["channel_90"]["params"]
    assert rows["dense"]["flops_per_image"] > rows["channel_50"]["flops_per_image"] > rows["channel_90"]["flops_per_image"]
    assert rows["channel_90"]["filter_sparsity"] == pytest.approx(90.0, abs=0.5)
    assert all(len(r["latency_runs"]) == 2 and r["throughput_images_per_s"] > 0 for r in rows.values())
    assert rows["dense"]["latency_speedup_paired"] == 1.0
    assert "channel_90" in capsys.readouterr().out


def test_export_never_overwrites_what_it_reads_and_names_a_file_that_is_no_ticket(tmp_path):
    torch.manual_seed(0)
    model = models.build_model("resnet_tiny", 5, cifar_stem=True)
    models.save_model_checkpoint(tmp_path / "theta.pt", model)
    _channel_ticket(model, 0.5, tmp_path)
    before = (tmp_path / "theta.pt").read_bytes()
    common = ["--arch", "resnet_tiny", "--num-classes", "5", "--cifar-stem"]
    with pytest.raises(UserError, match="--out .* is the --init weights") as err:
        export_ticket.main([str(tmp_path / "ticket.pt"), "--init", str(tmp_path / "theta.pt"), *common,
                            "--out", str(tmp_path / "." / "theta.pt")])
    assert "\n" not in str(err.value) and (tmp_path / "theta.pt").read_bytes() == before
    with pytest.raises(UserError, match="--out .* is the ticket"):
        export_ticket.main([str(tmp_path / "ticket.pt"), "--init", str(tmp_path / "theta.pt"), *common,
                            "--out", str(tmp_path / "ticket.pt")])
    # θ_p given where the ticket belongs: said as such, not as "no channel pattern"
    with pytest.raises(UserError) as err:
        export_ticket.main([str(tmp_path / "theta.pt"), "--init", str(tmp_path / "theta.pt"), *common,
                            "--out", str(tmp_path / "out.pt")])
    assert "channel pattern" not in str(err.value) and "ticket" in str(err.value)
