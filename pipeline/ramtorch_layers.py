"""RamTorch: selected `nn.Linear` weights stay in pinned host memory, and each layer copies its weight to the GPU for
its own forward and backward on CUDA streams (the `ramtorch` package's CPU-bouncing Linear). Nothing it computes
changes (the same ops on the same values), so no ramtorch option enters a stage key.

Which layers (SimpleTuner's choices):
- `ramtorch`: the denoiser's frozen Linear layers in `st train` (the adapters' layers, and every trainable weight, stay
  on the GPU, so the optimizer steps the same tensors as without RamTorch);
- `ramtorch_text_encoder`: every text encoder's Linear layers, in `st cache` and for text-encoder training;
- `ramtorch_vae`: the Linear layers of the VAE's mid blocks only (the attention of `encoder.mid_block` and
  `decoder.mid_block`); its up and down blocks are convolutions and stay as they are;
- `ramtorch_controlnet`: a ControlNet's Linear layers, trainable ones included (`controlnet`).
The last three are read only with `ramtorch` true, as in SimpleTuner. `ramtorch_transformer_percent` streams only
the first share of the denoiser's selected layers (SimpleTuner's choice: module order, ceil(n * percent / 100), at
least one above 0, none at 0).

After each streamed layer's forward a hook waits for the GPU (`torch.cuda.synchronize`), as SimpleTuner's sync hooks
do by default: ramtorch's two ping-pong transfer buffers can otherwise be overwritten while in use. st always keeps
them (`ramtorch_disable_sync_hooks` only skips them in SimpleTuner, for speed).

Targets are SimpleTuner's: `ramtorch_target_modules`, comma-separated globs matched against a Linear's qualified name,
that name without its first component, or its class name; a pattern without wildcards also matches everything under
that name ("transformer_blocks.0" covers "transformer_blocks.0.attn.to_q"). They limit every component: a text
encoder's layers are named `text_encoder_1.<name>`, the VAE's `vae.decoder.mid_block.<name>`, a ControlNet's
`controlnet.<name>` (so "*.to_q" selects in all of them, "transformer_blocks.*" in the denoiser only). With a LoRA
attached, a layer is named as in the model without adapters (peft's `.base_layer` is left out).

ramtorch's layer needs CUDA (it pins host memory and copies on CUDA streams); it cannot run on a CPU-only machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

from .config import OptionGroup
from .errors import ConfigError
from .log import get_logger

log = get_logger("ramtorch")

_WILDCARDS = frozenset("*?[")
_PEFT_BASE = ".base_layer"
_PEFT_ADAPTER = ".lora_"  # peft's adapter layers (lora_A, lora_B, ...): always trainable, always on the GPU


def parse_targets(value: str | list[str] | None) -> list[str] | None:
    """`ramtorch_target_modules` as a list of patterns; None (every Linear) when it names none."""
    if value is None:
        return None
    entries = [value] if isinstance(value, str) else list(value)
    patterns = [part.strip() for entry in entries for part in str(entry).split(",") if part.strip()]
    return patterns or None


def matches(name: str, class_name: str, patterns: list[str] | None) -> bool:
    """Whether the layer `name` (of class `class_name`) is one that `patterns` select (None selects every one)."""
    if patterns is None:
        return True
    candidates = [name] + ([name.split(".", 1)[1]] if "." in name else [])
    for pattern in patterns:
        if fnmatch(class_name, pattern) or any(fnmatch(c, pattern) for c in candidates):
            return True
        if not _WILDCARDS & set(pattern) and any(fnmatch(c, pattern + ".*") for c in candidates):
            return True
    return False


def plain_name(name: str) -> str:
    """A module's name as in the model without peft adapters."""
    return name.replace(_PEFT_BASE + ".", ".").removesuffix(_PEFT_BASE)


@dataclass(frozen=True)
class Target:
    parent: Any
    attribute: str
    name: str  # as in the model without adapters, with the component's prefix
    layer: Any


def linears(module, patterns: list[str] | None, *, prefix: str = "",
            trainable: bool = False) -> tuple[list[Target], int]:  # fmt: skip
    """The nn.Linear layers of `module` that `patterns` select (names prefixed with `prefix.`), and how many Linear
    layers could have been selected. Layers with a trainable weight are left out unless `trainable`; peft's adapter
    layers always are."""
    import torch

    selected, total = [], 0
    for qualified, child in module.named_modules():  # depth-first, in module order (SimpleTuner's order)
        if type(child) is not torch.nn.Linear:
            continue
        parent_name, _, attribute = qualified.rpartition(".")
        name = plain_name(".".join(part for part in (prefix, qualified) if part))
        if _PEFT_ADAPTER in f".{name}" or (not trainable and any(p.requires_grad for p in child.parameters())):
            continue
        total += 1
        if matches(name, "Linear", patterns):
            selected.append(Target(module.get_submodule(parent_name), attribute, name, child))
    return selected, total


def first_share(selected: list, percent: float | None) -> list:
    """`ramtorch_transformer_percent`: the first ceil(n * percent / 100) of `selected` (at least one when percent is
    above 0); all of them at 100 or None."""
    if percent is None or percent >= 100:
        return selected
    if percent <= 0:
        return []
    return selected[: max(1, math.ceil(len(selected) * percent / 100))]


def _synchronize_after(layer, device) -> None:
    """Wait for the GPU after `layer`'s forward (SimpleTuner's sync hook); nothing to wait for off CUDA."""
    import torch

    if on_cuda(device):
        layer.register_forward_hook(lambda module, inputs, output: torch.cuda.synchronize(device))


def frozen_linears(denoiser, patterns: list[str] | None) -> tuple[list[Target], int]:
    """The frozen nn.Linear layers `patterns` select, and how many frozen Linear layers there are in all."""
    return linears(denoiser, patterns)


def _ramtorch_linear(linear, device):
    """ramtorch's CPU-bouncing Linear computing on `device` with `linear`'s own Parameter objects, moved to pinned
    host memory (a trainable weight stays the tensor its optimizer holds; needs CUDA)."""
    import warnings

    import torch
    from ramtorch import Linear

    # ramtorch 1.11 points to its whole-model offloader; the layer is what SimpleTuner uses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        layer = Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device=device,
                       dtype=linear.weight.dtype, skip_init=True)  # fmt: skip
    layer.train(linear.training)
    with torch.no_grad():
        for attribute in ("weight", "bias"):
            param = getattr(linear, attribute)
            if param is not None:
                param.data = param.data.to("cpu").pin_memory()
                param.is_ramtorch = True
                setattr(layer, attribute, param)
    return layer


def convert(module, patterns: list[str] | None, device, *, label: str, prefix: str = "", trainable: bool = False,
            make_layer: Callable | None = None, percent: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Replace the selected Linear layers of `module` (the first `percent` of them) by host-memory streaming ones
    (`make_layer(linear, device)`, ramtorch's by default), each followed by a GPU sync; returns what a manifest
    records. Call it before moving `module` to the GPU, so that the streamed weights never land there."""
    make_layer = make_layer or _ramtorch_linear
    matched, total = linears(module, patterns, prefix=prefix, trainable=trainable)
    selected = first_share(matched, percent)
    for target in selected:
        layer = make_layer(target.layer, device)
        _synchronize_after(layer, device)
        setattr(target.parent, target.attribute, layer)
    log.info("ramtorch: %d of %s %d Linear layers wait in host memory and stream to %s per layer", len(selected),
             label, total, device)  # fmt: skip
    if total and not matched:
        log.warning("ramtorch: ramtorch_target_modules %s selects none of %s Linear layers", patterns, label)
    done = {"layers": len(selected), "of": total, "targets": patterns}
    return done | ({"percent": percent} if percent is not None and percent < 100 else {})


def stream(denoiser, patterns: list[str] | None, device, make_layer: Callable | None = None,
           percent: float | None = None) -> dict[str, Any]:  # fmt: skip
    """`ramtorch`: the denoiser's selected frozen Linear layers (`ramtorch_transformer_percent` of them)."""
    return convert(denoiser, patterns, device, label="the denoiser's frozen", make_layer=make_layer, percent=percent)


def stream_text_encoder(encoder, number: int, patterns: list[str] | None, device,
                        make_layer: Callable | None = None) -> dict[str, Any]:  # fmt: skip
    """`ramtorch_text_encoder`: text encoder `number` (1-based)'s frozen Linear layers (a trained encoder's LoRA
    stays on the GPU)."""
    name = f"text_encoder_{number}"
    return convert(encoder, patterns, device, label=f"{name}'s", prefix=name, make_layer=make_layer)


def stream_vae(vae, patterns: list[str] | None, device, make_layer: Callable | None = None) -> dict[str, Any]:
    """`ramtorch_vae`: the Linear layers of every `mid_block` of the VAE (encoder's and decoder's, or the VAE's
    own; the VAE never trains, so whether its weights require gradients does not matter); SimpleTuner looks for
    `vae.mid_block` only, which diffusers' AutoencoderKL does not have."""
    blocks = [(name, m) for name, m in vae.named_modules() if name.rsplit(".", 1)[-1] == "mid_block"]
    layers = total = 0
    for name, block in blocks:
        done = convert(block, patterns, device, label=f"vae.{name}'s", prefix=f"vae.{name}", trainable=True,
                       make_layer=make_layer)  # fmt: skip
        layers, total = layers + done["layers"], total + done["of"]
    return {"layers": layers, "of": total, "targets": patterns, "blocks": [f"vae.{name}" for name, _ in blocks]}


def stream_controlnet(controlnet, patterns: list[str] | None, device,
                      make_layer: Callable | None = None) -> dict[str, Any]:  # fmt: skip
    """`ramtorch_controlnet`: the ControlNet's Linear layers, trainable ones included (their Parameter objects are
    kept, so an optimizer built before or after holds the same tensors; gradients arrive in host memory)."""
    return convert(controlnet, patterns, device, label="the ControlNet's", prefix="controlnet", trainable=True,
                   make_layer=make_layer)  # fmt: skip


@dataclass(frozen=True)
class ComponentOptions(OptionGroup):
    """The ramtorch options for the text encoders and the VAE (read by `st cache` and `st train`)."""

    ramtorch: bool
    ramtorch_target_modules: str | None
    ramtorch_text_encoder: bool
    ramtorch_vae: bool

    @property
    def text_encoders(self) -> bool:
        return self.ramtorch and self.ramtorch_text_encoder

    @property
    def vae(self) -> bool:
        return self.ramtorch and self.ramtorch_vae

    @property
    def patterns(self) -> list[str] | None:
        return parse_targets(self.ramtorch_target_modules)


def on_cuda(device) -> bool:
    return str(getattr(device, "type", device)).split(":")[0] == "cuda"  # ROCm builds of torch name their GPUs cuda


def cuda_refusal(names: list[str], work: str, device) -> ConfigError:
    """The exit-2 error for ramtorch options `names` on a machine without CUDA (`work`: "trains", "encodes")."""
    listed = " and ".join(names)
    return ConfigError(f"{listed} need{'s' if len(names) == 1 else ''} a CUDA or ROCm GPU (RamTorch's layers copy "
                       f"weights on CUDA streams), and this run {work} on {device}; set {listed} to false")  # fmt: skip


def check_components(options: ComponentOptions, device, work: str, precisions: tuple[str, ...] = ()) -> None:
    """Refuse `ramtorch_text_encoder` / `ramtorch_vae` where they cannot run (exit 2 naming the option), before any
    model is loaded; `work` says what the stage does on `device` ("encodes", "trains"); `precisions`: the
    text_encoder_N_precision presets of the encoders the stage loads."""
    names = [n for n, on in (("ramtorch_text_encoder", options.text_encoders), ("ramtorch_vae", options.vae)) if on]
    if not names:
        return
    if not on_cuda(device):
        raise cuda_refusal(names, work, device)
    quantised = [(i + 1, p) for i, p in enumerate(precisions) if p != "no_change"]
    if options.text_encoders and quantised:
        number, preset = quantised[0]
        raise ConfigError(f"ramtorch_text_encoder streams plain Linear weights, and text_encoder_{number}_precision "
                          f"{preset} quantises them; use one or the other")  # fmt: skip
