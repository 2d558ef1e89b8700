"""LTX-Video 0.9.x text-to-video: a 3-D DiT (LTXVideoTransformer3DModel) over 128-channel LTX VAE latents
(C x f x h x w; 8x temporal, 32x spatial compression), conditioned on a masked T5-XXL sequence.

Text: `LTXPipeline.encode_prompt` pads each prompt to `max_sequence_length` (128), runs T5 WITHOUT the attention mask
and hands the mask to the transformer, whose cross-attention adds -10000 to padded positions (their weight underflows
to exactly zero). So st stores the real tokens' embeddings and the full mask; `text.collate` pads zeros back and the
transformer's output is the same.

Latents: AutoencoderKLLTXVideo with its `latents_mean` / `latents_std` buffers and scaling factor, normalised as
`LTXPipeline._normalize_latents` does ((z - mean) * scaling_factor / std); images in a video run are one frame.

Denoising: `LTXPipeline`'s loop packs the latents into tokens (B x f*h*w x C for patch size 1), calls the transformer
with `timestep` t (0..1000) per sample, the T5 mask, `num_frames` / `height` / `width` of the latent grid and
`rope_interpolation_scale` (8 / frame rate, 32, 32), and unpacks the output (the flow velocity). The frame rate is
`framerate` (25 unless set, as SimpleTuner sets it), which the text batch carries as `frame_rate` (see
`frame_rate_batch`); validation hands it to LTXPipeline as `frame_rate`. A per-frame timestep scale
(`frame_timestep_scale` in the text batch, see `pipeline.train.family_options.FirstFrame`) gives every token of a
frame its own timestep, as LTX's image-to-video conditioning does.

Flavours: SimpleTuner's table (models/ltxvideo/model.py HUGGINGFACE_PATHS): both run through LTXPipeline.
LTX-2 (`ltxvideo2`) is another family (LTX2Pipeline, a Gemma text encoder, audio) and is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.families import text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import t5_tokenizer
from pipeline.log import get_logger

log = get_logger("families")

MAX_LENGTH = 128  # LTXPipeline.encode_prompt's max_sequence_length default (SimpleTuner calls it with the default)
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # SimpleTuner's DEFAULT_LORA_TARGET for LTX-Video
TEMPORAL_COMPRESSION = 8  # the LTX VAE's (frames 1 + 8k encode to 1 + k latent frames)
SPATIAL_COMPRESSION = 32
DEFAULT_FRAME_RATE = 25  # LTXPipeline's frame_rate default; SimpleTuner's `framerate` for LTX when unset
FRAME_SCALE_KEY = "frame_timestep_scale"  # B x f: each latent frame's timestep as a share of the sample's
FRAME_RATE_KEY = "frame_rate"  # B x 2 int64: the frame rate as numerator, denominator (see frame_rate_batch)


def frame_rate_batch(frame_rate: float, batch: int) -> Any:
    """`frame_rate` for `batch` samples as B x 2 int64 (numerator, denominator of its decimal value): the text batch
    casts floating tensors to the denoiser's dtype, which would round 23.976 in bf16; the ratio gives back the same
    double as the number written in the config, so the RoPE scale equals LTXPipeline's `8 / frame_rate`."""
    from fractions import Fraction

    import torch

    ratio = Fraction(str(frame_rate))
    return torch.tensor([[ratio.numerator, ratio.denominator]], dtype=torch.int64).expand(batch, 2)


def frame_rate_of(text: dict[str, Any]) -> float:
    """The frame rate of a text batch (`frame_rate_batch`), DEFAULT_FRAME_RATE without one."""
    rates = text.get(FRAME_RATE_KEY)
    if rates is None:
        return DEFAULT_FRAME_RATE
    numerator, denominator = (int(v) for v in rates[0])
    return numerator / denominator


TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "T5EncoderModel", "transformers"),
        tokenizer=Component("tokenizer", "T5Tokenizer", "transformers"),
        max_length=MAX_LENGTH,
        kind="t5",
    ),
)


def encode_prompts(
    text_encoders: Any,
    tokenizers: Any,
    prompts: list[str],
    *,
    max_length: int | None = None,
    t5_padding: str = "unmodified",
    device: Any = "cpu",
) -> list[dict[str, Any]]:
    """Per prompt, `prompt_embeds` (real tokens x T5 dim) and `attention_mask` (128 tokens), as
    `LTXPipeline.encode_prompt` (T5 runs on the padded ids without the mask). `max_length` (tokenizer_max_length) is
    ignored with a warning, as SimpleTuner ignores it for LTX-Video (it calls encode_prompt at its default length).
    `t5_padding` changes nothing: the transformer masks the padded positions, whatever they hold."""
    import torch

    text.check_t5_padding(t5_padding)
    prompts = text.check_prompts(prompts)
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    if max_length is not None and int(max_length) != MAX_LENGTH:
        log.warning("tokenizer_max_length %s: LTX-Video prompts are encoded at %d tokens (LTXPipeline's default), as "
                    "SimpleTuner does", max_length, MAX_LENGTH)  # fmt: skip
    ids, mask = text.tokenize(tokenizer, prompts, MAX_LENGTH, device)
    with torch.no_grad():
        embeds = encoder(ids)[0]
    keep = [int(n) for n in mask.gt(0).sum(dim=1)]
    return text.split({"prompt_embeds": embeds, "attention_mask": mask}, keep=keep)


def pack(latents: Any, patch: int = 1, patch_t: int = 1) -> Any:
    """B x C x f x h x w latents as the transformer's tokens, B x (f/pt * h/p * w/p) x (C * pt * p * p), frame-major
    (`LTXPipeline._pack_latents`)."""
    b, c, f, h, w = latents.shape
    tokens = latents.reshape(b, c, f // patch_t, patch_t, h // patch, patch, w // patch, patch)
    return tokens.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack(tokens: Any, frames: int, height: int, width: int, patch: int = 1, patch_t: int = 1) -> Any:
    """The inverse of `pack`: B x C x f x h x w from tokens of a frames x height x width (patched) grid."""
    b = tokens.shape[0]
    grid = tokens.reshape(b, frames, height, width, -1, patch_t, patch, patch)
    return grid.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def rope_scale(frame_rate: float) -> tuple[float, float, float]:
    """`LTXPipeline`'s `rope_interpolation_scale`: (temporal compression / frame rate, spatial, spatial)."""
    return (TEMPORAL_COMPRESSION / float(frame_rate), SPATIAL_COMPRESSION, SPATIAL_COMPRESSION)


def token_timesteps(timesteps: Any, frame_scale: Any, tokens_per_frame: int) -> Any:
    """B x tokens timesteps: each sample's timestep times its frame's scale, for every token of the frame."""
    per_frame = timesteps.reshape(-1, 1).to(frame_scale.dtype) * frame_scale
    return per_frame.repeat_interleave(tokens_per_frame, dim=1)


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`LTXPipeline`'s transformer call on B x C x f x h x w latents: packed tokens, `timestep` (0..1000) per sample
    (per token with a `frame_timestep_scale`), the T5 sequence with its mask, the latent grid's size and the RoPE
    scale of the batch's `frame_rate` (25 without one); returns the flow velocity in the latents' shape."""
    if latents.ndim != 5:
        raise InputError(f"ltxvideo needs video latents shaped B x C x f x h x w, got {tuple(latents.shape)}")
    config = transformer.config
    patch, patch_t = config.patch_size, config.patch_size_t
    frames, height, width = latents.shape[2] // patch_t, latents.shape[3] // patch, latents.shape[4] // patch
    timestep = timesteps
    if FRAME_SCALE_KEY in text:
        timestep = token_timesteps(timesteps, text[FRAME_SCALE_KEY], height * width)
    out = transformer(
        hidden_states=pack(latents, patch, patch_t),
        encoder_hidden_states=text["prompt_embeds"],
        timestep=timestep,
        encoder_attention_mask=text["attention_mask"],
        num_frames=frames,
        height=height,
        width=width,
        rope_interpolation_scale=rope_scale(frame_rate_of(text)),
        return_dict=False,
    )[0]
    return unpack(out, frames, height, width, patch, patch_t)


def tiny_vae() -> Any:
    """A tiny AutoencoderKLLTXVideo with the real 32x spatial / 8x temporal compression and 128 latent channels
    (0.9.0's layout: no timestep conditioning), 8 channels per block, and a non-trivial latents_mean / latents_std so
    that the normalisation is exercised."""
    import torch
    from diffusers import AutoencoderKLLTXVideo

    vae = AutoencoderKLLTXVideo(
        latent_channels=128, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        decoder_inject_noise=(False,) * 5, patch_size=4, patch_size_t=1,
    ).eval()  # fmt: skip
    with torch.no_grad():
        vae.latents_mean.copy_(torch.randn(128) * 0.1)
        vae.latents_std.copy_(torch.rand(128) + 0.5)
    return vae


def tiny_transformer(caption_channels: int) -> Any:
    """A tiny LTXVideoTransformer3DModel: 2 blocks of 2 heads x 8, 128 channels in and out."""
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=128, out_channels=128, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, caption_channels=caption_channels,
    ).eval()  # fmt: skip


def tiny_scheduler() -> Any:
    """The scheduler LTX-Video ships: flow-matching Euler with resolution-dependent (dynamic) shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
        max_image_seq_len=4096, shift_terminal=0.1,
    )  # fmt: skip


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny LTXPipeline folder (T5 d_model 32, 2 transformer blocks, the tiny video VAE)."""
    from diffusers import LTXPipeline

    tokenizer = t5_tokenizer(MAX_LENGTH)
    tiny_parts.seed_everything(seed)
    encoder = tiny_parts.t5_encoder(tokenizer)
    tiny_parts.seed_everything(seed + 1)
    transformer = tiny_transformer(encoder.config.d_model)
    tiny_parts.seed_everything(seed + 2)
    vae = tiny_vae()
    pipe = LTXPipeline(
        tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=tiny_scheduler(), transformer=transformer
    )
    tiny_parts.save(pipe, out_dir)


# SimpleTuner's LTX-Video flavours (models/ltxvideo/model.py HUGGINGFACE_PATHS); its default is "0.9.5". Both are
# LTXPipeline folders (0.9.5's VAE adds timestep conditioning, which AutoencoderKLLTXVideo reads from its config).
FLAVOURS = (
    Flavour("0.9.5", "Lightricks/LTX-Video-0.9.5"),
    Flavour("0.9.0", "Lightricks/LTX-Video"),
)

FAMILY = Family(
    name="ltxvideo",
    pipeline_class="LTXPipeline",
    denoiser=Component("transformer", "LTXVideoTransformer3DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKLLTXVideo", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "FlowMatchEulerDiscreteScheduler", "diffusers"),
    latent_channels=128,
    # SimpleTuner overrides aspect_bucket_alignment to 64 for LTX-Video: a multiple of the VAE's 32-pixel factor,
    # the sizes LTXPipeline renders.
    bucket_alignment=2 * SPATIAL_COMPRESSION,
    prediction_type="flow_matching",
    lora_targets=LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=predict,
    trims_text=True,
    default_flow_shift=3.0,  # SimpleTuner's flow_schedule_shift default (LTX-Video sets no other)
    refused_precisions=("fp8-quanto",),  # SimpleTuner's check_user_config refuses it for LTX-Video
    flavours=FLAVOURS,
    default_flavour="0.9.5",
    video=True,
    temporal_compression=TEMPORAL_COMPRESSION,
)
