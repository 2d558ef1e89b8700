"""AuraFlow: MMDiT transformer with learnt positional embeddings, a UMT5 (Pile-T5) encoder, SDXL's 4-channel VAE.

The pipeline multiplies UMT5's last hidden state by the attention mask, so padded positions are exactly zero, and
passes no mask to the transformer. `encode_prompts` therefore stores `prompt_embeds` trimmed to the real token count
(with `</s>`) and the full-length `attention_mask`; `collate_text` refills the padded positions with zeros, which is
what the transformer received. SimpleTuner encodes 120 tokens (`tokenizer_max_length`; 768 for the pony flavour),
not the pipeline's default of 256. The transformer takes timesteps on the 0..1 scale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.families import text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import pile_t5_tokenizer

T5_LENGTH = 120  # SimpleTuner's AuraFlow default (models/auraflow/model.py check_user_config)

# SimpleTuner's DEFAULT_LORA_TARGET, less `to_qkv` (it exists only after diffusers fuses the projections, which st
# never does, so it matches nothing).
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "UMT5EncoderModel", "transformers"),
        # Real folders name LlamaTokenizerFast, the same class in transformers 5, which names itself LlamaTokenizer.
        tokenizer=Component("tokenizer", "LlamaTokenizer", "transformers"),
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
    """`prompt_embeds` (real tokens x UMT5 dim) and `attention_mask` (max_length tokens), as
    `AuraFlowPipeline.encode_prompt(max_sequence_length=max_length)`. `t5_padding` changes nothing: the pipeline
    already zeroes padded positions."""
    import torch

    text.check_t5_padding(t5_padding)
    prompts = text.check_prompts(prompts)
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    length = text.check_max_length(max_length, T5_LENGTH)
    ids, mask = text.tokenize(tokenizer, prompts, length, device)
    with torch.no_grad():
        embeds = text.zero_padding(encoder(input_ids=ids, attention_mask=mask)[0], mask)
    keep = [int(n) for n in mask.sum(dim=1)]
    return text.split({"prompt_embeds": embeds, "attention_mask": mask}, keep=keep)


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`AuraFlowPipeline`'s denoiser call: the zero-padded UMT5 sequence (no mask) and timesteps divided by 1000."""
    return transformer(
        latents,
        encoder_hidden_states=text["prompt_embeds"],
        timestep=timesteps.to(latents.dtype) / 1000,
        return_dict=False,
    )[0]


def latent_side_limit(config: Any) -> tuple[int, str]:
    """The transformer picks a centred square from its `pos_embed_max_size` learnt embeddings: sqrt(size) patches a
    side (64 x 2 latent pixels, 1024 px, for AuraFlow v0.1)."""
    size, patch = config["pos_embed_max_size"], config["patch_size"]
    return math.isqrt(size) * patch, f"pos_embed_max_size {size} = {math.isqrt(size)}^2 patches x patch_size {patch}"


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny AuraFlow diffusers folder (flow-matching Euler, shift 1.73; VAE 4 channels, 0.13025)."""
    import torch
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = pile_t5_tokenizer()
    tiny_parts.seed_everything(seed)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                        feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, is_encoder_decoder=False, use_cache=False)  # fmt: skip
    text_encoder = UMT5EncoderModel(config).eval()
    tiny_parts.seed_everything(seed + 1)
    transformer = AuraFlowTransformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=text_encoder.config.d_model,
        caption_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=64 * 64,  # 64 patches x 2 x VAE factor 2: buckets up to 256 px a side
    ).eval()
    # A block's attention reaches its output only through two adaLN gates (the feed-forward's input is normed).
    # Default initialisation makes the gates about 0.1, which would hide what a LoRA on the attention does; scaled
    # up they are about 1, as in a trained model.
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if name.endswith(("norm1.linear", "norm1_context.linear")):
                module.weight.mul_(8.0)
    tiny_parts.seed_everything(seed + 2)
    vae = tiny_parts.vae(4, 0.13025)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.73)
    pipe = AuraFlowPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    tiny_parts.save(pipe, out_dir)


# SimpleTuner's AuraFlow flavours (models/auraflow/model.py HUGGINGFACE_PATHS); its default is "v0.3".
FLAVOURS = (
    Flavour("pony", "purplesmartai/pony-v7-base"),
    Flavour("v0.3", "terminusresearch/auraflow-v0.3"),
    Flavour("v0.2", "fal/AuraFlow-v0.2"),
    Flavour("v0.1", "fal/AuraFlow"),
)

FAMILY = Family(
    name="auraflow",
    pipeline_class="AuraFlowPipeline",
    denoiser=Component("transformer", "AuraFlowTransformer2DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKL", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "FlowMatchEulerDiscreteScheduler", "diffusers"),
    latent_channels=4,
    bucket_alignment=16,
    prediction_type="flow_matching",
    lora_targets=LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=predict,
    single_file=False,
    trims_text=True,
    default_flow_shift=3.0,  # SimpleTuner's flow_schedule_shift default (its AuraFlow example sets 1.73)
    flavours=FLAVOURS,
    default_flavour="v0.3",
    latent_side_limit=latent_side_limit,
)
