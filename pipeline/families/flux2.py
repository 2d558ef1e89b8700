"""FLUX.2 [klein]: a Flux-style MMDiT over 2x2-patchified 32-channel latents, conditioned on three stacked Qwen3
hidden layers (`Flux2KleinPipeline`; SimpleTuner's flavours klein-4b and klein-9b, its default klein-9b).

Text: `Flux2KleinPipeline.encode_prompt` wraps each prompt in Qwen3's chat template (one user turn, a generation
prompt, thinking disabled), pads it to 512 tokens, runs Qwen3 with the attention mask and concatenates hidden states
9, 18 and 27 per token; the denoiser gets every position (no mask), so nothing is trimmed.

Latents: AutoencoderKLFlux2 is normalised by its BatchNorm's running statistics over 2x2 patches of its 32 channels.
st caches the VAE mode (as the pipeline and SimpleTuner take it) normalised in that patch space and laid back out as
B x 32 x h x w (`loading.scaled_latents`), so the shared 4-D code and the flow-matching noise are unchanged: a patch
rearrangement only permutes elements. `predict` patchifies to 128 channels at h/2 x w/2, flattens the patches into
tokens with their 4-axis position ids (time, row, column, layer) and the text's ids (0, 0, 0, token), passes
`timestep / 1000` and, for a guidance-distilled transformer, the guidance value (1.0 in training, as SimpleTuner).

Reference images: as SimpleTuner, a run whose datasets link conditioning images trains FLUX.2's image input
(`REFERENCE_FAMILY`, chosen by `train.reference.for_pairs`): the reference's patch tokens follow the noisy ones with
time coordinate 10, as the pipelines' `image=` argument feeds them.

FLUX.2 [dev] (`Flux2Pipeline`, the Mistral-3 text encoder with its Pixtral processor) is refused for now (its flavour
says so).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.families import text, tiny_parts, z_image
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec

MAX_LENGTH = 512  # Flux2KleinPipeline's max_sequence_length (and SimpleTuner's tokenizer_max_length for FLUX.2)
HIDDEN_LAYERS = (9, 18, 27)  # the pipeline's text_encoder_out_layers for [klein]
REFERENCE_TIME = 10  # the time coordinate of the (first) reference image's tokens
# SimpleTuner's DEFAULT_LORA_TARGET for FLUX.2: the double-stream attention and the single-stream fused projection.
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.to_qkv_mlp_proj")

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "Qwen3ForCausalLM", "transformers"),
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
    """Per prompt, `prompt_embeds` (max_length tokens x 3 * Qwen3 dim: hidden states 9, 18, 27 side by side), as
    `Flux2KleinPipeline.encode_prompt`. `max_length` is the `max_sequence_length`; `t5_padding` does not apply."""
    import torch

    text.check_t5_padding(t5_padding)
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    length = text.check_max_length(max_length, MAX_LENGTH)
    ids, mask = text.tokenize(tokenizer, text.chat_turns(tokenizer, prompts, enable_thinking=False), length, device)
    layers = encoder.config.num_hidden_layers
    if layers < max(HIDDEN_LAYERS):
        raise InputError(f"the FLUX.2 [klein] text encoder needs at least {max(HIDDEN_LAYERS)} layers (the pipeline "
                         f"reads hidden states {HIDDEN_LAYERS}), this one has {layers}")  # fmt: skip
    with torch.no_grad():
        hidden = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    stacked = torch.cat([hidden[k] for k in HIDDEN_LAYERS], dim=-1)  # the pipeline's stack + permute + reshape
    return [{"prompt_embeds": row.detach().clone()} for row in stacked]


def patchify(latents: Any) -> Any:
    """B x C x h x w -> B x 4C x h/2 x w/2, each 2x2 patch's channels together (`Flux2Pipeline._patchify_latents`)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: Any) -> Any:
    """The inverse of `patchify`."""
    b, c4, h, w = latents.shape
    return latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def position_ids(rows: int, cols: int, device: Any, time: int = 0) -> Any:
    """(rows * cols) x 4 ids (time, row, column, 0) of patch tokens, as `Flux2Pipeline._prepare_latent_ids` (time 0)
    and `_prepare_image_ids` (a reference image: time 10)."""
    import torch

    times = torch.tensor([time])
    return torch.cartesian_prod(times, torch.arange(rows), torch.arange(cols), torch.arange(1)).to(device)


def text_ids(length: int, device: Any) -> Any:
    """length x 4 ids (0, 0, 0, token), as `Flux2Pipeline._prepare_text_ids`."""
    import torch

    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).to(device)


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """The FLUX.2 pipelines' denoiser call: patchified latents as tokens with their ids, the text with its ids,
    `timestep / 1000`, the guidance value(s) for a guidance-distilled transformer ([dev]; default 1.0) and None
    otherwise ([klein]); the output laid back out as B x C x h x w."""
    patches = _patches(latents)
    ids = position_ids(*patches.shape[-2:], latents.device)
    out = _transformer_call(transformer, _tokens(patches), ids, timesteps, text, guidance)
    return unpatchify(out.transpose(1, 2).reshape(patches.shape))


def predict_with_reference(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
                           guidance: Any = None, *, reference: Any) -> Any:  # fmt: skip
    """The FLUX.2 pipelines' denoiser call with a reference image (`image=`): its patch tokens follow the noisy ones,
    with ids (10, row, column, 0) (`_prepare_image_ids`); only the noisy tokens' prediction is kept."""
    import torch

    patches, ref_patches = _patches(latents), _patches(reference)
    b = latents.shape[0]
    if reference.shape[0] not in (1, b) or reference.shape[1] != latents.shape[1]:
        raise InputError(f"reference latents {tuple(reference.shape)} do not fit latents {tuple(latents.shape)}")
    tokens = _tokens(patches)
    ids = torch.cat([position_ids(*patches.shape[-2:], latents.device),
                     position_ids(*ref_patches.shape[-2:], latents.device, time=REFERENCE_TIME)])  # fmt: skip
    inputs = torch.cat([tokens, _tokens(ref_patches).expand(b, -1, -1)], dim=1)
    out = _transformer_call(transformer, inputs, ids, timesteps, text, guidance)[:, : tokens.shape[1]]
    return unpatchify(out.transpose(1, 2).reshape(patches.shape))


def _patches(latents: Any) -> Any:
    h, w = latents.shape[-2:]
    if h % 2 or w % 2:
        raise InputError(f"FLUX.2 patchifies 2x2 latent patches: latent height and width must be even, got {h} x {w}")
    return patchify(latents)


def _tokens(patches: Any) -> Any:
    """B x C x h x w patches -> B x (h * w) x C tokens (`_pack_latents`)."""
    return patches.flatten(2).transpose(1, 2)


def _transformer_call(transformer: Any, tokens: Any, ids: Any, timesteps: Any, text: dict[str, Any],
                      guidance: Any) -> Any:  # fmt: skip
    import torch

    b, device = tokens.shape[0], tokens.device
    embeds = text["prompt_embeds"]
    scale = None
    if transformer.config.guidance_embeds:
        scale = torch.as_tensor(1.0 if guidance is None else guidance, dtype=torch.float32, device=device)
        scale = scale.expand(b) if scale.ndim == 0 else scale
    return transformer(
        hidden_states=tokens,
        timestep=timesteps.to(tokens.dtype) / 1000,
        guidance=scale,
        encoder_hidden_states=embeds,
        txt_ids=text_ids(embeds.shape[1], device).expand(b, -1, -1),
        img_ids=ids.expand(b, -1, -1),
        return_dict=False,
    )[0]


def text_encoder(tokenizer: Any, hidden: int = 16) -> Any:
    """A tiny `Qwen3ForCausalLM` with the 27 layers the pipeline reads hidden states from (grouped-query attention,
    q/k norms), whose ids match `tokenizer`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=max(HIDDEN_LAYERS), num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )  # fmt: skip
    return Qwen3ForCausalLM(config).eval()


def vae() -> Any:
    """A tiny `AutoencoderKLFlux2`: 32 latent channels, the real 8x reduction, BatchNorm statistics that are not
    the identity (so that tests see the normalisation)."""
    import torch
    from diffusers import AutoencoderKLFlux2

    model = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=32, norm_num_groups=8,
        sample_size=64, mid_block_add_attention=False,
    ).eval()  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(model.bn.running_mean.shape, generator=generator) * 0.1)
        model.bn.running_var.copy_(1 + torch.rand(model.bn.running_var.shape, generator=generator))
    return model


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny FLUX.2 [klein] diffusers folder: 1 double- and 2 single-stream blocks without guidance
    embedding, the FLUX.2 VAE, Qwen3 (27 layers) with its chat template, FLUX.2's scheduler (dynamic shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    words = z_image.tokenizer()
    tiny_parts.seed_everything(seed)
    encoder = text_encoder(words)
    tiny_parts.seed_everything(seed + 1)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=encoder.config.hidden_size * len(HIDDEN_LAYERS),
        timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ).eval()  # fmt: skip
    tiny_parts.seed_everything(seed + 2)
    autoencoder = vae()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
        shift=3.0, use_dynamic_shifting=True,
    )  # fmt: skip
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=autoencoder, text_encoder=encoder, tokenizer=words,
                              transformer=transformer)  # fmt: skip
    tiny_parts.save(pipe, out_dir)


# SimpleTuner's FLUX.2 flavours (models/flux2/model.py HUGGINGFACE_PATHS); its default is "klein-9b".
FLAVOURS = (
    Flavour("dev", "black-forest-labs/FLUX.2-dev",
            needs="FLUX.2 [dev]'s Mistral-3 text encoder and Flux2Pipeline (train klein-4b or klein-9b)"),
    Flavour("klein-4b", "black-forest-labs/FLUX.2-klein-base-4B"),
    Flavour("klein-9b", "black-forest-labs/FLUX.2-klein-base-9B"),
)  # fmt: skip

FAMILY = Family(
    name="flux2",
    pipeline_class="Flux2KleinPipeline",
    denoiser=Component("transformer", "Flux2Transformer2DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKLFlux2", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "FlowMatchEulerDiscreteScheduler", "diffusers"),
    latent_channels=32,  # the VAE's; `predict` patchifies them to the transformer's 128
    bucket_alignment=16,  # the VAE's 8x and the 2x2 patches (SimpleTuner forces 16)
    prediction_type="flow_matching",
    lora_targets=LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=predict,
    single_file=False,
    default_flow_shift=3.0,  # SimpleTuner's flow_schedule_shift default
    flavours=FLAVOURS,
    default_flavour="klein-9b",
)

# FLUX.2 trained on (reference image, image) pairs, as SimpleTuner trains it when its datasets link conditioning
# images: the same pipeline, given the reference as `image`.
REFERENCE_FAMILY: Family = dataclasses.replace(FAMILY, predict=predict_with_reference, takes_reference=True)
