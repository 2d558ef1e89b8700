"""`st train` and `st publish` on the tiny AuraFlow and Lumina 2 models: a resumed run continues the same trajectory,
the published LoRA loads into the family's diffusers pipeline and changes its image, and the ComfyUI file is written
for AuraFlow (ComfyUI reads its diffusers module names) and refused for Lumina 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.families import get_family
from pipeline.publish.stage import run_publish
from tests.helpers.training import WEIGHTS, losses, train

FAMILIES = ("auraflow", "lumina2")
SETS = ["checkpoint_step_interval=2", "learning_rate=1e-2", "lora_dropout=0", "caption_dropout_probability=0",
        'mixed_precision="no"', "lora_rank=4", "lora_alpha=8"]  # fmt: skip


@pytest.fixture(scope="module")
def three_steps(cached, tmp_path_factory):
    """Per family: a 3-step LoRA run, trained once."""
    runs = {}

    def get(family: str):
        if family not in runs:
            root, config = cached(family)
            runs[family] = tmp_path_factory.mktemp(f"{family}-3") / "train"
            train(config, root / "cache", runs[family], *SETS, "max_train_steps=3")
        return runs[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_a_resumed_run_ends_where_a_straight_one_does(cached, three_steps, tmp_path, family):
    root, config = cached(family)
    resumed = tmp_path / "resumed"
    train(config, root / "cache", resumed, *SETS, "max_train_steps=2")
    train(config, root / "cache", resumed, *SETS, "max_train_steps=3", 'resume_from_checkpoint="latest"')
    assert losses(resumed)[3] == losses(three_steps(family))[3]
    assert (resumed / WEIGHTS).read_bytes() == (three_steps(family) / WEIGHTS).read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_published_lora_changes_the_pipelines_image(cached, three_steps, tiny_model, tmp_path, family):
    _, config = cached(family)
    run_publish(load_config(config), three_steps(family), tmp_path / "publish")
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


def test_auraflow_comfyui_file_and_lumina2_refusal(cached, three_steps, tmp_path):
    _, config = cached("auraflow")
    run_publish(load_config(config, ['lora_format="comfyui"']), three_steps("auraflow"), tmp_path / "aura")
    tensors = load_file(str(tmp_path / "aura" / "pytorch_lora_weights_comfyui.safetensors"))
    assert tensors and all(k.startswith("transformer.") for k in tensors)
    assert {k.rsplit(".", 2)[-2] for k in tensors if not k.endswith(".alpha")} == {"lora_A", "lora_B"}
    assert all(v.item() == 8.0 for k, v in tensors.items() if k.endswith(".alpha"))

    _, config = cached("lumina2")
    refused = 'no ComfyUI LoRA layout is known for lumina2; publish with lora_format = "diffusers"'
    with pytest.raises(UserError, match=refused):
        run_publish(load_config(config, ['lora_format="comfyui"']), three_steps("lumina2"), tmp_path / "lumina")
