"""HiDream: the denoiser call is the pipeline's (sign, timestep scale, non-square padding), training mode gives the
same prediction as inference, SimpleTuner's 128-token cap, the load-balancing options and the example config."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.errors import InputError  # noqa: E402
from pipeline.families import get_family, load_components  # noqa: E402

FAMILY = get_family("hidream")
PROMPTS = ["a photo of a dog", "a red circle"]


@pytest.fixture(scope="module")
def parts(tiny_model):
    torch.manual_seed(0)
    loaded = load_components(FAMILY, tiny_model("hidream"), which=("denoiser", "text_encoders"))
    text = FAMILY.collate_text(FAMILY.encode_prompts(loaded["text_encoders"], loaded["tokenizers"], PROMPTS))
    return loaded["denoiser"], loaded, text


@pytest.mark.parametrize("size", [(16, 16), (16, 8)])
def test_forward_is_the_pipelines_call_negated(parts, size):
    transformer, _, text = parts
    latents = torch.randn(2, 16, *size, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([700.0, 250.0])
    with torch.no_grad():
        transformer.eval()
        ours = FAMILY.denoiser_forward(transformer, latents, timesteps, text)
        theirs = transformer(hidden_states=latents, timesteps=timesteps, return_dict=False,
                             encoder_hidden_states_t5=text["prompt_embeds_t5"],
                             encoder_hidden_states_llama3=text["prompt_embeds_llama3"],
                             pooled_embeds=text["pooled_prompt_embeds"])[0]  # fmt: skip
        transformer.train()  # the MoE routes token by token and the output stays patched: folded back here
        training = FAMILY.denoiser_forward(transformer, latents, timesteps, text)
        transformer.eval()
    assert ours.shape == latents.shape and torch.equal(ours, -theirs)
    torch.testing.assert_close(training, ours, atol=1e-5, rtol=1e-5)


def test_non_square_latents_beyond_max_seq_are_refused(parts):
    transformer, _, text = parts
    side = int(transformer.max_seq**0.5)
    with pytest.raises(InputError, match="non-square"):
        FAMILY.denoiser_forward(transformer, torch.zeros(2, 16, 4 * side, 2 * side), torch.tensor(500.0), text)


def test_the_llama_stack_is_layers_first_and_the_sequence_is_capped_at_128(parts):
    _, loaded, text = parts
    llama = loaded["text_encoders"][3]
    assert text["prompt_embeds_llama3"].shape == (llama.config.num_hidden_layers, 2, 128, llama.config.hidden_size)
    longer = FAMILY.encode_prompts(loaded["text_encoders"], loaded["tokenizers"], PROMPTS, max_length=300)
    assert longer[0]["prompt_embeds_t5"].shape[0] == 128  # SimpleTuner caps tokenizer_max_length to 128


def write(tmp_path, options: dict) -> object:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_family": "hidream", **options}))
    return path


# SimpleTuner's simpletuner/examples/hidream.peft-lora/config.json, unchanged.
EXAMPLE = {
    "aspect_bucket_rounding": 2, "attention_mechanism": "diffusers", "base_model_precision": "int8-quanto",
    "caption_dropout_probability": 0.1, "checkpoint_step_interval": 10, "checkpoints_total_limit": 5,
    "compress_disk_cache": False,
    "data_backend_config": "config/examples/multidatabackend-small-dreambooth-512px.json",
    "delete_problematic_images": False, "disable_benchmark": False, "disable_bucket_pruning": True,
    "ema_update_interval": 2, "ema_validation": "none", "eval_steps_interval": 5, "evaluation_type": "clip",
    "flow_schedule_shift": 3, "grad_clip_method": "value", "gradient_accumulation_steps": 1,
    "gradient_checkpointing": True, "hidream_load_balancing_loss_weight": 1e-05,
    "hidream_use_load_balancing_loss": False, "hub_model_id": "simpletuner-example-hidream-peft-lora",
    "strict_epoch_limit": False, "learning_rate": 5e-05, "lora_alpha": 128, "lora_rank": 128,
    "lora_type": "standard", "lr_scheduler": "cosine", "lr_warmup_steps": 400000, "max_grad_norm": 0.0,
    "max_train_steps": 100, "minimum_image_size": 0, "mixed_precision": "bf16", "model_family": "hidream",
    "model_flavour": "full", "model_type": "lora", "num_eval_images": 25, "num_train_epochs": 0,
    "optimizer": "optimi-lion", "output_dir": "output/examples/hidream.peft-lora", "prodigy_steps": 100000,
    "push_checkpoints_to_hub": False, "push_to_hub": False, "quantize_via": "cpu", "report_to": "none",
    "resolution": 512, "resolution_type": "pixel_area", "resume_from_checkpoint": "latest", "seed": 42,
    "skip_file_discovery": False, "text_encoder_4_precision": "int4-quanto", "tracker_project_name": "lora-training",
    "tracker_run_name": "hidream5m-adamW-eval", "train_batch_size": 1, "use_ema": False, "vae_batch_size": 1,
    "validation_guidance": 3.0, "validation_guidance_rescale": 0.0, "validation_lycoris_strength": 1.0,
    "validation_negative_prompt": None, "validation_num_inference_steps": 30,
    "validation_prompt": "🟫 is holding a sign that says hello world from hidream",
    "validation_disable_unconditional": True, "validation_prompt_library": False, "validation_resolution": "512x512",
    "validation_seed": 42, "validation_steps": 10,
}  # fmt: skip


def test_simpletuners_example_checks(tmp_path, monkeypatch):
    """Family, flavour, the load-balancing settings (off) and int4 Llama are accepted, and `prodigy_steps` (set though
    the optimizer is Lion: no effect, as in SimpleTuner), and SimpleTuner's CLIP evaluation."""
    from tests.unit.test_sana_kolors import check_example

    report = check_example(tmp_path, monkeypatch, "hidream.peft-lora", EXAMPLE)
    assert report.ok, report.problems
    config = load_config(tmp_path / "config" / "examples" / "hidream.peft-lora" / "config.json", []).config
    assert config.evaluation_type == "clip"
    assert FAMILY.flavour_hub_id(config.model_flavour) == "HiDream-ai/HiDream-I1-Full"
    assert config.prodigy_steps == 100000 and config.optimizer == "optimi-lion"
