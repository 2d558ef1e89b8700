"""`st train` and `st publish` on the tiny Sana and Kolors models: exact resume, a published LoRA that the family's
diffusers pipeline loads and that changes its image, and ComfyUI's layout refused (ComfyUI has no native Sana or
Kolors model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.families import get_family
from pipeline.publish.stage import run_publish
from tests.helpers.training import WEIGHTS, losses, train

FAMILIES = ("sana", "kolors")
SETS = ["checkpoint_step_interval=2", "learning_rate=1e-2", "lora_dropout=0", "caption_dropout_probability=0",
        'mixed_precision="no"', "lora_rank=4", "lora_alpha=4"]  # fmt: skip


@pytest.fixture(scope="module")
def straight(cached, tmp_path_factory):
    """`straight(family)`: the output of an uninterrupted 3-step LoRA run, trained on first use."""
    runs = {}

    def get(family: str):
        if family not in runs:
            root, config = cached(family)
            runs[family] = tmp_path_factory.mktemp(f"{family}-straight") / "train"
            train(config, root / "cache", runs[family], *SETS, "max_train_steps=3")
        return runs[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_is_exact(cached, straight, tmp_path, family):
    root, config = cached(family)
    resumed = tmp_path / "resumed"
    train(config, root / "cache", resumed, *SETS, "max_train_steps=2")
    result = train(config, root / "cache", resumed, *SETS, "max_train_steps=3", 'resume_from_checkpoint="latest"')
    assert result.manifest["metrics"]["steps"] == 3
    assert losses(resumed)[3] == losses(straight(family))[3]
    assert (resumed / WEIGHTS).read_bytes() == (straight(family) / WEIGHTS).read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_published_lora_loads_into_the_pipeline_and_changes_its_image(cached, straight, tiny_model, tmp_path, family):
    _, config = cached(family)
    run_publish(load_config(config), straight(family), tmp_path / "publish")
    (lora_file,) = (tmp_path / "publish").rglob("pytorch_lora_weights.safetensors")
    spec = get_family(family)

    def image(with_lora: bool) -> np.ndarray:
        pipe = spec.load_pipeline_class().from_pretrained(str(tiny_model(family)))
        pipe.set_progress_bar_config(disable=True)
        if with_lora:
            spec.load_lora_into_pipeline(pipe, lora_file)
        return pipe("a red circle", num_inference_steps=2, height=64, width=64, guidance_scale=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    base, tuned = image(False), image(True)
    assert np.isfinite(tuned).all() and np.abs(tuned - base).max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_layout_is_refused(cached, straight, tmp_path, family):
    _, config = cached(family)
    with pytest.raises(UserError, match=f'no ComfyUI LoRA layout is known for {family}; publish with lora_format = "diffusers"'):
        run_publish(load_config(config, ['lora_format="comfyui"']), straight(family), tmp_path / "publish")
