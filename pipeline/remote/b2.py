"""Backblaze B2 through its native SDK (b2sdk; `pip install b2sdk`).

(SimpleTuner's `backblaze_b2` provider goes through B2's S3 API instead; st maps it to the S3 target.)
Files carry their sha256 in B2's file info; a re-run skips files present with the same size and sha256. b2sdk
splits large files into parts itself and retries every request itself (it has no switch to turn that off), so st adds
no retries of its own here.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ConfigError, InputError
from .base import STR, LocalFile, StorageTarget, from_env, join_key, normalise_entry, require_key

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


class B2Target(StorageTarget):
    """Uploads a folder under `b2://bucket/prefix/`."""

    scheme = "b2"
    sdk = ("b2sdk", "b2sdk")

    def _retry(self, fn: Callable[[], Any], what: str) -> Any:
        """b2sdk retries every request itself and has no switch to turn that off: st adds no retries of its own."""
        return fn()

    def _open(self):
        from b2sdk.v2 import B2Api, InMemoryAccountInfo

        api = B2Api(InMemoryAccountInfo())
        key_id = from_env(self.spec, "application_key_id", KEY_ID_ENV)
        key = from_env(self.spec, "application_key", KEY_ENV)
        api.authorize_account(self.spec.get("realm", "production"), key_id, key)
        return api.get_bucket_by_name(self.location)

    _probe = _open

    def _put(self, bucket, f: LocalFile) -> None:
        bucket.upload_local_file(local_file=str(f.path), file_name=join_key(self.prefix, f.rel),
                                 file_info={"sha256": f.sha256})

    def _remote(self, bucket, f: LocalFile) -> tuple[int, str] | None:
        from b2sdk.v2.exception import FileNotPresent

        try:
            version = bucket.get_file_info_by_name(join_key(self.prefix, f.rel))
        except FileNotPresent:
            return None
        size = getattr(version, "size", None)
        if size is None:
            size = getattr(version, "content_length", None)
        return size, (getattr(version, "file_info", None) or {}).get("sha256")

    def _explain(self, exc: Exception) -> Exception:
        names = {cls.__name__ for cls in type(exc).__mro__}
        if names & {"NonExistentBucket", "BucketIdNotFound"}:
            return InputError(f"{self.destination}: bucket '{self.location}' does not exist")
        if names & {"InvalidAuthToken", "Unauthorized", "AccessDenied", "BadUserAuth"}:
            return InputError(f"{self.destination}: B2 rejected the credentials (application_key_id / "
                              "application_key or B2_APPLICATION_KEY_ID / B2_APPLICATION_KEY)")
        return InputError(f"{self.destination}: B2 error: {type(exc).__name__}: {exc}")
