"""The index of a cache's shards: which samples each holds, how often each repeats, where each member's bytes sit.

The shard writer records it (`ShardWriter.index_doc`) in the shard's sidecar, which the cache manifest lists with its
sha256, so a reader learns every sample's place from a few small files and reads no shard before it needs one of its
samples. The index is untrusted like the rest of the folder: its values are bounded when loaded (keys, member names,
spans inside the shard, `repeats` within the option's range, the sample count), and the first time a shard is read on
a machine its tar headers are compared with it and every sample in it is checked with its frames decompressed, with
the sha256 check (`verified.verify_once`). Caches written
without an index (before st recorded one) are indexed here by scanning their shards' headers and JSON members, once
per process.

Memory: per sample, its key and an `IndexedSample` of three slots; spans sit in one flat integer array per member
name and shard.
"""

from __future__ import annotations

import threading
from array import array
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InputError, ManifestError
from ..hashing import sha256_bytes
from ..log import get_logger
from .checks import MAX_REPEATS, CacheChecks, CheckedSample, member_where
from .codec import JSON, MEMBERS, decode_json, malformed
from .tar import INDEX_FORMAT, ShardSample, _open_regular, is_key, read_member, scan_shard
from .verified import verify_once

log = get_logger("train")
ABSENT = -1


def sidecar_path(shard_path: str) -> str:
    """A shard's sidecar (`<shard>.json`), relative to the cache folder like the shard."""
    return shard_path[: -len(".tar")] + ".json"


class IndexedShard:
    """One shard as the index knows it: its manifest entry, its samples' keys and repeats, and its member spans."""

    def __init__(self, root: Path, entry: dict[str, Any], checks: CacheChecks) -> None:
        self.entry, self.checks = entry, checks
        self.path = root / entry["path"]
        self.sidecar = root / sidecar_path(entry["path"])
        self.keys: list[str] = []
        self.repeats = array("l")
        self.spans: dict[str, array] = {}  # suffix -> offset, size of each sample in turn (ABSENT, 0: no member)
        self.digest = "scan"  # what the verification record ties the sha256 check to: the index's sha256
        self._verified = False
        self._lock = threading.Lock()

    @property
    def dataset_id(self) -> str:
        return self.entry["dataset_id"]

    @property
    def bucket(self) -> str:
        return self.entry["bucket"]

    def members(self, row: int) -> dict[str, tuple[int, int]]:
        """Sample `row`'s members: suffix -> (offset, size)."""
        found = {}
        for suffix, spans in self.spans.items():
            if spans[2 * row] != ABSENT:
                found[suffix] = (spans[2 * row], spans[2 * row + 1])
        return found

    # --- loading ---------------------------------------------------------------------------------------------------

    def load(self, recorded: dict[str, Any] | None) -> None:
        """Fill the index from the sidecar (checked against `recorded`, its manifest entry), or, where the sidecar
        holds none, from the shard itself."""
        if not self.load_recorded(recorded):
            self._load_scan()

    def load_recorded(self, recorded: dict[str, Any] | None) -> bool:
        """Fill the index from the sidecar, if it holds one (True); `recorded` None: the sidecar is not re-hashed."""
        doc = self._read_sidecar(recorded)
        if not isinstance(doc, dict) or "index" not in doc:
            return False
        self._load_doc(doc["index"])
        self.digest = sha256_bytes(self.sidecar.read_bytes()) if recorded is None else recorded["sha256"]
        return True

    def _read_sidecar(self, recorded: dict[str, Any] | None) -> Any:
        try:
            data = self.sidecar.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ManifestError(f"{self.sidecar} cannot be read ({exc.strerror}); re-run `st cache`") from None
        if recorded is not None and (len(data) != recorded["bytes"] or sha256_bytes(data) != recorded["sha256"]):
            raise ManifestError(f"{self.sidecar} does not match the cache manifest (recorded sha256 "
                                f"{recorded['sha256'][:12]}.., {recorded['bytes']} bytes); the cache is stale or "
                                "damaged, re-run `st cache`")  # fmt: skip
        return decode_json(data, str(self.sidecar))

    def _bad(self, problem: str) -> InputError:
        return malformed(f"{self.sidecar} (the index of cache shard {self.path})", problem)

    def _load_doc(self, doc: Any) -> None:
        count = self.entry["samples"]
        if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
            raise self._bad(f"its index is not of format {INDEX_FORMAT}")
        keys, repeats, spans = doc.get("keys"), doc.get("repeats"), doc.get("spans")
        if not isinstance(keys, list) or not isinstance(repeats, list) or not isinstance(spans, dict):
            raise self._bad("its index lacks keys, repeats or spans")
        if len(keys) != count or len(repeats) != count:
            raise self._bad(f"its index lists {len(keys)} sample(s), but the cache manifest lists {count}")
        if not all(is_key(k) for k in keys) or len(set(keys)) != count:
            raise self._bad("its index has a sample key that is not unique lowercase hex")
        self._check_repeats(keys, repeats)
        self.spans = {suffix: self._column(keys, suffix, column) for suffix, column in sorted(spans.items())}
        self.keys = keys
        self.repeats = array("l", repeats)

    def _check_repeats(self, keys: list[str], repeats: list[Any]) -> None:
        """`repeats` bounds the epoch plan, made before any sample is read: within the option's range, never below
        the dataset's (oversubscription only raises it)."""
        least = self.checks.repeats.get(self.dataset_id)
        if type(least) is int and all(type(v) is int for v in repeats) and \
                (not repeats or least <= min(repeats) and max(repeats) <= MAX_REPEATS):  # fmt: skip
            return
        key, value = next((k, v) for k, v in zip(keys, repeats)
                          if type(v) is not int or type(least) is not int or not least <= v <= MAX_REPEATS)  # fmt: skip
        raise malformed(member_where(self.path, key, JSON), f"repeats is {value!r}, but the manifest's dataset "
                        f"{self.dataset_id!r} allows {least!r} to {MAX_REPEATS}")  # fmt: skip

    def _column(self, keys: list[str], suffix: Any, column: Any) -> array:
        """A member name st writes, with an (offset, size) pair of integers for each sample. Where the spans point is
        checked against the tar's own headers before the shard's first read (`compare`)."""
        if suffix not in MEMBERS:
            raise malformed(member_where(self.path, keys[0] if keys else "?", str(suffix)), "st writes no such member")
        try:
            spans = array("q", column if isinstance(column, list) else ())
        except (TypeError, OverflowError):
            spans = None
        if spans is None or len(spans) != 2 * len(keys) or (spans and min(spans) < ABSENT):
            raise self._bad(f"its {suffix} spans are not an (offset, size) pair of integers per sample")
        return spans

    def _load_scan(self) -> None:
        """A shard without a recorded index: verify it, then index it from its tar headers and JSON members."""
        self.ensure_verified()
        samples = scan_shard(self.path, expected_sha256=None, expected_bytes=self.entry["bytes"],
                             expected_samples=self.entry["samples"])  # fmt: skip
        suffixes = sorted({suffix for sample in samples for suffix in sample.members})
        repeats = []
        with _open_regular(self.path) as handle:
            for sample in samples:
                checked = self.checks.check_meta(self.path, self.entry, sample.key,
                                                 read_member(handle, sample.members.get(JSON, (0, 0))),
                                                 sample.members.keys())  # fmt: skip
                repeats.append(checked.meta["repeats"])
        self.keys = [sample.key for sample in samples]
        self.repeats = array("l", repeats)
        self.spans = {s: array("q", [v for sample in samples for v in sample.members.get(s, (ABSENT, 0))])
                      for s in suffixes}  # fmt: skip

    # --- reading ---------------------------------------------------------------------------------------------------

    def ensure_verified(self) -> None:
        """Check the shard's sha256 and its tar headers against this index, once per machine (see `verified`)."""
        if self._verified:
            return
        with self._lock:
            if not self._verified:
                verify_once(self.path, self.entry["sha256"], self.digest, self._check)
                self._verified = True

    def _check(self) -> None:
        """The shard's sha256 and tar structure, its index, and every sample's structure with every frame decompressed
        (checksums): done once per machine, while the shard's bytes are read for the hash anyway."""
        scanned = scan_shard(self.path, expected_sha256=self.entry["sha256"], expected_bytes=self.entry["bytes"],
                             expected_samples=self.entry["samples"])  # fmt: skip
        if self.keys:  # an index loaded from the sidecar must describe the shard exactly
            self.compare(scanned)
        with _open_regular(self.path) as handle:
            for sample in scanned:
                members = {suffix: read_member(handle, span) for suffix, span in sample.members.items()}
                self.checks.check_sample(self.path, self.entry, sample.key, members, decompress=True)

    def compare(self, scanned: list[ShardSample]) -> None:
        """Refuse, naming the first member that differs, unless the index describes the `scanned` shard exactly."""
        for row, sample in enumerate(scanned):
            recorded = self.members(row) if row < len(self.keys) and self.keys[row] == sample.key else None
            if recorded == sample.members:
                continue
            if recorded is None:
                raise self._bad(f"sample {row} of the shard is {sample.key}, but the index lists "
                                f"{self.keys[row] if row < len(self.keys) else 'fewer samples'}")  # fmt: skip
            suffix = next(s for s in sorted(set(recorded) | set(sample.members))
                          if recorded.get(s) != sample.members.get(s))  # fmt: skip
            raise malformed(member_where(self.path, sample.key, suffix),
                            f"the shard holds it at {sample.members.get(suffix)} (offset, size), but its index in "
                            f"{self.sidecar.name} records {recorded.get(suffix)}")  # fmt: skip

    def check_meta(self, row: int, data: bytes) -> CheckedSample:
        """Sample `row`'s metadata from its JSON member's bytes, checked (`CacheChecks.check_meta`), its `repeats`
        the index's (the epoch plan was made from those)."""
        key = self.keys[row]
        checked = self.checks.check_meta(self.path, self.entry, key, data, self.members(row).keys())
        if checked.meta["repeats"] != self.repeats[row]:
            raise malformed(member_where(self.path, key, JSON), f"repeats is {checked.meta['repeats']}, but the "
                            f"shard's index in {self.sidecar.name} records {self.repeats[row]}")  # fmt: skip
        return checked

    def read_meta(self, row: int) -> CheckedSample:
        """Sample `row`'s checked metadata, read from the shard (verified first)."""
        with self.open() as handle:
            return self.check_meta(row, self.read_json(handle, row))

    def read_json(self, handle: BinaryIO, row: int) -> bytes:
        """Sample `row`'s JSON member from the open shard (empty when it has none: `check_meta` refuses that)."""
        span = self.members(row).get(JSON)
        return read_member(handle, span) if span is not None else b""

    def open(self) -> BinaryIO:
        """The shard, verified (once per machine), open for reading members."""
        self.ensure_verified()
        return _open_regular(self.path)


class IndexedSample:
    """Where one sample is: its key, its shard, its row in the shard's index."""

    __slots__ = ("key", "row", "shard")

    def __init__(self, key: str, shard: IndexedShard, row: int) -> None:
        self.key, self.shard, self.row = key, shard, row

    @property
    def members(self) -> dict[str, tuple[int, int]]:
        return self.shard.members(self.row)

    @property
    def repeats(self) -> int:
        return self.shard.repeats[self.row]

    @property
    def dataset_id(self) -> str:
        return self.shard.dataset_id

    @property
    def bucket(self) -> str:
        return self.shard.bucket


def load_index(root: Path, manifest: dict[str, Any], checks: CacheChecks) -> list[IndexedShard]:
    """Every shard of a cache output, indexed (from the sidecars; shards of a cache without them are scanned)."""
    recorded = {o["path"]: o for o in manifest.get("outputs", [])}
    shards, scanned = [], 0
    for entry in manifest["shards"]:
        shard = IndexedShard(root, entry, checks)
        shard.load(recorded.get(sidecar_path(entry["path"])))
        scanned += shard.digest == "scan"
        shards.append(shard)
    if scanned:
        log.info("%s: %d shard(s) have no recorded index (a cache written by an older st); they were read to index "
                 "them, and are on every start until the cache is rebuilt (`st cache --force`)", root, scanned)
    return shards

