"""Resuming an `st train` whose --output is on S3 on a machine that has not run it: when `resume_from_checkpoint`
names a checkpoint ("latest", or a checkpoint's name) that the bucket holds and this machine's staging folder lacks
(or holds only older ones of), that one checkpoint is downloaded, each file checked against the size and sha256 its
manifest records, before the run chooses where to resume. Checkpoints reach the bucket as they are written
(`pipeline.artifacts.checkpoints`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..artifacts.checkpoints import CHECKPOINTS, in_bucket, remote_of
from ..artifacts.store import ArtifactStore, store_for
from ..distributed import rank_and_world
from ..errors import InputError
from ..log import get_logger
from ..manifest import MANIFEST_NAME
from .checkpoint import list_checkpoints

if TYPE_CHECKING:
    from ..ownership import OutputClaim

log = get_logger("train")

FETCH_WAIT_SECONDS = 3600  # how long the other processes of a machine wait for its main process to fetch one


def _wanted(value: str, store: ArtifactStore, folder: Path) -> str | None:
    """The checkpoint of the bucket that `resume_from_checkpoint = value` resumes from and this machine lacks."""
    local = list_checkpoints(folder)
    remote = in_bucket(store)
    if value == "latest":
        if not remote:
            return None
        name = max(remote, key=lambda n: remote[n])
        return name if not local or max(local)[0] < remote[name] else None
    name = Path(value).name
    if Path(value).is_absolute() or name not in remote or (folder / name).is_dir():
        return None
    return name


def fetch_checkpoint(claim: OutputClaim, out_dir: Path, value: str | None) -> Path | None:
    """Download the one checkpoint `resume_from_checkpoint` resumes from when `out_dir` is the staging folder of an
    S3 output and only the bucket holds it (the run was started on another machine). Returns its folder, or None."""
    where = remote_of(out_dir)
    if where is None or not value or value.lower() == "none":
        return None
    store, folder = store_for(where), Path(out_dir) / CHECKPOINTS
    name = _wanted(value, store, folder)
    if name is None:
        return None
    target = folder / name
    if int(os.environ.get("LOCAL_RANK", rank_and_world()[0])) != 0:
        return _wait_for(target)
    claim.will_write(folders=(target,))
    tmp = folder / f"{name}.tmp"
    claim.remove(tmp)  # what a fetch that was killed left
    claim.remove(target)  # an incomplete copy (without its manifest)
    data = store.get_bytes(f"{CHECKPOINTS}/{name}/{MANIFEST_NAME}")
    files = json.loads(data or b"{}").get("files", [])
    log.info("%s: fetching %s (%d files) to resume from it", where.url, name, len(files))
    for entry in files:
        store.download(f"{CHECKPOINTS}/{name}/{entry['path']}", tmp / entry["path"], size=entry["bytes"],
                       sha256=entry["sha256"], what="checkpoint file")  # fmt: skip
    (tmp / MANIFEST_NAME).write_bytes(data or b"")
    os.replace(tmp, target)
    return target


def _wait_for(target: Path) -> Path:
    deadline = time.monotonic() + FETCH_WAIT_SECONDS
    while not (target / MANIFEST_NAME).is_file():
        if time.monotonic() > deadline:
            raise InputError(f"{target} did not arrive from the bucket within {FETCH_WAIT_SECONDS} s (the main "
                             "process fetches it); see its log")  # fmt: skip
        time.sleep(1)
    return target
