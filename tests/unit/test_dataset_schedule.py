"""Dataset scheduling keys (start_epoch, start_step, end_epoch, end_step) as `st prepare` reads and checks them:
SimpleTuner's normalisation, its checks (end before start, no dataset at the first step), and plain datasets' stage
keys left as they were."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.config import load_config
from pipeline.datasets import DatasetSchedule, load_dataset_list, parse_entry
from pipeline.errors import ConfigError
from tests.helpers.files import make_image, write_config


@pytest.fixture
def two_folders(tmp_path):
    for name in ("a", "b"):
        make_image(tmp_path / name / "img.png", size=(64, 64))
    return tmp_path


def datasets(root, entries, **options):
    return load_dataset_list(load_config(write_config(root, entries, resolution=64, **options))).images


def test_values_are_normalised_as_simpletuner_does(two_folders):
    loaded = load_config(write_config(two_folders, [], resolution=64))
    entry = {"id": "d", "instance_data_dir": "a"}
    spec = parse_entry({**entry, "start_epoch": 0, "start_step": -4, "end_epoch": 0, "end_step": -1}, loaded,
                       two_folders / "multidatabackend.json", 0)  # fmt: skip
    assert spec.schedule == DatasetSchedule()  # start_epoch < 1 -> 1, start_step < 0 -> 0, an end <= 0: no end
    assert spec.schedule.describe() == {}
    spec = parse_entry({**entry, "start_epoch": "2", "start_step": 5.0, "end_epoch": 4, "end_step": ""}, loaded,
                       two_folders / "multidatabackend.json", 0)  # fmt: skip
    assert spec.schedule == DatasetSchedule(start_epoch=2, start_step=5, end_epoch=4)
    assert {k: spec.describe()[k] for k in ("start_epoch", "start_step", "end_epoch")} == {
        "start_epoch": 2, "start_step": 5, "end_epoch": 4}  # fmt: skip
    assert "end_step" not in spec.describe()
    with pytest.raises(ConfigError, match=r"'start_step' must be a whole number \(an optimizer step\), got 'soon'"):
        parse_entry({**entry, "start_step": "soon"}, loaded, two_folders / "multidatabackend.json", 0)
    with pytest.raises(ConfigError, match=r"'end_epoch' must be a whole number \(an epoch\), got 1.5"):
        parse_entry({**entry, "end_epoch": 1.5}, loaded, two_folders / "multidatabackend.json", 0)


def test_the_active_rule():
    late = DatasetSchedule(start_epoch=2, start_step=3, end_epoch=3, end_step=10)
    assert not late.active(1, 5)  # epoch 1 < start_epoch
    assert not late.active(2, 2)  # step 2 < start_step
    assert late.active(2, 3) and late.active(3, 10)  # both bounds inclusive, as SimpleTuner's
    assert not late.active(4, 5) and not late.active(2, 11)  # after end_epoch, after end_step
    assert DatasetSchedule(start_step=1).starts_at_start() and not DatasetSchedule(start_step=2).starts_at_start()


def test_unscheduled_datasets_keep_their_stage_keys(two_folders):
    """A dataset without the keys (or with them at their defaults) describes itself as before: no prepare re-run, no
    new cache, the same training order."""
    plain, defaults = datasets(two_folders, [
        {"id": "plain", "instance_data_dir": "a"},
        {"id": "defaults", "instance_data_dir": "b", "start_epoch": 1, "start_step": 0, "end_epoch": None},
    ])  # fmt: skip
    for spec in (plain, defaults):
        assert not set(spec.describe()) & {"start_epoch", "start_step", "end_epoch", "end_step", "schedule"}


@pytest.mark.parametrize("entries, message", [
    ([{"id": "only", "instance_data_dir": "a", "start_step": 2}],
     r"no dataset is sampled at the start of training: 'only' \(start_epoch 1, start_step 2\); set start_epoch <= 1 "
     r"and start_step <= 1 on at least one dataset"),
    ([{"id": "x", "instance_data_dir": "a", "start_epoch": 2}, {"id": "y", "instance_data_dir": "b", "start_step": 9}],
     r"'x' \(start_epoch 2, start_step 0\), 'y' \(start_epoch 1, start_step 9\)"),
    ([{"id": "x", "instance_data_dir": "a"}, {"id": "y", "instance_data_dir": "b", "start_epoch": 3, "end_epoch": 2}],
     r"dataset 'y' has end_epoch 2 before start_epoch 3; set end_epoch >= start_epoch"),
    ([{"id": "x", "instance_data_dir": "a"}, {"id": "y", "instance_data_dir": "b", "start_step": 50, "end_step": 20}],
     r"dataset 'y' has end_step 20 before start_step 50; set end_step >= start_step"),
])  # fmt: skip
def test_schedules_that_cannot_run_are_refused(two_folders, entries, message):
    with pytest.raises(ConfigError, match=message):
        datasets(two_folders, entries)


def test_an_eval_dataset_does_not_count_as_active_at_the_start(two_folders):
    with pytest.raises(ConfigError, match="no dataset is sampled at the start of training: 'train'"):
        datasets(two_folders, [{"id": "train", "instance_data_dir": "a", "start_epoch": 2},
                               {"id": "held", "instance_data_dir": "b", "dataset_type": "eval"}])  # fmt: skip


def test_a_start_beyond_the_run_is_reported(two_folders, caplog):
    entries = [{"id": "x", "instance_data_dir": "a"}, {"id": "y", "instance_data_dir": "b", "start_epoch": 5}]
    with caplog.at_level(logging.WARNING):
        datasets(two_folders, entries, num_train_epochs=4)
    assert "dataset 'y' starts at epoch 5, but training ends at epoch 4: it will never be sampled" in caplog.text
    entries[1] = {"id": "y", "instance_data_dir": "b", "start_step": 30}
    with caplog.at_level(logging.WARNING):
        datasets(two_folders, entries, max_train_steps=20)
    assert "dataset 'y' starts at step 30, but training stops at step 20: it will never be sampled" in caplog.text


def test_prepare_exits_2_when_no_dataset_starts(cli, two_folders):
    config = write_config(two_folders, [{"id": "x", "instance_data_dir": "a", "start_epoch": 2},
                                        {"id": "y", "instance_data_dir": "b", "start_step": 4}], resolution=64)
    result = cli("prepare", "-c", config, "-o", two_folders / "out")
    assert result.exit_code == 2, result.output
    assert "no dataset is sampled at the start of training" in result.stderr and "'x' (start_epoch 2" in result.stderr
    assert "Traceback" not in result.stderr and not (two_folders / "out").exists()
    data = json.loads((two_folders / "multidatabackend.json").read_text())
    assert data[0]["start_epoch"] == 2  # the user's file is untouched
