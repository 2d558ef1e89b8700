"""Chroma: Flux's transformer without CLIP and guidance embedding, over 2x2-packed 16-channel latents, T5-XXL only.

`ChromaPipeline` runs T5 with the tokenizer's attention mask and hands the transformer a text mask that keeps the
real tokens and the first padding token (`</s>` ... first `<pad>`). The transformer receives that mask as a 0/1
float tensor, which its attention adds to the scores rather than using to exclude positions, so the padded
positions' embeddings still count: `prompt_embeds` is stored over the whole padded sequence (512 tokens, as the
pipeline and SimpleTuner default) with that mask as `attention_mask`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.families import flux, text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import t5_tokenizer

T5_LENGTH = 512  # the pipeline's default and its limit; SimpleTuner's tokenizer_max_length default for Chroma

# SimpleTuner's DEFAULT_LORA_TARGET, less `to_qkv` (it exists only after diffusers fuses the projections, which st
# never does). SimpleTuner reads `flux_lora_target` for Chroma too: Flux's presets, less the adaLN `norm*.linear`
# layers Chroma prunes (its modulation comes from one shared approximator), and its own "tiny" lists of module kinds
# instead of Flux's block numbers.
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
_PRUNED = ("norm.linear", "norm1.linear", "norm1_context.linear")
LORA_PRESETS = (
    *((name, tuple(t for t in targets if t not in _PRUNED))
      for name, targets in flux.LORA_PRESETS if name not in ("mmdit", "tiny", "nano")),
    ("tiny", (*LORA_TARGETS, "ff.net.0.proj")),
    ("tiny+embedder", ("x_embedder", *LORA_TARGETS, "ff.net.0.proj")),
)

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
    """`prompt_embeds` (max_length tokens x T5 dim) and `attention_mask` (real tokens and the first padding token,
    in the embeddings' dtype), as `ChromaPipeline.encode_prompt`; `t5_padding="zero"` multiplies the embeddings by
    that mask, as SimpleTuner does."""
    import torch

    text.check_t5_padding(t5_padding)
    prompts = text.check_prompts(prompts)
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    length = text.check_max_length(max_length, T5_LENGTH, limit=T5_LENGTH, what="Chroma T5")
    ids, token_mask = text.tokenize(tokenizer, prompts, length, device)
    with torch.no_grad():
        embeds = encoder(ids, output_hidden_states=False, attention_mask=token_mask)[0]
    positions = torch.arange(length, device=token_mask.device).unsqueeze(0)
    mask = (positions <= token_mask.sum(dim=1, keepdim=True)).to(embeds.dtype)
    if t5_padding == "zero":
        embeds = embeds * mask.unsqueeze(-1)
    return text.split({"prompt_embeds": embeds, "attention_mask": mask})


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`ChromaPipeline`'s denoiser call: packed latents with their image ids, zero text ids, `timestep / 1000`, the
    T5 sequence and its mask extended with ones over the image tokens; the output is unpacked to B x C x h x w."""
    import torch

    b, _, h, w = latents.shape
    if h % 2 or w % 2:
        raise InputError(f"Chroma packs 2x2 latent patches: latent height and width must be even, got {h} x {w}")
    embeds, mask = text["prompt_embeds"], text["attention_mask"]
    image_tokens = (h // 2) * (w // 2)
    mask = torch.cat([mask, torch.ones(b, image_tokens, device=mask.device, dtype=torch.bool)], dim=1)
    out = transformer(
        hidden_states=flux.pack_latents(latents),
        timestep=timesteps.to(latents.dtype) / 1000,
        encoder_hidden_states=embeds,
        txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype),
        img_ids=flux.image_ids(h // 2, w // 2, latents.device, latents.dtype),
        attention_mask=mask,
        return_dict=False,
    )[0]
    return flux.unpack_latents(out, h, w)


def training_sigmas(sigmas: Any) -> Any:
    """SimpleTuner's Chroma schedule over the shifted logit-normal sigmas: squared below 0.5, mirrored above
    (`1 - (1 - sigma)^2`), which moves samples away from the middle towards both ends."""
    import torch

    return torch.where(sigmas < 0.5, sigmas.square(), 1 - (1 - sigmas).square())


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny Chroma diffusers folder (Flux's scheduler and 16-channel VAE, 0.3611 / 0.1159)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer = t5_tokenizer(max_length=T5_LENGTH)
    tiny_parts.seed_everything(seed)
    text_encoder = tiny_parts.t5_encoder(tokenizer)
    tiny_parts.seed_everything(seed + 1)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder.config.d_model,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()
    tiny_parts.seed_everything(seed + 2)
    vae = tiny_parts.vae(16, 0.3611, 0.1159, quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = ChromaPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    tiny_parts.save(pipe, out_dir)


# SimpleTuner's Chroma flavours (models/chroma/model.py HUGGINGFACE_PATHS); its default is "base".
FLAVOURS = (
    Flavour("base", "lodestones/Chroma1-Base"),
    Flavour("hd", "lodestones/Chroma1-HD"),
    Flavour("flash", "lodestones/Chroma1-Flash"),
)

FAMILY = Family(
    name="chroma",
    pipeline_class="ChromaPipeline",
    denoiser=Component("transformer", "ChromaTransformer2DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKL", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "FlowMatchEulerDiscreteScheduler", "diffusers"),
    latent_channels=16,
    bucket_alignment=64,  # SimpleTuner overrides aspect_bucket_alignment to 64 for Chroma
    prediction_type="flow_matching",
    lora_targets=LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=predict,
    lora_presets=LORA_PRESETS,
    default_flow_shift=3.0,  # SimpleTuner's flow_schedule_shift default
    flavours=FLAVOURS,
    default_flavour="base",
    sigma_curve=training_sigmas,
)
