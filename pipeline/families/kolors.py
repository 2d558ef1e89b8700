"""Kolors: SDXL's UNet (text-time conditioning, SDXL VAE) reading a ChatGLM3 text encoder through the UNet's
`encoder_hid_proj`; epsilon prediction.

`KolorsPipeline.encode_prompt` tokenizes with ChatGLM's tokenizer (padded on the left to 256 tokens, with the
`[gMASK]` `sop` prefix), runs ChatGLM with the mask and position ids, and hands the UNet the penultimate hidden states
(all 256 positions, unmasked) as `prompt_embeds` and the last layer's final position as `pooled_prompt_embeds`. The
UNet call and its size / crop conditioning are SDXL's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipeline.families import sd1x, sdxl, text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import chatglm_tokenizer

SEQUENCE_LENGTH = 256
_KOLORS = "diffusers.pipelines.kolors"

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "ChatGLMModel", _KOLORS),
        tokenizer=Component("tokenizer", "ChatGLMTokenizer", _KOLORS),
        max_length=SEQUENCE_LENGTH,
        kind="chatglm",
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
    """`prompt_embeds` (max_length x ChatGLM width) and `pooled_prompt_embeds` (ChatGLM width), as
    `KolorsPipeline.encode_prompt`; `max_length` is its `max_sequence_length` (256). `t5_padding` does not apply."""
    import torch

    text.check_t5_padding(t5_padding)
    prompts = text.check_prompts(prompts)
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    length = text.check_max_length(max_length, SEQUENCE_LENGTH, encoder.config.seq_length, "ChatGLM")
    inputs = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    inputs = inputs.to(device)
    with torch.no_grad():
        out = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      position_ids=inputs["position_ids"], output_hidden_states=True)  # fmt: skip
    # ChatGLM's hidden states are sequence-first: [length, batch, width]
    embeds = out.hidden_states[-2].permute(1, 0, 2)
    pooled = out.hidden_states[-1][-1, :, :]
    return text.split({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})


def chatglm_encoder(tokenizer: Any, hidden: int = 32) -> Any:
    """A tiny `ChatGLMModel` (ChatGLM3's layout: RMSNorm, multi-query attention, SwiGLU) over `tokenizer`'s ids."""
    import torch
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    config = ChatGLMConfig(
        num_layers=2,
        padded_vocab_size=-(-tokenizer.tokenizer.n_words // 64) * 64,
        hidden_size=hidden,
        ffn_hidden_size=hidden * 2,
        kv_channels=hidden // 2,
        num_attention_heads=2,
        seq_length=SEQUENCE_LENGTH,
        multi_query_attention=True,
        multi_query_group_num=1,
        add_qkv_bias=True,
        original_rope=True,
    )
    model = ChatGLMModel(config).eval()
    # ChatGLMModel leaves its weights uninitialised (torch.empty); fill them as a trained model's scale suggests.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.02)
            else:
                param.normal_(0.0, 0.2)
    return model


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny Kolors diffusers folder (Euler over Kolors' 1100-step scaled-linear schedule, SDXL VAE 0.13025,
    UNet projecting ChatGLM's width to its cross-attention width)."""
    from diffusers import EulerDiscreteScheduler, KolorsPipeline

    with tempfile.TemporaryDirectory() as work:
        tokenizer = chatglm_tokenizer(work)
        tiny_parts.seed_everything(seed)
        text_encoder = chatglm_encoder(tokenizer)
        tiny_parts.seed_everything(seed + 1)
        time_dim, width = 8, text_encoder.config.hidden_size
        denoiser = sd1x.unet(
            cross_attention_dim=64,
            encoder_hid_dim=width,
            encoder_hid_dim_type="text_proj",
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + width,
        )
        tiny_parts.seed_everything(seed + 2)
        vae = tiny_parts.vae(4, 0.13025)
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1100,
            beta_start=0.00085,
            beta_end=0.014,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        )
        pipe = KolorsPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=denoiser,
                              scheduler=scheduler, force_zeros_for_empty_prompt=False)  # fmt: skip
        tiny_parts.save(pipe, out_dir)


# SimpleTuner's Kolors flavours (models/kolors/model.py HUGGINGFACE_PATHS); its default is "1.0".
FLAVOURS = (Flavour("1.0", "terminusresearch/kwai-kolors-1.0"),)

FAMILY = Family(
    name="kolors",
    pipeline_class="KolorsPipeline",
    denoiser=Component("unet", "UNet2DConditionModel", "diffusers"),
    vae=Component("vae", "AutoencoderKL", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "EulerDiscreteScheduler", "diffusers"),
    latent_channels=4,
    bucket_alignment=64,
    prediction_type="epsilon",
    lora_targets=sd1x.UNET_LORA_TARGETS,  # SimpleTuner's DEFAULT_LORA_TARGET: to_k, to_q, to_v, to_out.0
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=sdxl.predict,  # KolorsPipeline calls its UNet as SDXL's: pooled embeds + size / crop time ids
    single_file=False,
    flavours=FLAVOURS,
    default_flavour="1.0",
    control_input="pixels",
)
