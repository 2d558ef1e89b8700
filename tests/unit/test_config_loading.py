"""Reading configs and dataset lists as SimpleTuner does: relative paths, trailing commas, config.env, entry order."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.config import load_config, simpletuner_config_path, strip_trailing_commas
from pipeline.datasets import load_datasets
from pipeline.errors import ConfigError, NotSupportedError


def write_list(folder, entries, name="multidatabackend.json"):
    path = folder / name
    path.write_text(json.dumps(entries))
    return path


def config_in(folder, **options):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(options))
    return path


# ------------------------------------------------------------------------------------------- relative paths


def test_relative_path_resolves_from_the_working_folder_first(tmp_path, monkeypatch):
    """SimpleTuner's layout: config/config.json names config/multidatabackend.json, read from the working folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "datasets" / "pics").mkdir(parents=True)
    config_path = config_in(tmp_path / "config", data_backend_config="config/multidatabackend.json")
    write_list(tmp_path / "config", [{"id": "pics", "instance_data_dir": "datasets/pics"}])
    loaded = load_config(config_path)
    assert loaded.resolve_path("config/multidatabackend.json") == tmp_path / "config" / "multidatabackend.json"
    [spec] = load_datasets(loaded)
    assert spec.root == (tmp_path / "datasets" / "pics").resolve()


def test_relative_path_falls_back_to_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "project"
    (project / "pics").mkdir(parents=True)
    config_path = config_in(project, data_backend_config="multidatabackend.json")
    write_list(project, [{"id": "pics", "instance_data_dir": "pics"}])
    loaded = load_config(config_path)
    assert loaded.resolve_path("multidatabackend.json") == project / "multidatabackend.json"
    assert loaded.resolve_path("nowhere.json") == project / "nowhere.json"  # neither exists: beside the config
    [spec] = load_datasets(loaded)
    assert spec.root == (project / "pics").resolve()


def test_a_path_in_both_places_that_differs_is_an_error_naming_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "project"
    config_path = config_in(project, data_backend_config="multidatabackend.json")
    write_list(project, [{"id": "a", "instance_data_dir": "a"}])
    write_list(tmp_path, [{"id": "b", "instance_data_dir": "b"}])
    loaded = load_config(config_path)
    with pytest.raises(ConfigError) as caught:
        load_datasets(loaded)
    assert str(tmp_path / "multidatabackend.json") in str(caught.value)
    assert str(project / "multidatabackend.json") in str(caught.value)
    assert caught.value.exit_code == 2


def test_the_same_file_reached_both_ways_is_fine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_path = config_in(tmp_path, data_backend_config="multidatabackend.json")
    write_list(tmp_path, [])
    assert load_config(config_path).resolve_path("multidatabackend.json") == tmp_path / "multidatabackend.json"


# ------------------------------------------------------------------------------------------- trailing commas


def test_trailing_commas_are_dropped_outside_strings_only():
    text = '{"a": [1, 2, ], "b": "x,}", "c": "q\\",]",\n}'
    assert json.loads(strip_trailing_commas(text)) == {"a": [1, 2], "b": "x,}", "c": 'q",]'}


def test_config_and_dataset_list_with_trailing_commas_load(tmp_path, monkeypatch):
    """SimpleTuner's examples/flux.peft-lora/config.json ends with `"validation_steps": 50,\\n}`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pics").mkdir()
    (tmp_path / "config.json").write_text('{\n  "data_backend_config": "list.json",\n  "validation_steps": 50,\n}')
    (tmp_path / "list.json").write_text('[\n  {"id": "pics", "instance_data_dir": "pics",},\n]')
    loaded = load_config(tmp_path / "config.json")
    assert loaded.config.validation_step_interval == 50
    assert [s.id for s in load_datasets(loaded)] == ["pics"]


# ------------------------------------------------------------------------------------------- config.env


def test_config_env_sets_options_from_variables_and_extra_args(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ST_TEST_RATE", "3e-5")
    env = tmp_path / "config.env"
    env.write_text(
        "# SimpleTuner launcher settings\n"
        "export MODEL_FAMILY=sdxl\n"
        "MODEL_TYPE='lora'\n"
        "USE_EMA=false\n"
        "TRAIN_BATCH_SIZE=2\n"
        "CUDA_VISIBLE_DEVICES=0\n"
        'TRAINER_EXTRA_ARGS="--lora_rank=8 --crop"\n'
        "TRAINER_EXTRA_ARGS+=\" --learning_rate ${ST_TEST_RATE} --validation_prompt='a photo of sks'\"\n"
        "TRAIN_BATCH_SIZE=4  # the last assignment wins\n"
    )
    caplog.set_level(logging.INFO, logger="st")
    config = load_config(env).config
    assert config.model_family == "sdxl" and config.model_type == "lora" and config.use_ema is False
    assert config.train_batch_size == 4 and config.lora_rank == 8 and config.crop is True
    assert config.learning_rate == 3e-5 and config.validation_prompt == "a photo of sks"
    assert "ignoring variable CUDA_VISIBLE_DEVICES" in caplog.text


def test_extra_args_win_over_variables(tmp_path):
    env = tmp_path / "config.env"
    env.write_text('LEARNING_RATE=1e-4\nTRAINER_EXTRA_ARGS="--learning_rate=2e-4"\n')
    assert load_config(env).config.learning_rate == 2e-4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("just some words\n", "line 1: expected a shell assignment NAME=value"),
        ('TRAINER_EXTRA_ARGS="rank=8"\n', "TRAINER_EXTRA_ARGS holds 'rank=8', which is not an --option"),
        ("MODEL_NAME='unclosed\n", "line 1: No closing quotation"),
        ('TRAINER_EXTRA_ARGS="--resolutoin=512"\n', "unknown option 'resolutoin'; did you mean 'resolution'"),
    ],
)
def test_config_env_errors_are_clear(tmp_path, text, message):
    env = tmp_path / "config.env"
    env.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(env)


def test_simpletuner_config_selection_by_env_and_backend(tmp_path):
    (tmp_path / "config" / "run1").mkdir(parents=True)
    (tmp_path / "config" / "config.json").write_text("{}")
    (tmp_path / "config" / "run1" / "config.toml").write_text("")
    (tmp_path / "config" / "run1" / "config.env").write_text("")
    assert simpletuner_config_path({}, tmp_path) == tmp_path / "config" / "config.json"
    assert simpletuner_config_path({"ENV": "default"}, tmp_path) == tmp_path / "config" / "config.json"
    assert simpletuner_config_path({"ENV": "run1"}, tmp_path) == tmp_path / "config" / "run1" / "config.toml"
    chosen = simpletuner_config_path({"ENV": "run1", "CONFIG_BACKEND": "ENV"}, tmp_path)
    assert chosen == tmp_path / "config" / "run1" / "config.env"
    with pytest.raises(ConfigError, match="CONFIG_BACKEND 'yaml' is not one of json, toml, env"):
        simpletuner_config_path({"CONFIG_BACKEND": "yaml"}, tmp_path)
    with pytest.raises(ConfigError, match="no config.json, config.toml or config.env in .*other"):
        simpletuner_config_path({"ENV": "other"}, tmp_path)


# ------------------------------------------------------------------------------------------- dataset entries


def _load_list(tmp_path, monkeypatch, entries):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pics").mkdir(exist_ok=True)
    write_list(tmp_path, entries)
    return load_datasets(load_config(config_in(tmp_path, data_backend_config="multidatabackend.json")))


@pytest.mark.parametrize("storage", ["webshart", "memory"])
def test_storage_type_is_checked_before_its_keys(tmp_path, monkeypatch, storage):
    entry = {"id": "remote", "type": storage, "source": "user/set"}
    with pytest.raises(NotSupportedError, match=f"storage type '{storage}' is not supported yet"):
        _load_list(tmp_path, monkeypatch, [entry])


def test_dataset_type_is_checked_before_its_keys(tmp_path, monkeypatch):
    entry = {"id": "clips", "dataset_type": "audio", "audio": {"sample_rate": 16000}}
    with pytest.raises(NotSupportedError, match="dataset_type 'audio' is not supported yet"):
        _load_list(tmp_path, monkeypatch, [entry])


def test_an_unknown_conditioning_type_names_the_known_ones(tmp_path, monkeypatch):
    entries = [{"id": "pics", "instance_data_dir": "pics", "conditioning_data": "ctrl"},
               {"id": "ctrl", "dataset_type": "conditioning", "instance_data_dir": "pics", "conditioning_type": "canny"}]
    with pytest.raises(ConfigError, match="conditioning_type 'canny' is not one of controlnet, mask"):
        _load_list(tmp_path, monkeypatch, entries)


def test_embed_entries_are_set_aside_before_id_checks(tmp_path, monkeypatch):
    entries = [
        {"id": "pics", "instance_data_dir": "pics"},
        {"id": "text-embeds.sdxl", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
        {"id": "vae/embeds", "dataset_type": "image_embeds", "cache_dir": "cache/vae"},
    ]
    assert [s.id for s in _load_list(tmp_path, monkeypatch, entries)] == ["pics"]


def test_an_image_dataset_id_with_a_slash_is_still_refused(tmp_path, monkeypatch):
    """Dots are fine in an id (tests/unit/test_dataset_ids.py); a path separator is not."""
    with pytest.raises(ConfigError, match="dataset id 'a/b' contains a path separator"):
        _load_list(tmp_path, monkeypatch, [{"id": "a/b", "instance_data_dir": "pics"}])
