"""`st train` and `st publish` on the tiny Qwen-Image model: a resumed run continues the uninterrupted run's
trajectory exactly; the published LoRA loads into QwenImagePipeline and changes its output; the ComfyUI file names
the transformer's own modules."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.publish.stage import run_publish
from tests.helpers.training import WEIGHTS, losses, train

SETS = ["checkpoint_step_interval=2", "learning_rate=1e-2", "lora_dropout=0", "caption_dropout_probability=0",
        'mixed_precision="no"']  # fmt: skip


@pytest.fixture(scope="module")
def straight(cached, tmp_path_factory):
    """(root, config, train dir) of an uninterrupted 3-step LoRA run."""
    root, config = cached("qwen_image")
    out = tmp_path_factory.mktemp("qwen-straight") / "train"
    train(config, root / "cache", out, *SETS, "max_train_steps=3")
    return root, config, out


def test_qwen_image_resume_is_exact(straight, tmp_path):
    root, config, straight_out = straight
    resumed = tmp_path / "resumed"
    train(config, root / "cache", resumed, *SETS, "max_train_steps=2")
    result = train(config, root / "cache", resumed, *SETS, "max_train_steps=3", 'resume_from_checkpoint="latest"')
    assert result.manifest["metrics"]["steps"] == 3
    assert losses(resumed)[3] == losses(straight_out)[3]
    assert (resumed / WEIGHTS).read_bytes() == (straight_out / WEIGHTS).read_bytes()


def test_published_lora_loads_into_the_pipeline_and_changes_it(straight, tiny_model, tmp_path):
    from diffusers import QwenImagePipeline
    from safetensors import safe_open

    _, config, trained = straight
    out = tmp_path / "publish"
    run_publish(load_config(config, ['lora_format="comfyui"']), trained, out)
    pipe = QwenImagePipeline.from_pretrained(tiny_model("qwen_image"))
    pipe.set_progress_bar_config(disable=True)

    def render():
        generator = torch.Generator().manual_seed(0)
        return pipe(prompt="a red circle", height=32, width=32, num_inference_steps=2, generator=generator,
                    output_type="pt").images  # fmt: skip

    base = render()
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    assert (render() - base).abs().max() > 1e-3
    names = set(pipe.transformer.state_dict())
    with safe_open(str(out / "pytorch_lora_weights_comfyui.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    modules = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in keys if k.endswith("lora_A.weight")}
    assert modules and all(f"{m}.base_layer.weight" in names for m in modules)
