"""Z-Image: a single-stream DiT over Qwen3's penultimate hidden states, Flux's 16-channel VAE with shift.

Text: `ZImagePipeline.encode_prompt` wraps each prompt in the tokenizer's chat template (one user message, generation
prompt, thinking enabled), pads to 512 tokens, runs Qwen3 with the attention mask and keeps the second-to-last hidden
state of the real tokens only, one variable-length tensor per prompt. `encode_prompts` stores exactly that with a mask
of ones; `text.collate` pads a batch with zeros and mask 0 and `predict` cuts every sample back to its real tokens.

Denoiser: the transformer takes lists (one B-less C x 1 x h x w latent and one caption tensor per sample), counts
time the other way (t = 1 is the image) and predicts the reversed velocity: `predict` passes (1000 - t) / 1000 and
negates the stacked output, as the pipeline's denoising loop does.

Flavour ostris-de-turbo (`DE_TURBO`): SimpleTuner's TRANSFORMER_PATH_OVERRIDES: Z-Image-Turbo's pipeline
(TONGYI-MAI/Z-Image-Turbo: VAE, Qwen3, scheduler) around ostris' de-distilled transformer, which it loads with
`ZImageTransformer2DModel.from_pretrained("ostris/Z-Image-De-Turbo", subfolder=pretrained_transformer_subfolder)`
when pretrained_transformer_model_name_or_path is unset (`Family.default_denoiser`; st reads it the way it reads that
option: a hub id through the hub cache, HF_HUB_OFFLINE honoured, or a folder set in the option instead). It forces no
other setting and trains without an assistant LoRA (not one of SimpleTuner's ASSISTANT_LORA_FLAVOURS).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.families import text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import qwen_tokenizer

MAX_LENGTH = 512  # ZImagePipeline's max_sequence_length
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # SimpleTuner's DEFAULT_LORA_TARGET (Z-Image keeps the default)
# Qwen3's chat template for what the pipeline renders (user turns, a generation prompt, `enable_thinking`); the real
# tokenizer carries its own, which `encode_prompts` uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "Qwen3Model", "transformers"),
        tokenizer=Component("tokenizer", "Qwen2Tokenizer", "transformers"),
        max_length=MAX_LENGTH,
        kind="qwen3",
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
    """Per prompt, `prompt_embeds` (its real tokens x Qwen3 dim, penultimate layer) and `attention_mask` (ones), as
    `ZImagePipeline.encode_prompt`. `max_length` is the `max_sequence_length`; `t5_padding` does not apply."""
    import torch

    text.check_t5_padding(t5_padding)
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    length = text.check_max_length(max_length, MAX_LENGTH)
    ids, mask = text.tokenize(tokenizer, text.chat_turns(tokenizer, prompts, enable_thinking=True), length, device)
    with torch.no_grad():
        hidden = encoder(input_ids=ids, attention_mask=mask.bool(), output_hidden_states=True).hidden_states[-2]
    items = []
    for row, keep in zip(hidden, mask.bool(), strict=True):
        embeds = row[keep].detach().clone()
        items.append({"prompt_embeds": embeds, "attention_mask": torch.ones(embeds.shape[0], dtype=torch.long)})
    return items


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`ZImagePipeline`'s denoiser call: per-sample lists of C x 1 x h x w latents and real-token captions, reversed
    time (1000 - t) / 1000, the stacked output negated (B x C x h x w)."""
    import torch

    captions = [embeds[mask.bool()] for embeds, mask in zip(text["prompt_embeds"], text["attention_mask"], strict=True)]
    out = transformer(
        list(latents.unsqueeze(2).unbind(dim=0)), (1000 - timesteps.to(latents.dtype)) / 1000, captions,
        return_dict=False,
    )[0]  # fmt: skip
    return -torch.stack(out, dim=0).squeeze(2)


def tokenizer() -> Any:
    """The tiny Qwen2 tokenizer with Qwen3's chat template (what Z-Image ships as its tokenizer)."""
    qwen = qwen_tokenizer()
    qwen.chat_template = CHAT_TEMPLATE
    return qwen


def text_encoder(tokenizer: Any, hidden: int = 32) -> Any:
    """A tiny `Qwen3Model` (3 layers, grouped-query attention, q/k norms) whose ids match `tokenizer`."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )  # fmt: skip
    return Qwen3Model(config).eval()


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny Z-Image diffusers folder: one main and one refiner block per stream, Flux's VAE factors
    (0.3611 / 0.1159) with the real 8x reduction the pipeline assumes, Z-Image's scheduler (static shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    words = tokenizer()
    tiny_parts.seed_everything(seed)
    encoder = text_encoder(words)
    tiny_parts.seed_everything(seed + 1)
    transformer = ZImageTransformer2DModel(
        in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
        cap_feat_dim=encoder.config.hidden_size, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64],
    ).eval()  # fmt: skip
    tiny_parts.seed_everything(seed + 2)
    vae = tiny_parts.vae(16, 0.3611, 0.1159, block_out_channels=(16, 32, 32, 32), quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=words, transformer=transformer)
    tiny_parts.save(pipe, out_dir)


def latent_side_limit(config: Any) -> tuple[int, str]:
    """RoPE tables cover `axes_lens` positions: rows and columns of patches (512 x 2 latent pixels for Z-Image)."""
    rows, cols = config["axes_lens"][1:3]
    patch = config["all_patch_size"][0]
    return min(rows, cols) * patch, f"axes_lens {min(rows, cols)} x patch_size {patch}"


# SimpleTuner's Z-Image flavours (models/z_image/model.py HUGGINGFACE_PATHS). Its default, "turbo-ostris-v2", trains a
# LoRA on top of ostris' turbo training adapter (v1 for "turbo"): the assistant LoRA of pipeline.train.assistant.
FLAVOURS = (
    Flavour("base", "TONGYI-MAI/Z-Image"),
    Flavour("turbo", "TONGYI-MAI/Z-Image-Turbo"),
    Flavour("turbo-ostris-v2", "TONGYI-MAI/Z-Image-Turbo"),
    Flavour("ostris-de-turbo", "TONGYI-MAI/Z-Image-Turbo"),  # with DE_TURBO_TRANSFORMER (`variant`)
)  # fmt: skip
DE_TURBO = "ostris-de-turbo"
DE_TURBO_TRANSFORMER = "ostris/Z-Image-De-Turbo"  # SimpleTuner's TRANSFORMER_PATH_OVERRIDES["ostris-de-turbo"]


def variant(flavour: str | None, source: str) -> Family:
    """Z-Image with ostris' de-turbo transformer as the default denoiser for flavour ostris-de-turbo; else Z-Image."""
    return DE_TURBO_FAMILY if flavour == DE_TURBO else FAMILY


def card_note(family: Family, train: dict[str, Any], denoiser_config: Any) -> str | None:
    """The model card's note when the trained transformer came from elsewhere than the rest of the pipeline (the
    ostris-de-turbo flavour, or pretrained_transformer_model_name_or_path): where each part is loaded from."""
    model = train.get("model", {})
    denoiser, vae = model.get("denoiser") or {}, model.get("vae") or {}
    if not denoiser.get("source") or not vae.get("source") or denoiser["source"] == vae["source"]:
        return None

    def name(source: str) -> str:  # as the card names a base model: a hub id as it is, a local path by its name
        return Path(source).name if Path(source).is_absolute() or Path(source).exists() else source

    subfolder = f", subfolder={denoiser['subfolder']!r}" if denoiser.get("subfolder") else ""
    return (f"Its transformer is `{name(denoiser['source'])}`'s and the rest of the pipeline "
            f"`{name(vae['source'])}`'s: load the pipeline from the latter with "
            f"`transformer=ZImageTransformer2DModel.from_pretrained({name(denoiser['source'])!r}{subfolder})` before "
            "loading these weights.")


FAMILY = Family(
    name="z_image",
    pipeline_class="ZImagePipeline",
    denoiser=Component("transformer", "ZImageTransformer2DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKL", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "FlowMatchEulerDiscreteScheduler", "diffusers"),
    latent_channels=16,
    bucket_alignment=16,  # the VAE's 8x and the 2x2 patches
    prediction_type="flow_matching",
    lora_targets=LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=predict,
    single_file=False,
    trims_text=True,
    default_flow_shift=3.0,  # SimpleTuner's flow_schedule_shift default (Z-Image sets no other)
    flavours=FLAVOURS,
    default_flavour="turbo-ostris-v2",  # SimpleTuner's default (a LoRA trains over the v2 assistant LoRA)
    list_prompt_embeds=True,  # ZImagePipeline takes one tensor of real tokens per prompt
    latent_side_limit=latent_side_limit,
    variant=variant,
    card_note=card_note,
)
DE_TURBO_FAMILY = dataclasses.replace(FAMILY, default_denoiser=DE_TURBO_TRANSFORMER)
