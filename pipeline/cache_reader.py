"""Reading a cache output: the manifest, verified shards, decoded samples and shared prompt embeddings.

This is what tools and tests use to read a whole cache in order; it needs nothing but the cache folder: no source
images, no prepare output, no models. Shards come from the manifest's list and are hash-checked before use; every
sample is checked and decoded by the shard format's owner (`pipeline.shardformat`), within the bounds the manifest
implies. Training reads by index instead (`pipeline.train.data`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import ManifestError
from .manifest import MANIFEST_NAME, read_manifest
from .prompts import prompt_key
from .shardformat import COND, CacheChecks, read_shard, unpack_tensors
from .tensorfile import read_header

__all__ = ["COND", "CacheChecks", "CacheReader", "CachedSample", "safetensors_metadata"]


@dataclass
class CachedSample:
    key: str
    meta: dict[str, Any]
    latent: Any  # torch.Tensor, C x h x w
    texts: list[dict[str, Any]]  # per caption: prompt_embeds, pooled_prompt_embeds, attention_mask, as stored
    conditioning: dict[str, Any] = field(default_factory=dict)  # the cond member's tensors ("0.pixels", ...)


class CacheReader:
    """A cache output folder (or its manifest.json), validated and ready to stream."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.manifest_path = path / MANIFEST_NAME if path.is_dir() else path
        self.root = self.manifest_path.parent
        self.manifest = read_manifest(self.manifest_path, stage="cache")
        self.checks = CacheChecks(self.manifest)
        self._shared: dict[str, dict[str, Any]] | None = None

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    def shared_embeds(self) -> dict[str, dict[str, Any]]:
        """Shared prompt embeddings by prompt key (verified against the manifest's outputs)."""
        if self._shared is None:
            rel = self.manifest["embeds"]["path"]
            entry = next((o for o in self.manifest["outputs"] if o["path"] == rel), None)
            if entry is None:
                raise ManifestError(f"{self.manifest_path} does not list its shared embeddings {rel} among its "
                                    "outputs; re-run `st cache`")  # fmt: skip
            data = (self.root / rel).read_bytes()
            from .hashing import sha256_bytes

            if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
                raise ManifestError(f"{self.root / rel} does not match {self.manifest_path}; re-run `st cache`")
            where = str(self.root / rel)
            tensors = unpack_tensors(data, max_bytes=self.checks.embeds_bytes(), where=where)
            self.checks.check_embed_names(tensors, where)
            grouped: dict[str, dict[str, Any]] = {}
            for name, value in tensors.items():
                key, _, field_name = name.partition(".")
                grouped.setdefault(key, {})[field_name] = value
            self._shared = grouped
        return self._shared

    def prompt(self, text: str) -> dict[str, Any]:
        """Embeddings of a shared prompt by its text (the empty prompt, validation prompts, ...)."""
        key = prompt_key(text)
        shared = self.shared_embeds()
        if key not in shared:
            raise KeyError(f"prompt {text!r} is not among the cached shared prompts")
        return shared[key]

    def texts(self, meta: dict[str, Any], captions: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Each caption's stored tensors in caption order: the sample's own, or the shared ones its refs name."""
        texts = []
        for i, ref in enumerate(meta["text"]):
            kind, _, value = ref.partition(":")
            texts.append(captions[i] if kind == "sample" else self.shared_embeds()[value])
        return texts

    def iter_shard(self, shard: dict[str, Any]) -> Iterator[CachedSample]:
        path = self.root / shard["path"]
        for key, members in read_shard(path, expected_sha256=shard["sha256"], expected_bytes=shard["bytes"],
                                       expected_samples=shard["samples"]):  # fmt: skip
            sample = self.checks.decode_sample(path, shard, key, members)
            yield CachedSample(key, sample.meta, sample.latent, self.texts(sample.meta, sample.captions),
                               sample.conditioning)  # fmt: skip

    def __iter__(self) -> Iterator[CachedSample]:
        for shard in self.shards:
            yield from self.iter_shard(shard)


def safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The `__metadata__` of raw safetensors bytes, read from the header alone (`ValueError` when malformed)."""
    return read_header(raw)[1]
