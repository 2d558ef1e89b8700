"""Training from a cache on S3 (`st train --input s3://bucket/prefix`): shards are fetched into a local folder of
bounded size as the data plan reaches them, never all up front.

`open_remote_cache` copies the cache's manifest, shard index sidecars and shared embeddings (small files) into this
machine's shard cache folder (`--shard-cache`, default `$ST_STATE_DIR/shard-cache`; one subfolder per cache prefix,
and per process when several train together) and attaches a `ShardCache` to it; training then reads that folder as a
local cache whose shards appear when needed. The loader tells the cache which shards each coming batch reads
(`follow`, then `reading` at each batch): a thread downloads ahead in that order while the shards fit under
`--shard-cache-limit`, and room is made by evicting the shards whose next use is furthest away (or that the plan no
longer reads), never one the current batch reads. A download lands under a temporary name and is renamed once its
size and sha256 match the manifest; a shard object that does not match is refused by name (exit 2). The first read of
each fetched shard still runs the once-per-machine structural check (`shardformat.verified`). The plan is a pure
function of (seed, epoch, cache digest), so what is fetched never changes what is trained: exact resume holds.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..artifacts.location import S3Prefix, parse_location
from ..artifacts.mirror import mirror, state_folder
from ..artifacts.store import ArtifactStore, store_for
from ..errors import ConfigError, InputError
from ..log import get_logger
from ..manifest import read_manifest
from ..shardformat import CacheChecks
from ..shardformat.index import IndexedShard, sidecar_path

log = get_logger("train")

GB = 1024**3
LOOKAHEAD_BATCHES = 256  # how far ahead of the current batch the plan is read for prefetching and eviction
_ATTACHED: dict[Path, ShardCache] = {}


class ShardCache:
    """The shards of one remote cache in a local folder: fetched on demand and ahead of the plan, within `limit`."""

    def __init__(self, store: ArtifactStore, root: Path, shards: list[dict[str, Any]], limit: int | None) -> None:
        self.store, self.root, self.limit = store, root, limit
        self.entries = {s["path"]: s for s in shards}
        self.present: dict[str, int] = {}
        for rel, entry in self.entries.items():
            path = root / rel
            if path.is_file() and path.stat().st_size == entry["bytes"]:  # its hash: checked on first read
                self.present[rel] = entry["bytes"]
        self.inflight: dict[str, int] = {}
        self.failed: dict[str, BaseException] = {}
        self.pinned: tuple[str, ...] = ()
        self.window: list[tuple[str, ...]] = []  # the coming batches' shards, the current one first
        self._upcoming: Iterator[tuple[str, ...]] = iter(())
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.fetched = self.fetched_bytes = 0
        self.peak = self._used()
        while limit is not None and self._used() > limit and self._evict_one(()):
            pass  # a smaller limit than the last run's

    # --- the loader's side -----------------------------------------------------------------------------------------

    def follow(self, upcoming: Iterable[tuple[str, ...]]) -> None:
        """Read batches in this order from now on (each item: the shards one batch reads); prefetch along it."""
        with self._cond:
            self._stop = False
            self._upcoming = iter(upcoming)
            self.window = []
            self._extend()
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._prefetch, name="st-shard-fetch", daemon=True)
            self._thread.start()

    def reading(self) -> None:
        """The loader starts the next batch of the followed order: its shards are pinned and fetched."""
        with self._cond:
            self._extend()
            self.pinned = self.window.pop(0) if self.window else ()
            self._extend()
            self._cond.notify_all()
        for rel in self.pinned:
            self.ensure(rel)

    def ensure(self, rel: str) -> None:
        """Block until the shard is in the folder (fetching it now if the prefetcher has not)."""
        with self._cond:
            while True:
                if rel in self.inflight:
                    self._cond.wait()
                    continue
                if rel in self.present:
                    return
                if rel in self.failed:
                    raise self.failed.pop(rel)
                size = self.entries[rel]["bytes"]
                if self.limit is None or self._used() + size <= self.limit:
                    break
                keep = set(self.pinned) | {rel}
                if self._evict_one(keep):
                    continue
                if self.inflight:  # prefetches hold the room: wait for them, then evict what they brought
                    self._cond.wait()
                    continue
                needed = sum(self.entries[r]["bytes"] for r in keep)
                raise ConfigError(f"--shard-cache-limit {self.limit / GB:g} GB is smaller than the shards one "
                                  f"batch reads ({needed / 1e6:.1f} MB: {', '.join(sorted(keep))}); raise it")
            self.inflight[rel] = size
            self.peak = max(self.peak, self._used())
        self._fetch(rel)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.fetched:
            log.info("shard cache %s: %d shard(s) fetched (%.1f MB), at most %.1f MB held%s", self.root, self.fetched,
                     self.fetched_bytes / 1e6, self.peak / 1e6,
                     f" (limit {self.limit / 1e6:.1f} MB)" if self.limit is not None else "")  # fmt: skip

    # --- internals (called with the condition held unless said otherwise) ------------------------------------------

    def _used(self) -> int:
        return sum(self.present.values()) + sum(self.inflight.values())

    def _extend(self) -> None:
        while len(self.window) < LOOKAHEAD_BATCHES:
            batch = next(self._upcoming, None)
            if batch is None:
                return
            self.window.append(batch)

    def _next_use(self, rel: str) -> int:
        return next((i for i, batch in enumerate(self.window) if rel in batch), len(self.window))

    def _evict_one(self, keep: Iterable[str], before: int | None = None) -> bool:
        """Delete the present shard used furthest ahead (or never), except `keep` and, with `before`, any used
        before that window position; False when there is none."""
        keep = set(keep) | set(self.pinned)
        candidates = [(self._next_use(r), r) for r in self.present if r not in keep]
        if before is not None:
            candidates = [(use, r) for use, r in candidates if use > before]
        if not candidates:
            return False
        _, rel = max(candidates)
        (self.root / rel).unlink(missing_ok=True)
        del self.present[rel]
        log.debug("shard cache: evicted %s", rel)
        return True

    def _fetch(self, rel: str) -> None:
        """Download one shard (without the condition held); the result is published under it."""
        entry = self.entries[rel]
        error: BaseException | None = None
        try:
            self.store.download(rel, self.root / rel, size=entry["bytes"], sha256=entry["sha256"], what="cache shard")
        except BaseException as exc:  # noqa: BLE001 - handed to whoever needs the shard
            error = exc
        with self._cond:
            del self.inflight[rel]
            if error is None:
                self.present[rel] = entry["bytes"]
                self.fetched += 1
                self.fetched_bytes += entry["bytes"]
                self.peak = max(self.peak, self._used())
            self._cond.notify_all()
        if error is not None:
            raise error

    def _prefetch(self) -> None:
        """The prefetch thread: fetch the window's shards in order while they fit, evicting only shards used later."""
        while True:
            with self._cond:
                if self._stop:
                    return
                target = self._next_target()
                if target is None:
                    self._cond.wait(timeout=1.0)
                    continue
                self.inflight[target] = self.entries[target]["bytes"]
                self.peak = max(self.peak, self._used())
            try:
                self._fetch(target)
            except BaseException as exc:  # noqa: BLE001 - raised again when the loader needs this shard
                with self._cond:
                    self.failed[target] = exc
                    self._cond.notify_all()

    def _next_target(self) -> str | None:
        """The first shard of the window not yet here, if room can be made for it without evicting anything the
        plan reads before it."""
        for position, batch in enumerate(self.window):
            for rel in batch:
                if rel in self.present or rel in self.inflight or rel in self.failed:
                    continue
                size = self.entries[rel]["bytes"]
                needed_before = {r for b in self.window[: position + 1] for r in b}
                while self.limit is not None and self._used() + size > self.limit:
                    if not self._evict_one(needed_before, before=position):
                        return None
                return rel
        return None


class FetchedShard(IndexedShard):
    """An indexed shard of a remote cache: its file is fetched (`ShardCache.ensure`) before it is verified or read."""

    def __init__(self, root: Path, entry: dict[str, Any], checks: CacheChecks, cache: ShardCache) -> None:
        super().__init__(root, entry, checks)
        self.cache = cache

    def ensure_verified(self) -> None:
        # A shard evicted and fetched again is not checked again in this process: the download matched the same
        # sha256, so its bytes are the ones already checked.
        self.cache.ensure(self.entry["path"])
        super().ensure_verified()


def load_fetched_index(root: Path, manifest: dict[str, Any], checks: CacheChecks,
                       cache: ShardCache) -> list[IndexedShard]:  # fmt: skip
    """Every shard of a remote cache, indexed from its sidecar (no shard is read)."""
    recorded = {o["path"]: o for o in manifest.get("outputs", [])}
    shards: list[IndexedShard] = []
    for entry in manifest["shards"]:
        shard = FetchedShard(root, entry, checks, cache)
        if not shard.load_recorded(recorded.get(sidecar_path(entry["path"]))):
            raise InputError(f"cache shard {cache.store.url(entry['path'])} has no recorded index (a cache written by "
                             "an older st); training from S3 reads the index, not the shards: re-run `st cache` "
                             "into the prefix")  # fmt: skip
        shards.append(shard)
    return shards


def attached(root: Path) -> ShardCache | None:
    """The shard cache serving the cache folder `root`, if it is the local side of a remote cache."""
    return _ATTACHED.get(Path(root).resolve())


def open_remote_cache(where: S3Prefix, folder: Path | None, limit_gb: float | None) -> Path:
    """Mirror the small files of the cache at `where` into this machine's shard cache folder and attach a
    ShardCache to it; returns the folder, which training reads as a local cache."""
    from ..distributed import rank_and_world

    if limit_gb is not None and limit_gb <= 0:
        raise ConfigError(f"--shard-cache-limit must be a positive number of GB, not {limit_gb}")
    rank, world = rank_and_world()
    root = (Path(folder) / where.local_name() if folder is not None else state_folder("shard-cache", where))
    root = root / f"rank-{rank}" if world > 1 else root
    manifest_path = mirror(where, root, "cache", skip=lambda doc: {s["path"] for s in doc.get("shards", [])})
    manifest = read_manifest(manifest_path, stage="cache")
    limit = None if limit_gb is None else int(limit_gb * GB)
    cache = ShardCache(store_for(where), root, manifest["shards"], limit)
    _ATTACHED[root.resolve()] = cache
    return root


def train_input(value: str | Path, shard_cache: Path | None, limit_gb: float | None) -> Path:
    """The local cache folder `st train` reads: the path itself, or the shard cache of an s3:// cache prefix."""
    where = parse_location(value, "--input")
    if isinstance(where, Path):
        if shard_cache is not None or limit_gb is not None:
            raise ConfigError("--shard-cache and --shard-cache-limit apply to a cache on S3 (--input s3://bucket/"
                              "prefix); a local cache is read in place: drop them")  # fmt: skip
        return where
    return open_remote_cache(where, shard_cache, limit_gb)
