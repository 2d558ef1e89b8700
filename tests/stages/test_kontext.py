"""Flux Kontext (`model_flavour: kontext`) on the tiny Flux model, from a paired dataset (pictures and their edge
images as references): two LoRA steps, a resumed run that ends byte for byte where an uninterrupted one does,
validation through FluxKontextPipeline saving each render beside its reference image, and a published LoRA that
FluxKontextPipeline loads and that changes what it renders for a given reference image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.publish.stage import run_publish
from tests.helpers.training import WEIGHTS, losses
from tests.stages.reference_runs import VALIDATION, train_lora

SETS = ['model_flavour="kontext"', "eval_steps_interval=2", "num_eval_images=1"]


def train_here(setup: tuple[Path, Path], out: Path, *sets: str):
    return train_lora(setup, out, *SETS, *sets)


@pytest.fixture(scope="module")
def straight(paired, tmp_path_factory) -> Path:
    """An uninterrupted 2-step Kontext LoRA run with a validation at its end."""
    out = tmp_path_factory.mktemp("kontext") / "train"
    train_here(paired("flux"), out, *VALIDATION)
    return out


def test_kontext_trains_from_pairs_resumes_exactly_and_saves_renders_beside_their_reference(paired, straight,
                                                                                            tmp_path):  # fmt: skip
    manifest = json.loads((straight / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 and (straight / WEIGHTS).is_file()
    # the evaluation loss reads each sample's reference latents from the cache
    assert manifest["metrics"]["final_eval_loss"] != manifest["metrics"]["first_eval_loss"]
    names = {p.name for p in (straight / "validation" / "step-2").glob("*.png")}
    assert {"validation-64x64-0.png", "validation-64x64-control.png"} <= names

    resumed = tmp_path / "resumed"
    train_here(paired("flux"), resumed, "max_train_steps=1")
    train_here(paired("flux"), resumed, *VALIDATION, "max_train_steps=2")  # continues from checkpoint-1
    assert json.loads((resumed / "manifest.json").read_text())["stats"]["steps_this_run"] == 1
    assert losses(resumed)[2] == losses(straight)[2]
    final_eval = json.loads((resumed / "manifest.json").read_text())["metrics"]["final_eval_loss"]
    assert final_eval == manifest["metrics"]["final_eval_loss"]
    assert (resumed / WEIGHTS).read_bytes() == (straight / WEIGHTS).read_bytes()


def test_a_cache_without_reference_images_stops_before_training(cached, tmp_path):
    with pytest.raises(ConfigError, match="FluxKontextPipeline trains on .*conditioning_data") as error:
        train_here(cached("flux"), tmp_path / "train")
    assert error.value.exit_code == 2
    assert not (tmp_path / "train" / "checkpoints").exists()


def test_published_lora_loads_into_the_kontext_pipeline_and_changes_its_edit(paired, straight, tiny_model, tmp_path):
    from diffusers import FluxKontextPipeline
    from PIL import Image

    root, config = paired("flux")
    out = tmp_path / "publish"
    run_publish(load_config(config), straight, out)
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model("flux")))
    pipe.set_progress_bar_config(disable=True)
    references = [Image.open(path).convert("RGB").resize((64, 64))
                  for path in sorted((root / "data" / "edges").glob("*.png"))[:2]]  # fmt: skip

    def render(reference) -> np.ndarray:
        return pipe(image=reference, prompt="a red circle on a white background", num_inference_steps=2, height=64,
                    width=64, max_area=64 * 64, _auto_resize=False, guidance_scale=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip

    base = render(references[0])
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    edited = render(references[0])
    assert np.isfinite(edited).all() and np.abs(base - edited).max() > 1e-4
    assert np.abs(render(references[1]) - edited).max() > 1e-4  # the render follows its reference image


def test_comfyui_layout_is_fluxs(paired, straight, tmp_path):
    """ComfyUI runs Kontext on its Flux model: the LoRA gets Flux's native names (q/k/v fused)."""
    from safetensors.torch import load_file

    _, config = paired("flux")
    run_publish(load_config(config, ['lora_format="comfyui"']), straight, tmp_path / "publish")
    tensors = load_file(str(tmp_path / "publish" / "pytorch_lora_weights_comfyui.safetensors"))
    assert tensors and all(k.startswith("diffusion_model.") for k in tensors)
    assert any(".double_blocks.0.img_attn.qkv.lora_A." in k for k in tensors)
