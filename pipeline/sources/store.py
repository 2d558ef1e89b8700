"""The local download store of remote datasets: content-addressed bytes and one folder view per dataset.

Layout (under the store folder, by default `<prepare output>/.st/downloads/`):
- `blobs/<sha[:2]>/<sha256>`: each downloaded object once, named by the sha256 of its bytes;
- `views/<dataset id>/files/<path>`: the dataset as a folder (hard links to the blobs, copies where links fail), which
  `st prepare` walks like a local dataset and `st cache` reads;
- `views/<dataset id>/objects.json`: for each object, the source's address of its bytes (S3: ETag and size; Hugging
  Face: the dataset fingerprint and row; CSV: the URL), their sha256 and its path in the view. An object whose address is unchanged and whose blob
  is present is not downloaded again; a changed address is fetched again;
- `views/<dataset id>/captions.parquet`: captions from the source's caption column (Hugging Face, CSV).

Downloads are retried (`pipeline.remote.retry`), verified (size, and the MD5 of a single-part S3 ETag), limited in
size, and a download that still fails is reported as a skip with its reason, like a bad image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..fsutil import atomic_path, atomic_write_text
from ..log import get_logger
from ..remote.retry import is_transient, retry_call

log = get_logger("prepare")

MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024  # one image; larger objects are skipped (download_too_large)
BLOBS = "blobs"
VIEWS = "views"
RECORDS_NAME = "objects.json"
CAPTIONS_NAME = "captions.parquet"


class DownloadMismatch(Exception):
    """The bytes received are not those the source announced (size or checksum): worth another try."""


class DownloadTooLarge(Exception):
    pass


@dataclass(frozen=True)
class RemoteObject:
    rel: str  # its path in the dataset's view, '/'-separated
    address: str  # the source's identity of its bytes
    fetch: Callable[[], bytes]
    size: int | None = None  # as the source announces it
    md5: str | None = None  # hex MD5 the bytes must have, when the source states one
    captions: tuple[str, ...] | None = None  # from the source's caption column
    name_by_content: bool = False  # `rel` lacks an extension: the bytes' own is appended (`sniff_extension`)


@dataclass(frozen=True)
class Failure:
    rel: str
    reason: str
    detail: str


@dataclass
class SyncResult:
    root: Path  # the dataset's view folder
    captions: Path | None  # the caption table, when the source has caption columns
    failures: list[Failure] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)


_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"BM", ".bmp"), (b"II*\x00", ".tif"),
          (b"MM\x00*", ".tif"))  # fmt: skip


def sniff_extension(data: bytes) -> str:
    """The file extension of image bytes by their magic number ('.bin' when none matches: never listed)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), ".bin")


def safe_rel(rel: str) -> bool:
    """A path that stays inside the view: no absolute path, no '..', no empty or '.' part."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts) and "\\" not in rel


def _verified(obj: RemoteObject) -> bytes:
    data = obj.fetch()
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise DownloadTooLarge(f"{len(data)} bytes, over the {MAX_DOWNLOAD_BYTES} byte limit for one image")
    if obj.size is not None and len(data) != obj.size:
        raise DownloadMismatch(f"received {len(data)} bytes, the source lists {obj.size}")
    if obj.md5 is not None and hashlib.md5(data).hexdigest() != obj.md5:
        # Encrypted (SSE-KMS) objects have ETags that are no MD5: two identical downloads are accepted.
        if obj.fetch() != data:
            raise DownloadMismatch(f"the MD5 of the bytes received is not the ETag {obj.md5}")
    return data


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, DownloadMismatch) or is_transient(exc)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DownloadMismatch):
        return "download_corrupt"
    if isinstance(exc, DownloadTooLarge):
        return "download_too_large"
    return "download_failed"


class DownloadStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def blob(self, sha: str) -> Path:
        return self.folder / BLOBS / sha[:2] / sha

    def view(self, dataset_id: str) -> Path:
        return self.folder / VIEWS / dataset_id

    def _records(self, dataset_id: str) -> dict[str, list[str]]:
        try:
            data = json.loads((self.view(dataset_id) / RECORDS_NAME).read_text())
        except (OSError, ValueError):  # a lost record only costs downloads
            return {}
        return data if isinstance(data, dict) else {}

    def _put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob(sha)
        if not path.is_file() or path.stat().st_size != len(data):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        return sha

    def _link(self, sha: str, target: Path) -> None:
        """Make `target` the blob's bytes (a hard link, else a copy); left alone when it already is."""
        blob = self.blob(sha)
        try:
            if os.path.samefile(blob, target):
                return
        except OSError:
            pass
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".link-tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(blob, tmp)
        except OSError:
            shutil.copyfile(blob, tmp)
        os.replace(tmp, target)

    def sync(self, dataset_id: str, objects: list[RemoteObject], failures: list[Failure], workers: int = 8,
             what: str = "download") -> SyncResult:  # fmt: skip
        """Bring the dataset's view up to date with `objects` (downloading only new or changed ones); `failures` are
        objects the listing could not offer. Paths no longer listed leave the view."""
        view = self.view(dataset_id)
        files = view / "files"
        records = self._records(dataset_id)
        failures = list(failures)
        kept: dict[str, list[str]] = {}
        todo: list[RemoteObject] = []
        for obj in objects:
            if not safe_rel(obj.rel):
                failures.append(Failure(obj.rel, "unsafe_name", "the name would leave the dataset folder"))
                continue
            known = records.get(obj.rel)
            if known and len(known) == 3 and known[0] == obj.address and self.blob(known[1]).is_file():
                self._link(known[1], files / known[2])
                kept[obj.rel] = known
            else:
                todo.append(obj)
        downloaded = 0
        total_bytes = 0
        if todo:
            log.info("dataset '%s': downloading %d object(s) (%d unchanged)", dataset_id, len(todo), len(kept))

            def one(obj: RemoteObject) -> tuple[RemoteObject, bytes | None, Failure | None]:
                try:
                    data = retry_call(lambda: _verified(obj), what=f"{what} {obj.rel}", transient=_transient,
                                      quiet=True)  # fmt: skip
                except Exception as exc:  # every failure of one object is that object's skip reason
                    return obj, None, Failure(obj.rel, _reason(exc), f"{type(exc).__name__}: {exc}"[:500])
                return obj, data, None

            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for obj, data, failure in pool.map(one, todo):
                    if failure is not None:
                        failures.append(failure)
                        continue
                    sha = self._put(data)
                    name = obj.rel + sniff_extension(data[:16]) if obj.name_by_content else obj.rel
                    self._link(sha, files / name)
                    kept[obj.rel] = [obj.address, sha, name]
                    downloaded += 1
                    total_bytes += len(data)
        self._prune_view(files, {k[2] for k in kept.values()})
        view.mkdir(parents=True, exist_ok=True)
        atomic_write_text(view / RECORDS_NAME, json.dumps(kept, sort_keys=True) + "\n")
        captions = self._write_captions(view, {kept[o.rel][2]: o.captions for o in objects if o.rel in kept})
        self._collect_garbage()
        stats = {"objects": len(objects), "downloaded": downloaded, "reused": len(kept) - downloaded,
                 "failed": len(failures), "downloaded_bytes": total_bytes}  # fmt: skip
        for failure in failures:
            log.debug("dataset '%s': %s skipped (%s: %s)", dataset_id, failure.rel, failure.reason, failure.detail)
        return SyncResult(files, captions, failures, stats)

    @staticmethod
    def _prune_view(files: Path, keep: set[str]) -> None:
        """Remove what an earlier sync linked and the source no longer lists (the view is the store's own)."""
        if not files.is_dir():
            return
        for root, _dirs, names in os.walk(files, topdown=False):
            here = Path(root)
            for name in names:
                path = here / name
                if path.relative_to(files).as_posix() not in keep:
                    path.unlink()
            if here != files and not any(here.iterdir()):
                here.rmdir()

    @staticmethod
    def _write_captions(view: Path, captions: dict[str, tuple[str, ...] | None]) -> Path | None:
        path = view / CAPTIONS_NAME
        if not captions or all(c is None for c in captions.values()):
            path.unlink(missing_ok=True)
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = sorted(captions)
        table = pa.table({"filename": names, "caption": [list(captions[n] or ()) for n in names]},
                         schema=pa.schema([("filename", pa.string()), ("caption", pa.list_(pa.string()))]))
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def _collect_garbage(self) -> None:
        """Drop blobs no view links to any more (a hard link count of 1). Copies (no links) are never collected."""
        blobs = self.folder / BLOBS
        if not blobs.is_dir():
            return
        for folder in blobs.iterdir():
            for blob in folder.iterdir():
                if blob.stat().st_nlink == 1 and self._linked_somewhere():
                    blob.unlink()

    def _linked_somewhere(self) -> bool:
        """Whether views are hard links (so that a link count of 1 means unused)."""
        if not hasattr(self, "_links_work"):
            probe = self.folder / ".link-probe"
            try:
                probe.touch()
                os.link(probe, probe.with_suffix(".2"))
                probe.with_suffix(".2").unlink()
                self._links_work = True
            except OSError:
                self._links_work = False
            finally:
                probe.unlink(missing_ok=True)
        return self._links_work
