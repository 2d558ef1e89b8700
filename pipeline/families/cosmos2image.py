"""Cosmos-Predict2 text-to-image: a 3-D DiT (CosmosTransformer3DModel) over one-frame 16-channel Wan VAE latents,
conditioned on T5's last hidden state.

Text: `Cosmos2TextToImagePipeline.encode_prompt` pads every prompt to `max_sequence_length` (512), runs T5 with the
attention mask and zeroes the hidden states of the padded positions; the transformer takes no text mask, so those
zeros are part of its input and the full sequence is stored.

Latents: AutoencoderKLWan is a 3-D (video) VAE normalised per channel (`latents_mean` / `latents_std`, times the
scheduler's `sigma_data` of 1); images go through it as one frame and st caches them 4-D (see `loading.scaled_latents`).

Denoising: the pipeline keeps EDM latents x + s * noise with s in (0.002, 80) and calls the transformer on
`latents * c_in` with c_in = 1 - t, t = s / (s + 1): that is the flow-matching latent (1 - t) * x + t * noise, and the
transformer's output r is the flow velocity noise - x (the pipeline's x0 estimate is c_skip * latents + c_out * r =
flow latent - t * r). `predict` therefore takes st's flow latents and training timesteps t * 1000 and calls the
transformer as the loop does: one frame, `timestep` t per sample (0..1), a zero `padding_mask`, no fps.

Training in SimpleTuner: log s ~ N(0, 1) (so t = sigmoid(N(0, 1)), st's default logit-normal draw at shift 1) and an
x0 loss weighted by (s^2 + 1) / s^2, which equals the velocity loss times t^2 + (1 - t)^2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.families import text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import t5_tokenizer

MAX_LENGTH = 512  # the pipeline's max_sequence_length default and SimpleTuner's tokenizer_max_length for Cosmos
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # SimpleTuner's DEFAULT_LORA_TARGET for Cosmos

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "T5EncoderModel", "transformers"),
        tokenizer=Component("tokenizer", "T5Tokenizer", "transformers"),
        max_length=MAX_LENGTH,
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
    """Per prompt, `prompt_embeds` (max_length x T5 dim, padded positions zero), as
    `Cosmos2TextToImagePipeline.encode_prompt`. `t5_padding` changes nothing: the pipeline always zeroes them."""
    import torch

    text.check_t5_padding(t5_padding)
    prompts = text.check_prompts(prompts)
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    length = text.check_max_length(max_length, MAX_LENGTH)
    ids, mask = text.tokenize(tokenizer, prompts, length, device)
    with torch.no_grad():
        embeds = encoder(ids, attention_mask=mask.bool()).last_hidden_state
    return text.split({"prompt_embeds": text.zero_padding(embeds, mask)})


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`Cosmos2TextToImagePipeline`'s denoiser call on flow latents (the loop's `latents * c_in`): one frame, the
    timestep t = timesteps / 1000 per sample, a zero padding mask; the output (the flow velocity) without its frame."""
    h, w = latents.shape[-2:]
    _check_padding_mask_support(transformer)
    out = transformer(
        hidden_states=latents.unsqueeze(2),
        timestep=(timesteps / 1000).to(latents.dtype),
        encoder_hidden_states=text["prompt_embeds"],
        padding_mask=latents.new_zeros(1, 1, h, w),
        return_dict=False,
    )[0]
    return out.squeeze(2)


def _check_padding_mask_support(transformer: Any) -> None:
    """The real Cosmos transformers concatenate the padding mask, resized by torchvision, which diffusers imports only
    when it is installed (otherwise the forward pass fails with a NameError)."""
    from diffusers.utils import is_torchvision_available

    if transformer.config.concat_padding_mask and not is_torchvision_available():
        raise InputError("this Cosmos transformer (concat_padding_mask: true) resizes its padding mask with "
                         "torchvision: install the torchvision build that matches your torch")  # fmt: skip


class WithoutGuardrail:
    """Stands in for NVIDIA's Cosmos guardrail (the `cosmos_guardrail` package and its hub models), which the Cosmos
    pipelines build when given no safety checker: passes prompts and images through unchanged, as SimpleTuner's own
    Cosmos pipeline renders without it."""

    def to(self, *args: Any, **kwargs: Any) -> WithoutGuardrail:
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, video: Any) -> Any:
        return video


def allow_without_guardrail(pipeline_class: type) -> None:
    """Let `pipeline_class` load and render without `cosmos_guardrail` installed: its module's stand-in that raises
    ImportError is replaced by `WithoutGuardrail`. With the package installed, nothing changes."""
    import importlib

    from diffusers.utils import is_cosmos_guardrail_available

    if is_cosmos_guardrail_available():
        return
    module = importlib.import_module(pipeline_class.__module__)
    module.CosmosSafetyChecker = WithoutGuardrail


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny Cosmos-Predict2 text-to-image folder: 2 transformer blocks (2-B's layout, RoPE only, without its
    padding-mask channel, which needs torchvision), a Wan VAE with a spatial factor of 2 and the real latents_mean /
    latents_std, and the 2-B model's scheduler (Karras sigmas from 0.002 to 80). The folder names no guardrail."""
    from diffusers import (
        AutoencoderKLWan,
        Cosmos2TextToImagePipeline,
        CosmosTransformer3DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    allow_without_guardrail(Cosmos2TextToImagePipeline)
    tokenizer = t5_tokenizer(MAX_LENGTH)
    tiny_parts.seed_everything(seed)
    encoder = tiny_parts.t5_encoder(tokenizer)
    tiny_parts.seed_everything(seed + 1)
    transformer = CosmosTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2.0,
        text_embed_dim=encoder.config.d_model,
        adaln_lora_dim=8,
        max_size=(4, 256, 256),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 4.0, 4.0),
        concat_padding_mask=False,  # the real models' True needs torchvision (see `predict`)
        extra_pos_embed_type=None,
    ).eval()
    tiny_parts.seed_everything(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[False],
        scale_factor_spatial=2, scale_factor_temporal=1,
    ).eval()  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, shift=1.0)
    pipe = Cosmos2TextToImagePipeline(
        text_encoder=encoder, tokenizer=tokenizer, transformer=transformer, vae=vae, scheduler=scheduler
    )
    pipe.register_to_config(safety_checker=(None, None))  # saved as none: loading builds the stand-in again
    tiny_parts.save(pipe, out_dir)


# SimpleTuner's Cosmos (T2I) flavours (models/cosmos/model.py HUGGINGFACE_PATHS); its default is "2b".
FLAVOURS = (
    Flavour("2b", "nvidia/Cosmos-Predict2-2B-Text2Image"),
    Flavour("14b", "nvidia/Cosmos-Predict2-14B-Text2Image"),
)

# SimpleTuner trains Cosmos with EDM: sigma = exp(N(0, 1)) clamped to [0.002, 80], x_t = x0 + sigma * noise, and
# loss w * (x0_pred - x0)^2 with w = (sigma^2 + 1) / sigma^2. With t = sigma / (1 + sigma), the pipeline's
# preconditioning makes the transformer a velocity model on (1 - t) x0 + t noise, and that loss equals
# (t^2 + (1 - t)^2) * (v_pred - v)^2: st trains the velocity with that weight at t = sigmoid(N(0, 1)), clamped alike.
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0


def edm_sigmas(normal):
    """Training flow sigmas t = s / (1 + s) of SimpleTuner's EDM draw s = exp(normal), clamped as there."""
    low, high = EDM_SIGMA_MIN / (1 + EDM_SIGMA_MIN), EDM_SIGMA_MAX / (1 + EDM_SIGMA_MAX)
    return normal.sigmoid().clamp(low, high)


def edm_loss_weight(sigmas):
    """SimpleTuner's EDM loss weight written for the velocity loss: t^2 + (1 - t)^2."""
    return sigmas.square() + (1 - sigmas).square()


FAMILY = Family(
    name="cosmos2image",
    pipeline_class="Cosmos2TextToImagePipeline",
    denoiser=Component("transformer", "CosmosTransformer3DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKLWan", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "FlowMatchEulerDiscreteScheduler", "diffusers"),
    latent_channels=16,
    bucket_alignment=16,  # SimpleTuner overrides aspect_bucket_alignment to 16 for Cosmos
    prediction_type="flow_matching",
    lora_targets=LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=predict,
    single_file=False,
    lora_loader=False,  # Cosmos2TextToImagePipeline has no load_lora_weights: LoRAs load into its transformer
    default_flow_shift=1.0,  # SimpleTuner's flow_schedule_shift for Cosmos (its EDM draw has no shift)
    flow_sigmas=edm_sigmas,
    flow_loss_weight=edm_loss_weight,
    refused_precisions=("fp8-quanto",),
    flavours=FLAVOURS,
    default_flavour="2b",
    pipeline_setup=allow_without_guardrail,
)
