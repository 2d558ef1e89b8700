"""Stable Diffusion 1.x: UNet, 4-channel VAE, one CLIP ViT-L text encoder (last hidden state), epsilon prediction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.families import text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import EOS, clip_tokenizer

CLIP_LENGTH = 77
UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "CLIPTextModel", "transformers"),
        tokenizer=Component("tokenizer", "CLIPTokenizer", "transformers"),
        max_length=CLIP_LENGTH,
        kind="clip",
    ),
)


def tokenize_clip(tokenizers: Any, prompts: list[str], *, max_length: int | None = None, device: Any = "cpu",
                  limits: Sequence[int] = ()) -> dict[str, Any]:
    """Token ids and attention mask of each tokenizer (`token_ids_<i>`, `token_mask_<i>`), padded and truncated as
    the pipelines tokenize; `limits[i]` is encoder i's position limit (for `tokenizer_max_length` checks)."""
    prompts = text.check_prompts(prompts)
    tokens = {}
    for i, tokenizer in enumerate(tokenizers):
        limit = limits[i] if i < len(limits) else None
        length = text.check_max_length(max_length, tokenizer.model_max_length, limit, "CLIP")
        tokens[f"token_ids_{i}"], tokens[f"token_mask_{i}"] = text.tokenize(tokenizer, prompts, length, device)
    return tokens


def position_limits(text_encoders: Any) -> list[int]:
    return [int(encoder.config.max_position_embeddings) for encoder in text_encoders]


def embed_clip_last(text_encoders: Any, tokens: dict[str, Any]) -> dict[str, Any]:
    """`prompt_embeds`: the CLIP encoder's last hidden state (after its final layer norm) over the padded token ids,
    as `StableDiffusionPipeline.encode_prompt`. Gradients flow (text-encoder training calls it too)."""
    (encoder,) = tuple(text_encoders)
    use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
    mask = tokens["token_mask_0"] if use_mask else None
    return {"prompt_embeds": encoder(tokens["token_ids_0"], attention_mask=mask)[0]}


def encode_clip_last(
    text_encoders: Any,
    tokenizers: Any,
    prompts: list[str],
    *,
    max_length: int | None = None,
    t5_padding: str = "unmodified",
    device: Any = "cpu",
) -> list[dict[str, Any]]:
    """`prompt_embeds` (77 x dim) of each prompt (`embed_clip_last` of `tokenize_clip`). `t5_padding` does not
    apply."""
    import torch

    text.check_t5_padding(t5_padding)
    tokens = tokenize_clip(tokenizers, prompts, max_length=max_length, device=device,
                           limits=position_limits(text_encoders))  # fmt: skip
    with torch.no_grad():
        return text.split(embed_clip_last(text_encoders, tokens))


def predict_unet(
    unet: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`StableDiffusionPipeline`'s denoiser call: `unet(latents, t, encoder_hidden_states=prompt_embeds)`."""
    return unet(latents, timesteps, encoder_hidden_states=text["prompt_embeds"], return_dict=False)[0]


def unet(cross_attention_dim: int, **extra: Any) -> Any:
    """A tiny `UNet2DConditionModel`: channels (32, 64), one layer per block, cross-attention at the lower level."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
        **extra,
    ).eval()


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny SD 1.x diffusers folder (PNDM scheduler, scaling factor 0.18215)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = clip_tokenizer(pad_token=EOS, max_length=CLIP_LENGTH)
    tiny_parts.seed_everything(seed)
    text_encoder = tiny_parts.clip_text(tokenizer)
    tiny_parts.seed_everything(seed + 1)
    denoiser = unet(cross_attention_dim=32)
    tiny_parts.seed_everything(seed + 2)
    vae = tiny_parts.vae(4, 0.18215)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=denoiser,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tiny_parts.save(pipe, out_dir, clip_tokenizers=("tokenizer",))


# SimpleTuner's SD 1.x flavours (models/sd1x/model.py HUGGINGFACE_PATHS); its default is "dreamshaper". Its
# "realvis" names an SDXL model, which an SD 1.x run cannot load.
FLAVOURS = (
    Flavour("1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    Flavour("1.4", "CompVis/stable-diffusion-v1-4"),
    Flavour("dreamshaper", "Lykon/dreamshaper-8"),
    Flavour("realvis", "SG161222/RealVisXL_V5.0", needs="model_family sdxl (it is an SDXL model)"),
)

FAMILY = Family(
    name="sd1x",
    pipeline_class="StableDiffusionPipeline",
    denoiser=Component("unet", "UNet2DConditionModel", "diffusers"),
    vae=Component("vae", "AutoencoderKL", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "PNDMScheduler", "diffusers"),
    latent_channels=4,
    bucket_alignment=64,
    prediction_type="epsilon",
    lora_targets=UNET_LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_clip_last,
    collate_text=text.collate,
    predict=predict_unet,
    flavours=FLAVOURS,
    default_flavour="dreamshaper",
    control_input="pixels",
)
