"""Every option of SimpleTuner's reference is implemented, accepted (cannot change weights or outputs) or refused
(exit 2 naming the feature unless at its default), and SimpleTuner's aliases reach their target options."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.config import OPTION_FIELDS, Config, load_config
from pipeline.datasets import parse_entry
from pipeline.errors import ConfigError
from pipeline.simpletuner import DATASET_KEY_STATES, OPTION_STATES, Accepted, Alias, Refused
from tests.helpers.files import make_image, write_config

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "simpletuner-options.txt"
# The reference's option names, kept in the repository so that the state checks run wherever the tests run.
NAMES_FILE = Path(__file__).resolve().parents[1] / "data" / "simpletuner_option_names.txt"
# `--name` words of the reference that are not SimpleTuner options: its "`--arguments`" placeholder, argparse's
# `--help`, accelerate's `--multi_gpu`, and the upstream LayerSync flags it translates (`--reg-weight`, ...).
NOT_OPTIONS = {"arguments", "help", "multi_gpu", "reg", "encoder", "gt"}


def reference_option_names() -> set[str]:
    """The option names of the reference: `### --name` headings, argparse's usage and option lines, aliases, and
    options named in the prose (`--dynamo_mode=...`)."""
    text = REFERENCE.read_text(encoding="utf-8")
    return set(re.findall(r"--([A-Za-z][A-Za-z0-9_]*)", text)) - NOT_OPTIONS


NAMES = [line for line in NAMES_FILE.read_text().splitlines() if line and not line.startswith("#")]


@pytest.mark.skipif(not REFERENCE.is_file(), reason="the SimpleTuner option reference is not on this machine")
def test_the_kept_name_list_is_the_references():
    assert NAMES == sorted(reference_option_names())


REFUSED = sorted(name for name, state in OPTION_STATES.items() if isinstance(state, Refused))


def write(tmp_path, options: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({f"--{k}": v for k, v in options.items()}))
    return path


def non_default(state: Refused):
    """A value that asks for the refused feature."""
    default = state.default
    if isinstance(default, bool) or default is None:
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    return f"not-{default}"


def test_the_reference_defines_339_options():
    assert len(NAMES) == 339
    assert {"lora_type", "checkpointing_steps", "validation_steps", "crepa_enabled", "dynamo_mode"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_each_reference_option_is_in_exactly_one_state(name):
    states = [name in OPTION_FIELDS, name in OPTION_STATES]
    assert states.count(True) == 1, f"{name}: implemented {states[0]}, in the SimpleTuner table {states[1]}"


def test_the_table_holds_no_config_field_and_aliases_name_real_options():
    assert not set(OPTION_STATES) & set(OPTION_FIELDS)
    for name, state in OPTION_STATES.items():
        if isinstance(state, Alias):
            assert state.target in OPTION_FIELDS, name
        if isinstance(state, Accepted):
            assert state.reason, name


@pytest.mark.parametrize("name", REFUSED)
def test_a_refused_option_stops_at_any_value_but_its_default(tmp_path, name):
    state = OPTION_STATES[name]
    value = non_default(state)
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, {name: value}))
    message = str(error.value)
    assert f"st does not implement `{name}` (a SimpleTuner option) yet: {state.feature}" in message
    assert "did you mean" not in message
    for unset in (state.default, None):
        loaded = load_config(write(tmp_path, {name: unset}))
        assert loaded.config == Config()


@pytest.mark.parametrize("name", [n for n, s in OPTION_STATES.items() if isinstance(s, Accepted)])
def test_an_accepted_option_loads_with_any_value_and_changes_nothing(tmp_path, name):
    loaded = load_config(write(tmp_path, {name: "anything"}))
    assert loaded.config == Config() and name in loaded.ignored


def test_refusal_reads_values_as_a_file_spells_them(tmp_path):
    for value in ("0", 0, " 1", None, ""):
        if value == " 1":
            with pytest.raises(ConfigError, match="scheduled sampling"):
                load_config(write(tmp_path, {"scheduled_sampling_max_step_offset": value}))
            continue
        load_config(write(tmp_path, {"scheduled_sampling_max_step_offset": value}))
    load_config(write(tmp_path, {"train_text_encoder": "false", "snr_weight": "1.0"}))
    with pytest.raises(ConfigError, match="RamTorch streaming of the denoiser's Embedding"):
        load_config(write(tmp_path, {"ramtorch_disable_extensions": "false"}))
    with pytest.raises(ConfigError, match="st trains the text encoders of model_family sd1x and sdxl only"):
        load_config(write(tmp_path, {"train_text_encoder": "true", "model_family": "flux"}))


@pytest.mark.parametrize(
    "options, field, value",
    [
        ({"checkpointing_steps": 5}, "checkpoint_step_interval", 5),
        ({"validation_steps": "20"}, "validation_step_interval", 20),
        ({"adam_beta1": 0.8, "adam_beta2": 0.99}, "optimizer_beta1", 0.8),
        ({"adam_beta2": 0.99}, "optimizer_beta2", 0.99),
        ({"use_8bit_adam": True}, "optimizer", "bnb-adamw8bit"),
        ({"use_8bit_adam": "false"}, "optimizer", Config().optimizer),
        ({"allow_tf32": False}, "disable_tf32", True),
        ({"fused_qkv_projections": True}, "fuse_qkv_projections", True),
        ({"checkpointing_steps": 5, "checkpoint_step_interval": 5}, "checkpoint_step_interval", 5),
        ({"use_8bit_adam": True, "optimizer": "bnb-adamw8bit"}, "optimizer", "bnb-adamw8bit"),
    ],
)
def test_aliases_reach_their_target(tmp_path, options, field, value):
    loaded = load_config(write(tmp_path, options))
    assert getattr(loaded.config, field) == value
    assert field in loaded.explicit or value == getattr(Config(), field)


@pytest.mark.parametrize(
    "options, named",
    [
        (
            {"checkpointing_steps": 5, "checkpoint_step_interval": 10},
            ("checkpointing_steps", "checkpoint_step_interval"),
        ),
        ({"validation_steps": 5, "validation_step_interval": 10}, ("validation_steps", "validation_step_interval")),
        ({"use_8bit_adam": True, "optimizer": "prodigy"}, ("use_8bit_adam", "optimizer")),
        ({"adam_beta1": 0.8, "optimizer_beta1": 0.9}, ("adam_beta1", "optimizer_beta1")),
    ],
)
def test_an_alias_and_its_target_set_differently_stop(tmp_path, options, named):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, options))
    assert all(f"'{name}'" in str(error.value) for name in named)


def test_an_alias_is_checked_like_its_target(tmp_path):
    with pytest.raises(ConfigError, match="option 'checkpoint_step_interval'.* must be int"):
        load_config(write(tmp_path, {"checkpointing_steps": "often"}))
    with pytest.raises(ConfigError, match="option 'use_8bit_adam'"):
        load_config(write(tmp_path, {"use_8bit_adam": "maybe"}))


def test_set_on_the_target_wins_over_the_files_alias(tmp_path):
    loaded = load_config(write(tmp_path, {"checkpointing_steps": 5}), ["checkpoint_step_interval=7"])
    assert loaded.config.checkpoint_step_interval == 7
    loaded = load_config(write(tmp_path, {"checkpoint_step_interval": 5}), ["checkpointing_steps=9"])
    assert loaded.config.checkpoint_step_interval == 9


def test_a_refused_dataset_key_stops_and_an_accepted_one_loads(tmp_path):
    loaded = load_config(write(tmp_path, {}))
    entry = {"id": "d", "instance_data_dir": "images", "cache_dir_vae": "x", "is_regularisation_data": False}
    assert parse_entry(entry, loaded, tmp_path / "multidatabackend.json", 0) is not None
    for key, state in DATASET_KEY_STATES.items():
        if isinstance(state, Refused):
            with pytest.raises(ConfigError, match=rf"st does not implement `{key}` \(a SimpleTuner dataset key\)"):
                parse_entry({**entry, key: non_default(state)}, loaded, tmp_path / "multidatabackend.json", 0)


def test_prepare_refuses_a_refused_option_with_exit_2(cli, tmp_path):
    make_image(tmp_path / "images" / "a.png", size=(64, 64))
    config = write_config(tmp_path, [{"id": "d", "instance_data_dir": "images"}], resolution=64)
    config.write_text(json.dumps({**json.loads(config.read_text()), "--use_adafactor_optimizer": True}))
    result = cli("prepare", "-c", config, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "st does not implement `use_adafactor_optimizer` (a SimpleTuner option) yet: the Adafactor" in result.stderr
    assert not (tmp_path / "out").exists()
