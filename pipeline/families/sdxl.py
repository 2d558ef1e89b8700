"""Stable Diffusion XL: UNet with text-time conditioning, CLIP ViT-L + OpenCLIP bigG (with projection).

Prompt embeddings are the penultimate hidden states of both encoders concatenated on the feature axis; the pooled
embedding is the projected output of the second encoder. Both sequences keep all 77 positions: the UNet attends to
padded positions unmasked.
"""

from __future__ import annotations

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


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny SDXL diffusers folder (Euler scheduler, scaling factor 0.13025, text_time conditioning)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = clip_tokenizer(pad_token=EOS, max_length=CLIP_LENGTH)
    tokenizer_2 = clip_tokenizer(pad_token="!", max_length=CLIP_LENGTH)
    tiny_parts.seed_everything(seed)
    text_encoder = tiny_parts.clip_text(tokenizer)
    tiny_parts.seed_everything(seed + 1)
    text_encoder_2 = tiny_parts.clip_text(tokenizer_2, projection=True, hidden_act="gelu")
    tiny_parts.seed_everything(seed + 2)
    time_dim = 8
    denoiser = sd1x.unet(
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim,
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
    Flavour("refiner-1.0", "stabilityai/stable-diffusion-xl-refiner-1.0", needs="SDXL refiner training"),
    Flavour("base-0.9", "stabilityai/stable-diffusion-xl-base-0.9"),
    Flavour("refiner-0.9", "stabilityai/stable-diffusion-xl-refiner-0.9", needs="SDXL refiner training"),
)

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
)
