"""Flux.1: MMDiT transformer over 2x2-packed 16-channel latents, CLIP-L pooled output + T5-XXL sequence.

`prompt_embeds` is T5's last hidden state over the padded sequence (512 tokens by default, as FLUX.1-dev); the
pipeline passes no mask, so the padded positions are kept. `pooled_prompt_embeds` is CLIP's pooler output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.families import sd3, text, tiny_parts
from pipeline.families.base import Component, Family, TextEncoderSpec
from pipeline.families.tokenizers import EOS, clip_tokenizer, t5_tokenizer

CLIP_LENGTH = 77
T5_LENGTH = 512

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
    device: Any = "cpu",
) -> list[dict[str, Any]]:
    """`prompt_embeds` (T5 tokens x T5 dim) and `pooled_prompt_embeds` (CLIP dim), as `FluxPipeline.encode_prompt`.
    `max_length` is the T5 `max_sequence_length`; `t5_padding="zero"` zeroes T5's outputs at padded positions."""
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
    return text.split({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny Flux (dev-like: guidance embeds) diffusers folder; VAE 16 channels, 0.3611 / 0.1159."""
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
        num_single_layers=1,
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
    collate_text=text.collate,
)
