"""What every upload target shares: the local file list, remote key joining, config-entry validation, SDK loading,
the upload loop (skip unchanged, upload, verify, list) and the per-target record."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import suggest
from ..errors import ConfigError, InputError, NotSupportedError
from ..hashing import sha256_file
from ..log import get_logger
from ..ownership import is_bookkeeping
from .retry import retry_call

log = get_logger("publish")

MB = 1024 * 1024


@dataclass
class LocalFile:
    """One file of the folder being published; its sha256 is computed once, on first use."""

    path: Path
    rel: str
    size: int
    _sha256: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256


def local_files(folder: Path) -> list[LocalFile]:
    """Every regular file under `folder` (recursively, sorted, symlinks followed), with its posix relative path; the
    output folder's lock file and ownership record are bookkeeping, not published."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"nothing to publish: {folder} is not a folder")
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_file() and not (root == str(folder) and is_bookkeeping(name)):
                files.append(LocalFile(path, path.relative_to(folder).as_posix(), path.stat().st_size))
    if not files:
        raise InputError(f"nothing to publish: {folder} holds no files")
    return files


def join_key(prefix: str, rel: str) -> str:
    """`prefix/rel` without doubled or leading slashes (an empty prefix gives `rel`)."""
    prefix = prefix.strip("/")
    return f"{prefix}/{rel}" if prefix else rel


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def require_sdk(module: str, pip_name: str, provider: str) -> Any:
    """Import an optional SDK, or say which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise NotSupportedError(
            f"publishing to provider '{provider}' needs the {pip_name} package: pip install {pip_name}"
        ) from None


def sdk_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# Config entries -----------------------------------------------------------------------------------------------------

STR = "str"
POSITIVE = "positive number"
POSITIVE_INT = "positive integer"
BOOL = "bool"


def normalise_entry(entry: dict, where: str, provider: str, schema: dict[str, tuple[str, tuple[str, ...]]]) -> dict:
    """Check an entry's keys and value types against `schema` ({key: (kind, aliases)}); returns canonical keys.

    Keys may carry SimpleTuner's aliases (`base_path` for `prefix`, `access_key` for `aws_access_key_id`, ...).
    Unknown keys are errors, with a suggestion, so that a typo never silently drops a setting.
    """
    names = {"name": (STR, ())} | schema
    alias_to_key = {alias: key for key, (_, aliases) in names.items() for alias in (key, *aliases)}
    out: dict[str, Any] = {"provider": provider}
    for raw_key, value in entry.items():
        key_text = str(raw_key).lstrip("-")
        if key_text == "provider":
            continue
        if key_text not in alias_to_key:
            raise ConfigError(
                f"{where}: unknown key '{key_text}' for provider '{provider}'{suggest(key_text, alias_to_key)}"
                f" (known keys: {', '.join(sorted(names))})"
            )
        key = alias_to_key[key_text]
        if key in out:
            raise ConfigError(f"{where}: '{key}' is given twice (as '{key_text}' and an alias)")
        if value is None or value == "":
            continue
        out[key] = _check_value(value, names[key][0], f"{where}.{key_text}")
    return out


def _check_value(value: Any, kind: str, where: str) -> Any:
    if kind == STR:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, not {type(value).__name__}")
        return value
    if kind == BOOL:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or number <= 0:
        raise ConfigError(f"{where} must be a {kind}, not {value!r}")
    if kind == POSITIVE_INT:
        if int(number) != number:
            raise ConfigError(f"{where} must be a {kind}, not {value!r}")
        return int(number)
    return float(number)


def require_key(spec: dict, key: str, where: str, what: str) -> None:
    if not spec.get(key):
        raise ConfigError(f"{where}: provider '{spec['provider']}' needs '{key}' ({what})")


def from_env(spec: dict, key: str, env_names: tuple[str, ...]) -> str | None:
    """The value of `key` in the entry, else of the first set environment variable of `env_names`."""
    if spec.get(key):
        return spec[key]
    for name in env_names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def make_record(provider: str, destination: str, files: list[LocalFile], uploaded: int, **extra: Any) -> dict:
    """The record of one verified upload (JSON-serialisable)."""
    return {
        "provider": provider,
        "destination": destination,
        "files": len(files),
        "bytes": sum(f.size for f in files),
        "uploaded": uploaded,
        "skipped": len(files) - uploaded,
        "verified": True,
        **extra,
    }


def log_record(record: dict) -> None:
    log.info(
        "%s: %d file(s), %.1f MB (%d uploaded, %d unchanged), verified",
        record["destination"], record["files"], record["bytes"] / MB, record["uploaded"], record["skipped"],
    )


# The upload loop ----------------------------------------------------------------------------------------------------


class StorageTarget:
    """A storage provider's target: uploads each file of a folder under its prefix, skipping files already there with
    the same size and hash, verifies each upload, and (where the provider lists) checks that all are listed.

    A provider gives `destination`, `_open()` (a connected session: bucket, container, client), `_remote(session, f)`
    (the (size, hash) stored for a file, or None), `_put(session, f)`, `_probe()` (the pre-flight request) and
    `_explain(exc)` (a user error for a failed call); optionally `_listed(session)` (names under the prefix) and
    `_local_hash(f)` (when the provider's hash is not the file's sha256). Every remote call goes through `_retry`.
    """

    scheme = ""  # of `destination`: scheme://location/prefix
    location_key = "bucket"  # the spec key naming the bucket or container (and what `check` reports reachable)
    sdk: tuple[str, str] | None = None  # (module, pip package) checked when the target is made
    hash_name = "sha256"

    def __init__(self, spec: dict, *, sleep: Callable[[float], None] | None = None):
        self.spec = spec
        self.provider = spec["provider"]
        if self.sdk:
            require_sdk(*self.sdk, self.provider)
        self.location = spec.get(self.location_key, "")
        self.prefix = spec.get("prefix", "")
        self._retry_kwargs: dict[str, Any] = {"sleep": sleep} if sleep else {}

    @property
    def destination(self) -> str:
        return f"{self.scheme}://{self.location}/{self.prefix}".rstrip("/")

    def __repr__(self) -> str:  # never shows credentials
        return f"{type(self).__name__}({self.destination!r})"

    def remote_name(self, f: LocalFile) -> str:
        return f"{self.destination}/{f.rel}"

    def _retry(self, fn: Callable[[], Any], what: str) -> Any:
        return retry_call(fn, what=f"{self.destination}: {what}", **self._retry_kwargs)

    def _local_hash(self, f: LocalFile) -> str:
        return f.sha256

    def _listed(self, session: Any) -> set[str] | None:
        return None

    def _record_extra(self) -> dict[str, Any]:
        return {}

    def check(self) -> str:
        """Pre-flight: one quick request (credentials accepted, the bucket or container there)."""
        try:
            self._probe()
        except Exception as exc:
            raise self._explain(exc) from None
        return f"{self.destination}: {self.location_key} reachable"

    def _matches(self, session: Any, f: LocalFile) -> bool:
        found = self._retry(lambda: self._remote(session, f), f"checking {f.rel}")
        return found is not None and found == (f.size, self._local_hash(f))

    def upload(self, folder: Path, files: list[LocalFile] | None = None) -> dict:
        """Upload every file of `folder`, skipping unchanged ones; verify (and list); return the record."""
        files = files if files is not None else local_files(folder)
        try:
            session = self._open()
            uploaded = 0
            for f in files:
                if self._matches(session, f):
                    log.debug("%s unchanged, skipped", self.remote_name(f))
                    continue
                log.info("uploading %s -> %s (%.1f MB)", f.rel, self.remote_name(f), f.size / MB)
                self._retry(lambda f=f: self._put(session, f), f"uploading {f.rel}")
                if not self._matches(session, f):
                    raise InputError(f"verification failed for {self.remote_name(f)}: the stored file's size or "
                                     f"{self.hash_name} differs from the local file")
                uploaded += 1
            listed = self._listed(session)
        except InputError:
            raise
        except Exception as exc:
            raise self._explain(exc) from exc
        extra = self._record_extra()
        if listed is not None:
            missing = [f.rel for f in files if join_key(self.prefix, f.rel) not in listed]
            if missing:
                raise InputError(f"{self.destination}: uploaded files missing from the listing: {', '.join(missing)}")
            extra = {"remote_objects": len(listed), **extra}
        return make_record(self.provider, self.destination, files, uploaded, **extra)

    def _open(self) -> Any:
        raise NotImplementedError

    def _remote(self, session: Any, f: LocalFile) -> tuple[int, str] | None:
        raise NotImplementedError

    def _put(self, session: Any, f: LocalFile) -> None:
        raise NotImplementedError

    def _probe(self) -> None:
        raise NotImplementedError

    def _explain(self, exc: Exception) -> Exception:
        raise NotImplementedError
