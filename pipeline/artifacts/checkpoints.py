"""Checkpoints of an `st train` whose --output is on S3, so that a machine that dies mid-run loses at most the steps
since its last checkpoint, and a run started on another machine resumes from the bucket (fetching the checkpoint:
`pipeline.train.remote_resume`).

- Upload: each checkpoint is uploaded as soon as it is written (by one background thread, so that training goes on
  meanwhile): its files first, its manifest.json last, so a checkpoint in the bucket is complete when its manifest is
  there. The ownership record lists the files before they are written, as for the output's other objects.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..log import get_logger
from ..manifest import MANIFEST_NAME
from .location import S3Prefix
from .store import ArtifactStore, store_for

if TYPE_CHECKING:
    from .claim import RemoteClaim

log = get_logger("artifacts")

CHECKPOINTS = "checkpoints"
_REMOTE_CHECKPOINT = re.compile(rf"^{CHECKPOINTS}/((?:checkpoint|rolling)-(\d+))/{re.escape(MANIFEST_NAME)}$")
_REMOTE: dict[Path, S3Prefix] = {}  # staging folder -> the prefix it is uploaded to (every process of the run)
_UPLOADERS: dict[Path, CheckpointUploader] = {}  # staging folder -> its uploader (the main process only)


class CheckpointUploader:
    """Uploads the checkpoints written under one staging folder, one after the other, in a background thread."""

    def __init__(self, store: ArtifactStore, claim: RemoteClaim, staging: Path) -> None:
        self.store, self.claim, self.staging = store, claim, staging
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="st-checkpoint-upload")
        self._pending: list[Future] = []

    def written(self, checkpoint: Path) -> None:
        self._pending.append(self._executor.submit(self._upload, checkpoint))

    def _upload(self, checkpoint: Path) -> None:
        rels = sorted(p.relative_to(self.staging).as_posix() for p in checkpoint.rglob("*") if p.is_file())
        commit = f"{checkpoint.relative_to(self.staging).as_posix()}/{MANIFEST_NAME}"
        try:
            self.claim.record(self.claim.owned | set(rels))  # before writing, as for every object st puts there
            self.store.upload_files(self.staging, [rel for rel in rels if rel != commit])
            self.store.upload_files(self.staging, [commit])  # last: the checkpoint is complete in the bucket
        except (OSError, InputError):
            if checkpoint.is_dir():
                raise
            log.info("%s was removed (checkpoints_total_limit) before its upload ended; not uploaded", checkpoint.name)
            return
        log.info("%s: %s uploaded", self.store.where.url, checkpoint.name)

    def finish(self) -> None:
        """Wait for every upload; the first that failed raises."""
        self._executor.shutdown(wait=True)
        for future in self._pending:
            future.result()


def checkpoint_written(checkpoint: Path) -> None:
    """Called by `st train` with each checkpoint folder once it is complete: uploaded when its output is on S3."""
    parents = checkpoint.resolve().parents
    for folder, uploader in list(_UPLOADERS.items()):
        if folder in parents:
            uploader.written(checkpoint)


def remote_of(out_dir: Path) -> S3Prefix | None:
    """The prefix whose staging folder `out_dir` is, while a stage writes it (None for a local output)."""
    return _REMOTE.get(Path(out_dir).resolve())


@contextlib.contextmanager
def remote_checkpoints(where: S3Prefix, staging: Path, claim: RemoteClaim | None) -> Iterator[None]:
    """While a stage writes `staging` for `where`: fetching checkpoints from the bucket is possible, and (with the
    `claim`, on the main process) each checkpoint written is uploaded; the uploads are awaited at the end."""
    folder = staging.resolve()
    _REMOTE[folder] = where
    uploader = None if claim is None else CheckpointUploader(store_for(where), claim, staging)
    if uploader is not None:
        _UPLOADERS[folder] = uploader
    try:
        yield
    finally:
        _REMOTE.pop(folder, None)
        if uploader is not None:
            _UPLOADERS.pop(folder, None)
            uploader.finish()


def in_bucket(store: ArtifactStore) -> dict[str, int]:
    """The complete checkpoints under the prefix (those whose manifest is there): name -> step."""
    found = {}
    for rel in store.listing():
        match = _REMOTE_CHECKPOINT.match(rel)
        if match:
            found[match.group(1)] = int(match.group(2))
    return found
