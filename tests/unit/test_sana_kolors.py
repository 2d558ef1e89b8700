"""Sana's complex human instruction (SimpleTuner's `sana_complex_human_instruction`) and deterministic latents, Kolors'
tiny tokenizer, and SimpleTuner's Sana and Kolors example configs under `st check`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.families import get_family, load_components
from pipeline.families.sana import COMPLEX_HUMAN_INSTRUCTION, instruction_lines

FAMILY = get_family("sana")
PROMPTS = ["A Red Circle ", "a small house next to a tall tree under the blue sky"]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import SanaPipeline

    return SanaPipeline.from_pretrained(str(tiny_model("sana")))


@pytest.mark.parametrize("lines", [(), ("Describe the image:", "User Prompt:")], ids=["none", "custom"])
def test_embeddings_equal_the_pipeline_with_any_instruction(pipe, lines):
    items = FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS, complex_human_instruction=lines)
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device="cpu",
                                                complex_human_instruction=list(lines) or None)  # fmt: skip
    batch = FAMILY.collate_text(items)
    assert torch.equal(batch["attention_mask"], mask)
    real = mask.bool()
    assert torch.equal(batch["prompt_embeds"][real], embeds[real])
    assert [item["prompt_embeds"].shape[0] for item in items] == mask.sum(dim=1).tolist()


def test_the_instruction_changes_the_embeddings(pipe):
    def first(lines):
        return FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS[:1],
                                     complex_human_instruction=lines)[0]["prompt_embeds"]  # fmt: skip

    assert not torch.equal(first(COMPLEX_HUMAN_INSTRUCTION), first(()))


def test_instruction_is_read_as_simpletuner_reads_it(tmp_path):
    assert COMPLEX_HUMAN_INSTRUCTION[-1] == "User Prompt:" and len(COMPLEX_HUMAN_INSTRUCTION) == 10
    assert instruction_lines(None) == instruction_lines("None") == instruction_lines("") == ()
    assert instruction_lines(" one \n\n two ") == instruction_lines('["one", " two", ""]') == ("one", "two")
    file = tmp_path / "instruction.txt"
    file.write_text("from a file\nUser Prompt: \n")
    assert instruction_lines(str(file)) == ("from a file", "User Prompt:")
    with pytest.raises(ConfigError, match="sana_complex_human_instruction"):
        instruction_lines('{"not": "a list"}')
    with pytest.raises(ConfigError, match="sana_complex_human_instruction"):
        instruction_lines('["unclosed"')


def test_config_default_is_simpletuners_and_none_switches_it_off(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_family": "sana", "pretrained_model_name_or_path": "x"}))
    assert instruction_lines(load_config(config).config.sana_complex_human_instruction) == COMPLEX_HUMAN_INSTRUCTION
    loaded = load_config(config, ['sana_complex_human_instruction="None"']).config
    assert instruction_lines(loaded.sana_complex_human_instruction) == ()


def test_latents_are_the_deterministic_dc_autoencoder_latents(tiny_model):
    """AutoencoderDC has no latent distribution: `st cache` stores its `.latent` times the configured scale."""
    from pipeline.cache.encode import Encoders

    vae = load_components(FAMILY, tiny_model("sana"), which=("vae",))["vae"]
    encoders = Encoders(family=FAMILY, source=str(tiny_model("sana")), vae_source=None, t5_source=None,
                        revision=None, variant=None, vae_dtype="fp32", device="cpu")  # fmt: skip
    pixels = torch.rand(2, 3, 64, 96) * 2 - 1
    latents = encoders.encode_latents(pixels, ["a", "b"], seed=1)
    with torch.no_grad():
        expected = vae.encode(pixels).latent * vae.config.scaling_factor
    assert latents.shape == (2, 32, 2, 3)
    torch.testing.assert_close(latents, expected)
    assert torch.equal(latents, encoders.encode_latents(pixels, ["a", "b"], seed=2))  # no sampling noise


# SimpleTuner's simpletuner/examples/sana.lycoris-lokr/config.json, unchanged.
EXAMPLE = {
    "aspect_bucket_rounding": 2, "base_model_precision": "no_change", "caption_dropout_probability": 0.1,
    "checkpoint_step_interval": 50, "checkpoints_total_limit": 5, "compress_disk_cache": True,
    "data_backend_config": "config/examples/multidatabackend-small-dreambooth-1024px.json",
    "delete_problematic_images": True, "disable_benchmark": False, "disable_bucket_pruning": True,
    "ema_update_interval": 25, "ema_validation": "comparison", "evaluation_type": "clip", "flow_schedule_shift": 3,
    "grad_clip_method": "value", "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
    "gradient_checkpointing_interval": 1, "hub_model_id": "simpletuner-example-sana-lycoris-lokr",
    "learning_rate": 2e-5, "lora_alpha": 128, "lora_rank": 128, "lora_type": "lycoris",
    "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 100,
    "lycoris_config": "config/examples/sana.lycoris-lokr/lycoris_config.json", "max_grad_norm": 1,
    "max_train_steps": 100, "minimum_image_size": 0, "mixed_precision": "bf16", "model_family": "sana",
    "model_type": "lora", "num_train_epochs": 0, "optimizer": "adamw_bf16",
    "output_dir": "output/examples/sana.lycoris-lokr", "pretrained_model_name_or_path": "terminusresearch/sana-1.6b-1024px",
    "push_checkpoints_to_hub": False, "push_to_hub": False, "quantize_via": "cpu", "report_to": "none",
    "resolution": 1024, "resolution_type": "pixel_area", "resume_from_checkpoint": "latest", "seed": 42,
    "skip_file_discovery": False, "tracker_project_name": "lycoris-training", "tracker_run_name": "example-training-run",
    "train_batch_size": 4, "use_ema": True, "vae_batch_size": 1, "validation_guidance": 4.5,
    "validation_guidance_rescale": 0.0, "validation_lycoris_strength": 1.0,
    "validation_negative_prompt": "ugly, cropped, blurry, low-quality, mediocre average",
    "validation_num_inference_steps": 20, "validation_prompt": "🟫 is holding a sign that says hello world from sana",
    "validation_prompt_library": False, "validation_resolution": "1024x1024", "validation_seed": 42,
    "validation_steps": 50,
}  # fmt: skip


LYCORIS_CONFIG = {"bypass_mode": True, "algo": "lokr", "multiplier": 1.0, "full_matrix": True, "linear_dim": 10000,
                  "linear_alpha": 1, "factor": 4, "apply_preset": {"target_module": ["Attention", "FeedForward"],
                  "module_algo_map": {"FeedForward": {"factor": 4}, "Attention": {"factor": 2}}}}  # fmt: skip


def check_example(tmp_path, monkeypatch, name: str, config: dict, files: dict[str, dict] | None = None, sets=()):
    """`st check` on SimpleTuner's example `name` laid out as in SimpleTuner's repository (config/examples/...), its
    dataset list a local folder in place of the example's hub dataset."""
    from pipeline.check import run_check

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pics").mkdir(exist_ok=True)
    folder = tmp_path / "config" / "examples"
    (folder / name).mkdir(parents=True, exist_ok=True)
    for file, content in {"config.json": config, **(files or {})}.items():
        (folder / name / file).write_text(json.dumps(content))
    datasets = [{"id": "dreambooth", "type": "local", "instance_data_dir": "pics", "resolution": 1024,
                 "resolution_type": "pixel_area", "caption_strategy": "instanceprompt", "instance_prompt": "🟫"}]
    (folder / Path(config["data_backend_config"]).name).write_text(json.dumps(datasets))
    return run_check(folder / name / "config.json", list(sets))


def test_simpletuners_sana_example_checks(tmp_path, monkeypatch):
    """The family, its hub model, the LyCORIS LoKr settings and SimpleTuner's CLIP evaluation are accepted."""
    files = {"lycoris_config.json": LYCORIS_CONFIG}
    report = check_example(tmp_path, monkeypatch, "sana.lycoris-lokr", EXAMPLE, files)
    assert report.ok, report.problems


# SimpleTuner's simpletuner/examples/kolors.peft-lora/config.json, unchanged.
KOLORS_EXAMPLE = {
    "base_model_precision": "int8-quanto", "caption_dropout_probability": 0.1, "checkpoint_step_interval": 50,
    "checkpoints_total_limit": 5, "data_backend_config": "config/examples/multidatabackend-small-dreambooth-512px.json",
    "disable_bucket_pruning": True, "gradient_checkpointing": True,
    "hub_model_id": "simpletuner-example-kolors-peft-lora", "learning_rate": 1e-5, "lora_rank": 16,
    "lora_type": "standard", "lr_scheduler": "constant", "max_train_steps": 100, "mixed_precision": "bf16",
    "model_family": "kolors", "model_flavour": "1.0", "model_type": "lora", "num_train_epochs": 0,
    "optimizer": "adamw_bf16", "output_dir": "output/examples/kolors.peft-lora", "push_checkpoints_to_hub": False,
    "push_to_hub": False, "quantize_via": "cpu", "report_to": "none", "resolution": 1024,
    "resolution_type": "pixel_area", "seed": 42, "train_batch_size": 1, "use_ema": False, "vae_batch_size": 1,
    "validation_guidance": 5.0, "validation_num_inference_steps": 20, "validation_prompt": "domokun holding a sign",
    "validation_prompt_library": False, "validation_resolution": "1024x1024", "validation_seed": 42,
    "validation_steps": 50,
}  # fmt: skip


def test_simpletuners_kolors_example_checks_unchanged(tmp_path, monkeypatch):
    report = check_example(tmp_path, monkeypatch, "kolors.peft-lora", KOLORS_EXAMPLE)
    assert report.ok, report.problems
    config = load_config(tmp_path / "config" / "examples" / "kolors.peft-lora" / "config.json").config
    assert get_family(config.model_family).flavour_hub_id(config.model_flavour) == "terminusresearch/kwai-kolors-1.0"


def test_kolors_tokenizer_is_built_offline_the_same_every_time(tmp_path):
    from pipeline.families.tokenizers import chatglm_tokenizer, sentencepiece_model

    assert sentencepiece_model() == sentencepiece_model()
    tokenizer = chatglm_tokenizer(tmp_path)
    ids = tokenizer(["a red circle"], padding="max_length", max_length=32, return_tensors="pt")
    prefix = [tokenizer.convert_tokens_to_ids(t) for t in ("[gMASK]", "sop")]
    real = ids["attention_mask"][0].bool()
    assert not real[0] and real[-1]  # padded on the left, as ChatGLM's tokenizer does
    assert ids["input_ids"][0][real][:2].tolist() == prefix
    assert tokenizer.decode(ids["input_ids"][0][real][2:]) == "a red circle"
