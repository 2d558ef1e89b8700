"""The options `st cache` reads, as one typed group: what the context, the encoders and the shard writer are given."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from ..quantise_modules import text_encoder_precisions
from ..speed import SpeedOptions

SCHNELL_T5_LENGTH = 256  # Flux Schnell's T5 sequence length (SimpleTuner's models/flux/model.py, FluxPipeline's)


@dataclass(frozen=True)
class CacheOptions:
    """The cache stage's options, copied from a `Config` (model paths come from `families.identity.model_sources`)."""

    seed: int
    vae_dtype: str  # as configured: "default" is resolved for the machine by the context
    cache_dtype: str
    cache_compression_level: int
    cache_shard_samples: int
    vae_batch_size: int
    vae_enable_slicing: bool
    vae_enable_tiling: bool
    tokenizer_max_length: int | None
    t5_padding: str
    sana_complex_human_instruction: str | list | None
    max_workers: int | None
    ignore_missing_files: bool
    offload_during_startup: bool
    train_text_encoder: bool  # also store each caption's token ids (text-encoder training reads them)
    variant: str | None
    speed: SpeedOptions
    text_encoder_1_precision: str
    text_encoder_2_precision: str
    text_encoder_3_precision: str
    text_encoder_4_precision: str
    ramtorch: bool  # with ramtorch_text_encoder / ramtorch_vae: the encoders stream Linear weights (ramtorch_layers)
    ramtorch_target_modules: str | None
    ramtorch_text_encoder: bool
    ramtorch_vae: bool

    @classmethod
    def from_config(cls, config: Any) -> CacheOptions:
        """The fields of the same name copied from `config` (every one exists there); no seed samples as seed 0."""
        copied = {f.name: getattr(config, f.name) for f in fields(cls) if f.name not in ("seed", "speed")}
        if (config.model_family, config.model_flavour) == ("flux", "schnell"):
            copied["tokenizer_max_length"] = SCHNELL_T5_LENGTH  # SimpleTuner sets 256 for Schnell, whatever was set
        return cls(seed=config.seed or 0, speed=SpeedOptions.from_config(config), **copied)

    @property
    def vae_encode(self) -> dict[str, Any]:
        """The options that set the shape of each VAE call, and so the last bits of every latent."""
        return {"vae_batch_size": self.vae_batch_size, "vae_enable_slicing": self.vae_enable_slicing,
                "vae_enable_tiling": self.vae_enable_tiling}  # fmt: skip

    @property
    def text_encoder_precisions(self) -> tuple[str, ...]:
        """The quantisation preset of each text encoder, in the family's order (pipeline.quantise_modules)."""
        return text_encoder_precisions(self)

    @property
    def batch(self) -> int:
        """Images per VAE call."""
        return max(1, self.vae_batch_size)

    @property
    def vae_rows(self) -> int:
        """Rows of each VAE call: with slicing the VAE encodes one image per call whatever the batch, so padding
        would only cost time."""
        return 1 if self.vae_enable_slicing else self.batch

    @property
    def workers(self) -> int:
        """Image-decoding processes."""
        return self.max_workers if self.max_workers is not None else min(4, os.cpu_count() or 1)
