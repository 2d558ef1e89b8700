"""Numeric options out of range: every stage refuses them when the config is loaded, with exit 2 and a message
naming the option, the value and the allowed range, before anything is written."""

from __future__ import annotations

import json
import typing

import pytest

from pipeline.config import OPTION_FIELDS, OPTION_RANGES, Config
from tests.helpers.files import make_image, write_config


@pytest.fixture
def config(tmp_path):
    for i in range(2):
        make_image(tmp_path / "images" / f"{i}.png", size=(64, 64), colour=(90 * i, 0, 0))
    return write_config(tmp_path, [{"id": "d", "instance_data_dir": "images"}], resolution=64,
                        aspect_bucket_alignment=32)  # fmt: skip


@pytest.mark.parametrize(
    "setting, message",
    [
        ("resolution=1e12", "option 'resolution' is 1e+12, outside its range: it must be > 0 and <= 9459"),
        ("resolution=nan", "option 'resolution' is nan, not a finite number; it must be > 0 and <= 9459"),
        ("resolution=inf", "option 'resolution' is inf, not a finite number"),
        ("resolution=-64", "option 'resolution' is -64, outside its range: it must be > 0"),
        ("train_batch_size=0", "option 'train_batch_size' is 0, outside its range: it must be >= 1"),
        ("train_batch_size=-2", "option 'train_batch_size' is -2, outside its range: it must be >= 1"),
        ("aspect_bucket_alignment=30", "it must be >= 8 and <= 256, a multiple of 8"),
        ("seed=-1", "option 'seed' is -1, outside its range: it must be >= 0 and <= 4294967295"),
        ("minimum_aspect_ratio=2.0", "option 'minimum_aspect_ratio' (2) is larger than 'maximum_aspect_ratio' (1)"),
    ],
)
def test_prepare_refuses_an_option_out_of_range_before_writing(cli, tmp_path, config, setting, message):
    extra = ["--set", "maximum_aspect_ratio=1.0"] if setting.startswith("minimum_aspect") else []
    result = cli("prepare", "-c", config, "-o", tmp_path / "out", "--set", setting, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_value_from_the_config_file_names_the_file(cli, tmp_path, config):
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "--train_batch_size": 0}))
    result = cli("prepare", "-c", config, "-o", tmp_path / "out")
    assert result.exit_code == 2
    expected = f"option 'train_batch_size' is 0, outside its range: it must be >= 1 and <= 65536 (in {config})"
    assert expected in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_dataset_entry_value_is_checked_too(cli, tmp_path, config):
    (tmp_path / "multidatabackend.json").write_text('[{"id": "d", "instance_data_dir": "images", "resolution": NaN}]')
    result = cli("prepare", "-c", config, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "option 'resolution' is nan, not a finite number" in result.stderr and "entry 0 (id 'd')" in result.stderr
    assert not (tmp_path / "out").exists()


def test_area_resolution_is_bounded_in_megapixels(cli, tmp_path, config):
    result = cli("prepare", "-c", config, "-o", tmp_path / "out", "--set", 'resolution_type="area"',
                 "--set", "resolution=1024")  # fmt: skip
    assert result.exit_code == 2
    assert "'resolution' is 1024 megapixels (resolution_type area)" in result.stderr
    assert 'did you mean resolution_type "pixel_area"?' in result.stderr


@pytest.mark.parametrize(
    "stage, setting, message",
    [
        ("cache", "cache_compression_level=99",
         "option 'cache_compression_level' is 99, outside its range: it must be >= 1 and <= 22 (from --set)"),
        ("cache", "vae_batch_size=0", "option 'vae_batch_size' is 0"),
        ("train", "learning_rate=nan", "option 'learning_rate' is nan, not a finite number; it must be >= 0"),
        ("train", "lora_rank=0", "option 'lora_rank' is 0, outside its range: it must be >= 1"),
        ("train", "caption_dropout_probability=1.5", "it must be >= 0 and <= 1"),
        ("publish", "webhook_reporting_interval=-inf",
         "option 'webhook_reporting_interval' is -inf, not a finite number"),
    ],
)  # fmt: skip
def test_later_stages_refuse_it_before_reading_their_input(cli, tmp_path, config, stage, setting, message):
    result = cli(stage, "-c", config, "-i", tmp_path / "no-input", "-o", tmp_path / "out", "--set", setting)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "no-input" not in result.stderr
    assert not (tmp_path / "out").exists()


def _numeric(annotation: typing.Any) -> bool:
    args = typing.get_args(annotation) or (annotation,)
    return any(a in (int, float) for a in args)


def test_every_numeric_option_has_a_range():
    hints = typing.get_type_hints(Config)
    numeric = {name for name in OPTION_FIELDS if _numeric(hints[name])}
    assert numeric - set(OPTION_RANGES) == set()
    assert set(OPTION_RANGES) - numeric == set()
    for name in numeric:
        default = getattr(Config(), name)
        assert default is None or OPTION_RANGES[name].contains(default), name
