"""The registry of model families: `FAMILIES` by name and `get_family(name)`, and the names other code uses."""

from __future__ import annotations

import difflib

from pipeline.errors import ConfigError
from pipeline.families import (auraflow, chroma, cosmos2image, deepfloyd, detect, flux, flux2, hidream, kolors,
                               ltxvideo, lumina2, omnigen, pixart_sigma, qwen_image, sana, sd1x, sd2x, sd3, sdxl, wan,
                               z_image)
from pipeline.families.identity import component_identity, without_source
from pipeline.families.loading import load_components, vae_factors
from pipeline.families.spec import Component, Family, TextEncoderSpec

FAMILIES: dict[str, Family] = {
    module.FAMILY.name: module.FAMILY
    for module in (sd1x, sd2x, sdxl, sd3, flux, pixart_sigma, auraflow, lumina2, sana, qwen_image, kolors, chroma, z_image,
                   hidream, cosmos2image, flux2, deepfloyd, wan, ltxvideo, omnigen)
}


def get_family(name: str) -> Family:
    """The family called `name`; an unknown name is a ConfigError listing the known ones."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        pass
    known = ", ".join(sorted(FAMILIES))
    close = difflib.get_close_matches(str(name).lower(), list(FAMILIES), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown model family {name!r}{hint}; known families: {known}")


def check_model_family(family: Family, source: str | None) -> None:
    """Refuse a `model_family` that does not match the local model folder or checkpoint at `source` (InputError)."""
    detect.check_model_family(family, source, FAMILIES)


__all__ = [
    "FAMILIES",
    "Component",
    "Family",
    "TextEncoderSpec",
    "check_model_family",
    "component_identity",
    "get_family",
    "load_components",
    "vae_factors",
    "without_source",
]
