"""Wan 2.1 image-to-video (the i2v-14b-2.1 flavours, `WanImageToVideoPipeline`): the first frame conditions the clip.

What the transformer takes (36 input channels, `WanImageToVideoPipeline.prepare_latents` and its denoising loop):
- the noisy latents (16 channels);
- a 4-channel mask: the first frame's 4 temporal slots (the VAE's temporal compression) folded into latent frame 0,
  ones there and zeros on the later latent frames;
- 16 condition channels: the Wan VAE's encoding (distribution mode, normalised per channel) of the first frame
  followed by F - 1 black (zero) frames;
- `encoder_hidden_states_image`: the CLIP vision encoder's penultimate hidden states of the first frame
  (`encode_image`), since the 2.1 i2v transformers set `image_dim`.

SimpleTuner builds the same input in training from each sample's first frame (`add_first_frame_conditioning` over
the auto-generated `i2v_first_frame` conditioning dataset, CLIP embeddings cached per sample); without conditioning
pixels it falls back to the cached clip's first latent frame (`condition_from_latents`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.families import tiny_parts, wan

PIPELINE_CLASS = "WanImageToVideoPipeline"
CONDITION_CHANNELS = 4 + 16  # mask + condition latents
# What the i2v family's `predict` reads from the denoiser's text batch beside the UMT5 embeddings (the trainer adds
# per-batch tensors there, as LTX-Video's `frame_timestep_scale`): B x 20 x f x h x w and B x tokens x dim.
CONDITION_KEY = "i2v_condition"
IMAGE_EMBEDS_KEY = "image_embeds"
TEMPORAL = 4  # the Wan 2.1 VAE's temporal compression
FIRST_FRAME_KIND = "reference_strict"
FIRST_FRAME_DATASET_SUFFIX = "_i2v_first_frame"
CLIP_SIZE = 32  # the tiny model's CLIP image size


def first_frame_mask(batch: int, latent_frames: int, height: int, width: int, temporal: int, like: Any = None) -> Any:
    """B x temporal x f x h x w: ones on latent frame 0, zeros after (the pipeline's `mask_lat_size`)."""
    import torch

    mask = torch.zeros(batch, temporal, latent_frames, height, width)
    mask[:, :, 0] = 1
    return mask if like is None else mask.to(device=like.device, dtype=like.dtype)


def normalise(vae: Any, latents: Any) -> Any:
    """The Wan VAE's per-channel normalisation as the pipeline writes it (`(z - latents_mean) * (1 / latents_std)`)."""
    import torch

    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return (latents - mean) * inverse_std


def condition_from_first_frame(vae: Any, first_frame: Any, latent_frames: int) -> Any:
    """B x 20 x f x h x w from first frames in [-1, 1] (B x 3 x H x W at the clip's size): the mask, then the VAE's
    mode of [first frame, F - 1 zero frames] normalised, as `WanImageToVideoPipeline.prepare_latents` builds it."""
    import torch

    if first_frame.ndim != 4:
        raise InputError(f"wan i2v needs first frames shaped B x 3 x H x W, got {tuple(first_frame.shape)}")
    temporal = int(vae.config.scale_factor_temporal)
    frames = (latent_frames - 1) * temporal + 1
    batch, channels, height, width = first_frame.shape
    video = torch.cat([first_frame.unsqueeze(2), first_frame.new_zeros(batch, channels, frames - 1, height, width)],
                      dim=2)  # fmt: skip
    param = next(vae.parameters())
    with torch.no_grad():
        encoded = vae.encode(video.to(param.device, param.dtype)).latent_dist.mode()
    encoded = normalise(vae, encoded.float()).to(first_frame.device)
    mask = first_frame_mask(batch, latent_frames, encoded.shape[3], encoded.shape[4], temporal, like=encoded)
    return torch.cat([mask, encoded], dim=1)


def condition_from_latents(latents: Any, temporal: int) -> Any:
    """B x 20 x f x h x w from a batch of clean cached clip latents: the mask, then the clip's first latent frame
    with zeros after (SimpleTuner's `add_first_frame_latent_conditioning`, its fallback without first-frame pixels;
    the Wan VAE is causal, so latent frame 0 encodes the first frame alone)."""
    import torch

    condition = torch.zeros_like(latents)
    condition[:, :, :1] = latents[:, :, :1]
    batch, _, frames, height, width = latents.shape
    return torch.cat([first_frame_mask(batch, frames, height, width, temporal, like=latents), condition], dim=1)


def encode_image(image_encoder: Any, image_processor: Any, images: list[Any]) -> Any:
    """`WanImageToVideoPipeline.encode_image`: the CLIP vision model's penultimate hidden states (B x tokens x dim)
    of PIL images, through the pipeline's image processor."""
    import torch

    param = next(image_encoder.parameters())
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(param.device, param.dtype)
    with torch.no_grad():
        return image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def first_frame_image(clip: Any) -> Any:
    """A clip's first frame (3 x F x H x W in [-1, 1], as `st cache` decodes it) as the RGB PIL image a user would
    give WanImageToVideoPipeline."""
    import torch
    from PIL import Image

    frame = ((clip[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(frame.permute(1, 2, 0).numpy())


def sample_extras(vae: Any, image_encoder: Any, image_processor: Any, clip: Any) -> dict[str, Any]:
    """What one i2v training sample needs beside its latents, from its clip (3 x F x H x W in [-1, 1]):
    `i2v_condition` (20 x f x h x w, `condition_from_first_frame`) and `image_embeds` (CLIP tokens x dim of its
    first frame, `encode_image`); f = 1 + (F - 1) // the VAE's temporal compression."""
    latent_frames = 1 + (clip.shape[1] - 1) // int(vae.config.scale_factor_temporal)
    condition = condition_from_first_frame(vae, clip[:, 0].unsqueeze(0).float(), latent_frames)[0]
    embeds = encode_image(image_encoder, image_processor, [first_frame_image(clip)])[0]
    return {CONDITION_KEY: condition, IMAGE_EMBEDS_KEY: embeds}


def predict(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], condition: Any,
            image_embeds: Any = None) -> Any:  # fmt: skip
    """The transformer call of `WanImageToVideoPipeline`'s loop: noisy latents and `condition` (mask + condition
    latents) concatenated on channels, timestep per sample, the zero-padded UMT5 sequence and the CLIP embeddings."""
    import torch

    if latents.ndim != 5 or condition.shape[2:] != latents.shape[2:] or condition.shape[1] != CONDITION_CHANNELS:
        raise InputError(f"wan i2v needs latents B x 16 x f x h x w and a condition B x {CONDITION_CHANNELS} x f x h "
                         f"x w, got {tuple(latents.shape)} and {tuple(condition.shape)}")  # fmt: skip
    hidden = torch.cat([latents, condition.to(latents.dtype)], dim=1)
    return transformer(
        hidden_states=hidden,
        timestep=timesteps,
        encoder_hidden_states=text["prompt_embeds"],
        encoder_hidden_states_image=None if image_embeds is None else image_embeds.to(latents.dtype),
        return_dict=False,
    )[0]


def family_predict(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
                   guidance: Any = None, *, reference: Any) -> Any:  # fmt: skip
    """`Family.predict` of the i2v family: `reference` is the batch's first-frame condition latents (B x 16 x f x h x
    w, the VAE's normalised encoding of [first frame, black frames], cached as the sample's conditioning latent); the
    mask is built here and the CLIP embeddings come with the text batch (`IMAGE_EMBEDS_KEY`)."""
    import torch

    if IMAGE_EMBEDS_KEY not in text:
        raise InputError(f"{PIPELINE_CLASS} needs the CLIP image embeddings of each sample's first frame "
                         f"({IMAGE_EMBEDS_KEY}) beside its text")  # fmt: skip
    batch, _, frames, height, width = reference.shape
    mask = first_frame_mask(batch, frames, height, width, TEMPORAL, like=reference)
    condition = torch.cat([mask, reference], dim=1)
    return predict(transformer, latents, timesteps, text, condition, text[IMAGE_EMBEDS_KEY])


def first_frame_partner(row: dict[str, Any]) -> dict[str, Any]:
    """The conditioning entry of a video sample's first frame in its cached metadata: the image of SimpleTuner's
    auto-generated `i2v_first_frame` conditioning dataset (a reference image: its pixels and condition latents)."""
    return {"dataset_id": f"{row['dataset_id']}{FIRST_FRAME_DATASET_SUFFIX}", "path": row["path"],
            "kind": FIRST_FRAME_KIND}  # fmt: skip


def load_image_encoder(source: str, revision: str | None = None) -> tuple[Any, Any]:
    """The model's CLIP vision encoder (`image_encoder/`) and image processor (`image_processor/`), frozen."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    encoder = CLIPVisionModel.from_pretrained(source, subfolder="image_encoder", revision=revision)
    processor = CLIPImageProcessor.from_pretrained(source, subfolder="image_processor", revision=revision)
    return encoder.eval().requires_grad_(False), processor


def pixels_to_images(pixels: Any) -> list[Any]:
    """B x 3 x H x W pixels in [-1, 1] (a batch's first frames) as the RGB PIL images the pipeline would be given."""
    return [first_frame_image(p.unsqueeze(1)) for p in pixels]


def tiny_image_encoder() -> tuple[Any, Any]:
    """A tiny CLIPVisionModel (2 layers, hidden 16, 32-pixel images in 8-pixel patches) and its CLIPImageProcessor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=CLIP_SIZE, patch_size=8, projection_dim=16)  # fmt: skip
    processor = CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE,
                                                                                 "width": CLIP_SIZE})  # fmt: skip
    return CLIPVisionModel(config).eval(), processor


def tiny_transformer(text_dim: int, image_dim: int) -> Any:
    """A tiny WanTransformer3DModel in the 2.1 I2V layout: 36 input channels, an image embedder and added K/V
    projections for the CLIP tokens (2 blocks of 2 heads x 12)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16 + CONDITION_CHANNELS,
        out_channels=16, text_dim=text_dim, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim, added_kv_proj_dim=24,
    ).eval()  # fmt: skip


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny Wan 2.1 I2V WanImageToVideoPipeline folder (the T2V tiny parts plus a tiny CLIP vision encoder)."""
    from diffusers import WanImageToVideoPipeline

    from pipeline.families.tokenizers import t5_tokenizer

    tokenizer = t5_tokenizer(wan.MAX_LENGTH)
    tiny_parts.seed_everything(seed)
    encoder = tiny_parts.t5_encoder(tokenizer, umt5=True)
    tiny_parts.seed_everything(seed + 3)
    image_encoder, image_processor = tiny_image_encoder()
    tiny_parts.seed_everything(seed + 1)
    transformer = tiny_transformer(encoder.config.d_model, image_encoder.config.hidden_size)
    tiny_parts.seed_everything(seed + 2)
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=encoder, vae=wan.tiny_vae(), scheduler=wan.tiny_scheduler(),
        transformer=transformer, image_encoder=image_encoder, image_processor=image_processor,
    )  # fmt: skip
    tiny_parts.save(pipe, out_dir)


# The Wan 2.1 i2v variant of the wan family (Flux Kontext's pattern; `wan` picks it for the i2v flavours and
# WanImageToVideoPipeline folders): Wan's text, VAE, LoRA targets and schedule with this pipeline, predict and tiny model.
FAMILY = dataclasses.replace(wan.FAMILY, pipeline_class=PIPELINE_CLASS, predict=family_predict, tiny=tiny,
                             takes_reference=True, variant=None)  # fmt: skip
