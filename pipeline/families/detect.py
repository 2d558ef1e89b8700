"""Which family a model folder or single-file checkpoint is, from its metadata alone (no weights are loaded).

A diffusers folder names its components in `model_index.json` (`_class_name` and `{subfolder: [library, class]}`);
a family matches when the denoiser class is the family's and every text encoder the folder has is one the family
expects, with the family's class. SD 1.x and SD 2.x share every class name: SD 2.x UNets use linear projections in
their transformer blocks (`use_linear_projection`), SD 1.x ones do not; the text encoder's activation (GELU against
quick GELU) is the fallback when the UNet config is missing. A folder without `model_index.json` is read from its
components' own configs. A single `.safetensors` checkpoint is recognised by the key names in its header, the way
diffusers' single-file loader tells model types apart.

`check_model_family` is the one place every stage that reads a model (cache, train, publish) refuses a
`model_family` that does not match the model it was given.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, UserError
from pipeline.families.spec import Family
from pipeline.log import get_logger

log = get_logger("families")

_MAX_JSON_BYTES = 4 << 20  # model_index.json and component configs are a few KB
_MAX_HEADER_BYTES = 100 << 20  # the largest safetensors headers (Flux, SD3 with every encoder) are a few MB
_TEXT_ENCODER = re.compile(r"^text_encoder(_\d+)?$")
_DENOISERS = ("unet", "transformer", "prior", "decoder")

# Single-file checkpoints: key prefixes that identify a family, in the order diffusers checks them.
_SINGLE_FILE_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sd3", ("joint_blocks.", "model.diffusion_model.joint_blocks.")),
    # FLUX.2 keeps Flux's block names and shares its modulation across blocks; Chroma keeps Flux's block names and
    # adds the modulation approximator: both are told apart first.
    ("flux2", ("double_stream_modulation_img.", "model.diffusion_model.double_stream_modulation_img.")),
    ("chroma", ("distilled_guidance_layer.", "model.diffusion_model.distilled_guidance_layer.")),
    ("flux", ("double_blocks.", "model.diffusion_model.double_blocks.")),
    ("sdxl", ("conditioner.embedders.1.",)),
    ("sd2x", ("cond_stage_model.model.",)),
    ("sd1x", ("cond_stage_model.transformer.",)),
)


@dataclass(frozen=True)
class Detected:
    """What a model looks like: the family names it fits (usually one) and the evidence, in words."""

    families: tuple[str, ...]
    evidence: str


def _read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON object file, or None when it is missing, too large or not a JSON object."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_JSON_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _components_from_index(index: dict[str, Any]) -> tuple[dict[str, str], set[str]]:
    """{subfolder: class name} of the components a model_index.json names, and the names it sets to null (left
    out on purpose, e.g. a T5 given separately)."""
    out, nulls = {}, set()
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        if isinstance(value[1], str) and value[1]:
            out[key] = value[1]
        elif value[1] is None:
            nulls.add(key)
    return out, nulls


def _components_from_configs(folder: Path) -> dict[str, str]:
    """{subfolder: class name} read from each subfolder's config (a folder saved without model_index.json)."""
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config = _read_json(sub / "config.json")
        if config is None:
            continue
        name = config.get("_class_name") or next(iter(config.get("architectures") or []), None)
        if isinstance(name, str):
            out[sub.name] = name
    return out


def _fits(family: Family, components: dict[str, str], nulls: set[str]) -> bool:
    """The family's denoiser class, and exactly its text encoders (each with its class, set to null, or missing where
    the family names another source for it)."""
    if components.get(family.denoiser.subfolder) != family.denoiser.class_name:
        return False
    if any(name in components for name in _DENOISERS if name != family.denoiser.subfolder):
        return False
    # (OmniGen's only text part is its tokenizer: nothing under a text_encoder folder to match)
    expected = {spec.model.subfolder: spec.model.class_name for spec in family.text_encoders
                if _TEXT_ENCODER.match(spec.model.subfolder)}
    present = {k: v for k, v in components.items() if _TEXT_ENCODER.match(k)}
    if any(expected.get(k) != v for k, v in present.items()):
        return False
    sourced = {spec.model.subfolder for spec in family.text_encoders if spec.source}  # may come from elsewhere
    return all(k in present or k in nulls or k in sourced for k in expected)


def _variant_fits(family: Family, folder: Path, components: dict[str, str], nulls: set[str]) -> bool:
    """Whether the folder fits the family's variant for it (`Family.variant`: FLUX.2 [dev]'s other text encoder)."""
    if family.variant is None:
        return False
    try:
        variant = family.for_run(None, str(folder))
    except UserError:  # a variant that refuses this folder: not this family's to claim
        return False
    return variant is not family and _fits(variant, components, nulls)


def _sd2_or_sd1(folder: Path) -> tuple[str, str] | None:
    """('sd2x' or 'sd1x', why) from the UNet's projection style, else the text encoder's activation."""
    unet = _read_json(folder / "unet" / "config.json")
    if unet is not None and "use_linear_projection" in unet:
        linear = bool(unet["use_linear_projection"])
        return ("sd2x" if linear else "sd1x"), f"unet use_linear_projection {str(linear).lower()}"
    encoder = _read_json(folder / "text_encoder" / "config.json")
    act = (encoder or {}).get("hidden_act")
    name = {"gelu": "sd2x", "quick_gelu": "sd1x"}.get(act) if isinstance(act, str) else None
    return (name, f"text_encoder hidden_act {act}") if name else None


def _describe(components: dict[str, str], class_name: str | None) -> str:
    parts = [f"_class_name {class_name}"] if class_name else []
    parts += [f"{k} {v}" for k, v in sorted(components.items()) if k in _DENOISERS or _TEXT_ENCODER.match(k)]
    return ", ".join(parts)


def detect_folder(folder: Path, families: dict[str, Family]) -> Detected | None:
    """The families a diffusers folder fits; None when it names no components at all."""
    index = _read_json(folder / "model_index.json")
    if index is not None:
        (components, nulls), source = _components_from_index(index), "model_index.json"
    else:
        components, nulls, source = _components_from_configs(folder), set(), "the component configs"
    if not components:
        return None
    fits = [name for name, family in families.items()
            if _fits(family, components, nulls) or _variant_fits(family, folder, components, nulls)]
    class_name = index.get("_class_name") if index else None
    evidence = f"{source}: {_describe(components, class_name if isinstance(class_name, str) else None)}"
    if set(fits) == {"sd1x", "sd2x"}:
        narrowed = _sd2_or_sd1(folder)
        if narrowed is not None:
            fits, evidence = [narrowed[0]], f"{evidence}; {narrowed[1]}"
    return Detected(tuple(fits), evidence)


def _safetensors_keys(path: Path) -> list[str] | None:
    """Tensor names from a safetensors header (bounded read); None when the file is not one."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER_BYTES, path.stat().st_size - 8):
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return None
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else None


def detect_single_file(path: Path) -> Detected | None:
    """The family of a single-file checkpoint by its key names; None when nothing recognisable is found."""
    keys = _safetensors_keys(path)
    if not keys:
        return None
    for name, prefixes in _SINGLE_FILE_MARKERS:
        hit = next((k for k in keys if k.startswith(prefixes)), None)
        if hit is not None:
            return Detected((name,), f"its tensor names (e.g. {hit})")
    return None


def check_model_family(family: Family, source: str | Path | None, families: dict[str, Family]) -> None:
    """Refuse `family` when the local model at `source` is another family (exit 2 naming the folder, what it looks
    like and the fix). Hub ids, missing paths and models that cannot be told apart pass: loading reports those."""
    if source is None:
        return
    path = Path(str(source)).expanduser()
    if path.is_dir():
        detected, what = detect_folder(path, families), "model folder"
    elif path.is_file():
        detected, what = detect_single_file(path), "single-file checkpoint"
    else:
        return
    if detected is None or family.name in detected.families:
        if detected is None:
            log.debug("cannot tell the family of %s; trusting model_family %s", path, family.name)
        return
    if detected.families:
        looks = " or ".join(detected.families)
        fix = (f"set model_family = \"{detected.families[0]}\" (--set model_family={detected.families[0]}), or point "
               f"pretrained_model_name_or_path at a model of family {family.name}")  # fmt: skip
    else:
        looks = "none of the families st knows"
        fix = f"point pretrained_model_name_or_path at a model of family {family.name} ({family.pipeline_class})"
    raise InputError(
        f"model_family is {family.name!r}, but the {what} {path} looks like {looks} ({detected.evidence}); {fix}"
    )
