"""Run directories: which configuration changes make a directory another run's."""

import pytest

from utils.errors import UserError
from utils.rundir import config_differences, lock_holder, prepare_run_dir, release_locks


@pytest.fixture(autouse=True)
def _free_locks():
    yield
    release_locks()


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


def test_a_changed_config_points_to_restart_only_while_the_run_is_unfinished(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, {"lr": 0.1})
    assert lock_holder(run) is not None
    with pytest.raises(UserError, match="add --restart to discard this unfinished run"):
        prepare_run_dir(run, {"lr": 0.2})
    (run / "results.json").write_text("{}")
    with pytest.raises(UserError) as err:
        prepare_run_dir(run, {"lr": 0.2})
    assert "--restart" not in str(err.value) and "another --save-dir" in str(err.value)
    release_locks()
    assert lock_holder(run) is None


def test_flags_added_later_with_their_old_behaviour_are_no_difference():
    from utils.rundir import config_differences
    old = {"lr": 0.1}
    assert config_differences(old, {"lr": 0.1, "pattern": "unstructured"}) == []
    # the subset rule matters only where a subset is drawn; fp32 testing only where training was fp32
    assert config_differences({"data_rate": 1.0}, {"data_rate": 1.0, "subset": "random", "subset_seed": 0}) == []
    assert config_differences({"data_rate": 0.1}, {"data_rate": 0.1, "subset": "random"}) == [
        ("subset", "<absent>", "random")]
    assert config_differences({"amp": "off"}, {"amp": "off", "eval_amp": "off"}) == []
    assert config_differences({"amp": "auto"}, {"amp": "auto", "eval_amp": "off"}) == [("eval_amp", "<absent>", "off")]
    assert config_differences(old, {"lr": 0.1, "pattern": "channel"}) == [("pattern", "<absent>", "channel")]


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    from utils.errors import UserError
    from utils.rundir import LOCK_NAME, RunDirLock, lock_holder

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link") as err:
        RunDirLock(run_dir).acquire()
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="symbolic link"):
        lock_holder(run_dir)
    assert victim.read_text() == "keep me\n"
