"""Flux channel-wise control (`control: true`): Flux.1 trained to follow a control image as FLUX.1-Canny/Depth-dev do
(`FluxControlPipeline`).

The transformer's input layer (`x_embedder`) takes twice the packed channels: the packed noisy latents followed,
channel by channel, by the packed VAE latents of the control image. The new input columns start at zero (so the
widened model starts as the base model) and are learnt by the LoRA on `x_embedder`, which every control run targets;
`FluxControlPipeline.load_lora_weights` widens the base's `x_embedder` the same way (zero columns) before loading it.
Everything else (text encoders, schedule, LoRA file names) is Flux's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.errors import InputError
from pipeline.families import flux
from pipeline.families.spec import Family

PIPELINE_CLASS = "FluxControlPipeline"
CONTROL_ARGUMENT = "control_image"  # the pipeline's keyword for the control image
INPUT_LAYER = "x_embedder"


def predict(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
            guidance: Any = None, *, reference: Any) -> Any:  # fmt: skip
    """`FluxControlPipeline`'s denoiser call: the packed noisy latents and the packed control latents concatenated
    along the channels, Flux's ids, text, timestep and guidance inputs; unpacked to B x C x h x w. `reference`: the
    control image's latents, B (or 1) x C x h x w, scaled like `latents`."""
    import torch

    h, w = flux.even_latent_size(latents)
    b = latents.shape[0]
    if reference.shape[0] not in (1, b) or tuple(reference.shape[1:]) != tuple(latents.shape[1:]):
        raise InputError(f"control latents {tuple(reference.shape)} do not fit latents {tuple(latents.shape)}: the "
                         "control image must have its target's size (st prepare crops both alike)")  # fmt: skip
    tokens = torch.cat([flux.pack_latents(latents), flux.pack_latents(reference).expand(b, -1, -1)], dim=2)
    out = flux.transformer_call(transformer, tokens, flux.image_ids(h // 2, w // 2, latents.device, latents.dtype),
                                timesteps, text, guidance)  # fmt: skip
    return flux.unpack_latents(out, h, w)


def widen_input(transformer: Any) -> None:
    """Give `transformer` the control model's input layer in place: `x_embedder` with twice the input features, the
    base's weights in the first half and zeros in the second, and `in_channels` doubled in its config
    (`out_channels` kept) as `FluxControlPipeline` reads it. A transformer already widened is left as it is."""
    import torch

    channels = transformer.config.in_channels
    old = getattr(transformer, INPUT_LAYER)
    if old.in_features == 2 * (transformer.config.out_channels or channels):
        return
    new = torch.nn.Linear(old.in_features * 2, old.out_features, bias=old.bias is not None, dtype=old.weight.dtype,
                          device=old.weight.device)  # fmt: skip
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_features].copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.requires_grad_(old.weight.requires_grad)
    setattr(transformer, INPUT_LAYER, new)
    transformer.register_to_config(in_channels=channels * 2, out_channels=channels)


def _with_input_layer(targets: tuple[str, ...]) -> tuple[str, ...]:
    return targets if INPUT_LAYER in targets else (INPUT_LAYER, *targets)


FAMILY: Family = dataclasses.replace(
    flux.FAMILY, pipeline_class=PIPELINE_CLASS, predict=predict, takes_reference=True, variant=None,
    lora_targets=_with_input_layer(flux.FAMILY.lora_targets),
    lora_presets=tuple((name, _with_input_layer(targets)) for name, targets in flux.FAMILY.lora_presets),
)  # fmt: skip
