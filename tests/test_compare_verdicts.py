"""analysis/compare_verdicts.py: two double-win tables compared cell by cell, by support label."""

import csv

import pytest

from analysis import compare_verdicts
from utils.errors import UserError

DETAIL_FIELDS = ["dataset", "data_rate", "pretrain", "method", "sparsity", "judged", "double_win",
                 "double_win_support"]
ROW_FIELDS = ["dataset", "data_rate", "pretrain", "method", "extreme_sparsity", "double_win_levels",
              "extreme_sparsity_contiguous", "verdict", "extreme_sparsity_supported"]


def write_out(path, cells, extreme, method="imp"):
    path.mkdir()
    with open(path / "double_win_details.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, DETAIL_FIELDS)
        w.writeheader()
        for s, (win, support) in cells.items():
            w.writerow({"dataset": "digits", "data_rate": "1.0", "pretrain": "at", "method": method, "sparsity": s,
                        "judged": "True", "double_win": str(win), "double_win_support": support})
    with open(path / "double_win.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ROW_FIELDS)
        w.writeheader()
        w.writerow({"dataset": "digits", "data_rate": "1.0", "pretrain": "at", "method": method,
                    "extreme_sparsity": extreme, "double_win_levels": "", "extreme_sparsity_contiguous": extreme,
                    "verdict": "complete", "extreme_sparsity_supported": ""})


def test_changes_are_counted_by_the_reference_support(tmp_path):
    write_out(tmp_path / "a", {"40.00": (True, 0.97), "64.00": (True, 0.5), "78.40": (False, 0.02)}, "64.00")
    write_out(tmp_path / "b", {"40.00": (True, 0.93), "64.00": (False, 0.4), "78.40": (False, 0.2)}, "40.00")
    res = compare_verdicts.compare(tmp_path / "a", tmp_path / "b")
    assert res["cells"] == {"supported": 1, "uncertain": 1, "contradicted": 1}
    assert res["changed"] == {"uncertain": 1}  # only the uncertain cell flipped
    assert res["label_changed"] == {"contradicted": 1}  # 0.02 -> 0.2 is uncertain now, its verdict the same
    assert res["rows_changed"]["extreme_sparsity"] == 1
    text = "\n".join(compare_verdicts.report(tmp_path / "a", [tmp_path / "b"]))
    assert "changed: digits 1.0 at imp 64.00%: win (0.50, uncertain) -> no (0.40)" in text


def test_channel_levels_are_matched_by_their_rank_in_the_row(tmp_path):
    """Channel tickets of another source model reach other weight sparsities at the same round."""
    write_out(tmp_path / "a", {"38.15": (True, 0.95), "61.91": (True, 0.91)}, "61.91", method="omp_channel")
    write_out(tmp_path / "b", {"37.40": (True, 0.92), "61.11": (False, 0.05)}, "37.40", method="omp_channel")
    res = compare_verdicts.compare(tmp_path / "a", tmp_path / "b")
    assert res["cells"] == {"supported": 2} and not res["unmatched_reference"] and not res["unmatched_other"]
    assert res["changed"] == {"supported": 1}
    assert res["changed_cells"][0][0][-1] == "61.91"


def test_a_directory_without_the_table_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="double_win_details.csv"):
        compare_verdicts.compare(tmp_path, tmp_path)


def test_unstructured_levels_are_matched_by_sparsity_and_the_unmatched_listed(tmp_path):
    """One table lacking a level must not shift every later level onto the wrong one."""
    write_out(tmp_path / "a", {"20.00": (True, 0.95), "36.00": (True, 0.95), "48.80": (False, 0.01)}, "36.00")
    write_out(tmp_path / "b", {"20.00": (True, 0.95), "48.80": (False, 0.02)}, "20.00")
    res = compare_verdicts.compare(tmp_path / "a", tmp_path / "b")
    assert res["cells"] == {"supported": 1, "contradicted": 1} and res["changed"] == {}
    assert [k[-1] for k in res["unmatched_reference"]] == ["36.00"] and res["unmatched_other"] == []
    text = "\n".join(compare_verdicts.report(tmp_path / "a", [tmp_path / "b"]))
    assert "1 level(s) only in" in text and "digits 1.0 at imp 36.00%" in text


@pytest.mark.parametrize("content", [b"", b"\xff\xfe binary", b"a,b\n1,2\n"])
def test_a_file_that_is_not_a_verdict_table_is_one_clear_error(tmp_path, content):
    write_out(tmp_path / "a", {"20.00": (True, 0.95)}, "20.00")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "double_win_details.csv").write_bytes(content)
    (tmp_path / "b" / "double_win.csv").write_bytes(content)
    with pytest.raises(UserError, match="double_win") as err:
        compare_verdicts.compare(tmp_path / "a", tmp_path / "b")
    assert "\n" not in str(err.value)


def test_the_settled_summary_counts_reversals_and_changes_over_all_tables(tmp_path):
    write_out(tmp_path / "a", {"40.00": (True, 0.95), "64.00": (False, 0.05), "78.40": (False, 0.03),
                               "87.04": (True, 0.5)}, "40.00")
    write_out(tmp_path / "b", {"40.00": (True, 0.92), "64.00": (True, 0.6), "78.40": (False, 0.01),
                               "87.04": (True, 0.95)}, "64.00")
    write_out(tmp_path / "c", {"40.00": (False, 0.08), "64.00": (False, 0.2), "78.40": (False, 0.0),
                               "87.04": (True, 0.93)}, "")
    tables = [compare_verdicts.read_cells(tmp_path / n) for n in "abc"]
    s = compare_verdicts.settled_summary(tables)
    # 40.00: supported twice, contradicted once (a reversal); 64.00: settled in a only, its verdict changed;
    # 78.40: contradicted everywhere; 87.04: settled in b and c, the same verdict everywhere
    assert s == {"cells": 4, "settled_everywhere": 1, "settled": 4, "changed": 2, "reversals": 1}
    assert compare_verdicts.settled_summary(tables[:1])["changed"] == 0
    text = "\n".join(compare_verdicts.summary_lines([tmp_path / n for n in "abc"]))
    assert "verdict not the same in every table: 2 (one in 2.0)" in text and "another): 1" in text
