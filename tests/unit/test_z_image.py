"""Z-Image specifics: the chat template and Qwen3's penultimate layer, the list-based denoiser call with reversed time,
the flavours' hub ids, SimpleTuner's example config, and the ComfyUI LoRA key names."""

from __future__ import annotations

import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from pipeline.families import get_family

FAMILY = get_family("z_image")
PROMPTS = ["a red circle", "a photo of a small dog sitting in the snow next to a tall tree"]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import ZImagePipeline

    loaded = ZImagePipeline.from_pretrained(tiny_model("z_image"))
    loaded.set_progress_bar_config(disable=True)
    return loaded


def encode(pipe, prompts, **kw):
    return FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], prompts, **kw)


def test_prompts_are_wrapped_in_the_chat_template_and_read_from_the_penultimate_layer(pipe):
    items = encode(pipe, PROMPTS)
    for prompt, item in zip(PROMPTS, items, strict=True):
        chat = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        ids = pipe.tokenizer(chat, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(item["prompt_embeds"], hidden[-2][0], atol=1e-5, rtol=0)
        assert not torch.allclose(item["prompt_embeds"], hidden[-1][0])
        assert bool(item["attention_mask"].all())


def test_max_length_truncates_as_the_pipeline(pipe):
    ours = encode(pipe, PROMPTS, max_length=8)
    theirs, _ = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False,
                                   max_sequence_length=8)  # fmt: skip
    assert [o["prompt_embeds"].shape[0] for o in ours] == [8, 8]
    assert all(torch.equal(o["prompt_embeds"], t) for o, t in zip(ours, theirs, strict=True))


def test_predict_is_the_pipelines_denoiser_call(pipe):
    """Captions of different lengths are cut back to their real tokens; time runs 1 -> 0 and the output is negated."""
    batch = FAMILY.collate_text(encode(pipe, PROMPTS))
    embeds, _ = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False)
    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([700.0, 250.0])
    with torch.no_grad():
        ours = FAMILY.denoiser_forward(pipe.transformer, latents, timesteps, batch)
        out = pipe.transformer(list(latents.unsqueeze(2).unbind(dim=0)), (1000 - timesteps) / 1000, embeds,
                               return_dict=False)[0]  # fmt: skip
    assert torch.equal(ours, -torch.stack(out).squeeze(2))


def test_flavours_hub_ids():
    """ostris-de-turbo: the Turbo pipeline around ostris' transformer (tests/unit/test_z_image_de_turbo.py)."""
    assert FAMILY.flavour_hub_id("ostris-de-turbo") == "TONGYI-MAI/Z-Image-Turbo"
    assert FAMILY.flavour_hub_id("base") == "TONGYI-MAI/Z-Image"
    assert FAMILY.flavour_hub_id("turbo") == FAMILY.flavour_hub_id("turbo-ostris-v2") == "TONGYI-MAI/Z-Image-Turbo"
    assert FAMILY.flavour_hub_id(None) == "TONGYI-MAI/Z-Image-Turbo"  # SimpleTuner's default, turbo-ostris-v2


# SimpleTuner's simpletuner/examples/z-image.peft-lora/config.json, unchanged.
EXAMPLE = {
    "base_model_precision": "int8-torchao", "caption_dropout_probability": 0.0, "checkpoint_step_interval": 50,
    "checkpoints_total_limit": 5, "compress_disk_cache": False,
    "data_backend_config": "config/examples/multidatabackend-small-dreambooth-512px.json",
    "disable_bucket_pruning": True, "gradient_checkpointing": True,
    "hub_model_id": "simpletuner-example-z-image-peft-lora", "strict_epoch_limit": False, "learning_rate": 1e-4,
    "lora_rank": 64, "lora_type": "standard", "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 100,
    "max_grad_norm": 0.01, "max_train_steps": 1000, "minimum_image_size": 0, "mixed_precision": "bf16",
    "model_family": "z_image", "model_flavour": "base", "model_type": "lora", "num_eval_images": 25,
    "num_train_epochs": 0, "optimizer": "optimi-lion", "output_dir": "output/examples/z-image.peft-lora",
    "push_checkpoints_to_hub": False, "push_to_hub": False, "quantize_via": "cpu", "report_to": "none",
    "resolution": 1024, "resolution_type": "pixel_area", "resume_from_checkpoint": "latest", "seed": 42,
    "skip_file_discovery": False, "tracker_project_name": "lora-training", "tracker_run_name": "example-training-run",
    "train_batch_size": 1, "use_ema": False, "vae_batch_size": 1, "validation_guidance": 4.0,
    "validation_guidance_rescale": 0.0, "validation_lycoris_strength": 1.0, "validation_num_inference_steps": 30,
    "validation_prompt": "🟫 is holding a sign that says hello world from z-image", "validation_prompt_library": False,
    "validation_resolution": "1024x1024", "validation_seed": 42, "validation_steps": 50,
}  # fmt: skip


def test_simpletuners_example_config_checks_unchanged(tmp_path, monkeypatch):
    from pipeline.check import run_check
    from pipeline.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pics").mkdir()
    folder = tmp_path / "config" / "examples"
    (folder / "z-image.peft-lora").mkdir(parents=True)
    config = folder / "z-image.peft-lora" / "config.json"
    config.write_text(json.dumps(EXAMPLE))
    datasets = [{"id": "dreambooth-512", "type": "local", "instance_data_dir": "pics", "resolution": 512,
                 "resolution_type": "pixel_area", "caption_strategy": "instanceprompt", "instance_prompt": "🟫"}]  # fmt: skip
    (folder / "multidatabackend-small-dreambooth-512px.json").write_text(json.dumps(datasets))
    report = run_check(config, [])
    assert report.ok, report.problems
    loaded = load_config(config).config
    assert loaded.model_family == "z_image" and loaded.model_flavour == "base"


def test_comfyui_keys_are_the_names_comfyuis_z_image_map_reads(pipe):
    """comfy/lora.py's Lumina2 branch maps `diffusion_model.` + Z-Image's diffusers names of the attention
    projections in `layers`, `noise_refiner` and `context_refiner` (comfy.utils.z_image_to_diffusers)."""
    from pipeline.publish import comfyui
    from pipeline.publish.lora import LoraModule

    names = [n for n, _ in pipe.transformer.named_modules() if n.endswith(FAMILY.lora_targets)]
    weights = pipe.transformer.state_dict()
    mods = [LoraModule(name, torch.ones(2, weights[f"{name}.weight"].shape[1]),
                       torch.ones(weights[f"{name}.weight"].shape[0], 2), 4.0, 2.0) for name in names]  # fmt: skip
    out = comfyui.convert("z_image", mods, dict(pipe.transformer.config))
    assert set(out) == {f"diffusion_model.{n}.{part}" for n in names for part in ("lora_A.weight", "lora_B.weight",
                                                                                   "alpha")}  # fmt: skip
    mapped = re.compile(r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.(to_[qkv]|to_out\.0)")
    assert len(names) == 3 * 4 and all(mapped.fullmatch(n) for n in names)  # 3 blocks x 4 targets


def test_comfyui_refuses_key_value_projections_of_grouped_heads(pipe):
    """ComfyUI gives to_k / to_v `dim` rows each of the fused qkv: with fewer key/value heads that is wrong."""
    from pipeline.errors import NotSupportedError
    from pipeline.publish import comfyui
    from pipeline.publish.lora import LoraModule

    mod = LoraModule("layers.0.attention.to_k", torch.ones(2, 32), torch.ones(16, 2), 4.0, 2.0)
    config = {**dict(pipe.transformer.config), "n_kv_heads": 1}
    with pytest.raises(NotSupportedError, match='no counterpart .* lora_format = "diffusers"'):
        comfyui.convert("z_image", [mod], config)


def test_the_quickstarts_z_image_spelling_names_the_family():
    from pipeline.simpletuner import choice_problem

    _, message = choice_problem("model_family", "z-image")
    assert "SimpleTuner names that family 'z_image'; set model_family to 'z_image'" in message
