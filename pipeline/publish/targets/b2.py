"""Backblaze B2 through its native SDK (b2sdk; `pip install b2sdk`).

(SimpleTuner's `backblaze_b2` provider goes through B2's S3 API instead; st maps it to the S3 target.)
Files carry their sha256 in B2's file info; a re-run skips files present with the same size and sha256. b2sdk
splits large files into parts itself and retries individual parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ...errors import ConfigError, InputError
from .base import (
    MB, STR, LocalFile, from_env, join_key, local_files, log, make_record, normalise_entry, require_key, require_sdk,
)
from .retry import retry_call

SCHEMA = {
    "bucket": (STR, ("bucket_name",)),
    "prefix": (STR, ("base_path", "path")),
    "application_key_id": (STR, ("key_id", "b2_application_key_id", "account_id")),
    "application_key": (STR, ("b2_application_key", "key")),
    "realm": (STR, ()),
}
KEY_ID_ENV = ("B2_APPLICATION_KEY_ID",)
KEY_ENV = ("B2_APPLICATION_KEY",)


def validate(entry: dict, where: str, provider: str) -> dict:
    """Check a `b2` entry offline (bucket and credentials present)."""
    spec = normalise_entry(entry, where, provider, SCHEMA)
    require_key(spec, "bucket", where, "the bucket name")
    if not from_env(spec, "application_key_id", KEY_ID_ENV) or not from_env(spec, "application_key", KEY_ENV):
        raise ConfigError(f"{where}: provider 'b2' needs credentials: set application_key_id and application_key "
                          "in publishing_config, or the B2_APPLICATION_KEY_ID and B2_APPLICATION_KEY environment "
                          "variables")
    spec["prefix"] = spec.get("prefix", "").strip("/")
    return spec


class B2Target:
    """Uploads a folder under `b2://bucket/prefix/`."""

    def __init__(self, spec: dict, *, sleep: Callable[[float], None] | None = None):
        require_sdk("b2sdk", "b2sdk", "b2")
        self.spec = spec
        self.provider = "b2"
        self.bucket_name = spec["bucket"]
        self.prefix = spec.get("prefix", "")
        self._retry_kwargs = {"sleep": sleep} if sleep else {}

    @property
    def destination(self) -> str:
        return f"b2://{self.bucket_name}/{self.prefix}".rstrip("/")

    def __repr__(self) -> str:
        return f"B2Target({self.destination!r})"

    def _bucket(self):
        from b2sdk.v2 import B2Api, InMemoryAccountInfo

        api = B2Api(InMemoryAccountInfo())
        key_id = from_env(self.spec, "application_key_id", KEY_ID_ENV)
        key = from_env(self.spec, "application_key", KEY_ENV)
        retry_call(lambda: api.authorize_account(self.spec.get("realm", "production"), key_id, key),
                   what=f"{self.destination}: authorising", **self._retry_kwargs)
        return retry_call(lambda: api.get_bucket_by_name(self.bucket_name), what=f"{self.destination}: bucket",
                          **self._retry_kwargs)

    def check(self) -> str:
        try:
            self._bucket()
        except Exception as exc:
            raise self._explain(exc) from None
        return f"{self.destination}: bucket reachable"

    def upload(self, folder: Path, files: list[LocalFile] | None = None) -> dict:
        files = files if files is not None else local_files(folder)
        try:
            bucket = self._bucket()
            uploaded = 0
            for f in files:
                name = join_key(self.prefix, f.rel)
                if self._matches(bucket, name, f):
                    continue
                log.info("uploading %s -> b2://%s/%s (%.1f MB)", f.rel, self.bucket_name, name, f.size / MB)
                retry_call(lambda f=f, name=name: bucket.upload_local_file(
                    local_file=str(f.path), file_name=name, file_info={"sha256": f.sha256},
                ), what=f"{self.destination}: uploading {f.rel}", **self._retry_kwargs)
                if not self._matches(bucket, name, f):
                    raise InputError(f"verification failed for b2://{self.bucket_name}/{name}: size or sha256 differs")
                uploaded += 1
        except InputError:
            raise
        except Exception as exc:
            raise self._explain(exc) from exc
        return make_record(self.provider, self.destination, files, uploaded)

    def _matches(self, bucket, name: str, f: LocalFile) -> bool:
        from b2sdk.v2.exception import FileNotPresent

        def info():
            try:
                return bucket.get_file_info_by_name(name)
            except FileNotPresent:
                return None

        version = retry_call(info, what=f"{self.destination}: checking {name}", **self._retry_kwargs)
        if version is None:
            return False
        size = getattr(version, "size", None)
        if size is None:
            size = getattr(version, "content_length", None)
        return size == f.size and (getattr(version, "file_info", None) or {}).get("sha256") == f.sha256

    def _explain(self, exc: Exception) -> Exception:
        names = {cls.__name__ for cls in type(exc).__mro__}
        if names & {"NonExistentBucket", "BucketIdNotFound"}:
            return InputError(f"{self.destination}: bucket '{self.bucket_name}' does not exist")
        if names & {"InvalidAuthToken", "Unauthorized", "AccessDenied", "BadUserAuth"}:
            return InputError(f"{self.destination}: B2 rejected the credentials (application_key_id / "
                              "application_key or B2_APPLICATION_KEY_ID / B2_APPLICATION_KEY)")
        return InputError(f"{self.destination}: B2 error: {type(exc).__name__}: {exc}")
