"""`controlnet: true` with `model_type: lora`: an adapter on the ControlNet instead of the whole ControlNet, as
SimpleTuner trains it (its ControlNet guide's example config): a peft LoRA on the transformer ControlNets (SD3, Flux)
and a peft LoHa on the UNet ControlNets (SD 1.x, SDXL, whose convolutions it trains too), on SimpleTuner's target
modules (`ControlNetSpec.lora_targets`) unless `peft_lora_target_modules` names others.

The ControlNet under the adapter is rebuilt the same way on every run (from the base's weights, seeded, or loaded),
so checkpoints hold the adapter only. `final/controlnet/` is the ControlNet with the adapter merged (a diffusers
ControlNet folder, as a full run writes) and `final/controlnet_lora.safetensors` the adapter alone, in SimpleTuner's
layout (peft names prefixed `controlnet.`, its settings in the header).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError, NotSupportedError
from ..families.controlnet import ADAPTER_FILE, ControlNetSpec
from .seeding import isolated_rng

PREFIX = "controlnet."
_ADAPTER_NAMES = ("lora_", "hada_")  # peft's LoRA and LoHa parameter names
_SETTINGS_ATTR = "_st_adapter_config"


def check(config) -> None:
    """Refuse, before any model loads, adapter settings st does not train on a ControlNet."""
    refused = {"lora_type": (config.lora_type, "standard"), "peft_lora_mode": (config.peft_lora_mode, "standard"),
               "lora_init_type": (config.lora_init_type, "default"), "init_lora": (config.init_lora, None),
               "slider_lora_target": (config.slider_lora_target, False)}  # fmt: skip
    for name, (value, default) in refused.items():
        if value != default:
            raise NotSupportedError(f"{name} {value!r} with controlnet: true and model_type lora is not supported; "
                                    f"unset it (default {default!r}) or set model_type full")  # fmt: skip


def is_adapter(name: str) -> bool:
    return any(part in name for part in _ADAPTER_NAMES)


def adapter_config(spec: ControlNetSpec, config, saved: bool = False) -> Any:
    """peft's LoraConfig (or LoHaConfig for the UNet ControlNets) from the run's LoRA options. `saved`: without dropout,
    as written into the file's header."""
    from peft import LoHaConfig, LoraConfig

    targets = list(config.peft_lora_target_modules or spec.lora_targets)
    alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
    dropout = 0.0 if saved else config.lora_dropout
    if spec.adapter == "loha":
        return LoHaConfig(r=config.lora_rank, alpha=alpha, rank_dropout=dropout, module_dropout=0.0,
                          use_effective_conv2d=True, target_modules=targets)  # fmt: skip
    return LoraConfig(r=config.lora_rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      use_dora=config.use_dora)  # fmt: skip


def attach(controlnet: Any, spec: ControlNetSpec, config, seed: int) -> None:
    """Freeze `controlnet` and inject the adapter (its initial weights depend on `seed` only); only it trains."""
    from peft import inject_adapter_in_model

    controlnet.requires_grad_(False)
    settings = adapter_config(spec, config)
    try:
        with isolated_rng(seed=seed):
            inject_adapter_in_model(settings, controlnet)
    except ValueError as exc:
        raise ConfigError(f"LoRA targets do not fit the {type(controlnet).__name__}: {exc}; set "
                          "peft_lora_target_modules to module names of the ControlNet") from None  # fmt: skip
    # what the adapter file's header records (a plain attribute, not a registered submodule)
    object.__setattr__(controlnet, _SETTINGS_ATTR, adapter_config(spec, config, saved=True))
    params = [p for n, p in controlnet.named_parameters() if is_adapter(n)]
    if not params:
        raise ConfigError("no adapter parameters were created on the ControlNet; check peft_lora_target_modules")
    for p in params:
        p.requires_grad_(True)


def trainable_state(controlnet: Any) -> dict[str, Any]:
    """What a checkpoint stores: the adapter's weights, under the trainer model's parameter names."""
    return {f"{PREFIX}{n}": p.detach() for n, p in controlnet.named_parameters() if is_adapter(n)}


def has_adapter(controlnet: Any) -> bool:
    return any(is_adapter(n) for n, _ in controlnet.named_parameters())


def merged(controlnet: Any) -> Any:
    """A plain copy of the ControlNet class with the adapter merged into its weights (the live model is unchanged)."""
    import torch
    from accelerate import init_empty_weights
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in controlnet.modules() if isinstance(m, BaseTunerLayer)]
    with torch.no_grad():
        for layer in layers:
            layer.merge()
        try:
            state = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in controlnet.state_dict().items()
                     if not is_adapter(k)}  # fmt: skip
        finally:
            for layer in layers:
                layer.unmerge()
    with init_empty_weights():
        plain = type(controlnet).from_config(controlnet.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


def save_adapter(controlnet: Any, out_dir: Path) -> Path:
    """The adapter alone in SimpleTuner's layout: `controlnet.<module>.lora_A.weight` (LoHa: `.hada_w1_a`, ...),
    with its peft settings as `lora_adapter_metadata`."""
    from peft import get_peft_model_state_dict

    from ..tensorfile import save_tensors

    state = {f"{PREFIX}{k}": v.detach().contiguous() for k, v in get_peft_model_state_dict(controlnet).items()}
    settings = getattr(controlnet, _SETTINGS_ATTR).to_dict()
    settings = {k: sorted(v) if isinstance(v, set) else v for k, v in settings.items()}
    path = out_dir / ADAPTER_FILE
    save_tensors(path, state, metadata={"lora_adapter_metadata": json.dumps(settings, sort_keys=True, default=str),
                                        "format": "pt"})  # fmt: skip
    return path
