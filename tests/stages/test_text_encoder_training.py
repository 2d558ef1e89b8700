"""train_text_encoder (SD 1.x, SDXL): st cache stores token ids, st train trains a LoRA on the CLIP encoders, and the
published files carry it in diffusers' and kohya's layouts, loadable by diffusers' own LoRA loader."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline.cache.encode import TEXT_BATCH
from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError
from tests.helpers.training import QUICK, WEIGHTS, cached_dataset, st_train_args, train

PROMPT = "a red circle on a white background"
NEGATIVE = "blurry"
# What the runs rely on, stated (SimpleTuner's defaults are batch 4, lr 4e-7, dropout 0.1, bf16).
TE_OPTIONS = {"--train_text_encoder": True, "--learning_rate": 0.05, "--lora_rank": 4, "--lora_dropout": 0,
              "--caption_dropout_probability": 0, "--mixed_precision": "no", "--cache_dtype": "fp32",
              "--validation_negative_prompt": NEGATIVE, "--validation_resolution": "64",
              "--validation_num_inference_steps": 2, "--validation_guidance": 3.0, "--seed": 7}  # fmt: skip
VALIDATE = ["validation_disable=false", "validation_step_interval=1000"]


@pytest.fixture(scope="module")
def te_cached(tmp_path_factory, tiny_model):
    """`te_cached(family)`: (root, config) of a sample dataset cached with train_text_encoder (built once)."""
    built: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in built:
            root = tmp_path_factory.mktemp(f"te-{family}")
            built[family] = (root, cached_dataset(root, family, tiny_model(family), images=4, **TE_OPTIONS))
        return built[family]

    return get


@pytest.fixture(scope="module")
def te_trained(te_cached, tmp_path_factory):
    """`te_trained(family)`: (root, config, train output) of a 2-step text-encoder LoRA run with a final validation."""
    built: dict[str, tuple[Path, Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path, Path]:
        if family not in built:
            root, config = te_cached(family)
            out = tmp_path_factory.mktemp(f"te-train-{family}")
            train(config, root / "cache", out, *VALIDATE)
            built[family] = (root, config, out)
        return built[family]

    return get


def _pipeline(family: str, model: Path):
    from pipeline.families import get_family

    pipe = get_family(family).load_pipeline_class().from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encode(pipe, prompt: str = PROMPT):
    """The pipeline's own prompt embeddings (its encode_prompt, no classifier-free guidance)."""
    import torch

    with torch.no_grad():
        if hasattr(pipe, "text_encoder_2"):
            return pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        return pipe.encode_prompt(prompt, "cpu", 1, False)


@pytest.mark.parametrize("family", ["sd1x", "sdxl"])
def test_cache_stores_token_ids_and_untrained_encoders_reproduce_the_cached_embeddings(family, te_cached, tiny_model):
    import torch

    from pipeline.cache_reader import CacheReader
    from pipeline.families import get_family
    from pipeline.train.text_encoders import TextEncoderOptions, TextEncoders

    root, config = te_cached(family)
    reader = CacheReader(root / "cache")
    assert reader.manifest["text"]["token_ids"] is True
    fam = get_family(family)
    stored = reader.prompt(PROMPT)
    empty = reader.prompt("")  # caption dropout trains on the empty caption: it has ids too
    for i in range(len(fam.text_encoders)):
        assert stored[f"token_ids_{i}"].dtype == torch.int64 and stored[f"token_ids_{i}"].shape == (77,)
        assert f"token_mask_{i}" in stored and f"token_ids_{i}" in empty
    sample = next(reader.iter_shard(reader.shards[0]))
    assert all("token_ids_0" in text for text in sample.texts)
    options = TextEncoderOptions.from_config(load_config(config).config)
    encoders = TextEncoders(fam, str(tiny_model(family)), options, "cpu")
    # st cache encodes TEXT_BATCH prompts per call (the last bits of a matmul depend on its batch): the same shape here.
    embedded = encoders.embed(fam.collate_text([stored] + [empty] * (TEXT_BATCH - 1)))
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        if key in stored:
            assert torch.equal(embedded[key][0], stored[key]) and torch.equal(embedded[key][1], empty[key]), key


def test_a_cache_without_token_ids_is_refused(cached, tmp_path):
    root, config = cached("sd1x")
    with pytest.raises(InputError, match=r"stores no token ids .* re-run `st cache` with train_text_encoder true"):
        train(config, root / "cache", tmp_path / "out", "train_text_encoder=true", "learning_rate=1e-3",
              "lora_dropout=0", "caption_dropout_probability=0", 'mixed_precision="no"')  # fmt: skip


@pytest.mark.parametrize("option, named", [('model_family="flux"', "'flux'"), ('model_family="sd3"', "'sd3'"),
                                           ('lora_type="lycoris"', "lycoris")])  # fmt: skip
def test_other_families_and_lycoris_are_refused(cached, option, named):
    _, config = cached("sd1x")
    with pytest.raises(ConfigError, match=f"train_text_encoder.*{named}"):
        load_config(config, ["train_text_encoder=true", option])


def _render(pipe, seed: int = 7):
    """The pipeline from prompt strings (its own tokenizers and text encoders), as st's validation renders."""
    import numpy as np
    import torch

    # st's validation scheduler uses inference_scheduler_timestep_spacing (default trailing, as SimpleTuner's)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing="trailing")
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=2, guidance_scale=3.0, height=64, width=64,
                 generator=torch.Generator("cpu").manual_seed(seed), output_type="pil").images[0]  # fmt: skip
    return np.asarray(image.convert("RGB")).astype(np.int16)


def _validation_image(out: Path):
    import numpy as np
    from PIL import Image

    (path,) = sorted((out / "validation" / "step-2").glob("*-64x64-0.png"))
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


ENCODER_PREFIXES = {"sd1x": ("text_encoder.",), "sdxl": ("text_encoder.", "text_encoder_2.")}


@pytest.mark.parametrize("family", ["sd1x", "sdxl"])
def test_text_encoder_lora_trains_and_diffusers_reproduces_the_validation_image(family, te_trained, tiny_model):
    """The final file holds the encoders' LoRA under diffusers' prefixes; diffusers' load_lora_weights applies it
    (the pipeline's own prompt encoding changes), and the pipeline, from prompt strings, renders st's validation
    image for the same seed (PNG values within 1 of 255)."""
    import numpy as np

    from pipeline.publish.lora import load_tensors

    _, _, out = te_trained(family)
    tensors = load_tensors(out / WEIGHTS)
    for prefix in ENCODER_PREFIXES[family]:
        ups = [v for k, v in tensors.items() if k.startswith(prefix) and ".lora_B." in k]
        # Gaussian init starts every B at 0: it trained (SDXL reads CLIP-L's penultimate layer, so its last layer's
        # LoRA gets no gradient and stays 0, as in diffusers' SDXL scripts).
        assert any(v.abs().max() > 0 for v in ups), prefix
    assert any(k.startswith("unet.") for k in tensors)
    base = _pipeline(family, tiny_model(family))
    tuned = _pipeline(family, tiny_model(family))
    tuned.load_lora_weights(str(out / "final"))
    before, after = _encode(base)[0], _encode(tuned)[0]
    assert (before - after).abs().max() > 1e-3  # the text encoders' output changed
    assert np.abs(_render(tuned) - _validation_image(out)).max() <= 1
    assert np.abs(_render(base) - _validation_image(out)).max() > 1


@pytest.mark.parametrize("family", ["sd1x", "sdxl"])
def test_comfyui_file_names_the_encoders_as_kohya_and_loads_in_diffusers(family, te_trained, tiny_model, tmp_path):
    import numpy as np

    from pipeline.publish.lora import load_tensors
    from pipeline.publish.stage import run_publish

    _, config, out = te_trained(family)
    run_publish(load_config(config, ['lora_format="comfyui"']), out, tmp_path / "pub")
    (comfy,) = (tmp_path / "pub").glob("*_comfyui.safetensors")
    tensors = load_tensors(comfy)
    kohya = {"sd1x": ("lora_te_",), "sdxl": ("lora_te1_", "lora_te2_")}[family]
    for prefix in kohya:
        assert f"{prefix}text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
        assert f"{prefix}text_model_encoder_layers_0_self_attn_out_proj.alpha" in tensors
    assert all(k.startswith(("lora_unet_", *kohya)) for k in tensors)
    assert "trained too: the weight file holds" in (tmp_path / "pub" / "README.md").read_text()
    diffusers_file = _pipeline(family, tiny_model(family))
    diffusers_file.load_lora_weights(str(tmp_path / "pub" / "pytorch_lora_weights.safetensors"))
    kohya_file = _pipeline(family, tiny_model(family))
    kohya_file.load_lora_weights(str(comfy))
    np.testing.assert_allclose(_encode(kohya_file)[0].numpy(), _encode(diffusers_file)[0].numpy(), rtol=0, atol=1e-5)
    assert np.abs(_render(kohya_file) - _render(diffusers_file)).max() <= 1


def test_resume_is_exact_and_the_encoders_stop_at_text_encoder_limit(te_cached, tmp_path):
    """1 step, then a resume to 2 in an `st` process of its own (same thread count: OMP_NUM_THREADS is inherited),
    equal an uninterrupted 2-step run (denoiser and text-encoder LoRA, bytes); with text_encoder_limit 1 the
    encoders' LoRA after step 1 is the final one while the denoiser trains on."""
    from pipeline.publish.lora import load_tensors

    root, config = te_cached("sd1x")
    sets = ["checkpoint_step_interval=1", "text_encoder_limit=1", "text_encoder_lr=0.01"]
    straight = tmp_path / "straight"
    train(config, root / "cache", straight, *sets)
    resumed = tmp_path / "resumed"
    train(config, root / "cache", resumed, *sets, "max_train_steps=1")
    args = st_train_args((root, config), resumed, *QUICK, *sets, 'resume_from_checkpoint="latest"')
    proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint-1 at step 1" in proc.stderr
    assert (straight / WEIGHTS).read_bytes() == (resumed / WEIGHTS).read_bytes()
    at_one = load_tensors(straight / "checkpoints" / "checkpoint-1" / "weights.safetensors")
    final = load_tensors(straight / WEIGHTS)
    encoder = {k.replace(".default", ""): v for k, v in at_one.items() if k.startswith("text_encoder.")}
    denoiser = {"unet." + k.replace(".default", ""): v for k, v in at_one.items() if not k.startswith("text_encoder.")}
    assert encoder and all(torch_equal(final[k], v) for k, v in encoder.items())
    assert not all(torch_equal(final[k], v) for k, v in denoiser.items())
    from pipeline.train.checkpoint import read_checkpoint

    groups = read_checkpoint(straight / "checkpoints" / "checkpoint-1")["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [0.05, 0.01]  # learning_rate, then text_encoder_lr for the encoders
    # st publish of checkpoint-1: the final file's keys and header, the checkpoint's values (encoders included).
    from pipeline.publish.lora import read_header
    from pipeline.publish.stage import run_publish

    run_publish(load_config(config), straight / "checkpoints" / "checkpoint-1", tmp_path / "pub")
    published = load_tensors(tmp_path / "pub" / WEIGHTS.name)
    assert published.keys() == final.keys()
    assert read_header(tmp_path / "pub" / WEIGHTS.name) == read_header(straight / WEIGHTS)
    assert all(torch_equal(published[k], v) for k, v in {**encoder, **denoiser}.items())


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_full_run_trains_the_encoders_into_the_published_model_folder(te_cached, tiny_model, tmp_path):
    """model_type full: the whole text encoder trains (own learning rate), train's final holds it as a diffusers
    subfolder, and the published model folder, loaded by the pipeline class, renders st's validation image."""
    import numpy as np
    import torch

    from pipeline.publish.stage import run_publish

    root, config = te_cached("sd1x")
    out = tmp_path / "train"
    train(config, root / "cache", out, *VALIDATE, 'model_type="full"', "learning_rate=1e-3", "text_encoder_lr=1e-3")
    assert (out / "final" / "text_encoder" / "config.json").is_file()
    run_publish(load_config(config), out, tmp_path / "pub")
    published = _pipeline("sd1x", tmp_path / "pub" / "model")
    base = _pipeline("sd1x", tiny_model("sd1x"))
    changed = [k for k, v in published.text_encoder.state_dict().items()
               if not torch.equal(v, base.text_encoder.state_dict()[k])]  # fmt: skip
    assert any("self_attn" in k for k in changed) and any("mlp" in k for k in changed)  # not a LoRA's modules only
    assert np.abs(_render(published) - _validation_image(out)).max() <= 1
