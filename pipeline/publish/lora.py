"""Reading a diffusers-format LoRA file: its tensors by module, and each module's rank, alpha and scale.

The `lora_adapter_metadata` header entry (diffusers' name for the stored `LoraConfig`, keys prefixed with the
denoiser's subfolder) gives `lora_alpha`, `rank_pattern` / `alpha_pattern` and `use_rslora`; without it alpha equals
the rank (scale 1), as diffusers assumes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, NotSupportedError

METADATA_KEY = "lora_adapter_metadata"


@dataclass
class LoraModule:
    """One adapted module: `down` (lora_A, r x in) and `up` (lora_B, out x r) and the scale peft applies; for DoRA,
    `magnitude` is peft's per-output-row magnitude vector (one value per output channel)."""

    name: str
    down: Any
    up: Any
    alpha: float
    scale: float
    magnitude: Any = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def read_header(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (empty when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def lora_options(metadata: dict[str, str], prefix: str) -> dict[str, Any]:
    """The stored LoraConfig fields for the `prefix` component (empty without metadata)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(f"the LoRA file's {METADATA_KEY} header is not JSON") from None
    return {k[len(prefix) + 1 :]: v for k, v in packed.items() if k.startswith(prefix + ".")}


def _pattern_value(patterns: dict[str, Any] | None, module: str) -> Any:
    """peft's rule: a pattern key matches a module whose name is the key or ends with `.key` (keys may be regexes)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return None


def modules(tensors: dict[str, Any], metadata: dict[str, str], prefix: str) -> list[LoraModule]:
    """Group `prefix.<module>.lora_A.weight` / `.lora_B.weight` pairs and DoRA's `.lora_magnitude_vector`; anything
    else (embeddings, biases) cannot be expressed as a LoRA and is refused."""
    options = lora_options(metadata, prefix)
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix + "."):
            raise InputError(f"LoRA key {key!r} is not under the denoiser prefix {prefix!r}")
        m = re.fullmatch(r"(.+)\.(?:lora_([AB])\.weight|lora_(magnitude)_vector(?:\.weight)?)", key[len(prefix) + 1 :])
        if m is None:
            raise NotSupportedError(f"LoRA weight {key!r} (another adapter type) has no ComfyUI equivalent; "
                                    "publish with lora_format = \"diffusers\"")  # fmt: skip
        pairs.setdefault(m[1], {})[m[2] or m[3]] = value
    found = []
    for name in sorted(pairs):
        pair = pairs[name]
        magnitude = pair.pop("magnitude", None)
        if set(pair) != {"A", "B"}:
            raise InputError(f"LoRA module {name!r} lacks its lora_{'B' if 'A' in pair else 'A'} weight")
        rank = int(pair["A"].shape[0])
        alpha = _pattern_value(options.get("alpha_pattern"), name)
        if alpha is None:
            alpha = options.get("lora_alpha", rank)
        stated = _pattern_value(options.get("rank_pattern"), name) or options.get("r")
        if stated not in (None, rank):
            raise InputError(f"LoRA module {name!r} has rank {rank}, but the file's metadata says {stated}; the "
                             "weights do not belong to that header")  # fmt: skip
        alpha = float(alpha)
        scale = alpha / math.sqrt(rank) if options.get("use_rslora") else alpha / rank
        found.append(LoraModule(name, pair["A"], pair["B"], alpha, scale, magnitude))
    if not found:
        raise InputError("the LoRA file holds no lora_A / lora_B weights")
    return found


def base_weights(folder: Path):
    """A reader of the base denoiser's weights by diffusers module name (`<module>.weight`), from the safetensors
    files of its diffusers folder (sharded or not); DoRA's ComfyUI export needs them. Nothing is read before the
    first call."""
    from safetensors import safe_open

    where: dict[str, Path] = {}

    def read(module: str) -> Any:
        if not where:
            files = sorted(Path(folder).glob("*.safetensors"))
            if not files:
                raise InputError(f"{folder} holds no safetensors weights of the base denoiser")
            for file in files:
                with safe_open(str(file), framework="pt") as handle:
                    where.update(dict.fromkeys(handle.keys(), file))
        key = f"{module}.weight"
        if key not in where:
            raise InputError(f"the base denoiser in {folder} has no weight {key!r}")
        with safe_open(str(where[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    return read
