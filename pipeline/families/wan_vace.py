"""Wan 2.1 VACE (the vace-1.3b-2.1 / vace-14b-2.1 flavours, `WanVACEPipeline`): a Wan 2.1 text-to-video transformer
with a control branch (`WanVACETransformer3DModel`): `vace_patch_embedding` and `vace_blocks`, whose outputs are added
(times `conditioning_scale`) to the hidden states after the base blocks listed in `vace_layers`.

What the transformer takes beside the 16-channel noisy latents and the UMT5 sequence: `control_hidden_states`, the
pipeline's conditioning latents (`vace_in_channels` = 2 x 16 + spatial factor^2: the VAE's normalised mode of the
control video outside the mask ("inactive") and inside it ("reactive"), then the mask folded from pixels into latent
cells, `prepare_video_latents` / `prepare_masks`).

st trains VACE in two modes of `WanVACEPipeline`. Control-video training: a video dataset names a conditioning dataset
of clips in `conditioning_data` (`conditioning_type` controlnet: the pipeline's `video`; optionally a second one of
type mask: its `mask`); `st prepare` pairs each clip with the file of the same relative path and refuses a clip whose
frame count or frame size differs from its video's, naming both files (`prepare.pairing.check_clip_partner`);
`st cache` reads each conditioning clip through its video's frame window, resize and crop and stores its uint8 pixels
and the control latents the pipeline computes for it (`cached_control`: the pipeline's own `preprocess_conditions`,
`prepare_video_latents` and `prepare_masks` on the clip's frames; every part - the VAE modes of the inactive and
reactive halves and the folded mask - is a deterministic function of the clips' pixels, so the whole tensor is cached
per clip, content-addressed like the clip's latents, and training never loads the VAE for it); training passes them as
`control_hidden_states`, and validation renders the pipeline with the first cached control (and mask) clip, saved as
MP4 beside each render. A mask clip is the pipeline's input only, not a loss mask. Without conditioning clips (the
user's plain text-to-video call): a black control video under an all-ones mask, which depends on the clip's frame
count and size only; training computes it per latent shape with the pipeline's own helpers (`zero_control`) and the
model's VAE (loaded on first use, kept on the CPU between shapes). The LoRA targets (Wan's `to_q` / `to_k` / `to_v` /
`to_out.0`) match the attention of the VACE blocks as well as the base blocks'; the published LoRA loads into
`WanVACEPipeline`.

Reference images (the pipeline's `reference_images`): a video dataset may also link one conditioning dataset of
images of conditioning_type reference_strict / reference_loose (paired by relative path or stem like any partner, a
reference of any size: `st cache` reads it at its own size). The pipeline letterboxes it onto a white canvas of the
clip's frame size, encodes it as one latent frame and prepends it to the control latents (the reactive half and the
mask zero there), and denoises one more latent frame, whose output it drops. `st cache` stores those control latents
(`control_latents(reference=...)`, with the control clip or alone on the zero control) on the clip's first non-mask
partner, and the letterbox as the reference's pixels; `predict` prepends the reference frame to the noisy latents
(`with_references`) and returns the video frames' prediction only, so the loss covers the video frames; validation
passes the first cached clip's reference as `reference_images`. Not implemented (refused by `check_cache`):
conditioning images on image datasets, more than one control, mask or reference per video, a mask clip without a
control clip, segmentation clips.

DEVIATION: SimpleTuner cannot train VACE with control inputs at all (it drops the VACE branch, below), so control-video
training has no SimpleTuner counterpart: the pairing (same relative path; a clip whose frame count or size differs
from its video's stops `st prepare`; a conditioning entry's `video` block is not read, its clips follow their video's
window) and the cached pipeline control latents are st's own.

DEVIATION: SimpleTuner loads the VACE repositories' transformer with `WanTransformer3DModel` (its MODEL_CLASS), which
drops `vace_patch_embedding` and every `vace_blocks` weight (unexpected keys; the `vace_layers` / `vace_in_channels`
config keys are ignored), trains the remaining base blocks as Wan 2.1 text-to-video and validates with `WanPipeline`:
its VACE LoRA never touches the control branch and is checked without it. st keeps the whole VACE transformer, trains
and validates it as `WanVACEPipeline` runs it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputError, NotSupportedError
from pipeline.families import tiny_parts, wan
from pipeline.families.spec import Component
from pipeline.log import get_logger

log = get_logger("families")

PIPELINE_CLASS = "WanVACEPipeline"
FLAVOURS = ("vace-1.3b-2.1", "vace-14b-2.1")
CONTROL_KIND, MASK_KIND = "controlnet", "mask"  # the conditioning_type of a control clip and of a mask clip
# The conditioning_types of a clip's reference image (WanVACEPipeline's `reference_images`).
REFERENCE_KINDS = ("reference_strict", "reference_loose")
# WanVACEPipeline's keywords for the control clip and its mask clip (lists of PIL frames) and its reference images.
VIDEO_ARGUMENT, MASK_ARGUMENT, REFERENCE_ARGUMENT = "video", "mask", "reference_images"
CONTROL_KEY = "vace_control"  # the denoiser text batch's control latents (B x vace_in_channels x f x h x w)
TINY_VACE_LAYERS = (0, 1)
# The Wan 2.1 VACE transformers' patch size (1.3B and 14B): what `transformer_patch_size` falls back to when the
# model's transformer/config.json cannot be read. The pipeline's condition helpers read the transformer's
# `patch_size` (`preprocess_conditions` resizes a control clip to multiples of the VAE's spatial factor x patch,
# `prepare_masks` folds the mask at that grid), so `st cache` reads it from the model's config (`cached_control`).
PATCH_SIZE = (1, 2, 2)


def transformer_patch_size(source: str, revision: str | None = None) -> tuple[int, ...]:
    """The `patch_size` of the VACE transformer of the model at `source` (its transformer/config.json: a model folder,
    a hub id in the local cache, else the file alone from the hub), what `WanVACEPipeline` reads as
    `self.transformer.config.patch_size`; `PATCH_SIZE` with a warning when no config can be read."""
    from pipeline.families.hub import hub_errors, model_json

    config = model_json(source, "transformer/config.json")
    if config is None and not Path(str(source)).expanduser().exists():
        import json

        from huggingface_hub import hf_hub_download

        try:
            config = json.loads(Path(hf_hub_download(str(source), "transformer/config.json",
                                                     revision=revision)).read_text(encoding="utf-8"))
        except (*hub_errors(), ValueError) as exc:  # no network, no such repository or file, not JSON: the default
            log.debug("wan vace: transformer/config.json of %s not fetched: %s", source, exc)
    found = config.get("patch_size") if isinstance(config, dict) else None
    if not isinstance(found, (list, tuple)) or len(found) != 3:
        log.warning("wan vace: no transformer patch_size found for %s; building control latents for the Wan 2.1 VACE "
                    "transformers' %s", source, PATCH_SIZE)  # fmt: skip
        return PATCH_SIZE
    return tuple(int(n) for n in found)


def check_frame_size(vae: Any, patch_size: Any, height: int, width: int) -> None:
    """InputError unless height and width are multiples of the VAE's spatial factor x the transformer's spatial patch:
    `WanVACEPipeline` resizes a control clip of another size to that grid (its latents would no longer match the
    clip's) and cannot fold its mask (`prepare_masks`), and the transformer's patches would not tile the latents."""
    spatial = 2 ** len(vae.temperal_downsample)
    grid = (spatial * int(patch_size[1]), spatial * int(patch_size[2]))
    if height % grid[0] or width % grid[1]:
        raise InputError(f"{PIPELINE_CLASS} needs frames whose height and width are multiples of {grid[0]} x "
                         f"{grid[1]} (the VAE's spatial factor {spatial} x the transformer's patch_size "
                         f"{tuple(patch_size)}), got {height} x {width}: set aspect_bucket_alignment (and the "
                         f"resolution) to a multiple of {max(grid)}, re-run `st prepare` and `st cache`")  # fmt: skip


def _pipeline_helper(vae: Any, patch_size: Any, device: Any) -> Any:
    """What `WanVACEPipeline`'s condition helpers read of the pipeline (its VAE, video processor, scale factors and the
    transformer's patch size), without building the pipeline."""
    from types import SimpleNamespace

    import torch
    from diffusers.video_processor import VideoProcessor

    spatial = 2 ** len(vae.temperal_downsample)
    return SimpleNamespace(
        vae=vae, transformer=SimpleNamespace(config=SimpleNamespace(patch_size=tuple(patch_size))),
        transformer_2=None, vae_scale_factor_temporal=2 ** sum(vae.temperal_downsample),
        vae_scale_factor_spatial=spatial, video_processor=VideoProcessor(vae_scale_factor=spatial),
        _execution_device=torch.device(device),
    )  # fmt: skip


def control_latents(vae: Any, patch_size: Any, frames: int, height: int, width: int, video: list[Any] | None = None,
                    mask: list[Any] | None = None, device: Any = "cpu", reference: list[Any] | None = None) -> Any:
    """1 x (2 x z_dim + spatial^2) x (r + f) x h x w: the conditioning latents `WanVACEPipeline.__call__` builds for a
    `frames` x `height` x `width` video (pixels) given `video` (the control clip: a list of PIL frames at that size),
    `mask` (its mask clip, PIL frames; None: all ones) and `reference` (its `reference_images`, r PIL images; at most
    one, `check_references`), computed by the pipeline's own `preprocess_conditions`, `prepare_video_latents` and
    `prepare_masks` (called on the VAE and the transformer's patch size, what they read of the pipeline) in float32 on
    `device`. No `video`: the zero control (a black clip under an all-ones mask). A reference is letterboxed onto a
    white canvas of the video's size, encoded as one latent frame and prepended (its VAE mode, then zeros for the
    reactive half, and zeros in the mask channels). Deterministic: the VAE's mode, as the pipeline takes it."""
    import torch
    from diffusers import WanVACEPipeline

    check_references(reference or [])
    check_frame_size(vae, patch_size, height, width)
    helper = _pipeline_helper(vae, patch_size, device)
    with torch.no_grad():
        video, mask, references = WanVACEPipeline.preprocess_conditions(helper, video, mask, list(reference or []) or
                                                                        None, 1, height, width, frames, torch.float32,
                                                                        device)  # fmt: skip
        latents = WanVACEPipeline.prepare_video_latents(helper, video, mask, references, None, device)
        masks = WanVACEPipeline.prepare_masks(helper, mask, references, None)
    return torch.cat([latents, masks.to(latents.dtype)], dim=1)


def check_references(references: list[Any], where: str = "") -> None:
    """At most one reference image per clip: NotSupportedError otherwise (st caches and trains one)."""
    if len(references) > 1:
        raise NotSupportedError(f"{where or 'a clip'} has {len(references)} reference images, but st trains "
                                f"{PIPELINE_CLASS} with at most one `reference_images` entry per clip; link one "
                                "conditioning dataset of conditioning_type reference_strict or reference_loose")


def reference_frames(control: Any, latents: Any) -> int:
    """How many reference frames `control` (B x C x (r + f) x h x w) prepends to latents B x 16 x f x h x w."""
    return int(control.shape[2]) - int(latents.shape[2])


def with_references(latents: Any, control: Any, timesteps: Any, noise: Any = None) -> Any:
    """The transformer's input for latents whose control prepends r reference frames: WanVACEPipeline denoises
    r + f latent frames (`prepare_latents` with num_frames + r x temporal factor) from noise at the same timestep
    and drops the first r of the output. Training puts at those r positions the reference's own latents (the
    control's first z_dim channels there: the pipeline's normalised VAE mode of the reference) noised like the
    video's at the batch's sigma (timestep / 1000, the flow-matching interpolation x_t = (1 - s) x0 + s noise), so a
    step sees what a sampling step sees; `predict` drops their prediction, so the loss covers the video frames only.
    DEVIATION: the pipeline never gives those frames a target; the reference latents as their clean value are st's
    choice (the trajectory the pipeline's output discards)."""
    import torch

    frames = reference_frames(control, latents)
    clean = control[:, : latents.shape[1], :frames].to(latents.dtype)
    noise = torch.randn_like(clean) if noise is None else noise
    sigma = (timesteps.to(torch.float32) / 1000.0).view(-1, 1, 1, 1, 1)
    noisy = ((1.0 - sigma) * clean.float() + sigma * noise.float()).to(latents.dtype)
    return torch.cat([noisy, latents], dim=2)


def zero_control(vae: Any, patch_size: Any, frames: int, height: int, width: int, device: Any = "cpu") -> Any:
    """`control_latents` without `video`, `mask` or `reference_images` (a user's plain text-to-video call)."""
    return control_latents(vae, patch_size, frames, height, width, device=device)


def frames_of(pixels: Any) -> list[Any]:
    """A cached clip (uint8 3 x F x H x W) as the list of PIL frames the pipeline takes as `video` / `mask`."""
    from PIL import Image

    return [Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy()) for frame in pixels.unbind(1)]


def cached_control(vae: Any, partners: list[dict[str, Any]], clips: list[Any], device: Any = "cpu",
                   shape: tuple[int, int, int] | None = None,
                   patch_size: Any = PATCH_SIZE) -> dict[str, Any]:  # fmt: skip
    """What `st cache` stores of a clip's conditioning (`partners`: the prepare row's, in conditioning_data order: at
    most one control clip, at most one mask clip, at most one reference image, see `check_cache`; `clips`: each
    control / mask clip 3 x F x H x W in [-1, 1], the clip's frame window fitted like its frames, a reference image
    3 x H x W in [-1, 1] at its own size; `shape`: the clip's (frames, height, width), needed without a control
    clip): `{i}.pixels` (uint8) for each (a reference: the white-canvas letterbox the pipeline makes of it at the
    clip's size), and `{c}.latent` for the first non-mask partner c: `control_latents` of the control clip as `video`
    (none: the zero control), the mask clip as `mask` and the reference image (as decoded, at its own size) as
    `reference_images` - the VAE's encodings of the pipeline's inactive / reactive split, the reference frame
    prepended and the folded mask, 2 x z_dim + spatial^2 channels, a function of the pixels alone, so cached once
    per clip - on the CPU in float32. `patch_size`: the VACE transformer's (`transformer_patch_size`), as the pipeline
    reads it of its transformer."""
    import torch
    from PIL import Image

    pixels = [((clip + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8) for clip in clips]
    kinds = [p["kind"] for p in partners]
    control = kinds.index(CONTROL_KIND) if CONTROL_KIND in kinds else None
    mask = kinds.index(MASK_KIND) if MASK_KIND in kinds else None
    references = [i for i, kind in enumerate(kinds) if kind in REFERENCE_KINDS]
    check_references(references)
    if control is not None:
        _, frames, height, width = pixels[control].shape
    elif references and shape is not None:
        frames, height, width = shape
    else:
        raise InputError(f"a clip's conditioning ({', '.join(kinds)}) needs a control clip or a reference image "
                         "(with the clip's shape)")  # fmt: skip
    reference = [Image.fromarray(pixels[i].permute(1, 2, 0).contiguous().numpy()) for i in references]
    latents = control_latents(vae, patch_size, frames, height, width,
                              video=None if control is None else frames_of(pixels[control]),
                              mask=None if mask is None else frames_of(pixels[mask]), device=device,
                              reference=reference)  # fmt: skip
    stored = {f"{i}.pixels": p for i, p in enumerate(pixels)}
    for i, image in zip(references, reference, strict=True):  # what the pipeline conditions on: the letterbox
        stored[f"{i}.pixels"] = letterbox(vae, image, height, width, patch_size)
    first = next(i for i, kind in enumerate(kinds) if kind != MASK_KIND)
    return {**stored, f"{first}.latent": latents[0].float().cpu()}


def letterbox(vae: Any, image: Any, height: int, width: int, patch_size: Any = PATCH_SIZE) -> Any:
    """uint8 3 x height x width: a `reference_images` image as WanVACEPipeline's `preprocess_conditions` places it
    for a height x width video (scaled to fit, bilinear, centred on white), rounded to 8 bits."""
    import torch
    from diffusers import WanVACEPipeline

    helper = _pipeline_helper(vae, patch_size, "cpu")
    _, _, placed = WanVACEPipeline.preprocess_conditions(helper, None, None, [image], 1, height, width, 1,
                                                         torch.float32, "cpu")  # fmt: skip
    return ((placed[0][0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def check_cache(family: Any, rows: list[dict[str, Any]]) -> None:
    """Refuse, before a cache run loads a model, conditioning the run cannot use: conditioning clips (a video
    dataset's conditioning_data) for a family other than Wan VACE; for Wan VACE conditioning images on image
    datasets, and clip conditioning other than one control clip (conditioning_type controlnet, the pipeline's
    `video`) with at most one mask clip (conditioning_type mask, its `mask`), and/or one reference image
    (reference_strict / reference_loose, its `reference_images`)."""
    vace = getattr(family, "pipeline_class", None) == PIPELINE_CLASS
    clips = sorted({r["dataset_id"] for r in rows if r.get("conditioning") and r.get("window_frames") is not None})
    images = sorted({r["dataset_id"] for r in rows if r.get("conditioning") and r.get("window_frames") is None})
    if clips and not vace:
        raise NotSupportedError(f"video dataset(s) {', '.join(clips)} link conditioning clips (conditioning_data), "
                                f"which only Wan VACE ({', '.join(FLAVOURS)}, {PIPELINE_CLASS}) trains with; "
                                f"{getattr(family, 'pipeline_class', family)} does not: remove their "
                                "conditioning_data")  # fmt: skip
    if not vace:
        return
    if images:
        raise NotSupportedError(f"dataset(s) {', '.join(images)} link conditioning images to image datasets, and st "
                                f"trains {PIPELINE_CLASS} on conditioning clips of video datasets only; remove their "
                                "conditioning_data")  # fmt: skip
    for row in rows:
        linked = row.get("conditioning") or []
        kinds = [c["kind"] for c in linked]
        references = [kind for kind in kinds if kind in REFERENCE_KINDS]
        check_references(references, f"sample {row.get('path', '?')} of dataset '{row['dataset_id']}'")
        controls, masks = kinds.count(CONTROL_KIND), kinds.count(MASK_KIND)
        if linked and (controls > 1 or masks > controls or controls + len(references) == 0 or
                       len(kinds) != controls + masks + len(references)):  # fmt: skip
            found = ", ".join(f"{c['dataset_id']} ({c['kind']})" for c in linked)
            raise NotSupportedError(f"dataset '{row['dataset_id']}' links {found}, but {PIPELINE_CLASS} takes one "
                                    f"control clip (`video`) and at most one mask clip (`mask`), and/or one "
                                    f"reference image (`reference_images`): link one conditioning dataset of "
                                    f"conditioning_type {CONTROL_KIND} and at most one of conditioning_type "
                                    f"{MASK_KIND}, and/or one of {' / '.join(REFERENCE_KINDS)} (images)")  # fmt: skip


def pixel_shape(vae: Any, latents_shape: Any) -> tuple[int, int, int]:
    """(frames, height, width) of the video whose latents are `latents_shape` (... x f x h x w) for this VAE."""
    _, _, frames, height, width = latents_shape
    temporal, spatial = 2 ** sum(vae.temperal_downsample), 2 ** len(vae.temperal_downsample)
    return (frames - 1) * temporal + 1, height * spatial, width * spatial


class ZeroControl:
    """The control latents of a VACE run's batches: those `st cache` stored for a batch's conditioning clips, else
    the zero-control conditioning (`zero_control`), one per latent shape, from the model's VAE (loaded on first use,
    in float32 as the conditioning is built; on `device` while computing)."""

    def __init__(self, family: Any, source: str, vae_source: str | None, patch_size: Any, device: Any,
                 revision: str | None = None) -> None:  # fmt: skip
        self.family, self.source, self.vae_source, self.revision = family, source, vae_source, revision
        self.patch_size, self.device = tuple(patch_size), device
        self._vae: Any = None
        self._by_shape: dict[tuple[int, ...], Any] = {}

    @classmethod
    def for_run(cls, family: Any, source: str, vae_source: str | None, denoiser: Any, device: Any,
                config: Any = None) -> ZeroControl | None:  # fmt: skip
        """The run's provider for a VACE family (None for other families); ConfigError for a `tread_config` (the VACE
        hints are added to every token of the base blocks they follow, which a route shortens)."""
        if family.predict is not predict:
            return None
        if getattr(config, "tread_config", None):
            raise ConfigError("tread_config with a Wan VACE model is not supported: the VACE blocks' hints are added "
                              "to every video token of the blocks they follow, which a route shortens; remove "
                              "tread_config")  # fmt: skip
        return cls(family, source, vae_source, getattr(getattr(denoiser, "config", None), "patch_size", PATCH_SIZE),
                   device, getattr(config, "revision", None))  # fmt: skip

    def conditioning(self, latents: Any) -> Any:
        """B x C x f x h x w control latents for a batch of latents (B x 16 x f x h x w), in the latents' dtype."""
        import torch

        key = tuple(int(n) for n in latents.shape[2:])
        if key not in self._by_shape:
            if self._vae is None:
                from pipeline.families.loading import load_components

                self._vae = load_components(self.family, self.source, vae_source=self.vae_source, which=("vae",),
                                            revision=self.revision,
                                            dtype=torch.float32)["vae"].eval().requires_grad_(False)  # fmt: skip
            vae = self._vae.to(self.device)
            log.info("wan vace: the zero-control conditioning of %d x %d x %d latents (WanVACEPipeline without "
                     "video / mask / reference_images)", *key)  # fmt: skip
            try:
                self._by_shape[key] = zero_control(vae, self.patch_size, *pixel_shape(vae, latents.shape),
                                                   device=self.device)  # fmt: skip
            finally:
                self._vae = vae.to("cpu")
        control = self._by_shape[key]
        return control.to(latents.device, latents.dtype).expand(latents.shape[0], *control.shape[1:])

    def text_inputs(self, latents: Any, batch: Any = None) -> dict[str, Any]:
        """What the VACE family's `predict` reads from the denoiser's text batch: the control latents `st cache`
        stored for the batch's conditioning clips (`Batch.control_latents`), else the zero control."""
        control = getattr(batch, "control_latents", None)
        if control is None:
            return {CONTROL_KEY: self.conditioning(latents)}
        if control.shape[0] != latents.shape[0] or control.shape[3:] != latents.shape[3:] or \
                reference_frames(control, latents) not in (0, 1):  # fmt: skip
            raise InputError(f"the cached control latents of batch {batch.index} (dataset '{batch.dataset_id}') "
                             f"are {tuple(control.shape)} for latents {tuple(latents.shape)}; re-run `st cache`")
        return {CONTROL_KEY: control.to(latents.device, latents.dtype)}


def predict(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
            guidance: Any = None) -> Any:  # fmt: skip
    """`WanVACEPipeline`'s transformer call: the 5-D latents, the timestep per sample, the zero-padded UMT5 sequence
    and the control latents (`CONTROL_KEY`, from `ZeroControl`) at `conditioning_scale` 1 on every VACE layer."""
    control = text.get(CONTROL_KEY)
    if control is None:
        raise InputError(f"{PIPELINE_CLASS} needs the control latents of each batch ({CONTROL_KEY}) beside its text")
    if latents.ndim != 5 or control.shape[0] != latents.shape[0] or control.shape[3:] != latents.shape[3:] or \
            reference_frames(control, latents) not in (0, 1):  # fmt: skip
        raise InputError(f"wan vace needs latents B x 16 x f x h x w and control latents B x C x f x h x w alike "
                         f"(or f + 1 frames with a reference image), got {tuple(latents.shape)} and "
                         f"{tuple(control.shape)}")  # fmt: skip
    references = reference_frames(control, latents)
    hidden = with_references(latents, control, timesteps) if references else latents
    return transformer(
        hidden_states=hidden,
        timestep=timesteps,
        encoder_hidden_states=text["prompt_embeds"],
        control_hidden_states=control.to(latents.dtype),
        return_dict=False,
    )[0][:, :, references:]


def tiny_transformer(text_dim: int, vae_spatial: int) -> Any:
    """A tiny WanVACETransformer3DModel: the 2.1 T2V tiny layout (2 blocks of 2 heads x 12) with a VACE block after
    each, `vace_in_channels` 2 x 16 + the VAE's spatial factor squared (the pipeline's folded mask)."""
    from diffusers import WanVACETransformer3DModel

    return WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=text_dim, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=list(TINY_VACE_LAYERS),
        vace_in_channels=2 * 16 + vae_spatial**2,
    ).eval()  # fmt: skip


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny Wan 2.1 VACE WanVACEPipeline folder (`st tiny-model wan DIR --flavour vace`): the T2V tiny parts
    with a VACE transformer."""
    from diffusers import WanVACEPipeline

    from pipeline.families.tokenizers import t5_tokenizer

    tokenizer = t5_tokenizer(wan.MAX_LENGTH)
    tiny_parts.seed_everything(seed)
    encoder = tiny_parts.t5_encoder(tokenizer, umt5=True)
    tiny_parts.seed_everything(seed + 2)
    vae = wan.tiny_vae()
    tiny_parts.seed_everything(seed + 1)
    transformer = tiny_transformer(encoder.config.d_model, 2 ** len(vae.temperal_downsample))
    pipe = WanVACEPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=wan.tiny_scheduler(),
                           transformer=transformer)  # fmt: skip
    tiny_parts.save(pipe, out_dir)


def variant(flavour: str | None, source: str, index: dict[str, Any], pipeline: str) -> Any:
    """`FAMILY` for the VACE flavours (on a WanVACEPipeline folder, or a hub id whose model_index.json is not cached)
    and for WanVACEPipeline folders; a VACE flavour on another pipeline's folder, or a two-expert (Wan 2.2) VACE
    folder, is refused."""
    if index and pipeline != PIPELINE_CLASS:
        raise ConfigError(f"model_flavour {flavour} is Wan 2.1 VACE, but the model at {source} is a {pipeline}: point "
                          f"pretrained_model_name_or_path at a {PIPELINE_CLASS} model (e.g. "
                          "Wan-AI/Wan2.1-VACE-1.3B-diffusers), or choose another flavour")  # fmt: skip
    if (index.get("transformer_2") or [None, None])[-1]:
        raise ConfigError(f"the model at {source} is a {PIPELINE_CLASS} with two transformers (Wan 2.2 VACE "
                          "experts), which st does not train yet; st trains Wan 2.1 VACE (vace-1.3b-2.1, "
                          "vace-14b-2.1)")  # fmt: skip
    return FAMILY


# The VACE variant of the wan family (`wan` picks it for the vace flavours and WanVACEPipeline folders): Wan's text,
# VAE, schedule and LoRA targets (which also match the VACE blocks' attention) with the VACE transformer and pipeline.
FAMILY = dataclasses.replace(wan.FAMILY, pipeline_class=PIPELINE_CLASS,
                             denoiser=Component("transformer", "WanVACETransformer3DModel", "diffusers"),
                             predict=predict, tiny=tiny, variant=None)  # fmt: skip
