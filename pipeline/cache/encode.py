"""The encoders of a cache run: models loaded lazily, latents sampled per sample with its own seed.

Batch invariance: kernels choose their blocking and reduction order by tensor shape, so a sample encoded alone can
differ in the last bits from the same sample in a batch of 4 (enough to flip a bf16 rounding; measured on CPU). Every
VAE call therefore gets exactly `vae_batch_size` rows (zero images pad a short batch; one row with VAE slicing, which
encodes image by image anyway) and every text-encoder call exactly TEXT_BATCH prompts (empty prompts pad it); the
padding outputs are dropped. A sample's bytes then depend on the sample and the stage key only, never on its
neighbours or on how many samples a run encodes.

Video (a family with `Family.video`): every clip is encoded alone, one clip per VAE call (B = 1, whatever
vae_batch_size says), so the rule holds without padding and a call's memory is one clip's; vae_enable_tiling /
vae_enable_slicing bound it further for long or large clips. Images of a video run are one-frame clips, batched and
padded as above. Latents keep the time axis: B x C x f x h x w.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import speed as speed_options
from ..errors import InputError
from ..families import Family, load_components, vae_factors
from ..families.loading import latent_normalisation, patch_batch_norm, scaled_latents, vae_input
from ..hashing import sha256_bytes
from ..log import quiet_libraries
from ..quantise_modules import quantise_module
from .options import CacheOptions

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TEXT_BATCH = 16


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
    precisions: tuple[str, ...] = ()  # text_encoder_N_precision presets, in the family's order
    ramtorch: Any = None  # a ramtorch_layers.ComponentOptions: ramtorch_text_encoder, ramtorch_vae
    streamed: dict[str, Any] = field(default_factory=dict)  # what RamTorch streams from host memory, per component
    _vae: Any = None
    _text: dict[str, Any] | None = None
    _clip: tuple[Any, Any] | None = None
    loaded: list[str] = field(default_factory=list)

    def _load(self, which: tuple[str, ...], dtype=None) -> dict[str, Any]:
        quiet_libraries()
        return load_components(self.family, self.source, vae_source=self.vae_source, t5_source=self.t5_source,
                               revision=self.revision, variant=self.variant, dtype=dtype, which=which)  # fmt: skip

    @property
    def vae(self):
        if self._vae is None:
            vae = self._load(("vae",), torch_dtype(self.vae_dtype))["vae"]
            if self.ramtorch is not None and self.ramtorch.vae:  # before the VAE moves to the GPU
                from ..ramtorch_layers import stream_vae

                self.streamed["vae"] = stream_vae(vae, self.ramtorch.patterns, self.device)
            self.use_vae(vae)
            self.loaded.append("vae")
        return self._vae

    @property
    def clip(self) -> tuple[Any, Any]:
        """Wan 2.1 i2v / FLF2V: the model's CLIP vision encoder (fp32, as training loads it) and image processor."""
        if self._clip is None:
            from ..families.wan_i2v import load_image_encoder

            quiet_libraries()
            encoder, processor = load_image_encoder(self.source, self.revision)
            self._clip = (encoder.to(self.device), processor)
            self.loaded.append("image_encoder")
        return self._clip

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
            encoders = tuple(self._streamed(i, self._quantised(i, e.eval().requires_grad_(False)))
                             for i, e in enumerate(parts["text_encoders"]))  # fmt: skip
            self._text = {"text_encoders": encoders, "tokenizers": parts["tokenizers"]}
            self.loaded.append("text_encoders")
        for encoder in self._text["text_encoders"]:
            encoder.to(self.device)
        return self._text

    def _quantised(self, index: int, encoder: Any) -> Any:
        """Text encoder `index` quantised with its text_encoder_N_precision (on the CPU, before it moves)."""
        preset = self.precisions[index] if index < len(self.precisions) else "no_change"
        return quantise_module(encoder, preset, self.family.name, f"text encoder {index + 1}")

    def _streamed(self, index: int, encoder: Any) -> Any:
        """ramtorch_text_encoder: text encoder `index`'s Linear layers in host memory (before it moves)."""
        if self.ramtorch is not None and self.ramtorch.text_encoders:
            from ..ramtorch_layers import stream_text_encoder

            streamed = stream_text_encoder(encoder, index + 1, self.ramtorch.patterns, self.device)
            self.streamed.setdefault("text_encoders", []).append(streamed)
        return encoder

    def release_text(self) -> None:
        """offload_during_startup: park the text encoders on the CPU while the VAE works."""
        if self._text is not None and self.offload and str(self.device) != "cpu":
            for encoder in self._text["text_encoders"]:
                encoder.to("cpu")
            _empty_cache()

    def encode_prompts(self, prompts: list[str], max_length: int | None, t5_padding: str,
                       **family_options: Any) -> list[dict[str, Any]]:  # fmt: skip
        """Embeddings of `prompts`, encoded TEXT_BATCH at a time (a short chunk padded with empty prompts);
        `family_options` go to the family's `encode_prompts` (see `family_text_options`)."""
        text = self.text
        out: list[dict[str, Any]] = []
        for start in range(0, len(prompts), TEXT_BATCH):
            chunk = prompts[start : start + TEXT_BATCH]
            padded = chunk + [""] * (TEXT_BATCH - len(chunk))
            out += self.family.encode_prompts(text["text_encoders"], text["tokenizers"], padded, max_length=max_length,
                                              t5_padding=t5_padding, device=self.device,
                                              **family_options)[: len(chunk)]  # fmt: skip
        return out

    def encode_prompts_with_images(self, prompts: list[str], images: list[Any], max_length: int | None,
                                   t5_padding: str, **family_options: Any) -> list[dict[str, Any]]:  # fmt: skip
        """Embeddings of `prompts`, prompt i encoded with `images[i]` (`Family.text_with_reference`: such a family
        encodes each prompt alone, so no padding is needed for a sample's bytes to be its own)."""
        text = self.text
        return self.family.encode_prompts(text["text_encoders"], text["tokenizers"], prompts, images=images,
                                          max_length=max_length, t5_padding=t5_padding, device=self.device,
                                          **family_options)  # fmt: skip

    def encode_latents(self, pixels, sample_ids: list[str], seed: int, batch_size: int | None = None):
        """Scaled latents (B x C x h x w, float32; B x C x f x h x w for a video family): (sample - shift) * scale,
        or normalised per channel (see `families.loading.scaled_latents`), sampled with per-sample generators. The
        VAE sees `batch_size` rows (default: as many as given), `pixels` (images, or B x 3 x F x H x W clips) padded
        with zero rows."""
        import torch

        vae = self.vae
        count = len(sample_ids)
        generators = [torch.Generator(device="cpu").manual_seed(sample_seed(seed, s)) for s in sample_ids]
        with torch.no_grad(), speed_options.attention_context(self.options.attention_mechanism):
            padded = pad_rows(pixels, batch_size or count)
            encoded = vae.encode(vae_input(vae, padded.to(self.device, dtype=vae.dtype), video=self.family.video))
            dist = getattr(encoded, "latent_dist", None)
            if dist is None:  # a deterministic autoencoder (Sana's AutoencoderDC) returns `.latent`
                latents = encoded.latent[:count].float()
            elif patch_batch_norm(vae) is not None:  # FLUX.2: its pipeline and SimpleTuner take the mode
                latents = dist.mode()[:count].float()
            else:
                mean, std = dist.mean[:count].float(), dist.std[:count].float()
                noise = torch.stack([torch.randn(mean.shape[1:], generator=g, dtype=torch.float32)
                                     for g in generators]).to(mean.device)  # fmt: skip
                latents = mean + std * noise
        return scaled_latents(vae, latents, video=self.family.video).cpu()

    def vae_description(self) -> dict[str, Any]:
        vae = self.vae
        scale, shift = vae_factors(vae)
        channels = int(vae.config.get("latent_channels") or vae.config.get("z_dim") or self.family.latent_channels)
        if channels != self.family.latent_channels:
            raise InputError(
                f"the VAE has {channels} latent channels, but {self.family.name} needs {self.family.latent_channels}; "
                "check pretrained_vae_model_name_or_path"
            )
        described = {"scaling_factor": scale, "shift_factor": shift, "latent_channels": channels,
                     "dtype": self.vae_dtype, "class": type(vae).__name__}  # fmt: skip
        stats = latent_normalisation(vae)
        if stats is not None:
            described["latents_mean"], described["latents_std"] = stats
        return described


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pad_rows(batch, rows: int):
    """`batch` with zero rows appended up to `rows` (unchanged when it already has that many)."""
    import torch

    missing = rows - batch.shape[0]
    if missing <= 0:
        return batch
    return torch.cat([batch, batch.new_zeros((missing, *batch.shape[1:]))])


def family_text_options(family: Family, options: CacheOptions) -> dict[str, Any]:
    """The keywords only this family's `encode_prompts` takes (`Family.text_options`), from the cache options."""
    return family.text_options(options) if family.text_options else {}


def encode_texts(encoders: Encoders, prompts: list[str], options: CacheOptions,
                 images: list[Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Embeddings of `prompts` as cached: floating-point tensors in cache_dtype, the others (masks) as they are;
    with train_text_encoder also each tokenizer's token ids and mask (`families.text_training`). `images`: one
    reference image per prompt, for a family whose prompt embeddings see it (`Family.text_with_reference`)."""
    dtype = torch_dtype(options.cache_dtype)
    if images is not None:
        encoded = encoders.encode_prompts_with_images(prompts, images, options.tokenizer_max_length,
                                                      options.t5_padding,
                                                      **family_text_options(encoders.family, options))  # fmt: skip
    else:
        encoded = encoders.encode_prompts(prompts, options.tokenizer_max_length, options.t5_padding,
                                          **family_text_options(encoders.family, options))  # fmt: skip
    if options.train_text_encoder:
        from ..families.text_training import token_items

        text = encoders.text
        tokens = token_items(encoders.family.name, text["tokenizers"], text["text_encoders"], prompts,
                             options.tokenizer_max_length)  # fmt: skip
        encoded = [{**values, **ids} for values, ids in zip(encoded, tokens, strict=True)]
    return [{name: v.to(dtype) if v.is_floating_point() else v for name, v in values.items()} for values in encoded]


def encode_latent_batch(encoders: Encoders, pixels, sample_ids: list[str], seed: int, batch_size: int):
    """Encode up to `batch_size` images in one VAE call of exactly `batch_size` rows.

    Out of memory is not retried in smaller batches (that would change the bytes of the samples retried): it stops
    with advice; a smaller vae_batch_size changes the stage key, so the whole cache is then encoded at that size."""
    try:
        return encoders.encode_latents(pixels, sample_ids, seed, batch_size=batch_size)
    except (RuntimeError, MemoryError) as exc:
        if not is_oom(exc):
            raise
        _empty_cache()
        size = "x".join(str(n) for n in reversed(pixels.shape[-2:]))
        if pixels.ndim == 5:  # one clip per call: only the clip's own size helps
            raise InputError(f"out of memory encoding a {pixels.shape[2]}-frame {size} clip with the video VAE; set "
                             "vae_enable_tiling (and vae_enable_slicing), use vae_dtype bf16/fp16, fewer frames "
                             "(video.num_frames) or a smaller resolution") from None  # fmt: skip
        smaller = f"set vae_batch_size to {batch_size // 2}, " if batch_size > 1 else ""
        raise InputError(
            f"out of memory encoding a batch of {batch_size} {size} image(s) with the VAE; {smaller}use vae_dtype "
            "bf16/fp16, a smaller resolution, or a machine with more memory"
        ) from None
