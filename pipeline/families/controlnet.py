"""ControlNets per family: the diffusers class, how it is built from the base denoiser, the ControlNet pipeline that
renders with it, and the ControlNet + denoiser call of that pipeline's denoising loop (no classifier-free guidance).

The UNet ControlNets (SD 1.x, SDXL) take the conditioning image itself, in [0, 1] as their pipelines' control image
processor leaves it (`do_normalize=False`); SD3's and Flux's take the image's VAE latents as their pipelines encode
it (Flux's packed like the noisy latents).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError, InputError, NotSupportedError
from pipeline.families import flux, sdxl
from pipeline.families.spec import Family

# model_type lora: the adapter alone, in SimpleTuner's layout, beside the merged ControlNet folder (train's final/,
# and the published folder).
ADAPTER_FILE = "controlnet_lora.safetensors"

# diffusers' default conditioning-embedding channels of ControlNetModel: one stride-2 step between each pair, so
# the image is downsampled 8x, the SD VAE's factor.
UNET_EMBEDDING_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetSpec:
    """`model_class` (diffusers), built by `builder(denoiser, **kwargs)` with `defaults(denoiser, vae_scale)` as its
    keywords unless `controlnet_custom_config` sets them; `pipeline_class` renders with it; `predict` is the
    ControlNet + denoiser call; `control_argument` is the pipeline's keyword for the conditioning image."""

    model_class: str
    builder: str
    pipeline_class: str
    control_argument: str
    predict: Callable[..., Any]
    defaults: Callable[[Any, int], dict[str, Any]]
    # The cached conditioning latents as the pipeline encodes its control image (controlnet, latents, VAE shift,
    # VAE scale) -> latents; None: as cached.
    pipeline_latents: Callable[[Any, Any, float, float], Any] | None = None
    # model_type lora: the adapter SimpleTuner puts on the ControlNet ("lora", or "loha" for the UNet ControlNets,
    # whose convolutions it trains too) and its target modules (peft names).
    adapter: str = "lora"
    lora_targets: tuple[str, ...] = ()

    def load_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.model_class)

    def build(self, denoiser: Any, vae_scale: int, custom: dict[str, Any] | None) -> Any:
        """A ControlNet initialised from `denoiser`'s weights, shaped by the defaults and `custom`."""
        model_class = self.load_class()
        method = getattr(model_class, self.builder)
        accepted = [n for n in inspect.signature(method).parameters if n not in ("cls", "self")][1:]
        custom = dict(custom or {})
        unknown = sorted(set(custom) - set(accepted))
        if unknown:
            raise ConfigError(f"controlnet_custom_config: {', '.join(unknown)} is not a keyword of "
                              f"{self.model_class}.{self.builder}; it accepts {', '.join(accepted)}")  # fmt: skip
        kwargs = {**self.defaults(denoiser, vae_scale), **custom}
        if isinstance(kwargs.get("conditioning_embedding_out_channels"), list):
            kwargs["conditioning_embedding_out_channels"] = tuple(kwargs["conditioning_embedding_out_channels"])
        try:
            return method(_ConfigCopy(denoiser), **kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"controlnet_custom_config {custom}: {self.model_class}.{self.builder} failed: "
                              f"{exc}") from None  # fmt: skip


class _ConfigCopy:
    """The denoiser as a builder sees it, with a copy of its config: `SD3ControlNetModel.from_transformer` writes its
    keywords into the config it is given, which must not change the base model's."""

    def __init__(self, model: Any) -> None:
        from diffusers.configuration_utils import FrozenDict

        self._model = model
        self.config = FrozenDict(dict(model.config))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _unet_defaults(unet: Any, vae_scale: int) -> dict[str, Any]:
    """The conditioning embedding downsamples as the VAE does: diffusers' channels for the 8x VAEs, fewer steps for a
    smaller factor (tiny test models)."""
    steps = max(0, int(round(math.log2(max(1, vae_scale)))))
    return {"conditioning_embedding_out_channels": UNET_EMBEDDING_CHANNELS[: min(steps, 3) + 1]}


def _flux_defaults(transformer: Any, vae_scale: int) -> dict[str, Any]:  # noqa: ARG001
    """diffusers' (and SimpleTuner's) 4 double-stream and 10 single-stream blocks; the heads of the transformer (the
    builder's own defaults, 24 x 128, are FLUX.1's)."""
    config = transformer.config
    return {"num_layers": 4, "num_single_layers": 10, "attention_head_dim": config.attention_head_dim,
            "num_attention_heads": config.num_attention_heads}  # fmt: skip


def predict_unet(unet: Any, controlnet: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any,
                 guidance: Any, control: Any, scale: float = 1.0, added: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """`StableDiffusionControlNetPipeline`'s loop: the ControlNet's residuals added to the UNet's blocks. `control`:
    the conditioning image B x 3 x H x W in [0, 1]; `added`: SDXL's `added_cond_kwargs`, given to both models."""
    embeds = text["prompt_embeds"]
    extra = {} if added is None else {"added_cond_kwargs": added}
    down, mid = controlnet(latents, timesteps, encoder_hidden_states=embeds, controlnet_cond=control.to(latents.dtype),
                           conditioning_scale=scale, guess_mode=False, return_dict=False, **extra)  # fmt: skip
    return unet(latents, timesteps, encoder_hidden_states=embeds, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False, **extra)[0]  # fmt: skip


def predict_sdxl(unet: Any, controlnet: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any,
                 guidance: Any, control: Any, scale: float = 1.0) -> Any:  # fmt: skip
    """`StableDiffusionXLControlNetPipeline`'s loop: as SD 1.x's, both models with the pooled embeddings and the
    micro-conditioning time ids of each sample (`sdxl.predict`'s)."""
    if meta is None:
        raise InputError("SDXL needs each sample's metadata (original_size, crop_top_left, target_size)")
    embeds = text["prompt_embeds"]
    added = {"text_embeds": text["pooled_prompt_embeds"], "time_ids": sdxl.time_ids(meta, embeds.dtype, latents.device)}
    return predict_unet(unet, controlnet, latents, timesteps, text, meta, guidance, control, scale, added)


def predict_flux(transformer: Any, controlnet: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any,
                 guidance: Any, control: Any, scale: float = 1.0) -> Any:  # fmt: skip
    """`FluxControlNetPipeline`'s loop (an InstantX-style ControlNet, no input hint block): packed noisy latents
    and packed conditioning latents (`control`, B x C x h x w, scaled as the latents) into the ControlNet, its
    block samples into the transformer; guidance for each model whose config embeds it."""
    import torch

    b, _, h, w = latents.shape
    embeds, dtype, device = text["prompt_embeds"], latents.dtype, latents.device

    def scale_for(model: Any) -> Any:
        if not model.config.guidance_embeds:
            return None
        value = torch.as_tensor(1.0 if guidance is None else guidance, dtype=torch.float32, device=device)
        return value.expand(b) if value.ndim == 0 else value

    common = dict(hidden_states=flux.pack_latents(latents), timestep=timesteps.to(dtype) / 1000,
                  pooled_projections=text["pooled_prompt_embeds"], encoder_hidden_states=embeds,
                  txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype),
                  img_ids=flux.image_ids(h // 2, w // 2, device, dtype), return_dict=False)  # fmt: skip
    blocks, single = controlnet(controlnet_cond=flux.pack_latents(control.to(dtype)), conditioning_scale=scale,
                                guidance=scale_for(controlnet), **common)  # fmt: skip
    out = transformer(guidance=scale_for(transformer), controlnet_block_samples=blocks,
                      controlnet_single_block_samples=single, **common)[0]  # fmt: skip
    return flux.unpack_latents(out, h, w)


def _sd3_defaults(transformer: Any, vae_scale: int) -> dict[str, Any]:  # noqa: ARG001
    """diffusers' 12 blocks (fewer for a transformer without 12 full ones: its last block is context-only and has
    other shapes) and no extra conditioning channels, as SimpleTuner builds it."""
    return {"num_layers": min(12, max(1, transformer.config.num_layers - 1)), "num_extra_conditioning_channels": 0}


def predict_sd3(transformer: Any, controlnet: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any,
                guidance: Any, control: Any, scale: float = 1.0) -> Any:  # fmt: skip
    """`StableDiffusion3ControlNetPipeline`'s loop: the ControlNet's block samples into the transformer; the
    ControlNet sees zero pooled projections when its config forces them (InstantX's, the default) and no text
    sequence when it has no joint attention (SD 3.5's 8B ControlNets)."""
    import torch

    embeds, pooled = text["prompt_embeds"], text["pooled_prompt_embeds"]
    config = controlnet.config
    blocks = controlnet(hidden_states=latents, timestep=timesteps,
                        encoder_hidden_states=embeds if config.joint_attention_dim is not None else None,
                        pooled_projections=torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection
                        else pooled, controlnet_cond=control.to(latents.dtype), conditioning_scale=scale,
                        return_dict=False)[0]  # fmt: skip
    return transformer(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds,
                       pooled_projections=pooled, block_controlnet_hidden_states=blocks, return_dict=False)[0]


def _sd3_pipeline_latents(latents: Any, controlnet: Any, shift: float, scale: float) -> Any:
    """The pipeline encodes the control image without the VAE's shift when the ControlNet forces zero pooled
    projections (InstantX's convention): (x - shift) * scale as cached -> x * scale."""
    return latents + shift * scale if controlnet.config.force_zeros_for_pooled_projection else latents


# SimpleTuner's targets of a LoRA on the ControlNet (model_type lora with controlnet): the UNet ControlNets'
# attention, feed-forward, convolution and embedding layers (its DEFAULT_CONTROLNET_LORA_TARGET, trained as a LoHa);
# SD3's blocks' projections, embedders and output blocks; Flux's input embedder and output blocks (its `controlnet`
# flux_lora_target preset). Names a model lacks (fewer blocks) match nothing.
UNET_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv", "conv1", "conv2",
    "conv_in", "conv_shortcut", "linear_1", "linear_2", "time_emb_proj", "controlnet_cond_embedding.conv_in",
    *(f"controlnet_cond_embedding.blocks.{i}" for i in range(6)), "controlnet_cond_embedding.conv_out",
    *(f"controlnet_down_blocks.{i}" for i in range(9)), "controlnet_mid_block",
)
SD3_LORA_TARGETS = (
    *(f"controlnet_blocks.{i}" for i in range(12)), "pos_embed.proj", "pos_embed_input.proj", "context_embedder",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
    *(f"transformer_blocks.{i}.{name}" for i in range(12) for name in (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
        "attn.add_v_proj", "attn.to_add_out", "attn2.to_k", "attn2.to_q", "attn2.to_v", "attn2.to_out.0",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")),
)
FLUX_LORA_TARGETS = ("controlnet_x_embedder", *(f"controlnet_blocks.{i}" for i in range(4)),
                     *(f"controlnet_single_blocks.{i}" for i in range(10)))

SPECS: dict[str, ControlNetSpec] = {
    "sd1x": ControlNetSpec("ControlNetModel", "from_unet", "StableDiffusionControlNetPipeline", "image",
                           predict_unet, _unet_defaults, adapter="loha", lora_targets=UNET_LORA_TARGETS),
    "sdxl": ControlNetSpec("ControlNetModel", "from_unet", "StableDiffusionXLControlNetPipeline", "image",
                           predict_sdxl, _unet_defaults, adapter="loha", lora_targets=UNET_LORA_TARGETS),
    "sd3": ControlNetSpec("SD3ControlNetModel", "from_transformer", "StableDiffusion3ControlNetPipeline",
                          "control_image", predict_sd3, _sd3_defaults, _sd3_pipeline_latents,
                          lora_targets=SD3_LORA_TARGETS),
    "flux": ControlNetSpec("FluxControlNetModel", "from_transformer", "FluxControlNetPipeline", "control_image",
                           predict_flux, _flux_defaults, lora_targets=FLUX_LORA_TARGETS),
}  # fmt: skip


def spec_for(family: Family) -> ControlNetSpec:
    """The family's ControlNet; NotSupportedError for a family st cannot train one for yet."""
    spec = SPECS.get(family.name)
    if spec is None:
        raise NotSupportedError(f"controlnet: true is not supported for model_family {family.name} yet (st trains "
                                f"ControlNets for {', '.join(SPECS)})")  # fmt: skip
    return spec
