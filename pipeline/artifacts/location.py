"""Where a stage reads or writes: a local folder, or `s3://bucket/prefix` on S3 or an S3-compatible store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..hashing import sha256_bytes

S3_SCHEME = "s3://"


@dataclass(frozen=True)
class S3Prefix:
    """`s3://bucket/prefix`: the objects of one stage output, each under `prefix/<its path in the output>`."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def local_name(self) -> str:
        """A folder name for this machine's copy of the prefix (mirrors, staging, shard cache)."""
        return sha256_bytes(self.url.encode())[:20]

    def __str__(self) -> str:
        return self.url

    def __truediv__(self, rel: str) -> str:  # the URL of an object, as `folder / name` is a file's path
        return f"{self.url}/{rel}"

    def resolve(self) -> S3Prefix:  # already absolute, like a resolved path
        return self


def is_remote(value: object) -> bool:
    return isinstance(value, S3Prefix) or (isinstance(value, str) and value.startswith(S3_SCHEME))


def is_remote_path(value: object) -> bool:
    """An `s3://` argument, also as a Path (which turns `s3://` into `s3:/`)."""
    return is_remote(value) or str(value).startswith("s3:/")


def parse_location(value: str | Path, option: str = "--output") -> Path | S3Prefix:
    """A local path, or the S3Prefix of an `s3://bucket/prefix` value."""
    text = str(value)
    if text.startswith("s3:/") and not text.startswith(S3_SCHEME):  # a Path made of an s3:// value lost a slash
        text = S3_SCHEME + text[len("s3:/"):]
    if not text.startswith(S3_SCHEME):
        if "://" in text:
            raise ConfigError(f"{option} {text}: only local paths and s3://bucket/prefix are supported")
        return Path(text)
    bucket, _, prefix = text[len(S3_SCHEME):].partition("/")
    prefix = prefix.strip("/")
    if not bucket or "/" in bucket:
        raise ConfigError(f"{option} {text}: give a bucket, as s3://bucket/prefix")
    if prefix.endswith("manifest.json"):
        prefix = prefix[: -len("manifest.json")].rstrip("/")
    return S3Prefix(bucket, prefix)
