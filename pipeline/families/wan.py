"""Wan 2.1 / 2.2 text-to-video: a 3-D DiT (WanTransformer3DModel) over 16-channel Wan VAE video latents
(C x f x h x w; 4x temporal, 8x spatial compression in the real VAE), conditioned on UMT5's last hidden state.

Text: `WanPipeline.encode_prompt` cleans each prompt (ftfy when installed, HTML unescaping, whitespace), pads it to
`max_sequence_length` (512), runs UMT5 with the attention mask and zeroes the hidden states past the real tokens. The
transformer takes no text mask, so those zeros are part of its input: st stores the real tokens and the mask, and
`text.collate` pads the zeros back (what the transformer receives is identical).

Latents: AutoencoderKLWan normalised per channel (`latents_mean` / `latents_std`), as the pipeline expects before
decoding; images in a video run are one frame (C x 1 x h x w).

Denoising: `WanPipeline`'s loop calls the transformer on the 5-D latents with `timestep` t (0..1000, one per sample)
and the text embeddings; the output is the flow velocity noise - x0 in the latents' shape.

Flavours: SimpleTuner's table (models/wan/model.py HUGGINGFACE_PATHS). st trains the single-transformer text-to-video
models that `WanPipeline` renders and Wan 2.1 image-to-video (the i2v-14b-2.1 flavours and WanImageToVideoPipeline
folders train as `pipeline.families.wan_i2v.FAMILY`), and one expert at a time of the two-stage Wan 2.2 I2V A14B model
(i2v-14b-2.2-high / -low, and flf2v-14b-2.2-high / -low conditioned on the first and last frames) and Wan 2.2 TI2V 5B
(ti2v-5b-2.2), both in `pipeline.families.wan22`, as is one stage of the two-expert Wan 2.2 T2V A14B through
SimpleTuner's AnimeGen flavours (animegen-t2v-high / -low); Wan 2.1 FLF2V (flf2v-14b-2.1) trains as
`wan_i2v.FLF2V_FAMILY`, and Wan 2.1 VACE (vace-1.3b-2.1, vace-14b-2.1, WanVACEPipeline folders) as
`wan_vace.FAMILY`, in the pipeline's no-control mode.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputError
from pipeline.families import text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import t5_tokenizer
from pipeline.log import get_logger

log = get_logger("families")

MAX_LENGTH = 512  # WanPipeline's max_sequence_length default; SimpleTuner forces tokenizer_max_length 512 for Wan
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # SimpleTuner's DEFAULT_LORA_TARGET for Wan
TEMPORAL_COMPRESSION = 4  # the Wan 2.1 VAE's (scale_factor_temporal)

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "UMT5EncoderModel", "transformers"),
        tokenizer=Component("tokenizer", "T5Tokenizer", "transformers"),
        max_length=MAX_LENGTH,
        kind="t5",
    ),
)


def clean_prompt(prompt: str) -> str:
    """`prompt_clean` of diffusers' Wan pipelines: ftfy's fixes when ftfy is installed, HTML entities unescaped
    twice, runs of whitespace collapsed and the ends stripped."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        prompt = ftfy.fix_text(prompt)
    prompt = html.unescape(html.unescape(prompt)).strip()
    return re.sub(r"\s+", " ", prompt).strip()


def encode_prompts(
    text_encoders: Any,
    tokenizers: Any,
    prompts: list[str],
    *,
    max_length: int | None = None,
    t5_padding: str = "unmodified",
    device: Any = "cpu",
) -> list[dict[str, Any]]:
    """Per prompt, `prompt_embeds` (real tokens x UMT5 dim) and `attention_mask` (512 tokens), as
    `WanPipeline.encode_prompt`; `collate_text` pads the zero rows back. `t5_padding` changes nothing: the pipeline
    always zeroes the padded positions."""
    import torch

    text.check_t5_padding(t5_padding)
    prompts = [clean_prompt(p) for p in text.check_prompts(prompts)]
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    if max_length not in (None, MAX_LENGTH):  # SimpleTuner sets tokenizer_max_length to 512 for Wan, warning alike
        log.warning("wan encodes %d tokens (WanPipeline's max_sequence_length); tokenizer_max_length %s is ignored, "
                    "as in SimpleTuner", MAX_LENGTH, max_length)  # fmt: skip
    length = MAX_LENGTH
    ids, mask = text.tokenize(tokenizer, prompts, length, device)
    with torch.no_grad():
        embeds = encoder(ids, mask).last_hidden_state
    keep = [int(n) for n in mask.gt(0).sum(dim=1)]
    return text.split({"prompt_embeds": embeds, "attention_mask": mask}, keep=keep)


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`WanPipeline`'s transformer call: 5-D latents (B x C x f x h x w), `timestep` on the 0..1000 scale per sample,
    the zero-padded UMT5 sequence (no mask); returns the flow velocity in the latents' shape."""
    if latents.ndim != 5:
        raise InputError(f"wan needs video latents shaped B x C x f x h x w, got {tuple(latents.shape)}")
    return transformer(
        hidden_states=latents,
        timestep=timesteps,
        encoder_hidden_states=text["prompt_embeds"],
        return_dict=False,
    )[0]


def tiny_vae() -> Any:
    """A tiny AutoencoderKLWan with the real 4x temporal compression and the real latents_mean / latents_std, but a
    4x spatial factor (two down-sampling levels, both temporal) to keep test videos small."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True, True],
        scale_factor_spatial=4, scale_factor_temporal=TEMPORAL_COMPRESSION,
    ).eval()  # fmt: skip


def tiny_transformer(text_dim: int) -> Any:
    """A tiny WanTransformer3DModel in the 2.1 T2V layout (no image embedder): 2 blocks of 2 heads x 12."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=text_dim, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip


def tiny_scheduler() -> Any:
    """The scheduler the Wan 2.1 T2V repositories ship: UniPC on flow sigmas, flow_shift 3."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                   num_train_timesteps=1000)  # fmt: skip


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny Wan 2.1 T2V WanPipeline folder (UMT5 d_model 32, 2 transformer blocks, the tiny video VAE)."""
    from diffusers import WanPipeline

    tokenizer = t5_tokenizer(MAX_LENGTH)
    tiny_parts.seed_everything(seed)
    encoder = tiny_parts.t5_encoder(tokenizer, umt5=True)
    tiny_parts.seed_everything(seed + 1)
    transformer = tiny_transformer(encoder.config.d_model)
    tiny_parts.seed_everything(seed + 2)
    vae = tiny_vae()
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=tiny_scheduler(), transformer=transformer
    )
    tiny_parts.save(pipe, out_dir)


# SimpleTuner's Wan flavours (models/wan/model.py HUGGINGFACE_PATHS); its default is "t2v-480p-1.3b-2.1".
FLAVOURS = (
    Flavour("t2v-480p-1.3b-2.1", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    Flavour("t2v-480p-14b-2.1", "Wan-AI/Wan2.1-T2V-14B-Diffusers"),
    Flavour("i2v-14b-2.1", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"),
    Flavour("i2v-14b-2.1-720p", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"),
    Flavour("i2v-14b-2.2-high", "Wan-AI/Wan2.2-I2V-A14B-Diffusers"),  # trained as `wan22.I2V_HIGH`
    Flavour("i2v-14b-2.2-low", "Wan-AI/Wan2.2-I2V-A14B-Diffusers"),  # trained as `wan22.I2V_LOW`
    Flavour("animegen-t2v-high", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"),  # trained as `wan22.T2V_HIGH`
    Flavour("animegen-t2v-low", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"),  # trained as `wan22.T2V_LOW`
    Flavour("flf2v-14b-2.1", "Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers"),  # trained as `wan_i2v.FLF2V_FAMILY`
    # Not in SimpleTuner's HUGGINGFACE_PATHS (there they need pretrained_model_name_or_path); DEVIATION: st defaults
    # them to the model whose experts they train, Wan 2.2 I2V A14B. Trained as `wan22.FLF2V_HIGH` / `FLF2V_LOW`.
    Flavour("flf2v-14b-2.2-high", "Wan-AI/Wan2.2-I2V-A14B-Diffusers"),
    Flavour("flf2v-14b-2.2-low", "Wan-AI/Wan2.2-I2V-A14B-Diffusers"),
    Flavour("vace-1.3b-2.1", "Wan-AI/Wan2.1-VACE-1.3B-diffusers"),  # trained as `wan_vace.FAMILY`
    Flavour("vace-14b-2.1", "Wan-AI/Wan2.1-VACE-14B-diffusers"),
    Flavour("ti2v-5b-2.2", "Wan-AI/Wan2.2-TI2V-5B-Diffusers"),  # trained as `wan22.TI2V`
)

I2V_FLAVOURS = ("i2v-14b-2.1", "i2v-14b-2.1-720p")  # trained as `wan_i2v.FAMILY`
# One expert of Wan 2.2 I2V A14B (`wan22`), first-frame or first/last-frame conditioned.
STAGE_FLAVOURS = ("i2v-14b-2.2-high", "i2v-14b-2.2-low", "flf2v-14b-2.2-high", "flf2v-14b-2.2-low")
TI2V_FLAVOUR = "ti2v-5b-2.2"  # Wan 2.2 TI2V 5B (`wan22.TI2V`)
T2V_STAGE_FLAVOURS = ("animegen-t2v-high", "animegen-t2v-low")  # one stage of Wan 2.2 T2V A14B (`wan22`)
VACE_FLAVOURS = ("vace-1.3b-2.1", "vace-14b-2.1")  # Wan 2.1 VACE (`wan_vace.FAMILY`)
_I2V_PIPELINE = "WanImageToVideoPipeline"
_VACE_PIPELINE = "WanVACEPipeline"


def _variant(flavour: str | None, source: str) -> Family:
    """Wan itself, for a model `WanPipeline` renders with one transformer; Wan 2.1 image-to-video (`wan_i2v`) for the
    i2v flavours and WanImageToVideoPipeline folders with one transformer; a model folder of another Wan pipeline;
    the Wan 2.2 I2V A14B stage variants (`wan22`) for its flavours and two-expert WanImageToVideoPipeline folders; a
    TI2V 5B (`wan22.TI2V`) for its flavour and expand_timesteps folders; the T2V A14B stage variants (`wan22`) for
    the AnimeGen flavours and two-expert WanPipeline folders (refused without a stage flavour); Wan 2.1 VACE
    (`wan_vace`) for its flavours and WanVACEPipeline folders."""
    from pipeline.families.hub import model_index_of

    index = model_index_of(source) or {}
    pipeline = index.get("_class_name", _I2V_PIPELINE if flavour in I2V_FLAVOURS + STAGE_FLAVOURS else "WanPipeline")
    if flavour in VACE_FLAVOURS or pipeline == _VACE_PIPELINE:
        from pipeline.families import wan_vace

        return wan_vace.variant(flavour, source, index, pipeline)
    needs = None if pipeline in ("WanPipeline", _I2V_PIPELINE) else f"its pipeline class {pipeline}"
    two_stage = bool((index.get("transformer_2") or [None, None])[-1])
    if needs is None and (flavour == TI2V_FLAVOUR or index.get("expand_timesteps")):
        from pipeline.families import wan22

        return wan22.ti2v_variant(flavour, source, index, pipeline)
    if needs is None and (flavour in T2V_STAGE_FLAVOURS or
                          (two_stage and pipeline == "WanPipeline" and flavour not in STAGE_FLAVOURS)):  # fmt: skip
        from pipeline.families import wan22

        return wan22.t2v_variant(flavour, source, index, pipeline)
    if needs is None and (flavour in STAGE_FLAVOURS or (two_stage and pipeline == _I2V_PIPELINE)):
        from pipeline.families import wan22

        return wan22.variant(flavour, source, index, pipeline)
    if needs:
        raise ConfigError(f"the model at {source} ({pipeline}) needs {needs}, not supported yet: st trains Wan "
                          "text-to-video models with one transformer (model_flavour t2v-480p-1.3b-2.1 or "
                          "t2v-480p-14b-2.1), Wan 2.1 image-to-video (i2v-14b-2.1, i2v-14b-2.1-720p), one expert of "
                          "Wan 2.2 I2V A14B (i2v-14b-2.2-high, i2v-14b-2.2-low), one stage of Wan 2.2 T2V A14B "
                          "(animegen-t2v-high, animegen-t2v-low), Wan 2.2 TI2V 5B (ti2v-5b-2.2) and Wan 2.1 VACE "
                          "(vace-1.3b-2.1, vace-14b-2.1)")  # fmt: skip
    from pipeline.families import wan_i2v

    flf2v = wan_i2v.flf2v_variant(flavour, source, index.get("_class_name"))  # FLF2V: WanImageToVideoPipeline too
    if flf2v is not None:
        return flf2v
    if flavour in I2V_FLAVOURS and pipeline != _I2V_PIPELINE:
        raise ConfigError(f"model_flavour {flavour} is Wan 2.1 image-to-video, but the model at {source} is a "
                          f"{pipeline}: point pretrained_model_name_or_path at a {_I2V_PIPELINE} model, or choose a "
                          "t2v flavour")  # fmt: skip
    if pipeline == _I2V_PIPELINE:
        return wan_i2v.FAMILY
    return FAMILY


# Publish's hooks (`Family.trained_slot`, ...): what a Wan run's variant trained, read from its train manifest by
# `wan22` / `wan_i2v`, imported when called (they import this module).
def _trained_slot(train: dict[str, Any]) -> str | None:
    from pipeline.families import wan22

    return wan22.trained_slot(train)


def _lora_load_arguments(train: dict[str, Any]) -> str:
    from pipeline.families import wan22

    return wan22.stage_lora_arguments(train)


def _card_note(family: Family, train: dict[str, Any], denoiser_config: Any) -> str | None:
    from pipeline.families import wan22

    return wan22.stage_card_note(family, train, denoiser_config)


def _snippet_images(train: dict[str, Any]) -> list[tuple[str, str, str]]:
    from pipeline.families import wan_i2v

    return wan_i2v.snippet_images(train)


FAMILY = Family(
    name="wan",
    pipeline_class="WanPipeline",
    denoiser=Component("transformer", "WanTransformer3DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKLWan", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "UniPCMultistepScheduler", "diffusers"),
    latent_channels=16,
    bucket_alignment=32,  # SimpleTuner overrides aspect_bucket_alignment to 32 for Wan (64 for the 5B)
    prediction_type="flow_matching",
    lora_targets=LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=predict,
    single_file=False,
    trims_text=True,
    default_flow_shift=3.0,  # SimpleTuner's flow_schedule_shift default (Wan sets no other for its T2V flavours)
    refused_precisions=("fp8-quanto",),
    flavours=FLAVOURS,
    default_flavour="t2v-480p-1.3b-2.1",
    video=True,
    temporal_compression=TEMPORAL_COMPRESSION,
    variant=_variant,
    trained_slot=_trained_slot,
    lora_load_arguments=_lora_load_arguments,
    card_note=_card_note,
    snippet_images=_snippet_images,
)
