"""PixArt-Sigma: DiT transformer with cross-attention to a masked T5-XXL sequence, SDXL's 4-channel VAE.

The pipeline lower-cases and strips prompts, encodes them with the attention mask over 300 tokens and passes the
mask to the transformer, whose cross-attention ignores padded positions. So `encode_prompts` stores
`prompt_embeds` trimmed to the real token count (with `</s>`) and the full-length `attention_mask`; padded
positions are masked and `collate_text` refills them with zeros: the denoiser's output is the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.families import sd1x, text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import t5_tokenizer

T5_LENGTH = 300

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "T5EncoderModel", "transformers"),
        tokenizer=Component("tokenizer", "T5Tokenizer", "transformers"),
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
    """`prompt_embeds` (real tokens x T5 dim) and `attention_mask` (max_length tokens), as
    `PixArtSigmaPipeline.encode_prompt` without caption cleaning. `max_length` is the `max_sequence_length`.
    `t5_padding` changes nothing: padded positions are dropped here and zero-filled by `collate_text`."""
    import torch

    text.check_t5_padding(t5_padding)
    prompts = [p.lower().strip() for p in text.check_prompts(prompts)]
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    length = text.check_max_length(max_length, T5_LENGTH)
    ids, mask = text.tokenize(tokenizer, prompts, length, device)
    with torch.no_grad():
        embeds = encoder(ids, attention_mask=mask)[0]
    keep = [int(n) for n in mask.sum(dim=1)]
    return text.split({"prompt_embeds": embeds, "attention_mask": mask}, keep=keep)


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`PixArtSigmaPipeline`'s denoiser call: the masked T5 sequence, no resolution / aspect-ratio conditions; with
    learned sigma (twice the latent channels out) only the first half, the noise prediction, is kept."""
    out = transformer(
        latents,
        encoder_hidden_states=text["prompt_embeds"],
        encoder_attention_mask=text["attention_mask"],
        timestep=timesteps,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]
    if transformer.config.out_channels // 2 == latents.shape[1]:
        out = out.chunk(2, dim=1)[0]
    return out


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny PixArt-Sigma diffusers folder (DPM-Solver++; VAE 0.13025 with the real 8x factor, so the
    pipeline's 256-pixel aspect-ratio bins match the transformer's sample size of 32 latents)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = t5_tokenizer()
    tiny_parts.seed_everything(seed)
    text_encoder = tiny_parts.t5_encoder(tokenizer)
    tiny_parts.seed_everything(seed + 1)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,  # learned sigma: the pipeline keeps the first 4 channels
        num_layers=1,
        cross_attention_dim=32,
        sample_size=32,
        patch_size=2,
        caption_channels=text_encoder.config.d_model,
        use_additional_conditions=False,
    ).eval()
    tiny_parts.seed_everything(seed + 2)
    vae = tiny_parts.vae(4, 0.13025, block_out_channels=(16, 32, 32, 32))
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    tiny_parts.save(pipe, out_dir)


# SimpleTuner's PixArt Sigma flavours (models/pixart/model.py HUGGINGFACE_PATHS); its default is
# "900M-1024-v0.6". The v0.7 stage models are eDiffi-style stage experts that SimpleTuner trains with refiner_training.
_STAGE_TRAINING = "refiner_training (the eDiffi stage experts)"
FLAVOURS = (
    Flavour("900M-1024-v0.6", "terminusresearch/pixart-900m-1024-ft-v0.6"),
    Flavour("900M-1024-v0.7-stage1", "terminusresearch/pixart-900m-1024-ft-v0.7-stage1", needs=_STAGE_TRAINING),
    Flavour("900M-1024-v0.7-stage2", "terminusresearch/pixart-900m-1024-ft-v0.7-stage2", needs=_STAGE_TRAINING),
    Flavour("600M-512", "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"),
    Flavour("600M-1024", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"),
    Flavour("600M-2048", "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS"),
)

FAMILY = Family(
    name="pixart_sigma",
    pipeline_class="PixArtSigmaPipeline",
    denoiser=Component("transformer", "PixArtTransformer2DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKL", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "DPMSolverMultistepScheduler", "diffusers"),
    latent_channels=4,
    bucket_alignment=16,
    prediction_type="epsilon",
    lora_targets=sd1x.UNET_LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    single_file=False,
    trims_text=True,
    predict=predict,
    lora_loader=False,  # PixArtSigmaPipeline has no load_lora_weights: LoRAs load through peft
    flavours=FLAVOURS,
    default_flavour="900M-1024-v0.6",
)
