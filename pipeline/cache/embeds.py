"""The shared embeddings file: every prompt stored once (captions used by several samples, the empty prompt and the
validation prompts), keyed by prompt key, with the text identity in its metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..cache_reader import safetensors_metadata
from ..fsutil import atomic_write_bytes
from .encode import Encoders, encode_texts
from .layout import EMBEDS_PATH
from .options import CacheOptions
from .plan import CachePlan


def _previous_tensors(path: Path, text_identity: str) -> dict[str, Any]:
    """The tensors of an existing embeds file made with the same text identity (empty if none or unreadable)."""
    if not path.is_file():
        return {}
    try:
        import zstandard
        from safetensors.torch import load

        raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
        meta = json.loads(safetensors_metadata(raw).get("st", "{}"))
        return load(raw) if meta.get("text_identity") == text_identity else {}
    except Exception:  # unreadable old file: re-encode
        return {}


def write_shared_embeds(out_dir: Path, plan: CachePlan, encoders: Encoders, options: CacheOptions) -> None:
    """All shared prompts in one safetensors file (reused from the previous one when the text identity matches)."""
    import zstandard
    from safetensors.torch import save

    path = out_dir / EMBEDS_PATH
    previous = _previous_tensors(path, plan.text_identity)
    tensors: dict[str, Any] = {}
    missing = [k for k in plan.shared_prompts if not any(name.startswith(f"{k}.") for name in previous)]
    if missing:
        encoded = encode_texts(encoders, [plan.shared_prompts[k] for k in missing], options)
        for key, values in zip(missing, encoded):
            tensors.update({f"{key}.{name}": value for name, value in values.items()})
    for key in plan.shared_prompts:
        tensors.update({name: value for name, value in previous.items() if name.startswith(f"{key}.")})
    meta = {"st": json.dumps({"text_identity": plan.text_identity, "prompts": plan.shared_prompts}, sort_keys=True)}
    data = save(dict(sorted(tensors.items())), metadata=meta)
    compressor = zstandard.ZstdCompressor(level=options.cache_compression_level, write_content_size=True,
                                          write_checksum=True)  # fmt: skip
    atomic_write_bytes(path, compressor.compress(data))
