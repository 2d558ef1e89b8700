"""Stable Diffusion 3: MMDiT transformer, 16-channel VAE with shift, CLIP-L + CLIP-G (both projected) + T5-XXL.

`prompt_embeds` is the pipeline's joint sequence: the penultimate hidden states of CLIP-L and CLIP-G concatenated
on the feature axis and zero-padded to T5's width (77 tokens), followed by T5's last hidden state over the padded
T5 sequence (256 tokens by default). The transformer attends to every position unmasked, so nothing is trimmed.
`pooled_prompt_embeds` concatenates the two CLIP projections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.families import text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import EOS, clip_tokenizer, t5_tokenizer

CLIP_LENGTH = 77
T5_LENGTH = 256
MMDIT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")
# SimpleTuner's SD3 default (DEFAULT_LORA_TARGET): the image stream's attention only, not the context stream's.
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "CLIPTextModelWithProjection", "transformers"),
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
    TextEncoderSpec(
        model=Component("text_encoder_3", "T5EncoderModel", "transformers"),
        tokenizer=Component("tokenizer_3", "T5Tokenizer", "transformers"),
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
    device: Any = "cpu",
) -> list[dict[str, Any]]:
    """`prompt_embeds` (77 + T5 tokens x T5 dim) and `pooled_prompt_embeds`, as
    `StableDiffusion3Pipeline.encode_prompt` without clip_skip. `max_length` is the T5 `max_sequence_length`;
    `t5_padding="zero"` zeroes T5's outputs at padded positions (the pipeline leaves them)."""
    import torch
    import torch.nn.functional as F

    text.check_t5_padding(t5_padding)
    prompts = text.check_prompts(prompts)
    clip_l, clip_g, t5 = tuple(text_encoders)
    tok_l, tok_g, tok_t5 = tuple(tokenizers)
    clip_length = tok_l.model_max_length  # the pipeline pads both CLIP inputs to the first tokenizer's length
    t5_length = text.check_max_length(max_length, T5_LENGTH)
    hidden, pooled = [], []
    with torch.no_grad():
        for encoder, tokenizer in ((clip_l, tok_l), (clip_g, tok_g)):
            ids, _ = text.tokenize(tokenizer, prompts, clip_length, device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        ids, mask = text.tokenize(tok_t5, prompts, t5_length, device)
        t5_embeds = t5(ids)[0]
    if t5_padding == "zero":
        t5_embeds = text.zero_padding(t5_embeds, mask)
    clip_embeds = torch.cat(hidden, dim=-1)
    clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
    return text.split(
        {
            "prompt_embeds": torch.cat([clip_embeds, t5_embeds], dim=-2),
            "pooled_prompt_embeds": torch.cat(pooled, dim=-1),
        }
    )


def zeroed_uncond(item: dict[str, Any], clip: bool, t5: bool) -> dict[str, Any]:
    """A caption-dropped sample's text under SimpleTuner's `sd3_*_uncond_behaviour` "zero": the CLIP part (the
    first 77 tokens of the joint sequence and the pooled projections) and/or the T5 part (the tokens after them)
    set to zeros, the rest kept from `item` (the empty caption's embeddings). A new dict; `item` is not changed."""
    embeds, pooled = item["prompt_embeds"].clone(), item["pooled_prompt_embeds"]
    if clip:
        embeds[:CLIP_LENGTH] = 0
        pooled = pooled.new_zeros(pooled.shape)
    if t5:
        embeds[CLIP_LENGTH:] = 0
    return {**item, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`StableDiffusion3Pipeline`'s denoiser call: latents, timesteps on the 0..1000 scale (sigma * 1000), the
    joint prompt sequence and the pooled CLIP projections."""
    return transformer(
        hidden_states=latents,
        timestep=timesteps,
        encoder_hidden_states=text["prompt_embeds"],
        pooled_projections=text["pooled_prompt_embeds"],
        return_dict=False,
    )[0]


def latent_side_limit(config: Any) -> tuple[int, str]:
    """The transformer crops its `pos_embed_max_size` grid of patches: 192 x 2 latent pixels (3072 px) for SD3."""
    size, patch = config["pos_embed_max_size"], config["patch_size"]
    return size * patch, f"pos_embed_max_size {size} x patch_size {patch}"


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny SD3 diffusers folder (flow-matching Euler, shift 3; VAE 16 channels, 1.5305 / 0.0609)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = clip_tokenizer(pad_token=EOS, max_length=CLIP_LENGTH)
    tokenizer_2 = clip_tokenizer(pad_token="!", max_length=CLIP_LENGTH)
    tokenizer_3 = t5_tokenizer()
    tiny_parts.seed_everything(seed)
    text_encoder = tiny_parts.clip_text(tokenizer, projection=True)
    tiny_parts.seed_everything(seed + 1)
    text_encoder_2 = tiny_parts.clip_text(tokenizer_2, projection=True, hidden_act="gelu")
    tiny_parts.seed_everything(seed + 2)
    # T5 is wider than the two CLIPs together, as in the real model (4096 > 768 + 1280).
    text_encoder_3 = tiny_parts.t5_encoder(tokenizer_3, d_model=64)
    tiny_parts.seed_everything(seed + 3)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=text_encoder_3.config.d_model,
        caption_projection_dim=32,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        out_channels=16,
        pos_embed_max_size=96,  # 96 patches x 2 x VAE factor 2: buckets up to 384 px a side
    ).eval()
    tiny_parts.seed_everything(seed + 4)
    vae = tiny_parts.vae(16, 1.5305, 0.0609, quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    tiny_parts.save(pipe, out_dir, clip_tokenizers=("tokenizer", "tokenizer_2"))


# SimpleTuner's SD3 flavours (models/sd3/model.py HUGGINGFACE_PATHS); its default is "medium".
FLAVOURS = (
    Flavour("medium", "stabilityai/stable-diffusion-3.5-medium"),
    Flavour("large", "stabilityai/stable-diffusion-3.5-large"),
)

FAMILY = Family(
    name="sd3",
    pipeline_class="StableDiffusion3Pipeline",
    denoiser=Component("transformer", "SD3Transformer2DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKL", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "FlowMatchEulerDiscreteScheduler", "diffusers"),
    latent_channels=16,
    bucket_alignment=16,
    prediction_type="flow_matching",
    lora_targets=LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=predict,
    default_flow_shift=3.0,  # the shift of SD3's FlowMatchEulerDiscreteScheduler config
    flavours=FLAVOURS,
    default_flavour="medium",
    latent_side_limit=latent_side_limit,
)
