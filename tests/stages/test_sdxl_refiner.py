"""The SDXL refiner (model_flavour refiner-1.0 / refiner-0.9, or a folder whose model_index.json sets
requires_aesthetics_score): cached, trained, validated and published as StableDiffusionXLImg2ImgPipeline uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.families import get_family, sdxl
from tests.helpers.training import WEIGHTS, cached_dataset, train

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    """A tiny refiner, a sample dataset cached for it, and a 2-step LoRA run with validation (refiner_training left
    unset: st turns it on for a refiner, as SimpleTuner does): (root, config, model folder, train output)."""
    root = tmp_path_factory.mktemp("refiner")
    model = root / "model"
    sdxl.tiny(model, 0, refiner=True)
    config = cached_dataset(root, "sdxl", model, images=2, **{"--mixed_precision": "no", "--lora_dropout": 0,
                                                              "--caption_dropout_probability": 0})  # fmt: skip
    out = root / "train"
    train(config, root / "cache", out, "learning_rate=0.01", "validation_disable=false",
          "validation_step_interval=2", "validation_num_inference_steps=2", 'validation_resolution="64"')  # fmt: skip
    return root, config, model, out


def pipeline(model):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_refiner_flavours_and_folders_train_the_refiner_variant(refiner):
    _, _, model, _ = refiner
    family = get_family("sdxl")
    assert family.for_run("refiner-1.0", "stabilityai/stable-diffusion-xl-refiner-1.0") is sdxl.REFINER
    assert family.for_run("refiner-0.9", "x") is sdxl.REFINER
    assert family.for_run(None, str(model)) is sdxl.REFINER  # model_index.json: requires_aesthetics_score
    assert family.for_run("base-1.0", "stabilityai/stable-diffusion-xl-base-1.0") is family
    assert [s.model.subfolder for s in sdxl.REFINER.text_encoders] == ["text_encoder_2"]


def test_cached_embeddings_equal_the_img2img_pipelines_encode_prompt(refiner):
    from pipeline.cache_reader import CacheReader

    root, _, model, _ = refiner
    cached = CacheReader(root / "cache").prompt(PROMPT)
    pipe = pipeline(model)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    ours = sdxl.REFINER.encode_prompts((pipe.text_encoder_2,), (pipe.tokenizer_2,), [PROMPT])[0]
    assert torch.equal(ours["prompt_embeds"], embeds[0]) and torch.equal(ours["pooled_prompt_embeds"], pooled[0])
    for key, value in ours.items():  # st cache stores them in its embedding dtype
        assert torch.equal(cached[key], value.to(cached[key].dtype))


def test_time_ids_are_the_pipelines_and_the_aesthetic_score_changes_the_prediction(refiner):
    from pipeline.train.family_options import FamilyText

    root, config, model, _ = refiner
    pipe = pipeline(model)
    ids = pipe._get_add_time_ids((96, 64), (8, 0), (96, 64), 6.0, 2.5, (96, 64), (0, 0), (96, 64), torch.float32,
                                 pipe.text_encoder_2.config.projection_dim)[0]  # fmt: skip
    meta = [{"original_size": [64, 96], "crop_top_left": [8, 0], "target_size": [64, 96]}]
    assert torch.equal(sdxl.refiner_time_ids(meta, torch.tensor([6.0]), torch.float32, "cpu"), ids)

    from pipeline.cache_reader import CacheReader

    text = sdxl.REFINER.collate_text([CacheReader(root / "cache").prompt(PROMPT)])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def prediction(score: float):
        family_text = FamilyText.for_run(load_config(config, [f"data_aesthetic_score={score}"]).config,
                                         sdxl.REFINER)  # fmt: skip
        with torch.no_grad():
            return sdxl.REFINER.denoiser_forward(pipe.unet, latents, torch.tensor([100.0]),
                                                 family_text.denoiser_text([text], text), meta)  # fmt: skip

    assert torch.equal(prediction(7.0), sdxl.REFINER.denoiser_forward(pipe.unet, latents, torch.tensor([100.0]), text,
                                                                       meta))  # SimpleTuner's default  # fmt: skip
    assert not torch.equal(prediction(7.0), prediction(2.0))


def test_a_refiner_lora_trains_and_validates_through_the_img2img_pipeline(refiner):
    import json

    _, _, _, out = refiner
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["pipeline"] == "StableDiffusionXLImg2ImgPipeline"
    assert manifest["config"]["refiner_training"] is True  # set for a refiner, as SimpleTuner does
    assert (out / WEIGHTS).is_file()
    assert [t["subfolder"] for t in manifest["model"]["text_encoders"]] == ["text_encoder_2"]
    assert list((out / "validation").rglob("*-64x64-0.png"))


def test_the_published_lora_loads_into_the_img2img_pipeline_and_changes_its_output(refiner, tmp_path):
    from pipeline.publish.stage import run_publish

    _, config, model, out = refiner
    run_publish(load_config(config), out, tmp_path / "publish")
    run_publish(load_config(config, ['lora_format="comfyui"']), out, tmp_path / "comfyui")
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "comfyui").iterdir())
    pipe = pipeline(model)
    image = torch.zeros(1, 4, 8, 8)

    def render() -> np.ndarray:
        return pipe(prompt=PROMPT, image=image, strength=1.0, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip

    base = render()
    pipe.load_lora_weights(str(tmp_path / "publish" / "pytorch_lora_weights.safetensors"))
    tuned = render()
    assert np.isfinite(tuned).all() and np.abs(base - tuned).max() > 1e-4
