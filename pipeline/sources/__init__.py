"""Where a dataset's images come from when they are not in a local folder: an S3 prefix (`type: aws`), a Hugging Face
dataset (`type: huggingface`) or a CSV list of URLs (`type: csv`).

`sync_source` brings a remote dataset into the local download store (`store.DownloadStore`): a folder view of
content-addressed bytes that `st prepare` walks and probes like a local dataset and `st cache` reads. Only objects
that are new or changed at the source are downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .spec import REMOTE_TYPES, CsvSource, HubSource, RemoteSource, S3Source, parse_source
from .spec import uses_caption_column
from .store import DownloadStore, Failure, SyncResult

__all__ = ["REMOTE_TYPES", "CsvSource", "DownloadStore", "Failure", "HubSource", "RemoteSource", "S3Source",
           "SyncResult", "parse_source", "uses_caption_column", "sync_source"]  # fmt: skip


def sync_source(source: RemoteSource, dataset_id: str, store_folder: Path, extensions: Iterable[str],
                with_captions: bool, extra_keys: Iterable[str] = (), workers: int = 8
                ) -> tuple[SyncResult, dict[str, Any]]:  # fmt: skip
    """Download what changed and return the dataset's view, and what the prepare manifest records about the source
    (its description, its content address, the download counts; never a credential). `extra_keys`: S3 keys to bring
    along (a caption parquet), found in the view under `s3.KEYS_FOLDER`."""
    store = DownloadStore(store_folder)
    facts: dict[str, Any] = {}
    if isinstance(source, S3Source):
        from .s3 import list_objects

        objects, failures = list_objects(source, extensions, extra_keys)
        workers = source.max_pool_connections
    elif isinstance(source, HubSource):
        from .hub import list_rows

        objects, failures, facts = list_rows(source, extensions, with_captions)
        workers = 1  # rows are read from memory-mapped arrow files: threads would not help
    else:
        from .csv_list import list_urls

        objects, failures, facts = list_urls(source, extensions, with_captions)
    result = store.sync(dataset_id, objects, failures, workers=workers)
    return result, {**source.describe(), **facts, **result.stats}
