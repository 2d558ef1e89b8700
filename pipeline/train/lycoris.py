"""LyCORIS adapters (`lora_type = "lycoris"`), built by the lycoris-lora library from `lycoris_config`.

The JSON is read as SimpleTuner reads it: `multiplier`, `linear_dim` and `linear_alpha` (as integers) become
`create_lycoris`'s positional arguments, `apply_preset` goes to `LycorisNetwork.apply_preset`, every other key is
passed on as a keyword. The network is registered on the denoiser as the submodule `lycoris_network`, so that
checkpoints, EMA and `.to()` see its weights like any other trainable parameter.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from ..log import get_logger
from ..lycoris_format import HEADER_KEY, NETWORK_ATTR
from ..lycoris_settings import INTEGER_KEYS

log = get_logger("train")

# LycorisNetwork's class attributes that apply_preset changes: reset before each network so that one run's preset
# never leaks into the next one in the same process.
_PRESET_ATTRS = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
                 "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")  # fmt: skip


@functools.cache
def _class_defaults() -> dict[str, Any]:
    from lycoris import LycorisNetwork

    return {name: copy.deepcopy(getattr(LycorisNetwork, name)) for name in _PRESET_ATTRS}


def _apply_preset(preset: dict[str, Any] | None) -> None:
    from lycoris import LycorisNetwork

    for name, value in _class_defaults().items():
        setattr(LycorisNetwork, name, copy.deepcopy(value))
    if preset:
        LycorisNetwork.apply_preset(copy.deepcopy(preset))


def build(denoiser, settings: dict[str, Any], *, source: str, init_lora: Path | None = None,
          init_lokr_norm: float | None = None):  # fmt: skip
    """Wrap `denoiser` with the LyCORIS network `settings` describe (from `init_lora`'s weights when given) and
    register it as `denoiser.lycoris_network`; `source` names the settings' file in messages."""
    from lycoris import create_lycoris, create_lycoris_from_weights

    kwargs = copy.deepcopy(settings)
    multiplier, linear_dim, linear_alpha = (int(kwargs.pop(k, d)) for k, d in zip(INTEGER_KEYS, (1, 4, 1)))
    _apply_preset(kwargs.pop("apply_preset", None))
    if init_lora is not None:
        file = init_lora / "pytorch_lora_weights.safetensors" if init_lora.is_dir() else init_lora
        if not file.is_file():
            raise InputError(f"init_lora {init_lora}: no such LyCORIS safetensors file")
        network = create_lycoris_from_weights(multiplier, str(file), denoiser, **kwargs)[0]
        if not network.loras:
            raise InputError(f"init_lora {file}: holds no LyCORIS module of this denoiser (`lycoris_*` keys named "
                             "after its modules); use a file that lora_type lycoris saved for this model family")  # fmt: skip
        log.info("started LyCORIS from %s", file)
    else:
        network = create_lycoris(denoiser, multiplier, linear_dim, linear_alpha, **kwargs)
        if init_lokr_norm is not None:
            perturbed_normal_init(network, init_lokr_norm)
    if not network.loras:
        raise ConfigError(f"lycoris_config {source}: the LyCORIS network matched no module of the denoiser; check "
                          "apply_preset.target_module / target_name (class and module names of the model)")  # fmt: skip
    network.apply_to()
    denoiser.add_module(NETWORK_ATTR, network)
    network.requires_grad_(True)
    log.info("LyCORIS %s: %d modules, %d parameters", settings.get("algo", "lora"), len(network.loras),
             sum(p.numel() for p in network.parameters()))  # fmt: skip
    return network


def perturbed_normal_init(network, scale: float) -> None:
    """init_lokr_norm as SimpleTuner applies it: every LoKr module's w1 is all ones and w2 a normal draw given the
    norm, std and mean of the module's base weight, times `scale` (so the adapter starts near, not at, zero)."""
    import torch

    with torch.no_grad():
        for module in network.loras:
            w1, w2 = getattr(module, "lokr_w1", None), getattr(module, "lokr_w2", None)
            if not isinstance(w1, torch.nn.Parameter) or not isinstance(w2, torch.nn.Parameter):
                raise ConfigError(f"init_lokr_norm needs LoKr modules with whole w1 and w2 matrices; "
                                  f"{module.lora_name} has none (use algo lokr with full_matrix true, or remove "
                                  "init_lokr_norm)")  # fmt: skip
            base = module.org_module[0].weight.detach().float()
            draw = torch.randn(w2.shape, dtype=torch.float32)
            draw = draw * (base.norm() / draw.norm())
            draw = draw * (base.std() / draw.std())
            draw = (draw - draw.mean() + base.mean()) * scale
            w1.fill_(1.0)
            w2.copy_(draw.to(w2.dtype))


def network_of(denoiser):
    """The LyCORIS network registered on `denoiser`, or None."""
    return getattr(denoiser, "_modules", {}).get(NETWORK_ATTR)


def state(network) -> dict[str, Any]:
    """The network's weights under the library's own names (`lycoris_<module>.<weight>`)."""
    return {k: v.detach() for k, v in network.state_dict().items()}


def save(network, path: Path, settings: dict[str, Any]) -> Path:
    """The library's file: `lycoris_*` keys, the settings in the `lycoris_config` header entry, every tensor in the
    dtype of the network's first parameter (as SimpleTuner's `save_weights(path, parameters()[0].dtype, ...)`)."""
    from ..tensorfile import save_tensors

    dtype = next(network.parameters()).dtype
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state(network).items()}
    save_tensors(path, tensors, metadata={HEADER_KEY: json.dumps(settings, sort_keys=True)})
    return path
