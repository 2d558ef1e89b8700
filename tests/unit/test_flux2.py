"""FLUX.2 specifics: the [klein] denoiser call of the pipeline's loop (patchified tokens, 4-axis ids, no guidance
embedding), latents cached as the pipeline encodes them (VAE mode, BatchNorm statistics over 2x2 patches), ComfyUI's
original names, SimpleTuner's example config; [dev]: Mistral-3 prompt embeddings equal to `Flux2Pipeline`'s, its
denoiser call with the guidance embedding, the flavour and folder choosing it, SimpleTuner's training guidance."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.families import flux2, get_family, load_components
from pipeline.families.loading import patch_batch_norm, scaled_latents

FAMILY = get_family("flux2")
PROMPTS = ["a red circle", "a photo of a small dog sitting in the snow next to a tall tree"]
EXAMPLES = Path("/tmp/simpletuner-src/simpletuner/examples")


@pytest.fixture(scope="module")
def pipe(tiny_model):
    loaded = FAMILY.load_pipeline_class().from_pretrained(tiny_model("flux2"))
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def dev_model(tmp_path_factory):
    """A tiny FLUX.2 [dev] folder, written by `st tiny-model flux2 DIR --flavour dev`."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    folder = tmp_path_factory.mktemp("flux2-dev") / "model"
    result = CliRunner().invoke(app, ["tiny-model", "flux2", str(folder), "--flavour", "dev"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="module")
def dev_parts(dev_model):
    """The [dev] folder's parts as st loads them (the family chosen by the folder)."""
    family = FAMILY.for_run(None, str(dev_model))
    return family, load_components(family, str(dev_model), which=("vae", "text_encoders", "denoiser", "scheduler"))


@pytest.fixture(scope="module")
def dev_pipe(dev_model, dev_parts):
    """`Flux2Pipeline` on the [dev] folder. transformers 5 builds its PixtralProcessor only with torchvision (and
    diffusers then refuses any object passed in its place), so the pipeline loads without it and gets the tokenizer
    the processor wraps, which it calls the same way for text prompts."""
    from diffusers import Flux2Pipeline

    loaded = Flux2Pipeline.from_pretrained(str(dev_model), tokenizer=None)
    loaded.tokenizer = dev_parts[1]["tokenizers"][0]
    loaded.set_progress_bar_config(disable=True)
    return loaded


def test_predict_is_the_pipelines_denoiser_call(pipe):
    """The [klein] loop: `_pack_latents(_patchify_latents(x))` with `_prepare_latent_ids`, the text with its ids,
    t / 1000 and no guidance; the prediction unpacked by ids and unpatchified."""
    text = FAMILY.collate_text(FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS))
    embeds, text_ids = pipe.encode_prompt(PROMPTS, device="cpu")
    latents = torch.randn(2, 32, 8, 12, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([700.0, 250.0])
    patches = pipe._patchify_latents(latents)
    ids = pipe._prepare_latent_ids(patches)
    with torch.no_grad():
        ours = FAMILY.denoiser_forward(pipe.transformer, latents, timesteps, text)
        out = pipe.transformer(hidden_states=pipe._pack_latents(patches), timestep=timesteps / 1000, guidance=None,
                               encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]  # fmt: skip
    assert torch.equal(ours, pipe._unpatchify_latents(pipe._unpack_latents_with_ids(out, ids)))


def test_predict_with_a_reference_is_the_pipelines_call_with_image_latents(pipe):
    """A reference image's patch tokens follow the noisy ones with ids (10, row, column, 0) (`prepare_image_latents`);
    the prediction keeps the noisy tokens only."""
    from pipeline.families.flux2 import REFERENCE_FAMILY

    text = FAMILY.collate_text(FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS[:1]))
    embeds, text_ids = pipe.encode_prompt(PROMPTS[:1], device="cpu")
    generator = torch.Generator().manual_seed(3)
    latents, reference = torch.randn(1, 32, 8, 12, generator=generator), torch.randn(1, 32, 4, 6, generator=generator)
    patches = pipe._patchify_latents(latents)
    ids = pipe._prepare_latent_ids(patches)
    ref_patches = pipe._patchify_latents(reference)
    ref_ids = pipe._prepare_image_ids([ref_patches])
    with torch.no_grad():
        ours = REFERENCE_FAMILY.denoiser_forward(pipe.transformer, latents, torch.tensor([400.0]), text,
                                                 reference=reference)  # fmt: skip
        out = pipe.transformer(hidden_states=torch.cat([pipe._pack_latents(patches), pipe._pack_latents(ref_patches)], 1),
                               timestep=torch.tensor([0.4]), guidance=None, encoder_hidden_states=embeds,
                               txt_ids=text_ids, img_ids=torch.cat([ids, ref_ids], 1), return_dict=False)[0]  # fmt: skip
    expected = pipe._unpatchify_latents(pipe._unpack_latents_with_ids(out[:, : ids.shape[1]], ids))
    assert torch.equal(ours, expected)
    with pytest.raises(Exception, match="needs reference image latents"):
        REFERENCE_FAMILY.denoiser_forward(pipe.transformer, latents, torch.tensor([400.0]), text)


def test_cached_latents_are_the_pipelines_image_latents(pipe):
    """st caches the pipeline's `_encode_vae_image` (mode, patchified, BatchNorm-normalised) laid out as 32 x h x w."""
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert patch_batch_norm(pipe.vae) is not None
    with torch.no_grad():
        ours = scaled_latents(pipe.vae, pipe.vae.encode(pixels).latent_dist.mode())
        theirs = pipe._encode_vae_image(pixels, generator=None)
    assert ours.shape == (2, 32, 4, 6)
    torch.testing.assert_close(pipe._patchify_latents(ours), theirs, atol=1e-6, rtol=0)


def test_comfyui_names_are_the_original_checkpoint_names(pipe):
    """Inverted diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`: q/k/v fused into `qkv`, the fused
    single-block projection is `linear1`; diffusers' own reader of those names gives the LoRA back exactly."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers

    from pipeline.publish import comfyui, keymaps
    from pipeline.publish.lora import LoraModule

    weights = pipe.transformer.state_dict()
    names = [n for n, _ in pipe.transformer.named_modules() if n.endswith(FAMILY.lora_targets)]
    generator = torch.Generator().manual_seed(2)
    mods = [LoraModule(n, torch.randn(2, weights[f"{n}.weight"].shape[1], generator=generator),
                       torch.randn(weights[f"{n}.weight"].shape[0], 2, generator=generator), 2.0, 1.0) for n in names]  # fmt: skip
    out = comfyui.convert("flux2", mods, dict(pipe.transformer.config))
    modules = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in out if k.endswith("lora_A.weight")}
    assert modules == {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "single_blocks.0.linear1",
                       "single_blocks.1.linear1"}  # fmt: skip
    back = _convert_non_diffusers_flux2_lora_to_diffusers({k: v for k, v in out.items() if not k.endswith(".alpha")})
    for mod in mods:  # ComfyUI scales each native module by its alpha / rank
        native = keymaps.native_target("flux2", mod.name).module
        scale = out[f"diffusion_model.{native}.alpha"] / out[f"diffusion_model.{native}.lora_A.weight"].shape[0]
        delta = back[f"transformer.{mod.name}.lora_B.weight"] @ back[f"transformer.{mod.name}.lora_A.weight"]
        torch.testing.assert_close(delta * scale, mod.up @ mod.down * mod.scale)


def test_dev_is_a_flavour_and_klein_is_the_default():
    assert FAMILY.flavour_hub_id("dev") == "black-forest-labs/FLUX.2-dev"
    assert FAMILY.flavour_hub_id(None) == "black-forest-labs/FLUX.2-klein-base-9B"


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="SimpleTuner's examples are not extracted here")
@pytest.mark.parametrize("sets", [[], ['model_flavour="dev"']], ids=["klein-9b", "dev"])
def test_simpletuners_example_config_checks_but_for_sdnq(tmp_path, monkeypatch, sets):
    """SimpleTuner's flux2.peft-lora example, unchanged (its default flavour klein-9b; none of SimpleTuner's FLUX.2
    examples names dev, so also with model_flavour dev): every problem `st check` finds is its SDNQ quantisation,
    which the option reference st implements does not have."""
    from pipeline.check import run_check

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pics").mkdir()
    folder = tmp_path / "config" / "examples"
    shutil.copytree(EXAMPLES / "flux2.peft-lora", folder / "flux2.peft-lora")
    datasets = [{"id": "dreambooth-512", "type": "local", "instance_data_dir": "pics", "resolution": 512,
                 "resolution_type": "pixel_area", "caption_strategy": "instanceprompt", "instance_prompt": "🟫"}]  # fmt: skip
    (folder / "multidatabackend-small-dreambooth-512px.json").write_text(json.dumps(datasets))
    report = run_check(folder / "flux2.peft-lora" / "config.json", sets)
    assert report.problems and all("sdnq" in problem for problem in report.problems), report.problems


def test_a_flux2_single_file_is_told_apart_from_flux(tmp_path):
    """FLUX.2's original checkpoints keep Flux's block names; their shared modulation tells them apart."""
    from safetensors.torch import save_file

    from pipeline.errors import InputError, NotSupportedError
    from pipeline.families import check_model_family, load_components

    path = tmp_path / "flux2.safetensors"
    save_file({"double_stream_modulation_img.lin.weight": torch.zeros(2, 2),
               "double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(path))  # fmt: skip
    check_model_family(FAMILY, str(path))
    with pytest.raises(InputError, match='looks like flux2 .* set model_family = "flux2"'):
        check_model_family(get_family("flux"), str(path))
    with pytest.raises(NotSupportedError, match="flux2 cannot be loaded from a single-file checkpoint"):
        load_components(FAMILY, str(path), which=("vae",))


def test_dev_prompt_embeddings_are_flux2pipelines(dev_parts, dev_pipe):
    """st's cached [dev] embeddings are `Flux2Pipeline.encode_prompt`'s, bit for bit: FLUX.2's system turn, the prompt
    as a user turn without `[IMG]`, one `<s>`, padded to 512 tokens, Mistral hidden states 10, 20, 30 side by side."""
    family, parts = dev_parts
    prompts = [*PROMPTS, "an [IMG] owl"]
    ours = family.collate_text(family.encode_prompts(parts["text_encoders"], parts["tokenizers"], prompts))
    theirs, _ = dev_pipe.encode_prompt(prompts, device="cpu")
    assert ours["prompt_embeds"].shape == (3, 512, 48)
    assert torch.equal(ours["prompt_embeds"], theirs)
    tokenizer = parts["tokenizers"][0]
    ids, mask = flux2.processor_tokens(tokenizer, prompts, 512, "cpu")
    words = tokenizer.decode(ids[2][mask[2].bool()])
    assert words.startswith("<s>[SYSTEM_PROMPT]You are an AI that reasons about image descriptions.")
    assert words.endswith("[/SYSTEM_PROMPT][INST]an  owl[/INST]") and words.count("<s>") == 1
    with pytest.raises(Exception, match="at least 30 layers"):
        small = dict(parts["text_encoders"][0].config.text_config.to_dict(), num_hidden_layers=20)
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        config = Mistral3Config(text_config=small, vision_config=parts["text_encoders"][0].config.vision_config)
        family.encode_prompts([Mistral3ForConditionalGeneration(config)], parts["tokenizers"], PROMPTS[:1])


def test_dev_predict_is_the_pipelines_denoiser_call_with_its_guidance(dev_parts, dev_pipe):
    """The [dev] loop's call: as [klein]'s, plus the guidance embedding's value (the pipeline's guidance_scale)."""
    family, parts = dev_parts
    text = family.collate_text(family.encode_prompts(parts["text_encoders"], parts["tokenizers"], PROMPTS))
    embeds, text_ids = dev_pipe.encode_prompt(PROMPTS, device="cpu")
    latents = torch.randn(2, 32, 8, 12, generator=torch.Generator().manual_seed(4))
    timesteps = torch.tensor([900.0, 300.0])
    patches = dev_pipe._patchify_latents(latents)
    ids = dev_pipe._prepare_latent_ids(patches)
    with torch.no_grad():
        ours = family.denoiser_forward(parts["denoiser"], latents, timesteps, text, guidance=4.0)
        trained = family.denoiser_forward(parts["denoiser"], latents, timesteps, text)
        out, one = (dev_pipe.transformer(hidden_states=dev_pipe._pack_latents(patches), timestep=timesteps / 1000,
                                         guidance=torch.full([2], g, dtype=torch.float32), encoder_hidden_states=embeds,
                                         txt_ids=text_ids, img_ids=ids, return_dict=False)[0] for g in (4.0, 1.0))  # fmt: skip
    assert torch.equal(ours, dev_pipe._unpatchify_latents(dev_pipe._unpack_latents_with_ids(out, ids)))
    assert torch.equal(trained, dev_pipe._unpatchify_latents(dev_pipe._unpack_latents_with_ids(one, ids)))
    assert not torch.equal(ours, trained)  # the guidance embedding is live


def test_dev_is_chosen_by_flavour_or_folder_and_a_mismatch_is_refused(dev_model, tiny_model):
    """model_flavour dev or a Flux2Pipeline folder trains [dev]; a flavour of the other pipeline than the folder's
    stops with the fix; `st check`'s family detection takes the [dev] folder as flux2."""
    from pipeline.families import check_model_family

    dev = flux2.DEV_FAMILY
    assert FAMILY.for_run("dev", "black-forest-labs/FLUX.2-dev") is dev
    assert FAMILY.for_run(None, str(dev_model)) is dev and FAMILY.for_run("dev", str(dev_model)) is dev
    assert FAMILY.for_run(None, str(tiny_model("flux2"))) is FAMILY
    assert dev.pipeline_class == "Flux2Pipeline" and dev.lora_targets == FAMILY.lora_targets
    with pytest.raises(ConfigError, match=r"model_flavour klein-9b is FLUX.2 \[klein\], but .* Flux2Pipeline"):
        FAMILY.for_run("klein-9b", str(dev_model))
    with pytest.raises(ConfigError, match=r"model_flavour dev is FLUX.2 \[dev\], but .* Flux2KleinPipeline"):
        FAMILY.for_run("dev", str(tiny_model("flux2")))
    check_model_family(FAMILY, str(dev_model))


def test_dev_trains_with_simpletuners_guidance_only():
    """SimpleTuner trains FLUX.2 with guidance 1.0 whatever flux_guidance_* say: st refuses other values for [dev]
    (whose transformer embeds the guidance) instead of training another model; [klein] has no guidance embedding."""
    from types import SimpleNamespace

    def config(mode="constant", value=1.0):
        return SimpleNamespace(flux_guidance_mode=mode, flux_guidance_value=value)

    flux2.check_training_guidance(config(), flux2.DEV_FAMILY)
    flux2.check_training_guidance(config(value=3.5), FAMILY)
    for bad in (config(value=3.5), config(mode="random-range")):
        with pytest.raises(ConfigError, match="FLUX.2 \\[dev\\] trains with guidance 1.0"):
            flux2.check_training_guidance(bad, flux2.DEV_REFERENCE_FAMILY)


def test_dev_paired_datasets_train_dev_with_its_reference_input(dev_parts, dev_pipe):
    """A cache pairing samples with conditioning images trains [dev] (not [klein]) with the reference tokens after
    the noisy ones, as Flux2Pipeline's `image=` feeds them, guidance included."""
    from pipeline.train.reference import for_pairs

    manifest = {"conditioning_datasets": [{"id": "edges", "conditioning_type": "controlnet"}],
                "datasets": [{"id": "shapes", "conditioning_data": ["edges"]}]}  # fmt: skip
    family, parts = dev_parts
    assert for_pairs(family, manifest, controlnet=False) is flux2.DEV_REFERENCE_FAMILY
    assert for_pairs(FAMILY, manifest, controlnet=False) is flux2.REFERENCE_FAMILY
    text = family.collate_text(family.encode_prompts(parts["text_encoders"], parts["tokenizers"], PROMPTS[:1]))
    embeds, text_ids = dev_pipe.encode_prompt(PROMPTS[:1], device="cpu")
    generator = torch.Generator().manual_seed(5)
    latents, reference = torch.randn(1, 32, 8, 12, generator=generator), torch.randn(1, 32, 4, 6, generator=generator)
    patches, ref_patches = dev_pipe._patchify_latents(latents), dev_pipe._patchify_latents(reference)
    ids, ref_ids = dev_pipe._prepare_latent_ids(patches), dev_pipe._prepare_image_ids([ref_patches])
    with torch.no_grad():
        ours = flux2.DEV_REFERENCE_FAMILY.denoiser_forward(parts["denoiser"], latents, torch.tensor([600.0]), text,
                                                           guidance=2.5, reference=reference)  # fmt: skip
        out = dev_pipe.transformer(
            hidden_states=torch.cat([dev_pipe._pack_latents(patches), dev_pipe._pack_latents(ref_patches)], 1),
            timestep=torch.tensor([0.6]), guidance=torch.tensor([2.5]), encoder_hidden_states=embeds,
            txt_ids=text_ids, img_ids=torch.cat([ids, ref_ids], 1), return_dict=False)[0]  # fmt: skip
    expected = dev_pipe._unpatchify_latents(dev_pipe._unpack_latents_with_ids(out[:, : ids.shape[1]], ids))
    assert torch.equal(ours, expected)
