"""`st train` and `st publish` on the tiny FLUX.2 [klein]: a resumed run ends byte for byte where an uninterrupted
one does; the published LoRA loads into Flux2KleinPipeline and changes its image, and its ComfyUI file (FLUX.2's
original names), read back by diffusers, renders the same image; paired datasets train FLUX.2's reference input.
FLUX.2 [dev] (Flux2Pipeline, Mistral-3): a cached 2-step LoRA run whose published LoRA and ComfyUI file change
Flux2Pipeline's image alike, and a 2-step full fine-tune."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.families import get_family
from pipeline.publish.stage import run_publish
from tests.helpers.training import WEIGHTS, losses, train

SETS = ["checkpoint_step_interval=2", "learning_rate=1e-2", "lora_dropout=0", "caption_dropout_probability=0",
        'mixed_precision="no"', "lora_rank=4", "lora_alpha=8"]  # fmt: skip
FAMILY = get_family("flux2")


@pytest.fixture(scope="module")
def straight(cached, tmp_path_factory):
    """An uninterrupted 3-step LoRA run."""
    root, config = cached("flux2")
    out = tmp_path_factory.mktemp("flux2-straight") / "train"
    train(config, root / "cache", out, *SETS, "max_train_steps=3")
    return out


def test_resume_is_exact(cached, straight, tmp_path):
    root, config = cached("flux2")
    resumed = tmp_path / "resumed"
    train(config, root / "cache", resumed, *SETS, "max_train_steps=2")
    result = train(config, root / "cache", resumed, *SETS, "max_train_steps=3", 'resume_from_checkpoint="latest"')
    assert result.manifest["metrics"]["steps"] == 3
    assert losses(resumed)[3] == losses(straight)[3]
    assert (resumed / WEIGHTS).read_bytes() == (straight / WEIGHTS).read_bytes()


def test_published_lora_changes_the_image_and_comfyuis_file_renders_the_same(cached, straight, tiny_model, tmp_path):
    _, config = cached("flux2")
    run_publish(load_config(config), straight, tmp_path / "diffusers")
    run_publish(load_config(config, ['lora_format="comfyui"']), straight, tmp_path / "comfyui")
    (diffusers_file,) = (tmp_path / "diffusers").rglob("pytorch_lora_weights.safetensors")
    comfyui_file = tmp_path / "comfyui" / "pytorch_lora_weights_comfyui.safetensors"

    def image(lora=None) -> np.ndarray:
        pipe = FAMILY.load_pipeline_class().from_pretrained(str(tiny_model("flux2")))
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(lora)
        return pipe(prompt="a red circle", num_inference_steps=2, height=64, width=64, guidance_scale=1.0,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    base, tuned, comfy = image(), image(str(diffusers_file)), image(comfy_as_diffusers_reads_it(comfyui_file))
    assert np.isfinite(tuned).all() and np.abs(tuned - base).max() > 1e-3
    np.testing.assert_allclose(comfy, tuned, atol=1e-4)


def comfy_as_diffusers_reads_it(path) -> dict[str, torch.Tensor]:
    """ComfyUI's file with each module's `alpha / rank` folded into its lora_B (as ComfyUI applies it): diffusers'
    reader of FLUX.2's `diffusion_model.` names takes no alpha entries."""
    tensors = load_file(str(path))
    out = {}
    for key, value in tensors.items():
        if key.endswith(".lora_B.weight"):
            module = key.removesuffix(".lora_B.weight")
            value = value * (tensors[f"{module}.alpha"] / tensors[f"{module}.lora_A.weight"].shape[0])
        if not key.endswith(".alpha"):
            out[key] = value
    return out


def test_paired_datasets_train_on_their_reference_images(paired, tmp_path):
    """SimpleTuner trains FLUX.2 on a dataset's conditioning images as references: so does st, and validation renders
    through Flux2KleinPipeline with the reference as `image`, saved beside the render."""
    root, config = paired("flux2")
    out = tmp_path / "train"
    train(config, root / "cache", out, *SETS, "max_train_steps=2", "validation_disable=false",
          "validation_step_interval=100", 'validation_resolution="64"', "validation_num_inference_steps=2",
          "validation_guidance=1.0")  # fmt: skip
    assert json.loads((out / "manifest.json").read_text())["metrics"]["steps"] == 2
    names = {p.name for p in (out / "validation" / "step-2").glob("*.png")}
    assert {"validation-64x64-0.png", "validation-64x64-control.png"} <= names


@pytest.fixture(scope="module")
def dev_chain(tmp_path_factory):
    """A tiny FLUX.2 [dev] folder, 8 images cached for it with model_flavour dev, and a 2-step LoRA run on them
    (model, config, run)."""
    from pipeline.families import flux2
    from tests.helpers.training import cached_dataset

    root = tmp_path_factory.mktemp("flux2-dev")
    flux2.tiny_dev(root / "model", 0)
    config = cached_dataset(root, "flux2", root / "model", **{"--model_flavour": "dev"})
    run = root / "run"
    train(config, root / "cache", run, *SETS, "max_train_steps=2")
    return root / "model", config, run


def dev_image(model, lora=None) -> np.ndarray:
    """Flux2Pipeline's image of the [dev] folder (its tokenizer given beside it: transformers 5 builds the Pixtral
    processor only with torchvision), with a LoRA file or diffusers state dict loaded."""
    from diffusers import Flux2Pipeline
    from transformers import PreTrainedTokenizerFast

    pipe = Flux2Pipeline.from_pretrained(str(model), tokenizer=None)
    pipe.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model), subfolder="tokenizer")
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe(prompt="a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip


def test_dev_lora_changes_flux2pipelines_image_and_comfyuis_file_renders_the_same(dev_chain, tmp_path):
    model, config, run = dev_chain
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 and all(0 < loss < 10 for loss in losses(run).values())
    run_publish(load_config(config), run, tmp_path / "diffusers")
    run_publish(load_config(config, ['lora_format="comfyui"']), run, tmp_path / "comfyui")
    (diffusers_file,) = (tmp_path / "diffusers").rglob("pytorch_lora_weights.safetensors")
    comfyui_file = tmp_path / "comfyui" / "pytorch_lora_weights_comfyui.safetensors"
    base, tuned = dev_image(model), dev_image(model, str(diffusers_file))
    comfy = dev_image(model, comfy_as_diffusers_reads_it(comfyui_file))
    assert np.isfinite(tuned).all() and np.abs(tuned - base).max() > 1e-3
    np.testing.assert_allclose(comfy, tuned, atol=1e-4)


def test_dev_full_fine_tune_trains_the_transformer(dev_chain, tmp_path):
    from diffusers import Flux2Transformer2DModel

    model, config, _ = dev_chain
    out = tmp_path / "full"
    result = train(config, model.parent / "cache", out, *SETS, 'model_type="full"', "max_train_steps=2",
                   "learning_rate=1e-3")  # fmt: skip
    assert result.manifest["metrics"]["steps"] == 2 and all(0 < loss < 10 for loss in losses(out).values())
    trained = Flux2Transformer2DModel.from_pretrained(str(out / "final"), subfolder="transformer")
    base = Flux2Transformer2DModel.from_pretrained(str(model), subfolder="transformer")
    assert trained.config.guidance_embeds
    pairs = zip(trained.state_dict().items(), base.state_dict().values())
    changed = [name for (name, a), b in pairs if not torch.equal(a, b)]
    assert any(n.startswith("single_transformer_blocks.") for n in changed)
