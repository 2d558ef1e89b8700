"""What is trained: LoRA adapters injected with peft, or the whole denoiser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from ..families import Family
from ..families.lora import LORA_WEIGHT_NAME
from ..log import get_logger
from ..quantise import cast_trainable
from ..lycoris_settings import read_config, resolve_config_path
from ..tensorfile import normalise_file
from ..singlora_format import is_singlora_state, ramp_up_steps, to_plain_lora
from . import lycoris, singlora, text_encoders
from .options import AdapterOptions

log = get_logger("train")

# lora_init_type -> peft's init_lora_weights, as SimpleTuner passes it (pissa is peft's exact-SVD PiSSA).
_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
# PiSSA and OLoRA move the adapter's initial product out of the base weights, so the trained adapter is relative to a
# changed base. The saved file is made relative to the original base: (B, A) becomes ([B, -B0], [A; A0]), rank 2r
# and alpha 2*alpha (the same scale), as peft's `path_initial_model_for_weight_conversion` does.
_MUTATES_BASE = ("pissa", "olora")
_INITIAL_ATTR = "_st_initial_lora"


# SimpleTuner's slider LoRA targets (`slider_lora_target`), per family where it sets its own. Its lists also name the
# fused `to_qkv`, which exists only after fusing projections; st never fuses them while training.
SLIDER_TARGETS: dict[str | None, tuple[str, ...]] = {
    None: ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "proj_in", "proj_out", "conv_in", "conv_out",
           "time_embedding.linear_1", "time_embedding.linear_2"),
    "flux": ("to_k", "to_q", "to_v", "to_out.0"),
    "chroma": ("to_k", "to_q", "to_v", "to_out.0"),
    "sd3": ("to_k", "to_q", "to_v", "to_out.0"),
}


def lora_config(options: AdapterOptions, family: Family, saved: bool = False, converted: bool = False):
    """peft's LoraConfig for the options: the family's default targets unless peft_lora_target_modules names them.
    `saved`: the config written into the file, without dropout (loaders build their layers from it, and a dropout
    layer added to a model in eval mode would still drop at inference). `converted`: a PiSSA/OLoRA adapter as saved
    (twice the rank and alpha, plain initialisation)."""
    from peft import LoraConfig

    if options.use_dora and options.lora_init_type in _MUTATES_BASE:
        raise ConfigError(f"lora_init_type {options.lora_init_type!r} cannot be combined with use_dora: its adapter "
                          "could not be saved relative to the original base weights; choose one of them")  # fmt: skip
    if options.peft_lora_target_modules:
        targets = options.peft_lora_target_modules
    elif options.slider_lora_target:
        targets = SLIDER_TARGETS.get(family.name, SLIDER_TARGETS[None])
    else:
        targets = family.lora_target_modules(options.flux_lora_target if family.name in ("flux", "chroma") else None)
    factor = 2 if converted else 1
    alpha = options.lora_alpha if options.lora_alpha is not None else options.lora_rank
    settings = dict(
        r=options.lora_rank * factor,
        lora_alpha=alpha * factor,
        lora_dropout=0.0 if saved else options.lora_dropout,
        target_modules=list(targets),
        init_lora_weights=True if converted else _INIT[options.lora_init_type],
        use_dora=options.use_dora,
    )
    # SingLoRA trains in its own layers; what is saved for diffusers is the equal plain LoRA (see singlora_format).
    if options.peft_lora_mode == "singlora" and not saved:
        return singlora.lora_config(settings, options.singlora_ramp_up_steps)
    return LoraConfig(**settings)


def attach(denoiser, options: AdapterOptions, family: Family, base_dir: Path | None = None,
           dtype: str = "float32") -> list[Any]:  # fmt: skip
    """Make the denoiser trainable as `model_type` and `lora_type` say; returns the trainable parameters.
    `base_dir`: where relative `lycoris_config` / `init_lora` paths are looked up after the working folder. `dtype`:
    the torch dtype name adapters are held in (`quantise.adapter_dtype`), set before `init_lora` is loaded so that
    its weights are rounded at most once, to that dtype."""
    if options.model_type == "full":
        denoiser.requires_grad_(True)
        if options.layer_freeze_strategy == "bitfit":
            bitfit(denoiser)
        return [p for p in denoiser.parameters() if p.requires_grad]
    if options.layer_freeze_strategy == "bitfit":  # SimpleTuner's apply_bitfit_freezing returns a LoRA run unchanged
        log.warning("layer_freeze_strategy bitfit applies to model_type full only; a LoRA run trains its LoRA weights "
                    "as without it (as in SimpleTuner)")  # fmt: skip
    denoiser.requires_grad_(False)
    if options.lora_type == "lycoris":
        params = _attach_lycoris(denoiser, options, base_dir)
        cast_trainable(params, dtype)
        return params
    from peft import inject_adapter_in_model

    if options.peft_lora_mode == "singlora":
        singlora.check(options)
    cfg = lora_config(options, family)
    try:
        inject_adapter_in_model(cfg, denoiser)
    except ValueError as exc:
        raise ConfigError(f"LoRA targets {cfg.target_modules} do not fit the {family.name} denoiser: {exc}; set "
                          "peft_lora_target_modules to module names of the model") from None  # fmt: skip
    if options.lora_init_type in _MUTATES_BASE:
        from peft import get_peft_model_state_dict

        initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(denoiser).items()}
        object.__setattr__(denoiser, _INITIAL_ATTR, initial)  # a plain attribute, not a registered submodule/buffer
    cast_trainable([p for n, p in denoiser.named_parameters() if "lora_" in n], dtype)
    if options.init_lora:
        load_lora_into(denoiser, Path(options.init_lora))
    if options.peft_lora_mode == "singlora":
        singlora.prepare(denoiser, options.singlora_ramp_up_steps)
    params = [p for n, p in denoiser.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ConfigError("no LoRA parameters were created; check peft_lora_target_modules / flux_lora_target")
    return params


def bitfit(denoiser) -> None:
    """BitFit (layer_freeze_strategy bitfit), as SimpleTuner's apply_bitfit_freezing: only parameters whose name
    contains "bias" stay trainable."""
    trained = total = 0
    for name, param in denoiser.named_parameters():
        param.requires_grad_("bias" in name)
        total += param.numel()
        trained += param.numel() if param.requires_grad else 0
    if not trained:
        raise ConfigError("layer_freeze_strategy bitfit left nothing to train: this denoiser has no bias parameters; "
                          "set layer_freeze_strategy none")  # fmt: skip
    log.info("layer_freeze_strategy bitfit: training %d bias parameters of %d (%.2f%%); every other weight is frozen",
             trained, total, 100 * trained / total)  # fmt: skip


def _attach_lycoris(denoiser, options: AdapterOptions, base_dir: Path | None) -> list[Any]:
    peft_only = {"use_dora": options.use_dora, "lora_init_type": options.lora_init_type != "default",
                 "peft_lora_target_modules": options.peft_lora_target_modules,
                 "peft_lora_mode": options.peft_lora_mode != "standard"}  # fmt: skip
    for name in (n for n, value in peft_only.items() if value):
        log.warning("%s applies to lora_type standard (peft) only; a LyCORIS network takes its shape from "
                    "lycoris_config (as in SimpleTuner)", name)  # fmt: skip
    path = resolve_config_path(options.lycoris_config, base_dir)
    settings = read_config(path)
    init = resolve_config_path(options.init_lora, base_dir) if options.init_lora else None
    network = lycoris.build(denoiser, settings, source=str(path), init_lora=init,
                            init_lokr_norm=options.init_lokr_norm)  # fmt: skip
    network.st_settings = settings  # written into the final file's header
    return [p for p in network.parameters() if p.requires_grad]


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
    network = lycoris.network_of(denoiser)
    if network is not None:
        return {f"{lycoris.NETWORK_ATTR}.{k}": v for k, v in lycoris.state(network).items()}
    # SingLoRA's step buffers (its ramp) travel with the weights: a resumed run and a published checkpoint need them.
    return {n: p.detach() for n, p in denoiser.named_parameters() if "lora_" in n} | singlora.step_buffers(denoiser)


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
    singlora.restored(denoiser)


def save_final(denoiser, options: AdapterOptions, family: Family, out_dir: Path) -> list[Path]:
    """LoRA: pytorch_lora_weights.safetensors in diffusers keys; full: a diffusers folder of the denoiser."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if options.model_type == "full":
        target = out_dir / family.denoiser.subfolder
        denoiser.save_pretrained(target, safe_serialization=True)
        for weights in target.rglob("*.safetensors"):
            normalise_file(weights)
        encoders = text_encoders.of(denoiser)  # train_text_encoder: the trained encoders beside it
        extra = encoders.save_full(out_dir) if encoders is not None else []
        return sorted(p for p in target.rglob("*") if p.is_file()) + extra
    path = out_dir / LORA_WEIGHT_NAME
    network = lycoris.network_of(denoiser)
    if network is not None:
        return [lycoris.save(network, path, network.st_settings)]
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser)
    written = [path]
    if is_singlora_state(state):
        written.append(singlora.save_simpletuner_layout(family, out_dir, state, lora_config(options, family)))
        state = to_plain_lora(state, singlora.module_shapes(denoiser), ramp_up_steps(options.singlora_ramp_up_steps))
    initial = getattr(denoiser, _INITIAL_ATTR, None)
    if initial is not None:
        state = relative_to_original_base(state, initial)
    config = lora_config(options, family, saved=True, converted=initial is not None)
    encoders = text_encoders.of(denoiser)
    if encoders is not None:  # train_text_encoder: their LoRA goes into the same file
        text_encoders.save_lora(family, out_dir, encoders, state, config)
    else:
        family.save_lora(out_dir, state, config=config)
    normalise_file(path)
    return written


def relative_to_original_base(state: dict[str, Any], initial: dict[str, Any]) -> dict[str, Any]:
    """A PiSSA/OLoRA adapter (`state`, started at `initial`) as a LoRA on the unchanged base: since the base lost
    scale * B0 @ A0, the delta to the original base is scale * (B @ A - B0 @ A0) = scale * [B, -B0] @ [A; A0]."""
    import torch

    out = {}
    for key, value in state.items():
        if ".lora_A." in key:
            out[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
        else:
            out[key] = value
    return out


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
