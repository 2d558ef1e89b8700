"""Shard files: deterministic, uncompressed USTAR tars in webdataset layout (`<key>.<suffix>` members, a sample's
members together, in sorted suffix order), written once and read by offset.

The writer records where every member's bytes start and how long they are (`ShardWriter.index_doc`, kept in the
shard's sidecar), so training reads an index instead of the shards. Shard bytes are untrusted (a whole cache folder,
manifest included, can be crafted so that every hash matches), so a scan checks the tar's structure (member names and
types, members inside the file, the end-of-archive marker, the sample count) before any member is used; malformed bytes
raise `InputError` naming the shard and member.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping

from ..errors import InputError, ManifestError
from ..fsutil import fsync_dir, tmp_path_for
from ..log import get_logger
from .codec import JSON, RECACHE_HINT

log = get_logger("cache")

_KEY_RE = re.compile(r"[0-9a-f]+")
# Lowercase because webdataset lowercases suffixes; dot-separated parts, so no "/", no "..", no leading/trailing dot.
_SUFFIX_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_USTAR_NAME_MAX = 100
_CHUNK = 1 << 20
_END_OF_ARCHIVE = 1024  # two zero blocks
INDEX_FORMAT = 1


def shard_name(prefix: str, index: int) -> str:
    """`<prefix>-NNNNNN.tar`, the file name of shard number `index`."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{prefix}-{index:06d}.tar"


def is_key(key: object) -> bool:
    return isinstance(key, str) and _KEY_RE.fullmatch(key) is not None


def _check_key(key: object) -> str:
    if not is_key(key):
        raise ValueError(f"shard sample key must be lowercase hex ([0-9a-f]+), got {key!r}")
    return key  # type: ignore[return-value]


def _check_suffix(key: str, suffix: object) -> str:
    if not isinstance(suffix, str) or not _SUFFIX_RE.fullmatch(suffix):
        raise ValueError(
            f"member suffix of sample {key} must be lowercase dot-separated words without '/' or '..', got {suffix!r}"
        )
    if len(key) + 1 + len(suffix) > _USTAR_NAME_MAX:
        raise ValueError(f"member name {key}.{suffix} is longer than {_USTAR_NAME_MAX} characters (USTAR limit)")
    return suffix


def _repeats(meta: bytes | None) -> int:
    """The `repeats` a sample's JSON member records (0 when it has none: shards written by tests and tools)."""
    try:
        value = json.loads(meta).get("repeats", 0) if meta else 0
    except (ValueError, AttributeError, RecursionError):
        return 0
    return value if type(value) is int else 0


class _HashingFile:
    """Write-through wrapper counting and hashing every byte tarfile writes."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._handle.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._handle.flush()


class ShardWriter:
    """Write one shard deterministically to `<final_path>.tmp`; on clean exit rename it to `final_path`.

    Use as a context manager. After a clean exit `.sha256`, `.bytes`, `.samples` and `.keys` describe the shard;
    `.bytes` also tracks the bytes written so far while the shard is open, and `index_doc()` where each member's bytes
    sit (final as soon as the last sample is added: the tar's end adds no member). On any exception (KeyboardInterrupt
    included) the tmp file is removed and `final_path` is left untouched.
    """

    def __init__(self, final_path: str | Path) -> None:
        self.path = Path(final_path)
        self.tmp_path = tmp_path_for(self.path)
        self.sha256: str | None = None
        self.keys: list[str] = []
        self.spans: list[dict[str, tuple[int, int]]] = []  # per sample: suffix -> (offset of its bytes, size)
        self.repeats: list[int] = []
        self._seen: set[str] = set()
        self._handle: BinaryIO | None = None
        self._hashing: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._closed = False

    @property
    def samples(self) -> int:
        return len(self.keys)

    @property
    def bytes(self) -> int:
        return self._hashing.size if self._hashing is not None else 0

    def __enter__(self) -> "ShardWriter":
        if self._handle is not None or self._closed:
            raise RuntimeError(f"ShardWriter for {self.path} cannot be entered twice")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.tmp_path, "wb")
        try:
            self._hashing = _HashingFile(self._handle)
            self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[arg-type]
        except BaseException:
            self._abort()
            raise
        return self

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        """Append one sample; its members go in sorted suffix order."""
        if self._tar is None:
            raise RuntimeError(f"ShardWriter for {self.path} is not open (use it as a context manager)")
        _check_key(key)
        if key in self._seen:
            raise ValueError(f"duplicate sample key {key} in shard {self.path}")
        if not members:
            raise ValueError(f"sample {key} has no members")
        payloads = []
        for suffix in sorted(members):
            data = members[suffix]
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"member {key}.{suffix} must be bytes, got {type(data).__name__}")
            payloads.append((_check_suffix(key, suffix), bytes(data)))
        spans = {}
        for suffix, data in payloads:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            self._tar.addfile(info, io.BytesIO(data))
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            spans[suffix] = (self._tar.offset - padded, len(data))
        self._seen.add(key)
        self.keys.append(key)
        self.spans.append(spans)
        self.repeats.append(_repeats(members.get(JSON)))

    def index_doc(self) -> dict:
        """The shard's index, as its sidecar keeps it: sample keys, each sample's `repeats` (from its JSON member), and
        per member suffix a flat list of (offset, size) pairs, (-1, 0) where a sample has no such member."""
        suffixes = sorted({suffix for spans in self.spans for suffix in spans})
        columns = {suffix: [v for spans in self.spans for v in spans.get(suffix, (-1, 0))] for suffix in suffixes}
        return {"format": INDEX_FORMAT, "keys": list(self.keys), "repeats": list(self.repeats), "spans": columns}

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._finish()
        except BaseException:
            self._abort()
            raise

    def _finish(self) -> None:
        assert self._tar is not None and self._handle is not None and self._hashing is not None
        self._tar.close()  # end-of-archive blocks, padded to the record size
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)
        self.sha256 = self._hashing.digest.hexdigest()
        self._tar = None
        self._closed = True
        log.debug("wrote shard %s (%d samples, %d bytes)", self.path, self.samples, self.bytes)

    def _abort(self) -> None:
        self._tar = None
        self._closed = True
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp_path.unlink()


# --- reading -----------------------------------------------------------------------------------------------------


def _check_open_shard(handle: BinaryIO, path: Path, sha256: str | None, size: int | None) -> None:
    actual_size = os.fstat(handle.fileno()).st_size
    actual_sha = None
    if sha256 is not None:
        digest = hashlib.sha256()
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        actual_sha = digest.hexdigest()
        handle.seek(0)
    size_bad = size is not None and actual_size != size
    sha_bad = sha256 is not None and actual_sha != sha256.lower()
    if size_bad or sha_bad:
        raise ManifestError(
            f"cache shard {path} does not match the manifest: expected sha256 {sha256} ({size} bytes), "
            f"found sha256 {actual_sha} ({actual_size} bytes); the cache is stale or damaged, re-run `st cache`"
        )


def _open_regular(path: Path) -> BinaryIO:
    """Open a shard for reading; only a regular file (a FIFO would block the open, a device never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ManifestError(f"cache shard {path} is missing; re-run `st cache`") from None
    except OSError as exc:
        raise ManifestError(f"cache shard {path} cannot be read ({exc.strerror}); re-run `st cache`") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"cache shard {path} is not a regular file; {RECACHE_HINT}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def verify_shard(path: str | Path, sha256: str, bytes: int) -> None:  # noqa: A002 - name asked for by the API
    """Raise `ManifestError` unless the shard at `path` has this size and sha256."""
    path = Path(path)
    with _open_regular(path) as handle:
        _check_open_shard(handle, path, sha256, bytes)


@dataclass(frozen=True)
class ShardSample:
    """Where one sample's members sit in its shard: suffix -> (offset of the member's bytes, size)."""

    key: str
    members: dict[str, tuple[int, int]]


def scan_shard(path: str | Path, *, expected_sha256: str | None, expected_bytes: int | None = None,
               expected_samples: int | None = None) -> list[ShardSample]:  # fmt: skip
    """Verify the shard's size and sha256, then list its samples from the tar headers alone.

    Refused with `InputError`, naming the shard: a file that is not a tar, members that are not plain files, absolute
    or `..` names, duplicate members, a sample split across the archive, a member or header past the end of the file
    (a truncated shard), a missing end-of-archive marker, or another sample count than `expected_samples`.
    """
    handle, samples = _open_scanned(Path(path), expected_sha256, expected_bytes, expected_samples)
    handle.close()
    return samples


def _open_scanned(path: Path, sha256: str | None, size: int | None,
                  samples: int | None) -> tuple[BinaryIO, list[ShardSample]]:  # fmt: skip
    handle = _open_regular(path)
    try:
        _check_open_shard(handle, path, sha256, size)
        found = _scan_tar(handle, path)
        if samples is not None and len(found) != samples:
            raise InputError(f"cache shard {path} holds {len(found)} sample(s), but the cache manifest lists "
                             f"{samples}; {RECACHE_HINT}")  # fmt: skip
    except BaseException:
        handle.close()
        raise
    return handle, found


def read_shard(
    path: str | Path, *, expected_sha256: str | None, expected_bytes: int | None = None,
    expected_samples: int | None = None,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Verify the shard and its structure (eagerly, at call time, see `scan_shard`), then iterate its samples as
    `(key, {suffix: bytes})`.

    Pass `expected_sha256=None` only to skip the hash check on purpose. Members are grouped by key the way
    webdataset does (key = member name up to the first dot of its base name).
    """
    handle, samples = _open_scanned(Path(path), expected_sha256, expected_bytes, expected_samples)
    return _iter_samples(handle, samples)


def read_member(handle: BinaryIO, span: tuple[int, int]) -> bytes:
    """The bytes of a member at `span` = (offset, size) of an open shard (spans come from `scan_shard`)."""
    offset, size = span
    handle.seek(offset)
    return handle.read(size)


def _iter_samples(handle: BinaryIO, samples: list[ShardSample]) -> Iterator[tuple[str, dict[str, bytes]]]:
    with handle:
        for sample in samples:
            yield sample.key, {suffix: read_member(handle, span) for suffix, span in sample.members.items()}


def _member_key(path: Path, name: str) -> tuple[str, str]:
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        raise InputError(f"cache shard {path} has a member with an absolute path: {name!r}; re-run `st cache`")
    if ".." in name.split("/"):
        raise InputError(f"cache shard {path} has a member with a '..' component: {name!r}; re-run `st cache`")
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        raise InputError(f"cache shard {path} has a member without a <key>.<suffix> name: {name!r}; {RECACHE_HINT}")
    return match.group(1), match.group(2).lower()


def _scan_tar(handle: BinaryIO, path: Path) -> list[ShardSample]:
    size = os.fstat(handle.fileno()).st_size
    try:
        tar = tarfile.open(fileobj=handle, mode="r:")
    except (tarfile.TarError, ValueError, OverflowError) as exc:
        raise InputError(f"cache shard {path} is not a readable tar file ({exc}); {RECACHE_HINT}") from None
    samples: list[ShardSample] = []
    seen: set[str] = set()
    with tar:
        try:
            for info in tar:
                key, suffix = _checked_member(path, info, size)
                if not samples or samples[-1].key != key:
                    if key in seen:
                        raise InputError(f"cache shard {path}: sample {key} is split across the archive; "
                                         f"{RECACHE_HINT}")  # fmt: skip
                    seen.add(key)
                    samples.append(ShardSample(key, {}))
                if suffix in samples[-1].members:
                    raise InputError(f"cache shard {path}: duplicate member {info.name!r}; {RECACHE_HINT}")
                samples[-1].members[suffix] = (info.offset_data, info.size)
            end = tar.offset
        except (tarfile.TarError, ValueError, OverflowError) as exc:
            raise InputError(f"cache shard {path} is a damaged tar file ({exc}); {RECACHE_HINT}") from None
    _check_end_of_archive(handle, path, end, size)
    return samples


def _checked_member(path: Path, info: tarfile.TarInfo, file_size: int) -> tuple[str, str]:
    name = info.name
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.issparse():
        raise InputError(f"cache shard {path} has a non-regular member {name!r} (type {info.type!r}); "
                         f"only plain files are allowed: {RECACHE_HINT}")  # fmt: skip
    key, suffix = _member_key(path, name)
    if info.size < 0 or info.offset_data + info.size > file_size:
        end = info.offset_data + info.size
        raise InputError(f"cache shard {path} is truncated: member {name!r} ends at byte {end}, past the end of the "
                         f"file ({file_size} bytes); {RECACHE_HINT}")  # fmt: skip
    return key, suffix


def _check_end_of_archive(handle: BinaryIO, path: Path, end: int, file_size: int) -> None:
    """A tar ends with two zero blocks; without them the shard was cut short (or has garbage after its members)."""
    handle.seek(end)
    tail_ok = file_size - end >= _END_OF_ARCHIVE
    while tail_ok and (chunk := handle.read(_CHUNK)):
        tail_ok = not chunk.strip(b"\0")
    if not tail_ok:
        raise InputError(f"cache shard {path} is truncated or has trailing data: no end-of-archive marker after its "
                         f"last member (byte {end} of {file_size}); {RECACHE_HINT}")  # fmt: skip
