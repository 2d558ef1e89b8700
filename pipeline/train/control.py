"""`control: true`: channel-wise control training (SimpleTuner's `--control`), for Flux as `FluxControlPipeline`
runs it (FLUX.1-Canny/Depth-dev style; `pipeline.families.flux_control`).

The run trains a LoRA on the Flux transformer whose input layer is widened to take the control image's latents
beside the noisy latents (new weights zero); the LoRA on that layer learns the control channels. The samples'
conditioning images (a `dataset_type: conditioning` dataset or a generator) are the control images, read from the
cache as VAE latents like a reference image's (`pipeline.train.reference`). Validation renders through
FluxControlPipeline with each sample's control image; publish writes a LoRA that `FluxControlPipeline.
load_lora_weights` loads (it widens the base's input layer the same way).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, NotSupportedError
from ..families import Family, flux_control
from ..log import get_logger

log = get_logger("train")

FAMILIES = ("flux",)  # families with a channel-wise control pipeline in diffusers that st trains


def family_for_run(family: Family, config, source: str) -> Family:
    """The family a run trains: the flavour's (`Family.for_run`), or Flux control for `control: true` (refused, with
    the reason, where it cannot train)."""
    variant = family.for_run(config.model_flavour, source)
    if not config.control:
        return variant
    check(config, variant)
    return flux_control.FAMILY


def check(config, family: Family) -> None:
    """Refuse, before any model loads, a control run st cannot train."""
    if config.controlnet:
        raise ConfigError("controlnet and control are two kinds of conditioning training; set one of them")
    if family.name not in FAMILIES or family.takes_reference:
        which = family.pipeline_class if family.takes_reference else f"model_family {family.name}"
        raise NotSupportedError(f"control: true (channel-wise control) is not supported for {which}: st trains it for "
                                f"{', '.join(FAMILIES)} (FluxControlPipeline); for another family use controlnet: "
                                "true")  # fmt: skip
    if config.model_type != "lora" or config.lora_type != "standard":
        raise NotSupportedError("control: true trains a LoRA (lora_type standard) on the transformer with its widened "
                                "input layer, as FluxControlPipeline loads it; set model_type lora and lora_type "
                                "standard")  # fmt: skip
    targets = config.peft_lora_target_modules
    if targets and flux_control.INPUT_LAYER not in targets:
        raise ConfigError(f"control: true learns the control channels through a LoRA on {flux_control.INPUT_LAYER}, "
                          f"and peft_lora_target_modules {list(targets)} leaves it out: add "
                          f"{flux_control.INPUT_LAYER!r}, or unset peft_lora_target_modules")  # fmt: skip
    if config.train_text_encoder:
        raise ConfigError("train_text_encoder cannot be combined with control: true; set one of them to false")


def prepare_denoiser(family: Family, denoiser: Any) -> None:
    """Widen the transformer's input layer for a control run (before it is quantised and the LoRA attached)."""
    if family.pipeline_class == flux_control.PIPELINE_CLASS:
        flux_control.widen_input(denoiser)
        log.info("control: %s takes %d input channels (the control latents' weights start at zero)",
                 flux_control.INPUT_LAYER, denoiser.config.in_channels)  # fmt: skip
