"""The example configs under examples/ load with st's own config and dataset-list parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import Config, load_config, normalise_key, read_config_file
from pipeline.datasets import DatasetSpec, read_dataset_list, parse_entry

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*/config.json"))


def _datasets(loaded):
    """Every entry of the example's dataset list through parse_entry (the image folders need not exist)."""
    list_path = loaded.resolve_path(loaded.config.data_backend_config).resolve()
    specs = [parse_entry(entry, loaded, list_path, i) for i, entry in enumerate(read_dataset_list(list_path))]
    return [s for s in specs if s is not None]


def test_the_documented_examples_exist():
    assert {p.parent.name for p in CONFIGS} >= {"sdxl-lora", "flux-lora"}
    readme = (EXAMPLES / "README.md").read_text()
    for config in CONFIGS:
        assert f"{config.parent.name}/" in readme


LORA_CONFIGS = [p for p in CONFIGS if p.parent.name.endswith("-lora")]


@pytest.mark.parametrize("config_path", LORA_CONFIGS, ids=lambda p: p.parent.name)
def test_example_loads_and_its_datasets_parse(config_path):
    raw = read_config_file(config_path)
    assert all(key.startswith("--") for key in raw), "examples use SimpleTuner's --option spelling"
    loaded = load_config(config_path)
    config = loaded.config
    assert config.model_family and config.pretrained_model_name_or_path
    assert config.model_type == "lora" and config.lora_rank == 16
    assert config.mixed_precision == "bf16" and config.optimizer == "adamw_bf16"
    assert config.validation_prompt and config.checkpoint_step_interval and config.max_train_steps
    # A SimpleTuner-only option or two, accepted and ignored, to show that SimpleTuner configs load.
    assert loaded.ignored, "each example carries a SimpleTuner-only key that st ignores"
    specs = _datasets(loaded)
    assert specs and all(isinstance(s, DatasetSpec) for s in specs)
    for spec in specs:
        assert spec.caption_strategy == "textfile"
        assert spec.resolution == 1024 and spec.resolution_type == "pixel_area"
        assert spec.root == (config_path.parent / "images").resolve()
    # Every option is one st knows or one it knowingly ignores: nothing is silently misspelt.
    known = set(Config.__dataclass_fields__) | set(loaded.ignored)
    assert {normalise_key(k) for k in raw} <= known


def test_sdxl_example():
    loaded = load_config(EXAMPLES / "sdxl-lora" / "config.json")
    config = loaded.config
    assert config.model_family == "sdxl"
    assert config.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert config.resolution == 1024 and config.resolution_type == "pixel_area"
    (spec,) = _datasets(loaded)
    assert spec.crop and spec.crop_style == "center" and spec.crop_aspect == "closest"
    assert [a for a, _ in spec.crop_aspect_buckets] == [0.75, 1.0, 1.33]
    library = loaded.resolve_path(config.user_prompt_library)
    prompts = json.loads(library.read_text())
    assert prompts and all(isinstance(k, str) and isinstance(v, str) and v for k, v in prompts.items())


def test_flux_example():
    loaded = load_config(EXAMPLES / "flux-lora" / "config.json")
    config = loaded.config
    assert config.model_family == "flux"
    assert config.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev"
    assert config.flux_lora_target == "all+ffs"
    assert config.flux_guidance_mode == "constant" and config.flux_guidance_value == 1.0
    assert config.flow_schedule_auto_shift
    assert config.model_flavour == "dev"
    (spec,) = _datasets(loaded)
    assert not spec.crop


def test_controlnet_example():
    loaded = load_config(EXAMPLES / "controlnet-sd1x" / "config.json")
    config = loaded.config
    assert config.controlnet and config.model_type == "full" and config.model_family == "sd1x"
    assert [s.conditioning_data for s in _datasets(loaded) if isinstance(s, DatasetSpec)] == [("edges",)]
