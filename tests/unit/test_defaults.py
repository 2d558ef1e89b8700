"""SimpleTuner's defaults: an option a config leaves out means what it means in SimpleTuner (its option registry)."""

from __future__ import annotations

import json

import pytest

from pipeline.config import Config, load_config
from pipeline.precision import bf16_supported, default_bf16_on_device

# SimpleTuner's defaults (field registry of its configuration, which its argparse and JSON loader read), for the options
# that change what is trained or written.
SIMPLETUNER_DEFAULTS = {
    "train_batch_size": 4,
    "learning_rate": 4e-7,
    "lr_scheduler": "constant_with_warmup",
    "lr_warmup_steps": 0,
    "lr_end": 4e-7,
    "lora_rank": 16,
    "lora_dropout": 0.1,
    "caption_dropout_probability": 0.1,
    "noise_offset": 0.1,
    "noise_offset_probability": 0.25,
    "offset_noise": False,
    "gradient_checkpointing": True,
    "gradient_accumulation_steps": 1,
    "mixed_precision": "bf16",
    "vae_dtype": "bf16",
    "checkpoint_step_interval": 500,
    "checkpoints_total_limit": 5,
    "resume_from_checkpoint": "latest",
    "validation_step_interval": 100,
    "validation_negative_prompt": "blurry, cropped, ugly",
    "report_to": "none",
    "model_card_private": True,
    "max_grad_norm": 2.0,
    "resolution": 1024.0,
}


@pytest.mark.parametrize("name", sorted(SIMPLETUNER_DEFAULTS))
def test_default_is_simpletuners(name):
    assert getattr(Config(), name) == SIMPLETUNER_DEFAULTS[name]


def _loaded(tmp_path, **options):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(options))
    return load_config(path)


def test_default_bf16_falls_back_only_where_the_device_lacks_it(tmp_path, st_log):
    records = st_log()
    loaded = _loaded(tmp_path, model_family="sd1x")
    resolved = default_bf16_on_device(loaded, "mixed_precision", "no")
    lines = [r.getMessage() for r in records if "has no bf16" in r.getMessage()]
    if bf16_supported():
        assert resolved.config.mixed_precision == "bf16" and not lines
    else:
        assert resolved.config.mixed_precision == "no"
        assert lines == ["mixed_precision: this device has no bf16, so no is used instead of the default bf16 (set "
                         "mixed_precision to choose)"]  # fmt: skip
    assert loaded.config.mixed_precision == "bf16"  # the loaded config itself is left as read


def test_bf16_the_config_sets_is_kept(tmp_path):
    loaded = _loaded(tmp_path, model_family="sd1x", mixed_precision="bf16", vae_dtype="bf16")
    assert default_bf16_on_device(loaded, "mixed_precision", "no").config.mixed_precision == "bf16"
    assert default_bf16_on_device(loaded, "vae_dtype", "fp32").config.vae_dtype == "bf16"


def test_other_precisions_are_never_changed(tmp_path):
    loaded = _loaded(tmp_path, model_family="sd1x", mixed_precision="fp16", vae_dtype="fp32")
    assert default_bf16_on_device(loaded, "mixed_precision", "no") is loaded
    assert default_bf16_on_device(loaded, "vae_dtype", "fp32") is loaded
