"""Quantisation while loading (`quantize_via pipeline`, the pipeline-only presets nf4-bnb and int4-torchao, and
`quantization_config`): the denoiser is loaded through a diffusers quantization config (BitsAndBytesConfig,
TorchAoConfig, QuantoConfig), built as SimpleTuner builds it.

`resolve` is pure (no torch import) so that `st train` can refuse what this device cannot run before any work;
`build` makes the diffusers object at load time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import resolve_relative_path
from .errors import ConfigError

# Presets SimpleTuner only ever quantises while loading, whatever quantize_via says.
PIPELINE_ONLY = ("nf4-bnb", "int4-torchao")
# torchao quantisation by preset, and the torchao config class of each quant_type name (SimpleTuner's tables).
TORCHAO_PRESET_TYPES = {"int4-torchao": "int4_weight_only", "int8-torchao": "int8_weight_only",
                        "fp8-torchao": "float8_dynamic_activation_float8_weight"}  # fmt: skip
TORCHAO_TYPE_CONFIGS = {
    "float8_dynamic_activation_float8_weight": "Float8DynamicActivationFloat8WeightConfig",
    "float8_dynamic_activation_int4_weight": "Float8DynamicActivationInt4WeightConfig",
    "int4_weight_only": "Int4WeightOnlyConfig",
    "int8_dynamic_activation_int8_weight": "Int8DynamicActivationInt8WeightConfig",
    "int8_dynamic_activation_intx_weight": "Int8DynamicActivationIntxWeightConfig",
    "int8_weight_only": "Int8WeightOnlyConfig",
    "float8_weight_only": "Float8WeightOnlyConfig",
}
# torchao quant types whose kernels exist only on CUDA (int4: tinygemm / mslk; fp8 activations: sm89 or newer).
TORCHAO_CUDA_TYPES = {"int4_weight_only": "torchao int4 (tinygemm, with the mslk package)",
                      "float8_dynamic_activation_float8_weight": "torchao fp8 (compute capability 8.9 or newer)",
                      "float8_dynamic_activation_int4_weight": "torchao fp8 x int4 (compute capability 8.9 or newer)"}  # fmt: skip
# diffusers' QuantoConfig weight names by preset (fp8uz has no diffusers name: SimpleTuner maps it to float8).
QUANTO_PRESET_WEIGHTS = {"int8-quanto": "int8", "int4-quanto": "int4", "int2-quanto": "int2", "fp8-quanto": "float8",
                         "fp8uz-quanto": "float8"}  # fmt: skip


@dataclass(frozen=True)
class LoadQuantisation:
    """How the denoiser is quantised while loading: `backend` ("bitsandbytes", "torchao" or "quanto") and the JSON
    `settings` of its diffusers config (`quant_type` names the torchao config; the rest are keyword arguments)."""

    backend: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda_requirement(self) -> str | None:
        """What needs CUDA here (None: runs on the CPU too)."""
        if self.backend == "bitsandbytes":
            return "bitsandbytes 4/8-bit (diffusers' BitsAndBytes loader)"
        if self.backend == "torchao":
            return TORCHAO_CUDA_TYPES.get(self.settings.get("quant_type", ""))
        return None

    def record(self) -> dict[str, Any]:
        return {"backend": self.backend, **self.settings}


def read_quantization_config(value: Any, base_dir: Path) -> dict[str, Any] | None:
    """`quantization_config` as SimpleTuner reads it: a JSON object, JSON text, or the path of a JSON file."""
    if value in (None, "", "None"):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("{", "[")):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"quantization_config is not valid JSON ({exc}); give a JSON object or the "
                                  "path of a JSON file") from None  # fmt: skip
        else:
            path = resolve_relative_path(text, base_dir)
            if not path.is_file():
                raise ConfigError(f"quantization_config {text!r}: no such file ({path}); give a JSON object or the "
                                  "path of a JSON file")  # fmt: skip
            try:
                value = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"quantization_config {path}: cannot be read as JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"quantization_config must be a JSON object (per component: unet, transformer, "
                          f"text_encoder or default), not a {type(value).__name__}")  # fmt: skip
    return value


def loads_quantised(preset: str, quantize_via: str, settings: dict[str, Any] | None, subfolder: str) -> bool:
    """Whether the denoiser is quantised while loading (SimpleTuner's rule: pipeline mode, a pipeline-only preset,
    or a quantization_config entry for it)."""
    return (quantize_via == "pipeline" or preset in PIPELINE_ONLY
            or _entry(settings, subfolder) is not None)  # fmt: skip


def resolve(preset: str, quantize_via: str, settings: dict[str, Any] | None,
            subfolder: str) -> LoadQuantisation | None:  # fmt: skip
    """The load-time quantisation of the denoiser (held in `subfolder`: unet or transformer), or None."""
    if not loads_quantised(preset, quantize_via, settings, subfolder):
        return None
    entry = _entry(settings, subfolder)
    chosen = preset if preset != "no_change" else None
    if isinstance(entry, str):
        chosen, entry = entry, None
    if entry is not None and not isinstance(entry, dict):
        raise ConfigError(f"quantization_config[{subfolder!r}] must be a preset name or a JSON object of settings, "
                          f"not {entry!r}")  # fmt: skip
    overrides = dict(entry or {})
    if chosen is None:
        chosen = _preset_from_keys(overrides)
    if chosen is None:
        if entry is None:
            return None  # quantize_via pipeline without a preset or a config: nothing to quantise
        raise ConfigError(f"quantization_config[{subfolder!r}] {overrides}: cannot tell the backend; use the keys of "
                          "BitsAndBytesConfig (load_in_4bit, bnb_4bit_*), QuantoConfig (weights_dtype) or "
                          "TorchAoConfig (quant_type), or a preset name such as \"nf4-bnb\"")  # fmt: skip
    if chosen == "nf4-bnb":
        return LoadQuantisation("bitsandbytes", {"load_in_4bit": True, "bnb_4bit_use_double_quant": True,
                                                 "bnb_4bit_quant_type": "nf4", **overrides})  # fmt: skip
    if chosen in TORCHAO_PRESET_TYPES:
        quant_type = overrides.pop("quant_type", None) or TORCHAO_PRESET_TYPES[chosen]
        if quant_type not in TORCHAO_TYPE_CONFIGS:
            raise ConfigError(f"quantization_config quant_type {quant_type!r} is not one of "
                              f"{', '.join(sorted(TORCHAO_TYPE_CONFIGS))}")  # fmt: skip
        return LoadQuantisation("torchao", {"quant_type": quant_type, **overrides})
    if chosen in QUANTO_PRESET_WEIGHTS:
        weights = overrides.pop("weights_dtype", overrides.pop("weights", QUANTO_PRESET_WEIGHTS[chosen]))
        return LoadQuantisation("quanto", {"weights_dtype": weights, **overrides})
    raise ConfigError(f"quantization_config names the preset {chosen!r}, which diffusers cannot load with; use "
                      f"one of {', '.join(['nf4-bnb', *TORCHAO_PRESET_TYPES, *QUANTO_PRESET_WEIGHTS])}")  # fmt: skip


def _entry(settings: dict[str, Any] | None, subfolder: str) -> Any:
    """The denoiser's entry of a per-component quantization_config (SimpleTuner's keys, then "default")."""
    if not settings:
        return None
    for key in (subfolder, "model", "default"):
        if key in settings:
            return settings[key]
    return None


def _preset_from_keys(overrides: dict[str, Any]) -> str | None:
    """The preset whose builder reads these settings (SimpleTuner infers the backend from the keys)."""
    if any(k.startswith("bnb_") or k in ("load_in_4bit", "load_in_8bit") for k in overrides):
        return "nf4-bnb"
    if "weights_dtype" in overrides or "weights" in overrides:
        return "int8-quanto"
    if {"quant_type", "quant_type_kwargs", "modules_to_not_convert"} & overrides.keys():
        return "int4-torchao"
    return None


def build(spec: LoadQuantisation, compute_dtype: Any) -> Any:
    """The diffusers quantization config of `spec`; `compute_dtype` is bitsandbytes' default compute dtype."""
    import diffusers

    settings = dict(spec.settings)
    try:
        if spec.backend == "bitsandbytes":
            settings.setdefault("bnb_4bit_compute_dtype", compute_dtype)
            return diffusers.BitsAndBytesConfig(**settings)
        if spec.backend == "quanto":
            return diffusers.QuantoConfig(**settings)
        return _torchao_config(settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"quantization_config {spec.record()}: diffusers refused it ({exc})") from None


def _torchao_config(settings: dict[str, Any]) -> Any:
    """TorchAoConfig around the torchao config class of `quant_type`: the TorchAoConfig keywords (e.g.
    modules_to_not_convert) go to it, every other key (and quant_type_kwargs) to the torchao config."""
    import inspect

    import torch
    from diffusers import TorchAoConfig
    from torchao.quantization import quant_api

    quant_type = settings.pop("quant_type")
    inner = dict(settings.pop("quant_type_kwargs", None) or {})
    outer_names = set(inspect.signature(TorchAoConfig.__init__).parameters) - {"self", "quant_type", "kwargs"}
    outer = {k: settings.pop(k) for k in list(settings) if k in outer_names}
    inner.update(settings)
    if quant_type == "int8_dynamic_activation_int8_weight":
        inner.setdefault("version", 2)
    if quant_type == "int8_dynamic_activation_intx_weight":
        inner.setdefault("weight_dtype", "int4")
    inner = {k: getattr(torch, v) if k.endswith("_dtype") and isinstance(v, str) else v for k, v in inner.items()}
    return TorchAoConfig(quant_type=getattr(quant_api, TORCHAO_TYPE_CONFIGS[quant_type])(**inner), **outer)
