"""DeepFloyd IF (pixel space): `st cache` stores the images themselves, and SimpleTuner's example checks unchanged.
Resume, publish into `IFPipeline` and the ComfyUI refusal are in tests/stages/test_family_runs.py with the other
families; stage II (IFSuperResolutionPipeline) in tests/stages/test_deepfloyd_stage_ii.py."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.cache_reader import CacheReader
from pipeline.families import get_family

FAMILY = get_family("deepfloyd")


def test_the_cache_holds_the_pixels_in_minus_one_to_one(cached):
    root, _ = cached("deepfloyd")
    reader = CacheReader(root / "cache")
    assert reader.manifest["vae"]["class"] == "PixelSpace" and reader.manifest["vae"]["latent_channels"] == 3
    sample = next(iter(reader))
    width, height = (int(n) for n in sample.meta["bucket"].split("x"))
    assert tuple(sample.latent.shape) == (3, height, width)  # the image's own size, not a latent's
    image = Image.open(root / "data" / "images" / sample.meta["path"]).convert("RGB")
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    assert (sample.latent.float() - expected).abs().mean() < 0.05


def test_simpletuners_example_checks_unchanged(tmp_path, monkeypatch):
    """SimpleTuner's deepfloyd-if-i-medium.peft-lora/config.json as SimpleTuner ships it, its dataset list a local
    folder in place of the example's."""
    import json

    from pipeline.check import run_check

    example = {
        "base_model_precision": "no_change", "caption_dropout_probability": 0.1, "checkpoint_step_interval": 50,
        "checkpoints_total_limit": 5,
        "data_backend_config": "config/examples/deepfloyd-if-i-medium.peft-lora/multidatabackend.json",
        "disable_bucket_pruning": True, "gradient_checkpointing": True,
        "hub_model_id": "simpletuner-example-deepfloyd-if-i-medium-peft-lora", "learning_rate": 1e-5,
        "lora_rank": 16, "lora_type": "standard", "lr_scheduler": "constant", "max_train_steps": 100,
        "mixed_precision": "bf16", "model_family": "deepfloyd", "model_flavour": "i-medium-400m",
        "pretrained_model_name_or_path": "DeepFloyd/IF-I-M-v1.0", "model_type": "lora", "num_train_epochs": 0,
        "optimizer": "adamw_bf16", "output_dir": "output/examples/deepfloyd-if-i-medium.peft-lora",
        "push_checkpoints_to_hub": False, "push_to_hub": False, "report_to": "none", "resolution": 512,
        "resolution_type": "pixel", "seed": 42, "train_batch_size": 1, "use_ema": False, "validation_guidance": 7.0,
        "validation_num_inference_steps": 20, "validation_prompt": "domokun holding a sign",
        "validation_prompt_library": False, "validation_resolution": "512x512", "validation_seed": 42,
        "validation_steps": 50,
    }  # fmt: skip
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "config" / "examples" / "deepfloyd-if-i-medium.peft-lora"
    folder.mkdir(parents=True)
    (tmp_path / "pics").mkdir()
    (folder / "config.json").write_text(json.dumps(example))
    (folder / "multidatabackend.json").write_text(json.dumps([
        {"id": "deepfloyd-local-512", "type": "local", "instance_data_dir": "pics", "resolution": 512,
         "resolution_type": "pixel", "caption_strategy": "filename"}]))  # fmt: skip
    report = run_check(folder / "config.json", [])
    assert report.ok, report.problems
    assert any("DeepFloyd/IF-I-M-v1.0 (deepfloyd" in line for line in report.checked)
