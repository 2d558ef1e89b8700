"""safetensors files with deterministic bytes.

safetensors keeps `__metadata__` in a hash map whose order changes from process to process, so two saves of the
same tensors and metadata can differ in their header. These helpers rewrite the header with sorted keys: equal
content, equal bytes, equal sha256 (which manifests record).

They also read headers defensively: bytes from a cache may be damaged or crafted, so the header length is checked
against the bytes that follow before anything is sliced or parsed, and the tensor table is checked the way safetensors
checks it (known dtypes, offsets that tile the data exactly) without loading any tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_bytes

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


class SafetensorsFormatError(ValueError):
    """Bytes that are not a well-formed safetensors file; the message says what is wrong (callers add where)."""


@dataclass(frozen=True)
class TensorSpec:
    """One entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


def header_length(prefix: bytes, total: int) -> int:
    """The header length declared by the first 8 of `total` bytes, refused unless the header fits in them."""
    if total < 8 or len(prefix) < 8:
        raise SafetensorsFormatError(f"{total} bytes are too few for a safetensors file (8-byte header length)")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > total - 8 or length > MAX_HEADER_BYTES:
        raise SafetensorsFormatError(f"the safetensors header declares {length} bytes, but only {total - 8} follow "
                                     f"(at most {MAX_HEADER_BYTES} are allowed)")  # fmt: skip
    return length


def _spec(name: str, info: Any, data_bytes: int) -> tuple[TensorSpec, int, int]:
    if not isinstance(info, dict) or info.get("dtype") not in DTYPE_BYTES:
        raise SafetensorsFormatError(f"tensor {name!r} has no known dtype")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise SafetensorsFormatError(f"tensor {name!r} has an invalid shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise SafetensorsFormatError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes or end - begin != math.prod(shape) * DTYPE_BYTES[info["dtype"]]:
        raise SafetensorsFormatError(f"tensor {name!r} ({info['dtype']} {shape}) does not fit its data_offsets "
                                     f"{offsets} in {data_bytes} bytes of data")  # fmt: skip
    return TensorSpec(info["dtype"], tuple(shape)), begin, end


def parse_header(header: bytes, data_bytes: int) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Tensor specs and `__metadata__` of a safetensors header followed by `data_bytes` bytes of tensor data."""
    try:
        doc = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SafetensorsFormatError(f"the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise SafetensorsFormatError("the safetensors header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsFormatError("the safetensors __metadata__ is not a map of strings")
    specs: dict[str, TensorSpec] = {}
    spans = []
    for name, info in doc.items():
        specs[name], begin, end = _spec(name, info, data_bytes)
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise SafetensorsFormatError(f"the tensor data has a gap or an overlap at byte {begin}")
        position = end
    if position != data_bytes:
        raise SafetensorsFormatError(f"the tensors cover {position} of the {data_bytes} data bytes")
    return specs, metadata


def read_header(raw: bytes) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Tensor specs and metadata of whole safetensors bytes (`SafetensorsFormatError` when they are malformed)."""
    length = header_length(raw, len(raw))
    return parse_header(raw[8 : 8 + length], len(raw) - 8 - length)


def deterministic_bytes(raw: bytes, metadata: dict[str, str] | None = None) -> bytes:
    """Re-serialise safetensors bytes with a sorted header (and `metadata` replacing the stored one, if given)."""
    length = header_length(raw, len(raw))
    header = json.loads(raw[8 : 8 + length])
    stored = header.pop("__metadata__", None)
    meta = metadata if metadata is not None else stored
    ordered: dict[str, Any] = {}
    if meta:
        ordered["__metadata__"] = dict(sorted(meta.items()))
    ordered.update((k, header[k]) for k in sorted(header))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


def save_tensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Atomically write `tensors` as a safetensors file with deterministic bytes."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(path, deterministic_bytes(data, metadata))


def normalise_file(path: str | Path) -> None:
    """Rewrite an existing safetensors file (written by another library) with a deterministic header."""
    raw = Path(path).read_bytes()
    fixed = deterministic_bytes(raw)
    if fixed != raw:
        atomic_write_bytes(path, fixed)
