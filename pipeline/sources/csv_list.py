"""Reading a `type: csv` dataset: a CSV file of image URLs (`csv_url_column`, default `url`) and captions
(`csv_caption_column`).

Each URL becomes `<sha256 of the URL, 16 hex>.<ext>` in the dataset's view (the extension from the URL, else from the
bytes), so names survive reordering the list. A URL's address is the URL itself: its bytes are downloaded once and
kept by their hash; a URL that fails (HTTP 404, a timeout after the retries, bytes over the size limit) is skipped
with its reason.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterable

from ..errors import InputError
from .spec import CsvSource
from .store import MAX_DOWNLOAD_BYTES, Failure, RemoteObject

TIMEOUT_S = 60


class HttpStatusError(Exception):
    """An HTTP error status; `status_code` lets the retry policy tell 5xx/429 (retried) from 4xx (not)."""

    def __init__(self, status_code: int, url: str, reason: str) -> None:
        super().__init__(f"HTTP {status_code} {reason} for {url}")
        self.status_code = status_code


def fetch_url(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "st-prepare"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise HttpStatusError(exc.code, url, str(exc.reason)) from None
    except urllib.error.URLError as exc:
        raise ConnectionError(f"{url}: {exc.reason}") from None
    return data


def _name(url: str, wanted: set[str]) -> tuple[str, bool]:
    """The view name of a URL, and whether its extension must come from the bytes."""
    ext = os.path.splitext(urllib.parse.urlparse(url).path)[1].lower()
    stem = hashlib.sha256(url.encode()).hexdigest()[:16]
    return (stem + ext, False) if ext in wanted else (stem, True)


def list_urls(source: CsvSource, extensions: Iterable[str], with_captions: bool
              ) -> tuple[list[RemoteObject], list[Failure], dict[str, Any]]:  # fmt: skip
    """One object per distinct URL; also what the manifest records about the list."""
    if not source.csv_file.is_file():
        raise InputError(f"csv_file {source.csv_file} does not exist; point csv_file at the CSV of image URLs")
    with open(source.csv_file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        needed = [source.url_column] + ([source.caption_column] if with_captions else [])
        if with_captions and not source.caption_column:
            raise InputError(f"{source.csv_file}: caption_strategy 'csv' needs csv_caption_column (the column of "
                             "captions)")
        missing = [c for c in needed if c not in columns]
        if missing:
            raise InputError(f"{source.csv_file} has no column '{missing[0]}' (its columns: {', '.join(columns)}); "
                             "set csv_url_column / csv_caption_column")  # fmt: skip
        rows = list(reader)
    wanted = {e.lower() for e in extensions}
    objects, failures, seen = [], [], set()
    for row in rows:
        url = (row.get(source.url_column) or "").strip()
        if not url or url in seen:
            continue
        seen.add(url)
        name, by_content = _name(url, wanted)
        if urllib.parse.urlparse(url).scheme not in ("http", "https"):
            failures.append(Failure(name, "download_failed", f"{url} is not an http(s) URL"))
            continue
        caption = (row.get(source.caption_column) or "").strip() if with_captions else None
        objects.append(RemoteObject(name, f"url:{url}", functools.partial(fetch_url, url), name_by_content=by_content,
                                    captions=((caption,) if caption else ()) if with_captions else None))  # fmt: skip
    digest = hashlib.sha256(source.csv_file.read_bytes()).hexdigest()
    return objects, failures, {"csv_sha256": digest, "urls": len(seen)}
