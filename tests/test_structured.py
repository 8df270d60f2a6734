"""Structured tickets end to end: stage 1 with --pattern channel / nm, stage 2 keeping them structured,
and stage 2 refusing tickets whose masks contradict their claims (issue 14 item 1, issue 15 finding 3)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_downstream
import main_imp_pretrain
import models
import pruning_utils as pu
from masks import enforce
from tests.fixtures import write_image_folder
from training import lmp
from utils.checkpoint import safe_load
from utils.cli import run_main
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "resnet_tiny", "--cifar-stem", "--no-progress"]


def tiny_init(tmp_path, num_classes=5, seed=0):
    torch.manual_seed(seed)
    model = models.build_model("resnet_tiny", num_classes, cifar_stem=True)
    path = tmp_path / "theta_p.pt"
    models.save_model_checkpoint(path, model)
    return path, model


def stage1(tmp_path, out, *extra):
    """OMP / RP, which do not train: without TINY's --no-progress, which would have no effect."""
    init, _ = tiny_init(tmp_path)
    main_imp_pretrain.main(["--dataset", "digits", "--init", str(init), "--pretrain", "std", "--save-dir", str(out),
                            "--arch", "resnet_tiny", "--cifar-stem", *map(str, extra)])
    return init


def test_omp_channel_tickets_remove_whole_filters_round_by_round(tmp_path):
    out = tmp_path / "omp"
    stage1(tmp_path, out, "--method", "omp", "--pattern", "channel", "--rounds", "4")
    previous = None
    for k in range(1, 5):
        t = pu.load_ticket(out / "tickets" / f"round_{k:02d}.pt")
        assert t["pattern"] == "channel" and t["method"] == "omp" and t["version"] == 2
        groups = pu.channel_groups(list(t["masks"]))
        # 240 internal filters of resnet_tiny; each round removes 20% of those left
        alive = sum(int(pu.alive_filters(t["masks"][g.conv]).sum()) for g in groups)
        expected = 240
        for _ in range(k):
            expected -= round(0.2 * expected)
        assert alive == expected
        assert all(int(pu.alive_filters(t["masks"][g.conv]).sum()) >= 1 for g in groups)
        if previous is not None:  # nested
            assert all(not bool((t["masks"][n] & ~previous[n]).any()) for n in t["masks"])
        previous = t["masks"]
    levels = json.loads((out / "sparsity.json").read_text())
    assert levels["4"] == pu.load_ticket(out / "tickets" / "round_04.pt")["sparsity"]


def _tiny(seed):
    torch.manual_seed(seed)
    return models.build_model("resnet_tiny", 10, cifar_stem=True)


def _removed_filters(mask):
    return {g.conv: int((~pu.alive_filters(mask[g.conv])).sum()) for g in pu.channel_groups(list(mask))}


def _levels(model, prune, rounds=3, rate=0.4):
    """(removed filters per internal conv, weight sparsity) of each level, every level pruned from θ_p."""
    weights, mask, out = model.state_dict(), pu.full_mask(model), []
    for _ in range(rounds):
        mask = prune(weights, mask, rate)
        out.append((_removed_filters(mask), pu.sparsity(mask)))
    return out


def test_layerwise_channel_levels_depend_on_the_architecture_only():
    a, b = _tiny(0), _tiny(1)
    layerwise = _levels(a, pu.layerwise_channel_prune)
    assert layerwise == _levels(b, pu.layerwise_channel_prune)
    widths = {g.conv: a.state_dict()[g.conv].shape[0] for g in pu.channel_groups(list(pu.full_mask(a)))}
    for k, (removed, _) in enumerate(layerwise, 1):  # each conv rounds its own count, round by round
        assert removed == {n: pu.imp_pruned_count(f, k, 0.4) for n, f in widths.items()}
    # the global ranking spreads the same filter count over the convs by weight, so its levels differ
    global_a, global_b = _levels(a, pu.channel_prune), _levels(b, pu.channel_prune)
    assert [sum(r.values()) for r, _ in global_a] == [sum(r.values()) for r, _ in global_b]
    assert [s for _, s in global_a] != [s for _, s in global_b]


def test_layerwise_channel_removes_each_convs_lowest_l1_filters_and_never_its_last():
    model = _tiny(2)
    weights, mask = model.state_dict(), pu.full_mask(model)
    for _ in range(2):
        new = pu.layerwise_channel_prune(weights, mask, 0.4)
        pu.make_ticket(new, round=1, method="omp", retrain=None, arch="resnet_tiny", pretrain="std", init="x",
                       source_dataset="digits", pattern="channel")  # validates the channel pattern
        for g in pu.channel_groups(list(mask)):
            l1 = (weights[g.conv].abs() * mask[g.conv]).reshape(mask[g.conv].shape[0], -1).sum(dim=1)
            before, after = pu.alive_filters(mask[g.conv]), pu.alive_filters(new[g.conv])
            dropped = before & ~after
            assert int(dropped.sum()) == round(0.4 * int(before.sum())), g.conv
            assert float(l1[dropped].max()) <= float(l1[after].min()), g.conv
        mask = new
    # at 90% per round every conv soon has one filter left, which it keeps
    deep = _levels(model, pu.layerwise_channel_prune, rounds=6, rate=0.9)
    widths = {n: weights[n].shape[0] for n in deep[0][0]}
    kept = [{n: widths[n] - r for n, r in removed.items()} for removed, _ in deep]
    assert kept[-1] == dict.fromkeys(widths, 1)
    # filter-wise LMP keeps per conv exactly the filters --layerwise leaves, so their levels agree
    assert kept == lmp.level_keep_counts(model, pu.prunable_names(model), 6, 0.9, False, "channel")


def test_omp_channel_layerwise_sparsity_levels_equal_across_source_models(tmp_path):
    runs = []
    for seed in (0, 1):
        (tmp_path / str(seed)).mkdir()
        init, _ = tiny_init(tmp_path / str(seed), seed=seed)
        out = tmp_path / str(seed) / "omp"
        main_imp_pretrain.main(["--dataset", "digits", "--init", str(init), "--pretrain", "std", "--save-dir",
                                str(out), "--arch", "resnet_tiny", "--cifar-stem", "--method", "omp", "--pattern",
                                "channel", "--layerwise", "--rounds", "2", "--rate", "0.4"])
        assert json.loads((out / "config.json").read_text())["layerwise"] is True
        runs.append((json.loads((out / "sparsity.json").read_text()),
                     pu.load_ticket(out / "tickets" / "round_02.pt")["masks"]))
    (levels_a, masks_a), (levels_b, masks_b) = runs
    assert list(levels_a) == ["1", "2"] and levels_a == levels_b
    assert _removed_filters(masks_a) == _removed_filters(masks_b) == {
        "layer1.0.conv1.weight": 10, "layer2.0.conv1.weight": 21, "layer3.0.conv1.weight": 41,
        "layer4.0.conv1.weight": 82}
    assert any(not torch.equal(masks_a[n], masks_b[n]) for n in masks_a)  # each θ_p chose its own filters


@pytest.mark.parametrize("extra, needle", [
    (["--method", "omp", "--pattern", "nm", "--rounds", "1"], "N:M already keeps"),
    (["--method", "rp", "--pattern", "channel"], "has no effect"),
    (["--method", "lmp", "--pattern", "channel"], "--method lmp --pattern channel always keeps"),
])
def test_layerwise_is_refused_where_it_would_change_nothing(tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_main(main_imp_pretrain.main, ["--dataset", "digits", "--init", "x", "--save-dir", str(out), *extra,
                                          "--layerwise"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--layerwise" in err and needle in err, err
    assert not out.exists()


def test_nm_pattern_is_one_level_and_rp_picks_random_groups(tmp_path):
    with pytest.raises(UserError, match="--rounds 1"):
        main_imp_pretrain.parse_args(["--dataset", "digits", "--init", "x", "--save-dir", "o", "--method", "omp",
                                      "--pattern", "nm"])
    with pytest.raises(UserError, match="--nm applies to --pattern nm only"):
        main_imp_pretrain.parse_args(["--dataset", "digits", "--init", "x", "--save-dir", "o", "--nm", "2:4"])
    out = tmp_path / "rp"
    stage1(tmp_path, out, "--method", "rp", "--pattern", "nm", "--nm", "1:4", "--rounds", "1")
    t = pu.load_ticket(out / "tickets" / "round_01.pt")
    assert t["pattern"] == "nm" and t["nm"] == [1, 4] and t["method"] == "rp"
    omp_out = tmp_path / "omp"
    stage1(tmp_path, omp_out, "--method", "omp", "--pattern", "nm", "--rounds", "1")
    o = pu.load_ticket(omp_out / "tickets" / "round_01.pt")
    assert o["nm"] == [2, 4]
    for name, m in t["masks"].items():
        if name == "conv1.weight":  # CIFAR stem: 27 inputs per filter, not a multiple of 4 -> dense
            assert bool(m.all()) and bool(o["masks"][name].all())
            continue
        assert bool((m.reshape(m.shape[0], -1, 4).sum(-1) == 1).all())
        assert bool((o["masks"][name].reshape(m.shape[0], -1, 4).sum(-1) == 2).all())
    assert any(not torch.equal(t["masks"][n] & o["masks"][n], t["masks"][n]) for n in t["masks"])


def test_imp_channel_retrains_and_keeps_filters_removed(tmp_path):
    init, _ = tiny_init(tmp_path, num_classes=3)
    data = tmp_path / "folder"
    write_image_folder(data, classes=("ant", "bee", "cat"), n_train=8, n_val=2, size=(12, 12))
    out = tmp_path / "imp"
    main_imp_pretrain.main(["--data", str(data), "--dataset", "folder", *TINY, "--init", str(init), "--pretrain", "std",
                            "--image-size", "12", "--batch-size", "8", "--rounds", "2", "--epochs-per-round", "1",
                            "--lr", "0.05", "--workers", "0", "--pattern", "channel", "--save-dir", str(out)])
    a = pu.load_ticket(out / "tickets" / "round_01.pt")
    b = pu.load_ticket(out / "tickets" / "round_02.pt")
    assert a["pattern"] == b["pattern"] == "channel" and b["method"] == "imp"
    assert pu.filter_sparsity(b["masks"]) > pu.filter_sparsity(a["masks"]) > 0


def _downstream(ticket, init, out, *extra):
    return main_downstream.main(["--dataset", "digits", "--init", str(init), "--ticket", str(ticket), "--regime", "st",
                                 "--epochs", "1", "--lr", "0.05", "--batch-size", "32", "--save-dir", str(out),
                                 *TINY, *map(str, extra)])


@pytest.mark.parametrize("pattern", ["channel", "nm"])
def test_stage2_keeps_a_structured_ticket_structured(tmp_path, pattern):
    init, model = tiny_init(tmp_path, num_classes=10)
    weights = model.state_dict()
    if pattern == "channel":
        mask = pu.channel_prune(weights, pu.full_mask(model), 0.5)
        ticket = pu.make_ticket(mask, round=1, method="omp", retrain=None, arch="resnet_tiny", pretrain="std",
                                init=str(init), source_dataset="digits", pattern="channel")
    else:
        mask = pu.nm_prune(weights, pu.full_mask(model), 2, 4)
        ticket = pu.make_ticket(mask, round=1, method="omp", retrain=None, arch="resnet_tiny", pretrain="std",
                                init=str(init), source_dataset="digits", pattern="nm", nm=[2, 4])
    path = tmp_path / "ticket.pt"
    pu.save_ticket(path, ticket)
    out = tmp_path / "run"
    _downstream(path, init, out)
    assert json.loads((out / "results.json").read_text())["sparsity"] == ticket["sparsity"]
    best = safe_load(out / "model_best.pt")["state_dict"]
    for name, m in mask.items():
        assert int(best[name][~m].count_nonzero()) == 0, name
        assert int(best[name][m].count_nonzero()) == int(m.sum()), name  # the kept weights did train
    if pattern == "channel":
        for g in pu.channel_groups(list(mask)):
            dead = ~pu.alive_filters(mask[g.conv])
            for key in ("weight", "bias"):
                assert int(best[f"{g.bn}.{key}"][dead].count_nonzero()) == 0
    else:
        for name, m in mask.items():
            if name != "conv1.weight":
                w = best[name].reshape(m.shape[0], -1, 4)
                assert bool(((w != 0).sum(-1) <= 2).all())


def _cli(argv):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "main_downstream.py"), *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow  # one subprocess: ~3 s alone, 15 s on the shared 2-core machine
@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_stage2_refuses_tickets_that_contradict_their_claims_before_training(tmp_path):
    init, model = tiny_init(tmp_path, num_classes=10)
    honest = pu.make_ticket(pu.full_mask(model), round=4, method="imp", retrain="st", arch="resnet_tiny",
                            pretrain="std", init=str(init), source_dataset="digits")
    masks = honest["masks"]
    with_head = dict(masks, **{"fc.weight": torch.zeros(10, 128, dtype=torch.bool)})
    with_bn = dict(masks, **{"bn1.weight": torch.zeros(16, dtype=torch.bool)})
    cases = {
        "claims 64.00% sparsity but its masks prune 0.00%": dict(honest, sparsity=64.0),
        "masks 'fc.weight'": dict(honest, masks=with_head, sparsity=round(pu.sparsity(with_head), 2)),
        "masks 'bn1.weight'": dict(honest, masks=with_bn, sparsity=round(pu.sparsity(with_bn), 2)),
        "sparse_coo tensor": dict(honest, masks={n: m.to_sparse() for n, m in masks.items()}),
    }
    for i, (needle, bad) in enumerate(cases.items()):
        torch.save(bad, tmp_path / f"bad_{i}.pt")
        out = tmp_path / f"run_{i}"
        argv = ["--dataset", "digits", "--init", init, "--ticket", tmp_path / f"bad_{i}.pt", "--epochs", "1",
                "--save-dir", out, *TINY]
        if i == 0:  # through the entry point once: exit 2, one line, nothing written
            proc = _cli(argv)
            assert proc.returncode == 2, (needle, proc.stderr)
            assert needle in proc.stderr and "Traceback" not in proc.stderr, (needle, proc.stderr)
        else:
            with pytest.raises(UserError, match=needle.replace("'", ".")):
                main_downstream.main([str(a) for a in argv])
        assert not (out / "results.json").exists() and not (out / "log.csv").exists()


def test_stage2_warns_about_a_ticket_covering_only_conv1(tmp_path, capsys):
    init, model = tiny_init(tmp_path, num_classes=10)
    only = {"conv1.weight": pu.full_mask(model)["conv1.weight"].clone()}
    only["conv1.weight"][:4] = False
    t = pu.make_ticket(only, round=1, method="omp", retrain=None, arch="resnet_tiny", pretrain="std",
                       init=str(init), source_dataset="digits")
    pu.save_ticket(tmp_path / "conv1.pt", t)
    enforce._COVERAGE_WARNED.clear()
    _downstream(tmp_path / "conv1.pt", init, tmp_path / "run")
    err = capsys.readouterr().err
    assert err.count("warning: the mask covers 1 of the model's") == 1, err
    assert (tmp_path / "run" / "results.json").exists()  # a warning, not a refusal
