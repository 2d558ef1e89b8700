"""What is trained: LoRA adapters injected with peft, or the whole denoiser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from ..families import Family
from ..log import get_logger
from ..tensorfile import normalise_file
from .options import AdapterOptions

log = get_logger("train")

_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def lora_config(options: AdapterOptions, family: Family):
    """peft's LoraConfig for the options: the family's default targets unless peft_lora_target_modules names them."""
    from peft import LoraConfig

    targets = options.peft_lora_target_modules or list(
        family.lora_target_modules(options.flux_lora_target if family.name == "flux" else None)
    )
    return LoraConfig(
        r=options.lora_rank,
        lora_alpha=options.lora_alpha if options.lora_alpha is not None else options.lora_rank,
        lora_dropout=options.lora_dropout,
        target_modules=list(targets),
        init_lora_weights=_INIT[options.lora_init_type],
        use_dora=options.use_dora,
    )


def attach(denoiser, options: AdapterOptions, family: Family) -> list[Any]:
    """Make the denoiser trainable as `model_type` says; returns the trainable parameters."""
    if options.model_type == "full":
        denoiser.requires_grad_(True)
        return [p for p in denoiser.parameters() if p.requires_grad]
    from peft import inject_adapter_in_model

    denoiser.requires_grad_(False)
    cfg = lora_config(options, family)
    try:
        inject_adapter_in_model(cfg, denoiser)
    except ValueError as exc:
        raise ConfigError(f"LoRA targets {cfg.target_modules} do not fit the {family.name} denoiser: {exc}; set "
                          "peft_lora_target_modules to module names of the model") from None  # fmt: skip
    if options.init_lora:
        load_lora_into(denoiser, Path(options.init_lora))
    params = [p for n, p in denoiser.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ConfigError("no LoRA parameters were created; check peft_lora_target_modules / flux_lora_target")
    return params


def load_lora_into(denoiser, path: Path) -> None:
    """Start from saved LoRA weights (diffusers/peft keys, with or without the `unet.`/`transformer.` prefix)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"init_lora {path}: no such safetensors file")
    state = load_file(str(file))
    cleaned = {}
    for key, value in state.items():
        for prefix in ("unet.", "transformer."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    result = set_peft_model_state_dict(denoiser, cleaned)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise InputError(f"init_lora {file}: {len(unexpected)} keys do not match this model's LoRA (e.g. "
                         f"{unexpected[0]}); use a LoRA trained with the same targets and rank")  # fmt: skip
    log.info("started LoRA from %s", file)


def trainable_state(denoiser, model_type: str) -> dict[str, Any]:
    """The trainable weights by parameter name (what a checkpoint stores)."""
    if model_type == "full":
        return {k: v for k, v in denoiser.state_dict().items()}
    return {n: p.detach() for n, p in denoiser.named_parameters() if "lora_" in n}


def load_trainable_state(denoiser, state: dict[str, Any]) -> None:
    import torch

    params = dict(denoiser.named_parameters())
    buffers = dict(denoiser.named_buffers())
    with torch.no_grad():
        for name, value in state.items():
            target = params.get(name, buffers.get(name))
            if target is None:
                raise InputError(f"checkpoint weight {name} does not exist in this model; was it trained with other "
                                 "options (model_type, LoRA targets)?")  # fmt: skip
            target.copy_(value.to(target.dtype))


def save_final(denoiser, options: AdapterOptions, family: Family, out_dir: Path) -> list[Path]:
    """LoRA: pytorch_lora_weights.safetensors in diffusers keys; full: a diffusers folder of the denoiser."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if options.model_type == "full":
        target = out_dir / family.denoiser.subfolder
        denoiser.save_pretrained(target, safe_serialization=True)
        for weights in target.rglob("*.safetensors"):
            normalise_file(weights)
        return sorted(p for p in target.rglob("*") if p.is_file())
    from peft import get_peft_model_state_dict

    family.save_lora(out_dir, get_peft_model_state_dict(denoiser), config=lora_config(options, family))
    path = out_dir / "pytorch_lora_weights.safetensors"
    normalise_file(path)
    return [path]


class EMA:
    """Exponential moving average of the trainable weights (kept on the CPU unless ema_device = accelerator)."""

    def __init__(self, params: dict[str, Any], decay: float, device, foreach: bool = True) -> None:
        self.decay = decay
        self.device = device
        self.foreach = foreach
        self.shadow = {n: p.detach().to(device=device, dtype=p.dtype, copy=True) for n, p in params.items()}

    def update(self, params: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            names = list(self.shadow)
            shadows = [self.shadow[n] for n in names]
            current = [params[n].detach().to(self.device, dtype=self.shadow[n].dtype) for n in names]
            if self.foreach:
                torch._foreach_lerp_(shadows, current, 1 - self.decay)
            else:
                for s, c in zip(shadows, current):
                    s.lerp_(c, 1 - self.decay)

    def state(self) -> dict[str, Any]:
        return dict(self.shadow)

    def load(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            self.shadow[name].copy_(value)
