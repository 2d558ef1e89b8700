"""A cache output folder is all a training machine needs: no source images, no prepare output, no original paths."""

from __future__ import annotations

import json
import shutil

from pipeline.manifest import read_manifest
from pipeline.sampledata import write_sample_dataset

TRAIN = ["max_train_steps=2", "validation_disable=true", "disable_benchmark=true", 'report_to="none"',
         "eval_steps_interval=0"]  # fmt: skip


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_train_and_publish_from_a_copied_cache_folder_alone(tmp_path, cli, tiny_model):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_model("sd1x"), a / "model")
    config = write_sample_dataset(a / "data", images=6, family="sd1x", model=a / "model", resolution=96)
    for args in (["prepare", "-c", config, "-o", a / "prepare"],
                 ["cache", "-c", config, "-i", a / "prepare", "-o", a / "cache"]):  # fmt: skip
        result = cli(*args)
        assert result.exit_code == 0, result.output

    # The training machine gets the cache folder, the model, and the config with the model path changed.
    b.mkdir()
    shutil.copytree(a / "cache", b / "cache")
    shutil.copytree(a / "model", b / "model")
    options = json.loads(config.read_text())
    options["--pretrained_model_name_or_path"] = "model"  # relative to the config file
    (b / "config.json").write_text(json.dumps(options))
    shutil.rmtree(a)  # no images, no prepare output, no multidatabackend.json

    result = cli("train", "-c", b / "config.json", "-i", b / "cache", "-o", b / "train", *sets(*TRAIN))
    assert result.exit_code == 0, result.output
    assert "the lineage beyond" in result.stderr and "could not be checked" in result.stderr
    cache = read_manifest(b / "cache", stage="cache")
    train = read_manifest(b / "train", stage="train")
    assert train["parent"] == {"stage": "cache", "digest": cache["digest"]} and train["metrics"]["steps"] == 2
    assert "lineage" not in train["provenance"]  # nothing was forced
    again = cli("train", "-c", b / "config.json", "-i", b / "cache", "-o", b / "train", *sets(*TRAIN))
    assert again.exit_code == 0 and "train: up to date" in again.output

    result = cli("publish", "-c", b / "config.json", "-i", b / "train", "-o", b / "publish")
    assert result.exit_code == 0, result.output
    published = sorted(p.name for p in (b / "publish").iterdir())
    assert published == ["README.md", "lineage.json", "manifest.json", "pytorch_lora_weights.safetensors"]
    assert (b / "publish" / "pytorch_lora_weights.safetensors").read_bytes() == \
        (b / "train" / "final" / "pytorch_lora_weights.safetensors").read_bytes()  # fmt: skip
    lineage = json.loads((b / "publish" / "lineage.json").read_text())
    assert lineage["manifests"]["cache"]["digest"] == cache["digest"]
    assert lineage["manifests"]["prepare"]["digest"] == cache["parent"]["digest"]
    assert lineage["manifests"]["train"]["digest"] == train["digest"]
