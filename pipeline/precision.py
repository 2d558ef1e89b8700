"""The precision a stage uses when the config leaves `mixed_precision` / `vae_dtype` at SimpleTuner's default, bf16.

bf16 is SimpleTuner's default for both. On a device without bf16 (a CPU without AVX512-BF16/AMX, an older GPU) the
stage uses full precision instead and says so in one log line; a bf16 the config sets itself is always kept. The
resolved value is what enters the stage key, so outputs made with and without bf16 are never taken for each other.
"""

from __future__ import annotations

import dataclasses
import functools

from .config import LoadedConfig
from .log import get_logger

log = get_logger("precision")


@functools.cache
def bf16_supported() -> bool:
    """Whether the device a stage runs on (the GPU when there is one, else the CPU) computes in bf16 natively."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_bf16_on_device(loaded: LoadedConfig, option: str, fallback: str) -> LoadedConfig:
    """`loaded` with `option` set to `fallback` when it is bf16 only by default and this device lacks bf16."""
    config = loaded.config
    if getattr(config, option) != "bf16" or option in loaded.explicit or bf16_supported():
        return loaded
    log.info("%s: this device has no bf16, so %s is used instead of the default bf16 (set %s to choose)",
             option, fallback, option)  # fmt: skip
    return dataclasses.replace(loaded, config=dataclasses.replace(config, **{option: fallback}))
