"""Chroma specifics: the denoiser call with its text mask (real tokens and the first padding token), `t5_padding`,
SimpleTuner's Chroma sigma schedule and LoRA presets, single-file detection, and SimpleTuner's example config."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.families import chroma, get_family
from pipeline.train.objectives import Objective

FAMILY = get_family("chroma")
PROMPTS = ["a red circle", "a photo of a small dog sitting in the snow next to a tall tree"]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import ChromaPipeline

    loaded = ChromaPipeline.from_pretrained(tiny_model("chroma"))
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _text(pipe, **kw):
    items = FAMILY.encode_prompts((pipe.text_encoder,), (pipe.tokenizer,), PROMPTS, **kw)
    return FAMILY.collate_text(items)


def test_mask_keeps_the_real_tokens_and_the_first_padding_token(pipe):
    text = _text(pipe, max_length=32)
    real = pipe.tokenizer(PROMPTS, padding="max_length", max_length=32, return_tensors="pt").attention_mask
    assert text["prompt_embeds"].shape[1] == text["attention_mask"].shape[1] == 32
    assert torch.equal(text["attention_mask"].sum(dim=1), real.sum(dim=1) + 1)
    with pytest.raises(ConfigError, match="exceeds"):
        _text(pipe, max_length=513)


def test_t5_padding_zero_multiplies_by_the_mask(pipe):
    plain, zero = _text(pipe, max_length=32), _text(pipe, max_length=32, t5_padding="zero")
    keep = plain["attention_mask"].bool().unsqueeze(-1)
    assert torch.equal(zero["prompt_embeds"], plain["prompt_embeds"] * keep)
    assert plain["prompt_embeds"].masked_select(~keep).abs().sum() > 0


def test_denoiser_call_is_the_pipelines(pipe):
    """ChromaPipeline's loop: packed latents, image ids, zero text ids, timestep / 1000, the mask extended with ones
    over the image tokens (`_prepare_attention_mask`)."""
    from diffusers import ChromaPipeline

    text = _text(pipe, max_length=32)
    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([250.0, 750.0])
    b, c, h, w = latents.shape
    with torch.no_grad():
        ours = FAMILY.denoiser_forward(pipe.transformer, latents, timesteps, text)
        mask = pipe._prepare_attention_mask(b, (h // 2) * (w // 2), latents.dtype, text["attention_mask"])
        noise = pipe.transformer(
            hidden_states=ChromaPipeline._pack_latents(latents, b, c, h, w),
            timestep=timesteps / 1000,
            encoder_hidden_states=text["prompt_embeds"],
            txt_ids=torch.zeros(text["prompt_embeds"].shape[1], 3),
            img_ids=ChromaPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", latents.dtype),
            attention_mask=mask,
            return_dict=False,
        )[0]
        theirs = ChromaPipeline._unpack_latents(noise, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                                pipe.vae_scale_factor)  # fmt: skip
        # the mask matters: without it the prediction differs
        unmasked = dict(text, attention_mask=torch.ones_like(text["attention_mask"]))
        other = FAMILY.denoiser_forward(pipe.transformer, latents, timesteps, unmasked)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ours, other)


def test_training_sigmas_follow_simpletuners_chroma_schedule():
    def objective(**options):
        curve = chroma.training_sigmas if options.pop("curve") else None
        return Objective(Config(**options), kind="flow_matching", scheduler_config=None, default_shift=3.0,
                         sigma_curve=curve)  # fmt: skip

    plain = objective(curve=False).sample_sigmas(4096, torch.Generator().manual_seed(0), 3.0)
    curved = objective(curve=True).sample_sigmas(4096, torch.Generator().manual_seed(0), 3.0)
    expected = torch.where(plain < 0.5, plain.square(), 1 - (1 - plain).square())
    torch.testing.assert_close(curved, expected)
    assert ((curved - 0.5).abs() >= (plain - 0.5).abs()).all()
    # SimpleTuner leaves the uniform and beta schedules as they are
    uniform = objective(curve=True, flow_use_uniform_schedule=True)
    same = objective(curve=False, flow_use_uniform_schedule=True)
    assert torch.equal(uniform.sample_sigmas(64, torch.Generator().manual_seed(1), 3.0),
                       same.sample_sigmas(64, torch.Generator().manual_seed(1), 3.0))  # fmt: skip


def test_lora_presets_match_the_denoiser(pipe):
    for name, _ in FAMILY.lora_presets:
        assert FAMILY.lora_target_modules(name, denoiser=pipe.transformer)
    assert "norm1.linear" not in FAMILY.lora_target_modules("ai-toolkit")  # Chroma prunes the adaLN linears


# SimpleTuner's simpletuner/examples/chroma.peft-lora/config.json, unchanged.
EXAMPLE = {
    "base_model_precision": "int8-quanto", "checkpoint_step_interval": 10, "controlnet": False,
    "data_backend_config": "config/examples/multidatabackend-small-dreambooth-512px.json",
    "disable_bucket_pruning": True, "flow_schedule_shift": 3, "fuse_qkv_projections": False,
    "grad_clip_method": "value", "gradient_checkpointing": True, "hub_model_id": "simpletuner-example-chroma-peft-lora",
    "learning_rate": 1e-4, "lora_alpha": 16, "lora_rank": 16, "lora_type": "standard", "lr_scheduler": "constant",
    "max_train_steps": 100, "mixed_precision": "bf16", "model_family": "chroma", "model_type": "lora",
    "num_eval_images": 25, "num_train_epochs": 0, "optimizer": "adamw_bf16",
    "output_dir": "output/examples/chroma.peft-lora+TREAD", "push_checkpoints_to_hub": False, "push_to_hub": False,
    "quantize_via": "cpu", "report_to": "none", "seed": 42, "tracker_project_name": "lora-training",
    "tracker_run_name": "example-training-run", "train_batch_size": 1, "use_ema": False, "vae_batch_size": 1,
    "validation_disable_unconditional": True, "validation_guidance": 4.0, "validation_guidance_rescale": 0.0,
    "validation_negative_prompt": "ugly, cropped, blurry, low-quality, mediocre average",
    "validation_num_inference_steps": 16,
    "validation_prompt": "🟫 is holding a sign that says hello world from chroma",
    "validation_prompt_library": False, "validation_resolution": "1024x1024", "validation_seed": 42,
    "validation_steps": 50,
}  # fmt: skip


def test_simpletuners_example_config_checks_unchanged(tmp_path, monkeypatch):
    from pipeline.check import run_check
    from pipeline.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pics").mkdir()
    folder = tmp_path / "config" / "examples"
    (folder / "chroma.peft-lora").mkdir(parents=True)
    config = folder / "chroma.peft-lora" / "config.json"
    config.write_text(json.dumps(EXAMPLE))
    datasets = [{"id": "dreambooth-512", "type": "local", "instance_data_dir": "pics", "resolution": 512,
                 "resolution_type": "pixel_area", "caption_strategy": "instanceprompt", "instance_prompt": "🟫"}]  # fmt: skip
    (folder / "multidatabackend-small-dreambooth-512px.json").write_text(json.dumps(datasets))
    report = run_check(config, [])
    assert report.ok, report.problems
    loaded = load_config(config).config
    assert loaded.model_family == "chroma" and loaded.flow_schedule_shift == 3


def test_single_file_checkpoint_is_told_apart_from_flux(tmp_path):
    """Chroma's original checkpoints keep Flux's block names; the modulation approximator marks them."""
    from safetensors.torch import save_file

    from pipeline.errors import InputError
    from pipeline.families import check_model_family
    from pipeline.families.detect import detect_single_file

    path = tmp_path / "chroma.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2),
               "distilled_guidance_layer.in_proj.weight": torch.zeros(2, 2)}, str(path))  # fmt: skip
    assert detect_single_file(path).families == ("chroma",)
    check_model_family(FAMILY, str(path))
    with pytest.raises(InputError, match='set model_family = "chroma"'):
        check_model_family(get_family("flux"), str(path))
