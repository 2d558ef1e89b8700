"""Listing and reading a `type: aws` dataset through boto3, with SimpleTuner's `aws_*` keys.

An object's address is its ETag and size: a re-run lists the prefix (one request per 1000 keys) and downloads only
objects whose ETag or size changed. A single-part ETag is the MD5 of the bytes and is checked after the download.
Credentials come from the entry or boto3's usual chain (environment, profile); they are never logged or recorded.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable

from ..errors import ConfigError, InputError
from .spec import S3Source
from .store import Failure, RemoteObject

KEYS_FOLDER = ".keys"  # where named keys (a caption parquet) land in the view: hidden, so never walked as images
_AUTH_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"})


def client(source: S3Source) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    session = boto3.session.Session(aws_access_key_id=source.access_key_id,
                                    aws_secret_access_key=source.secret_access_key,
                                    aws_session_token=source.session_token)  # fmt: skip
    if session.get_credentials() is None:
        raise ConfigError(f"no AWS credentials for s3://{source.bucket}: set aws_access_key_id and "
                          "aws_secret_access_key in the dataset entry, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                          "(or AWS_PROFILE) in the environment")  # fmt: skip
    options: dict[str, Any] = {
        "connect_timeout": 10, "read_timeout": 120, "max_pool_connections": source.max_pool_connections,
        "retries": {"total_max_attempts": 1, "mode": "standard"},  # retries are st's own (remote/retry.py)
    }  # fmt: skip
    if source.endpoint_url:  # S3-compatible stores often reject the CRC checksums newer botocore sends
        options |= {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
    region = source.region_name if source.region_name not in (None, "", "auto") else None
    return session.client("s3", endpoint_url=source.endpoint_url, region_name=region or "us-east-1",
                          config=BotoConfig(**options))  # fmt: skip


def _read(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _object(s3: Any, bucket: str, key: str, rel: str, etag: str, size: int) -> RemoteObject:
    etag = etag.strip('"')
    md5 = etag.lower() if len(etag) == 32 and "-" not in etag else None
    return RemoteObject(rel, f"etag:{etag}:{size}", functools.partial(_read, s3, bucket, key), size=size, md5=md5)


def list_objects(source: S3Source, extensions: Iterable[str], extra_keys: Iterable[str] = ()
                 ) -> tuple[list[RemoteObject], list[Failure]]:  # fmt: skip
    """The objects under the prefix whose suffix is in `extensions` (hidden names left out, as for a folder), and
    each of `extra_keys` (anywhere in the bucket) as `KEYS_FOLDER/<key>`."""
    from ..remote.retry import retry_call

    s3 = client(source)
    wanted = {e.lower() for e in extensions}
    prefix = f"{source.prefix}/" if source.prefix else ""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=source.bucket, Prefix=prefix)
    try:
        listed = retry_call(lambda: [item for page in pages for item in page.get("Contents", ())],
                            what=f"listing s3://{source.bucket}/{prefix}")  # fmt: skip
    except Exception as exc:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        hint = "check the credentials" if code in _AUTH_CODES else "check aws_bucket_name and aws_endpoint_url"
        raise InputError(f"cannot list s3://{source.bucket}/{prefix} ({type(exc).__name__}: {exc}); {hint}") from None
    objects = []
    for item in listed:
        key = item["Key"]
        rel = key[len(prefix):]
        if rel.endswith("/") or any(part.startswith(".") for part in rel.split("/")):
            continue
        if os.path.splitext(rel)[1].lower() not in wanted:
            continue
        objects.append(_object(s3, source.bucket, key, rel, str(item.get("ETag", "")), int(item["Size"])))
    failures = []
    for key in extra_keys:
        rel = f"{KEYS_FOLDER}/{key}"
        try:
            head = retry_call(lambda: s3.head_object(Bucket=source.bucket, Key=key), what=f"s3://{source.bucket}/{key}")
        except Exception as exc:  # reported by the caller, which knows what the key is for
            failures.append(Failure(rel, "download_failed", f"s3://{source.bucket}/{key}: {type(exc).__name__}: {exc}"))
            continue
        objects.append(_object(s3, source.bucket, key, rel, str(head.get("ETag", "")), int(head["ContentLength"])))
    return objects, failures
