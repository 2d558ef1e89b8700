"""Config loading: SimpleTuner names, coercion, overrides and clear errors."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.config import Config, load_config, parse_set
from pipeline.errors import ConfigError


def write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_simpletuner_style_keys_and_string_values_load(tmp_path):
    path = write(tmp_path, {"--resolution": "512", "--crop": "true", "--train_batch_size": 4, "--seed": "42"})
    config = load_config(path).config
    assert config.resolution == 512.0 and config.crop is True and config.train_batch_size == 4 and config.seed == 42


def test_toml_config_and_set_overrides(tmp_path):
    path = write(tmp_path, 'resolution = 768\ncrop_style = "center"\n', name="config.toml")
    loaded = load_config(path, ["resolution=1024", "crop=true", 'instance_prompt="a photo of sks"'])
    assert loaded.config.resolution == 1024.0
    assert loaded.config.crop is True
    assert loaded.config.instance_prompt == "a photo of sks"
    assert loaded.explicit >= {"resolution", "crop", "crop_style"}


def test_set_value_that_is_not_toml_is_a_string():
    assert parse_set("instance_prompt=a photo") == ("instance_prompt", "a photo")
    assert parse_set("--crop_aspect_buckets=[1.0, 1.5]") == ("crop_aspect_buckets", [1.0, 1.5])


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option 'resolutoin'; did you mean 'resolution'\?"):
        load_config(write(tmp_path, {"resolutoin": 1024}))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"option 'train_batch_size'.* must be int, got 'four'"):
        load_config(write(tmp_path, {"train_batch_size": "four"}))


def test_value_outside_choices_lists_them(tmp_path):
    with pytest.raises(ConfigError, match=r"'resolution_type'.*'megapixel'.*pixel, area, pixel_area"):
        load_config(write(tmp_path, {"resolution_type": "megapixel"}))


def test_simpletuner_only_keys_are_accepted_with_a_log_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="st")
    loaded = load_config(write(tmp_path, {"--cache_dir_vae": "/x", "--cache_dir_text": "/y", "--resolution": 512}))
    assert set(loaded.ignored) == {"cache_dir_vae", "cache_dir_text"}
    assert "ignoring option 'cache_dir_vae'" in caplog.text


def test_stage_keys_hold_only_what_the_stage_reads():
    keys = Config().stage_keys("prepare")
    assert "resolution" in keys and "max_workers" not in keys
    assert "max_workers" in Config().stage_keys("prepare", key_only=False)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(write(tmp_path, "{broken", name="bad.json"))


def test_every_option_group_names_real_options_and_copies_them():
    """Each typed option group (config.OptionGroup) is a view of Config: its fields are options, copied as set."""
    import dataclasses
    import importlib
    import pkgutil

    import pipeline
    from pipeline.config import OPTION_FIELDS, OptionGroup

    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        if not info.name.startswith("pipeline.schemas"):
            importlib.import_module(info.name)
    groups, todo = [], list(OptionGroup.__subclasses__())
    while todo:
        groups.append(todo.pop())
        todo += groups[-1].__subclasses__()
    assert {g.__name__ for g in groups} >= {"PublishOptions", "OptimizerOptions", "SpeedOptions"}
    config = Config(learning_rate=3e-4, lora_format="comfyui", seed=7)
    for group in groups:
        names = {f.name for f in dataclasses.fields(group)}
        assert names <= set(OPTION_FIELDS), (group.__name__, names - set(OPTION_FIELDS))
        copied = group.from_config(config)
        assert all(getattr(copied, n) == getattr(config, n) for n in names), group.__name__
