"""A local copy of a stage output on S3, for the stage that reads it: the manifest and the files the reader needs.

The manifest is the commit point of an S3 output (it is uploaded last), so a prefix without one is refused. Each
listed file is downloaded under a temporary name and renamed once its size and sha256 match the manifest; files
already in the copy with the right size and sha256 are kept, and files the manifest no longer lists are removed (the
copy is this machine's state, under $ST_STATE_DIR, never a folder the user gave).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fsutil import atomic_write_bytes
from ..hashing import sha256_file
from ..log import get_logger
from ..manifest import MANIFEST_NAME, read_manifest
from .location import S3Prefix
from .store import ArtifactStore, store_for

log = get_logger("artifacts")


def state_folder(kind: str, where: S3Prefix) -> Path:
    """This machine's folder of `kind` (mirrors, staging, shard-cache) for the prefix."""
    from ..runner import state_dir

    return state_dir() / kind / where.local_name()


def remote_manifest(store: ArtifactStore, stage: str) -> tuple[bytes, dict[str, Any]]:
    """The prefix's manifest (bytes and document); refused when there is none."""
    data = store.get_bytes(MANIFEST_NAME)
    if data is None:
        raise InputError(f"{store.where.url} holds no {MANIFEST_NAME}, so no complete {stage} output is there (an "
                         f"upload that stopped midway leaves none); run `st {stage} --output {store.where.url}` to "
                         "finish it")  # fmt: skip
    try:
        return data, json.loads(data)
    except ValueError:
        raise InputError(f"{store.url(MANIFEST_NAME)} is not JSON; re-run `st {stage}` into it") from None


def _intact(path: Path, entry: dict[str, Any]) -> bool:
    try:
        return path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]
    except OSError:
        return False


def mirror(where: S3Prefix, folder: Path, stage: str, *,
           skip: Callable[[dict[str, Any]], set[str]] = lambda doc: set(), prune: bool = True) -> Path:  # fmt: skip
    """Copy the `stage` output at `where` into `folder`: its manifest and each listed output but those `skip(manifest)`
    names (fetched later by the reader); with `prune`, files the manifest does not list are removed. Returns the local
    manifest path."""
    store = store_for(where)
    data, doc = remote_manifest(store, stage)
    folder.mkdir(parents=True, exist_ok=True)
    entries = {e["path"]: e for e in doc.get("outputs", []) if isinstance(e, dict) and "path" in e}
    skipped, fetched = skip(doc), 0
    for rel, entry in sorted(entries.items()):
        if rel in skipped or _intact(folder / rel, entry):
            continue
        store.download(rel, folder / rel, size=entry["bytes"], sha256=entry["sha256"], what=f"{stage} output")
        fetched += 1
    for root, _, names in os.walk(folder) if prune else ():
        for name in names:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel != MANIFEST_NAME and rel not in entries:
                (Path(root) / name).unlink()
    atomic_write_bytes(folder / MANIFEST_NAME, data)  # last: the copy is complete when its manifest is there
    read_manifest(folder / MANIFEST_NAME, stage=stage)  # its schema and digest
    log.info("%s: %d file(s) downloaded to %s (%d already there)", where.url, fetched, folder,
             len(entries) - len(skipped) - fetched)  # fmt: skip
    return folder / MANIFEST_NAME


def mirror_objects(where: S3Prefix, folder: Path, commit: str) -> Path:
    """Copy every object under `where` into `folder`, for an output whose commit file (`commit`) lists no hashes (a
    cache part): each object is checked against the size and sha256 its metadata records, the commit file comes
    last, and a prefix without one is refused. Returns `folder`."""
    from ..ownership import is_bookkeeping

    store = store_for(where)
    listing = store.listing()
    if commit not in listing:
        raise InputError(f"{where.url} holds no {commit}, so no finished output is there (an upload that stopped "
                         "midway leaves none); run it again with the same --output")  # fmt: skip
    for rel in sorted(listing, key=lambda rel: rel == commit):
        if is_bookkeeping(rel):
            continue
        size, sha256 = store.head(rel) or (listing[rel], None)
        if sha256 is None:
            raise InputError(f"{store.url(rel)} has no sha256 in its metadata, so st did not upload it; run the "
                             "part again into an empty prefix")  # fmt: skip
        if not _intact(folder / rel, {"bytes": size, "sha256": sha256}):
            store.download(rel, folder / rel, size=size, sha256=sha256)
    return folder
