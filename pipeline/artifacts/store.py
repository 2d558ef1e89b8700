"""Objects of one `s3://bucket/prefix` through boto3: list, head, get, put, delete.

The client and the uploads are those of `st publish`'s S3 target (`remote.s3.S3Target`): every object carries the
sha256 of its bytes in its metadata, an upload skips objects already there with the same size and sha256, and every
remote call goes through st's one retry policy (`remote.retry`). Endpoint, region and credentials come from the
standard AWS environment: AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for S3-compatible stores, AWS_REGION /
AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or AWS_PROFILE and
~/.aws/credentials.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..log import get_logger
from ..remote.base import LocalFile
from ..remote.s3 import S3Target, _code
from .location import S3Prefix

log = get_logger("artifacts")

PART_SUFFIX = ".part"  # a download in progress; renamed when its size and sha256 match
_CHUNK = 1 << 20
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})


def environment_spec(where: S3Prefix) -> dict[str, Any]:
    """The S3 target spec of `where`, its endpoint and region from the AWS environment."""
    return {
        "provider": "s3", "bucket": where.bucket, "prefix": where.prefix,
        "endpoint_url": os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    }  # fmt: skip


class ArtifactStore(S3Target):
    """A stage output's prefix on S3: the publish target's uploads, plus the reads and deletes stages need."""

    def __init__(self, where: S3Prefix) -> None:
        super().__init__(environment_spec(where))
        self.where = where
        self._session: tuple[Any, Any] | None = None

    @property
    def session(self) -> tuple[Any, Any]:
        """(client, transfer config), opened on first use (the bucket is checked then)."""
        if self._session is None:
            self._session = self._explained(self._open, "checking the bucket")  # _open retries on its own
        return self._session

    @property
    def client(self) -> Any:
        return self.session[0]

    def _open(self) -> tuple[Any, Any]:  # the upload loop opens a session per call: one client serves them all
        return self._session if self._session is not None else super()._open()

    def url(self, rel: str) -> str:
        return f"{self.where.url}/{rel}"

    def _call(self, fn, doing: str):
        """`fn()` under st's retry policy; a failure becomes a user error that says what was being done."""
        return self._explained(lambda: self._retry(fn, doing), doing)

    def _explained(self, fn, doing: str):
        try:
            return fn()
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - every SDK error is explained (or is ConfigError, passed through)
            raise self._explain(exc, doing) from None

    def listing(self) -> dict[str, int]:
        """Every object under the prefix: its path below the prefix -> size."""
        prefix = f"{self.where.prefix}/" if self.where.prefix else ""

        def list_all() -> dict[str, int]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.where.bucket, Prefix=prefix)
            return {o["Key"][len(prefix):]: int(o["Size"]) for page in pages for o in page.get("Contents", [])}

        return self._call(list_all, "listing the prefix")

    def head(self, rel: str) -> tuple[int, str | None] | None:
        """(size, sha256 from the metadata) of an object, or None when there is none."""
        from botocore.exceptions import ClientError

        def head() -> tuple[int, str | None] | None:
            try:
                found = self.client.head_object(Bucket=self.where.bucket, Key=self.where.key(rel))
            except ClientError as exc:
                if _code(exc) in _NOT_FOUND:
                    return None
                raise
            return int(found["ContentLength"]), found.get("Metadata", {}).get("sha256")

        return self._call(head, f"checking {rel}")

    def get_bytes(self, rel: str) -> bytes | None:
        """A small object's bytes (a manifest, a marker), or None when there is none."""
        from botocore.exceptions import ClientError

        def get() -> bytes | None:
            try:
                return self.client.get_object(Bucket=self.where.bucket, Key=self.where.key(rel))["Body"].read()
            except ClientError as exc:
                if _code(exc) in _NOT_FOUND:
                    return None
                raise

        return self._call(get, f"reading {rel}")

    def download(self, rel: str, dest: Path, *, size: int, sha256: str, what: str = "object") -> None:
        """Fetch an object to `dest`: streamed under a temporary name, hashed on the way, renamed only when its size
        and sha256 are the ones the manifest records (else refused, naming it)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + PART_SUFFIX)

        def fetch() -> tuple[int, str]:
            with open(part, "wb") as handle:
                return self._stream(rel, handle.write)

        try:
            got_size, got_sha = self._call(fetch, f"downloading {rel}")
            if (got_size, got_sha) != (size, sha256):
                raise InputError(f"{what} {self.url(rel)} does not match the manifest that lists it (it has "
                                 f"{got_size} bytes, sha256 {got_sha[:12]}..; the manifest records {size} bytes, "
                                 f"sha256 {sha256[:12]}..): it was changed or damaged after st wrote it; re-run the "
                                 "stage that wrote it")  # fmt: skip
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)

    def _stream(self, rel: str, sink) -> tuple[int, str]:
        """Pass the object's bytes to `sink` chunk by chunk; returns their count and sha256."""
        digest, count = hashlib.sha256(), 0
        body = self.client.get_object(Bucket=self.where.bucket, Key=self.where.key(rel))["Body"]
        while chunk := body.read(_CHUNK):
            digest.update(chunk)
            count += len(chunk)
            sink(chunk)
        return count, digest.hexdigest()

    def digest(self, rel: str) -> tuple[int, str]:
        """(size, sha256) of an object's bytes, read through without keeping them."""
        return self._call(lambda: self._stream(rel, lambda chunk: None), f"reading {rel}")

    def upload_files(self, folder: Path, rels: list[str]) -> dict:
        """Upload these files of `folder` (skipping objects already there with the same size and sha256)."""
        files = [LocalFile(folder / rel, rel, (folder / rel).stat().st_size) for rel in rels]
        return self.upload(folder, files)

    def put_bytes(self, rel: str, data: bytes) -> None:
        sha = hashlib.sha256(data).hexdigest()
        self._call(lambda: self.client.put_object(Bucket=self.where.bucket, Key=self.where.key(rel), Body=data,
                                                  Metadata={"sha256": sha}), f"writing {rel}")  # fmt: skip

    def delete(self, rel: str) -> None:
        self._call(lambda: self.client.delete_object(Bucket=self.where.bucket, Key=self.where.key(rel)),
                   f"deleting {rel}")  # fmt: skip

    def _explain(self, exc: Exception, doing: str = "uploading") -> Exception:
        if _code(exc) in ("NoSuchBucket",):
            endpoint = self.spec.get("endpoint_url") or "AWS S3"
            return InputError(f"{self.where.url}: bucket '{self.where.bucket}' does not exist at {endpoint} "
                              "(AWS_ENDPOINT_URL sets the endpoint); create it or fix the s3:// path")  # fmt: skip
        return super()._explain(exc, doing)


def store_for(where: S3Prefix) -> ArtifactStore:
    """The store of a prefix, one per prefix and endpoint in a process (a boto3 client takes a while to make, and is
    safe to share between threads)."""
    environment = tuple(os.environ.get(name) for name in _CLIENT_ENVIRONMENT)
    return _store(where, environment)


_CLIENT_ENVIRONMENT = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                       "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")  # fmt: skip


@functools.lru_cache(maxsize=32)
def _store(where: S3Prefix, environment: tuple[str | None, ...]) -> ArtifactStore:
    return ArtifactStore(where)
