"""Lumina-Image 2.0: a single-stream DiT over Gemma2's penultimate hidden states, Flux's 16-channel VAE with shift.

Every prompt is encoded as the pipeline does: its system prompt, " <Prompt Start> ", then the prompt, over 256
tokens, with the attention mask. The transformer keeps only the first `mask.sum()` caption positions, so with the
tokenizer padding on the right `encode_prompts` stores `prompt_embeds` trimmed to the real token count and
`collate_text` refills the rest with zeros. Lumina counts time the other way (t = 1 is the image) and predicts the
reversed velocity: `predict` passes 1 - t / 1000 and negates the output, as the pipeline's denoising loop does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.families import text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import gemma_tokenizer

GEMMA_LENGTH = 256  # Lumina2Pipeline's max_sequence_length
SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the superior degree of image-text "
                 "alignment based on textual prompts or user prompts.")  # fmt: skip
# SimpleTuner's DEFAULT_LORA_TARGET, less `to_qkv` (it exists only after fusing the projections, which st never does).
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "Gemma2Model", "transformers"),
        tokenizer=Component("tokenizer", "GemmaTokenizer", "transformers"),
        max_length=GEMMA_LENGTH,
        kind="gemma",
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
    """`prompt_embeds` (real tokens x Gemma2 dim) and `attention_mask` (max_length tokens), as
    `Lumina2Pipeline.encode_prompt` with its default system prompt. `t5_padding` does not apply (no T5)."""
    import torch

    text.check_t5_padding(t5_padding)
    prompts = [f"{SYSTEM_PROMPT} <Prompt Start> {p}" for p in text.check_prompts(prompts)]
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    length = text.check_max_length(max_length, GEMMA_LENGTH)
    ids, mask = text.tokenize(tokenizer, prompts, length, device)
    with torch.no_grad():
        embeds = encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    # The transformer reads the first mask.sum() positions: trimming to them is lossless only for right padding.
    keep = [int(n) for n in mask.sum(dim=1)] if tokenizer.padding_side == "right" else None
    return text.split({"prompt_embeds": embeds, "attention_mask": mask}, keep=keep)


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`Lumina2Pipeline`'s denoiser call: reversed time 1 - t / 1000, the masked Gemma2 sequence, output negated."""
    out = transformer(
        hidden_states=latents,
        timestep=1 - timesteps.to(latents.dtype) / 1000,
        encoder_hidden_states=text["prompt_embeds"],
        encoder_attention_mask=text["attention_mask"],
        return_dict=False,
    )[0]
    return -out


def latent_side_limit(config: Any) -> tuple[int, str]:
    """RoPE tables cover `axes_lens` positions: rows and columns of patches (512 x 2 latent pixels for Lumina 2)."""
    rows, cols = config["axes_lens"][1:3]
    patch = config["patch_size"]
    return min(rows, cols) * patch, f"axes_lens {min(rows, cols)} x patch_size {patch}"


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny Lumina 2 diffusers folder (flow-matching Euler, shift 6; VAE 16 channels, 0.3611 / 0.1159 with
    the real 8x factor, which the pipeline assumes)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = gemma_tokenizer(padding_side="right")
    tiny_parts.seed_everything(seed)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                          sliding_window=512, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    text_encoder = Gemma2Model(config).eval()
    tiny_parts.seed_everything(seed + 1)
    transformer = Lumina2Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        hidden_size=32,
        num_layers=1,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        cap_feat_dim=text_encoder.config.hidden_size,
    ).eval()
    tiny_parts.seed_everything(seed + 2)
    vae = tiny_parts.vae(16, 0.3611, 0.1159, block_out_channels=(16, 32, 32, 32), quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=6.0)
    pipe = Lumina2Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
    )
    tiny_parts.save(pipe, out_dir)


# SimpleTuner's Lumina2 flavours (models/lumina2/model.py HUGGINGFACE_PATHS); its default is "2.0".
FLAVOURS = (
    Flavour("2.0", "Alpha-VLLM/Lumina-Image-2.0"),
    Flavour("neta-lumina", "terminusresearch/neta-lumina-v1"),
)

FAMILY = Family(
    name="lumina2",
    pipeline_class="Lumina2Pipeline",
    denoiser=Component("transformer", "Lumina2Transformer2DModel", "diffusers"),
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
    single_file=False,
    trims_text=True,
    default_flow_shift=3.0,  # SimpleTuner's flow_schedule_shift default; its examples use flow_schedule_auto_shift
    flavours=FLAVOURS,
    default_flavour="2.0",
    latent_side_limit=latent_side_limit,
)
