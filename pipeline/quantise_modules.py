"""Quantising a frozen module other than the denoiser with a SimpleTuner preset: the text encoders of `st cache`
(`text_encoder_1_precision` .. `text_encoder_4_precision`).

As SimpleTuner does, a text encoder is quantised with the denoiser's backends and weight types (and the family's
module exclusions), weights only, in host memory before it moves to the device. The presets diffusers applies while
loading (nf4-bnb, int4-torchao) are the denoiser's only. A preset this machine cannot run, or that st does not apply
to text encoders, stops the stage with exit 2 before any work.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError, NotSupportedError
from .log import get_logger
from .machine import require
from .quantise import (
    CUDA_ONLY,
    NO_CHANGE,
    QUANTO_WEIGHTS,
    TORCHAO_PRESETS,
    BasePrecision,
    _quanto,
    _torchao,
    cuda_capable,
    parameter_bytes,
)  # fmt: skip
from .quantise_pipeline import PIPELINE_ONLY

log = get_logger("quantise")

TEXT_ENCODER_OPTIONS = tuple(f"text_encoder_{n}_precision" for n in range(1, 5))
# The presets applied to a loaded module (the others are diffusers load-time configurations).
MODULE_PRESETS = (*QUANTO_WEIGHTS, *(p for p in TORCHAO_PRESETS if p not in PIPELINE_ONLY))


def text_encoder_precisions(config: Any) -> tuple[str, ...]:
    """text_encoder_1_precision .. text_encoder_4_precision of `config`, in order."""
    return tuple(getattr(config, name) for name in TEXT_ENCODER_OPTIONS)


def check_text_encoder_precisions(precisions: tuple[str, ...], family: Any, *, trained: bool = False,
                                  cuda: bool | None = None) -> None:  # fmt: skip
    """Refuse (exit 2, naming the option) a precision for an encoder `family` lacks, a preset this machine or st
    cannot run on a text encoder, or any preset with `trained` (train_text_encoder) text encoders."""
    # (OmniGen's text encoder slot holds only its tokenizer, `NoEncoderTokenizer`: nothing to quantise)
    encoders = [spec for spec in family.text_encoders if not spec.model.class_name.endswith("Tokenizer")]
    count = len(encoders)
    for number, preset in enumerate(precisions, start=1):
        if preset == NO_CHANGE:
            continue
        option = f"text_encoder_{number}_precision"
        if number > count:
            kinds = ", ".join(f"{i} = {spec.model.class_name}" for i, spec in enumerate(encoders, 1)) or "none"
            raise ConfigError(f"{option} is {preset}, but {family.name} has {count} text encoder(s) ({kinds}); "
                              f"remove {option} or set it to no_change")  # fmt: skip
        if trained:
            raise NotSupportedError(f"st does not implement {option} {preset} with train_text_encoder yet (a "
                                    f"quantised text encoder trained); set {option} no_change or train_text_encoder "
                                    "false")  # fmt: skip
        check_preset(option, preset, cuda)


def check_preset(option: str, preset: str, cuda: bool | None = None) -> None:
    """Refuse a preset of `option` that needs a CUDA GPU this machine lacks, that st does not apply to a loaded
    module, or whose package is missing."""
    if preset == NO_CHANGE:
        return
    if preset in CUDA_ONLY:
        require(cuda_capable(preset) if cuda is None else cuda,
                f"{option} {preset} ({CUDA_ONLY[preset]}) needs a CUDA GPU and none is present; on this machine use "
                f"one of {', '.join(p for p in MODULE_PRESETS if p not in CUDA_ONLY)}, or no_change")  # fmt: skip
    if preset not in MODULE_PRESETS:
        raise NotSupportedError(f"st does not implement {option} {preset} yet (st loads {preset} through diffusers "
                                f"for the denoiser only); use one of {', '.join(MODULE_PRESETS)}, or "
                                "no_change")  # fmt: skip
    from importlib.util import find_spec

    package = "optimum.quanto" if preset in QUANTO_WEIGHTS else "torchao"
    require(find_spec(package) is not None,
            f"{option} {preset} needs the {package} package: pip install {package.replace('.', '-')}")


def quantise_module(module: Any, preset: str, family: str, what: str) -> Any:
    """Quantise the frozen `module`'s weights in place with `preset` (checked by `check_preset`), with the
    denoiser's backends; `what` names it in the log line."""
    if preset == NO_CHANGE:
        return module
    before = parameter_bytes(module)
    if preset in QUANTO_WEIGHTS:
        _quanto(module, BasePrecision(preset=preset), family)
    else:
        _torchao(module, preset)
    log.info("quantised %s to %s: %.1f MiB -> %.1f MiB of weights", what, preset, before / 2**20,
             parameter_bytes(module) / 2**20)  # fmt: skip
    return module
