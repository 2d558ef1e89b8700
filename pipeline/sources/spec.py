"""Where a remote dataset's images come from: SimpleTuner's `type: aws`, `type: huggingface` and `type: csv` entries
of the dataset list, parsed into typed sources.

Each parser takes the entry's own keys out of the entry (so that the generic key check sees only image options) and
checks them offline. `describe()` is what manifests and stage keys record: never a credential.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..errors import ConfigError, NotSupportedError

REMOTE_TYPES = ("aws", "huggingface", "csv")
# Caption strategies SimpleTuner names after the source: the captions come from the source's caption column.
SOURCE_CAPTION_STRATEGIES = {"huggingface": "huggingface", "csv": "csv"}


class _Described:
    """`describe()`: the source's type and its `recorded` fields, JSON-ready (credentials are never among them)."""

    kind: ClassVar[str]
    recorded: ClassVar[tuple[str, ...]]

    def describe(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value

        return {"type": self.kind, **{name: plain(getattr(self, name)) for name in self.recorded}}


@dataclass(frozen=True)
class S3Source(_Described):
    """Images (and `.txt` captions beside them) under `s3://bucket/prefix`."""

    bucket: str
    prefix: str
    endpoint_url: str | None = None
    region_name: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    max_pool_connections: int = 10
    kind: ClassVar[str] = "aws"
    recorded: ClassVar[tuple[str, ...]] = ("bucket", "prefix", "endpoint_url", "region_name")

    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class HubSource(_Described):
    """Rows of a `datasets` dataset: a hub id, or a folder written by `Dataset.save_to_disk`."""

    dataset_name: str
    split: str = "train"
    revision: str | None = None
    image_column: str = "image"
    caption_columns: tuple[str, ...] = ()  # several: each non-empty one is a caption of the row
    fallback_caption_column: str | None = None
    cache_dir: str | None = None
    video_column: str = "video"  # read instead of image_column by a `dataset_type: video` dataset
    kind: ClassVar[str] = "huggingface"
    recorded: ClassVar[tuple[str, ...]] = ("dataset_name", "split", "revision", "image_column", "video_column",
                                           "caption_columns", "fallback_caption_column")  # fmt: skip

    def location(self) -> str:
        return f"Hugging Face dataset {self.dataset_name} (split {self.split})"


@dataclass(frozen=True)
class CsvSource(_Described):
    """A CSV file listing image URLs, with a caption column."""

    csv_file: Path
    url_column: str = "url"
    caption_column: str | None = None
    kind: ClassVar[str] = "csv"
    recorded: ClassVar[tuple[str, ...]] = ("csv_file", "url_column", "caption_column")

    def location(self) -> str:
        return f"the URLs listed in {self.csv_file}"


RemoteSource = S3Source | HubSource | CsvSource

# Keys each type reads that cannot change what is trained (where SimpleTuner keeps its own copies, file naming).
_ACCEPTED = {
    "aws": ("aws_max_pool_connections",),
    "huggingface": ("metadata_backend", "num_proc", "auto_load", "width_column", "height_column", "file_extension"),
    "csv": ("csv_cache_dir", "csv_hash_filenames", "hash_filenames", "csv_shorten_filenames", "shorten_filenames",
            "metadata_backend"),
}  # fmt: skip
_HF_BLOCK_KEYS = ("dataset_name", "split", "revision", "image_column", "caption_column", "fallback_caption_column",
                  "cache_dir", "streaming", "num_proc", "auto_load", "width_column", "height_column", "video_column",
                  "filter_func", "composite_image_config", "description_column", "file_extension")  # fmt: skip


def _text(entry: dict[str, Any], key: str, where: str, default: str | None = None) -> str | None:
    value = entry.pop(key, None)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
    return value


def _flag(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"))


def parse_source(storage: str, entry: dict[str, Any], resolve: Callable[[str], Path], where: str) -> RemoteSource:
    """The source of a `type: aws|huggingface|csv` image entry; its keys are removed from `entry`. `resolve` turns a
    relative file name into a path as the dataset list's other paths are resolved."""
    for key in _ACCEPTED[storage]:
        if key != "aws_max_pool_connections":
            entry.pop(key, None)
    if storage == "aws":
        return _s3_source(entry, where)
    if storage == "huggingface":
        return _hub_source(entry, where)
    return _csv_source(entry, resolve, where)


def _s3_source(entry: dict[str, Any], where: str) -> S3Source:
    bucket = _text(entry, "aws_bucket_name", where)
    if not bucket:
        raise ConfigError(f"{where}: a `type: aws` dataset needs 'aws_bucket_name' (the S3 bucket holding its images)")
    # SimpleTuner reads the prefix from aws_data_prefix, else instance_data_dir.
    prefix = _text(entry, "aws_data_prefix", where) or _text(entry, "instance_data_dir", where) or ""
    entry.pop("instance_data_dir", None)
    pool = entry.pop("aws_max_pool_connections", None)
    try:
        pool = 10 if pool in (None, "") else int(pool)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: aws_max_pool_connections must be a whole number, got {pool!r}") from None
    if pool < 1:
        raise ConfigError(f"{where}: aws_max_pool_connections must be at least 1, got {pool}")
    key_id, secret = _text(entry, "aws_access_key_id", where), _text(entry, "aws_secret_access_key", where)
    if bool(key_id) != bool(secret):
        raise ConfigError(f"{where}: give both aws_access_key_id and aws_secret_access_key, or neither (then they "
                          "come from the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    return S3Source(bucket=bucket, prefix=prefix.strip("/"), endpoint_url=_text(entry, "aws_endpoint_url", where),
                    region_name=_text(entry, "aws_region_name", where), access_key_id=key_id,
                    secret_access_key=secret, session_token=_text(entry, "aws_session_token", where),
                    max_pool_connections=pool)  # fmt: skip


def _columns(value: Any, key: str, where: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{where}: '{key}' must be a column name or a list of column names, got {value!r}")
    return tuple(items)


def _hub_source(entry: dict[str, Any], where: str) -> HubSource:
    block = entry.pop("huggingface", None) or {}
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: 'huggingface' must be an object of Hugging Face dataset settings")
    unknown = [k for k in block if k not in _HF_BLOCK_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key 'huggingface.{unknown[0]}'; it takes {', '.join(_HF_BLOCK_KEYS)}")
    # st measures images itself, names files by their bytes and reads no video: these keys change nothing.
    merged = {k: v for k, v in block.items() if k not in _ACCEPTED["huggingface"]}
    merged |= {k: entry.pop(k) for k in _HF_BLOCK_KEYS if k in entry}
    for key, feature in (("filter_func", "filtering rows of a Hugging Face dataset"),
                         ("composite_image_config", "composite images from several columns"),
                         ("description_column", "a description column added to the captions")):  # fmt: skip
        if merged.get(key):
            raise NotSupportedError(f"{where}: st does not implement `{key}` (a SimpleTuner dataset key) yet: "
                                    f"{feature}; remove it (filter the dataset before training instead)")
    if _flag(merged.get("streaming")):
        raise NotSupportedError(f"{where}: `streaming: true` is not supported (SimpleTuner documents it as not "
                                "functional either): st prepare reads every row once and keeps the image bytes it "
                                "needs; remove `streaming`")  # fmt: skip
    name = _text(merged, "dataset_name", where)
    if not name:
        raise ConfigError(f"{where}: a `type: huggingface` dataset needs 'dataset_name' (a hub id such as "
                          "'user/dataset', or a folder written by datasets' save_to_disk)")
    return HubSource(dataset_name=name, split=_text(merged, "split", where, "train"),
                     revision=_text(merged, "revision", where),
                     image_column=_text(merged, "image_column", where, "image"),
                     video_column=_text(merged, "video_column", where, "video"),
                     caption_columns=_columns(merged.get("caption_column"), "caption_column", where),
                     fallback_caption_column=_text(merged, "fallback_caption_column", where),
                     cache_dir=_text(merged, "cache_dir", where))  # fmt: skip


def _csv_source(entry: dict[str, Any], resolve: Callable[[str], Path], where: str) -> CsvSource:
    csv_file = _text(entry, "csv_file", where)
    if not csv_file:
        raise ConfigError(f"{where}: a `type: csv` dataset needs 'csv_file' (the CSV listing image URLs)")
    entry.pop("instance_data_dir", None)  # SimpleTuner reads csv_cache_dir instead
    return CsvSource(csv_file=resolve(csv_file), url_column=_text(entry, "csv_url_column", where, "url"),
                     caption_column=_text(entry, "csv_caption_column", where))  # fmt: skip


def uses_caption_column(storage: str, strategy: Any, where: str) -> bool:
    """Whether an entry's captions come from its source's caption column: SimpleTuner's `huggingface` / `csv`
    strategies (their default). `instanceprompt` and, for S3, the file strategies are st's own; others are refused."""
    if storage in SOURCE_CAPTION_STRATEGIES and strategy in (None, "", SOURCE_CAPTION_STRATEGIES[storage]):
        return True
    if strategy in SOURCE_CAPTION_STRATEGIES.values():
        raise ConfigError(f"{where}: caption_strategy '{strategy}' is only for `type: {strategy}` datasets")
    if storage in SOURCE_CAPTION_STRATEGIES and strategy != "instanceprompt":
        raise ConfigError(f"{where}: a `type: {storage}` dataset takes caption_strategy "
                          f"'{SOURCE_CAPTION_STRATEGIES[storage]}' (its caption column) or 'instanceprompt', "
                          f"not {strategy!r}")  # fmt: skip
    return False
