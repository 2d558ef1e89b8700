"""SimpleTuner's global parquet columns (`parquet_caption_column`, `parquet_filename_column`) through `st prepare`,
and the options st loads but that SimpleTuner never applies (`freeze_encoder_*`)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.files import make_image, write_config


def st(*args) -> object:
    """The `st` command in-process: the click Result (exit_code, output)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def captions(out: Path) -> dict[str, list[str]]:
    return {r["path"]: r["captions"] for r in pq.read_table(out / "samples.parquet").to_pylist()}


@pytest.fixture
def table_dataset(tmp_path):
    """Two images and a caption table whose columns are neither st's nor SimpleTuner's defaults."""
    make_image(tmp_path / "imgs" / "a.png", colour=(255, 0, 0))
    make_image(tmp_path / "imgs" / "b.png", colour=(0, 0, 255))
    pq.write_table(pa.table({"image_path": ["a", "b"], "prompt": ["a red square", "a blue square"],
                             "other": ["other a", "other b"], "file": ["a", "b"]}),
                   tmp_path / "captions.parquet")  # fmt: skip

    def config(block: dict, **options) -> Path:
        entry = {"id": "t", "instance_data_dir": "imgs", "caption_strategy": "parquet",
                 "parquet": {"path": "captions.parquet", **block}}  # fmt: skip
        return write_config(tmp_path, [entry], resolution=64, aspect_bucket_alignment=32, **options)

    return tmp_path, config


def test_global_columns_name_the_columns_a_parquet_block_leaves_out(table_dataset):
    root, config = table_dataset
    path = config({}, parquet_caption_column="prompt", parquet_filename_column="image_path")
    result = st("prepare", "-c", path, "-o", root / "out")
    assert result.exit_code == 0, result.output
    assert captions(root / "out") == {"a.png": ["a red square"], "b.png": ["a blue square"]}
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert "parquet_caption_column" in json.dumps(manifest)  # part of prepare's key: changing it re-runs prepare

    # The block's own columns win over the global ones (SimpleTuner: parquet.caption_column, else the global).
    config({"caption_column": "other", "filename_column": "file"}, parquet_caption_column="prompt",
           parquet_filename_column="image_path")
    result = st("prepare", "-c", path, "-o", root / "out")
    assert result.exit_code == 0, result.output
    assert captions(root / "out") == {"a.png": ["other a"], "b.png": ["other b"]}

    # Changing only the global option re-runs prepare with the new column.
    config({"filename_column": "file"}, parquet_caption_column="other")
    result = st("prepare", "-c", path, "-o", root / "out")
    assert result.exit_code == 0, result.output
    assert captions(root / "out") == {"a.png": ["other a"], "b.png": ["other b"]}
    config({"filename_column": "file"}, parquet_caption_column="prompt")
    result = st("prepare", "-c", path, "-o", root / "out")
    assert result.exit_code == 0, result.output
    assert captions(root / "out") == {"a.png": ["a red square"], "b.png": ["a blue square"]}


def test_a_missing_global_column_is_named(table_dataset):
    root, config = table_dataset
    path = config({}, parquet_caption_column="missing", parquet_filename_column="image_path")
    result = st("prepare", "-c", path, "-o", root / "out")
    assert result.exit_code == 2
    assert "no column 'missing'" in result.output and "parquet_caption_column" in result.output
    assert not (root / "out" / "samples.parquet").exists()


@pytest.mark.parametrize("option", ["freeze_encoder_before=3", "freeze_encoder_after=5",
                                    "freeze_encoder_strategy=between"])  # fmt: skip
def test_freeze_encoder_options_load_and_say_they_do_nothing(table_dataset, option, caplog):
    import logging

    from pipeline.config import load_config

    root, config = table_dataset
    path = config({}, parquet_caption_column="prompt", parquet_filename_column="image_path")
    caplog.set_level(logging.INFO, logger="st")
    load_config(path, [option])
    name = option.split("=")[0]
    assert name in caplog.text and "never applies it" in caplog.text


@pytest.mark.parametrize(("value", "expected"), [("true", "bitfit"), ("false", "none")])
def test_config_env_use_bitfit_sets_layer_freeze_strategy(tmp_path, value, expected):
    from pipeline.config import load_config

    env = tmp_path / "config.env"
    env.write_text(f"MODEL_TYPE=full\nUSE_BITFIT={value}\n")
    assert load_config(env).config.layer_freeze_strategy == expected


def test_config_env_use_bitfit_refuses_other_values(tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    env = tmp_path / "config.env"
    env.write_text("USE_BITFIT=yes-please\n")
    with pytest.raises(ConfigError, match="USE_BITFIT must be true or false"):
        load_config(env)
