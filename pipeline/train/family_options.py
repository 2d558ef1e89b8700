"""Family options of SimpleTuner that change what one family's denoiser receives during training.

- `flux_attention_masked_training` (Flux and its variants): `st cache` always stores T5's token mask beside Flux's
  embeddings, which Flux's `collate_text` leaves out; with the option on the batch gets it back, and the family's
  transformer call adds it to every joint attention (`pipeline.families.flux.joint_attention_mask`). Other
  families ignore the option, as SimpleTuner does (Chroma always masks).
- `hidream_use_load_balancing_loss` with `hidream_load_balancing_loss_weight` = w (HiDream): as SimpleTuner, every
  expert gate's auxiliary loss is computed with its coefficient set to w (`aux_loss_alpha`), and the training loss
  becomes loss + w * (sum of the gates' auxiliary losses). SimpleTuner collects those losses detached, so the sum
  raises the logged loss but adds no gradient: the weights train exactly as without it, and st keeps it so.
- `pretrained_unet_model_name_or_path` / `pretrained_transformer_model_name_or_path` with their `*_subfolder`:
  the frozen denoiser comes from another folder or hub id (`load_base_parts`); the rest of the model (scheduler,
  VAE, text encoders) from `pretrained_model_name_or_path`, as in SimpleTuner.
- `sd3_clip_uncond_behaviour` / `sd3_t5_uncond_behaviour` (SD3): what a caption-dropped sample is conditioned on,
  the empty caption's embeddings (`empty_string`) or zeros, for the CLIP part (the first 77 tokens of the joint
  sequence and the pooled projections) and the T5 part apart; the T5 behaviour follows the CLIP one when unset.
- `data_aesthetic_score` (the SDXL refiner): the aesthetic score in every sample's time ids (SimpleTuner's collate
  puts it where the base model has the target size); the batch carries it as `aesthetic_score`.
- `ltx_train_mode` / `ltx_protect_first_frame` / `ltx_i2v_prob` / `ltx_partial_noise_fraction` (LTX-Video): the
  image-to-video first-frame conditioning of SimpleTuner's `apply_first_frame_protection`, see `FirstFrame`.
- `framerate` (LTX-Video): the RoPE time scale 8 / framerate (25 unless set, as SimpleTuner sets it); the batch
  carries it as `frame_rate` (`ltxvideo.frame_rate_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ConfigError, InputError
from ..families import Family, flux, ltxvideo, sd3, sdxl
from ..log import get_logger
from ..video_settings import family_framerate

log = get_logger("train")


@dataclass(frozen=True)
class FamilyText:
    """How one run turns a batch's cached text items into what its denoiser receives."""

    attention_mask: bool  # hand Flux's stored T5 mask to the denoiser (flux_attention_masked_training)
    clip_uncond: str  # SD3's caption-dropout CLIP embeddings: "empty_string" or "zero"
    t5_uncond: str
    aesthetic_score: float | None = None  # the SDXL refiner's data_aesthetic_score; None: another family
    frame_rate: float | None = None  # LTX-Video's framerate (its RoPE time scale); None: another family

    @classmethod
    def for_run(cls, config: Any, family: Family) -> FamilyText:
        """The run's settings; ConfigError for a combination st would otherwise train differently than asked."""
        masked = bool(config.flux_attention_masked_training)
        is_flux = family.encode_prompts is flux.encode_prompts  # Flux and the variants built on it
        if masked and not is_flux:
            log.warning("flux_attention_masked_training applies to Flux only; model_family %s ignores it (as in "
                        "SimpleTuner)", family.name)  # fmt: skip
            masked = False
        if masked and config.controlnet:
            raise ConfigError("flux_attention_masked_training is not supported with controlnet: true yet (the "
                              "ControlNet would see the text unmasked); set one of them")  # fmt: skip
        clip = config.sd3_clip_uncond_behaviour
        t5 = config.sd3_t5_uncond_behaviour or clip
        if "zero" in (clip, t5) and family.name != "sd3":
            log.warning("sd3_clip_uncond_behaviour / sd3_t5_uncond_behaviour apply to SD3 only; model_family %s "
                        "ignores them", family.name)  # fmt: skip
            clip = t5 = "empty_string"
        if family.check_config is not None:  # FLUX.2 [dev] trains with guidance 1.0, as SimpleTuner
            family.check_config(config, family)
        score = float(config.data_aesthetic_score) if family.predict is sdxl.refiner_predict else None
        rate = family_framerate(config.framerate, family.name) if family.predict is ltxvideo.predict else None
        return cls(attention_mask=masked, clip_uncond=clip, t5_uncond=t5, aesthetic_score=score, frame_rate=rate)

    def training_texts(self, texts: Sequence[dict[str, Any]], dropped: Sequence[bool]) -> list[dict[str, Any]]:
        """A training batch's text items, caption-dropped ones replaced as `sd3_*_uncond_behaviour` asks."""
        if self.clip_uncond == self.t5_uncond == "empty_string":
            return list(texts)
        return [sd3.zeroed_uncond(t, self.clip_uncond == "zero", self.t5_uncond == "zero") if drop else t
                for t, drop in zip(texts, dropped, strict=True)]  # fmt: skip

    def denoiser_text(self, texts: Sequence[dict[str, Any]], collated: dict[str, Any]) -> dict[str, Any]:
        """`collated` (the family's `collate_text` of `texts`) as the denoiser takes it: with masked training, the
        items' stored T5 masks added as `attention_mask` (Flux's collate leaves them out); for the SDXL refiner,
        `aesthetic_score` per sample; for LTX-Video, `frame_rate` per sample."""
        import torch

        if self.aesthetic_score is not None:
            collated = {**collated, "aesthetic_score": torch.full((len(texts),), self.aesthetic_score)}
        if self.frame_rate is not None:
            collated = {**collated, ltxvideo.FRAME_RATE_KEY: ltxvideo.frame_rate_batch(self.frame_rate, len(texts))}
        if not self.attention_mask:
            return collated
        if any("attention_mask" not in t for t in texts):
            raise InputError("flux_attention_masked_training needs T5's attention masks in the cache, and this cache "
                             "has none (written by an older st): re-run `st cache` with --force")  # fmt: skip
        return {**collated, "attention_mask": torch.stack([t["attention_mask"] for t in texts])}


class LoadBalancingLoss:
    """HiDream's expert-gate auxiliary losses of the forward passes since the last `take` (see the module
    docstring); attach with `attach`, which returns None unless `hidream_use_load_balancing_loss` is on."""

    def __init__(self, gates: list[Any], weight: float) -> None:
        self.weight, self.collected = weight, []
        for gate in gates:
            gate.alpha = weight  # SimpleTuner loads its transformer with aux_loss_alpha = the weight
            gate.register_forward_hook(self._collect)

    @classmethod
    def attach(cls, config: Any, family: Family, denoiser: Any) -> LoadBalancingLoss | None:
        if not config.hidream_use_load_balancing_loss:
            return None
        if family.name != "hidream":
            raise ConfigError(f"hidream_use_load_balancing_loss is for model_family hidream, not {family.name}; "
                              "remove it")  # fmt: skip
        weight = config.hidream_load_balancing_loss_weight
        if weight is None or not weight > 0:
            raise ConfigError("hidream_use_load_balancing_loss needs hidream_load_balancing_loss_weight > 0 (SimpleTuner's "
                              f"HiDream example uses 1e-5), got {weight}")  # fmt: skip
        gates = [m for m in denoiser.modules() if type(m).__name__ == "MoEGate"]
        if not gates:
            raise InputError(f"hidream_use_load_balancing_loss: the {type(denoiser).__name__} has no expert gates")
        return cls(gates, float(weight))

    def _collect(self, module: Any, inputs: Any, output: Any) -> None:
        aux = output[2]
        if aux is not None:
            self.collected.append(aux.detach())

    def take(self) -> Any:
        """w * the sum of the collected auxiliary losses (a detached scalar; 0 when none), and forget them."""
        import torch

        total = torch.stack(self.collected).sum() * self.weight if self.collected else torch.zeros(())
        self.collected = []
        return total


@dataclass(frozen=True)
class FrameLossMask:
    """Loss weights per latent frame (B x f: 1 trains the frame, 0 leaves it out), with `LossMask`'s `weights`."""

    frames: Any

    def weights(self, loss: Any) -> Any:
        return self.frames.to(device=loss.device, dtype=loss.dtype).reshape(*self.frames.shape, 1, 1).unsqueeze(1)


@dataclass(frozen=True)
class FirstFrame:
    """LTX-Video's first-frame (image-to-video) conditioning, SimpleTuner's `apply_first_frame_protection` on a batch
    of a video dataset with `video.is_i2v` (with `ltx_train_mode` i2v) whose clips have more than one latent frame:

    - `ltx_protect_first_frame`: the first latent frame enters clean, its tokens get timestep 0, and it is left out
      of the loss (its weight is 0; the mean still runs over every element, as with loss masks);
    - otherwise, with probability `ltx_i2v_prob` per batch, the first frame's timestep and noise both shrink by the
      factor a = 1 - u * `ltx_partial_noise_fraction` (u uniform in [0, 1)): its sigma is a * sigma, its noise (in
      the input and the target) a * noise.

    The denoiser gets the per-frame timestep scale as `frame_timestep_scale` (see `ltxvideo.predict`)."""

    protect: bool
    probability: float
    partial_fraction: float

    @classmethod
    def for_run(cls, config: Any, family: Family) -> FirstFrame | None:
        """The run's conditioning, or None when no batch can get it (another family, or ltx_train_mode t2v)."""
        if family.predict is not ltxvideo.predict:
            if config.ltx_protect_first_frame:
                log.warning("ltx_protect_first_frame applies to model_family ltxvideo only; %s ignores it (as in "
                            "SimpleTuner)", family.name)  # fmt: skip
            return None
        if config.ltx_train_mode != "i2v":
            return None
        chosen = cls(bool(config.ltx_protect_first_frame), float(config.ltx_i2v_prob),
                     float(config.ltx_partial_noise_fraction))  # fmt: skip
        log.info("ltx_train_mode i2v: clips of video datasets with video.is_i2v get first-frame conditioning (%s)",
                 "the first latent frame clean at timestep 0, out of the loss" if chosen.protect else
                 f"in {chosen.probability:g} of batches, up to {chosen.partial_fraction:g} less noise on the first "
                 "latent frame")  # fmt: skip
        return chosen

    @staticmethod
    def applies(dataset: dict[str, Any], latents: Any) -> bool:
        """Whether a batch of `dataset` (its cache manifest entry) with these latents is conditioned."""
        if dataset.get("dataset_type") != "video" or latents.ndim != 5 or latents.shape[2] < 2:
            return False
        if "video" not in dataset:
            raise InputError(f"video dataset {dataset.get('id')!r}: the cache manifest records no video settings "
                             "(is_i2v), which LTX-Video's first-frame conditioning (ltx_train_mode i2v) reads; re-run "
                             "`st cache` with --force, or set ltx_train_mode t2v")  # fmt: skip
        return bool(dataset["video"].get("is_i2v"))

    def apply(self, noised: Any, latents: Any, generator: Any) -> tuple[Any, dict[str, Any], FrameLossMask | None]:
        """The conditioned batch: `noised` with its first frame changed, the denoiser's extra text inputs and the loss
        mask (None: the loss covers every frame). Draws from `generator` only without `protect`."""
        import torch

        batch, frames = latents.shape[0], latents.shape[2]
        if self.protect:
            first = torch.zeros(batch)
        else:
            coin = float(torch.rand(1, generator=generator, dtype=torch.float64))
            if coin >= self.probability:
                return noised, {}, None
            shrink = float(torch.rand(1, generator=generator, dtype=torch.float64)) * self.partial_fraction
            first = torch.full((batch,), 1.0 - shrink)
        device = noised.noisy.device
        a = first.to(device=device, dtype=noised.noisy.dtype).view(batch, 1, 1, 1, 1)
        s = noised.sigmas.to(device=device, dtype=noised.noisy.dtype).view(batch, 1, 1, 1, 1)
        x0 = latents[:, :, :1].to(device=device, dtype=noised.noisy.dtype)
        # noisy = (1 - s) x + s n  ->  (1 - a s) x + a s (a n), written with the noisy frame (n may carry perturbation)
        noisy0 = a.square() * noised.noisy[:, :, :1] + (1 - a * s - a.square() * (1 - s)) * x0
        noise0 = a * noised.noise[:, :, :1]
        changed = replace(noised, noisy=torch.cat([noisy0, noised.noisy[:, :, 1:]], dim=2),
                          noise=torch.cat([noise0, noised.noise[:, :, 1:]], dim=2),
                          target=torch.cat([noise0 - x0, noised.target[:, :, 1:]], dim=2))  # fmt: skip
        scale = torch.ones(batch, frames, device=device)
        scale[:, 0] = first.to(device)
        loss_mask = FrameLossMask((scale > 0).to(torch.float32)) if self.protect else None
        return changed, {ltxvideo.FRAME_SCALE_KEY: scale}, loss_mask


def load_base_parts(family: Family, source: str, config: Any, base_dir: Any, precision: Any) -> dict[str, Any]:
    """The frozen denoiser and the scheduler of a run (`quantise.load_base`), the denoiser from SimpleTuner's
    override options when they name another one (`identity.denoiser_source`)."""
    from pathlib import Path

    from ..families import load_components
    from ..families.identity import denoiser_source
    from ..families.loading import load_denoiser
    from ..quantise import load_base, load_quantisation

    override = denoiser_source(config, family, source, Path(base_dir or Path.cwd()))
    if override is None:
        return load_base(family, source, precision)
    log.info("the %s comes from %s%s", family.denoiser.subfolder, override.source,
             f" (subfolder {override.subfolder})" if override.subfolder else "")  # fmt: skip
    if override.single_file_config is not None:  # an AnimeGen stage file over the base folder's slot (`denoiser_file`)
        denoiser = family.load_denoiser_file(family, override.source, *override.single_file_config,
                                             dtype=precision.torch_dtype(),
                                             quantization_config=load_quantisation(precision))  # fmt: skip
        return {**load_components(family, source, which=("scheduler",)), "denoiser": denoiser}
    denoiser = load_denoiser(family, override.source, override.subfolder, revision=config.revision,
                             variant=config.variant, dtype=precision.torch_dtype(),
                             quantization_config=load_quantisation(precision))  # fmt: skip
    return {**load_components(family, source, which=("scheduler",)), "denoiser": denoiser}
