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
pixels it falls back to the cached clip's first latent frame (`condition_from_latents`). `st cache` stores, like
SimpleTuner, each clip's CLIP embeddings (`0.image_embeds`, `cached_image_embeds`) beside its first frame and condition
latents; the CLIP encoder and processor (`CLIP_PARTS`) are in the cache's model identity, so they key the entries.

Wan 2.1 first/last-frame-to-video (FLF2V: the flf2v-14b-2.1 flavour and WanImageToVideoPipeline folders whose
transformer has `pos_embed_seq_len`) trains as `FLF2V_FAMILY`, as the pipeline renders with `last_image`: condition
latents of [first frame, F - 2 black frames, last frame], a mask set on the first and the last pixel frame, and the CLIP
tokens of both images concatenated (`pos_embed_seq_len` = 2 x tokens). `st cache` stores the clip's last frame
(`0.last_pixels`) beside its first for these runs only, and the CLIP tokens of both (2T x dim). DEVIATION:
SimpleTuner's Wan 2.1 path conditions on the first frame only and caches one image's CLIP embeddings
(`add_first_frame_conditioning`), which cannot feed an FLF2V transformer; st follows the pipeline. The Wan 2.2 A14B
FLF2V stages (`wan22.FLF2V_HIGH` / `FLF2V_LOW`) reuse this caching and condition without CLIP (`is_flf2v`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputError
from pipeline.families import tiny_parts, wan
from pipeline.families.spec import Component
from pipeline.log import get_logger

log = get_logger("families")

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
# What makes the CLIP image embeddings `st cache` stores (`0.image_embeds`): in the cache's model identity and key.
CLIP_PARTS = (Component("image_encoder", "CLIPVisionModel", "transformers"),
              Component("image_processor", "CLIPImageProcessor", "transformers"))  # fmt: skip
IMAGE_EMBEDS = "image_embeds"  # the cond member's `0.image_embeds`: tokens x dim (FLF2V: first then last frame's)
FLF2V_FLAVOUR = "flf2v-14b-2.1"  # trained as `FLF2V_FAMILY`
FLF2V_DATASET_SUFFIX = "_flf2v_frames"  # the cached partner of an FLF2V clip: its first and last frames
CONDITION_FRAMES_KEY = "wan_condition_frames"  # in an FLF2V run's train key and manifest config
LAST_IMAGE_ARGUMENT = "last_image"  # WanImageToVideoPipeline's keyword for the last frame
LAST_PIXELS = "last_pixels"  # the cond member's `0.last_pixels`: an FLF2V clip's last frame (uint8 3 x H x W)


def first_frame_mask(batch: int, latent_frames: int, height: int, width: int, temporal: int, like: Any = None) -> Any:
    """B x temporal x f x h x w: ones on latent frame 0, zeros after (the pipeline's `mask_lat_size`)."""
    import torch

    mask = torch.zeros(batch, temporal, latent_frames, height, width)
    mask[:, :, 0] = 1
    return mask if like is None else mask.to(device=like.device, dtype=like.dtype)


def first_last_frame_mask(batch: int, latent_frames: int, height: int, width: int, temporal: int,
                          like: Any = None) -> Any:  # fmt: skip
    """B x temporal x f x h x w, the pipeline's `mask_lat_size` with `last_image`: ones on latent frame 0, and on the
    last latent frame only in the slot of the clip's last pixel frame (the last of its `temporal` slots)."""
    mask = first_frame_mask(batch, latent_frames, height, width, temporal, like=like)
    mask[:, -1, -1] = 1
    return mask


def masked_condition(reference: Any, last: bool = False) -> Any:
    """B x 20 x f x h x w: the first-frame mask (`last`: the first/last-frame mask) before `reference`, a batch's
    cached condition latents (B x 16 x f x h x w), as the pipeline concatenates them for the transformer."""
    import torch

    batch, _, frames, height, width = reference.shape
    build = first_last_frame_mask if last else first_frame_mask
    return torch.cat([build(batch, frames, height, width, TEMPORAL, like=reference), reference], dim=1)


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


def condition_from_first_last_frames(vae: Any, first_frame: Any, last_frame: Any, latent_frames: int) -> Any:
    """B x 20 x f x h x w from first and last frames in [-1, 1] (B x 3 x H x W each): the FLF2V mask
    (`first_last_frame_mask`), then the VAE's mode of [first frame, F - 2 zero frames, last frame] normalised, as
    `WanImageToVideoPipeline.prepare_latents` builds it with `last_image`."""
    import torch

    if first_frame.ndim != 4 or last_frame.shape != first_frame.shape:
        raise InputError(f"wan flf2v needs first and last frames shaped B x 3 x H x W alike, got "
                         f"{tuple(first_frame.shape)} and {tuple(last_frame.shape)}")  # fmt: skip
    if latent_frames < 2:
        raise InputError("wan flf2v needs clips of at least 2 latent frames (1 + temporal compression frames): the "
                         "first and the last frame condition different latent frames")  # fmt: skip
    temporal = int(vae.config.scale_factor_temporal)
    frames = (latent_frames - 1) * temporal + 1
    batch, channels, height, width = first_frame.shape
    video = torch.cat([first_frame.unsqueeze(2), first_frame.new_zeros(batch, channels, frames - 2, height, width),
                       last_frame.to(first_frame.dtype).unsqueeze(2)], dim=2)  # fmt: skip
    param = next(vae.parameters())
    with torch.no_grad():
        encoded = vae.encode(video.to(param.device, param.dtype)).latent_dist.mode()
    encoded = normalise(vae, encoded.float()).to(first_frame.device)
    mask = first_last_frame_mask(batch, latent_frames, encoded.shape[3], encoded.shape[4], temporal, like=encoded)
    return torch.cat([mask, encoded], dim=1)


def last_frame_index(latent_frames: int, temporal: int) -> int:
    """The index of the clip frame an FLF2V condition takes as its last frame: the last of the 1 + (f - 1) x temporal
    frames encoded."""
    return (latent_frames - 1) * temporal


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


def encode_first_last(image_encoder: Any, image_processor: Any, firsts: list[Any], lasts: list[Any]) -> Any:
    """B x 2 tokens x dim: per sample, `encode_image([first, last])` of WanImageToVideoPipeline with `last_image` (the
    two images' penultimate CLIP states, first then last), the sequence an FLF2V transformer's image embedder adds its
    `pos_embed` to (`pair_tokens` gives it the pipeline's 2B x tokens x dim layout back)."""
    if len(firsts) != len(lasts):
        raise InputError(f"wan flf2v needs one last frame per first frame, got {len(firsts)} and {len(lasts)}")
    images = [image for pair in zip(firsts, lasts) for image in pair]
    embeds = encode_image(image_encoder, image_processor, images)
    return embeds.reshape(len(firsts), 2 * embeds.shape[1], embeds.shape[2])


def pair_tokens(embeds: Any) -> Any:
    """B x 2T x dim (first image's tokens, then the last's) as the 2B x T x dim the pipeline passes the transformer,
    whose image embedder folds it back (`view(-1, 2 * T, dim)`) before adding `pos_embed`."""
    batch, tokens, dim = embeds.shape
    return embeds.reshape(batch * 2, tokens // 2, dim)


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
    if IMAGE_EMBEDS_KEY not in text:
        raise InputError(f"{PIPELINE_CLASS} needs the CLIP image embeddings of each sample's first frame "
                         f"({IMAGE_EMBEDS_KEY}) beside its text")  # fmt: skip
    if getattr(getattr(transformer, "config", None), "pos_embed_seq_len", None):  # e.g. a denoiser override
        raise InputError("this transformer is Wan 2.1 first/last-frame-to-video (pos_embed_seq_len: CLIP tokens of two "
                         "images), and this run trains first-frame image-to-video: train it with model_flavour "
                         f"{FLF2V_FLAVOUR} (first and last frames cached), or use an i2v-14b-2.1 "
                         "transformer")  # fmt: skip
    return predict(transformer, latents, timesteps, text, masked_condition(reference), text[IMAGE_EMBEDS_KEY])


def flf2v_family_predict(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
                         guidance: Any = None, *, reference: Any) -> Any:  # fmt: skip
    """`Family.predict` of Wan 2.1 FLF2V: `reference` is the batch's cached condition latents of [first frame, black
    frames, last frame] (B x 16 x f x h x w); the first/last-frame mask is built here, and the CLIP tokens of both
    frames (B x 2T x dim, `encode_first_last`) come with the text batch."""
    if IMAGE_EMBEDS_KEY not in text:
        raise InputError(f"{PIPELINE_CLASS} (first/last-frame-to-video) needs the CLIP image embeddings of each "
                         f"sample's first and last frames ({IMAGE_EMBEDS_KEY}) beside its text")  # fmt: skip
    expected = getattr(getattr(transformer, "config", None), "pos_embed_seq_len", None)
    if not expected:
        raise InputError("this run trains Wan 2.1 first/last-frame-to-video, and the transformer has no "
                         "pos_embed_seq_len (an image-to-video transformer, one image's CLIP tokens): use the "
                         f"{FLF2V_FLAVOUR} model, or an i2v flavour for this one")  # fmt: skip
    embeds = text[IMAGE_EMBEDS_KEY]
    if embeds.ndim != 3 or embeds.shape[1] != expected:
        raise InputError(f"wan flf2v needs CLIP tokens of the first and last frames, {expected} per sample (the "
                         f"transformer's pos_embed_seq_len), got {tuple(embeds.shape)}")  # fmt: skip
    return predict(transformer, latents, timesteps, text, masked_condition(reference, last=True), pair_tokens(embeds))


def uses_clip(family: Any) -> bool:
    """Whether `family` is Wan 2.1 i2v or FLF2V (its transformer takes CLIP image embeddings)."""
    return family.predict in (family_predict, flf2v_family_predict)


def is_flf2v(family: Any) -> bool:
    """Whether `family` is first/last-frame-to-video (Wan 2.1 FLF2V, or a Wan 2.2 A14B FLF2V stage): its clips' last
    frames are cached and condition training, and validation renders with `last_image` (`last_frame_input`)."""
    return family.validation_extras is last_frame_input


def check_condition_frames(family: Any, batch: Any) -> None:
    """InputError when a batch's cached condition latents are not those the run's model takes: a first/last-frame
    cache (its samples carry `last_pixels`) on a first-frame run, or the reverse (the mask would not match them)."""
    cached_last = getattr(batch, "last_pixels", None) is not None
    if batch is None or cached_last == is_flf2v(family):
        return
    dataset = getattr(batch, "dataset_id", "?")
    if cached_last:
        raise InputError(f"a batch of dataset {dataset!r} was cached for first/last-frame-to-video (its condition "
                         "latents hold the last frame too), and this run trains first-frame image-to-video: re-run "
                         "`st cache` with this run's model and model_flavour")  # fmt: skip
    raise InputError(f"a first/last-frame-to-video batch (dataset {dataset!r}) has no last frame: its cache was built "
                     "for first-frame image-to-video; re-run `st cache` with this run's model and "
                     "model_flavour")  # fmt: skip


def train_key_entries(family: Any) -> dict[str, str]:
    """What train's key and manifest record of an FLF2V run (its pipeline class is i2v's, so nothing else tells
    `st publish` that the model renders with `last_image`); nothing for other runs."""
    return {CONDITION_FRAMES_KEY: "first_last"} if is_flf2v(family) else {}


def trained_flf2v(train: dict[str, Any]) -> bool:
    """Whether a train manifest's run trained Wan 2.1 FLF2V (`train_key_entries`)."""
    return train.get("config", {}).get(CONDITION_FRAMES_KEY) == "first_last"


def first_frame_partner(row: dict[str, Any]) -> dict[str, Any]:
    """The conditioning entry of a video sample's first frame in its cached metadata: the image of SimpleTuner's
    auto-generated `i2v_first_frame` conditioning dataset (a reference image: its pixels and condition latents)."""
    return {"dataset_id": f"{row['dataset_id']}{FIRST_FRAME_DATASET_SUFFIX}", "path": row["path"],
            "kind": FIRST_FRAME_KIND}  # fmt: skip


def first_last_frame_partner(row: dict[str, Any]) -> dict[str, Any]:
    """The conditioning entry of an FLF2V clip: its first frame (`0.pixels`), last frame (`0.last_pixels`) and the
    condition latents of both (`0.latent`); a dataset id of its own, so that its cache entry differs from i2v's."""
    return {"dataset_id": f"{row['dataset_id']}{FLF2V_DATASET_SUFFIX}", "path": row["path"],
            "kind": FIRST_FRAME_KIND}  # fmt: skip


def cached_frames(index: Any) -> dict[str, str | None]:
    """Per video dataset of a cache (`train.data.CacheIndex`), the frame conditioning `st cache` stored with its clips
    (read from each dataset's first sample, as every clip of a dataset is cached alike): "first" (first-frame
    image-to-video), "first_last" (first/last-frame-to-video) or None (a cache built for a text-to-video model)."""
    found: dict[str, str | None] = {}
    for (dataset_id, _), keys in sorted(index.groups.items()):
        if dataset_id in found or not keys or index.datasets.get(dataset_id, {}).get("dataset_type") != "video":
            continue
        partners = {p.get("dataset_id") for p in index.samples[keys[0]].meta.get("conditioning", [])}
        found[dataset_id] = ("first_last" if f"{dataset_id}{FLF2V_DATASET_SUFFIX}" in partners else
                             "first" if f"{dataset_id}{FIRST_FRAME_DATASET_SUFFIX}" in partners else None)  # fmt: skip
    return found


def check_cached_frames(family: Any, index: Any, *, warn: bool = True) -> None:
    """Before the first step of a Wan run, whether its cache holds the frame conditioning its model takes.

    An image-to-video run (`WanImageToVideoPipeline`: Wan 2.1 i2v / FLF2V, the Wan 2.2 A14B i2v / FLF2V stages, TI2V
    5B) on video datasets cached for a text-to-video model (no first frames) is refused (InputError, exit 2), as is a
    first-frame run on a first/last-frame cache or the reverse. A text-to-video run (WanPipeline, the AnimeGen T2V
    stages) on datasets cached for an image-to-video model trains text-to-video and logs one warning (with `warn`):
    the cached first frames are unused. SimpleTuner makes first-frame datasets only for video datasets with
    `video.is_i2v` (forced true for i2v flavours, unset false otherwise), so its text-to-video run of the same datasets
    trains text-to-video too (a dataset that sets `is_i2v: true` would hand its text-to-video transformer the
    36-channel image-to-video input, which it cannot take). Wan VACE runs are not checked here."""
    if family.name != wan.FAMILY.name or family.pipeline_class not in (PIPELINE_CLASS, wan.FAMILY.pipeline_class):
        return
    found = cached_frames(index)
    if family.pipeline_class != PIPELINE_CLASS:
        cached = sorted(d for d, kind in found.items() if kind is not None)
        if cached and warn:
            log.warning("dataset(s) %s were cached for a Wan image-to-video model (%s: each clip's first frame and "
                        "its condition latents), and this run trains %s (text-to-video), which takes no image: the "
                        "cached first frames are unused. To train image-to-video, point pretrained_model_name_or_path "
                        "(and model_flavour) at the image-to-video model; otherwise `st cache` with this model writes "
                        "a cache without them", ", ".join(cached), PIPELINE_CLASS,
                        family.pipeline_class)  # fmt: skip
        return
    want = "first_last" if is_flf2v(family) else "first"
    missing = sorted(d for d, kind in found.items() if kind is None)
    if missing:
        raise InputError(f"video dataset(s) {', '.join(missing)} of this cache have no first-frame conditioning (each "
                         f"clip's first frame{' and last frame' if want == 'first_last' else ''} and condition "
                         f"latents), which {PIPELINE_CLASS} trains on: the cache was built for a text-to-video model; "
                         "re-run `st cache` with this run's image-to-video model (pretrained_model_name_or_path and "
                         "model_flavour), then `st train` on that cache")  # fmt: skip
    other = sorted(d for d, kind in found.items() if kind != want)
    if other:
        cached_for = "first/last-frame-to-video" if want == "first" else "first-frame image-to-video"
        raise InputError(f"video dataset(s) {', '.join(other)} were cached for {cached_for}, and this run trains "
                         f"{'first/last-frame-to-video' if want == 'first_last' else 'first-frame image-to-video'}: "
                         "re-run `st cache` with this run's model and model_flavour")  # fmt: skip


def cached_conditioning(vae: Any, clip: Any, latent_frames: int, *, last: bool) -> dict[str, Any]:
    """A Wan 2.1 i2v / FLF2V clip's conditioning as `st cache` stores it, from the clip (3 x F x H x W in [-1, 1]):
    `0.pixels` (its first frame), with `last` also `0.last_pixels` (the last frame encoded, `last_frame_index`), and
    `0.latent`, the 16 condition channels the pipeline builds from them (float32; the caller casts)."""
    first = clip[:, 0].unsqueeze(0)
    if last:
        final = clip[:, last_frame_index(latent_frames, int(vae.config.scale_factor_temporal))].unsqueeze(0)
        condition = condition_from_first_last_frames(vae, first, final, latent_frames)
    else:
        condition = condition_from_first_frame(vae, first, latent_frames)
    out = {"0.pixels": _uint8(first[0]), "0.latent": condition[0, 4:]}
    if last:
        out[f"0.{LAST_PIXELS}"] = _uint8(final[0])
    return out


def cached_image_embeds(image_encoder: Any, image_processor: Any, conditioning: dict[str, Any]) -> Any:
    """The CLIP image embeddings `st cache` stores beside a clip's frames (`cached_conditioning`'s uint8 tensors):
    `encode_image` of its first frame (T x dim), or for FLF2V of its first and last frames (2T x dim,
    `encode_first_last`), from the same PIL images training would otherwise embed per batch."""
    first = pixels_to_images(conditioning["0.pixels"][None].float() / 127.5 - 1.0)
    if f"0.{LAST_PIXELS}" not in conditioning:
        return encode_image(image_encoder, image_processor, first)[0]
    last = pixels_to_images(conditioning[f"0.{LAST_PIXELS}"][None].float() / 127.5 - 1.0)
    return encode_first_last(image_encoder, image_processor, first, last)[0]


def _uint8(pixels: Any) -> Any:
    import torch

    return ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _transformer_config(source: str) -> dict[str, Any] | None:
    """The `transformer/config.json` of a model folder or of a hub id in the local cache; None when not found."""
    from pipeline.families.hub import model_json

    return model_json(source, "transformer/config.json")


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


def tiny_transformer(text_dim: int, image_dim: int, pos_embed_seq_len: int | None = None) -> Any:
    """A tiny WanTransformer3DModel in the 2.1 I2V layout: 36 input channels, an image embedder and added K/V
    projections for the CLIP tokens (2 blocks of 2 heads x 12); with `pos_embed_seq_len`, the FLF2V layout (a
    position embedding over two images' tokens, random here so that their order matters in tests)."""
    import torch
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16 + CONDITION_CHANNELS,
        out_channels=16, text_dim=text_dim, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim, added_kv_proj_dim=24,
        pos_embed_seq_len=pos_embed_seq_len,
    ).eval()  # fmt: skip
    if pos_embed_seq_len:
        with torch.no_grad():
            model.condition_embedder.image_embedder.pos_embed.normal_(std=0.5)
    return model


def tiny(out_dir: Path, seed: int, flf2v: bool = False) -> None:
    """Write a tiny Wan 2.1 I2V WanImageToVideoPipeline folder (the T2V tiny parts plus a tiny CLIP vision encoder);
    with `flf2v` a Wan 2.1 FLF2V one (its transformer's pos_embed_seq_len covers two images' CLIP tokens)."""
    from diffusers import WanImageToVideoPipeline

    from pipeline.families.tokenizers import t5_tokenizer

    tokenizer = t5_tokenizer(wan.MAX_LENGTH)
    tiny_parts.seed_everything(seed)
    encoder = tiny_parts.t5_encoder(tokenizer, umt5=True)
    tiny_parts.seed_everything(seed + 3)
    image_encoder, image_processor = tiny_image_encoder()
    tiny_parts.seed_everything(seed + 1)
    tokens = (CLIP_SIZE // image_encoder.config.patch_size) ** 2 + 1  # patches and the class token
    transformer = tiny_transformer(encoder.config.d_model, image_encoder.config.hidden_size,
                                   2 * tokens if flf2v else None)  # fmt: skip
    tiny_parts.seed_everything(seed + 2)
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=encoder, vae=wan.tiny_vae(), scheduler=wan.tiny_scheduler(),
        transformer=transformer, image_encoder=image_encoder, image_processor=image_processor,
    )  # fmt: skip
    tiny_parts.save(pipe, out_dir)


def tiny_flf2v(out_dir: Path, seed: int) -> None:
    """Write a tiny Wan 2.1 FLF2V WanImageToVideoPipeline folder (`st tiny-model wan DIR --flavour flf2v`)."""
    tiny(out_dir, seed, flf2v=True)


def flf2v_variant(flavour: str | None, source: str, pipeline: str | None) -> Any:
    """`FLF2V_FAMILY` for model_flavour flf2v-14b-2.1 and for a model whose transformer has `pos_embed_seq_len`
    (whatever flavour names it: the transformer takes two images' CLIP tokens); None for other runs. `pipeline`: the
    model's pipeline class (its model_index.json), None when unknown. A flavour / model mismatch is refused."""
    config = _transformer_config(source) or {}
    if flavour != FLF2V_FLAVOUR and not config.get("pos_embed_seq_len"):
        return None
    if pipeline not in (None, PIPELINE_CLASS):
        raise ConfigError(f"model_flavour {flavour} is Wan 2.1 first/last-frame-to-video, but the model at {source} is "
                          f"a {pipeline}: point pretrained_model_name_or_path at a {PIPELINE_CLASS} FLF2V model (e.g. "
                          "Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers)")  # fmt: skip
    if config and not config.get("pos_embed_seq_len"):
        raise ConfigError(f"model_flavour {FLF2V_FLAVOUR} needs a Wan 2.1 FLF2V transformer (pos_embed_seq_len: CLIP "
                          f"tokens of two images), and the transformer of the model at {source} has none (Wan 2.1 "
                          "image-to-video): use model_flavour i2v-14b-2.1 with it, or an FLF2V model")  # fmt: skip
    return FLF2V_FAMILY


def clip_components(family: Any, source: str, trained: Any, load_other_stage: bool, device: Any) -> dict[str, Any]:
    """`Family.validation_components`: the pipeline embeds the first (and last) frame with the model's CLIP."""
    encoder, processor = load_image_encoder(source)
    return {"image_processor": processor, "image_encoder": encoder.to(device)}


def last_frame_input(family: Any, conditioning: dict[str, Any], key: str) -> dict[str, Any]:
    """`Family.validation_extras` of FLF2V: the pipeline's `last_image`, the cached sample's last frame."""
    from PIL import Image

    last = conditioning.get(f"0.{LAST_PIXELS}")
    if last is None:
        raise InputError(f"cached sample {key} has no last frame, which {family.pipeline_class} "
                         "first/last-frame-to-video validation renders from: re-run `st cache` with "
                         f"model_flavour {FLF2V_FLAVOUR}")  # fmt: skip
    return {LAST_IMAGE_ARGUMENT: Image.fromarray(last.permute(1, 2, 0).contiguous().numpy())}


def snippet_images(train: dict[str, Any]) -> list[tuple[str, str, str]]:
    """`Family.snippet_images`: Wan 2.1 FLF2V renders between a first and a last frame (`trained_flf2v`)."""
    return [(LAST_IMAGE_ARGUMENT, "last_frame", "the frame the video ends on")] if trained_flf2v(train) else []


# The Wan 2.1 i2v variant of the wan family (Flux Kontext's pattern; `wan` picks it for the i2v flavours and
# WanImageToVideoPipeline folders): Wan's text, VAE, LoRA targets and schedule with this pipeline, predict and tiny model.
FAMILY = dataclasses.replace(wan.FAMILY, pipeline_class=PIPELINE_CLASS, predict=family_predict, tiny=tiny,
                             takes_reference=True, variant=None, image_encoder=CLIP_PARTS,
                             validation_components=clip_components, train_key_entries=train_key_entries)  # fmt: skip
# Wan 2.1 FLF2V (`wan` picks it for the flf2v-14b-2.1 flavour and FLF2V folders, `flf2v_variant`): the i2v family with
# the first/last-frame condition and two images' CLIP tokens.
FLF2V_FAMILY = dataclasses.replace(FAMILY, predict=flf2v_family_predict, tiny=tiny_flf2v,
                                   validation_extras=last_frame_input)  # fmt: skip
