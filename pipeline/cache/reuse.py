"""Entries of the previous output: a sample whose entry key is unchanged is copied, not encoded again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError, ManifestError
from ..log import get_logger
from ..shardformat import read_shard
from .layout import INDEX_NAME

log = get_logger("cache")


class PreviousEntries:
    """Entry bytes of the previous output, read shard by shard when first needed (verified against its manifest)."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any] | None) -> None:
        self.out_dir = out_dir
        self.where: dict[str, str] = {}  # entry key -> the shard holding it
        self.shards: dict[str, dict[str, Any]] = {}
        self._loaded: dict[str, dict[str, dict[str, bytes]]] = {}
        if manifest is None or not (out_dir / INDEX_NAME).is_file():
            return
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(out_dir / INDEX_NAME).to_pylist()
        except Exception:  # a damaged index only costs re-encoding
            return
        self.shards = {s["path"]: s for s in manifest.get("shards", [])}
        self.where = {r["entry_key"]: r["shard"] for r in table if r["shard"] in self.shards}
        self.keys = {r["entry_key"]: r["sample_id"] for r in table}

    def get(self, entry_key: str) -> dict[str, bytes] | None:
        """The entry's members, or None when no previous shard holds it or that shard turned out unreadable."""
        shard = self.where.get(entry_key)
        if shard is None:
            return None
        if shard not in self._loaded:
            meta = self.shards[shard]
            try:
                by_sample = dict(read_shard(self.out_dir / shard, expected_sha256=meta["sha256"],
                                            expected_bytes=meta["bytes"]))  # fmt: skip
            except (ManifestError, InputError) as exc:
                log.warning("not reusing %s: %s", shard, exc)
                by_sample = {}
            self._loaded[shard] = by_sample
        return self._loaded[shard].get(self.keys[entry_key])
