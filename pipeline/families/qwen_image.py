"""Qwen-Image: an MMDiT transformer over 2x2-packed 16-channel latents, conditioned on Qwen2.5-VL's last hidden state.

Text: `QwenImagePipeline.encode_prompt` wraps each prompt in its chat template, runs Qwen2.5-VL with the attention
mask, keeps the last hidden state of the real tokens and drops the template's first 34 tokens (its system part);
a batch is padded to its longest prompt with zeros and mask 0. `encode_prompts` stores each prompt's embeddings
trimmed to its real tokens with a mask of ones, and `text.collate` pads a batch back exactly as the pipeline does.

Latents: AutoencoderKLQwenImage is a 3-D (video) VAE normalised per channel (`latents_mean` / `latents_std`).
Images go through it as one frame; st caches its latents 4-D (B x C x h x w, the time axis of 1 squeezed in
`loading.scaled_latents`, the smallest change to the shared 4-D code), and the pipeline adds the axis back when it
decodes. `predict` packs 2x2 patches as the pipeline does and passes `img_shapes` (1, h/2, w/2) per sample and the
text mask (None when every token is real, as the pipeline's `encode_prompt` leaves it); the installed diffusers
computes the text sequence lengths from that mask, so no `txt_seq_lens` is passed.

Flavour edit-v1 (or a folder whose model_index.json names QwenImageEditPipeline) trains Qwen-Image-Edit, edit-v2 and
edit-v3 (or a QwenImageEditPlusPipeline folder) Qwen-Image-Edit-Plus, and edit-v2+ the 2509 model with zero_cond_t
forced on: the variants in `qwen_image_edit` (`variant`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.families import flux, text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import qwen_tokenizer

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 34  # the pipeline's prompt_template_encode_start_idx: the template's system part, dropped
MAX_LENGTH = 1024  # the pipeline's tokenizer_max_length and the largest max_sequence_length it accepts
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # SimpleTuner's DEFAULT_LORA_TARGET for Qwen-Image

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "Qwen2_5_VLForConditionalGeneration", "transformers"),
        tokenizer=Component("tokenizer", "Qwen2Tokenizer", "transformers"),
        max_length=MAX_LENGTH,
        kind="qwen2_5_vl",
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
    """Per prompt, `prompt_embeds` (its real tokens after the template x hidden) and `attention_mask` (ones), as
    `QwenImagePipeline.encode_prompt`. `max_length` is the `max_sequence_length` (at most 1024); `t5_padding`
    changes nothing (there is no T5, and padded positions are not stored)."""
    import torch

    text.check_t5_padding(t5_padding)
    prompts = text.check_prompts(prompts)
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    length = text.check_max_length(max_length, MAX_LENGTH, limit=MAX_LENGTH, what="Qwen2.5-VL")
    # The pipeline always tokenizes up to 1024 tokens after the template, then keeps the first `length`.
    tokens = tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], max_length=MAX_LENGTH + TEMPLATE_TOKENS,
                       padding=True, truncation=True, return_tensors="pt").to(device)  # fmt: skip
    with torch.no_grad():
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         output_hidden_states=True).hidden_states[-1]  # fmt: skip
    items = []
    for row, mask in zip(hidden, tokens.attention_mask.bool(), strict=True):
        embeds = row[mask][TEMPLATE_TOKENS:][:length].detach().clone()
        ones = torch.ones(embeds.shape[0], dtype=torch.long, device=embeds.device)
        items.append({"prompt_embeds": embeds, "attention_mask": ones})
    return items


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`QwenImagePipeline`'s denoiser call: 2x2-packed latents, `timestep / 1000`, the text sequence with its mask
    (None when no position is padded), `img_shapes` of one frame of h/2 x w/2 patches per sample; guidance only
    for a guidance-distilled transformer (default 1.0). The output is unpacked to B x C x h x w."""
    b, _, h, w = latents.shape
    if h % 2 or w % 2:
        raise InputError(f"Qwen-Image packs 2x2 latent patches: latent height and width must be even, got {h} x {w}")
    out = transformer_call(transformer, flux.pack_latents(latents), timesteps, text, [[(1, h // 2, w // 2)]] * b,
                           guidance)  # fmt: skip
    return flux.unpack_latents(out, h, w)


def transformer_call(transformer: Any, tokens: Any, timesteps: Any, text: dict[str, Any], img_shapes: list,
                     guidance: Any = None) -> Any:  # fmt: skip
    """The transformer call of the Qwen-Image pipelines' denoising loops on packed `tokens` (B x L x 64): the packed
    prediction (B x L x 64). `img_shapes`: per sample, the (frames, h/2, w/2) of each image in the sequence."""
    import torch

    b = tokens.shape[0]
    mask = text["attention_mask"]
    scale = None
    if transformer.config.guidance_embeds:
        scale = torch.as_tensor(1.0 if guidance is None else guidance, dtype=torch.float32, device=tokens.device)
        scale = scale.expand(b) if scale.ndim == 0 else scale
    return transformer(
        hidden_states=tokens,
        timestep=timesteps.to(tokens.dtype) / 1000,
        guidance=scale,
        encoder_hidden_states_mask=None if bool(mask.all()) else mask,
        encoder_hidden_states=text["prompt_embeds"],
        img_shapes=img_shapes,
        return_dict=False,
    )[0]


def text_encoder(tokenizer: Any, hidden: int = 32) -> Any:
    """A tiny `Qwen2_5_VLForConditionalGeneration` (2 text layers, grouped-query attention, multimodal RoPE; a
    one-block vision tower, unused for text) whose ids match `tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1_000_000.0},
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"), "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": hidden, "fullatt_block_indexes": [0], "window_size": 28},
        # ids past the vocab: the tiny tokenizer has no vision tokens
        image_token_id=vocab, video_token_id=vocab + 1, vision_start_token_id=vocab + 2, vision_end_token_id=vocab + 3,
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny Qwen-Image diffusers folder: 2 transformer blocks, a 3-D VAE with a spatial factor of 2 and the
    real per-channel latents_mean / latents_std, the scheduler config of Qwen-Image (dynamic exponential shift)."""
    from diffusers import QwenImagePipeline

    tiny_parts.save(QwenImagePipeline(**tiny_components(seed)), out_dir)


def tiny_components(seed: int, tokenizer: Any = None, encoder: Any = None) -> dict[str, Any]:
    """The tiny pipeline's components (`tiny`); `tokenizer` and `encoder` (a builder taking the tokenizer) replace
    the text parts (Qwen-Image-Edit's have vision tokens)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    tokenizer = qwen_tokenizer() if tokenizer is None else tokenizer
    tiny_parts.seed_everything(seed)
    encoder = (text_encoder if encoder is None else encoder)(tokenizer)
    tiny_parts.seed_everything(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels packed 2x2
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=encoder.config.text_config.hidden_size,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    tiny_parts.seed_everything(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[False]
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    return {"scheduler": scheduler, "vae": vae, "text_encoder": encoder, "tokenizer": tokenizer,
            "transformer": transformer}


# SimpleTuner's Qwen-Image flavours (models/qwen_image/model.py HUGGINGFACE_PATHS); its default is "v2.0".
# edit-v1 trains Qwen-Image-Edit, edit-v2 (2509) and edit-v3 (2511) Qwen-Image-Edit-Plus (`qwen_image_edit`, chosen
# by `variant`). edit-v2+ runs the 2509 model with zero_cond_t forced on, which its transformer config does not set.
FLAVOURS = (
    Flavour("v1.0", "Qwen/Qwen-Image"),
    Flavour("v2.0", "Qwen/Qwen-Image-2512"),
    Flavour("edit-v1", "Qwen/Qwen-Image-Edit"),
    Flavour("edit-v2", "Qwen/Qwen-Image-Edit-2509"),
    Flavour("edit-v2+", "Qwen/Qwen-Image-Edit-2509"),
    Flavour("edit-v3", "Qwen/Qwen-Image-Edit-2511"),
)


def variant(flavour: str | None, source: str) -> Family:
    """Qwen-Image-Edit for flavour edit-v1 or an edit model folder (see `qwen_image_edit.variant`), else Qwen-Image."""
    from pipeline.families import qwen_image_edit

    return qwen_image_edit.variant(flavour, source)


def card_note(family: Family, train: dict[str, Any], denoiser_config: Any) -> str | None:
    """The model card's note on an edit-v2+ run (`qwen_image_edit.card_note`); None for other runs."""
    from pipeline.families import qwen_image_edit

    return qwen_image_edit.card_note(family, train, denoiser_config)


FAMILY = Family(
    name="qwen_image",
    pipeline_class="QwenImagePipeline",
    denoiser=Component("transformer", "QwenImageTransformer2DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKLQwenImage", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "FlowMatchEulerDiscreteScheduler", "diffusers"),
    latent_channels=16,
    bucket_alignment=16,  # the VAE's 8x and the 2x2 packing
    prediction_type="flow_matching",
    lora_targets=LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=predict,
    single_file=False,
    trims_text=True,
    default_flow_shift=3.0,  # SimpleTuner's flow_schedule_shift default
    flavours=FLAVOURS,
    default_flavour="v2.0",
    variant=variant,
    card_note=card_note,
)
