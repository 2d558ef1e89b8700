"""Flux Kontext (flux flavour `kontext`): the denoiser call is FluxKontextPipeline's, bit for bit; which runs train
Kontext; a cache without reference images is refused before the model loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.errors import ConfigError, InputError, NotSupportedError
from pipeline.families import flux, flux_kontext, get_family, load_components
from pipeline.train import reference

GUIDANCE = 2.5


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model("flux")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prediction_is_the_kontext_pipelines_denoiser_call(pipe):
    """One step of FluxKontextPipeline's loop on given latents and reference latents: the transformer output it
    keeps (the target tokens) equals `denoiser_forward` with `reference=`, bit for bit."""
    family = flux_kontext.FAMILY
    gen = torch.Generator().manual_seed(0)
    latents, ref = torch.randn(2, 16, 4, 6, generator=gen), torch.randn(2, 16, 4, 6, generator=gen)
    embeds = {
        "prompt_embeds": torch.randn(2, 7, pipe.transformer.config.joint_attention_dim, generator=gen),
        "pooled_prompt_embeds": torch.randn(2, pipe.transformer.config.pooled_projection_dim, generator=gen),
    }
    kept = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, output: kept.append(output[0]))
    try:
        with torch.no_grad():
            pipe(prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"],
                 image=ref, latents=flux.pack_latents(latents), height=4 * pipe.vae_scale_factor,
                 width=6 * pipe.vae_scale_factor, max_area=24 * pipe.vae_scale_factor**2, num_inference_steps=1,
                 guidance_scale=GUIDANCE, output_type="latent")  # fmt: skip
    finally:
        hook.remove()
    (full,) = kept
    assert full.shape[1] == 2 * 6  # target and reference tokens
    timesteps = pipe.scheduler.timesteps[:1].expand(2)
    with torch.no_grad():
        ours = family.denoiser_forward(pipe.transformer, latents, timesteps, embeds, None, guidance=GUIDANCE,
                                       reference=ref)  # fmt: skip
        plain = get_family("flux").denoiser_forward(pipe.transformer, latents, timesteps, embeds, None,
                                                    guidance=GUIDANCE)  # fmt: skip
    assert torch.equal(ours, flux.unpack_latents(full[:, :6], 4, 6))
    assert not torch.allclose(ours, plain)  # the reference tokens are attended to
    ids = pipe.prepare_latents(ref, 2, 16, 32, 48, torch.float32, "cpu")[3]
    assert torch.equal(flux_kontext.reference_ids(2, 3, "cpu", torch.float32), ids)


def test_a_reference_is_required_by_kontext_and_refused_by_flux(pipe):
    latents = torch.zeros(1, 16, 4, 4)
    text = {"prompt_embeds": torch.zeros(1, 3, pipe.transformer.config.joint_attention_dim),
            "pooled_prompt_embeds": torch.zeros(1, pipe.transformer.config.pooled_projection_dim)}  # fmt: skip
    with pytest.raises(InputError, match="needs reference image latents"):
        flux_kontext.FAMILY.denoiser_forward(pipe.transformer, latents, 500, text)
    with pytest.raises(InputError, match="takes no reference image"):
        get_family("flux").denoiser_forward(pipe.transformer, latents, 500, text, reference=latents)


def test_the_kontext_flavour_or_a_kontext_folder_trains_kontext(tiny_model, tmp_path):
    family, folder = get_family("flux"), tiny_model("flux")
    assert family.flavour_hub_id("kontext") == "black-forest-labs/flux.1-kontext-dev"
    assert family.for_run(None, str(folder)) is family
    assert family.for_run("dev", str(folder)) is family
    kontext = family.for_run("kontext", str(folder))
    assert kontext.pipeline_class == "FluxKontextPipeline" and kontext.takes_reference and kontext.name == "flux"
    copy = tmp_path / "kontext-model"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    assert family.for_run(None, str(copy)) is kontext
    assert get_family("sd3").for_run("kontext", str(copy)) is get_family("sd3")
    assert load_components(kontext, copy, which=("scheduler",))["scheduler"] is not None


@pytest.mark.parametrize("kinds", [(), ("mask",)])
def test_a_cache_without_reference_images_is_refused(kinds):
    manifest = {
        "datasets": [{"id": "images", **({"conditioning_data": ["masks"]} if kinds else {})}],
        "conditioning_datasets": [{"id": "masks", "conditioning_type": kind} for kind in kinds],
    }
    with pytest.raises(ConfigError, match="conditioning_type.*reference_strict.*st prepare"):
        reference.check(flux_kontext.FAMILY, manifest)
    reference.check(get_family("flux"), manifest)  # other families need none
    linked = {
        **manifest,
        "conditioning_datasets": [{"id": "masks", "conditioning_type": "reference_loose"}],
        "datasets": [{"id": "images", "conditioning_data": ["masks"]}],
    }
    reference.check(flux_kontext.FAMILY, linked)
    with pytest.raises(NotSupportedError, match="controlnet: true with FluxKontextPipeline"):
        reference.check(flux_kontext.FAMILY, linked, controlnet=True)
    other = {**linked, "datasets": [*linked["datasets"], {"id": "more"}]}
    with pytest.raises(ConfigError, match="dataset.s. more have none"):
        reference.check(flux_kontext.FAMILY, other)
