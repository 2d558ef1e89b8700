"""OmniGen specifics: cached token ids equal to the processor's, the denoiser call replayed against OmniGenPipeline's
own (reversed time, negated output, OmniGen's mask and positions), the processor without torchvision, SimpleTuner's
sigma draw, validation through the pipeline, a full fine-tune, and the refusals (conditioning datasets,
tokenizer_max_length)."""

from __future__ import annotations

import inspect
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.errors import ConfigError, NotSupportedError  # noqa: E402
from pipeline.families import get_family  # noqa: E402
from pipeline.families.omnigen import pil_transform, sequence_inputs  # noqa: E402
from tests.helpers.training import losses, train  # noqa: E402

FAMILY = get_family("omnigen")
PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def pipe(tiny_model):
    loaded = FAMILY.load_pipeline_class().from_pretrained(tiny_model("omnigen"))
    loaded.set_progress_bar_config(disable=True)
    return loaded


def negative_prompt() -> str:
    """The negative prompt OmniGenPipeline batches with every prompt (its processor's default)."""
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenMultiModalProcessor

    return inspect.signature(OmniGenMultiModalProcessor.__call__).parameters["negative_prompt"].default


def test_cached_ids_are_the_processors(pipe):
    items = FAMILY.encode_prompts((None,), (pipe.tokenizer,), [PROMPT, ""])
    for prompt, item in zip([PROMPT, ""], items, strict=True):
        ids = pipe.multimodal_processor.process_multi_modal_prompt(prompt, None)["input_ids"]
        assert item["input_ids"].tolist() == ids and item["input_ids"].dtype == torch.long
    text = pipe.tokenizer.decode(items[0]["input_ids"])
    assert "<|user|>" in text and "Generate an image according to the following instructions" in text
    assert text.rstrip().endswith("<|assistant|>\n<|diffusion|>") and PROMPT in text
    with pytest.raises(ConfigError, match="tokenizer_max_length does not apply to model_family omnigen"):
        FAMILY.encode_prompts((None,), (pipe.tokenizer,), [PROMPT], max_length=77)


def test_denoiser_call_replays_the_pipelines_bit_for_bit(pipe):
    """Every transformer call of a 2-step generation (prompt and negative prompt batched, t = 0 then 0.5) equals
    st's predict on the cached ids of the same two prompts; the prompt alone (left padding only as long as its
    batch needs) agrees to float rounding."""
    calls = []

    def record(module, args, kwargs, out):
        calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, out[0].clone()))

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        pipe(prompt=PROMPT, num_inference_steps=2, height=64, width=96, guidance_scale=2.5, output_type="np",
             generator=torch.Generator().manual_seed(0))  # fmt: skip
    finally:
        handle.remove()
    assert [float(kw["timestep"][0]) for kw, _ in calls] == [0.0, 0.5]  # OmniGen's time: 0 is noise
    items = FAMILY.encode_prompts((None,), (pipe.tokenizer,), [PROMPT, negative_prompt()])
    batch = FAMILY.collate_text(items)
    for kw, out in calls:
        assert torch.equal(batch["input_ids"], kw["input_ids"])
        sigmas = 1 - kw["timestep"]  # st's sigma: 1 is noise
        with torch.no_grad():
            ours = FAMILY.denoiser_forward(pipe.transformer, kw["hidden_states"], sigmas * 1000, batch)
            alone = FAMILY.denoiser_forward(pipe.transformer, kw["hidden_states"][:1], sigmas[:1] * 1000,
                                            FAMILY.collate_text(items[:1]))  # fmt: skip
        assert torch.equal(ours, -out)  # st's flow target is noise - latents; OmniGen predicts latents - noise
        torch.testing.assert_close(alone, -out[:1], atol=1e-5, rtol=0)


def test_sequence_inputs_are_simpletuners_training_collators(pipe):
    """The mask and positions `predict` builds are what SimpleTuner's OmniGenTrainingCollator (the diffusers
    collator's process_mllm_input at the latents' pixel size) gives for the same prompts."""
    items = FAMILY.encode_prompts((None,), (pipe.tokenizer,), ["a dog", PROMPT])
    batch = FAMILY.collate_text(items)
    ids = [i["input_ids"].tolist() for i in items]
    padded, positions, mask, *_ = pipe.multimodal_processor.collator.process_mllm_input(
        [{"input_ids": x, "pixel_values": None, "image_sizes": None} for x in ids], [[64, 96], [64, 96]])
    ours_mask, ours_positions = sequence_inputs(batch["attention_mask"], 4 * 6)  # 8 x 12 latents in 2x2 patches
    assert torch.equal(batch["input_ids"], padded)
    assert torch.equal(ours_positions, positions) and torch.equal(ours_mask, mask)
    assert ours_mask.shape == (2, batch["input_ids"].shape[1] + 1 + 24, batch["input_ids"].shape[1] + 1 + 24)


def test_training_sigmas_are_simpletuners_unshifted_sigmoid_draw():
    normal = torch.linspace(-3, 3, 7, dtype=torch.float64)
    assert torch.equal(FAMILY.flow_sigmas(normal), 1 - torch.sigmoid(normal))  # SimpleTuner: t = sigmoid(u)


def test_the_processor_works_without_torchvision(pipe):
    """With torchvision missing the pipeline gets st's PIL processor: crop_image, then (x / 255 - 0.5) / 0.5."""
    from diffusers.utils import is_torchvision_available

    if is_torchvision_available():
        assert type(pipe.multimodal_processor).__name__ == "OmniGenMultiModalProcessor"
    else:
        assert type(pipe.multimodal_processor).__name__ == "PilProcessor"
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8))
    pixels = pipe.multimodal_processor.process_image(image)
    expected = (torch.from_numpy(np.asarray(image)[2:34, 1:49].astype(np.float32)) / 255 - 0.5) / 0.5
    assert pixels.shape == (3, 32, 48) and torch.equal(pixels, expected.permute(2, 0, 1))
    assert torch.equal(pil_transform(image, 1024), pixels)
    # an instruction with an input image runs through the processor (the pipeline's image editing path)
    data = pipe.multimodal_processor(["<img><|image_1|></img> make it blue"], [[image]], height=64, width=64)
    assert data["input_pixel_values"][0].shape == (1, 3, 32, 48)


def test_lora_run_validates_through_the_pipeline_and_full_fine_tune_trains(cached, tmp_path):
    root, config = cached("omnigen")
    lora = tmp_path / "lora"
    train(config, root / "cache", lora, 'mixed_precision="no"', "learning_rate=1e-2", "validation_disable=false",
          "validation_steps=2", "validation_num_inference_steps=2", 'validation_resolution="64"')  # fmt: skip
    steps = losses(lora)
    assert sorted(steps) == [1, 2] and all(np.isfinite(v) for v in steps.values())
    (render,) = (lora / "validation").rglob("validation-64x64-0.png")
    pixels = np.asarray(Image.open(render))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0
    full = tmp_path / "full"
    result = train(config, root / "cache", full, 'model_type="full"', 'mixed_precision="no"', "learning_rate=1e-3")
    assert result.manifest["metrics"]["steps"] == 2
    assert losses(full)[1] == steps[1]  # same seed, same batch, same noise: the first loss is the base model's
    assert (full / "final" / "transformer").is_dir()


def test_conditioning_datasets_are_refused_naming_the_feature(paired, tmp_path):
    root, config = paired("omnigen")
    with pytest.raises(NotSupportedError, match="OmniGen's instruction / reference-image training") as error:
        train(config, root / "cache", tmp_path / "run")
    assert error.value.exit_code == 2


def test_simpletuners_example_config_checks(tmp_path, monkeypatch):
    """simpletuner/examples/omnigen.lycoris-lokr (its dataset list made local) checks as it is; its `prodigy_steps`
    (set though the optimizer is Lion) has no effect, as in SimpleTuner."""
    from pipeline.check import run_check

    example = {
        "aspect_bucket_rounding": 2, "attention_mechanism": "diffusers", "base_model_precision": "int8-quanto",
        "caption_dropout_probability": 0.1, "checkpoint_step_interval": 10, "checkpoints_total_limit": 5,
        "compress_disk_cache": False, "data_backend_config": "config/examples/multidatabackend-512px.json",
        "delete_problematic_images": True, "disable_benchmark": False, "disable_bucket_pruning": True,
        "ema_update_interval": 2, "ema_validation": "none", "flow_schedule_shift": 3, "grad_clip_method": "value",
        "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
        "hub_model_id": "simpletuner-example-omnigen-lycoris-lokr", "strict_epoch_limit": False,
        "learning_rate": 5e-5, "lora_type": "lycoris", "lr_scheduler": "cosine", "lr_warmup_steps": 400000,
        "lycoris_config": "config/examples/omnigen.lycoris-lokr/lycoris_config.json", "max_grad_norm": 0.0,
        "max_train_steps": 100, "minimum_image_size": 0, "mixed_precision": "bf16", "model_family": "omnigen",
        "model_type": "lora", "num_eval_images": 25, "num_train_epochs": 0, "optimizer": "optimi-lion",
        "output_dir": "output/examples/omnigen.lycoris-lokr", "prodigy_steps": 100000,
        "push_checkpoints_to_hub": False, "push_to_hub": False, "quantize_via": "cpu", "report_to": "none",
        "resolution": 1024, "resolution_type": "pixel_area", "resume_from_checkpoint": "latest", "seed": 42,
        "skip_file_discovery": False, "tracker_project_name": "lycoris-training",
        "tracker_run_name": "example-training-run", "train_batch_size": 1, "use_ema": False, "vae_batch_size": 1,
        "validation_guidance": 3.0, "validation_lycoris_strength": 1.0,
        "validation_negative_prompt": "ugly, cropped, blurry, low-quality, mediocre average",
        "validation_num_inference_steps": 30, "validation_prompt": "🟫 is holding a sign that says hello world",
        "validation_prompt_library": False, "validation_resolution": "1024x1024", "validation_seed": 42,
        "validation_steps": 10,
    }  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pics").mkdir()
    folder = tmp_path / "config" / "examples"
    (folder / "omnigen.lycoris-lokr").mkdir(parents=True)
    preset = {"target_module": ["Attention", "FeedForward"],
              "module_algo_map": {"FeedForward": {"factor": 4}, "Attention": {"factor": 2}}}  # fmt: skip
    lycoris = {"bypass_mode": True, "algo": "lokr", "multiplier": 1.0, "full_matrix": True, "linear_dim": 10000,
               "linear_alpha": 1, "factor": 4, "apply_preset": preset}  # fmt: skip
    (folder / "omnigen.lycoris-lokr" / "lycoris_config.json").write_text(json.dumps(lycoris))
    datasets = [{"id": "pics", "type": "local", "instance_data_dir": "pics", "resolution": 512,
                 "resolution_type": "pixel_area", "caption_strategy": "instanceprompt",
                 "instance_prompt": "🟫"}]  # fmt: skip
    (folder / "multidatabackend-512px.json").write_text(json.dumps(datasets))
    config = folder / "omnigen.lycoris-lokr" / "config.json"
    config.write_text(json.dumps(example))
    report = run_check(config, [])
    assert report.ok, report.problems


def test_text_encoder_precision_is_refused_as_there_is_no_text_encoder():
    from pipeline.quantise_modules import check_text_encoder_precisions

    with pytest.raises(ConfigError, match="text_encoder_1_precision is int8-quanto, but omnigen has 0 text encoder"):
        check_text_encoder_precisions(("int8-quanto",), FAMILY)
    check_text_encoder_precisions(("no_change",), FAMILY)
