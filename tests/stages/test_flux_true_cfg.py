"""Flux validation with true classifier-free guidance (`validation_guidance_real`, `validation_no_cfg_until_timestep`):
the image st renders from its cached prompt and negative prompt is FluxPipeline's with `true_cfg_scale`, and with
CFG skipped on the first steps it is SimpleTuner's Flux pipeline loop, replayed here step by step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.families import flux, get_family
from pipeline.prompts import ValidationPrompt
from pipeline.train.family_options import FamilyText
from pipeline.train.validation import Validator, real_cfg
from tests.helpers.trainers import build_trainer

TEXT, NEGATIVE = "a red circle on a white background", ""  # the sample config's validation_negative_prompt
STEPS, GUIDANCE, SIZE, SEED = 3, 3.5, 64, 5


@pytest.fixture(scope="module")
def flux_run(cached, tmp_path_factory):
    """A Flux trainer (LoRA at zero: the base model) and its cached prompt and negative-prompt embeddings."""
    from pipeline.cache_reader import CacheReader

    root, config = cached("flux")
    trainer = build_trainer((root, config), tmp_path_factory.mktemp("out"), f"validation_num_inference_steps={STEPS}",
                            f'validation_resolution="{SIZE}"', f"validation_guidance={GUIDANCE}",
                            f"validation_seed={SEED}", 'mixed_precision="no"')  # fmt: skip
    reader = CacheReader(root / "cache")
    return trainer, {t: reader.prompt(t) for t in (TEXT, NEGATIVE)}


def render(flux_run, out, family_text=None, **options) -> np.ndarray:
    trainer, embeds = flux_run
    validator = Validator(trainer.family, dataclasses.replace(trainer.validation_options, **options),
                          source=trainer.source, vae_source=None, denoiser=trainer.unwrapped,
                          prompts=[ValidationPrompt("p", TEXT)], embeds=embeds, out_dir=out, device="cpu",
                          family_text=family_text)  # fmt: skip
    with Image.open(validator.render(0, "step")[0]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    pipe = get_family("flux").load_pipeline_class().from_pretrained(str(tiny_model("flux")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(flux_run) -> dict[str, torch.Tensor]:
    family, embeds = get_family("flux"), flux_run[1]
    pos, neg = family.collate_text([embeds[TEXT]]), family.collate_text([embeds[NEGATIVE]])
    text = {"prompt_embeds": pos["prompt_embeds"], "pooled_prompt_embeds": pos["pooled_prompt_embeds"],
            "negative_prompt_embeds": neg["prompt_embeds"],
            "negative_pooled_prompt_embeds": neg["pooled_prompt_embeds"]}  # fmt: skip
    return {k: v.float() for k, v in text.items()}  # the cache's bf16, in the VAE's dtype as validation hands them


def simpletuner_loop(pipe, text: dict[str, torch.Tensor], scale: float, until: int, masks=None) -> np.ndarray:
    """SimpleTuner's Flux pipeline (models/flux/pipeline.py): true CFG on step i only when i >= until; `masks`:
    the prompt's and the negative prompt's T5 masks (flux_attention_masked_training), each on its own call."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    generator = torch.Generator().manual_seed(SEED)
    latents, image_ids = pipe.prepare_latents(1, 16, SIZE, SIZE, torch.float32, "cpu", generator)
    config = pipe.scheduler.config
    mu = calculate_shift(latents.shape[1], config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)  # fmt: skip
    timesteps, _ = retrieve_timesteps(pipe.scheduler, STEPS, "cpu", sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    pipe.scheduler.set_begin_index(0)
    guidance = torch.full([1], GUIDANCE, dtype=torch.float32)
    text_ids = torch.zeros(text["prompt_embeds"].shape[1], 3)

    def call(t, prefix: str):
        mask = None if masks is None else masks[bool(prefix)]
        joint = None if mask is None else {"attention_mask": flux.joint_attention_mask(mask, latents.shape[1],
                                                                                       latents.dtype)}  # fmt: skip
        return pipe.transformer(hidden_states=latents, timestep=t.expand(1).to(latents.dtype) / 1000,
                                guidance=guidance, pooled_projections=text[prefix + "pooled_prompt_embeds"],
                                encoder_hidden_states=text[prefix + "prompt_embeds"], txt_ids=text_ids,
                                img_ids=image_ids, joint_attention_kwargs=joint, return_dict=False)[0]  # fmt: skip

    with torch.no_grad():
        for i, t in enumerate(timesteps):
            noise = call(t, "")
            if scale > 1.0 and i >= until:
                uncond = call(t, "negative_")
                noise = uncond + scale * (noise - uncond)
            latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
        latents = pipe._unpack_latents(latents, SIZE, SIZE, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.image_processor.postprocess(pipe.vae.decode(latents, return_dict=False)[0], output_type="pil")[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_true_cfg_renders_flux_pipelines_image_with_the_cached_negative(flux_run, pipe, tmp_path):
    plain = render(flux_run, tmp_path / "plain")
    guided = render(flux_run, tmp_path / "cfg", validation_guidance_real=4.0, validation_no_cfg_until_timestep=0)
    assert np.abs(guided - plain).max() > 8  # true CFG changes the image
    with torch.no_grad():
        expected = pipe(**embeddings(flux_run), true_cfg_scale=4.0, guidance_scale=GUIDANCE, num_inference_steps=STEPS,
                        height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(SEED)).images[0]  # fmt: skip
    assert np.array_equal(guided, np.asarray(expected.convert("RGB"), dtype=np.int16))
    assert np.array_equal(guided, simpletuner_loop(pipe, embeddings(flux_run), 4.0, 0))


def test_cfg_is_skipped_on_the_first_steps_as_simpletuner(flux_run, pipe, tmp_path):
    skipped = render(flux_run, tmp_path / "skip", validation_guidance_real=4.0)  # SimpleTuner's default: 2 steps
    assert np.array_equal(skipped, simpletuner_loop(pipe, embeddings(flux_run), 4.0, 2))
    assert not np.array_equal(skipped, simpletuner_loop(pipe, embeddings(flux_run), 4.0, 0))
    never = render(flux_run, tmp_path / "never", validation_guidance_real=4.0, validation_no_cfg_until_timestep=STEPS)
    assert np.array_equal(never, render(flux_run, tmp_path / "plain"))


def test_masked_true_cfg_gives_the_negative_its_own_mask(flux_run, pipe, tmp_path):
    """libreflux: attention-masked training with true CFG; the unconditional call is masked with the negative's mask."""
    trainer, embeds = flux_run
    masked = dataclasses.replace(trainer.family_text, attention_mask=True)
    both = render(flux_run, tmp_path / "masked", masked, validation_guidance_real=4.0)
    masks = [embeds[t]["attention_mask"][None] for t in (TEXT, NEGATIVE)]
    assert not torch.equal(*masks)
    assert np.array_equal(both, simpletuner_loop(pipe, embeddings(flux_run), 4.0, 2, masks))
    assert not np.array_equal(both, simpletuner_loop(pipe, embeddings(flux_run), 4.0, 2, [masks[0], masks[0]]))


def test_the_true_cfg_flavours_validate_as_simpletuner_forces(flux_run):
    options = dataclasses.replace(flux_run[0].validation_options, model_flavour="libreflux")
    forced, scale = real_cfg(get_family("flux"), options)
    assert (scale, forced.validation_num_inference_steps) == (6.0, 28)
    _, scale = real_cfg(get_family("flux"), dataclasses.replace(options, validation_guidance_real=3.0))
    assert scale == 3.0
    assert real_cfg(get_family("flux"), flux_run[0].validation_options)[1] is None  # 1.0: off


def test_true_cfg_is_refused_for_other_families(flux_run):
    for option in ({"validation_guidance_real": 4.0}, {"validation_no_cfg_until_timestep": 0}):
        options = dataclasses.replace(flux_run[0].validation_options, **option)
        with pytest.raises(ConfigError, match="validation_guidance_real .* model_family flux only, not sd3"):
            real_cfg(get_family("sd3"), options)


@pytest.mark.parametrize(("flavour", "sets", "refused"), [
    ("libreflux", {}, "set flux_attention_masked_training=true"),
    ("libreflux", {"flux_attention_masked_training": True}, None),
    ("fluxbooru", {}, "set flux_guidance_value=3.5"),
    ("fluxbooru", {"flux_guidance_value": 3.5, "flux_attention_masked_training": True}, "masking"),
    ("fluxbooru", {"flux_guidance_value": 3.5}, None),
])  # fmt: skip
def test_the_true_cfg_flavours_train_as_simpletuner_or_are_refused(flux_run, flavour, sets, refused):
    config = dataclasses.replace(flux_run[0].config, model_flavour=flavour, **sets)
    if refused is None:
        FamilyText.for_run(config, get_family("flux"))
    else:
        with pytest.raises(ConfigError, match=f"model_flavour {flavour} .*{refused}"):
            FamilyText.for_run(config, get_family("flux"))
