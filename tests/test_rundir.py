"""Run directories: which configuration changes make a directory another run's."""

import pytest

from utils.errors import UserError
from utils.rundir import config_differences, prepare_run_dir


def test_config_differences_lists_changes_but_not_unset_flags_of_another_version():
    assert config_differences({"lr": 0.1, "milestones": [50, 75]}, {"lr": 0.1, "milestones": [50, 75]}) == []
    assert config_differences({"milestones": [50, 75]}, {"milestones": [40]}) == [("milestones", [50, 75], [40])]
    assert config_differences({"epochs": 3}, {}) == [("epochs", 3, "<absent>")]
    # a flag that one version has, unset, and the other lacks is the same configuration
    assert config_differences({"val_size": None}, {}) == []
    assert config_differences({}, {"new_flag": None}) == []
    assert config_differences({"workers": 4}, {"workers": 8}) == []  # speed only


def test_prepare_run_dir_resumes_across_a_removed_unset_flag(tmp_path):
    assert prepare_run_dir(tmp_path / "run", {"lr": 0.1, "val_size": None}) is False
    assert prepare_run_dir(tmp_path / "run", {"lr": 0.1}) is True
    with pytest.raises(UserError, match="lr: 0.1 -> 0.2"):
        prepare_run_dir(tmp_path / "run", {"lr": 0.2})
