"""A diffusers LoRA -> the single-file layout ComfyUI loads.

UNet families get Kohya keys (`lora_unet_<path>.lora_down.weight` / `.lora_up.weight` / `.alpha`), transformer
families native keys (`diffusion_model.<path>.lora_A.weight` / `.lora_B.weight` / `.alpha`); see `keymaps` for the
names. ComfyUI scales a LoRA by `alpha / rank` of the file, so each `.alpha` is the module's configured alpha and
`up` is rescaled only where that alone would not reproduce peft's scale (rsLoRA, or a fused module whose rank is the
sum of its parts' ranks). A fused module's `down` stacks its parts' `down` matrices and its `up` is block-diagonal,
with zero rows for slots no LoRA targeted, so its product equals the parts' products in their row ranges exactly.
"""

from __future__ import annotations

from typing import Any

from ..errors import NotSupportedError
from ..log import get_logger
from . import keymaps
from .lora import LoraModule

log = get_logger("publish")

UNET_FAMILIES = {"sd1x": False, "sd2x": False, "sdxl": True}  # family -> Kohya names in SGM layout
TRANSFORMER_FAMILIES = ("flux", "sd3", "pixart_sigma")


def convert(family: str, mods: list[LoraModule], denoiser_config: dict[str, Any] | None) -> dict[str, Any]:
    """ComfyUI tensors for the LoRA `mods` of a `family` denoiser (its diffusers config names SDXL's blocks)."""
    if family in UNET_FAMILIES:
        return _kohya(mods, UNET_FAMILIES[family], denoiser_config or {})
    if family in TRANSFORMER_FAMILIES:
        return _native(family, mods, denoiser_config or {})
    raise NotSupportedError(f"no ComfyUI LoRA layout is known for {family}; publish with lora_format = \"diffusers\"")


def _alpha_tensor(alpha: float) -> Any:
    import torch

    return torch.tensor(float(alpha), dtype=torch.float32)


def _scaled(up: Any, factor: float) -> Any:
    return up if factor == 1.0 else (up.float() * factor).to(up.dtype)


def _unmapped(family: str, module: str) -> NotSupportedError:
    return NotSupportedError(f"the {family} LoRA module {module!r} has no counterpart in the ComfyUI checkpoint "
                             "layout; publish with lora_format = \"diffusers\" or train other targets")  # fmt: skip


def _kohya(mods: list[LoraModule], sgm: bool, config: dict[str, Any]) -> dict[str, Any]:
    if sgm and "down_block_types" not in config:
        log.warning("publish: the base UNet config is unknown; naming SGM blocks as in SDXL 1.0's UNet")
        config = keymaps.SDXL_UNET
    out: dict[str, Any] = {}
    for mod in mods:
        name = keymaps.kohya_unet_name(mod.name, sgm, config)
        if name is None:
            raise _unmapped("sdxl" if sgm else "UNet", mod.name)
        if f"{name}.alpha" in out:
            raise NotSupportedError(f"two LoRA modules map to the Kohya name {name}")
        out[f"{name}.lora_down.weight"] = mod.down
        out[f"{name}.lora_up.weight"] = _scaled(mod.up, mod.scale * mod.rank / mod.alpha)
        out[f"{name}.alpha"] = _alpha_tensor(mod.alpha)
    return out


def _native(family: str, mods: list[LoraModule], config: dict[str, Any]) -> dict[str, Any]:
    groups: dict[str, list[tuple[keymaps.Target, LoraModule]]] = {}
    for mod in mods:
        target = keymaps.native_target(family, mod.name, config)
        if target is None:
            raise _unmapped(family, mod.name)
        groups.setdefault(target.module, []).append((target, mod))
    out: dict[str, Any] = {}
    for native in sorted(groups):
        down, up, alpha = _fuse(native, groups[native])
        out[f"diffusion_model.{native}.lora_A.weight"] = down
        out[f"diffusion_model.{native}.lora_B.weight"] = up
        out[f"diffusion_model.{native}.alpha"] = _alpha_tensor(alpha)
    return out


def _fuse(native: str, parts: list[tuple[keymaps.Target, LoraModule]]) -> tuple[Any, Any, float]:
    """One (down, up, alpha) for a native module from the LoRAs of the diffusers modules it fuses."""
    import torch

    parts = sorted(parts, key=lambda p: p[0].slot)
    slots = parts[0][0].slots
    taken = [t.slot for t, _ in parts]
    if len(set(taken)) != len(taken):
        raise NotSupportedError(f"several LoRA modules fill the same slot of {native}")
    alpha = parts[0][1].alpha
    rank = sum(m.rank for _, m in parts)
    if len(slots) == 1:
        target, mod = parts[0]
        up = _scaled(mod.up, mod.scale * rank / alpha)
        return mod.down, (_swap_halves(up) if target.swap_halves else up), alpha
    units = {int(m.up.shape[0]) // slots[t.slot] for t, m in parts}
    if len(units) != 1 or any(int(m.up.shape[0]) % slots[t.slot] for t, m in parts):
        raise NotSupportedError(f"the LoRA parts of {native} have inconsistent output sizes")
    unit = units.pop()
    offsets = [sum(slots[:i]) * unit for i in range(len(slots))]
    first = parts[0][1].up
    up = torch.zeros(sum(slots) * unit, rank, dtype=first.dtype)
    column = 0
    for target, mod in parts:
        row = offsets[target.slot]
        up[row : row + mod.up.shape[0], column : column + mod.rank] = _scaled(mod.up, mod.scale * rank / alpha)
        column += mod.rank
    down = torch.cat([m.down for _, m in parts], dim=0)
    return down, up, alpha


def _swap_halves(up: Any) -> Any:
    import torch

    shift, scale = up.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)
