"""The encoders of a cache run: models loaded lazily, latents sampled per sample with its own seed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import speed as speed_options
from ..errors import InputError
from ..families import Family, load_components, vae_factors
from ..hashing import sha256_bytes
from ..log import get_logger, quiet_libraries

log = get_logger("cache")

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def sample_seed(seed: int, sample_id: str) -> int:
    """A 63-bit seed from (run seed, sample id): a sample's latent noise never depends on its batch."""
    return int(sha256_bytes(f"{seed}:{sample_id}".encode())[:16], 16) & ((1 << 63) - 1)


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class Encoders:
    """Loads the VAE and text encoders on first use, and frees the text encoders when asked.

    `speed` (a `pipeline.speed.SpeedOptions`; its defaults when None) sets how the VAE runs: attention kernel,
    TF32, slicing/tiling, and `torch.compile` of its encoder when a dynamo backend is set.
    """

    family: Family
    source: str
    vae_source: str | None
    t5_source: str | None
    revision: str | None
    variant: str | None
    vae_dtype: str
    device: Any
    offload: bool = False
    speed: Any = None
    _vae: Any = None
    _text: dict[str, Any] | None = None
    loaded: list[str] = field(default_factory=list)

    def _load(self, which: tuple[str, ...], dtype=None) -> dict[str, Any]:
        quiet_libraries()
        return load_components(self.family, self.source, vae_source=self.vae_source, t5_source=self.t5_source,
                               revision=self.revision, variant=self.variant, dtype=dtype, which=which)  # fmt: skip

    @property
    def vae(self):
        if self._vae is None:
            self.use_vae(self._load(("vae",), torch_dtype(self.vae_dtype))["vae"])
            self.loaded.append("vae")
        return self._vae

    @property
    def options(self) -> Any:
        return self.speed if self.speed is not None else speed_options.SpeedOptions()

    def use_vae(self, vae) -> Any:
        """Make `vae` the one that encodes: on the device, frozen, with the speed options applied. The encoder is
        compiled whole (one graph per bucket shape) when a dynamo backend is set; channels_last is not used (it
        roughly halved VAE encode speed in our measurements)."""
        options = self.options
        speed_options.check_attention(options.attention_mechanism, self.device)
        speed_options.apply_tf32(options.disable_tf32)
        vae = vae.to(self.device).eval().requires_grad_(False)
        speed_options.vae_memory(vae, options.vae_enable_slicing, options.vae_enable_tiling)
        speed_options.compile_module(vae.encoder, options, regional=False)
        self._vae = vae
        return vae

    @property
    def text(self) -> dict[str, Any]:
        if self._text is None:
            parts = self._load(("text_encoders",))
            encoders = tuple(e.eval().requires_grad_(False) for e in parts["text_encoders"])
            self._text = {"text_encoders": encoders, "tokenizers": parts["tokenizers"]}
            self.loaded.append("text_encoders")
        for encoder in self._text["text_encoders"]:
            encoder.to(self.device)
        return self._text

    def release_text(self) -> None:
        """offload_during_startup: park the text encoders on the CPU while the VAE works."""
        if self._text is not None and self.offload and str(self.device) != "cpu":
            for encoder in self._text["text_encoders"]:
                encoder.to("cpu")
            _empty_cache()

    def encode_prompts(self, prompts: list[str], max_length: int | None, t5_padding: str) -> list[dict[str, Any]]:
        text = self.text
        return self.family.encode_prompts(text["text_encoders"], text["tokenizers"], prompts, max_length=max_length,
                                          t5_padding=t5_padding, device=self.device)  # fmt: skip

    def encode_latents(self, pixels, sample_ids: list[str], seed: int):
        """Scaled latents (B x C x h x w, float32): (sample - shift) * scale, sampled with per-sample generators."""
        import torch

        vae = self.vae
        scale, shift = vae_factors(vae)
        generators = [torch.Generator(device="cpu").manual_seed(sample_seed(seed, s)) for s in sample_ids]
        with torch.no_grad(), speed_options.attention_context(self.options.attention_mechanism):
            dist = vae.encode(pixels.to(self.device, dtype=vae.dtype)).latent_dist
            noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g, dtype=torch.float32)
                                 for g in generators]).to(dist.mean.device)  # fmt: skip
            latents = dist.mean.float() + dist.std.float() * noise
        if shift is not None:
            latents = latents - shift
        return (latents * scale).cpu()

    def vae_description(self) -> dict[str, Any]:
        vae = self.vae
        scale, shift = vae_factors(vae)
        channels = int(getattr(vae.config, "latent_channels", self.family.latent_channels))
        if channels != self.family.latent_channels:
            raise InputError(
                f"the VAE has {channels} latent channels, but {self.family.name} needs {self.family.latent_channels}; "
                "check pretrained_vae_model_name_or_path"
            )
        return {"scaling_factor": scale, "shift_factor": shift, "latent_channels": channels, "dtype": self.vae_dtype,
                "class": type(vae).__name__}  # fmt: skip


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_latents_adaptive(encoders: Encoders, pixels, sample_ids: list[str], seed: int):
    """Encode a batch; on out-of-memory retry in halves down to single images, then re-raise with advice."""
    try:
        return encoders.encode_latents(pixels, sample_ids, seed)
    except (RuntimeError, MemoryError) as exc:
        if not is_oom(exc):
            raise
        _empty_cache()
        if len(sample_ids) == 1:
            raise InputError(
                f"out of memory encoding one {tuple(pixels.shape[-2:])} image with the VAE; use a smaller resolution, "
                "vae_dtype bf16/fp16, or a machine with more memory"
            ) from None
        import torch

        half = len(sample_ids) // 2
        log.warning("out of memory on a VAE batch of %d; retrying in batches of %d", len(sample_ids), half)
        first = encode_latents_adaptive(encoders, pixels[:half], sample_ids[:half], seed)
        second = encode_latents_adaptive(encoders, pixels[half:], sample_ids[half:], seed)
        return torch.cat([first, second])
