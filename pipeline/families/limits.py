"""The largest image a family's denoiser accepts, and the check that every bucket and validation size fits it.

Denoisers with a learnt or fixed grid of positional embeddings (SD3's `pos_embed_max_size`, AuraFlow's) cannot take
a latent wider or taller than that grid: SD3 raises in the middle of a training step, AuraFlow silently reads the
wrong embeddings. st checks the sizes when training starts instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.families.spec import Family

DEFAULT_VAE_SCALE = 8  # every real family's VAE halves the size three times


def vae_scale_factor(family: Family, source: str | Path, vae_source: str | Path | None = None) -> int:
    """How many pixels one latent pixel covers, from the VAE's `block_out_channels` in a local folder's config
    (8 where the config cannot be read without loading weights: a hub id or a single file)."""
    for folder in ([Path(vae_source)] if vae_source else []) + [Path(source) / family.vae.subfolder]:
        config = folder / "config.json"
        if config.is_file():
            channels = json.loads(config.read_text()).get("block_out_channels")
            if channels:
                return 2 ** (len(channels) - 1)
    return DEFAULT_VAE_SCALE


def max_image_side(family: Family, denoiser_config: Mapping[str, Any], vae_scale: int) -> tuple[int, str] | None:
    """`(pixels, why)`: the largest image side the denoiser accepts and the config values that set it; None when
    the denoiser takes any size."""
    if family.latent_side_limit is None:
        return None
    limit = family.latent_side_limit(denoiser_config)
    if limit is None:
        return None
    latent_side, why = limit
    return latent_side * vae_scale, f"{why}, VAE factor {vae_scale}"


def parse_size(text: str) -> tuple[int, int]:
    """A bucket name "WxH" -> (W, H)."""
    width, _, height = text.partition("x")
    return int(width), int(height)


def check_image_sizes(
    family: Family,
    denoiser_config: Mapping[str, Any],
    vae_scale: int,
    buckets: Iterable[str],
    validation_sizes: Iterable[tuple[int, int]] = (),
) -> None:
    """ConfigError naming the first bucket ("WxH" pixels) or validation size larger than the denoiser accepts."""
    limit = max_image_side(family, denoiser_config, vae_scale)
    if limit is None:
        return
    pixels, why = limit
    for bucket in sorted(buckets):
        width, height = parse_size(bucket)
        if max(width, height) > pixels:
            raise ConfigError(
                f"bucket {bucket} is larger than this {family.name} model accepts: at most {pixels} px a side "
                f"({why}); lower resolution and re-run `st prepare` and `st cache`"
            )
    for width, height in validation_sizes:
        if max(width, height) > pixels:
            raise ConfigError(
                f"validation_resolution {width}x{height} is larger than this {family.name} model accepts: at most "
                f"{pixels} px a side ({why}); lower validation_resolution"
            )
