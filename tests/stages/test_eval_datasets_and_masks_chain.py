"""A mask dataset, a regularisation dataset and an eval dataset through the whole chain, each stage its own `st`
process: `st prepare` pairs the masks, `st cache` stores them, `st train` weights the loss by them, takes the base
model's prediction as the regularisation target, and evaluates on the eval dataset only."""

from __future__ import annotations

import json
import subprocess

import pytest
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.sampledata import write_images
from tests.helpers.files import write_config
from tests.helpers.training import QUICK, ST, st_env, train


def test_masks_regularisation_and_eval_datasets_through_the_chain(tiny_model, tmp_path):
    data = tmp_path / "data"
    images = write_images(data / "subject", 2)
    write_images(data / "men", 2, seed=2)
    write_images(data / "held-out", 1, seed=1)
    (data / "masks").mkdir()
    for path in images:  # an all-black mask per image (another extension: paired by stem)
        Image.new("L", Image.open(path).size, 0).save(data / "masks" / f"{path.stem}.png")
    datasets = [
        {"id": "subject", "type": "local", "instance_data_dir": str(data / "subject"), "caption_strategy": "textfile",
         "conditioning_data": "masks"},
        {"id": "masks", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
         "instance_data_dir": str(data / "masks")},
        {"id": "men", "type": "local", "instance_data_dir": str(data / "men"), "caption_strategy": "textfile",
         "is_regularisation_data": True},
        {"id": "held-out", "type": "local", "dataset_type": "eval", "instance_data_dir": str(data / "held-out"),
         "caption_strategy": "textfile"},
    ]  # fmt: skip
    config = write_config(tmp_path / "config", datasets, model_family="sd1x",
                          pretrained_model_name_or_path=str(tiny_model("sd1x")), resolution=64,
                          resolution_type="pixel_area", aspect_bucket_alignment=32, seed=0, model_type="lora",
                          lora_rank=4, learning_rate=1e-3, lora_dropout=0.0, caption_dropout_probability=0.0,
                          mixed_precision="no", eval_steps_interval=4, num_eval_images=4)  # fmt: skip
    sets = [item for s in [*QUICK, "max_train_steps=4"] for item in ("--set", s)]
    for command in (["prepare", "-c", config, "-o", tmp_path / "prepare"],
                    ["cache", "-c", config, "-i", tmp_path / "prepare", "-o", tmp_path / "cache"],
                    ["train", "-c", config, "-i", tmp_path / "cache", "-o", tmp_path / "train", *sets]):  # fmt: skip
        done = subprocess.run([ST, *map(str, command)], env=st_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    # An epoch: both subject and both regularisation samples. The subject's loss is masked out everywhere; the
    # regularisation target is the base model's prediction, which a fresh LoRA (B = 0) reproduces exactly.
    records = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if "loss" in r] == [0.0, 0.0, 0.0, 0.0]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert all(r["eval_loss/held-out"] == r["eval_loss"] > 0 for r in evals)  # evaluated unmasked, as SimpleTuner
    assert evals[0]["eval_loss"] == evals[-1]["eval_loss"]  # no gradient reached the adapter: nothing changed
    trained = {k for line in (tmp_path / "train" / "logs" / "data-rank0.jsonl").read_text().splitlines()
               for k in json.loads(line).get("keys", [])}  # fmt: skip
    cache = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert [d["id"] for d in cache["datasets"] if d.get("dataset_type") == "eval"] == ["held-out"]
    assert len(trained) == 4 and trained.isdisjoint(_eval_keys(tmp_path / "cache"))
    # A full fine-tune has no adapter to switch off: refused (exit 2) before the model loads.
    with pytest.raises(ConfigError, match=r"dataset 'men' has is_regularisation_data.*model_type full"):
        train(config, tmp_path / "cache", tmp_path / "full", 'model_type="full"')


def _eval_keys(cache) -> set[str]:
    """The sample ids of the cache's eval dataset."""
    from pipeline.cache_reader import CacheReader
    from pipeline.train.data import CacheIndex

    reader = CacheReader(cache)
    return set(CacheIndex(reader.root, reader.manifest).eval_keys())
