"""The published weight files: the diffusers LoRA (a byte copy of train's final, or a checkpoint's weights renamed to
the same keys and header), its ComfyUI twin, a full fine-tune's denoiser, and EMA weights."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import InputError, NotSupportedError
from ..families import Family
from ..families.lora import LORA_WEIGHT_NAME
from ..log import get_logger
from ..lycoris_format import CHECKPOINT_PREFIX, is_lycoris_keys
from ..singlora_format import SINGLORA_WEIGHT_NAME, is_singlora_state, ramp_up_steps, to_plain_lora
from ..tensorfile import save_tensors
from . import comfyui, lora
from .lineage import Inputs

log = get_logger("publish")

EMA_NAME = "ema_weights.safetensors"
DENOISER_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2")


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def write_lora(inputs: Inputs, family: Family, stage: Path) -> Path:
    """`pytorch_lora_weights.safetensors` in diffusers keys: train's final bytes, or the checkpoint's weights."""
    final = inputs.train_dir / "final" / LORA_WEIGHT_NAME
    target = stage / LORA_WEIGHT_NAME
    if inputs.checkpoint is None:
        shutil.copyfile(final, target)
        return target
    init = (inputs.train.get("config") or {}).get("lora_init_type")
    if init in ("pissa", "olora"):  # the checkpoint's adapter is relative to the base its initialisation changed
        raise NotSupportedError(f"publishing a checkpoint of a lora_init_type {init} run is not supported yet: its "
                                "adapter applies to the base weights that initialisation changed; publish the run's "
                                "final weights (without --checkpoint)")  # fmt: skip
    tensors = lora.load_tensors(inputs.checkpoint.path / "weights.safetensors")
    if is_lycoris(final):
        return _lycoris_layout(tensors, final, target, inputs.checkpoint.path)
    if is_singlora_state(tensors):
        tensors = _singlora_as_plain(inputs, family, final, tensors)
    wanted = set(_keys(final))
    renamed = {}
    for key, value in tensors.items():
        # peft names parameters `<module>.lora_A.<adapter>.weight`; its state dict (and diffusers) drop the adapter.
        component, name = _component(key, family)
        candidates = [f"{component}.{c}" for c in (re.sub(r"\.default(?=\.|$)", "", name),
                                                   re.sub(r"\.default\.weight$", "", name))]  # fmt: skip
        name = next((c for c in candidates if c in wanted), None)
        if name is None:
            raise InputError(f"checkpoint weight {key!r} of {inputs.checkpoint.path} matches no weight of {final}; "
                             "was the checkpoint written by another run?")  # fmt: skip
        renamed[name] = value
    if len(renamed) != len(wanted):
        raise InputError(f"{inputs.checkpoint.path} holds {len(renamed)} LoRA weights, {final} {len(wanted)}")
    save_tensors(target, renamed, metadata=lora.read_header(final))
    return target


def _component(key: str, family: Family) -> tuple[str, str]:
    """(diffusers component, name within it) of a LoRA weight: a trained text encoder's keys start with its
    subfolder (`text_encoder.`, `text_encoder_2.`, train_text_encoder), the denoiser's are its own."""
    head, _, rest = key.partition(".")
    if head in TEXT_ENCODER_COMPONENTS:
        return head, rest
    prefix = family.denoiser.subfolder
    return (prefix, rest) if head == prefix else (prefix, key)


def _singlora_as_plain(inputs: Inputs, family: Family, final: Path, tensors: dict[str, Any]) -> dict[str, Any]:
    """A SingLoRA checkpoint's weights as the plain LoRA train's final file holds (module shapes read from it)."""
    from safetensors import safe_open

    prefix = family.denoiser.subfolder + "."
    shapes: dict[str, list[int]] = {}
    with safe_open(str(final), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - a safe_open handle, not a dict
            module, _, kind = key.removeprefix(prefix).rpartition(".lora_")
            rows, cols = handle.get_slice(key).get_shape()
            shapes.setdefault(module, [0, 0])[0 if kind == "B.weight" else 1] = rows if kind == "B.weight" else cols
    steps = ramp_up_steps((inputs.train.get("config") or {}).get("singlora_ramp_up_steps"))
    return to_plain_lora(tensors, {m: (o, i) for m, (o, i) in shapes.items()}, steps)


def write_singlora(inputs: Inputs, family: Family, stage: Path) -> Path | None:
    """SimpleTuner's SingLoRA file (`SINGLORA_WEIGHT_NAME`) of a singlora run: train's final bytes, or the
    checkpoint's SingLoRA matrices and step buffers under the same keys and header; None for other runs."""
    final = inputs.train_dir / "final" / SINGLORA_WEIGHT_NAME
    if not any(e["path"] == f"final/{SINGLORA_WEIGHT_NAME}" for e in inputs.train["final"]["files"]):
        return None
    target = stage / SINGLORA_WEIGHT_NAME
    if inputs.checkpoint is None:
        shutil.copyfile(final, target)
        return target
    prefix = family.denoiser.subfolder
    tensors = lora.load_tensors(inputs.checkpoint.path / "weights.safetensors")
    renamed = {f"{prefix}.{k.removesuffix('.default')}": v for k, v in tensors.items()}
    if set(renamed) != set(_keys(final)):
        raise InputError(f"{inputs.checkpoint.path} does not hold the SingLoRA weights of {final}; was the "
                         "checkpoint written by another run?")  # fmt: skip
    save_tensors(target, renamed, metadata=lora.read_header(final))
    return target


def is_lycoris(path: Path) -> bool:
    """Whether a weight file is a LyCORIS network's (`lycoris_*` keys, lora_type lycoris)."""
    return is_lycoris_keys(_keys(path))


def _lycoris_layout(tensors: dict[str, Any], final: Path, target: Path, source: Path) -> Path:
    """LyCORIS weights of `source` (a checkpoint's or EMA weights, named after the denoiser submodule that holds the
    network while training) under the library's names, with the header of train's final file: a file that loads
    like the final one."""
    renamed = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in tensors.items()}
    if set(renamed) != set(_keys(final)) or len(renamed) != len(tensors):
        raise InputError(f"{source} does not hold the LyCORIS weights of {final}; was it written by another run?")
    save_tensors(target, renamed, metadata=lora.read_header(final))
    return target


def comfyui_name(hub_model_id: str | None) -> str:
    """`<name>_comfyui.safetensors`: the hub repository's name, else the diffusers weight file's stem."""
    name = (hub_model_id or "").rstrip("/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or Path(LORA_WEIGHT_NAME).stem
    return f"{name}_comfyui.safetensors"


def write_comfyui(source: Path, family: Family, target: Path, denoiser_config: dict[str, Any] | None,
                  base: Any = None) -> Path:  # fmt: skip
    """The LoRA in `source` converted to ComfyUI's layout at `target` (a LyCORIS file is copied: ComfyUI's LoRA loader
    reads its `lycoris_*` keys as they are); `base` reads the base denoiser's weights (needed for DoRA only)."""
    if is_lycoris(source):
        shutil.copyfile(source, target)
        return target
    header, prefix = lora.read_header(source), family.denoiser.subfolder
    parts: dict[str, dict[str, Any]] = {}
    for key, value in lora.load_tensors(source).items():
        parts.setdefault(_component(key, family)[0], {})[key] = value
    tensors = comfyui.convert(family.name, lora.modules(parts.pop(prefix, {}), header, prefix), denoiser_config, base)
    for component, weights in sorted(parts.items()):  # train_text_encoder: the text encoders' LoRA
        tensors.update(comfyui.convert_text_encoder(family.name, component, lora.modules(weights, header, component)))
    save_tensors(target, tensors, metadata={"format": "pt"})
    return target


def write_denoiser(inputs: Inputs, family: Family, model_dir: Path) -> None:
    """The trained denoiser into `model_dir/<subfolder>`: train's final files, or a checkpoint's full weights."""
    sub = family.denoiser.subfolder
    final = inputs.train_dir / "final" / sub
    listed = [e["path"] for e in inputs.train["final"]["files"] if e["path"].startswith(f"final/{sub}/")]
    files = [inputs.train_dir / path for path in listed]
    target = model_dir / sub
    target.mkdir(parents=True, exist_ok=True)
    if inputs.checkpoint is None:
        for file in files:
            destination = target / file.relative_to(final)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, destination)
        return
    shutil.copyfile(final / "config.json", target / "config.json")
    tensors = lora.load_tensors(inputs.checkpoint.path / "weights.safetensors")
    wanted = {k for f in files if f.suffix == ".safetensors" for k in _keys(f)}
    if set(tensors) != wanted:
        raise InputError(f"{inputs.checkpoint.path}/weights.safetensors does not hold the same weights as {final}; "
                         "was the checkpoint written by another run?")  # fmt: skip
    save_tensors(target / DENOISER_WEIGHTS, tensors, metadata={"format": "pt"})


def write_ema(inputs: Inputs, stage: Path) -> Path | None:
    """EMA weights where the run kept them (train's final, or the checkpoint's ema.safetensors); a LyCORIS run's in
    the library's layout with the final file's header, so that they load like it."""
    if inputs.checkpoint is not None:
        source = inputs.checkpoint.path / "ema.safetensors" if "ema.safetensors" in inputs.checkpoint.files else None
    else:
        listed = any(e["path"] == f"final/{EMA_NAME}" for e in inputs.train["final"]["files"])
        source = inputs.train_dir / "final" / EMA_NAME if listed else None
    if source is None:
        return None
    final = inputs.train_dir / "final" / LORA_WEIGHT_NAME
    if inputs.train["model_type"] == "lora" and final.is_file() and is_lycoris(final):
        averaged = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in lora.load_tensors(source).items()}
        # The average covers what trains; the network's fixed tensors (each module's alpha) are the final file's.
        fixed = {k: v for k, v in lora.load_tensors(final).items() if k not in averaged}
        return _lycoris_layout(averaged | fixed, final, stage / EMA_NAME, source)
    shutil.copyfile(source, stage / EMA_NAME)
    return stage / EMA_NAME
