"""Qwen-Image specifics: the prompt template's dropped tokens, the denoiser call with its text mask and image shapes,
the 3-D VAE's one-frame latents normalised per channel, the refused edit-v2+ flavour, SimpleTuner's example config, and the
ComfyUI LoRA key names."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.families import get_family, qwen_image

FAMILY = get_family("qwen_image")
PROMPTS = ["a red circle", "a photo of a small dog sitting in the snow next to a tall tree"]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import QwenImagePipeline

    loaded = QwenImagePipeline.from_pretrained(tiny_model("qwen_image"))
    loaded.set_progress_bar_config(disable=True)
    return loaded


def encode(pipe, prompts):
    return FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], prompts)


def test_the_dropped_tokens_are_the_templates_system_part(pipe):
    system = qwen_image.PROMPT_TEMPLATE.split("{}")[0]
    assert len(pipe.tokenizer(system).input_ids) == qwen_image.TEMPLATE_TOKENS == pipe.prompt_template_encode_start_idx
    items = encode(pipe, PROMPTS)
    # what is kept: the prompt's own tokens, then "<|im_end|>\n<|im_start|>assistant\n" (5 tokens)
    kept = [len(pipe.tokenizer(prompt).input_ids) + 5 for prompt in PROMPTS]
    assert [item["prompt_embeds"].shape[0] for item in items] == kept
    assert all(bool(item["attention_mask"].all()) for item in items)
    short = encode(pipe, PROMPTS[:1])[0]["prompt_embeds"]  # batch neighbours change nothing
    torch.testing.assert_close(short, items[0]["prompt_embeds"], atol=1e-6, rtol=0)


def test_max_length_truncates_as_the_pipeline(pipe):
    batch = FAMILY.collate_text(FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS, max_length=8))
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=8)
    assert batch["prompt_embeds"].shape[1] == 8 and torch.equal(batch["prompt_embeds"], embeds)
    assert mask is None and bool(batch["attention_mask"].all())  # the pipeline drops an all-ones mask
    with pytest.raises(ConfigError, match="exceeds"):
        FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS, max_length=1025)


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1]], ids=["padded", "one"])
def test_predict_is_the_pipelines_denoiser_call(pipe, prompts):
    batch = FAMILY.collate_text(encode(pipe, prompts))
    embeds, mask = pipe.encode_prompt(prompts, device="cpu")
    b, h, w = len(prompts), 8, 12
    latents = torch.randn(b, 16, h, w, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([700.0, 250.0][:b])
    with torch.no_grad():
        ours = FAMILY.denoiser_forward(pipe.transformer, latents, timesteps, batch)
        packed = pipe._pack_latents(latents.unsqueeze(1), b, 16, h, w)  # the pipeline's B x 1 x C x h x w noise
        theirs = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=None,
                                  encoder_hidden_states_mask=mask, encoder_hidden_states=embeds,
                                  img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]  # fmt: skip
    scale = pipe.vae_scale_factor
    assert torch.equal(ours, pipe._unpack_latents(theirs, h * scale, w * scale, scale)[:, :, 0])


def test_cached_latents_are_4d_and_normalised_per_channel(tiny_model):
    from pipeline.cache.encode import Encoders, sample_seed

    encoders = Encoders(FAMILY, str(tiny_model("qwen_image")), None, None, None, None, "fp32", "cpu")
    pixels = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cached = encoders.encode_latents(pixels, ["sample"], seed=7)
    assert cached.shape == (1, 16, 16, 24)
    vae = encoders.vae
    with torch.no_grad():
        dist = vae.encode(pixels.unsqueeze(2)).latent_dist  # one frame
    noise = torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(sample_seed(7, "sample")))
    sample = dist.mean + dist.std * noise
    # what the pipeline does before decoding: latents / (1 / std) + mean, with the time axis back
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(cached.unsqueeze(2) / std + mean, sample, atol=1e-5, rtol=1e-5)
    described = encoders.vae_description()
    assert described["latent_channels"] == 16 and described["scaling_factor"] == 1.0
    assert described["latents_mean"] == pytest.approx(vae.config.latents_mean)


def test_edit_flavours_name_their_models():
    """edit-v1, edit-v2, edit-v2+ and edit-v3 train (tests/unit/test_qwen_image_edit*.py)."""
    assert FAMILY.flavour_hub_id("edit-v2+") == FAMILY.flavour_hub_id("edit-v2") == "Qwen/Qwen-Image-Edit-2509"
    assert FAMILY.flavour_hub_id(None) == "Qwen/Qwen-Image-2512"


# SimpleTuner's simpletuner/examples/qwen_image.peft-lora/config.json, unchanged.
EXAMPLE = {
    "base_model_precision": "int2-quanto", "caption_dropout_probability": 0.0, "checkpoint_step_interval": 50,
    "checkpoints_total_limit": 5, "compress_disk_cache": False,
    "data_backend_config": "config/examples/multidatabackend-small-dreambooth-1024px.json",
    "disable_benchmark": True, "disable_bucket_pruning": True, "flow_schedule_shift": 1.73,
    "gradient_checkpointing": True, "hub_model_id": "simpletuner-example-qwen_image-peft-lora",
    "strict_epoch_limit": False, "learning_rate": 1e-4, "lora_alpha": 8, "lora_rank": 8, "lora_type": "standard",
    "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 10, "max_grad_norm": 0.01, "max_train_steps": 100,
    "minimum_image_size": 0, "mixed_precision": "bf16", "model_family": "qwen_image", "model_flavour": "v1.0",
    "model_type": "lora", "num_eval_images": 25, "num_train_epochs": 0, "optimizer": "optimi-lion",
    "output_dir": "output/examples/qwen_image.peft-lora", "push_checkpoints_to_hub": False, "push_to_hub": False,
    "quantize_via": "cpu", "quantize_activations": False, "report_to": "none", "resolution": 1024,
    "resolution_type": "pixel_area", "resume_from_checkpoint": "latest", "seed": 42, "skip_file_discovery": False,
    "tracker_project_name": "lora-training", "tracker_run_name": "example-training-run", "train_batch_size": 1,
    "use_ema": False, "vae_batch_size": 1, "validation_guidance": 4.0, "validation_guidance_rescale": 0.0,
    "validation_lycoris_strength": 1.0,
    "validation_negative_prompt": "ugly, cropped, blurry, low-quality, mediocre average",
    "validation_num_inference_steps": 30,
    "validation_prompt": "🟫 is holding a sign that says hello world from qwen_image",
    "validation_prompt_library": False, "validation_resolution": "1024x1024", "validation_seed": 42,
    "validation_steps": 50,
}  # fmt: skip


def test_simpletuners_example_config_checks_unchanged(tmp_path, monkeypatch):
    from pipeline.check import run_check
    from pipeline.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pics").mkdir()
    folder = tmp_path / "config" / "examples"
    (folder / "qwen_image.peft-lora").mkdir(parents=True)
    config = folder / "qwen_image.peft-lora" / "config.json"
    config.write_text(json.dumps(EXAMPLE))
    datasets = [
        {
            "id": "dreambooth-1024",
            "type": "local",
            "instance_data_dir": "pics",
            "resolution": 1024,
            "resolution_type": "pixel_area",
            "caption_strategy": "instanceprompt",
            "instance_prompt": "🟫",
        }
    ]
    (folder / "multidatabackend-small-dreambooth-1024px.json").write_text(json.dumps(datasets))
    report = run_check(config, [])
    assert report.ok, report.problems
    loaded = load_config(config).config
    assert loaded.model_family == "qwen_image" and loaded.flow_schedule_shift == 1.73


def test_comfyui_keys_are_the_diffusers_module_names(pipe):
    """ComfyUI's Qwen-Image keeps diffusers' module names: `diffusion_model.<module>.weight` (comfy/lora.py)."""
    from pipeline.publish import comfyui
    from pipeline.publish.lora import LoraModule

    names = [n for n, _ in pipe.transformer.named_modules() if n.endswith(FAMILY.lora_targets)]
    weights = pipe.transformer.state_dict()
    mods = [LoraModule(name, torch.ones(2, weights[f"{name}.weight"].shape[1]),
                       torch.ones(weights[f"{name}.weight"].shape[0], 2), 4.0, 2.0) for name in names]  # fmt: skip
    out = comfyui.convert("qwen_image", mods, dict(pipe.transformer.config))
    assert set(out) == {f"diffusion_model.{n}.{part}" for n in names for part in ("lora_A.weight", "lora_B.weight",
                                                                                   "alpha")}  # fmt: skip
    assert all(f"{n}.weight" in weights for n in names) and len(names) == 2 * 4  # 2 blocks x 4 targets
