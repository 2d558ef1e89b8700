"""SD3 validation with skip-layer guidance (`validation_guidance_skip_layers` and its _start/_stop/_scale options):
the image st renders from its cached prompt and negative prompt is StableDiffusion3Pipeline's with
`skip_guidance_layers`; other families are refused; SimpleTuner's sd3.peft-lora example passes `st check`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.families import get_family
from pipeline.prompts import ValidationPrompt
from pipeline.train.validation import Validator, skip_layer_guidance
from tests.helpers.trainers import build_trainer

TEXT, NEGATIVE = "a red circle on a white background", ""  # the sample config's validation_negative_prompt
STEPS, GUIDANCE, SIZE, SEED = 4, 4.0, 64, 5
# Every step but the first (the pipeline skips layers on steps i with start * steps < i < stop * steps).
SKIP = {"validation_guidance_skip_layers": [1], "validation_guidance_skip_layers_start": 0.0,
        "validation_guidance_skip_layers_stop": 1.0, "validation_guidance_skip_scale": 2.8}  # fmt: skip


@pytest.fixture(scope="module")
def sd3_run(cached, tmp_path_factory):
    """An SD3 trainer (LoRA at zero: the base model) and its cached prompt and negative-prompt embeddings."""
    from pipeline.cache_reader import CacheReader

    root, config = cached("sd3")
    trainer = build_trainer((root, config), tmp_path_factory.mktemp("out"), f"validation_num_inference_steps={STEPS}",
                            f'validation_resolution="{SIZE}"', f"validation_guidance={GUIDANCE}",
                            f"validation_seed={SEED}", 'mixed_precision="no"')  # fmt: skip
    reader = CacheReader(root / "cache")
    return trainer, {t: reader.prompt(t) for t in (TEXT, NEGATIVE)}


def render(sd3_run, out, **options) -> np.ndarray:
    trainer, embeds = sd3_run
    validator = Validator(trainer.family, dataclasses.replace(trainer.validation_options, **options),
                          source=trainer.source, vae_source=None, denoiser=trainer.unwrapped,
                          prompts=[ValidationPrompt("p", TEXT)], embeds=embeds, out_dir=out,
                          device="cpu")  # fmt: skip
    with Image.open(validator.render(0, "step")[0]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_skip_layer_guidance_renders_the_sd3_pipelines_image(sd3_run, tiny_model, tmp_path):
    plain = render(sd3_run, tmp_path / "plain")
    skipped = render(sd3_run, tmp_path / "skip", **SKIP)
    assert np.abs(skipped - plain).max() > 8  # skip-layer guidance changes the image
    family, embeds = get_family("sd3"), sd3_run[1]
    pos, neg = family.collate_text([embeds[TEXT]]), family.collate_text([embeds[NEGATIVE]])
    text = {"prompt_embeds": pos["prompt_embeds"], "pooled_prompt_embeds": pos["pooled_prompt_embeds"],
            "negative_prompt_embeds": neg["prompt_embeds"],
            "negative_pooled_prompt_embeds": neg["pooled_prompt_embeds"]}  # fmt: skip
    pipe = family.load_pipeline_class().from_pretrained(str(tiny_model("sd3")))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(**{k: v.float() for k, v in text.items()}, guidance_scale=GUIDANCE, num_inference_steps=STEPS,
                        height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(SEED),
                        skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
                        skip_layer_guidance_scale=2.8).images[0]  # fmt: skip
    assert np.array_equal(skipped, np.asarray(expected.convert("RGB"), dtype=np.int16))
    # SimpleTuner's defaults (0.01 .. 0.2 of the steps) skip no step of a 4-step render.
    assert np.array_equal(render(sd3_run, tmp_path / "default", validation_guidance_skip_layers=[1]), plain)


def test_skip_layer_guidance_options_are_checked(sd3_run, tmp_path):
    options = dataclasses.replace(sd3_run[0].validation_options, **SKIP)
    assert skip_layer_guidance(get_family("sd3"), options)["skip_guidance_layers"] == [1]
    with pytest.raises(ConfigError, match="model_family sd3 only, not flux"):
        skip_layer_guidance(get_family("flux"), options)
    assert skip_layer_guidance(get_family("flux"), sd3_run[0].validation_options) == {}
    with pytest.raises(ConfigError, match=r"validation_guidance_skip_layers \[2\] names a layer past the "
                                          r"transformer's 2"):  # fmt: skip
        render(sd3_run, tmp_path / "past", validation_guidance_skip_layers=[2])


# SimpleTuner's simpletuner/examples/sd3.peft-lora/config.json and the dataset list it names, as SimpleTuner ships them.
SD3_EXAMPLE = {
    "base_model_precision": "no_change", "checkpoint_step_interval": 50,
    "data_backend_config": "config/examples/multidatabackend-small-dreambooth-1024px.json",
    "disable_bucket_pruning": True, "flow_schedule_shift": 3, "grad_clip_method": "value",
    "gradient_checkpointing": True, "hub_model_id": "simpletuner-example-sd3-peft-lora", "learning_rate": 1e-4,
    "lora_alpha": 128, "lora_rank": 128, "lora_type": "standard", "lr_scheduler": "constant", "max_train_steps": 100,
    "mixed_precision": "bf16", "model_family": "sd3", "model_type": "lora", "num_train_epochs": 0,
    "optimizer": "adamw_bf16", "output_dir": "output/examples/sd3.peft-lora", "push_checkpoints_to_hub": False,
    "push_to_hub": False, "quantize_via": "cpu", "report_to": "none", "seed": 42,
    "tracker_project_name": "lora-training", "tracker_run_name": "example-training-run", "train_batch_size": 3,
    "use_ema": False, "vae_batch_size": 1, "validation_disable_unconditional": True, "validation_guidance": 1.0,
    "validation_guidance_rescale": 0.0, "validation_guidance_skip_layers": [7, 8, 9],
    "validation_negative_prompt": "ugly, cropped, blurry, low-quality, mediocre average",
    "validation_num_inference_steps": 30, "validation_prompt": "🟫 is holding a sign that says hello world from sd3",
    "validation_prompt_library": False, "validation_resolution": "1024x1024", "validation_seed": 42,
    "validation_steps": 50,
}  # fmt: skip
SD3_LIST = [
    {"id": "dreambooth-1024", "type": "huggingface", "dataset_name": "RareConcepts/Domokun", "crop": True,
     "crop_style": "random", "crop_aspect": "square", "minimum_image_size": 256, "maximum_image_size": 1024,
     "target_downsample_size": 1024, "resolution": 1024, "resolution_type": "pixel_area",
     "metadata_backend": "huggingface", "caption_strategy": "instanceprompt", "instance_prompt": "🟫",
     "cache_dir_vae": "cache/vae/{model_family}/dreambooth-1024"},
    {"id": "alt-embed-cache", "dataset_type": "text_embeds", "default": True, "type": "local",
     "cache_dir": "cache/text/{model_family}"},
]  # fmt: skip


def test_the_sd3_example_passes_st_check_and_other_families_exit_2(tmp_path, monkeypatch, cli):
    config = tmp_path / "simpletuner/examples/sd3.peft-lora/config.json"
    listed = tmp_path / SD3_EXAMPLE["data_backend_config"]
    for path, content in ((config, SD3_EXAMPLE), (listed, SD3_LIST)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    monkeypatch.chdir(tmp_path)
    result = cli("check", "--config", str(config.relative_to(tmp_path)))
    assert result.exit_code == 0, result.output
    assert "check: ok" in result.output
    flux = tmp_path / "flux.json"
    flux.write_text(json.dumps({**SD3_EXAMPLE, "model_family": "flux"}))
    result = cli("check", "--config", str(flux))
    assert result.exit_code == 2, result.output
    assert "validation_guidance_skip_layers" in result.output and "model_family sd3 only, not flux" in result.output
    for value in ('"[7, \\"a\\"]"', "[-1]"):
        result = cli("check", "--config", str(config), "--set", f"validation_guidance_skip_layers={value}")
        assert result.exit_code == 2, result.output
        assert "must be a JSON list of transformer layer indices" in result.output


def test_the_model_card_snippet_renders_with_the_same_skip_layers():
    from pipeline.publish.card import _skip_layers

    assert _skip_layers({"validation_guidance_skip_layers": None}) == ""
    defaults = {"validation_guidance_skip_layers": [7, 8, 9], "validation_guidance_skip_layers_start": 0.01,
                "validation_guidance_skip_layers_stop": 0.2, "validation_guidance_skip_scale": 2.8}  # fmt: skip
    assert _skip_layers(defaults) == ", skip_guidance_layers=[7, 8, 9]"  # as SimpleTuner's card writes it
    assert _skip_layers({**defaults, "validation_guidance_skip_layers_stop": 1.0}) == (
        ", skip_guidance_layers=[7, 8, 9], skip_layer_guidance_stop=1.0")
