"""Training hooks of the model families: the denoiser forward as each pipeline calls it, LoRA targets and presets,
saving a LoRA in diffusers' layout and loading it back into the family's pipeline."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.errors import ConfigError, InputError  # noqa: E402
from pipeline.families import FAMILIES, get_family, load_components  # noqa: E402

NAMES = sorted(FAMILIES)
PROMPTS = ["a photo of a dog", "  A painting of mountains at sunset, with clouds over a quiet lake  "]
META = [
    {"original_size": [120, 100], "target_size": [96, 64], "crop_top_left": [4, 12], "intermediate_size": [110, 92]},
    {"original_size": [64, 80], "target_size": [96, 64], "crop_top_left": [0, 0], "intermediate_size": [96, 120]},
]
LATENT_SIZE = (8, 12)  # non-square, divisible by every family's patch size
TIMESTEPS = torch.tensor([700.0, 250.0])
GUIDANCE = 3.5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run these tiny models on one CPU thread: more threads only add synchronisation (and stall badly when the
    cores are shared); the previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_pipe(name: str, folder):
    pipe = get_family(name).load_pipeline_class().from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def trained(tiny_model):
    """Per family: its denoiser with a LoRA adapter after one backward pass (LoRA B then set to random values so
    the adapter changes the output), the batch it saw and the gradients of that pass."""
    from peft import LoraConfig

    done: dict[str, dict] = {}

    def train(name: str) -> dict:
        if name in done:
            return done[name]
        family = get_family(name)
        folder = tiny_model(name)
        loaded = load_components(family, folder, which=("denoiser", "text_encoders"))
        denoiser = loaded["denoiser"]
        text = family.collate_text(family.encode_prompts(loaded["text_encoders"], loaded["tokenizers"], PROMPTS))
        gen = torch.Generator().manual_seed(0)
        frames = (2,) if family.video else ()  # video families: B x C x f x h x w
        latents = torch.randn(2, family.latent_channels, *frames, *LATENT_SIZE, generator=gen)
        # alpha != r: loading must restore the scale from the saved adapter metadata
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=list(family.lora_target_modules(None)), init_lora_weights="gaussian"
        )
        family.add_lora(denoiser, config)
        out = family.denoiser_forward(denoiser, latents, TIMESTEPS, text, META, guidance=GUIDANCE)
        out.pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in denoiser.named_parameters() if p.grad is not None}
        with torch.no_grad():
            for n, p in denoiser.named_parameters():
                p.grad = None
                if "lora_B" in n:
                    p.normal_(0.0, 0.2, generator=gen)
        done[name] = {
            "family": family,
            "denoiser": denoiser.eval(),
            "text": text,
            "latents": latents,
            "out": out.detach(),
            "grads": grads,
            "config": config,
            "trainable": {n for n, p in denoiser.named_parameters() if p.requires_grad},
        }
        return done[name]

    return train


# ------------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("name", NAMES)
def test_lora_forward_shape_and_gradients(name, trained):
    run = trained(name)
    denoiser = run["denoiser"]
    assert run["out"].shape == run["latents"].shape
    assert torch.isfinite(run["out"]).all()
    assert run["trainable"] and all("lora_" in n for n in run["trainable"])
    assert set(run["grads"]) <= run["trainable"]
    # Gaussian init: B is zero, so only B gets gradients on the first step. SD3's last block drops its text
    # tokens, so the text queries of that block cannot reach the output.
    dead = set()
    if name == "sd3":
        dead = {f"transformer_blocks.{denoiser.config.num_layers - 1}.attn.add_q_proj.lora_B.default.weight"}
    for n, grad in run["grads"].items():
        if "lora_B" in n and n not in dead:
            assert grad.abs().sum() > 0, n
    assert any("lora_B" in n for n in run["grads"])


def test_sd1x_forward_is_the_pipeline_call(trained):
    run = trained("sd1x")
    unet, latents, text = run["denoiser"], run["latents"], run["text"]
    with torch.no_grad():
        ours = run["family"].denoiser_forward(unet, latents, TIMESTEPS, text, META)
        theirs = torch.stack(
            [  # as StableDiffusionPipeline's loop: one scalar timestep per call
                unet(latents[i : i + 1], t, encoder_hidden_states=text["prompt_embeds"][i : i + 1]).sample[0]
                for i, t in enumerate(TIMESTEPS)
            ]
        )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_sdxl_time_ids_follow_the_pipeline(tiny_model):
    from pipeline.families import sdxl

    pipe = load_pipe("sdxl", tiny_model("sdxl"))
    ours = sdxl.time_ids(META, torch.float32, "cpu")
    for row, item in zip(ours, META, strict=True):
        (ow, oh), (top, left), (tw, th) = item["original_size"], item["crop_top_left"], item["target_size"]
        projection = pipe.text_encoder_2.config.projection_dim
        theirs = pipe._get_add_time_ids((oh, ow), (top, left), (th, tw), torch.float32, projection)
        assert torch.equal(row, theirs[0])
    with pytest.raises(InputError, match="metadata"):
        text = {"prompt_embeds": torch.zeros(1, 77, 64), "pooled_prompt_embeds": torch.zeros(1, 32)}
        get_family("sdxl").denoiser_forward(pipe.unet, torch.zeros(1, 4, 8, 8), 10, text, None)


def test_flux_forward_is_the_pipeline_call(trained, tiny_model):
    from diffusers import FluxPipeline

    from pipeline.families import flux

    run = trained("flux")
    transformer, latents, text = run["denoiser"], run["latents"], run["text"]
    b, c, h, w = latents.shape
    packed = flux.pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, b, c, h, w))
    assert torch.equal(flux.unpack_latents(packed, h, w), latents)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    assert torch.equal(flux.image_ids(h // 2, w // 2, "cpu", torch.float32), ids)

    vae_config = json.loads((tiny_model("flux") / "vae" / "config.json").read_text())
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)  # FluxPipeline.vae_scale_factor
    with torch.no_grad():
        ours = run["family"].denoiser_forward(transformer, latents, TIMESTEPS, text, None, guidance=GUIDANCE)
        # FluxPipeline.__call__'s loop, written out for one timestep per sample
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", text["prompt_embeds"].dtype)
        text_ids = torch.zeros(text["prompt_embeds"].shape[1], 3)
        guidance = torch.full([1], GUIDANCE, dtype=torch.float32).expand(b)
        noise = transformer(
            hidden_states=FluxPipeline._pack_latents(latents, b, c, h, w),
            timestep=TIMESTEPS.to(latents.dtype) / 1000,
            guidance=guidance,
            pooled_projections=text["pooled_prompt_embeds"],
            encoder_hidden_states=text["prompt_embeds"],
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        theirs = FluxPipeline._unpack_latents(noise, h * vae_scale, w * vae_scale, vae_scale)
        # without a guidance value the model gets SimpleTuner's default flux_guidance_value, 1.0
        default = run["family"].denoiser_forward(transformer, latents, TIMESTEPS, text, None)
        one = run["family"].denoiser_forward(transformer, latents, TIMESTEPS, text, None, guidance=torch.ones(b))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(default, one, atol=0, rtol=0)
    assert not torch.allclose(default, ours)
    with pytest.raises(InputError, match="even"):
        run["family"].denoiser_forward(transformer, torch.zeros(1, 16, 7, 8), 500, text, None)


def test_wrong_latent_channels_is_an_error(trained):
    run = trained("sd1x")
    with pytest.raises(InputError, match="4"):
        run["family"].denoiser_forward(run["denoiser"], torch.zeros(2, 16, 8, 8), TIMESTEPS, run["text"], None)


# --------------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("name", NAMES)
def test_saved_lora_loads_into_the_pipeline(name, trained, tiny_model, tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    run = trained(name)
    family = run["family"]
    path = family.save_lora(tmp_path, get_peft_model_state_dict(run["denoiser"]), config=run["config"])
    assert path == tmp_path / "pytorch_lora_weights.safetensors" and path.is_file()
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        header = handle.metadata()
    assert keys and all(k.startswith(family.denoiser.subfolder + ".") for k in keys)
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert json.loads(header["lora_adapter_metadata"])[f"{family.denoiser.subfolder}.lora_alpha"] == 8

    pipe = load_pipe(name, tiny_model(name))
    denoiser = getattr(pipe, family.denoiser.subfolder)
    args = (run["latents"], TIMESTEPS, run["text"], META)
    with torch.no_grad():
        base = family.denoiser_forward(denoiser, *args, guidance=GUIDANCE)
        family.load_lora_into_pipeline(pipe, tmp_path)
        loaded = family.denoiser_forward(denoiser, *args, guidance=GUIDANCE)
        expected = family.denoiser_forward(run["denoiser"], *args, guidance=GUIDANCE)
    assert not torch.allclose(base, expected, atol=1e-3)
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)


def test_pixart_lora_without_metadata_loads_with_alpha_equal_rank(trained, tiny_model, tmp_path):
    from peft import get_peft_model_state_dict

    run = trained("pixart_sigma")
    family = run["family"]
    # No metadata: the loader takes alpha = rank (scale 1), so fold this adapter's scale of 2 into B.
    state = {k: v * 2 if "lora_B" in k else v for k, v in get_peft_model_state_dict(run["denoiser"]).items()}
    family.save_lora(tmp_path, state)
    pipe = load_pipe("pixart_sigma", tiny_model("pixart_sigma"))
    args = (run["latents"], TIMESTEPS, run["text"], None)
    with torch.no_grad():
        family.load_lora_into_pipeline(pipe, tmp_path / "pytorch_lora_weights.safetensors")
        loaded = family.denoiser_forward(pipe.transformer, *args)
        expected = family.denoiser_forward(run["denoiser"], *args)
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- targets and options


def test_flux_presets_match_modules(tiny_model):
    from peft import LoraConfig, inject_adapter_in_model

    family = get_family("flux")
    presets = dict(family.lora_presets)
    assert {"mmdit", "context", "context+ffs", "all", "all+ffs", "tiny", "nano"} <= set(presets)
    assert family.lora_target_modules(None) == family.lora_targets == presets["all"]
    assert not {"to_q", "to_k", "to_v", "to_out.0"} & set(presets["context"])
    for preset in presets:
        denoiser = load_components(family, tiny_model("flux"), which=("denoiser",))["denoiser"]
        targets = family.lora_target_modules(preset, denoiser=denoiser)  # raises if a name matches nothing
        model = inject_adapter_in_model(LoraConfig(r=2, target_modules=list(targets)), denoiser)
        wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
        for target in targets:
            assert any(n == target or n.endswith("." + target) for n in wrapped), (preset, target)
    assert family.lora_target_modules("nano") == ("single_transformer_blocks.7.proj_out",)
    with pytest.raises(ConfigError, match="choose from"):
        family.lora_target_modules("everything")


@pytest.mark.parametrize("name", NAMES)
def test_default_targets_match_the_denoiser(name, trained):
    family = get_family(name)
    # every family's default is checked against the tiny model; presets are Flux's and Chroma's only
    assert family.lora_target_modules("all+ffs", denoiser=trained(name)["denoiser"]) == (
        family.lora_targets if name not in ("flux", "chroma") else dict(family.lora_presets)["all+ffs"]
    )
    with pytest.raises(ConfigError, match="match no module"):
        family.lora_target_modules(None, denoiser=torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("name", NAMES)
def test_flow_shift_and_lora_loader(name, tiny_model):
    family = get_family(name)
    assert family.lora_loader == hasattr(family.load_pipeline_class(), "load_lora_weights")
    scheduler = load_components(family, tiny_model(name), which=("scheduler",))["scheduler"]
    if name == "sd3":
        assert family.default_flow_shift == scheduler.config.shift == 3.0
    elif name in ("flux", "qwen_image", "chroma", "flux2", "ltxvideo"):
        # Training uses SimpleTuner's static default shift 3.0; the scheduler's dynamic shifting is for inference.
        assert family.default_flow_shift == 3.0 and scheduler.config.use_dynamic_shifting
    elif name == "auraflow":
        # SimpleTuner's default 3.0 (its AuraFlow example sets flow_schedule_shift 1.73, the scheduler's shift).
        assert family.default_flow_shift == 3.0 and scheduler.config.shift == 1.73
    elif name == "lumina2":
        assert family.default_flow_shift == 3.0 and scheduler.config.shift == 6.0
    elif name in ("z_image", "hidream"):  # SimpleTuner's default; the scheduler's static shift 3 is the model's own
        assert family.default_flow_shift == 3.0 == scheduler.config.shift and not scheduler.config.use_dynamic_shifting
    elif name == "sana":
        # SimpleTuner trains Sana on FlowMatchEulerDiscreteScheduler's unshifted table (the DPM-Solver config's
        # flow_shift is for inference only).
        assert family.default_flow_shift == 1.0 and scheduler.config.flow_shift == 3.0
    elif name == "wan":  # SimpleTuner's default; the shipped UniPC scheduler samples at the same flow_shift
        assert family.default_flow_shift == 3.0 == scheduler.config.flow_shift and scheduler.config.use_flow_sigmas
    elif name == "omnigen":  # SimpleTuner's unshifted sigmoid draw; the scheduler counts time 0 -> 1 (t = 1: image)
        assert family.default_flow_shift is None and family.flow_sigmas is not None
        assert scheduler.config.invert_sigmas and scheduler.config.num_train_timesteps == 1
    elif name == "cosmos2image":  # SimpleTuner's EDM draw is unshifted; the scheduler uses Karras sigmas up to 80
        assert family.default_flow_shift == 1.0 == scheduler.config.shift and scheduler.config.use_karras_sigmas
    else:
        assert family.default_flow_shift is None
