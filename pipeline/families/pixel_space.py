"""The "VAE" of a pixel-space family (DeepFloyd IF): no autoencoder, the image itself is what the denoiser sees.

A family without a VAE names `PIXEL_SPACE` as its `vae` component. Loading it gives a `PixelSpace`, which encodes
an image (B x 3 x H x W in [-1, 1]) to itself, so `st cache` stores normalised pixels in the cache dtype where other
families store latents, with the latent factors 1 and no shift, and a cached sample is H x W, not H/8 x W/8. The
component has no folder in the model: its identity is a constant (`IDENTITY`), and validation pipelines are built
without it.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

from pipeline.families.spec import Component, Family
from pipeline.hashing import sha256_json

PIXEL_SPACE = Component("vae", "PixelSpace", __name__)


def is_pixel_space(family: Family) -> bool:
    """Whether `family` denoises pixels (its `vae` is `PIXEL_SPACE`)."""
    return family.vae == PIXEL_SPACE


def identity(source: str, revision: str | None) -> dict[str, Any]:
    """What identifies the pixel-space "VAE" of the model at `source`: nothing but the fact (no files, no config)."""
    return {"source": source, "revision": revision, "subfolder": None, "config_sha256": None, "files": {},
            "weights_sha256": sha256_json({}), "pixel_space": True}  # fmt: skip


def __getattr__(name: str) -> Any:
    """`PixelSpace` is built on first use, so importing the families (every `st` command does) does not import torch."""
    if name == "PixelSpace":
        return _pixel_space_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _pixel_space_class() -> type:
    import torch
    from diffusers.configuration_utils import FrozenDict

    class PixelSpace(torch.nn.Module):
        """An identity autoencoder: `encode(x).latent` is x, `decode(x).sample` is x. It carries a dtype (an empty
        buffer's, so `.to(dtype)` sets it) and a diffusers-like `config` with scaling factor 1 and 3 channels."""

        def __init__(self, dtype: Any = None) -> None:
            super().__init__()
            self.register_buffer("_probe", torch.empty(0, dtype=dtype or torch.float32), persistent=False)
            self.encoder = torch.nn.Identity()
            self.config = FrozenDict(scaling_factor=1.0, shift_factor=None, latent_channels=3)

        @classmethod
        def from_pretrained(cls, source: Any = None, **kwargs: Any) -> PixelSpace:
            """The same object for every model (there is nothing to read); `torch_dtype` sets its dtype."""
            return cls(kwargs.get("torch_dtype"))

        @property
        def dtype(self) -> Any:
            return self._probe.dtype

        def encode(self, pixels: Any) -> SimpleNamespace:
            return SimpleNamespace(latent=self.encoder(pixels))

        def decode(self, latents: Any) -> SimpleNamespace:
            return SimpleNamespace(sample=latents)

    PixelSpace.__module__ = __name__
    return PixelSpace
