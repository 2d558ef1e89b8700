"""Where a diffusers LoRA module sits in the original checkpoint layout that ComfyUI (and A1111, Kohya) name.

UNets use Kohya names, `lora_unet_<module path with underscores>`:
- SD 1.x / 2.x: the diffusers module path (Kohya trains these on a diffusers-named UNet; ComfyUI maps such names
  through `unet_to_diffusers`, and diffusers' `_convert_unet_lora_key` reads them back);
- SDXL: the original SGM path (`input_blocks.4.1...`, `middle_block.1...`, `output_blocks.0.1...`), as Kohya's SDXL
  scripts write it. The block arithmetic is the inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers`.

Transformers (Flux, FLUX.2, SD3, PixArt) use ComfyUI's native module names under `diffusion_model.`. Their original
checkpoints fuse projections that diffusers splits (q/k/v into one `qkv`, Flux's single-block q/k/v/mlp into
`linear1`, PixArt's cross-attention k/v into `kv_linear`): a `Target` then names the fused module, which slot the
diffusers module fills, and the slots' relative sizes. The tables follow ComfyUI's `flux_to_diffusers` and
`mmdit_to_diffusers` and diffusers' PixArt-Sigma conversion script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# The SDXL base UNet's block layout, for when the base model's config cannot be read (a single-file checkpoint).
SDXL_UNET = {"layers_per_block": 2, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """A native module; for fused modules, the slot this diffusers module fills, every slot's relative size and the
    diffusers module of every slot (`parts`: DoRA's export reads the base weights of slots no LoRA targeted)."""

    module: str
    slot: int = 0
    slots: tuple[int, ...] = (1,)
    swap_halves: bool = False  # final AdaLN layers store (scale, shift) where diffusers has (shift, scale)
    parts: tuple[str, ...] = ()


def _qkv(native: str, prefix: str, letter: str, pattern: str, letters: str = "qkv") -> Target:
    """The `letter` slot of a fused projection whose diffusers parts are `prefix + pattern.format(letter)`."""
    parts = tuple(prefix + pattern.format(c) for c in letters)
    return Target(native, letters.index(letter), (1,) * len(letters), parts=parts)


# --------------------------------------------------------------------------------------------------- UNets (Kohya)

_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}  # fmt: skip
_UNET_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
             "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip


def kohya_unet_name(module: str, sgm: bool, unet_config: dict[str, Any] | None = None) -> str | None:
    """`lora_unet_...` for a diffusers UNet module path; with `sgm`, in original SGM block naming."""
    path = sgm_path(module, unet_config or {}) if sgm else module
    return None if path is None else "lora_unet_" + path.replace(".", "_")


def _layers(config: dict[str, Any]) -> list[int]:
    blocks = len(config.get("down_block_types") or ())
    value = config.get("layers_per_block", 2)
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * blocks


def sgm_path(module: str, config: dict[str, Any]) -> str | None:
    """The SGM (original SD/SDXL) path of a diffusers UNet module, or None when it has none."""
    layers = _layers(config)
    up_types = list(config.get("up_block_types") or ())
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", module):
        x, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        if x >= len(layers):
            return None
        start = 1 + sum(n + 1 for n in layers[:x])
        if kind == "downsamplers":
            return f"input_blocks.{start + layers[x]}.0.op" if rest == "conv" else None
        return _inner("input_blocks", start + i, kind, rest)
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module):
        kind, i, rest = m[1], int(m[2]), m[3]
        index = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((kind, i))
        if index is None:
            return None
        return f"middle_block.{index}.{_RESNET.get(rest, rest) if kind == 'resnets' else rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", module):
        x, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        reverse = list(reversed(layers))
        if x >= len(reverse):
            return None
        start = sum(n + 1 for n in reverse[:x])
        if kind == "upsamplers":
            has_attention = x < len(up_types) and "CrossAttn" in up_types[x]
            return f"output_blocks.{start + reverse[x]}.{2 if has_attention else 1}.conv" if rest == "conv" else None
        return _inner("output_blocks", start + i, kind, rest)
    return _UNET_TOP.get(module)


def _inner(blocks: str, index: int, kind: str, rest: str) -> str:
    if kind == "resnets":
        return f"{blocks}.{index}.0.{_RESNET.get(rest, rest)}"
    return f"{blocks}.{index}.1.{rest}"


# --------------------------------------------------------------------------------------------- transformers (native)

_FLUX_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "norm1.linear": "img_mod.lin",
                "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}  # fmt: skip
_FLUX_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_FLUX_SINGLE_LINEAR1 = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}  # mlp is 4x hidden in diffusers
_FLUX_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}  # fmt: skip

_FLUX2_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
                 "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0",
                 "ff_context.linear_out": "txt_mlp.2"}  # fmt: skip
_FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_FLUX2_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
              "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
              "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
              "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
              "single_stream_modulation.linear": "single_stream_modulation.lin"}  # fmt: skip

_SD3_BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
              "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
              "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
              "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
              "ff_context.net.2": "context_block.mlp.fc2"}  # fmt: skip
_SD3_TOP = {"context_embedder": "context_embedder", "pos_embed.proj": "x_embedder.proj",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}  # fmt: skip

_PIXART_BLOCK = {"attn1.to_out.0": "attn.proj", "attn2.to_q": "cross_attn.q_linear",
                 "attn2.to_out.0": "cross_attn.proj", "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2"}  # fmt: skip
_PIXART_TOP = {"pos_embed.proj": "x_embedder.proj", "caption_projection.linear_1": "y_embedder.y_proj.fc1",
               "caption_projection.linear_2": "y_embedder.y_proj.fc2", "adaln_single.linear": "t_block.1",
               "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "proj_out": "final_layer.linear"}  # fmt: skip


def native_target(family: str, module: str, config: dict[str, Any] | None = None) -> Target | None:
    """The native module of a diffusers transformer module path, or None when the layout has no such module."""
    config = config or {}
    if family in ("flux", "chroma"):
        # ComfyUI's Chroma model keeps Flux's native block names (double_blocks / single_blocks, img_in, txt_in,
        # final_layer.linear; no modulation layers): its generic `diffusion_model.` keys read them.
        return _flux(module)
    if family == "flux2":
        return _flux2(module)
    if family == "sd3":
        return _sd3(module, config)
    if family == "pixart_sigma":
        return _pixart(module)
    if family == "ltxvideo":
        return _ltxvideo(module)
    if family == "wan":
        return _wan(module)
    if family in ("qwen_image", "z_image"):
        # comfy/lora.py reads both under the diffusers module names: Qwen-Image's directly, Z-Image's (its Lumina2
        # branch) through z_image_to_diffusers, which places to_q/to_k/to_v in the native qkv as `dim` rows each,
        # wrong for grouped key/value heads.
        grouped = config.get("n_kv_heads", config.get("n_heads")) != config.get("n_heads")
        return None if family == "z_image" and grouped and re.search(r"attention\.to_[kv]$", module) else Target(module)
    return None


def _flux(module: str) -> Target | None:
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
        base, rest = f"double_blocks.{m[1]}", m[2]
        prefix = f"transformer_blocks.{m[1]}."
        if a := re.fullmatch(r"attn\.to_([qkv])", rest):
            return _qkv(f"{base}.img_attn.qkv", prefix, a[1], "attn.to_{}")
        if a := re.fullmatch(r"attn\.add_([qkv])_proj", rest):
            return _qkv(f"{base}.txt_attn.qkv", prefix, a[1], "attn.add_{}_proj")
        return Target(f"{base}.{_FLUX_DOUBLE[rest]}") if rest in _FLUX_DOUBLE else None
    if m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module):
        base, rest = f"single_blocks.{m[1]}", m[2]
        if rest in _FLUX_SINGLE_LINEAR1:
            parts = tuple(f"single_transformer_blocks.{m[1]}.{name}" for name in _FLUX_SINGLE_LINEAR1)
            return Target(f"{base}.linear1", _FLUX_SINGLE_LINEAR1[rest], (1, 1, 1, 4), parts=parts)
        return Target(f"{base}.{_FLUX_SINGLE[rest]}") if rest in _FLUX_SINGLE else None
    if module == "norm_out.linear":
        return Target("final_layer.adaLN_modulation.1", swap_halves=True)
    return Target(_FLUX_TOP[module]) if module in _FLUX_TOP else None


def _flux2(module: str) -> Target | None:
    """FLUX.2's original names (diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`, inverted): Flux's
    blocks with SwiGLU MLPs, an already fused single-block projection and modulation shared across blocks."""
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
        base, rest, prefix = f"double_blocks.{m[1]}", m[2], f"transformer_blocks.{m[1]}."
        if a := re.fullmatch(r"attn\.to_([qkv])", rest):
            return _qkv(f"{base}.img_attn.qkv", prefix, a[1], "attn.to_{}")
        if a := re.fullmatch(r"attn\.add_([qkv])_proj", rest):
            return _qkv(f"{base}.txt_attn.qkv", prefix, a[1], "attn.add_{}_proj")
        return Target(f"{base}.{_FLUX2_DOUBLE[rest]}") if rest in _FLUX2_DOUBLE else None
    if m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module):
        rest = m[2]
        return Target(f"single_blocks.{m[1]}.{_FLUX2_SINGLE[rest]}") if rest in _FLUX2_SINGLE else None
    if module == "norm_out.linear":
        return Target("final_layer.adaLN_modulation.1", swap_halves=True)
    return Target(_FLUX2_TOP[module]) if module in _FLUX2_TOP else None


def _sd3(module: str, config: dict[str, Any]) -> Target | None:
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
        index, rest = int(m[1]), m[2]
        base, prefix = f"joint_blocks.{index}", f"transformer_blocks.{index}."
        if a := re.fullmatch(r"attn\.to_([qkv])", rest):
            return _qkv(f"{base}.x_block.attn.qkv", prefix, a[1], "attn.to_{}")
        if a := re.fullmatch(r"attn\.add_([qkv])_proj", rest):
            return _qkv(f"{base}.context_block.attn.qkv", prefix, a[1], "attn.add_{}_proj")
        if a := re.fullmatch(r"attn2\.to_([qkv])", rest):
            return _qkv(f"{base}.x_block.attn2.qkv", prefix, a[1], "attn2.to_{}")
        if rest not in _SD3_BLOCK:
            return None
        # The last block's context norm is a pre-only AdaLayerNormContinuous: (scale, shift) in the original.
        if rest == "norm1_context.linear" and "num_layers" not in config:
            return None
        last = index == int(config.get("num_layers", 0)) - 1
        return Target(f"{base}.{_SD3_BLOCK[rest]}", swap_halves=last and rest == "norm1_context.linear")
    if module == "norm_out.linear":
        return Target("final_layer.adaLN_modulation.1", swap_halves=True)
    return Target(_SD3_TOP[module]) if module in _SD3_TOP else None


# LTX-Video: ComfyUI's LTXV model (comfy/ldm/lightricks/model.py) names its blocks as diffusers does; only the input
# projection and the timestep embedding differ (comfy/lora.py reads every `diffusion_model.` name directly).
_LTX_TOP = {"proj_in": "patchify_proj", "time_embed.linear": "adaln_single.linear",
            "time_embed.emb.timestep_embedder.linear_1": "adaln_single.emb.timestep_embedder.linear_1",
            "time_embed.emb.timestep_embedder.linear_2": "adaln_single.emb.timestep_embedder.linear_2",
            "caption_projection.linear_1": "caption_projection.linear_1",
            "caption_projection.linear_2": "caption_projection.linear_2", "proj_out": "proj_out"}  # fmt: skip
_LTX_BLOCK = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2))")


def _ltxvideo(module: str) -> Target | None:
    if _LTX_BLOCK.fullmatch(module):
        return Target(module)
    return Target(_LTX_TOP[module]) if module in _LTX_TOP else None


# Wan: ComfyUI's WAN21 model (comfy/ldm/wan/model.py) keeps the original Wan names, which diffusers' conversion
# renames (self_attn.q -> attn1.to_q, cross_attn.o -> attn2.to_out.0, ffn.0 -> ffn.net.0.proj, ...); comfy/lora.py
# reads every `diffusion_model.` name directly, and diffusers' own Wan LoRA loader reads the same layout.
_WAN_ATTENTION = {"attn1": "self_attn", "attn2": "cross_attn"}
_WAN_PROJECTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img"}
_WAN_TOP = {"condition_embedder.time_embedder.linear_1": "time_embedding.0",
            "condition_embedder.time_embedder.linear_2": "time_embedding.2",
            "condition_embedder.text_embedder.linear_1": "text_embedding.0",
            "condition_embedder.text_embedder.linear_2": "text_embedding.2",
            "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head"}  # fmt: skip


def _wan(module: str) -> Target | None:
    if m := re.fullmatch(r"blocks\.(\d+)\.(attn[12])\.(to_[qkv]|to_out\.0|add_[kv]_proj)", module):
        return Target(f"blocks.{m[1]}.{_WAN_ATTENTION[m[2]]}.{_WAN_PROJECTION[m[3]]}")
    if m := re.fullmatch(r"blocks\.(\d+)\.ffn\.net\.(0\.proj|2)", module):
        return Target(f"blocks.{m[1]}.ffn.{m[2][0]}")
    return Target(_WAN_TOP[module]) if module in _WAN_TOP else None


def _pixart(module: str) -> Target | None:
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
        base, rest, prefix = f"blocks.{m[1]}", m[2], f"transformer_blocks.{m[1]}."
        if a := re.fullmatch(r"attn1\.to_([qkv])", rest):
            return _qkv(f"{base}.attn.qkv", prefix, a[1], "attn1.to_{}")
        if a := re.fullmatch(r"attn2\.to_([kv])", rest):
            return _qkv(f"{base}.cross_attn.kv_linear", prefix, a[1], "attn2.to_{}", letters="kv")
        return Target(f"{base}.{_PIXART_BLOCK[rest]}") if rest in _PIXART_BLOCK else None
    return Target(_PIXART_TOP[module]) if module in _PIXART_TOP else None
