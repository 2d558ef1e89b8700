"""GGUF single-file transformers (`pretrained_transformer_model_name_or_path` ending in .gguf, as SimpleTuner reads
it): the quantised weights are loaded with diffusers' GGUF loader (the `gguf` package), dequantised per layer in the
forward; the configs, VAE and text encoders come from `pretrained_model_name_or_path` (a diffusers folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import resolve_relative_path
from .errors import ConfigError

OPTION = "pretrained_transformer_model_name_or_path"
# Families whose transformer class diffusers loads from a single GGUF file.
GGUF_FAMILIES = ("flux", "sd3")


def gguf_path(config: Any, base_dir: Path | None) -> Path | None:
    """The .gguf transformer of `config`, checked (exit 2 naming the fix), or None when the option is unset or names
    a diffusers transformer (a folder or hub id: `identity.denoiser_source`'s)."""
    value = getattr(config, OPTION)
    if value in (None, "") or not str(value).endswith(".gguf"):
        return None
    if config.model_family not in GGUF_FAMILIES:
        raise ConfigError(f"{OPTION} is a .gguf transformer, which diffusers loads for {', '.join(GGUF_FAMILIES)}; "
                          f"{config.model_family} has none: remove {OPTION}")  # fmt: skip
    path = resolve_relative_path(str(value), base_dir or Path.cwd())
    if not path.is_file():
        raise ConfigError(f"{OPTION} {value!r}: no such file ({path})")
    if config.base_model_precision != "no_change" or config.quantization_config not in (None, ""):
        raise ConfigError(f"{OPTION} is a GGUF file, which is already quantised; remove base_model_precision "
                          "and quantization_config (or use the diffusers folder unquantised and quantise it)")  # fmt: skip
    from importlib.util import find_spec

    from .machine import require

    require(find_spec("gguf") is not None, f"{OPTION} {path.name} needs the gguf package: pip install gguf")
    return path


def load_gguf_denoiser(family: Any, path: Path, config_source: str, dtype: Any) -> Any:
    """The family's transformer from the GGUF file at `path`, its config from `config_source` (a diffusers folder or
    hub id); unquantised tensors and the compute in `dtype`."""
    from diffusers import GGUFQuantizationConfig

    cls = family.denoiser.load_class()
    return cls.from_single_file(str(path), config=str(config_source), subfolder=family.denoiser.subfolder,
                                quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), torch_dtype=dtype)  # fmt: skip
