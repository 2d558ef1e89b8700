"""Dropbox through the official SDK (`pip install dropbox`).

Files larger than one chunk go up in an upload session. Dropbox stores a content hash of every file (sha256 over
4 MiB blocks); a re-run skips files present with the same size and content hash, and each upload is verified the
same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, InputError
from .base import MB, POSITIVE, STR, LocalFile, StorageTarget, from_env, normalise_entry

SCHEMA = {
    "token": (STR, ("access_token", "oauth2_access_token")),
    "refresh_token": (STR, ("oauth2_refresh_token",)),
    "app_key": (STR, ()),
    "app_secret": (STR, ()),
    "prefix": (STR, ("base_path", "path")),
    "chunk_size_mb": (POSITIVE, ()),
}
TOKEN_ENV = ("DROPBOX_TOKEN", "DROPBOX_ACCESS_TOKEN")
_BLOCK = 4 * MB


def validate(entry: dict, where: str, provider: str) -> dict:
    """Check a `dropbox` entry offline (a token, or a refresh token with its app key)."""
    spec = normalise_entry(entry, where, provider, SCHEMA)
    if not from_env(spec, "token", TOKEN_ENV) and not (spec.get("refresh_token") and spec.get("app_key")):
        raise ConfigError(f"{where}: provider 'dropbox' needs 'token' (or the DROPBOX_TOKEN environment variable), "
                          "or 'refresh_token' with 'app_key'")
    if spec.get("chunk_size_mb", 8) > 150:
        raise ConfigError(f"{where}.chunk_size_mb must be at most 150 (Dropbox's largest upload request)")
    spec["prefix"] = "/" + spec.get("prefix", "").strip("/")
    return spec


def content_hash(path: Path) -> str:
    """Dropbox's content hash: sha256 of the concatenated sha256 digests of each 4 MiB block."""
    outer = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            outer.update(hashlib.sha256(block).digest())
    return outer.hexdigest()


class DropboxTarget(StorageTarget):
    """Uploads a folder under `dropbox:///prefix/`."""

    location_key = "account"
    sdk = ("dropbox", "dropbox")
    hash_name = "content hash"

    def __init__(self, spec: dict, *, sleep: Callable[[float], None] | None = None):
        super().__init__(spec, sleep=sleep)
        self.prefix = spec.get("prefix", "/")
        self._chunk = int(spec.get("chunk_size_mb", 8) * MB)
        self._hashes: dict[Path, str] = {}

    @property
    def destination(self) -> str:
        return f"dropbox://{self.prefix}"

    def remote_name(self, f: LocalFile) -> str:
        return f"dropbox:{self._path(f.rel)}"

    def _path(self, rel: str) -> str:
        return f"{self.prefix.rstrip('/')}/{rel}"

    def _local_hash(self, f: LocalFile) -> str:
        if f.path not in self._hashes:
            self._hashes[f.path] = content_hash(f.path)
        return self._hashes[f.path]

    def _open(self):
        import dropbox

        options = {"timeout": 120, "max_retries_on_error": 0, "max_retries_on_rate_limit": 0}  # st retries (retry.py)
        token = from_env(self.spec, "token", TOKEN_ENV)
        if token:
            return dropbox.Dropbox(oauth2_access_token=token, **options)
        return dropbox.Dropbox(oauth2_refresh_token=self.spec["refresh_token"], app_key=self.spec["app_key"],
                               app_secret=self.spec.get("app_secret"), **options)

    def _probe(self) -> None:
        self._retry(self._open().users_get_current_account, "account")

    def _put(self, dbx, f: LocalFile) -> None:
        from dropbox.files import CommitInfo, UploadSessionCursor, WriteMode

        path, chunk, mode = self._path(f.rel), self._chunk, WriteMode.overwrite
        with open(f.path, "rb") as handle:
            if f.size <= chunk:
                dbx.files_upload(handle.read(), path, mode=mode)
                return
            session = dbx.files_upload_session_start(handle.read(chunk))
            cursor = UploadSessionCursor(session_id=session.session_id, offset=handle.tell())
            commit = CommitInfo(path=path, mode=mode)
            while f.size - handle.tell() > chunk:
                dbx.files_upload_session_append_v2(handle.read(chunk), cursor)
                cursor.offset = handle.tell()
            dbx.files_upload_session_finish(handle.read(), cursor, commit)

    def _remote(self, dbx, f: LocalFile) -> tuple[int, str] | None:
        from dropbox.exceptions import ApiError

        try:
            found = dbx.files_get_metadata(self._path(f.rel))
        except ApiError as exc:
            if "not_found" in str(getattr(exc, "error", exc)):
                return None
            raise
        return getattr(found, "size", None), getattr(found, "content_hash", None)

    def _explain(self, exc: Exception) -> Exception:
        names = {cls.__name__ for cls in type(exc).__mro__}
        if "AuthError" in names or "BadInputError" in names:
            return InputError(f"{self.destination}: Dropbox rejected the token (token / DROPBOX_TOKEN): {exc}")
        return InputError(f"{self.destination}: Dropbox error: {type(exc).__name__}: {exc}")
