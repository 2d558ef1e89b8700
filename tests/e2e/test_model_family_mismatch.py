"""A `model_family` that does not match the model given is refused by every stage that reads the model (cache,
train, publish) with exit 2, naming the model, the family it looks like and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.prepare.stage import run_prepare
from pipeline.sampledata import write_sample_dataset

QUICK_TRAIN = [
    "validation_disable=true", "disable_benchmark=true", 'report_to="none"', "dataloader_prefetch=false",
    "max_train_steps=2", "train_batch_size=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model):
    """A small captioned dataset whose config names an sd1x model, prepared: (config, prepare folder)."""
    root = tmp_path_factory.mktemp("family-data")
    config = write_sample_dataset(root / "data", images=4, family="sd1x", model=tiny_model("sd1x"))
    run_prepare(load_config(config, ["train_batch_size=1"]), root / "prepare")
    return config, root / "prepare"


def assert_refused(result, model: Path, given: str, looks_like: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.stderr
    assert "Traceback" not in message
    assert f"model_family is '{given}', but the model folder {model} looks like {looks_like}" in message
    assert f"--set model_family={looks_like}" in message


@pytest.mark.parametrize("given, actual", [("sd1x", "sdxl"), ("sdxl", "sd1x"), ("sd1x", "sd2x"), ("sd2x", "sd1x")])
def test_cache_refuses_a_family_that_does_not_match_the_model_folder(cli, tmp_path, tiny_model, prepared, given,
                                                                   actual):
    config, prep = prepared
    model = tiny_model(actual)
    result = cli("cache", "-c", config, "-i", prep, "-o", tmp_path / "cache", "--set", f'model_family="{given}"',
                 "--set", f'pretrained_model_name_or_path="{model}"')  # fmt: skip
    assert_refused(result, model, given, actual)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_cache_refuses_a_single_file_checkpoint_of_another_family(cli, tmp_path, prepared):
    import numpy as np
    from safetensors.numpy import save_file

    checkpoint = tmp_path / "sdxl-base.safetensors"
    save_file({"conditioner.embedders.1.model.positional_embedding": np.zeros((2, 2), np.float32),
               "model.diffusion_model.out.2.bias": np.zeros((4,), np.float32)}, str(checkpoint))  # fmt: skip
    config, prep = prepared
    result = cli("cache", "-c", config, "-i", prep, "-o", tmp_path / "cache", "--set", 'model_family="sd1x"',
                 "--set", f'pretrained_model_name_or_path="{checkpoint}"')  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"the single-file checkpoint {checkpoint} looks like sdxl" in result.stderr
    assert "conditioner.embedders.1.model.positional_embedding" in result.stderr


def test_train_and_publish_refuse_a_model_folder_that_is_no_longer_the_family(cli, tmp_path, tiny_model):
    """The model folder changed into another family's layout after `st cache` (its VAE and text encoder, which the
    cache lineage checks, are untouched): train and publish read model_index.json and refuse it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model("sd1x"), model)
    config = write_sample_dataset(tmp_path / "data", images=4, family="sd1x", model=model)
    for stage, args in (("prepare", []), ("cache", ["-i", tmp_path / "prepare"])):
        result = cli(stage, "-c", config, *args, "-o", tmp_path / stage, "--set", "train_batch_size=1")
        assert result.exit_code == 0, result.output
    sets = [arg for s in QUICK_TRAIN for arg in ("--set", s)]
    trained = cli("train", "-c", config, "-i", tmp_path / "cache", "-o", tmp_path / "train", *sets)
    assert trained.exit_code == 0, trained.output

    index = json.loads((model / "model_index.json").read_text())
    index.update({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers",
                  "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"]})  # fmt: skip
    (model / "model_index.json").write_text(json.dumps(index))

    again = cli("train", "-c", config, "-i", tmp_path / "cache", "-o", tmp_path / "train2", *sets)
    assert_refused(again, model, "sd1x", "sdxl")
    assert not (tmp_path / "train2" / "manifest.json").exists()
    published = cli("publish", "-c", config, "-i", tmp_path / "train", "-o", tmp_path / "publish")
    assert_refused(published, model, "sd1x", "sdxl")
    assert not (tmp_path / "publish" / "manifest.json").exists()
