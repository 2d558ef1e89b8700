"""Cache shards: deterministic, uncompressed tar files in webdataset layout.

A sample is `(key, members)`: `key` is a lowercase hex content id, `members` maps a suffix ("json",
"latent.safetensors.zst", ...) to the member's bytes, stored in the tar as `<key>.<suffix>`. Tensor members are
safetensors bytes compressed as a single zstd frame that records its content size and a checksum.

Shard bytes are untrusted (a whole cache folder, manifest included, can be crafted so that every hash matches), so
every read is bounded: a frame must declare its content size and the caller's bound must cover it before anything is
allocated; safetensors header lengths are checked against the bytes that follow; the tar's structure (member names and
types, members inside the file, the end-of-archive marker, the sample count) is checked before any member is used.
Malformed bytes raise `InputError` naming the shard and member.
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
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, Mapping

from pipeline.errors import InputError, ManifestError
from pipeline.fsutil import fsync_dir, tmp_path_for
from pipeline.hashing import canonical_json
from pipeline.log import get_logger
from pipeline.tensorfile import SafetensorsFormatError, TensorSpec, header_length, parse_header, read_header

if TYPE_CHECKING:
    import torch

log = get_logger("cache")

TENSOR_SUFFIX = ".safetensors.zst"
_KEY_RE = re.compile(r"[0-9a-f]+")
# Lowercase because webdataset lowercases suffixes; dot-separated parts, so no "/", no "..", no leading/trailing dot.
_SUFFIX_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_USTAR_NAME_MAX = 100
_CHUNK = 1 << 20
_END_OF_ARCHIVE = 1024  # two zero blocks
# No shard member st writes comes near this: the default bound, and the cap on bounds derived from a manifest.
MAX_MEMBER_BYTES = 1 << 30
RECACHE_HINT = "the cache is damaged or was not written by st: re-run `st cache`"


def shard_name(prefix: str, index: int) -> str:
    """`<prefix>-NNNNNN.tar`, the file name of shard number `index`."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{prefix}-{index:06d}.tar"


# --- member payloads ---------------------------------------------------------------------------------------------


def pack_tensors(tensors: Mapping[str, "torch.Tensor"], level: int = 3) -> bytes:
    """Serialise tensors with safetensors and compress them as one zstd frame (content size and checksum on)."""
    import torch
    import zstandard
    from safetensors.torch import save

    prepared = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"pack_tensors wants str -> torch.Tensor, got {type(name).__name__} -> {type(tensor).__name__}")
        prepared[name] = tensor.detach().cpu().contiguous()
    raw = save(prepared)
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True).compress(raw)


def malformed(where: str, problem: str) -> InputError:
    """The error for member bytes that are not what st writes: `<where>: <problem>; <how to fix>`."""
    return InputError(f"{where}: {problem}; {RECACHE_HINT}")


def frame_content_size(data: bytes, *, max_bytes: int, where: str) -> int:
    """The content size a zstd frame declares in its header, refused when absent or above `max_bytes`."""
    import zstandard

    try:
        size = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise malformed(where, f"not a zstd frame ({exc})") from None
    if size == zstandard.CONTENTSIZE_UNKNOWN:
        raise malformed(where, "its zstd frame does not declare its content size")
    if size > max_bytes:
        raise malformed(where, f"its zstd frame declares {size} bytes, more than the {max_bytes} its shape allows")
    return size


def decompress_frame(data: bytes, *, max_bytes: int = MAX_MEMBER_BYTES, where: str = "zstd member") -> bytes:
    """Decompress one zstd frame whose declared content size is within `max_bytes` (nothing may follow it)."""
    import zstandard

    size = frame_content_size(data, max_bytes=max_bytes, where=where)
    if size == 0:  # max_output_size=0 would mean "no limit"
        return b""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise malformed(where, f"its zstd frame does not decompress ({exc})") from None
    if len(raw) != size:
        raise malformed(where, f"its zstd frame declares {size} bytes but holds {len(raw)}")
    return raw


def tensor_specs(data: bytes, *, max_bytes: int = MAX_MEMBER_BYTES,
                 where: str = "zstd member") -> dict[str, TensorSpec]:  # fmt: skip
    """The tensors a compressed safetensors member holds, from its header alone: only the header is decompressed,
    and its length and tensor table are checked against the frame's declared content size."""
    import zstandard

    size = frame_content_size(data, max_bytes=max_bytes, where=where)
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as stream:
            length = header_length(_read_exact(stream, 8), size)
            header = _read_exact(stream, length)
        return parse_header(header, size - 8 - length)[0]
    except zstandard.ZstdError as exc:
        raise malformed(where, f"its zstd frame does not decompress ({exc})") from None
    except SafetensorsFormatError as exc:
        raise malformed(where, str(exc)) from None


def _read_exact(stream: Any, count: int) -> bytes:
    parts, missing = [], count
    while missing:
        chunk = stream.read(missing)
        if not chunk:
            raise SafetensorsFormatError(f"the data ends before its safetensors header ({count} bytes) does")
        parts.append(chunk)
        missing -= len(chunk)
    return b"".join(parts)


def unpack_tensors(data: bytes, *, max_bytes: int = MAX_MEMBER_BYTES,
                   where: str = "zstd member") -> dict[str, "torch.Tensor"]:  # fmt: skip
    """Inverse of `pack_tensors`, bounded by `max_bytes` of decompressed data; only safetensors is deserialised, never
    pickle. Malformed bytes raise `InputError` starting with `where`."""
    from safetensors.torch import load

    raw = decompress_frame(data, max_bytes=max_bytes, where=where)
    try:
        read_header(raw)
        return load(raw)
    except Exception as exc:  # SafetensorsFormatError, or safetensors' own SafetensorError
        raise malformed(where, f"not valid safetensors data ({exc})") from None


def decode_json(data: bytes, where: str) -> Any:
    """A `json` member's value (UTF-8 JSON; deep nesting and bad bytes are refused, not crashed on)."""
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise malformed(where, f"not valid UTF-8 JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


def pack_json(value: Any) -> bytes:
    """Canonical UTF-8 JSON (sorted keys, no whitespace) for a `json` member."""
    return canonical_json(value)


def webdataset_decoder(sample: dict) -> dict:
    """Decode a webdataset sample: `*safetensors.zst` members -> tensor dicts, `json` members -> values.

    Keys keep their names; `__key__`, `__url__` and other members pass through unchanged.
    """
    out = {}
    for name, value in sample.items():
        if name.startswith("__"):
            out[name] = value
        elif name == TENSOR_SUFFIX[1:] or name.endswith(TENSOR_SUFFIX):
            out[name] = unpack_tensors(value, where=f"member {sample.get('__key__')}.{name}")
        elif name == "json" or name.endswith(".json"):
            out[name] = decode_json(value, f"member {sample.get('__key__')}.{name}")
        else:
            out[name] = value
    return out


# --- writing -----------------------------------------------------------------------------------------------------


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"shard sample key must be lowercase hex ([0-9a-f]+), got {key!r}")
    return key


def _check_suffix(key: str, suffix: object) -> str:
    if not isinstance(suffix, str) or not _SUFFIX_RE.fullmatch(suffix):
        raise ValueError(
            f"member suffix of sample {key} must be lowercase dot-separated words without '/' or '..', got {suffix!r}"
        )
    if len(key) + 1 + len(suffix) > _USTAR_NAME_MAX:
        raise ValueError(f"member name {key}.{suffix} is longer than {_USTAR_NAME_MAX} characters (USTAR limit)")
    return suffix


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
    `.bytes` also tracks the bytes written so far while the shard is open. On any exception (KeyboardInterrupt
    included) the tmp file is removed and `final_path` is left untouched.
    """

    def __init__(self, final_path: str | Path) -> None:
        self.path = Path(final_path)
        self.tmp_path = tmp_path_for(self.path)
        self.sha256: str | None = None
        self.keys: list[str] = []
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
        for suffix, data in payloads:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            self._tar.addfile(info, io.BytesIO(data))
        self._seen.add(key)
        self.keys.append(key)

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
