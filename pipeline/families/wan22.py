"""Wan 2.2: image-to-video A14B (the i2v-14b-2.2-high / -low flavours: two WanTransformer3DModel experts, one stage
trained at a time) and TI2V 5B (ti2v-5b-2.2).

The Wan2.2-I2V-A14B folder (`WanImageToVideoPipeline`) holds two transformers with the 2.1 I2V input (36 channels:
noisy latents, the 4-channel first-frame mask and the first-frame condition latents, as `wan_i2v`) but no CLIP image
embedder (`image_dim` null, no `image_encoder/`), the 16-channel Wan 2.1 VAE, and `boundary_ratio` in its
model_index.json. diffusers' loop runs `transformer` for timesteps t >= boundary_ratio * 1000 (the high-noise
expert) and `transformer_2` below it (the low-noise expert); the original Wan repository calls them
`high_noise_model` and `low_noise_model`.

SimpleTuner's stage table (models/wan/model.py `WAN_STAGE_OVERRIDES`) gives each flavour its stage, flow shift 5.0,
boundary 0.9, 40 sampling steps and guidance 3.5. Its subfolders are the other way round from diffusers' (high:
`transformer_2`, low: `transformer`), and its validation puts the trained model in the `transformer` slot for the high
stage, so a SimpleTuner "high" run trains the low-noise expert's weights and renders them over the high-noise steps.
DEVIATION: st trains the expert the flavour names, in diffusers' layout: high = `transformer`, low = `transformer_2`.

Training (as SimpleTuner): the trained expert's weights only; the timesteps are drawn over the whole schedule with the
stage's flow shift (SimpleTuner restricts nothing to the stage's side of the boundary). Validation: the trained expert
alone over every step (`wan_validation_load_other_stage` false, SimpleTuner's default), or the frozen other expert
loaded beside it in its own slot, with the boundary (true). A published LoRA applies to the trained expert:
`load_lora_weights(...)` for the high stage, `load_lora_weights(..., load_into_transformer_2=True)` for the low one.

First/last-frame stages (flf2v-14b-2.2-high / -low, `FLF2V_HIGH` / `FLF2V_LOW`, SimpleTuner's FLF2V_FLAVOURS with the
same stage table): the same experts, trained as WanImageToVideoPipeline renders them with `last_image` (the condition
latents of [first frame, black frames, last frame] cached with each clip and the first/last-frame mask, as Wan 2.1
FLF2V in `wan_i2v`, without CLIP), validated with `last_image`. SimpleTuner lists no model for them (its
HUGGINGFACE_PATHS has no entry: without pretrained_model_name_or_path it stops); DEVIATION: st defaults them to
Wan 2.2 I2V A14B, whose experts they train. DEVIATION: SimpleTuner's training conditions these non-expand_timesteps
models on the first frame only (`add_first_frame_conditioning`; its validation passes `last_image`); st trains on both.

Wan 2.2 TI2V 5B (ti2v-5b-2.2, `TI2V`): one transformer over the 48-channel Wan 2.2 VAE (residual, 2x2 pixel patches
before the encoder: 16x spatial, 4x temporal compression) with per-token timesteps (`expand_timesteps`). Its
image-to-video input, as `WanImageToVideoPipeline` with expand_timesteps builds it: latent frame 0 is replaced by the
first frame's condition latents and its tokens get timestep 0; the other tokens get t. SimpleTuner trains every TI2V
batch with that first-frame conditioning (`add_first_frame_conditioning_v22`), and so does st, from the condition
latents cached with each clip (the VAE's mode of its first frame, as the pipeline encodes its `image`). DEVIATION:
SimpleTuner re-encodes the first frame each step with a posterior sample (`latent_dist.sample()`); without
conditioning pixels it falls back to the 2.1 channel concatenation, which a 48-channel transformer cannot take.

Wan 2.2 T2V A14B (`Wan-AI/Wan2.2-T2V-A14B-Diffusers`, a `WanPipeline` with `transformer_2` and boundary_ratio 0.875):
the same two-expert layout over the 16-channel text-to-video input. SimpleTuner has no flavour for its own experts; it
trains one stage of it only through the AnimeGen flavours (`animegen-t2v-high` / `-low`, `T2V_STAGES`: flow shift
3.0, boundary 0.875, 8 sampling steps, guidance 1.0), whose stage weights are single .safetensors files of
aidealab/AnimeGen-T2V (`high_noise.safetensors`, `low_noise.safetensors`) loaded with
`WanTransformer3DModel.from_single_file` over the T2V A14B folder. st fetches them with `hf_hub_download` (the hub
cache; HF_HUB_OFFLINE honoured) and loads them the same way, in Wan's original key format or diffusers' layout
(`single_file_format`). `pretrained_transformer_model_name_or_path` replaces the stage file, as in SimpleTuner: another
.safetensors file, or a diffusers folder read from `pretrained_transformer_subfolder` (a T2V A14B folder's
`transformer` / `transformer_2`: the way to train the base model's own expert). DEVIATION: SimpleTuner forces that
subfolder to none for the AnimeGen flavours, and reads the single file's config from Wan 2.1 T2V 14B's hub repository
(diffusers' inference); st reads it from the base folder's stage slot (the same architecture, and no download).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.families import tiny_parts, wan, wan_i2v
from pipeline.log import get_logger

log = get_logger("families")

HIGH, LOW = "high", "low"
SLOTS = {HIGH: "transformer", LOW: "transformer_2"}  # diffusers' slots: transformer runs for t >= boundary


@dataclass(frozen=True)
class Stage:
    """One flavour's stage (SimpleTuner's `WAN_STAGE_OVERRIDES` entry, in diffusers' subfolders)."""

    trained: str  # "high" or "low"
    boundary_ratio: float
    flow_shift: float
    sample_steps: int
    guidance: float
    model: str = "Wan 2.2 I2V A14B"  # what the card names
    file: str | None = None  # the stage's weights file in ANIMEGEN_REPO (None: the base folder's slot)
    other_file: str | None = None  # the other stage's, for validation

    @property
    def subfolder(self) -> str:
        """The diffusers subfolder (and pipeline slot) of the trained expert."""
        return SLOTS[self.trained]

    @property
    def other_subfolder(self) -> str:
        return SLOTS[LOW if self.trained == HIGH else HIGH]


_I2V_STAGE = {"boundary_ratio": 0.90, "flow_shift": 5.0, "sample_steps": 40, "guidance": 3.5}
STAGES = {
    "i2v-14b-2.2-high": Stage(HIGH, **_I2V_STAGE),
    "i2v-14b-2.2-low": Stage(LOW, **_I2V_STAGE),
    # The same experts conditioned on the first and the last frame (SimpleTuner's FLF2V_FLAVOURS, same stage table).
    "flf2v-14b-2.2-high": Stage(HIGH, **_I2V_STAGE),
    "flf2v-14b-2.2-low": Stage(LOW, **_I2V_STAGE),
}
FLF2V_FLAVOURS = ("flf2v-14b-2.2-high", "flf2v-14b-2.2-low")
HUB_ID = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
T2V_HUB_ID = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
ANIMEGEN_REPO = "aidealab/AnimeGen-T2V"  # SimpleTuner's ANIMEGEN_T2V_*_PATH: huggingface.co/<repo>/resolve/main/<file>
_HIGH_FILE, _LOW_FILE = "high_noise.safetensors", "low_noise.safetensors"
_ANIMEGEN_STAGE = {"boundary_ratio": 0.875, "flow_shift": 3.0, "sample_steps": 8, "guidance": 1.0,
                   "model": "AnimeGen (Wan 2.2 T2V A14B)"}  # fmt: skip
T2V_STAGES = {
    "animegen-t2v-high": Stage(HIGH, **_ANIMEGEN_STAGE, file=_HIGH_FILE, other_file=_LOW_FILE),
    "animegen-t2v-low": Stage(LOW, **_ANIMEGEN_STAGE, file=_LOW_FILE, other_file=_HIGH_FILE),
}


def family_predict(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
                   guidance: Any = None, *, reference: Any) -> Any:  # fmt: skip
    """`Family.predict` of the A14B i2v experts: `wan_i2v`'s 36-channel call (the mask built here, `reference` the
    cached first-frame condition latents) without CLIP embeddings, as `WanImageToVideoPipeline` calls a transformer
    whose `image_dim` is null."""
    return wan_i2v.predict(transformer, latents, timesteps, text, wan_i2v.masked_condition(reference), None)


def flf2v_family_predict(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
                         guidance: Any = None, *, reference: Any) -> Any:  # fmt: skip
    """`Family.predict` of the A14B FLF2V stages: the pipeline's call with `last_image` (`reference`: the cached
    condition latents of [first frame, black frames, last frame]; the first/last-frame mask built here), no CLIP."""
    return wan_i2v.predict(transformer, latents, timesteps, text, wan_i2v.masked_condition(reference, last=True), None)


def tiny_transformer(text_dim: int) -> Any:
    """A tiny WanTransformer3DModel in the 2.2 A14B I2V layout: 36 input channels, no image embedder."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16 + wan_i2v.CONDITION_CHANNELS,
        out_channels=16, text_dim=text_dim, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip


def tiny_scheduler(flow_shift: float) -> Any:
    """UniPC on flow sigmas, as diffusers' conversion writes Wan 2.2 folders (flow_shift 3.0 for the A14B, 5.0 for
    TI2V 5B)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
                                   num_train_timesteps=1000)  # fmt: skip


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny Wan 2.2 I2V A14B WanImageToVideoPipeline folder: two experts (`transformer` high-noise,
    `transformer_2` low-noise), boundary_ratio 0.9, no CLIP image encoder, the tiny Wan 2.1 VAE."""
    from diffusers import WanImageToVideoPipeline

    from pipeline.families.tokenizers import t5_tokenizer

    tokenizer = t5_tokenizer(wan.MAX_LENGTH)
    tiny_parts.seed_everything(seed)
    encoder = tiny_parts.t5_encoder(tokenizer, umt5=True)
    tiny_parts.seed_everything(seed + 1)
    high = tiny_transformer(encoder.config.d_model)
    tiny_parts.seed_everything(seed + 4)
    low = tiny_transformer(encoder.config.d_model)
    tiny_parts.seed_everything(seed + 2)
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=encoder, vae=wan.tiny_vae(), scheduler=tiny_scheduler(3.0), transformer=high,
        transformer_2=low, image_encoder=None, image_processor=None,
        boundary_ratio=STAGES["i2v-14b-2.2-high"].boundary_ratio,
    )  # fmt: skip
    tiny_parts.save(pipe, out_dir)


# The two stage variants of the wan family: Wan 2.1 i2v's text, VAE, condition and LoRA targets, without CLIP, with the
# stages' flow shift. The low stage's weights come from `transformer_2` (`identity.denoiser_source`); its pipeline slot
# and LoRA prefix stay `transformer`, as diffusers' loader reads a Wan LoRA (`load_into_transformer_2` picks the slot).
# Each names its flavour as `default_flavour`, which `stage_of` reads (a copy made with dataclasses.replace keeps it).
# Their hooks (`_STAGE_HOOKS`) are set at the end of this module, below the functions they name.
I2V_HIGH = dataclasses.replace(wan_i2v.FAMILY, predict=family_predict, tiny=tiny, default_flavour="i2v-14b-2.2-high",
                               default_flow_shift=STAGES["i2v-14b-2.2-high"].flow_shift)  # fmt: skip
I2V_LOW = dataclasses.replace(I2V_HIGH, default_flavour="i2v-14b-2.2-low",
                              default_flow_shift=STAGES["i2v-14b-2.2-low"].flow_shift)  # fmt: skip
# The FLF2V stages: the same experts and stage table, conditioned on each clip's first and last frames (cached as Wan
# 2.1 FLF2V's, without CLIP), validated with `last_image`.
FLF2V_HIGH = dataclasses.replace(I2V_HIGH, predict=flf2v_family_predict, default_flavour="flf2v-14b-2.2-high",
                                 validation_extras=wan_i2v.last_frame_input)  # fmt: skip
FLF2V_LOW = dataclasses.replace(FLF2V_HIGH, default_flavour="flf2v-14b-2.2-low")


def t2v_family_predict(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
                       guidance: Any = None) -> Any:  # fmt: skip
    """`Family.predict` of the T2V A14B experts: `WanPipeline`'s transformer call (`wan.predict`); a function of its
    own so that `stage_of` tells the stage variants apart."""
    return wan.predict(transformer, latents, timesteps, text, meta, guidance)


def tiny_t2v(out_dir: Path, seed: int) -> None:
    """Write a tiny Wan 2.2 T2V A14B WanPipeline folder: two 16-channel experts (`transformer` high-noise,
    `transformer_2` low-noise), boundary_ratio 0.875, the tiny Wan 2.1 VAE."""
    from diffusers import WanPipeline

    from pipeline.families.tokenizers import t5_tokenizer

    tokenizer = t5_tokenizer(wan.MAX_LENGTH)
    tiny_parts.seed_everything(seed)
    encoder = tiny_parts.t5_encoder(tokenizer, umt5=True)
    tiny_parts.seed_everything(seed + 1)
    high = wan.tiny_transformer(encoder.config.d_model)
    tiny_parts.seed_everything(seed + 4)
    low = wan.tiny_transformer(encoder.config.d_model)
    tiny_parts.seed_everything(seed + 2)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=wan.tiny_vae(), scheduler=tiny_scheduler(3.0),
                       transformer=high, transformer_2=low,
                       boundary_ratio=T2V_STAGES["animegen-t2v-high"].boundary_ratio)  # fmt: skip
    tiny_parts.save(pipe, out_dir)


# The T2V A14B stage variants (the AnimeGen flavours): Wan's text-to-video family with the stage's flow shift. The
# pipeline slot and LoRA prefix stay `transformer`, as for the i2v stages.
T2V_HIGH = dataclasses.replace(wan.FAMILY, predict=t2v_family_predict, tiny=tiny_t2v,
                               default_flavour="animegen-t2v-high",
                               default_flow_shift=T2V_STAGES["animegen-t2v-high"].flow_shift)  # fmt: skip
T2V_LOW = dataclasses.replace(T2V_HIGH, default_flavour="animegen-t2v-low",
                              default_flow_shift=T2V_STAGES["animegen-t2v-low"].flow_shift)  # fmt: skip
_T2V_FAMILIES = {"animegen-t2v-high": T2V_HIGH, "animegen-t2v-low": T2V_LOW}


def t2v_variant(flavour: str | None, source: str, index: dict[str, Any], pipeline: str) -> Any:
    """The AnimeGen stage variant for its flavour (over a two-expert WanPipeline folder, or the hub id); a two-expert
    text-to-video folder without one is refused, naming them."""
    two_stage = bool((index.get("transformer_2") or [None, None])[-1])
    if flavour in T2V_STAGES:
        if index and (pipeline != wan.FAMILY.pipeline_class or not two_stage):
            raise ConfigError(f"model_flavour {flavour} trains one stage of AnimeGen over Wan 2.2 T2V A14B, but the "
                              f"model at {source} is a {pipeline}{'' if two_stage else ' without transformer_2'}: "
                              f"point pretrained_model_name_or_path at {T2V_HUB_ID} (or a copy), or choose another "
                              "flavour")  # fmt: skip
        return _T2V_FAMILIES[flavour]
    raise ConfigError(f"the model at {source} ({pipeline}) has two transformers (Wan 2.2 T2V A14B high- and "
                      "low-noise experts), and st trains one at a time, as SimpleTuner does, through a stage flavour: "
                      "set model_flavour to animegen-t2v-high (transformer, t >= boundary) or animegen-t2v-low "
                      "(transformer_2); to train this folder's own expert rather than AnimeGen's, also set "
                      "pretrained_transformer_model_name_or_path to this folder and pretrained_transformer_subfolder "
                      "to transformer (high) or transformer_2 (low)")  # fmt: skip


def stage_file(name: str) -> str:
    """The local path of AnimeGen's stage file `name`, through the hub cache (`hf_hub_download`, as SimpleTuner's
    from_single_file reads its URL; HF_HUB_OFFLINE: the cache only). InputError naming the file and the fixes when it
    is neither cached nor reachable."""
    from huggingface_hub import hf_hub_download

    from pipeline.errors import InputError
    from pipeline.families.hub import hub_errors, hub_offline, hub_problem

    try:
        return hf_hub_download(ANIMEGEN_REPO, name, local_files_only=hub_offline())
    except hub_errors() as error:
        raise InputError(f"AnimeGen's stage file {name} (hub repository {ANIMEGEN_REPO}) could not be read: "
                         f"{hub_problem(error)}. Download it where there is network so that the hub cache holds it, "
                         "or set pretrained_transformer_model_name_or_path to a local copy of the "
                         "file") from error  # fmt: skip


_ORIGINAL_KEY = "head.modulation"  # Wan's original checkpoints (diffusers' CHECKPOINT_KEY_NAMES["wan"])
_DIFFUSERS_KEYS = ("scale_shift_table", "proj_out.weight", "patch_embedding.weight")


def single_file_format(path: str | Path) -> str:
    """"original" (Wan's key names, optionally under `model.diffusion_model.`, as diffusers' from_single_file
    converts them) or "diffusers" (WanTransformer3DModel's own state dict), from the file's header (no tensor is
    read); InputError for anything else."""
    import json
    import struct

    from pipeline.errors import InputError

    try:
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            keys = set(json.loads(handle.read(size))) - {"__metadata__"}
    except (OSError, ValueError, struct.error) as error:
        raise InputError(f"{path} is not a readable .safetensors file ({error})") from error
    if _ORIGINAL_KEY in keys or f"model.diffusion_model.{_ORIGINAL_KEY}" in keys:
        return "original"
    if all(key in keys for key in _DIFFUSERS_KEYS):
        return "diffusers"
    raise InputError(f"{path} holds no Wan transformer: neither Wan's original keys ({_ORIGINAL_KEY}) nor diffusers' "
                     f"WanTransformer3DModel keys ({', '.join(_DIFFUSERS_KEYS)}); point the stage at a Wan 2.2 "
                     "A14B expert's .safetensors file")  # fmt: skip


def load_single_file(family: Any, path: str, config: str, subfolder: str, *, dtype: Any = None,
                     quantization_config: Any = None) -> Any:  # fmt: skip
    """A stage's WanTransformer3DModel from the single .safetensors file `path`, as SimpleTuner loads AnimeGen's
    (`from_single_file`), with the architecture of `config`'s `subfolder` (the base T2V A14B folder's slot)."""
    from pipeline.errors import InputError
    from pipeline.families.hub import hub_errors, hub_offline

    form = single_file_format(path)
    log.info("the %s comes from the single file %s (%s keys; config: %s/%s)", family.denoiser.subfolder, path, form,
             config, subfolder)  # fmt: skip
    kwargs: dict[str, Any] = {"config": str(config), "subfolder": subfolder, "local_files_only": True
                              if Path(config).is_dir() else hub_offline()}  # fmt: skip
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        return family.denoiser.load_class().from_single_file(str(path), **kwargs)
    except (*hub_errors(), ValueError, KeyError, RuntimeError) as error:
        raise InputError(f"could not load {path} as {family.denoiser.class_name} with the architecture of "
                         f"{config}/{subfolder}: {str(error).strip()[:400]}; the file must be an expert of the same "
                         "model as the base folder") from error  # fmt: skip


TI2V_HUB_ID = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
TI2V_CHANNELS = 48
TI2V_ALIGNMENT = 64  # SimpleTuner's aspect_bucket_alignment for the 5B (32 for the other Wan flavours)


def first_frame_token_timesteps(timesteps: Any, frames: int, height: int, width: int, patch: Any) -> Any:
    """B x tokens timesteps of the expand_timesteps pipelines: 0 on latent frame 0's tokens, t (per sample) on the
    others, in the transformer's token order (frame, row, column of `patch`-sized patches)."""
    import torch

    mask = torch.ones(1, frames // patch[0], height // patch[1], width // patch[2], device=timesteps.device)
    mask[:, 0] = 0
    return (mask.flatten(1) * timesteps.view(-1, 1).to(mask.dtype)).to(timesteps.dtype)


def ti2v_predict(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
                 guidance: Any = None, *, reference: Any) -> Any:  # fmt: skip
    """`Family.predict` of TI2V 5B, as `WanImageToVideoPipeline`'s loop with expand_timesteps calls the transformer:
    latent frame 0 replaced by `reference`'s (the cached first-frame condition latents, B x 48 x f x h x w), timestep 0
    on its tokens and t on the others (B x tokens)."""
    import torch

    from pipeline.errors import InputError

    if latents.ndim != 5 or reference.shape != latents.shape:
        raise InputError(f"wan ti2v needs latents and first-frame condition latents shaped B x {TI2V_CHANNELS} x f x "
                         f"h x w, got {tuple(latents.shape)} and {tuple(reference.shape)}")  # fmt: skip
    batch, _, frames, height, width = latents.shape
    hidden = torch.cat([reference[:, :, :1].to(latents.dtype), latents[:, :, 1:]], dim=2)
    tokens = first_frame_token_timesteps(timesteps.expand(batch) if timesteps.ndim == 0 else timesteps, frames,
                                         height, width, transformer.config.patch_size)  # fmt: skip
    return transformer(hidden_states=hidden, timestep=tokens, encoder_hidden_states=text["prompt_embeds"],
                       return_dict=False)[0]  # fmt: skip


def tiny_ti2v_vae() -> Any:
    """A tiny AutoencoderKLWan in the 2.2 layout (48 latent channels, residual blocks, 2x2 pixel patches, 4x temporal
    compression) with two down-sampling levels (8x spatial in all) and stand-in per-channel statistics."""
    import torch
    from diffusers import AutoencoderKLWan

    generator = torch.Generator().manual_seed(48)
    mean = (torch.rand(TI2V_CHANNELS, generator=generator) * 2 - 1).tolist()
    std = (torch.rand(TI2V_CHANNELS, generator=generator) * 2 + 0.5).tolist()
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=TI2V_CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=8, scale_factor_temporal=4, latents_mean=[round(v, 4) for v in mean],
        latents_std=[round(v, 4) for v in std],
    ).eval()  # fmt: skip


def tiny_ti2v_transformer(text_dim: int) -> Any:
    """A tiny WanTransformer3DModel in the TI2V 5B layout: 48 channels in and out, no image embedder."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=TI2V_CHANNELS,
        out_channels=TI2V_CHANNELS, text_dim=text_dim, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip


def tiny_ti2v(out_dir: Path, seed: int) -> None:
    """Write a tiny Wan 2.2 TI2V 5B folder as the hub's: a WanPipeline with expand_timesteps true, the tiny 2.2 VAE."""
    from diffusers import WanPipeline

    from pipeline.families.tokenizers import t5_tokenizer

    tokenizer = t5_tokenizer(wan.MAX_LENGTH)
    tiny_parts.seed_everything(seed)
    encoder = tiny_parts.t5_encoder(tokenizer, umt5=True)
    tiny_parts.seed_everything(seed + 1)
    transformer = tiny_ti2v_transformer(encoder.config.d_model)
    tiny_parts.seed_everything(seed + 2)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_ti2v_vae(), scheduler=tiny_scheduler(5.0),
                       transformer=transformer, expand_timesteps=True)  # fmt: skip
    tiny_parts.save(pipe, out_dir)


# TI2V 5B trains as an image-to-video variant (the first frame of each cached clip is its reference, as Wan 2.1 i2v)
# rendered by WanImageToVideoPipeline with expand_timesteps; no CLIP.
TI2V = dataclasses.replace(wan_i2v.FAMILY, predict=ti2v_predict, tiny=tiny_ti2v, latent_channels=TI2V_CHANNELS,
                           bucket_alignment=TI2V_ALIGNMENT, default_flavour="ti2v-5b-2.2")  # fmt: skip


def ti2v_variant(flavour: str | None, source: str, index: dict[str, Any], pipeline: str) -> Any:
    """TI2V 5B for its flavour or an expand_timesteps folder; its flavour on another folder is refused."""
    if index and not index.get("expand_timesteps"):
        raise ConfigError(f"model_flavour {flavour} is Wan 2.2 TI2V 5B, but the model at {source} ({pipeline}) "
                          f"does not set expand_timesteps: point pretrained_model_name_or_path at {TI2V_HUB_ID} (or a copy), "
                          "or choose another flavour")  # fmt: skip
    return TI2V


def pipeline_components(family: Any, source: str, trained: Any, load_other_stage: bool, device: Any) -> dict[str, Any]:
    """What validation's pipeline needs beside the family's usual components: a stage's expert slots
    (`validation_components`), TI2V's expand_timesteps; nothing for other families."""
    if family.predict is ti2v_predict:
        return {"expand_timesteps": True}
    if stage_of(family) is None:
        return {}
    return validation_components(family, source, trained, load_other_stage, device)


def stage_of(family: Any) -> Stage | None:
    """The stage a family variant trains (None: not a Wan 2.2 stage variant)."""
    if family.name != wan.FAMILY.name or family.predict not in (family_predict, flf2v_family_predict,
                                                                t2v_family_predict):  # fmt: skip
        return None
    return (T2V_STAGES if family.predict is t2v_family_predict else STAGES).get(family.default_flavour or "")


def weights_subfolder(family: Any) -> str | None:
    """Where the trained expert's weights are read from when that is not the family's denoiser subfolder (the low
    stage: `transformer_2`); None otherwise."""
    stage = stage_of(family)
    if stage is None or stage.file is not None:  # AnimeGen's stages come from their file (`stage_denoiser`)
        return None
    return None if stage.subfolder == family.denoiser.subfolder else stage.subfolder


def stage_denoiser(family: Any, file: str | None = None) -> tuple[str, str] | None:
    """An AnimeGen stage's trained weights: (the local path of its hub file, or of `file`, the
    pretrained_transformer_model_name_or_path file in its place; the base folder's slot whose config it takes); None
    for other runs."""
    stage = stage_of(family)
    if stage is None or stage.file is None:
        return None
    if file is not None and not Path(file).is_file():
        from pipeline.errors import InputError

        raise InputError(f"pretrained_transformer_model_name_or_path {file!r} does not exist")
    return (file or stage_file(stage.file), stage.subfolder)


def variant(flavour: str | None, source: str, index: dict[str, Any], pipeline: str) -> Any:
    """The stage variant for a two-expert WanImageToVideoPipeline folder (or the A14B flavours on a hub id whose
    model_index.json is not cached): the flavour must name the stage."""
    two_stage = bool((index.get("transformer_2") or [None, None])[-1])
    if flavour in STAGES:
        if index and (pipeline != wan_i2v.PIPELINE_CLASS or not two_stage):
            raise ConfigError(f"model_flavour {flavour} trains one expert of Wan 2.2 I2V A14B, but the model at "
                              f"{source} is a {pipeline} without transformer_2: point pretrained_model_name_or_path at "
                              f"{HUB_ID} (or a copy), or choose another flavour")  # fmt: skip
        return _FAMILIES[flavour]
    raise ConfigError(f"the model at {source} ({pipeline}) has two transformers (Wan 2.2 A14B high- and low-noise "
                      "experts), and st trains one at a time: set model_flavour to i2v-14b-2.2-high (transformer, "
                      "t >= boundary) or i2v-14b-2.2-low (transformer_2), or flf2v-14b-2.2-high / flf2v-14b-2.2-low "
                      "to condition on each clip's first and last frames")  # fmt: skip


def validation_components(family: Any, source: str, trained: Any, load_other_stage: bool,
                          device: Any) -> dict[str, Any]:  # fmt: skip
    """The pipeline's transformer slots for a stage variant's validation, as SimpleTuner's `get_pipeline` sets them:
    the trained expert alone in `transformer` with no boundary (every step), or, with
    `wan_validation_load_other_stage`, the frozen other expert (from the model folder; an AnimeGen stage: the other
    stage's file) in its own slot and the trained one in its slot, switching at `boundary_ratio`."""
    from pipeline.families.loading import load_denoiser
    from pipeline.families.spec import _module_dtype

    stage = stage_of(family)
    if not load_other_stage:
        return {"transformer": trained, "transformer_2": None, "boundary_ratio": None}
    if stage.other_file is not None:  # AnimeGen: the other stage's file over the base folder's slot, as SimpleTuner
        other = load_single_file(family, stage_file(stage.other_file), source, stage.other_subfolder,
                                 dtype=_module_dtype(trained))  # fmt: skip
    else:
        other = load_denoiser(family, source, stage.other_subfolder, dtype=_module_dtype(trained))
    other = other.to(device).eval().requires_grad_(False)
    log.info("validation: the trained %s-noise expert (%s) with the frozen %s from %s, boundary_ratio %s",
             stage.trained, stage.subfolder, stage.other_subfolder, source, stage.boundary_ratio)  # fmt: skip
    return {stage.subfolder: trained, stage.other_subfolder: other, "boundary_ratio": stage.boundary_ratio}


STAGE_KEY = "wan_stage"  # train's key entry of a T2V A14B stage run (`train_key_entries`)


def check_stage_slot(family: Any, model: str, source: str, subfolder: str | None) -> None:
    """ConfigError when an AnimeGen stage's pretrained_transformer_model_name_or_path names the base folder itself
    with the other stage's slot (the expert trained would not be the one the flavour names)."""
    stage = stage_of(family)
    if stage is None or stage.file is None or source != model or subfolder != stage.other_subfolder:
        return
    raise ConfigError(f"model_flavour {family.default_flavour} trains the {stage.trained}-noise expert "
                      f"({stage.subfolder}), but pretrained_transformer_subfolder names {subfolder} of {model}: set "
                      f"it to {stage.subfolder}, or choose the other stage's flavour")  # fmt: skip


def train_key_entries(family: Any) -> dict[str, str]:
    """What train's key and manifest record of a T2V A14B stage run: its stage (its pipeline class is Wan's own, so
    nothing else tells `run_stage` which it trained); nothing for other runs."""
    stage = stage_of(family)
    entries = wan_i2v.train_key_entries(family)  # an FLF2V stage renders with `last_image`
    return {**entries, STAGE_KEY: stage.trained} if stage is not None and stage.file is not None else entries


def run_stage(train: dict[str, Any], denoiser_config: dict[str, Any] | None = None) -> Stage | None:
    """The stage a train manifest's run trained (None: not a Wan 2.2 A14B stage), from what it recorded: the low
    stage's denoiser identity names `transformer_2`; a high-stage run trained `transformer` of a
    WanImageToVideoPipeline whose transformer has the A14B input (36 channels, no image embedder), told by
    `denoiser_config` (the base transformer's config.json; None: unknown)."""
    if train.get("family") != wan.FAMILY.name:
        return None
    trained = train.get("config", {}).get(STAGE_KEY)  # an AnimeGen (T2V A14B) stage run records its stage
    if trained in (HIGH, LOW):
        return T2V_STAGES[f"animegen-t2v-{trained}"]
    if train.get("model", {}).get("denoiser", {}).get("subfolder") == SLOTS[LOW]:
        return STAGES["i2v-14b-2.2-low"]
    a14b = denoiser_config is not None and denoiser_config.get("image_dim") is None and \
        denoiser_config.get("in_channels") == 16 + wan_i2v.CONDITION_CHANNELS  # fmt: skip
    if train.get("config", {}).get("pipeline") == wan_i2v.PIPELINE_CLASS and a14b:
        return STAGES["i2v-14b-2.2-high"]
    return None


def lora_load_arguments(stage: Stage | None) -> str:
    """The extra `load_lora_weights` arguments of a stage's LoRA in a diffusers snippet ("" for the high stage)."""
    return ", load_into_transformer_2=True" if stage is not None and stage.trained == LOW else ""


def card_note(stage: Stage | None) -> str | None:
    """The model card's sentence on which expert a stage's weights belong to (None for other runs)."""
    if stage is None:
        return None
    other = LOW if stage.trained == HIGH else HIGH
    return (f"These weights are for {stage.model}'s {stage.trained}-noise expert (diffusers' `{stage.subfolder}`, "
            f"which denoises timesteps {'at or above' if stage.trained == HIGH else 'below'} boundary_ratio "
            f"{stage.boundary_ratio} x 1000; the original repository's `{stage.trained}_noise_model`); the "
            f"{other}-noise expert stays as it is. In ComfyUI, apply the LoRA to the {stage.trained}-noise model.")


def trained_slot(train: dict[str, Any]) -> str | None:
    """`Family.trained_slot`: a Wan 2.2 A14B stage's expert (the low-noise stage trains `transformer_2`); None for
    other runs."""
    stage = run_stage(train)
    return None if stage is None else stage.subfolder


def stage_lora_arguments(train: dict[str, Any]) -> str:
    """`Family.lora_load_arguments`: the low-noise stage's LoRA goes into `transformer_2` (`lora_load_arguments`)."""
    return lora_load_arguments(run_stage(train))


def stage_card_note(family: Any, train: dict[str, Any], denoiser_config: Any) -> str | None:
    """`Family.card_note`: which expert a Wan 2.2 A14B stage's weights belong to (`card_note`); an I2V high stage is
    told by the base denoiser's config (`run_stage`)."""
    if family.pipeline_class not in (wan_i2v.PIPELINE_CLASS, wan.FAMILY.pipeline_class):
        return None
    i2v = family.pipeline_class == wan_i2v.PIPELINE_CLASS
    return card_note(run_stage(train, denoiser_config() if i2v else None))


# The variants' hooks, set here below the functions they name (`stage_of` reads the stage from the family). The I2V
# variants come from Wan 2.1 i2v's family, without its CLIP.
_STAGE_HOOKS = {"image_encoder": (), "validation_components": pipeline_components,
                "train_key_entries": train_key_entries, "denoiser_subfolder": weights_subfolder,
                "denoiser_file": stage_denoiser, "load_denoiser_file": load_single_file,
                "check_denoiser_source": check_stage_slot}  # fmt: skip
I2V_HIGH, I2V_LOW, FLF2V_HIGH, FLF2V_LOW, T2V_HIGH, T2V_LOW = (
    dataclasses.replace(f, **_STAGE_HOOKS) for f in (I2V_HIGH, I2V_LOW, FLF2V_HIGH, FLF2V_LOW, T2V_HIGH, T2V_LOW))
TI2V = dataclasses.replace(TI2V, image_encoder=(), validation_components=pipeline_components)
_FAMILIES = {"i2v-14b-2.2-high": I2V_HIGH, "i2v-14b-2.2-low": I2V_LOW, "flf2v-14b-2.2-high": FLF2V_HIGH,
             "flf2v-14b-2.2-low": FLF2V_LOW}  # fmt: skip
_T2V_FAMILIES = {"animegen-t2v-high": T2V_HIGH, "animegen-t2v-low": T2V_LOW}
