"""S3 and S3-compatible stores (MinIO, R2, Backblaze B2's S3 API, ...) through boto3.

Large files go up as multipart uploads (boto3's TransferConfig). Every object carries the sha256 of its bytes in its
metadata (`x-amz-meta-sha256`), so a re-run skips the objects already present with the same size and sha256 and only
uploads what is missing or changed (resumable per object). After uploading, each object is verified with a HEAD
(ContentLength and metadata sha256 equal to the local file) and the prefix is listed to check that all are there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ...errors import ConfigError, InputError
from .base import (
    MB, POSITIVE, POSITIVE_INT, STR, LocalFile, join_key, local_files, log, make_record, normalise_entry,
    require_key, require_sdk,
)
from .retry import retry_call

SCHEMA = {
    "bucket": (STR, ("bucket_name",)),
    "prefix": (STR, ("base_path", "path")),
    "endpoint_url": (STR, ("endpoint",)),
    "region": (STR, ("region_name",)),
    "aws_access_key_id": (STR, ("access_key", "access_key_id")),
    "aws_secret_access_key": (STR, ("secret_key", "secret_access_key")),
    "aws_session_token": (STR, ("session_token",)),
    "profile": (STR, ("aws_profile", "profile_name")),
    "addressing_style": (STR, ()),
    "public_base_url": (STR, ()),
    "multipart_threshold_mb": (POSITIVE, ()),
    "multipart_chunksize_mb": (POSITIVE, ()),
    "max_concurrency": (POSITIVE_INT, ()),
}

CREDENTIALS_HINT = (
    "set aws_access_key_id and aws_secret_access_key in publishing_config, or the AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY environment variables (or AWS_PROFILE / ~/.aws/credentials)"
)
_AUTH_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                         "InvalidToken", "AllAccessDisabled", "403", "401"})
_MISSING_BUCKET_CODES = frozenset({"NoSuchBucket", "404", "NotFound"})


def validate(entry: dict, where: str, provider: str) -> dict:
    """Check an `s3` / `backblaze_b2` entry offline; returns it with canonical keys."""
    spec = normalise_entry(entry, where, provider, SCHEMA)
    require_key(spec, "bucket", where, "the bucket name")
    if provider == "backblaze_b2" and not spec.get("endpoint_url"):
        raise ConfigError(f"{where}: provider 'backblaze_b2' needs 'endpoint_url' (its S3 endpoint, e.g. "
                          "https://s3.us-west-004.backblazeb2.com)")
    if bool(spec.get("aws_access_key_id")) != bool(spec.get("aws_secret_access_key")):
        raise ConfigError(f"{where}: give both aws_access_key_id and aws_secret_access_key, or neither (then they "
                          "come from the environment)")
    if spec.get("addressing_style", "auto") not in ("auto", "path", "virtual"):
        raise ConfigError(f"{where}.addressing_style must be auto, path or virtual")
    if spec.get("multipart_chunksize_mb", 16) < 5:
        raise ConfigError(f"{where}.multipart_chunksize_mb must be at least 5 (S3's smallest part)")
    spec["prefix"] = spec.get("prefix", "").strip("/")
    return spec


class S3Target:
    """Uploads a folder under `s3://bucket/prefix/`."""

    def __init__(self, spec: dict, *, sleep: Callable[[float], None] | None = None):
        self.spec = spec
        self.provider = spec["provider"]
        self.bucket = spec["bucket"]
        self.prefix = spec.get("prefix", "")
        self._retry_kwargs: dict[str, Any] = {"sleep": sleep} if sleep else {}

    @property
    def destination(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def __repr__(self) -> str:  # never show credentials
        return f"S3Target({self.destination!r})"

    # Client --------------------------------------------------------------------------------------------------------

    def _client(self, *, connect_timeout: float = 10, read_timeout: float = 120, attempts: int = 3):
        boto3 = require_sdk("boto3", "boto3", self.provider)
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import ProfileNotFound

        try:
            session = boto3.session.Session(
                aws_access_key_id=self.spec.get("aws_access_key_id"),
                aws_secret_access_key=self.spec.get("aws_secret_access_key"),
                aws_session_token=self.spec.get("aws_session_token"),
                region_name=self.spec.get("region"),
                profile_name=self.spec.get("profile"),
            )
        except ProfileNotFound as exc:
            raise ConfigError(f"{self.destination}: {exc}") from None
        if session.get_credentials() is None:
            raise ConfigError(f"no AWS credentials for {self.destination}: {CREDENTIALS_HINT}")
        options: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "retries": {"max_attempts": attempts, "mode": "standard"},
            "s3": {"addressing_style": self.spec.get("addressing_style", "auto")},
        }
        if self.spec.get("endpoint_url"):
            # S3-compatible stores often reject the CRC checksums newer botocore sends by default.
            options |= {"request_checksum_calculation": "when_required",
                        "response_checksum_validation": "when_required"}
        try:
            config = BotoConfig(**options)
        except TypeError:  # botocore older than 1.36
            options.pop("request_checksum_calculation", None)
            options.pop("response_checksum_validation", None)
            config = BotoConfig(**options)
        return session.client("s3", endpoint_url=self.spec.get("endpoint_url"), config=config)

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=int(self.spec.get("multipart_threshold_mb", 64) * MB),
            multipart_chunksize=int(self.spec.get("multipart_chunksize_mb", 16) * MB),
            max_concurrency=int(self.spec.get("max_concurrency", 8)),
            use_threads=True,
        )

    # Operations ----------------------------------------------------------------------------------------------------

    def check(self) -> str:
        """Pre-flight: credentials present, endpoint reachable, bucket there and accessible (one quick HEAD)."""
        client = self._client(connect_timeout=5, read_timeout=10, attempts=1)
        try:
            client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._explain(exc, "checking the bucket") from None
        return f"{self.destination}: bucket reachable"

    def upload(self, folder: Path, files: list[LocalFile] | None = None) -> dict:
        """Upload every file of `folder`, skipping unchanged objects; verify and list; return the record."""
        files = files if files is not None else local_files(folder)
        client = self._client()
        transfer = self._transfer_config()
        try:
            self._retry(lambda: client.head_bucket(Bucket=self.bucket), "checking the bucket")
            uploaded = 0
            for f in files:
                key = join_key(self.prefix, f.rel)
                if self._matches(client, key, f):
                    log.debug("%s/%s unchanged, skipped", self.destination, f.rel)
                    continue
                log.info("uploading %s -> s3://%s/%s (%.1f MB)", f.rel, self.bucket, key, f.size / MB)
                self._retry(lambda f=f, key=key: client.upload_file(
                    str(f.path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": f.sha256}}, Config=transfer,
                ), f"uploading {f.rel}")
                if not self._matches(client, key, f):
                    raise InputError(f"verification failed for s3://{self.bucket}/{key}: the stored object's size "
                                     "or sha256 differs from the local file")
                uploaded += 1
            listed = self._list(client)
        except InputError:
            raise
        except Exception as exc:
            raise self._explain(exc, "uploading") from exc
        missing = [f.rel for f in files if join_key(self.prefix, f.rel) not in listed]
        if missing:
            raise InputError(f"{self.destination}: uploaded objects missing from the listing: {', '.join(missing)}")
        extra = {"remote_objects": len(listed)}
        if self.spec.get("public_base_url"):
            extra["url"] = join_key(self.spec["public_base_url"].rstrip("/"), self.prefix)
        return make_record(self.provider, self.destination, files, uploaded, **extra)

    def _retry(self, fn, what: str):
        return retry_call(fn, what=f"{self.destination}: {what}", **self._retry_kwargs)

    def _matches(self, client, key: str, f: LocalFile) -> bool:
        """Whether the object exists with the local size and sha256 (HEAD)."""
        from botocore.exceptions import ClientError

        def head():
            try:
                return client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

        head_result = self._retry(head, f"checking {key}")
        if head_result is None or head_result.get("ContentLength") != f.size:
            return False
        return head_result.get("Metadata", {}).get("sha256") == f.sha256

    def _list(self, client) -> set[str]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        keys: set[str] = set()

        def list_all():
            keys.clear()
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys.update(obj["Key"] for obj in page.get("Contents", []))
            return keys

        return self._retry(list_all, "listing the prefix")

    def _explain(self, exc: Exception, doing: str) -> Exception:
        """A clear user error for a failed S3 call (never mentioning credential values)."""
        if isinstance(exc, (ConfigError, InputError)):
            return exc
        code = _code(exc)
        endpoint = self.spec.get("endpoint_url") or "AWS S3"
        if code in _MISSING_BUCKET_CODES:
            return InputError(f"{self.destination}: bucket '{self.bucket}' does not exist at {endpoint}; create it "
                              "or fix 'bucket' in publishing_config")
        if code in _AUTH_CODES:
            return InputError(f"{self.destination}: access denied while {doing} ({code}); check the credentials "
                              f"({CREDENTIALS_HINT}) and the bucket's permissions")
        names = {cls.__name__ for cls in type(exc).__mro__}
        if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"}:
            return InputError(f"{self.destination}: cannot reach {endpoint} while {doing}: {exc}")
        if "NoCredentialsError" in names:
            return ConfigError(f"no AWS credentials for {self.destination}: {CREDENTIALS_HINT}")
        return InputError(f"{self.destination}: S3 error while {doing}: {type(exc).__name__}: {exc}")


def _code(exc: BaseException) -> str:
    """The S3 error code of a ClientError, also when boto3 wrapped it (S3UploadFailedError)."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
        current = current.__cause__ or current.__context__
    return ""
