"""RamTorch (`ramtorch`, `ramtorch_target_modules`): the denoiser's frozen Linear weights stay in pinned host memory,
and each layer copies its weight to the GPU for its own forward and backward on CUDA streams (the `ramtorch`
package's CPU-bouncing Linear). Only the selected frozen layers move; the adapters' layers (and every trainable
weight) stay on the GPU, so the optimizer steps the same tensors as without RamTorch.

Targets are SimpleTuner's: comma-separated globs matched against a Linear's qualified name, that name without its
first component, or its class name; a pattern without wildcards also matches everything under that name
("transformer_blocks.0" covers "transformer_blocks.0.attn.to_q"). With a LoRA attached, a layer is named as in the
model without adapters (peft's `.base_layer` is left out), so the same patterns select the same layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any, Callable

from ..log import get_logger

log = get_logger("train")

_WILDCARDS = frozenset("*?[")
_PEFT_BASE = ".base_layer"


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
    name: str  # as in the model without adapters
    layer: Any


def frozen_linears(denoiser, patterns: list[str] | None) -> tuple[list[Target], int]:
    """The frozen nn.Linear layers `patterns` select, and how many frozen Linear layers there are in all. Layers
    with a trainable weight (the adapters', or a full run's) are never selected."""
    import torch

    selected, total = [], 0
    for parent_name, parent in denoiser.named_modules():
        for attribute, child in parent.named_children():
            if type(child) is not torch.nn.Linear or any(p.requires_grad for p in child.parameters()):
                continue
            total += 1
            name = plain_name(f"{parent_name}.{attribute}" if parent_name else attribute)
            if matches(name, "Linear", patterns):
                selected.append(Target(parent, attribute, name, child))
    return selected, total


def _ramtorch_linear(linear, device):
    """ramtorch's CPU-bouncing Linear holding `linear`'s weights in pinned host memory (needs CUDA)."""
    import warnings

    import torch
    from ramtorch import Linear

    with warnings.catch_warnings():  # ramtorch 1.11 points to its whole-model offloader; the layer is what SimpleTuner uses
        warnings.simplefilter("ignore", DeprecationWarning)
        layer = Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device=device,
                       dtype=linear.weight.dtype, skip_init=True)  # fmt: skip
    with torch.no_grad():
        for attribute in ("weight", "bias"):
            source = getattr(linear, attribute)
            if source is not None:
                target = getattr(layer, attribute)
                target.data = source.data.to("cpu").pin_memory()
                target.requires_grad_(False)
                target.is_ramtorch = True
    return layer


def stream(denoiser, patterns: list[str] | None, device, make_layer: Callable | None = None) -> dict[str, Any]:
    """Replace the selected frozen Linear layers of `denoiser` by host-memory streaming ones (`make_layer(linear,
    device)`, ramtorch's by default); returns what the train manifest records."""
    make_layer = make_layer or _ramtorch_linear
    selected, total = frozen_linears(denoiser, patterns)
    for target in selected:
        setattr(target.parent, target.attribute, make_layer(target.layer, device))
    log.info("ramtorch: %d of the denoiser's %d frozen Linear layers wait in host memory and stream to %s per layer",
             len(selected), total, device)  # fmt: skip
    return {"layers": len(selected), "of": total, "targets": patterns}
