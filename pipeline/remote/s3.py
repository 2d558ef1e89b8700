"""S3 and S3-compatible stores (MinIO, R2, Backblaze B2's S3 API, ...) through boto3.

Large files go up as multipart uploads (boto3's TransferConfig). Every object carries the sha256 of its bytes in its
metadata (`x-amz-meta-sha256`), so a re-run skips the objects already present with the same size and sha256 and only
uploads what is missing or changed (resumable per object). After uploading, each object is verified with a HEAD
(ContentLength and metadata sha256 equal to the local file) and the prefix is listed to check that all are there.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, InputError
from .base import (
    MB, POSITIVE, POSITIVE_INT, STR, LocalFile, StorageTarget, join_key, normalise_entry, require_key, require_sdk,
)

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


class S3Target(StorageTarget):
    """Uploads a folder under `s3://bucket/prefix/`."""

    scheme = "s3"

    def remote_name(self, f: LocalFile) -> str:
        return f"s3://{self.location}/{join_key(self.prefix, f.rel)}"

    # Client --------------------------------------------------------------------------------------------------------

    def _client(self, *, connect_timeout: float = 10, read_timeout: float = 120):
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
            "retries": {"total_max_attempts": 1, "mode": "standard"},  # retries are st's own (retry.py)
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

    def _probe(self) -> None:
        try:
            self._client(connect_timeout=5, read_timeout=10).head_bucket(Bucket=self.location)
        except Exception as exc:
            raise self._explain(exc, "checking the bucket") from None

    def _open(self):
        client = self._client()
        self._retry(lambda: client.head_bucket(Bucket=self.location), "checking the bucket")
        return client, self._transfer_config()

    def _put(self, session, f: LocalFile) -> None:
        client, transfer = session
        client.upload_file(str(f.path), self.location, join_key(self.prefix, f.rel),
                           ExtraArgs={"Metadata": {"sha256": f.sha256}}, Config=transfer)

    def _remote(self, session, f: LocalFile) -> tuple[int, str] | None:
        from botocore.exceptions import ClientError

        client, _ = session
        try:
            head = client.head_object(Bucket=self.location, Key=join_key(self.prefix, f.rel))
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return head.get("ContentLength"), head.get("Metadata", {}).get("sha256")

    def _listed(self, session) -> set[str]:
        client, _ = session
        prefix = f"{self.prefix}/" if self.prefix else ""

        def list_all() -> set[str]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.location, Prefix=prefix)
            return {obj["Key"] for page in pages for obj in page.get("Contents", [])}

        return self._retry(list_all, "listing the prefix")

    def _record_extra(self) -> dict[str, Any]:
        if self.spec.get("public_base_url"):
            return {"url": join_key(self.spec["public_base_url"].rstrip("/"), self.prefix)}
        return {}

    def _explain(self, exc: Exception, doing: str = "uploading") -> Exception:
        """A clear user error for a failed S3 call (never mentioning credential values)."""
        if isinstance(exc, (ConfigError, InputError)):
            return exc
        code = _code(exc)
        endpoint = self.spec.get("endpoint_url") or "AWS S3"
        if code in _MISSING_BUCKET_CODES:
            return InputError(f"{self.destination}: bucket '{self.location}' does not exist at {endpoint}; create it "
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
