"""The Wan 2.2 I2V A14B low-noise stage (model_flavour i2v-14b-2.2-low) on generated video: prepare -> cache -> train a
LoRA on `transformer_2` (exact resume; validation with the frozen high-noise expert beside it) -> publish (the card
names the expert, the LoRA loads into WanImageToVideoPipeline's transformer_2 and changes its video) -> a full
fine-tune publishes a folder whose transformer_2 is the trained one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.manifest import read_manifest
from pipeline.publish.stage import run_publish
from tests.helpers.training import train
from tests.helpers.wan import FRAMES, SETS, render_lora, trained_run

# The Wan chain's exact-resume test (1 step + resume == 2 steps, byte for byte), collected here on this module's
# low-stage `chain`.
from tests.stages.test_wan import test_lora_resumes_exactly  # noqa: F401

LOW = "i2v-14b-2.2-low"


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("wan", flavour="i2v-2.2")


@pytest.fixture(scope="module")
def chain(tmp_path_factory, model):
    """Two generated clips cached for the tiny two-expert model, and a 2-step LoRA run of the low stage that
    validates at step 2 with both experts (root, config, run folder)."""
    root = tmp_path_factory.mktemp("wan22-chain")
    config, run = trained_run(root, model, LOW, *SETS, "wan_validation_load_other_stage=true", run="straight")
    return root, config, run


def test_the_run_trains_transformer_2_and_validates_with_both_experts(chain):
    _, _, run = chain
    manifest = read_manifest(run)
    denoiser = manifest["model"]["denoiser"]
    assert denoiser["subfolder"] == "transformer_2"
    assert manifest["config"]["pipeline"] == "WanImageToVideoPipeline"
    folder = run / "validation" / "step-2"
    assert (folder / "validation-32x32-0.mp4").is_file() and (folder / "validation-32x32-control.png").is_file()


def _render(model: Path, image, lora: Path | None = None, into_transformer_2: bool = False) -> np.ndarray:
    return render_lora(model, lora, cls="WanImageToVideoPipeline", into_transformer_2=into_transformer_2, steps=4,
                       image=image)  # fmt: skip


def test_published_lora_is_the_low_experts(chain, model, tmp_path):
    """The card says which expert and loads the LoRA with load_into_transformer_2=True; so loaded it changes the
    video, and its ComfyUI file carries Wan's original names."""
    from PIL import Image
    from safetensors import safe_open

    _, config, run = chain
    out, comfy = tmp_path / "published", tmp_path / "comfyui"
    run_publish(load_config(config), run, out)
    run_publish(load_config(config, ['lora_format="comfyui"']), run, comfy)
    card = (out / "README.md").read_text()
    assert "low-noise expert (diffusers' `transformer_2`" in card and "load_into_transformer_2=True" in card
    with safe_open(str(comfy / "pytorch_lora_weights_comfyui.safetensors"), framework="pt") as handle:
        assert all(k.startswith("diffusion_model.blocks.") for k in handle.keys())  # noqa: SIM118
    image = Image.open(run / "validation" / "step-2" / "validation-32x32-control.png").convert("RGB")
    lora = out / "pytorch_lora_weights.safetensors"
    base = _render(model, image)
    low = _render(model, image, lora, into_transformer_2=True)
    assert base.shape == low.shape == (1, FRAMES, 32, 32, 3)
    assert np.abs(low - base).max() > 1e-4


def test_a_full_fine_tune_publishes_the_trained_transformer_2(chain, model, tmp_path):
    """One full step of the low stage: the published folder's transformer_2 is the trained expert (changed), its
    transformer the base's high-noise expert, byte for byte."""
    root, config, _ = chain
    run = tmp_path / "full"
    train(config, root / "cache", run, *SETS, 'model_type="full"', "max_train_steps=1", "learning_rate=0.001")
    out = tmp_path / "published"
    run_publish(load_config(config), run, out)
    weights = "diffusion_pytorch_model.safetensors"
    assert (out / "model" / "transformer" / weights).read_bytes() == (model / "transformer" / weights).read_bytes()
    from diffusers import WanTransformer3DModel

    trained = WanTransformer3DModel.from_pretrained(str(out / "model"), subfolder="transformer_2")
    base = WanTransformer3DModel.from_pretrained(str(model), subfolder="transformer_2")
    pairs = zip(trained.state_dict().values(), base.state_dict().values())
    assert any(not torch.equal(a, b) for a, b in pairs)  # the low-noise expert trained, and sits in its own slot


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory, tiny_model):
    """The tiny TI2V 5B folder, two generated clips cached for it, and a 2-step LoRA run validating at step 2
    (model, config, run folder)."""
    model = tiny_model("wan", flavour="ti2v")
    config, run = trained_run(tmp_path_factory.mktemp("wan22-ti2v"), model, "ti2v-5b-2.2", *SETS)
    return model, config, run


def test_ti2v_lora_trains_validates_and_changes_the_pipelines_video(ti2v, tmp_path):
    """48-channel latents cached with each clip's first-frame condition; the LoRA trains, validation renders through
    WanImageToVideoPipeline with expand_timesteps from the first clip's first frame, and the published LoRA changes
    the pipeline's video."""
    from PIL import Image

    model, config, run = ti2v
    manifest = read_manifest(run)
    assert manifest["config"]["pipeline"] == "WanImageToVideoPipeline"
    folder = run / "validation" / "step-2"
    control = folder / "validation-32x32-control.png"
    assert (folder / "validation-32x32-0.mp4").is_file() and control.is_file()
    out = tmp_path / "published"
    run_publish(load_config(config), run, out)
    assert "image-to-video" in (out / "README.md").read_text()
    image = Image.open(control).convert("RGB")
    base = _render(model, image)
    with_lora = _render(model, image, out / "pytorch_lora_weights.safetensors")
    assert base.shape == with_lora.shape == (1, FRAMES, 32, 32, 3)
    assert np.abs(with_lora - base).max() > 1e-4
