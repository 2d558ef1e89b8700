"""Dropbox through the official SDK (`pip install dropbox`).

Files larger than one chunk go up in an upload session. Dropbox stores a content hash of every file (sha256 over
4 MiB blocks); a re-run skips files present with the same size and content hash, and each upload is verified the
same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from ...errors import ConfigError, InputError
from .base import MB, POSITIVE, STR, LocalFile, from_env, local_files, log, make_record, normalise_entry, require_sdk
from .retry import retry_call

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


class DropboxTarget:
    """Uploads a folder under `dropbox:///prefix/`."""

    def __init__(self, spec: dict, *, sleep: Callable[[float], None] | None = None):
        require_sdk("dropbox", "dropbox", "dropbox")
        self.spec = spec
        self.provider = "dropbox"
        self.prefix = spec.get("prefix", "/")
        self._retry_kwargs = {"sleep": sleep} if sleep else {}

    @property
    def destination(self) -> str:
        return f"dropbox://{self.prefix}"

    def __repr__(self) -> str:
        return f"DropboxTarget({self.destination!r})"

    def _path(self, rel: str) -> str:
        return f"{self.prefix.rstrip('/')}/{rel}"

    def _client(self):
        import dropbox

        token = from_env(self.spec, "token", TOKEN_ENV)
        if token:
            return dropbox.Dropbox(oauth2_access_token=token, timeout=120)
        return dropbox.Dropbox(oauth2_refresh_token=self.spec["refresh_token"], app_key=self.spec["app_key"],
                               app_secret=self.spec.get("app_secret"), timeout=120)

    def check(self) -> str:
        try:
            retry_call(self._client().users_get_current_account, what=f"{self.destination}: account",
                       **self._retry_kwargs)
        except Exception as exc:
            raise self._explain(exc) from None
        return f"{self.destination}: account reachable"

    def upload(self, folder: Path, files: list[LocalFile] | None = None) -> dict:
        files = files if files is not None else local_files(folder)
        chunk = int(self.spec.get("chunk_size_mb", 8) * MB)
        try:
            dbx = self._client()
            uploaded = 0
            for f in files:
                path = self._path(f.rel)
                local_hash = content_hash(f.path)
                if self._matches(dbx, path, f, local_hash):
                    continue
                log.info("uploading %s -> dropbox:%s (%.1f MB)", f.rel, path, f.size / MB)
                retry_call(lambda f=f, path=path: self._put(dbx, f, path, chunk),
                           what=f"{self.destination}: uploading {f.rel}", **self._retry_kwargs)
                if not self._matches(dbx, path, f, local_hash):
                    raise InputError(f"verification failed for dropbox:{path}: size or content hash differs")
                uploaded += 1
        except InputError:
            raise
        except Exception as exc:
            raise self._explain(exc) from exc
        return make_record(self.provider, self.destination, files, uploaded)

    def _put(self, dbx, f: LocalFile, path: str, chunk: int) -> None:
        from dropbox.files import CommitInfo, UploadSessionCursor, WriteMode

        mode = WriteMode.overwrite
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

    def _matches(self, dbx, path: str, f: LocalFile, local_hash: str) -> bool:
        from dropbox.exceptions import ApiError

        def metadata():
            try:
                return dbx.files_get_metadata(path)
            except ApiError as exc:
                if "not_found" in str(getattr(exc, "error", exc)):
                    return None
                raise

        found = retry_call(metadata, what=f"{self.destination}: checking {f.rel}", **self._retry_kwargs)
        return found is not None and getattr(found, "size", None) == f.size and \
            getattr(found, "content_hash", None) == local_hash

    def _explain(self, exc: Exception) -> Exception:
        names = {cls.__name__ for cls in type(exc).__mro__}
        if "AuthError" in names or "BadInputError" in names:
            return InputError(f"{self.destination}: Dropbox rejected the token (token / DROPBOX_TOKEN): {exc}")
        return InputError(f"{self.destination}: Dropbox error: {type(exc).__name__}: {exc}")
