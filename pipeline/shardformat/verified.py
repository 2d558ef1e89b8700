"""Once per machine: a shard's sha256 is checked by one process, the first time any process reads it, and the result
is remembered in a small record keyed by (real path, size, mtime_ns, expected sha256, index digest).

Records are this machine's state, like the stage runner's stat records, so they live beside them (`$ST_STATE_DIR/
shards`, default `~/.cache/st/state/shards`), not in the cache folder: training writes nothing into a folder another
stage owns, the folder may be read-only or shared by machines, and a check made on one machine says nothing about
another machine's copy. One record per shard, written atomically after the check passed; a flock on `<record>.lock`
makes concurrent processes (the ranks of a run, or two runs) wait for the one that checks instead of all hashing.

What a record cannot see: a file rewritten after the check with its size kept and its mtime forged back. Training
still decodes every member it uses within checked bounds and checksums (zstd frames carry one), so such damage stops
the run by name when a damaged tensor member is read; damage confined to a JSON member that still passes the sample
checks is found by `st verify`, which always re-hashes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Callable

from ..fsutil import atomic_write_text
from ..hashing import sha256_bytes
from ..log import get_logger

log = get_logger("train")


def records_dir() -> Path:
    from ..runner import state_dir

    return state_dir() / "shards"


def _wanted(path: Path, sha256: str, index: str) -> dict | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256, "index": index}


def _read(record: Path) -> dict | None:
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An exclusive flock on `lock_path` (blocking), or nothing where the state folder cannot be written."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        log.debug("no verification lock %s (%s): this process checks on its own", lock_path, exc)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def verify_once(path: Path, sha256: str, index: str, check: Callable[[], None]) -> bool:
    """Run `check` (which raises on damage) unless this machine's record says that the file at `path`, as it is now,
    already passed it; True when it ran. `index` is the digest of the shard index the check compared with."""
    path = Path(path).resolve()
    record = records_dir() / f"{sha256_bytes(str(path).encode())[:32]}.json"
    wanted = _wanted(path, sha256, index)
    if wanted is not None and _read(record) == wanted:
        return False
    with _locked(record.with_suffix(".lock")):
        wanted = _wanted(path, sha256, index)
        if wanted is not None and _read(record) == wanted:  # another process checked it while this one waited
            return False
        check()
        try:
            atomic_write_text(record, json.dumps(wanted, sort_keys=True) + "\n")
        except OSError as exc:  # the record only saves work: without it the next run checks again
            log.debug("could not record the check of %s: %s", path, exc)
    log.debug("verified cache shard %s (sha256 %s..)", path, sha256[:12])
    return True
