"""Hardening round 3, analysis side: like-with-like verdicts, one protocol per figure group, runs kept
at chance level marked, benchmark records with impossible measures refused, and every run file the
analysis tools read failing in one line."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import compare_verdicts, loss_landscape, paper_vs_ours, plot_companion, plot_curves, robustness
from tests.test_analysis import DENSE, LEVELS, read_table, write_at_study, write_level, write_result
from tests.test_companion import fake_record
from utils.cli import run_main
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EPS8, EPS4 = 8 / 255, 4 / 255


def set_config(runs, match="", **values):
    """Merge ``values`` into the config of every results.json under ``runs`` whose run directory's name
    holds ``match``."""
    for path in sorted(Path(runs).rglob("results.json")):
        if match in path.parent.name:
            obj = json.loads(path.read_text())
            obj["config"].update(values)
            path.write_text(json.dumps(obj))


def threat(test_eps):
    return dict(eps=EPS8, alpha=2 / 255, train_steps=10, test_eps=test_eps, test_alpha=2 / 255, test_steps=20,
                norm="linf")


def one_line_exit_2(capsys, main, argv):
    """Run ``main`` as its script does: exit status 2 and one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exc:
        run_main(main, argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert "Traceback" not in err and "\n" not in err and err.startswith("error: "), err
    return err


# --------------------------------------------------------------------------- defect 4: like with like

def test_tickets_and_a_dense_baseline_of_another_threat_model_get_no_verdict(tmp_path):
    runs = tmp_path / "runs"
    write_at_study(runs)
    set_config(runs, **threat(EPS8))
    assert plot_curves.verdict_rows([runs])[0]["verdict"] == "complete"  # one threat model: judged

    set_config(runs, "_dense_", **threat(EPS4))  # the dense baseline tested at 4/255, the tickets at 8/255
    out = tmp_path / "out"
    assert plot_curves.main([str(runs), "--out", str(out), "--no-figures"]) == 0
    (row,) = read_table(out)[1]
    assert row["verdict"] == "threat-mismatch"
    assert row["extreme_sparsity"] == row["extreme_sparsity_supported"] == row["extreme_sparsity_contiguous"] == ""
    warnings = (out / "warnings.txt").read_text()
    both = ("test_eps 0.0313725 (= 8/255)", "test_eps 0.0156863 (= 4/255)")
    assert all(b in warnings for b in both) and "dense baseline" in warnings
    md = (out / "double_win.md").read_text()
    assert all(b in md.split("## Incomplete rows")[1] for b in both)
    with open(out / "double_win_details.csv", newline="") as fh:
        details = list(csv.DictReader(fh))
    assert not any(r["judged"] == "True" for r in details)
    assert all(both[0] in r["note"] and both[1] in r["note"] for r in details)


def test_only_the_threat_model_a_regime_uses_is_compared(tmp_path):
    """ST trains without an attack: a dense ST baseline trained with another ε is still comparable,
    but not one tested with another norm."""
    runs = tmp_path / "runs"
    write_at_study(runs)
    set_config(runs, **threat(EPS8))
    set_config(runs, "_dense_0.00_st_", eps=EPS4, train_steps=3)
    assert plot_curves.verdict_rows([runs])[0]["verdict"] == "complete"
    set_config(runs, "_dense_0.00_st_", norm="l2")
    row = plot_curves.verdict_rows([runs])[0]
    assert row["verdict"] == "threat-mismatch" and row["extreme_sparsity"] == ""


# --------------------------------------------------------------------------- one protocol per figure group

def test_a_group_mixing_protocols_is_refused_unless_asked(tmp_path):
    runs = tmp_path / "runs"
    write_at_study(runs)
    set_config(runs, epochs=1, lr=0.1, schedule="step", milestones=[50, 75], **threat(EPS8))
    set_config(runs, "imp_48.80_at_", epochs=2)  # one level rerun after the grid changed
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "analysis/plot_curves.py", str(runs), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert "cifar10, data rate 1.0, pretrain at, method imp, regime at" in err
    assert "epochs 1" in err and "epochs 2" in err and "--mix-protocols" in err
    assert not out.exists()

    assert plot_curves.main([str(runs), "--out", str(out), "--no-figures", "--mix-protocols"]) == 0
    assert "differ in their protocol (--mix-protocols)" in (out / "warnings.txt").read_text()


def test_protocol_settings_a_run_does_not_use_are_not_compared(tmp_path):
    runs = tmp_path / "runs"
    write_at_study(runs)
    set_config(runs, epochs=1, schedule="cosine", milestones=[50, 75], fat_guard=True, **threat(EPS8))
    set_config(runs, "_st_s2", eps=EPS4, attack_bn="eval", fat_guard=False)  # ST: no training attack
    set_config(runs, "_20.00_", milestones=[10])  # a cosine schedule ignores them
    assert plot_curves.main([str(runs), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
    set_config(runs, "_20.00_st_s1", val_size=500)  # 500 against null (the default); seed 3 records none
    set_config(runs, "_20.00_st_s2", val_size=None)
    with pytest.raises(UserError, match="val_size 500") as err:
        plot_curves.main([str(runs), "--out", str(tmp_path / "out2"), "--no-figures"])
    assert "val_size unset (the default)" in str(err.value)


# --------------------------------------------------------------------------- chance-level runs

def test_runs_kept_at_chance_level_are_marked(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_at_study(runs)
    set_config(runs, "imp_36.00_st_s1", allow_chance=True, chance_level=True)
    out = tmp_path / "out"
    assert plot_curves.main([str(runs), "--out", str(out), "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert "1 run(s) ended at chance level" in err and "cifar10_1.0_at_imp_36.00_st_s1" in err
    md = (out / "double_win.md").read_text()
    header, _, levels = md.split("## Double-win per level")[1].strip().splitlines()[:3]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in levels.split("|")]))
    assert cells["36.00"].endswith(" *") and not cells["20.00"].endswith("*")
    assert "chance level" in md.split("## Double-win per level")[1]
    with open(out / "double_win_details.csv", newline="") as fh:
        notes = {r["sparsity"]: r["note"] for r in csv.DictReader(fh)}
    assert "chance-level runs" in notes["36.00"] and notes["20.00"] == ""


def test_a_dense_baseline_at_chance_level_marks_every_level(tmp_path):
    runs = tmp_path / "runs"
    write_at_study(runs)
    set_config(runs, "_dense_0.00_at_s2", allow_chance=True, chance_level=True)
    out = tmp_path / "out"
    plot_curves.main([str(runs), "--out", str(out), "--no-figures"])
    md = (out / "double_win.md").read_text().split("## Double-win per level")[1]
    row = md.strip().splitlines()[2]
    assert row.count(" *") == len(LEVELS)


# --------------------------------------------------------------------------- benchmark records

@pytest.mark.parametrize("key, value", [("latency_ms", -1.0), ("latency_ms", float("nan")),
                                        ("flops_per_image", -5.0), ("flops_per_image", float("inf")),
                                        ("throughput_images_per_s", -7.0), ("latency_ms", "3")])
def test_impossible_benchmark_measures_are_refused(tmp_path, capsys, key, value):
    bench = fake_record(tmp_path / "b.json")
    obj = json.loads(bench.read_text())
    obj["rows"][2][key] = value
    bench.write_text(json.dumps(obj))  # NaN and Infinity as Python's json writes them
    err = one_line_exit_2(capsys, plot_companion.main, [str(tmp_path), "--out", str(tmp_path / "o"), "--bench",
                                                        str(bench)])
    assert str(bench) in err and "channel_50" in err and key in err and "non-negative" in err


def test_a_flops_count_the_benchmark_could_not_make_stays_allowed(tmp_path):
    bench = fake_record(tmp_path / "b.json")
    obj = json.loads(bench.read_text())
    obj["rows"][2]["flops_per_image"] = None
    bench.write_text(json.dumps(obj))
    record = plot_companion.load_bench(bench)
    assert [r.flops for r in record.rows if r.variant == "channel_50"] == [None]


# --------------------------------------------------------------------------- damaged run files

KINDS = ("empty", "truncated", "not-utf8", "wrong-type", "null-fields", "directory")


def damage(path, kind):
    """Replace the JSON file ``path`` with a damaged one of ``kind``."""
    valid = json.loads(path.read_text()) if path.is_file() else {"dataset": "digits", "arch": "resnet_tiny"}
    text = json.dumps(valid)
    if path.is_file():
        path.unlink()
    if kind == "directory":
        path.mkdir()
        (path / "inside").write_text("x")
    elif kind == "truncated":
        path.write_text(text[: len(text) // 2])
    elif kind == "null-fields":
        path.write_text(json.dumps({k: None for k in valid}))
    else:
        path.write_bytes({"empty": b"", "not-utf8": b'{"dataset": "\xff\xfe"}', "wrong-type": b"[1, 2, 3]"}[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_results_json_is_a_skipped_run_in_the_table(tmp_path, kind):
    runs = tmp_path / "runs"
    write_at_study(runs)
    bad = write_result(runs, sparsity=20.0, regime="st", seed=4, name="damaged") / "results.json"
    damage(bad, kind)
    out = tmp_path / "out"
    assert plot_curves.main([str(runs), "--out", str(out), "--no-figures"]) == 0
    assert f"skipped '{bad.resolve()}'" in (out / "warnings.txt").read_text()
    assert read_table(out)[1][0]["extreme_sparsity"] == "89.26"


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_results_json_alone_is_one_line_in_every_tool(tmp_path, capsys, kind):
    runs = tmp_path / "runs"
    bad = write_result(runs, sparsity=20.0, regime="st", seed=1, name="damaged") / "results.json"
    damage(bad, kind)
    for main in (plot_curves.main, plot_companion.main):
        err = one_line_exit_2(capsys, main, [str(runs), "--out", str(tmp_path / "out")])
        assert f"skipped '{bad.resolve()}'" in err
    # robustness.py reads a run's results.json beside its config.json and model
    (bad.parent / "config.json").write_text(json.dumps({"dataset": "digits", "arch": "resnet_tiny", "eps": EPS8}))
    (bad.parent / "model_best.pt").write_bytes(b"not read before the run files")
    err = one_line_exit_2(capsys, robustness.main, [str(bad.parent), "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert "results file" in err and str(bad) in err


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_config_json_is_one_line_in_every_tool(tmp_path, capsys, kind):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_best.pt").write_bytes(b"not read before the config")
    config = run / "config.json"
    config.write_text(json.dumps({"dataset": "digits", "arch": "resnet_tiny", "eps": EPS8, "seed": 1}))
    damage(config, kind)
    for main in (robustness.main, loss_landscape.main):
        err = one_line_exit_2(capsys, main, [str(run), "--out", str(tmp_path / "out"), "--device", "cpu"])
        assert "run config" in err and str(config) in err


@pytest.mark.parametrize("field, value", [("dataset", None), ("eps", None), ("seed", "one"), ("test_steps", 2.5),
                                          ("classes", "5-9"), ("image_size", True), ("arch", 3)])
def test_config_fields_of_the_wrong_type_are_one_line(tmp_path, capsys, field, value):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_best.pt").write_bytes(b"x")
    cfg = {"dataset": "digits", "arch": "resnet_tiny", "eps": EPS8, "seed": 1}
    cfg[field] = value
    (run / "config.json").write_text(json.dumps(cfg))
    for main in (robustness.main, loss_landscape.main):
        err = one_line_exit_2(capsys, main, [str(run), "--out", str(tmp_path / "out"), "--device", "cpu"])
        assert f"'{field}'" in err


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_sparsity_json_leaves_its_levels_unchecked_with_a_warning(tmp_path, kind):
    stage1 = tmp_path / "stage1"
    (stage1 / "tickets").mkdir(parents=True)
    (stage1 / "sparsity.json").write_text(json.dumps({str(k + 1): s for k, s in enumerate(LEVELS)}))
    damage(stage1 / "sparsity.json", kind)
    runs = tmp_path / "runs"
    write_level(runs, sparsity=0.0, **DENSE)
    for seed in (1, 2, 3):
        for regime, ra in (("st", None), ("at", 50.0)):
            write_result(runs, sparsity=20.0, regime=regime, seed=seed, sa=92.0 if regime == "st" else 82.0, ra=ra,
                         ticket=str(stage1 / "tickets" / "round_01.pt"))
    out = tmp_path / "out"
    assert plot_curves.main([str(runs), "--out", str(out), "--no-figures"]) == 0
    warnings = (out / "warnings.txt").read_text()
    assert "sparsity.json" in warnings and "levels are not checked" in warnings


@pytest.mark.parametrize("kind", ("empty", "not-utf8", "wrong-type", "directory", "short-row"))
def test_a_damaged_verdict_table_is_one_line(tmp_path, capsys, kind):
    runs = tmp_path / "runs"
    write_at_study(runs)
    ref, other = tmp_path / "ref", tmp_path / "other"
    for out in (ref, other):
        plot_curves.main([str(runs), "--out", str(out), "--no-figures"])
    for name in ("double_win_details.csv", "double_win.csv"):
        table = other / name
        text = table.read_text()
        table.unlink()
        if kind == "short-row":  # a copy cut off inside its last row
            table.write_text(text[: text.rindex(",", 0, len(text) - 2)])
        elif kind == "directory":
            table.mkdir()
        else:
            table.write_bytes({"empty": b"", "not-utf8": b"dataset,\xff\xfe\n", "wrong-type": b'{"rows": []}'}[kind])
    err = one_line_exit_2(capsys, compare_verdicts.main, [str(ref), str(other)])
    assert "double_win" in err
    err = one_line_exit_2(capsys, paper_vs_ours.main, [str(other)])
    assert "double_win.csv" in err
