"""Cache shards: deterministic, uncompressed tar files in webdataset layout.

A sample is `(key, members)`: `key` is a lowercase hex content id, `members` maps a suffix ("json",
"latent.safetensors.zst", ...) to the member's bytes, stored in the tar as `<key>.<suffix>`. Tensor members are
safetensors bytes compressed as a single zstd frame that records its content size and a checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, Mapping

from pipeline.errors import InputError, ManifestError
from pipeline.fsutil import fsync_dir, tmp_path_for
from pipeline.hashing import canonical_json
from pipeline.log import get_logger

if TYPE_CHECKING:
    import torch

log = get_logger("cache")

TENSOR_SUFFIX = ".safetensors.zst"
_KEY_RE = re.compile(r"[0-9a-f]+")
# Lowercase because webdataset lowercases suffixes; dot-separated parts, so no "/", no "..", no leading/trailing dot.
_SUFFIX_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_USTAR_NAME_MAX = 100
_CHUNK = 1 << 20


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


def unpack_tensors(data: bytes) -> dict[str, "torch.Tensor"]:
    """Inverse of `pack_tensors`; only safetensors is deserialised, never pickle."""
    import zstandard
    from safetensors.torch import load

    try:
        raw = zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as exc:
        raise ValueError(f"not a zstd frame with its content size: {exc}") from exc
    try:
        return load(raw)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ValueError(f"not valid safetensors data: {exc}") from exc


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
            out[name] = unpack_tensors(value)
        elif name == "json" or name.endswith(".json"):
            out[name] = json.loads(bytes(value).decode("utf-8"))
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


def verify_shard(path: str | Path, sha256: str, bytes: int) -> None:  # noqa: A002 - name asked for by the API
    """Raise `ManifestError` unless the shard at `path` has this size and sha256."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            _check_open_shard(handle, path, sha256, bytes)
    except FileNotFoundError:
        raise ManifestError(f"cache shard {path} is missing; re-run `st cache`") from None


def read_shard(
    path: str | Path, *, expected_sha256: str | None, expected_bytes: int | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Verify the shard (eagerly, at call time), then iterate its samples as `(key, {suffix: bytes})`.

    Pass `expected_sha256=None` only to skip the hash check on purpose. Members are grouped by key the way
    webdataset does (key = member name up to the first dot of its base name). Absolute names, `..` components,
    non-regular members, duplicate members and a key split across the archive are refused with `InputError`.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise ManifestError(f"cache shard {path} is missing; re-run `st cache`") from None
    try:
        _check_open_shard(handle, path, expected_sha256, expected_bytes)
    except BaseException:
        handle.close()
        raise
    return _iter_samples(handle, path)


def _member_key(path: Path, name: str) -> tuple[str, str]:
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        raise InputError(f"cache shard {path} has a member with an absolute path: {name!r}; re-run `st cache`")
    if ".." in name.split("/"):
        raise InputError(f"cache shard {path} has a member with a '..' component: {name!r}; re-run `st cache`")
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        raise InputError(f"cache shard {path} has a member without a <key>.<suffix> name: {name!r}")
    return match.group(1), match.group(2).lower()


def _iter_samples(handle: BinaryIO, path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    with handle:
        try:
            tar = tarfile.open(fileobj=handle, mode="r:")
        except tarfile.TarError as exc:
            raise InputError(f"cache shard {path} is not a readable tar file: {exc}; re-run `st cache`") from exc
        with tar:
            seen: set[str] = set()
            key: str | None = None
            members: dict[str, bytes] = {}
            try:
                for info in tar:
                    name = info.name
                    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.issparse():
                        raise InputError(
                            f"cache shard {path} has a non-regular member {name!r} (type {info.type!r}); "
                            "only plain files are allowed"
                        )
                    member_key, suffix = _member_key(path, name)
                    if member_key != key:
                        if key is not None:
                            yield key, members
                        if member_key in seen:
                            raise InputError(f"cache shard {path}: sample {member_key} is split across the archive")
                        seen.add(member_key)
                        key, members = member_key, {}
                    if suffix in members:
                        raise InputError(f"cache shard {path}: duplicate member {name!r}")
                    extracted = tar.extractfile(info)
                    assert extracted is not None
                    members[suffix] = extracted.read()
            except tarfile.TarError as exc:
                raise InputError(f"cache shard {path} is a damaged tar file: {exc}; re-run `st cache`") from exc
            if key is not None:
                yield key, members
