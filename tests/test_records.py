"""One reader per file kind: each damaged form of each file is one UserError naming the file."""

import json

import pytest

from utils import records
from utils.errors import UserError

GOOD_RESULT = {"dataset": "cifar10", "arch": "resnet50", "pretrain": "at", "method": "imp", "sparsity": 89.26,
               "regime": "at", "data_rate": 1.0, "seed": 1, "sa": 90.5, "ra": 50.25, "config": {}}


def damaged_forms(tmp_path, name):
    """(label, path) for every way a file can be broken on disk."""
    forms = {"empty": b"", "truncated": b'{"dataset": "cifar10", "sa": ', "not utf-8": b"\xff\xfe\x00\x81garbage",
             "array": b"[1, 2]", "null": b"null"}
    out = []
    for label, data in forms.items():
        path = tmp_path / label.replace(" ", "_") / name
        path.parent.mkdir()
        path.write_bytes(data)
        out.append((label, path))
    folder = tmp_path / "dir" / name
    folder.mkdir(parents=True)
    out.append(("a directory", folder))
    out.append(("missing", tmp_path / "missing" / name))
    return out


@pytest.mark.parametrize("reader,name", [(records.read_results, "results.json"), (records.read_config, "config.json"),
                                         (records.read_sparsity, "sparsity.json")])
def test_every_damaged_json_is_one_line_naming_the_file(tmp_path, reader, name):
    for label, path in damaged_forms(tmp_path, name):
        with pytest.raises(UserError) as err:
            reader(path)
        message = str(err.value)
        assert str(path) in message and "\n" not in message, (label, message)


def test_results_fields_are_checked(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(GOOD_RESULT))
    assert records.read_results(path)["sa"] == 90.5
    for key, value, said in [("sa", None, "'sa' is None"), ("sa", 0.9 * 200, r"outside \[0, 100\]"),
                             ("regime", "xt", "'regime'"), ("data_rate", 0, "'data_rate'"),
                             ("config", [1], "'config'")]:
        path.write_text(json.dumps({**GOOD_RESULT, key: value}))
        with pytest.raises(UserError, match=said):
            records.read_results(path)
    path.write_text(json.dumps({k: v for k, v in GOOD_RESULT.items() if k != "seed"}))
    with pytest.raises(UserError, match="lacks the keys"):
        records.read_results(path)


def test_sparsity_levels(tmp_path):
    path = tmp_path / "sparsity.json"
    path.write_text(json.dumps({"2": 36.0, "1": 20.0}))
    assert records.read_sparsity(path) == {1: 20.0, 2: 36.0}
    for bad in ({"1": None}, {"0": 20.0}, {"x": 20.0}, {"1": 120.0}, {"1": True}):
        path.write_text(json.dumps(bad))
        with pytest.raises(UserError, match="level list"):
            records.read_sparsity(path)


def test_log_csv(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,seconds\n0,1.5\n1,2.5\n")
    assert [r["seconds"] for r in records.read_log(path, required=("seconds",))] == ["1.5", "2.5"]
    with pytest.raises(UserError, match="lacks the columns"):
        records.read_log(path, required=("val_sa",))
    path.write_bytes(b"\x00\x01\x02\xff")
    with pytest.raises(UserError, match="not UTF-8|binary"):
        records.read_log(path)
    path.write_bytes(b"epoch\x00,seconds\n")
    with pytest.raises(UserError, match="binary"):
        records.read_log(path)


def test_one_log_column_is_what_read_log_gives_for_it(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,seconds,val_sa\n0,1.5,10\n\n1,2.5\n2,,30\n")
    assert records.read_log_column(path, "seconds") == [r["seconds"] for r in records.read_log(path)] == \
        ["1.5", "2.5", ""]
    assert records.read_log_column(path, "val_sa") == [r["val_sa"] for r in records.read_log(path)] == ["10", None, "30"]
    assert records.read_log_column(path, "lr") == [None, None, None]
    path.write_bytes(b"epoch,seconds\n\x00\x01")
    with pytest.raises(UserError, match="binary data"):
        records.read_log_column(path, "seconds")


def test_read_text_names_a_directory_a_fifo_and_a_missing_file(tmp_path):
    import os

    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for name, needle in (("dir", "is a directory"), ("fifo", "does not exist"), ("none", "does not exist"),
                         ("dir/none/deeper", "does not exist")):
        with pytest.raises(UserError, match=needle):
            records.read_text(str(tmp_path / name), "results file")
    (tmp_path / "bad").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match="not UTF-8"):
        records.read_text(tmp_path / "bad", "results file")
    (tmp_path / "ok").write_text("ok")
    assert records.read_text(tmp_path / "ok", "results file") == "ok"
