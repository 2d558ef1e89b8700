"""safetensors files with deterministic bytes.

safetensors keeps `__metadata__` in a hash map whose order changes from process to process, so two saves of the
same tensors and metadata can differ in their header. These helpers rewrite the header with sorted keys: equal
content, equal bytes, equal sha256 (which manifests record).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_bytes


def deterministic_bytes(raw: bytes, metadata: dict[str, str] | None = None) -> bytes:
    """Re-serialise safetensors bytes with a sorted header (and `metadata` replacing the stored one, if given)."""
    (length,) = struct.unpack("<Q", raw[:8])
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
