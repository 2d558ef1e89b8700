"""Stable Diffusion XL: UNet with text-time conditioning, CLIP ViT-L + OpenCLIP bigG (with projection).

Prompt embeddings are the penultimate hidden states of both encoders concatenated on the feature axis; the pooled
embedding is the projected output of the second encoder. Both sequences keep all 77 positions: the UNet attends to
padded positions unmasked.

The refiner (`REFINER`, flavours refiner-1.0 / refiner-0.9, or a folder whose `model_index.json` says
`requires_aesthetics_score`) is a variant: OpenCLIP bigG alone (`text_encoder_2`), time ids (original size, crop,
aesthetic score) instead of the target size, and StableDiffusionXLImg2ImgPipeline.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.families import sd1x, text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import EOS, clip_tokenizer

CLIP_LENGTH = 77

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "CLIPTextModel", "transformers"),
        tokenizer=Component("tokenizer", "CLIPTokenizer", "transformers"),
        max_length=CLIP_LENGTH,
        kind="clip",
    ),
    TextEncoderSpec(
        model=Component("text_encoder_2", "CLIPTextModelWithProjection", "transformers"),
        tokenizer=Component("tokenizer_2", "CLIPTokenizer", "transformers"),
        max_length=CLIP_LENGTH,
        kind="clip",
    ),
)


def embed_tokens(text_encoders: Any, tokens: dict[str, Any]) -> dict[str, Any]:
    """`prompt_embeds` (penultimate hidden states of both encoders, concatenated) and `pooled_prompt_embeds` (the
    projected output of the encoder with projection) from `sd1x.tokenize_clip`'s token ids, as
    `StableDiffusionXLPipeline.encode_prompt` without clip_skip. Gradients flow (text-encoder training calls it)."""
    import torch

    hidden, pooled = [], None
    for i, encoder in enumerate(text_encoders):
        out = encoder(tokens[f"token_ids_{i}"], output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("SDXL needs a text encoder with projection (CLIPTextModelWithProjection) for pooled embeds")
    return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}


def encode_prompts(
    text_encoders: Any,
    tokenizers: Any,
    prompts: list[str],
    *,
    max_length: int | None = None,
    t5_padding: str = "unmodified",
    device: Any = "cpu",
) -> list[dict[str, Any]]:
    """`prompt_embeds` (77 x (dim1 + dim2)) and `pooled_prompt_embeds` (projection dim) of each prompt
    (`embed_tokens` of `sd1x.tokenize_clip`). `t5_padding` does not apply."""
    import torch

    text.check_t5_padding(t5_padding)
    if len(tuple(text_encoders)) != len(tuple(tokenizers)):
        raise ValueError("SDXL needs as many tokenizers as text encoders")
    tokens = sd1x.tokenize_clip(tokenizers, prompts, max_length=max_length, device=device,
                                limits=sd1x.position_limits(text_encoders))  # fmt: skip
    with torch.no_grad():
        return text.split(embed_tokens(text_encoders, tokens))


def time_ids(meta: Any, dtype: Any, device: Any) -> Any:
    """Per-sample `add_time_ids` as `StableDiffusionXLPipeline._get_add_time_ids` orders them: original size
    (h, w), crop top-left (top, left), target size (h, w). The cached metadata stores sizes as [W, H]."""
    import torch

    rows = []
    for item in meta:
        (orig_w, orig_h), (top, left), (target_w, target_h) = (
            item["original_size"],
            item["crop_top_left"],
            item["target_size"],
        )
        rows.append([orig_h, orig_w, top, left, target_h, target_w])
    return torch.tensor(rows, dtype=dtype, device=device)


def predict(
    unet: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`StableDiffusionXLPipeline`'s denoiser call: prompt embeds plus `added_cond_kwargs` with the pooled embeds
    and the micro-conditioning time ids built from each sample's `meta`."""
    if meta is None:
        raise InputError("SDXL needs each sample's metadata (original_size, crop_top_left, target_size)")
    embeds = text["prompt_embeds"]
    added = {"text_embeds": text["pooled_prompt_embeds"], "time_ids": time_ids(meta, embeds.dtype, latents.device)}
    return unet(latents, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]


# SimpleTuner's `data_aesthetic_score` default: the aesthetic score a refiner is trained with.
DEFAULT_AESTHETIC_SCORE = 7.0
REFINER_PIPELINE = "StableDiffusionXLImg2ImgPipeline"


def refiner_time_ids(meta: Any, scores: Any, dtype: Any, device: Any) -> Any:
    """Per-sample `add_time_ids` of a refiner, as `StableDiffusionXLImg2ImgPipeline._get_add_time_ids` orders them
    with `requires_aesthetics_score`: original size (h, w), crop top-left (top, left), aesthetic score."""
    import torch

    rows = [[item["original_size"][1], item["original_size"][0], *item["crop_top_left"]] for item in meta]
    ids = torch.tensor(rows, dtype=dtype, device=device)
    return torch.cat([ids, torch.as_tensor(scores, dtype=dtype, device=device).reshape(-1, 1).expand(len(rows), 1)], 1)


def refiner_predict(
    unet: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`StableDiffusionXLImg2ImgPipeline`'s denoiser call for a refiner: as `predict`, with the aesthetic score in
    place of the target size. `text["aesthetic_score"]` (one per sample; `FamilyText` adds `data_aesthetic_score`)
    defaults to SimpleTuner's 7.0."""
    if meta is None:
        raise InputError("the SDXL refiner needs each sample's metadata (original_size, crop_top_left)")
    embeds = text["prompt_embeds"]
    scores = text.get("aesthetic_score", DEFAULT_AESTHETIC_SCORE)
    added = {"text_embeds": text["pooled_prompt_embeds"],
             "time_ids": refiner_time_ids(meta, scores, embeds.dtype, latents.device)}  # fmt: skip
    return unet(latents, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]


def tiny(out_dir: Path, seed: int, refiner: bool = False) -> None:
    """Write a tiny SDXL diffusers folder (Euler scheduler, scaling factor 0.13025, text_time conditioning); with
    `refiner`, a refiner's (text_encoder_2 only, 5 time ids with the aesthetic score, StableDiffusionXLImg2ImgPipeline
    with `requires_aesthetics_score`)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    tokenizer = clip_tokenizer(pad_token=EOS, max_length=CLIP_LENGTH)
    tokenizer_2 = clip_tokenizer(pad_token="!", max_length=CLIP_LENGTH)
    tiny_parts.seed_everything(seed)
    text_encoder = tiny_parts.clip_text(tokenizer)
    tiny_parts.seed_everything(seed + 1)
    text_encoder_2 = tiny_parts.clip_text(tokenizer_2, projection=True, hidden_act="gelu")
    tiny_parts.seed_everything(seed + 2)
    time_dim = 8
    cross_attention_dim = text_encoder_2.config.hidden_size + (0 if refiner else text_encoder.config.hidden_size)
    denoiser = sd1x.unet(
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=(5 if refiner else 6) * time_dim + text_encoder_2.config.projection_dim,
    )
    tiny_parts.seed_everything(seed + 3)
    vae = tiny_parts.vae(4, 0.13025)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
            unet=denoiser, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )  # as stabilityai/stable-diffusion-xl-refiner-1.0's model_index.json
        tiny_parts.save(pipe, out_dir, clip_tokenizers=("tokenizer_2",))
        return
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=denoiser,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    tiny_parts.save(pipe, out_dir, clip_tokenizers=("tokenizer", "tokenizer_2"))


# SimpleTuner's SDXL flavours (models/sdxl/model.py HUGGINGFACE_PATHS); its default is "base-1.0".
FLAVOURS = (
    Flavour("base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
    Flavour("refiner-1.0", "stabilityai/stable-diffusion-xl-refiner-1.0"),  # trains as REFINER (see `_variant`)
    Flavour("base-0.9", "stabilityai/stable-diffusion-xl-base-0.9"),
    Flavour("refiner-0.9", "stabilityai/stable-diffusion-xl-refiner-0.9"),
)


def is_refiner(flavour: str | None, source: str) -> bool:
    """Whether a run of `model_flavour` `flavour` on the model at `source` trains a refiner: a refiner-* flavour, or
    a diffusers folder (local, or in the hub cache) whose `model_index.json` sets `requires_aesthetics_score`."""
    if flavour is not None and flavour.startswith("refiner-"):
        return True
    from pipeline.families.hub import model_index_of

    index = model_index_of(source)
    return index is not None and bool(index.get("requires_aesthetics_score"))


def _variant(flavour: str | None, source: str) -> Family:
    return REFINER if is_refiner(flavour, source) else FAMILY


FAMILY = Family(
    name="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    denoiser=Component("unet", "UNet2DConditionModel", "diffusers"),
    vae=Component("vae", "AutoencoderKL", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "EulerDiscreteScheduler", "diffusers"),
    latent_channels=4,
    bucket_alignment=64,
    prediction_type="epsilon",
    lora_targets=sd1x.UNET_LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=predict,
    flavours=FLAVOURS,
    default_flavour="base-1.0",
    control_input="pixels",
    variant=_variant,
)

REFINER: Family = dataclasses.replace(FAMILY, pipeline_class=REFINER_PIPELINE, text_encoders=TEXT_ENCODERS[1:],
                                      predict=refiner_predict, tiny=functools.partial(tiny, refiner=True),
                                      variant=None)  # fmt: skip
