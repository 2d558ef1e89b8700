"""A diffusers LoRA -> the single-file layout ComfyUI loads.

UNet families get Kohya keys (`lora_unet_<path>.lora_down.weight` / `.lora_up.weight` / `.alpha`), transformer
families native keys (`diffusion_model.<path>.lora_A.weight` / `.lora_B.weight` / `.alpha`); see `keymaps` for the
names. ComfyUI scales a LoRA by `alpha / rank` of the file, so each `.alpha` is the module's configured alpha and
`up` is rescaled only where that alone would not reproduce peft's scale (rsLoRA, or a fused module whose rank is the
sum of its parts' ranks). A fused module's `down` stacks its parts' `down` matrices and its `up` is block-diagonal,
with zero rows for slots no LoRA targeted, so its product equals the parts' products in their row ranges exactly.

DoRA (peft's `lora_magnitude_vector`, one magnitude per output row) becomes `.dora_scale`, shaped (out, 1, ...) so
that ComfyUI's `weight_decompose` treats it as output-axis. On that axis ComfyUI divides by the row norms of the
*base* weight, where peft divides by those of the merged weight, so the exported scale is
`magnitude * (|W0| + eps) / |W0 + scale * up @ down|`: applied by ComfyUI it reproduces peft's weight exactly. That
needs the base denoiser's weights (`base`, by diffusers module name); rows of fused slots no LoRA targeted get
`|W0| + eps` and stay unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..errors import NotSupportedError
from ..log import get_logger
from . import keymaps
from .lora import LoraModule

log = get_logger("publish")

UNET_FAMILIES = {"sd1x": False, "sd2x": False, "sdxl": True}  # family -> Kohya names in SGM layout
# diffusers text-encoder subfolder -> Kohya prefix, per family whose text encoders st trains.
KOHYA_TEXT_ENCODERS = {"sd1x": {"text_encoder": "lora_te"},
                       "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}  # fmt: skip
TRANSFORMER_FAMILIES = ("flux", "sd3", "pixart_sigma", "qwen_image", "z_image", "chroma", "flux2", "ltxvideo", "wan")
# ComfyUI's key maps that read diffusers module names themselves, under `transformer.`: AuraFlow's for the linear
# layers of its blocks (comfy.utils.auraflow_to_diffusers), HiDream's for every linear layer: these patterns.
DIFFUSERS_NAMED = {"auraflow": re.compile(
    r"joint_transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|"
    r"(ff|ff_context)\.(linear_[12]|out_projection)|(norm1|norm1_context)\.linear)|"
    r"single_transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0)|ff\.(linear_[12]|out_projection)|norm1\.linear)|"
    r"context_embedder|pos_embed\.proj|proj_out|time_step_proj\.linear_[12]"),
    # HiDream: ComfyUI's model keeps the original module names, which diffusers' HiDream transformer uses as they are
    # (comfy.lora maps `transformer.<name>` for every weight, SimpleTuner's layout): its linear layers.
    "hidream": re.compile(
        r"(double|single)_stream_blocks\.\d+\.block\.(adaLN_modulation\.1|attn1\.(to_[qkv]|to_out)(_t)?|"
        r"ff_[it]\.(shared_experts\.|experts\.\d+\.)?w[123])|x_embedder\.proj|t_embedder\.timestep_embedder\.linear_[12]|"
        r"p_embedder\.pooled_embedder\.linear_[12]|caption_projection\.\d+\.linear|final_layer\.(linear|adaLN_modulation\.1)")}  # fmt: skip
COMFY_EPS = 1.1920928955078125e-07  # torch.finfo(float32).eps: ComfyUI adds it to the norm, patching in float32

BaseWeights = Callable[[str], Any]  # diffusers module name -> its base weight tensor


def convert(family: str, mods: list[LoraModule], denoiser_config: dict[str, Any] | None,
            base: BaseWeights | None = None) -> dict[str, Any]:  # fmt: skip
    """ComfyUI tensors for the LoRA `mods` of a `family` denoiser (its diffusers config names SDXL's blocks);
    `base` is needed only for DoRA (see the module docstring)."""
    if base is None and any(m.magnitude is not None for m in mods):
        raise NotSupportedError("exporting a DoRA LoRA to the ComfyUI layout needs the base model's weights; "
                                "publish with lora_format = \"diffusers\" or make the base model readable")  # fmt: skip
    if family in UNET_FAMILIES:
        return _kohya(mods, UNET_FAMILIES[family], denoiser_config or {}, base)
    if family in TRANSFORMER_FAMILIES:
        return _native(family, mods, denoiser_config or {}, base)
    if family in DIFFUSERS_NAMED:
        return _diffusers_named(family, mods, base)
    raise NotSupportedError(f"no ComfyUI LoRA layout is known for {family}; publish with lora_format = \"diffusers\"")


def _alpha_tensor(alpha: float) -> Any:
    import torch

    return torch.tensor(float(alpha), dtype=torch.float32)


def _scaled(up: Any, factor: float) -> Any:
    """`up` times `factor`, in fp32: a bf16 LoRA (trained under mixed_precision bf16) would be rounded again."""
    return up if factor == 1.0 else up.float() * factor


def _unmapped(family: str, module: str) -> NotSupportedError:
    return NotSupportedError(f"the {family} LoRA module {module!r} has no counterpart in the ComfyUI checkpoint "
                             "layout; publish with lora_format = \"diffusers\" or train other targets")  # fmt: skip


def _dora_rows(mod: LoraModule | None, weight: Any) -> Any:
    """ComfyUI's output-axis `dora_scale` rows for one module (float32); without `mod`, rows that keep `weight`."""
    w0 = weight.float().reshape(weight.shape[0], -1)
    base_norm = w0.norm(dim=1) + COMFY_EPS
    if mod is None:
        return base_norm
    delta = mod.up.float().reshape(mod.up.shape[0], -1) @ mod.down.float().reshape(mod.rank, -1)
    return mod.magnitude.float().reshape(-1) * base_norm / (w0 + mod.scale * delta).norm(dim=1)


def _dora_scale(rows: Any, weight: Any) -> Any:
    return rows.reshape(rows.shape[0], *[1] * (weight.dim() - 1)).contiguous()


def _kohya(mods: list[LoraModule], sgm: bool, config: dict[str, Any], base: BaseWeights | None) -> dict[str, Any]:
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
        out.update(_kohya_module(name, mod))
        if mod.magnitude is not None:
            weight = base(mod.name)
            out[f"{name}.dora_scale"] = _dora_scale(_dora_rows(mod, weight), weight)
    return out


def _kohya_module(name: str, mod: LoraModule) -> dict[str, Any]:
    """One module's Kohya tensors: `up` carries whatever of peft's scale `alpha / rank` does not."""
    return {f"{name}.lora_down.weight": mod.down, f"{name}.lora_up.weight": _scaled(mod.up, mod.scale * mod.rank / mod.alpha),
            f"{name}.alpha": _alpha_tensor(mod.alpha)}  # fmt: skip


def convert_text_encoder(family: str, component: str, mods: list[LoraModule]) -> dict[str, Any]:
    """Kohya tensors of a text encoder's LoRA (`component`: its diffusers subfolder): the module path with dots as
    underscores after `lora_te` (SD 1.x) or `lora_te1` / `lora_te2` (SDXL's CLIP-L / CLIP-bigG), as ComfyUI's key
    map and diffusers' Kohya converter read them."""
    prefix = KOHYA_TEXT_ENCODERS.get(family, {}).get(component)
    if prefix is None:
        raise NotSupportedError(f"no ComfyUI name is known for the {family} {component} LoRA; publish with "
                                "lora_format = \"diffusers\"")  # fmt: skip
    out: dict[str, Any] = {}
    for mod in mods:
        if mod.magnitude is not None:
            raise NotSupportedError(f"the {component} LoRA module {mod.name} is DoRA, which has no Kohya text-encoder "
                                    "form; publish with lora_format = \"diffusers\"")  # fmt: skip
        out.update(_kohya_module(f"{prefix}_{mod.name.replace('.', '_')}", mod))
    return out


def _diffusers_named(family: str, mods: list[LoraModule], base: BaseWeights | None) -> dict[str, Any]:
    """`transformer.<diffusers path>.lora_A / lora_B / alpha` (and `dora_scale`), `up` scaled as in `_kohya_module`."""
    out: dict[str, Any] = {}
    for mod in mods:
        if not DIFFUSERS_NAMED[family].fullmatch(mod.name):
            raise _unmapped(family, mod.name)
        name = f"transformer.{mod.name}"
        out.update({f"{name}.lora_A.weight": mod.down, f"{name}.alpha": _alpha_tensor(mod.alpha),
                    f"{name}.lora_B.weight": _scaled(mod.up, mod.scale * mod.rank / mod.alpha)})  # fmt: skip
        if mod.magnitude is not None:
            weight = base(mod.name)
            out[f"{name}.dora_scale"] = _dora_scale(_dora_rows(mod, weight), weight)
    return out


def _native(family: str, mods: list[LoraModule], config: dict[str, Any], base: BaseWeights | None) -> dict[str, Any]:
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
        if any(m.magnitude is not None for _, m in groups[native]):
            out[f"diffusion_model.{native}.dora_scale"] = _fused_dora_scale(native, groups[native], base)
    return out


def _fused_dora_scale(native: str, parts: list[tuple[keymaps.Target, LoraModule]], base: BaseWeights) -> Any:
    """The `dora_scale` of a native module: each slot's rows in slot order (base rows for slots without a LoRA)."""
    import torch

    first = parts[0][0]
    if len(first.slots) == 1:
        target, mod = parts[0]
        weight = base(mod.name)
        rows = _dora_rows(mod, weight)
        return _dora_scale(_swap_halves(rows) if target.swap_halves else rows, weight)
    by_slot = {t.slot: m for t, m in parts}
    if len(first.parts) != len(first.slots):
        raise NotSupportedError(f"the diffusers modules fused into {native} are unknown; cannot export its DoRA")
    weights = [base(name) for name in first.parts]
    rows = torch.cat([_dora_rows(by_slot.get(i), w) for i, w in enumerate(weights)])
    return _dora_scale(rows, weights[0])


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
    scaled = [_scaled(m.up, m.scale * rank / alpha) for _, m in parts]
    dtype = scaled[0].dtype
    for u in scaled[1:]:
        dtype = torch.promote_types(dtype, u.dtype)  # fp32 where a bf16 part was rescaled: never rounded back
    up = torch.zeros(sum(slots) * unit, rank, dtype=dtype)
    column = 0
    for (target, mod), scaled_up in zip(parts, scaled):
        row = offsets[target.slot]
        up[row : row + mod.up.shape[0], column : column + mod.rank] = scaled_up
        column += mod.rank
    down = torch.cat([m.down for _, m in parts], dim=0)
    return down, up, alpha


def _swap_halves(up: Any) -> Any:
    import torch

    shift, scale = up.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)
