"""A family's LoRA: adding a peft adapter to its denoiser, and writing and reading the LoRA weight file.

The file is diffusers' `pytorch_lora_weights.safetensors`: peft `lora_A` / `lora_B` names prefixed with the
denoiser's subfolder (`unet.` / `transformer.`), the `LoraConfig` as adapter metadata in the safetensors header.
Families whose pipeline has a LoRA loader go through it; the others (PixArt) use the same layout through peft.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError

if TYPE_CHECKING:
    from pipeline.families.spec import Family

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the LoraConfig in the safetensors header


def add_adapter(denoiser: Any, config: Any, adapter_name: str = "default") -> Any:
    """Add a peft LoRA adapter to `denoiser` in place (its `add_adapter`, else peft's `inject_adapter_in_model`
    for models without diffusers' PEFT mixin, such as PixArt's transformer); base weights are frozen."""
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(config, adapter_name=adapter_name)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
    return denoiser


def save_weights(family: Family, out_dir: str | Path, state_dict: dict[str, Any], config: Any = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` in `out_dir` from `peft.get_peft_model_state_dict(denoiser)`.
    `config` (the `LoraConfig`, or its dict) is stored as the adapter metadata, so loaders rebuild rank, alpha and
    targets exactly. Returns the file's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = family.denoiser.subfolder
    metadata = _metadata(config)
    tensors = {key: value.detach().contiguous() for key, value in state_dict.items()}
    if not tensors:
        raise InputError(f"{family.name}: the LoRA state dict is empty")
    if family.lora_loader:
        family.load_pipeline_class().save_lora_weights(
            str(out),
            **{f"{prefix}_lora_layers": tensors, f"{prefix}_lora_adapter_metadata": metadata},
            safe_serialization=True,
        )
    else:
        from safetensors.torch import save_file

        header = {"format": "pt"}
        if metadata:
            packed = {f"{prefix}.{key}": value for key, value in metadata.items()}
            header[LORA_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
        save_file({f"{prefix}.{k}": v for k, v in tensors.items()}, str(out / LORA_WEIGHT_NAME), metadata=header)
    return out / LORA_WEIGHT_NAME


def load_weights(family: Family, pipe: Any, path: str | Path, adapter_name: str | None = None) -> None:
    """Load a LoRA written by `save_weights` (its folder or file) into `pipe`'s denoiser: `pipe.load_lora_weights`
    where the pipeline has it, else peft's `inject_adapter_in_model` + `set_peft_model_state_dict`."""
    path = Path(path)
    if family.lora_loader:
        kwargs = {} if adapter_name is None else {"adapter_name": adapter_name}
        if path.is_file():
            kwargs["weight_name"] = path.name
            path = path.parent
        pipe.load_lora_weights(str(path), **kwargs)
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    prefix = family.denoiser.subfolder + "."
    with safe_open(str(file), framework="pt") as handle:
        header = handle.metadata() or {}
        keys = [k for k in handle.keys() if k.startswith(prefix)]  # noqa: SIM118 - a safe_open handle, not a dict
        state = {k.removeprefix(prefix): handle.get_tensor(k) for k in keys}
    if not state:
        raise InputError(f"{file} holds no {prefix}* LoRA weights")
    packed = json.loads(header[LORA_METADATA_KEY]) if header.get(LORA_METADATA_KEY) else {}
    options = {k.removeprefix(prefix): v for k, v in packed.items() if k.startswith(prefix)}
    config = LoraConfig(**options) if options else _infer_config(state)
    name = adapter_name or "default"
    model = getattr(pipe, family.denoiser.subfolder)
    inject_adapter_in_model(config, model, adapter_name=name)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
    if unexpected:
        raise InputError(f"{file}: LoRA weights match no module: {', '.join(unexpected[:5])}")


def _metadata(config: Any) -> dict[str, Any] | None:
    """A `LoraConfig` (or its dict) as JSON-ready adapter metadata, as diffusers' training scripts store it."""
    if config is None:
        return None
    options = dict(config) if isinstance(config, dict) else config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in options.items()}


def _infer_config(state: dict[str, Any]) -> Any:
    """A `LoraConfig` for a peft LoRA state dict without metadata: its modules by full name, each module's rank
    from its `lora_A`, alpha equal to the rank (scale 1)."""
    from peft import LoraConfig

    ranks = {k.split(".lora_A")[0]: int(v.shape[0]) for k, v in state.items() if ".lora_A" in k}
    if not ranks:
        raise InputError("the LoRA state dict has no lora_A weights")
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {f"^{name}": rank for name, rank in ranks.items() if rank != r}  # as diffusers anchors them
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_dora=any("lora_magnitude_vector" in k for k in state),
    )
