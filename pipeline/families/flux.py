"""Flux.1: MMDiT transformer over 2x2-packed 16-channel latents, CLIP-L pooled output + T5-XXL sequence.

`prompt_embeds` is T5's last hidden state over the padded sequence (512 tokens by default, as FLUX.1-dev); the
pipeline passes no mask, so the padded positions are kept. `pooled_prompt_embeds` is CLIP's pooler output. `st cache`
also stores T5's token mask (`attention_mask`), which `collate_text` leaves out and only
`flux_attention_masked_training` hands to the transformer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputError
from pipeline.families import sd3, text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import EOS, clip_tokenizer, t5_tokenizer

CLIP_LENGTH = 77
T5_LENGTH = 512

# SimpleTuner's `flux_lora_target` presets (peft names: a module's name or a `.`-suffix of it). Note that "to_q",
# "to_k" and "to_v" also match the single-stream blocks' attention, and "proj_out" the final output projection.
# SimpleTuner's lists also name `to_qkv` / `add_qkv_proj`, which exist only after diffusers fuses the projections
# (st never does), so they match nothing and are left out.
_ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
_CONTEXT = ("add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")
_FFS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
LORA_PRESETS = (
    ("mmdit", _ATTENTION),  # SimpleTuner has no branch for it: its default, diffusers' attention targets
    ("context", _CONTEXT),
    ("context+ffs", (*_CONTEXT, "ff_context.net.0.proj", "ff_context.net.2")),
    ("all", sd3.MMDIT_LORA_TARGETS),  # SimpleTuner's default
    ("all+ffs", (*sd3.MMDIT_LORA_TARGETS, *_FFS, "proj_mlp", "proj_out")),
    ("all+ffs+embedder", ("x_embedder", *sd3.MMDIT_LORA_TARGETS, *_FFS, "proj_mlp", "proj_out")),
    (
        "ai-toolkit",
        (*sd3.MMDIT_LORA_TARGETS, *_FFS, "norm.linear", "norm1.linear", "norm1_context.linear", "proj_mlp", "proj_out"),
    ),
    # TheLastBen's small LoRAs: the MLP-and-attention output projection of single-stream blocks 7 and 20.
    ("tiny", ("single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out")),
    ("nano", ("single_transformer_blocks.7.proj_out",)),
)
# SimpleTuner's presets for a LoRA on a Flux ControlNet. With controlnet true and model_type lora, SimpleTuner sets
# flux_lora_target to "controlnet" whatever it was, and trains a LoRA on the FluxControlNetModel's input embedder and
# output blocks: what st's ControlNet adapter trains (pipeline.families.controlnet.FLUX_LORA_TARGETS). Without a
# ControlNet the transformer has none of those layers.
CONTROLNET_PRESETS = ("controlnet", "all+ffs+embedder+controlnet")


def check_lora_target(config: Any, place: str = "") -> None:
    """flux_lora_target's ControlNet presets where they would select the layers of a standard LoRA on the transformer
    itself (exit 2 naming the fix). SimpleTuner's `controlnet` preset on the transformer matches no module (peft
    fails); for `all+ffs+embedder+controlnet` it has no list at all and falls back to its default attention layers
    (st's `mmdit`). Where the preset is unused (a ControlNet run, lycoris, full training, explicit
    peft_lora_target_modules, slider targets) it is accepted, as SimpleTuner ignores it there. `place`: where the
    option was set, for the message (" (in config.json)")."""
    target = config.flux_lora_target
    unused = (config.model_type != "lora" or config.lora_type != "standard" or config.peft_lora_target_modules
              or config.slider_lora_target)  # fmt: skip
    if target not in CONTROLNET_PRESETS or config.model_family not in ("flux", "chroma") or unused:
        return
    if config.model_family == "chroma":
        raise ConfigError(f"flux_lora_target {target!r} is a Flux ControlNet preset, not one of Chroma's LoRA targets "
                          "(SimpleTuner falls back to Chroma's default attention layers for it): remove "
                          f"flux_lora_target or choose all, all+ffs, context, ...{place}")  # fmt: skip
    if config.controlnet:
        return
    layers = "controlnet_x_embedder, controlnet_blocks.*, controlnet_single_blocks.*"
    fallback = "" if target == "controlnet" else (
        "; SimpleTuner has no layer list for this preset outside ControlNet training and falls back to its default "
        "attention layers, which flux_lora_target mmdit names")  # fmt: skip
    raise ConfigError(f"flux_lora_target {target!r} (a SimpleTuner preset) trains a LoRA on a Flux ControlNet's layers "
                      f"({layers}), which exist only with controlnet true (the ControlNet trained beside the frozen "
                      f"transformer){fallback}: set controlnet true, or choose a transformer preset (all, all+ffs, "
                      f"mmdit, ...){place}")  # fmt: skip

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "CLIPTextModel", "transformers"),
        tokenizer=Component("tokenizer", "CLIPTokenizer", "transformers"),
        max_length=CLIP_LENGTH,
        kind="clip",
    ),
    TextEncoderSpec(
        model=Component("text_encoder_2", "T5EncoderModel", "transformers"),
        tokenizer=Component("tokenizer_2", "T5Tokenizer", "transformers"),
        max_length=T5_LENGTH,
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
    attention_mask: bool = False,
    device: Any = "cpu",
) -> list[dict[str, Any]]:
    """`prompt_embeds` (T5 tokens x T5 dim) and `pooled_prompt_embeds` (CLIP dim), as `FluxPipeline.encode_prompt`.
    `max_length` is the T5 `max_sequence_length`; `t5_padding="zero"` zeroes T5's outputs at padded positions.
    `attention_mask`: also T5's token mask (1 real, 0 padding), which `flux_attention_masked_training` reads; `st
    cache` always stores it, as SimpleTuner does."""
    import torch

    text.check_t5_padding(t5_padding)
    prompts = text.check_prompts(prompts)
    clip, t5 = tuple(text_encoders)
    tok_clip, tok_t5 = tuple(tokenizers)
    t5_length = text.check_max_length(max_length, T5_LENGTH)
    with torch.no_grad():
        ids, _ = text.tokenize(tok_clip, prompts, tok_clip.model_max_length, device)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        ids, mask = text.tokenize(tok_t5, prompts, t5_length, device)
        embeds = t5(ids, output_hidden_states=False)[0]
    if t5_padding == "zero":
        embeds = text.zero_padding(embeds, mask)
    stored = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    return text.split({**stored, "attention_mask": mask} if attention_mask else stored)


def collate_text(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch `FluxPipeline` hands its transformer: the items' embeddings without their stored T5 mask (which
    `flux_attention_masked_training` adds back, `pipeline.train.family_options`)."""
    return text.collate([{k: v for k, v in item.items() if k != "attention_mask"} for item in items])


def pack_latents(latents: Any) -> Any:
    """B x C x h x w latents as B x (h/2 * w/2) x 4C tokens of 2x2 patches, as `FluxPipeline._pack_latents`."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Any, height: int, width: int) -> Any:
    """The inverse of `pack_latents` for latents of `height` x `width` (as `FluxPipeline._unpack_latents`)."""
    b, _, channels = tokens.shape
    out = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device: Any, dtype: Any) -> Any:
    """(height * width) x 3 position ids (0, row, column) of packed tokens, as `_prepare_latent_image_ids`."""
    import torch

    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`FluxPipeline`'s denoiser call: packed latents with their image ids, zero text ids, `timestep / 1000`, the
    guidance value(s) when the model embeds guidance (dev; default 1.0, SimpleTuner's `flux_guidance_value`),
    the pooled CLIP output and the T5 sequence; the output is unpacked to B x C x h x w."""
    h, w = even_latent_size(latents)
    tokens = pack_latents(latents)
    out = transformer_call(transformer, tokens, image_ids(h // 2, w // 2, latents.device, latents.dtype), timesteps,
                           text, guidance)  # fmt: skip
    return unpack_latents(out, h, w)


def even_latent_size(latents: Any) -> tuple[int, int]:
    """The latents' height and width; InputError unless both are even (Flux packs 2x2 patches)."""
    h, w = latents.shape[-2:]
    if h % 2 or w % 2:
        raise InputError(f"Flux packs 2x2 latent patches: latent height and width must be even, got {h} x {w}")
    return h, w


def transformer_call(
    transformer: Any, tokens: Any, ids: Any, timesteps: Any, text: dict[str, Any], guidance: Any = None
) -> Any:
    """The Flux transformer on packed image `tokens` with their position `ids`, as the Flux pipelines call it: zero
    text ids, `timestep / 1000` and the guidance value(s) when the model embeds guidance (default 1.0). A text
    `attention_mask` (present only with `flux_attention_masked_training`) goes to every joint attention as
    `joint_attention_mask` builds it."""
    import torch

    b, device, dtype = tokens.shape[0], tokens.device, tokens.dtype
    embeds = text["prompt_embeds"]
    if transformer.config.guidance_embeds:
        scale = torch.as_tensor(1.0 if guidance is None else guidance, dtype=torch.float32, device=device)
        scale = scale.expand(b) if scale.ndim == 0 else scale
    else:
        scale = None
    return transformer(
        hidden_states=tokens,
        timestep=timesteps.to(dtype) / 1000,
        guidance=scale,
        pooled_projections=text["pooled_prompt_embeds"],
        encoder_hidden_states=embeds,
        txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype),
        img_ids=ids,
        joint_attention_kwargs=None if "attention_mask" not in text else {
            "attention_mask": joint_attention_mask(text["attention_mask"], tokens.shape[1], tokens.dtype)},
        return_dict=False,
    )[0]


def joint_attention_mask(text_mask: Any, image_tokens: int, dtype: Any) -> Any:
    """SimpleTuner's `flux_attention_masked_training` mask over the joint sequence (text tokens, then image tokens):
    the T5 token mask followed by ones, as a B x 1 x 1 x S float 0/1 mask. As in SimpleTuner's Flux attention, the
    mask is *added* to the attention scores (scaled dot-product attention adds a float mask), so every query favours
    real text and image keys by +1 over padded text keys rather than excluding the padding outright."""
    import torch

    ones = torch.ones(text_mask.shape[0], image_tokens, device=text_mask.device, dtype=dtype)
    mask = torch.cat([(text_mask > 0).to(dtype), ones], dim=1)
    return mask[:, None, None, :]


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny Flux (dev-like: guidance embeds) diffusers folder; VAE 16 channels, 0.3611 / 0.1159. It has 21
    single-stream blocks so that the "tiny" LoRA preset (blocks 7 and 20) names real modules."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = clip_tokenizer(pad_token=EOS, max_length=CLIP_LENGTH)
    tokenizer_2 = t5_tokenizer(max_length=T5_LENGTH)
    tiny_parts.seed_everything(seed)
    text_encoder = tiny_parts.clip_text(tokenizer)
    tiny_parts.seed_everything(seed + 1)
    text_encoder_2 = tiny_parts.t5_encoder(tokenizer_2)
    tiny_parts.seed_everything(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=1,
        num_single_layers=21,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    tiny_parts.seed_everything(seed + 3)
    vae = tiny_parts.vae(16, 0.3611, 0.1159, quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    tiny_parts.save(pipe, out_dir, clip_tokenizers=("tokenizer",))


# SimpleTuner's Flux flavours (models/flux/model.py HUGGINGFACE_PATHS); its default is "krea".
FLAVOURS = (
    Flavour("dev", "black-forest-labs/flux.1-dev"),
    Flavour("krea", "black-forest-labs/flux.1-krea-dev"),
    Flavour("schnell", "black-forest-labs/flux.1-schnell"),  # LoRAs train over an assistant (pipeline.train.assistant)
    Flavour("kontext", "black-forest-labs/flux.1-kontext-dev"),  # trains as flux_kontext.FAMILY (see `variant`)
    # Both validate with true CFG (pipeline.train.validation.real_cfg); what they train with: `check_flavour`.
    Flavour("fluxbooru", "terminusresearch/fluxbooru-v0.3"),
    Flavour("libreflux", "jimmycarter/LibreFlux-SimpleTuner"),
)  # fmt: skip


def check_flavour(config: Any, family: Family) -> None:
    """Refuse what SimpleTuner would override for fluxbooru (flux_guidance_value 3.5, no attention masking) and
    libreflux (flux_attention_masked_training on). st refuses rather than overrides: model_flavour stays out of the
    train key, so an overridden option would give two different trainings the same key."""
    flavour, masked = config.model_flavour, bool(config.flux_attention_masked_training)
    if flavour == "libreflux" and not masked:
        raise ConfigError("model_flavour libreflux trains with flux_attention_masked_training on (SimpleTuner forces "
                          "it on): set flux_attention_masked_training=true")  # fmt: skip
    if flavour == "fluxbooru" and (masked or float(config.flux_guidance_value) != 3.5):
        raise ConfigError(f"model_flavour fluxbooru trains with flux_guidance_value 3.5 and without attention masking "
                          f"(SimpleTuner forces both), not flux_guidance_value {config.flux_guidance_value} / "
                          f"flux_attention_masked_training {masked}: set flux_guidance_value=3.5 and "
                          f"flux_attention_masked_training=false")  # fmt: skip


def _variant(flavour: str | None, source: str) -> Family:
    """Flux Kontext for its flavour or a Kontext model, else Flux."""
    from pipeline.families import flux_kontext  # it builds on this module

    return flux_kontext.FAMILY if flux_kontext.is_kontext(flavour, source) else FAMILY


FAMILY = Family(
    name="flux",
    pipeline_class="FluxPipeline",
    denoiser=Component("transformer", "FluxTransformer2DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKL", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "FlowMatchEulerDiscreteScheduler", "diffusers"),
    latent_channels=16,
    bucket_alignment=16,
    prediction_type="flow_matching",
    lora_targets=sd3.MMDIT_LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=collate_text,
    predict=predict,
    lora_presets=LORA_PRESETS,
    default_flow_shift=3.0,  # SimpleTuner's flow_schedule_shift default; flow_schedule_auto_shift for Flux's line
    flavours=FLAVOURS,
    default_flavour="krea",
    variant=_variant,
    text_options=lambda _options: {"attention_mask": True},  # the T5 mask, for flux_attention_masked_training
    check_config=check_flavour,
)
