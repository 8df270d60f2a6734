"""analysis/paper_vs_ours.py: the paper's stated numbers beside a double_win.csv of plot_curves.py."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import paper_vs_ours as pvo
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FIELDS = ["dataset", "data_rate", "pretrain", "method", "extreme_sparsity", "double_win_levels",
          "extreme_sparsity_contiguous", "verdict", "extreme_sparsity_supported"]
PAPER = """\
[figures]
"Fig. 3" = "Three pre-trainings"
"Fig. 4" = "Re-training"
"Fig. 5" = "Data-limited"

[[number]]
figure = "Fig. 3"
kind = "extreme_sparsity"
dataset = "cifar10"
data_rate = 1.0
pretrain = "std"
method = "imp-st"
value = 89.26
source = "§4.1 ①"

[[number]]
figure = "Fig. 3"
kind = "extreme_sparsity"
dataset = "svhn"
data_rate = 1.0
pretrain = "std"
method = "imp-st"
value = 0.0
source = "§4.1 ① svhn"

[[number]]
figure = "Fig. 3"
kind = "extreme_sparsity_range"
datasets = ["cifar10", "svhn"]
data_rate = 1.0
pretrain = "std"
method = "imp-st"
value = [0.0, 89.26]
source = "§4.1 ②"

[[number]]
figure = "Fig. 4"
kind = "extreme_sparsity"
dataset = "cifar10"
data_rate = 1.0
pretrain = "at"
method = "imp-at"
value = 91.41
source = "§4.2 imp-at"

[[number]]
figure = "Fig. 4"
kind = "extreme_sparsity"
dataset = "cifar10"
data_rate = 1.0
pretrain = "at"
method = "omp"
value = 89.26
source = "§4.2 omp"

[[number]]
figure = "Fig. 4"
kind = "extreme_sparsity"
dataset = "cifar100"
data_rate = 1.0
pretrain = "at"
method = "rp"
value = 0.0
source = "§4.2 rp"

[[number]]
figure = "Fig. 5"
kind = "stated"
setting = "SVHN, θ_AT falls to θ_STD's level"
value = "97.19%"
source = "§5 ①"
"""


def _row(dataset, pretrain, method, extreme="", contiguous="", verdict="complete", supported="", rate="1.0"):
    return {"dataset": dataset, "data_rate": rate, "pretrain": pretrain, "method": method,
            "extreme_sparsity": extreme, "double_win_levels": extreme, "extreme_sparsity_contiguous": contiguous,
            "verdict": verdict, "extreme_sparsity_supported": supported}


def write_table(out_dir, rows, fields=FIELDS):
    out_dir.mkdir(exist_ok=True)
    with open(out_dir / "double_win.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return out_dir


@pytest.fixture
def study(tmp_path):
    """An analysis of the whole study tree: IMP rows split into imp-st / imp-at."""
    out = write_table(tmp_path / "out", [
        _row("cifar10", "std", "imp-st", "89.26", "86.58", supported="86.58"),  # same
        _row("svhn", "std", "imp-st"),                                          # complete, no level: 0.00
        _row("cifar10", "at", "imp-at", "93.13", "91.41", verdict="incomplete"),  # lower bound above the paper
        _row("cifar10", "at", "omp", "86.58", "86.58", supported="83.22"),      # ours lower
        _row("cifar10", "at", "imp-st", "91.41", "91.41"),
    ])
    paper = tmp_path / "paper.toml"
    paper.write_text(PAPER, encoding="utf-8")
    return out, paper


def _table_lines(text, figure):
    section = text.split(f"## {figure}:")[1].split("\n## ")[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| setting", "| ---"))]


def test_every_stated_number_is_one_row_with_its_agreement(study):
    out, paper = study
    assert pvo.main([str(out), "--paper", str(paper)]) == 0
    text = (out / "paper_vs_ours.md").read_text(encoding="utf-8")
    fig3, fig4, fig5 = (_table_lines(text, f) for f in ("Fig. 3", "Fig. 4", "Fig. 5"))
    assert len(fig3) == 3 and len(fig4) == 3 and len(fig5) == 1
    assert fig3[0].startswith("| CIFAR-10 · 100% data · θ_STD · IMP-ST | 89.26 | 89.26 | 86.58 | 86.58 | complete | "
                              "same | §4.1 ① |")
    assert "| 0.00 | none | none | none | complete | same |" in fig3[1]  # the paper's 0.00%: no level wins
    assert "| 0.00–89.26 | 0.00–89.26 |" in fig3[2] and "| same |" in fig3[2]
    assert "| 93.13 | 91.41 | – | incomplete | ours higher (+1.72, at least) |" in fig4[0]
    assert "ours lower (-2.68)" in fig4[1]
    assert "not measured (no such row)" in fig4[2]  # RP on CIFAR-100: the analysis has no such row
    assert "| 97.19% | §5 ① |" in fig5[0] and "states no extreme sparsity" in text
    assert "3 stated extreme sparsities: 3 same." in text
    assert "3 stated extreme sparsities: 1 ours higher, 1 ours lower, 1 not measured." in text


def test_plain_imp_is_standard_retraining_and_never_imp_at():
    """plot_curves.py writes plain 'imp' when the analysis held IMP tickets of one kind only."""
    table = {("cifar10", 1.0, "at", "imp"): {"extreme_sparsity": 91.41, "extreme_sparsity_contiguous": 91.41,
                                              "extreme_sparsity_supported": None, "verdict": "complete"}}
    assert pvo.ours_for(table, "cifar10", 1.0, "at", "imp-st").value == 91.41
    assert pvo.ours_for(table, "cifar10", 1.0, "at", "imp-at").value is None
    assert pvo.ours_for(table, "cifar10", 1, "at", "imp-st").extreme == "91.41"  # 1 and 1.0 are one rate


@pytest.mark.parametrize("verdict, extreme, paper, label", [
    ("complete", 89.26, 89.26, "same"),
    ("complete", 91.41, 89.26, "ours higher (+2.15)"),
    ("complete", None, 0.0, "same"),
    ("complete", None, 20.0, "ours lower (-20.00)"),
    ("incomplete", 89.26, 89.26, "same or higher (incomplete)"),
    ("incomplete", 86.58, 89.26, "undecided (incomplete)"),
    ("incomplete", None, 89.26, "not measured (extreme withheld: runs missing)"),
    ("no-baseline", None, 89.26, "not measured (no verdict: no dense baseline)"),
    ("no-baseline", 89.26, 89.26, "not measured (no verdict: no dense baseline)"),
    ("", 89.26, 89.26, "not measured (verdict '–')"),
])
def test_agreement_labels(verdict, extreme, paper, label):
    table = {("svhn", 0.1, "fat", "imp-st"): {"extreme_sparsity": extreme, "extreme_sparsity_contiguous": extreme,
                                               "extreme_sparsity_supported": None, "verdict": verdict}}
    assert pvo.agreement(paper, pvo.ours_for(table, "svhn", 0.1, "fat", "imp-st")) == label


def test_a_range_compares_end_by_end_and_needs_every_dataset():
    def ours(*values):
        return [pvo.Ours(v, "", "", "", "complete") for v in values]
    assert pvo.range_agreement((79.03, 89.26), ours(89.26, 79.03, 83.22)) == "same"
    assert pvo.range_agreement((20.0, 89.26), ours(89.26, 79.03)).startswith("ours higher (+59.03 / +0.00)")
    assert pvo.range_agreement((79.03, 89.26), ours(73.79, 91.41)).startswith("mixed")
    missing = ours(89.26) + [pvo.Ours(None, "–", "–", "–", "–", why="no such row")]
    assert pvo.range_agreement((0.0, 89.26), missing) == "not measured (no such row)"


def test_figure_filter(study):
    out, paper = study
    pvo.main([str(out), "--paper", str(paper), "--figure", "Fig. 4", "--out", str(out / "f4.md")])
    text = (out / "f4.md").read_text(encoding="utf-8")
    assert "## Fig. 4:" in text and "## Fig. 3:" not in text
    with pytest.raises(UserError, match="--figure 'Fig. 9' is not in"):
        pvo.main([str(out), "--paper", str(paper), "--figure", "Fig. 9"])


def test_the_shipped_file_holds_every_extreme_of_figs_3_and_4():
    figures, numbers = pvo.load_paper(pvo.DEFAULT_PAPER)
    assert list(figures)[:3] == ["Fig. 3", "Fig. 4", "Fig. 5"]
    extremes = {(n["figure"], n["dataset"], n["pretrain"], n["method"]): n["value"]
                for n in numbers if n["kind"] == "extreme_sparsity"}
    fig3 = {("cifar10", "std"): 89.26, ("cifar10", "fat"): 89.26, ("cifar10", "at"): 91.41,
            ("cifar100", "std"): 73.79, ("cifar100", "fat"): 79.03, ("cifar100", "at"): 83.22,
            ("svhn", "std"): 0.0, ("svhn", "fat"): 79.03, ("svhn", "at"): 96.48}
    assert {(d, p): v for (f, d, p, m), v in extremes.items() if f == "Fig. 3" and m == "imp-st"} == fig3
    fig4 = {(f, d, m): v for (f, d, p, m), v in extremes.items() if f == "Fig. 4" and p == "at"}
    assert fig4 == {("Fig. 4", "cifar10", "imp-at"): 91.41, ("Fig. 4", "cifar100", "imp-at"): 83.22,
                    ("Fig. 4", "cifar10", "imp-st"): 91.41, ("Fig. 4", "cifar100", "imp-st"): 83.22,
                    ("Fig. 4", "cifar10", "omp"): 89.26, ("Fig. 4", "cifar100", "omp"): 79.03,
                    ("Fig. 4", "cifar10", "rp"): 20.0, ("Fig. 4", "cifar100", "rp"): 0.0}
    assert all(n["source"] for n in numbers) and any(n["figure"] == "Fig. 5" for n in numbers)


@pytest.mark.parametrize("make, needle", [
    (lambda d: None, "double_win.csv' does not exist"),
    (lambda d: write_table(d, [_row("cifar10", "at", "imp")], FIELDS[:6]), "lacks the column(s) "
                                                                          "extreme_sparsity_contiguous"),
    (lambda d: (d / "double_win.csv").write_bytes(b"\xff\xfe\x00binary"), "is not UTF-8"),
    (lambda d: write_table(d, [_row("cifar10", "at", "imp", "8x.5")]), "line 2: extreme_sparsity '8x.5'"),
    (lambda d: write_table(d, [_row("cifar10", "at", "imp", rate="all")]), "line 2: data_rate 'all'"),
    (lambda d: write_table(d, [_row("cifar10", "at", "imp")] * 2), "line 3 repeats the row"),
])
def test_a_bad_table_is_one_line(tmp_path, make, needle):
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    with pytest.raises(UserError) as err:
        pvo.read_double_win(out)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, needle", [
    ("[figures]\n\"Fig. 3\" = \"t\"\n", "holds no [[number]]"),
    (PAPER.replace('figure = "Fig. 5"', 'figure = "Fig. 7"'), "names figure 'Fig. 7'"),
    (PAPER.replace('kind = "stated"', 'kind = "accuracy"'), "has kind 'accuracy'"),
    (PAPER.replace("value = [0.0, 89.26]", "value = [89.26, 0.0]"), "#3 holds a bad value"),
    (PAPER.replace('source = "§4.2 omp"', ""), "#5 needs source"),
    ("[figures\n", "is not valid TOML"),
])
def test_a_bad_paper_file_is_one_line(tmp_path, text, needle):
    path = tmp_path / "paper.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as err:
        pvo.load_paper(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_command_line_exits_2_with_one_line(tmp_path):
    script = REPO / "analysis" / "paper_vs_ours.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "absent")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "is not a directory" in proc.stderr
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "ANALYSIS_OUT_DIR" in proc.stderr
    out = write_table(tmp_path / "out", [_row("cifar10", "at", "imp-st", "91.41", "91.41")])
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| CIFAR-10 · 100% data · θ_AT · IMP-ST | 91.41 | 91.41 |" in (out / "paper_vs_ours.md").read_text("utf-8")
