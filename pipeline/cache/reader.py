"""Reading a cache output: the manifest, verified shards, decoded samples and shared prompt embeddings.

This is what `st train` (or any other consumer) uses; it needs nothing but the cache folder: no source images, no
prepare output, no models. Shards come from the manifest's list and are hash-checked before use.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import ManifestError
from ..manifest import MANIFEST_NAME, read_manifest
from ..shards import read_shard, unpack_tensors


@dataclass
class CachedSample:
    key: str
    meta: dict[str, Any]
    latent: Any  # torch.Tensor, C x h x w
    texts: list[dict[str, Any]]  # per caption: prompt_embeds, pooled_prompt_embeds, attention_mask, as stored


class CacheReader:
    """A cache output folder (or its manifest.json), validated and ready to stream."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.manifest_path = path / MANIFEST_NAME if path.is_dir() else path
        self.root = self.manifest_path.parent
        self.manifest = read_manifest(self.manifest_path, stage="cache")
        self._shared: dict[str, dict[str, Any]] | None = None

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    def shared_embeds(self) -> dict[str, dict[str, Any]]:
        """Shared prompt embeddings by prompt key (verified against the manifest's outputs)."""
        if self._shared is None:
            rel = self.manifest["embeds"]["path"]
            entry = next(o for o in self.manifest["outputs"] if o["path"] == rel)
            data = (self.root / rel).read_bytes()
            from ..hashing import sha256_bytes

            if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
                raise ManifestError(f"{self.root / rel} does not match {self.manifest_path}; re-run `st cache`")
            tensors = unpack_tensors(data)
            grouped: dict[str, dict[str, Any]] = {}
            for name, value in tensors.items():
                key, _, field = name.partition(".")
                grouped.setdefault(key, {})[field] = value
            self._shared = grouped
        return self._shared

    def prompt(self, text: str) -> dict[str, Any]:
        """Embeddings of a shared prompt by its text (the empty prompt, validation prompts, ...)."""
        from .plan import prompt_key

        key = prompt_key(text)
        shared = self.shared_embeds()
        if key not in shared:
            raise KeyError(f"prompt {text!r} is not among the cached shared prompts")
        return shared[key]

    def decode(self, key: str, members: dict[str, bytes]) -> CachedSample:
        meta = json.loads(members["json"])
        latent = unpack_tensors(members["latent.safetensors.zst"])["latent"]
        local: dict[int, dict[str, Any]] = {}
        if "text.safetensors.zst" in members:
            for name, value in unpack_tensors(members["text.safetensors.zst"]).items():
                index, _, field = name.partition(".")
                local.setdefault(int(index), {})[field] = value
        texts = []
        for i, ref in enumerate(meta["text"]):
            kind, _, value = ref.partition(":")
            texts.append(local[i] if kind == "sample" else self.shared_embeds()[value])
        return CachedSample(key, meta, latent, texts)

    def iter_shard(self, shard: dict[str, Any]) -> Iterator[CachedSample]:
        for key, members in read_shard(self.root / shard["path"], expected_sha256=shard["sha256"],
                                       expected_bytes=shard["bytes"]):  # fmt: skip
            yield self.decode(key, members)

    def __iter__(self) -> Iterator[CachedSample]:
        for shard in self.shards:
            yield from self.iter_shard(shard)


def safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The `__metadata__` of raw safetensors bytes, read from the header alone."""
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]).get("__metadata__", {}) or {}
