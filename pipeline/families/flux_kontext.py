"""Flux Kontext: Flux.1 trained to edit a reference image (`FluxKontextPipeline`; SimpleTuner's flavour `kontext`).

The reference image's VAE latents are packed like the noisy latents and appended to them along the token sequence,
with their own position ids (the target's, with the first coordinate set to 1); the transformer predicts every
token and only the target's tokens are kept, so the loss covers the target alone. The prompt is the edit
instruction. Everything else (text encoders, LoRA targets, schedule, LoRA files) is Flux's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.errors import InputError
from pipeline.families import flux, hub
from pipeline.families.spec import Family

PIPELINE_CLASS = "FluxKontextPipeline"
FLAVOUR = "kontext"


def reference_ids(height: int, width: int, device: Any, dtype: Any) -> Any:
    """Position ids of a packed reference image of `height` x `width` tokens: its image ids with the first
    coordinate 1 (as `FluxKontextPipeline.prepare_latents`)."""
    ids = flux.image_ids(height, width, device, dtype)
    ids[..., 0] = 1
    return ids


def predict(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
            guidance: Any = None, *, reference: Any) -> Any:  # fmt: skip
    """`FluxKontextPipeline`'s denoiser call: the packed noisy latents followed by the packed reference latents,
    their ids concatenated the same way, Flux's text, timestep and guidance inputs; the prediction's target tokens
    unpacked to B x C x h x w. `reference`: B (or 1) x C x h' x w' latents, scaled like `latents`."""
    import torch

    h, w = flux.even_latent_size(latents)
    rh, rw = flux.even_latent_size(reference)
    b = latents.shape[0]
    if reference.shape[0] not in (1, b) or reference.shape[1] != latents.shape[1]:
        raise InputError(f"reference latents {tuple(reference.shape)} do not fit latents {tuple(latents.shape)}")
    tokens = flux.pack_latents(latents)
    packed_reference = flux.pack_latents(reference).expand(b, -1, -1)
    ids = torch.cat([flux.image_ids(h // 2, w // 2, latents.device, latents.dtype),
                     reference_ids(rh // 2, rw // 2, latents.device, latents.dtype)])  # fmt: skip
    out = flux.transformer_call(transformer, torch.cat([tokens, packed_reference], dim=1), ids, timesteps, text,
                                guidance)  # fmt: skip
    return flux.unpack_latents(out[:, : tokens.shape[1]], h, w)


def is_kontext(flavour: str | None, source: str) -> bool:
    """Whether a run of `model_flavour` `flavour` on the model at `source` trains Kontext: the `kontext` flavour, or a
    diffusers folder (local, or in the hub cache) whose `model_index.json` names FluxKontextPipeline."""
    if flavour == FLAVOUR:
        return True
    index = hub.model_index_of(source)
    return index is not None and index.get("_class_name") == PIPELINE_CLASS


FAMILY: Family = dataclasses.replace(flux.FAMILY, pipeline_class=PIPELINE_CLASS, predict=predict,
                                     takes_reference=True, variant=None)  # fmt: skip
