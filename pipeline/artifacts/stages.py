"""What the commands call to let a stage read from and write to `s3://bucket/prefix` with its local code path.

- Input: the stage's manifest and the files the stage reads are copied into this machine's mirror of the prefix
  (`mirror.mirror`, under $ST_STATE_DIR/mirrors); `st train` instead reads the index and streams shards (its
  `shard_cache`).
- Output: the stage writes into this machine's staging folder of the prefix ($ST_STATE_DIR/staging/<id>), exactly as
  into a local --output; then every file is uploaded under its final key and the manifest LAST, the commit point
  (readers only trust a prefix whose manifest exists). Before anything changes, the prefix's previous manifest is
  deleted when it differs from the new one; objects already there with the same size and sha256 are skipped, so a
  re-run after an interrupted upload sends only what is missing. The remote lock and ownership record
  (`claim.RemoteClaim`) are held from before the stage runs until the upload ends. When the prefix holds a complete
  output that the staging folder lacks (another machine wrote it), it is downloaded first, so that the stage's
  up-to-date check compares with what the bucket holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..distributed import rank_and_world
from ..hashing import sha256_file
from ..log import get_logger
from ..manifest import MANIFEST_NAME
from ..remote.base import local_files
from .checkpoints import remote_checkpoints
from .claim import RemoteClaim
from .location import parse_location
from .mirror import mirror, mirror_objects, state_folder
from .store import ArtifactStore, store_for

log = get_logger("artifacts")


def input_folder(value: str | Path, stage: str) -> Path:
    """The local folder of a stage input: the path itself, or this machine's mirror of an s3:// prefix holding a
    `stage` output."""
    where = parse_location(value, "--input")
    if isinstance(where, Path):
        return where
    folder = state_folder("mirrors", where)
    mirror(where, folder, stage)
    return folder


def part_folders(values: list[str], commit: str) -> list[Path]:
    """The local folders of `st cache --part` outputs: the paths themselves, or this machine's mirrors of s3://
    prefixes holding a finished part (its `commit` file)."""
    found = []
    for value in values:
        where = parse_location(value, "st cache merge")
        found.append(where if isinstance(where, Path) else mirror_objects(where, state_folder("mirrors", where), commit))
    return found


@contextlib.contextmanager
def output_folder(value: str | Path, stage: str, commit: str = MANIFEST_NAME) -> Iterator[Path]:
    """The local folder a stage writes: the path itself, or the staging folder of an s3:// prefix, uploaded (the
    `commit` file last: the manifest, or a cache part's part.json) when the stage returns."""
    where = parse_location(value, "--output")
    if isinstance(where, Path):
        yield where
        return
    staging = state_folder("staging", where)
    if rank_and_world()[0] != 0:  # the main process uploads, after every process finished
        with remote_checkpoints(where, staging, None):
            yield staging
        return
    store = store_for(where)
    with RemoteClaim(store, stage) as claim:
        if commit == MANIFEST_NAME:
            _catch_up(store, staging, stage)
        with remote_checkpoints(where, staging, claim):  # uploaded as they are written
            yield staging
        upload_output(store, claim, staging, commit)


def _catch_up(store: ArtifactStore, staging: Path, stage: str) -> None:
    """Download the prefix's complete output into the staging folder when the folder does not hold it already."""
    found = store.head(MANIFEST_NAME)
    local = staging / MANIFEST_NAME
    if found is None or (local.is_file() and (local.stat().st_size, sha256_file(local)) == found):
        return
    log.info("%s holds a %s output this machine has not staged; downloading it to compare", store.where.url, stage)
    mirror(store.where, staging, stage, prune=False)


def upload_output(store: ArtifactStore, claim: RemoteClaim, staging: Path, commit: str = MANIFEST_NAME) -> None:
    """Upload every file of the staging folder under the prefix, the `commit` file last; then delete the objects st
    wrote there before that the output no longer has."""
    rels = [f.rel for f in local_files(staging)]
    has_commit = commit in rels
    claim.record(claim.owned | set(rels))  # before writing: a killed upload's objects are known to be st's
    previous = store.head(commit)
    if previous is not None and (not has_commit or previous != ((staging / commit).stat().st_size,
                                                                  sha256_file(staging / commit))):  # fmt: skip
        store.delete(commit)  # readers stop trusting the prefix until the new commit file is in
    record = store.upload_files(staging, [r for r in rels if r != commit])
    uploaded = record["uploaded"]
    if has_commit:
        uploaded += store.upload_files(staging, [commit])["uploaded"]
    stale = sorted(claim.owned - set(rels))
    for rel in stale:
        store.delete(rel)
    claim.record(set(rels))
    log.info("%s: %d file(s) uploaded, %d already there%s%s", store.where.url, uploaded, len(rels) - uploaded,
             f", {len(stale)} no longer part of the output removed" if stale else "",
             "" if has_commit else f" (no {commit}: the stage did not finish)")  # fmt: skip
