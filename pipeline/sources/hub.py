"""Reading a `type: huggingface` dataset through the `datasets` library.

`dataset_name` is a hub id (downloaded into datasets' own cache, `cache_dir` when the entry sets one) or a local
folder: one written by `Dataset.save_to_disk`, or any folder `datasets.load_dataset` reads (imagefolder, parquet).
Each row's image becomes `<row>.<ext>` in the dataset's view (the extension of the file name the cell records, else of
the bytes); its address is the dataset's fingerprint and the row, so
an unchanged dataset is not extracted again. Captions come from `caption_column` (one column, a list of columns, or a
dotted path into a nested column), else `fallback_caption_column`.

A video dataset (asked for with video file extensions) reads its `video_column` ("video", SimpleTuner's default)
instead of the image column: each row's video becomes `<row>.<ext>` the same way, the extension taken from the cell's
file name, else from the container's signature in its first bytes.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import InputError, NotSupportedError
from .spec import HubSource
from .store import Failure, RemoteObject

DEFAULT_CAPTION_COLUMN = "caption"
DEFAULT_VIDEO_COLUMN = "video"
_VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})


def load(source: HubSource) -> Any:
    try:
        import datasets
    except ImportError:
        raise NotSupportedError("`type: huggingface` datasets need the datasets package: pip install datasets") from None
    local = Path(source.dataset_name).expanduser()
    try:
        if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if source.split not in loaded:
                    raise InputError(f"{local} has no split '{source.split}' (it has {', '.join(loaded)}); set split")
                loaded = loaded[source.split]
            return loaded
        return datasets.load_dataset(str(local) if local.is_dir() else source.dataset_name, split=source.split,
                                     revision=source.revision, cache_dir=source.cache_dir)  # fmt: skip
    except InputError:
        raise
    except Exception as exc:  # the library raises many types for a missing dataset, split or network
        raise InputError(f"cannot load Hugging Face dataset '{source.dataset_name}' (split '{source.split}'): "
                         f"{type(exc).__name__}: {exc}") from None


def _nested(row: dict[str, Any], column: str) -> Any:
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _texts(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [str(v).strip() for v in items if v is not None and str(v).strip()]


def row_captions(row: dict[str, Any], source: HubSource) -> tuple[str, ...]:
    found = [c for column in source.caption_columns or (DEFAULT_CAPTION_COLUMN,) for c in _texts(_nested(row, column))]
    if not found and source.fallback_caption_column:
        found = _texts(_nested(row, source.fallback_caption_column))
    return tuple(found)


def _image_bytes(column: Any, row: int) -> bytes:
    """The image of one row: inline bytes, or the file an Image feature points at."""
    value = column[row].as_py()
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"]).read_bytes()
        raise ValueError("the image cell holds neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return Path(value).read_bytes()
    raise ValueError(f"the image cell holds {type(value).__name__}, not image bytes")


def video_suffix(data: bytes) -> str:
    """A video container's file extension by its signature ('' when none matches)."""
    if data[4:8] == b"ftyp":
        return ".mov" if data[8:12] == b"qt  " else ".mp4"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return ".mkv" if b"matroska" in data[:64] else ".webm"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return ".avi"
    return ""


def _media_column(source: HubSource, wanted: set[str]) -> tuple[str, str]:
    """The column holding each row's file and the key that names it: the video column when videos are wanted."""
    if wanted & _VIDEO_SUFFIXES:
        return getattr(source, "video_column", None) or DEFAULT_VIDEO_COLUMN, "video_column"
    return source.image_column, "image_column"


def _video_ext(column: Any, row: int) -> str:
    """The extension of a video cell that records no usable file name, by its container's signature."""
    try:
        ext = video_suffix(_image_bytes(column, row)[:64])
    except (OSError, ValueError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    if not ext:
        raise ValueError("the cell holds no MP4, MOV, Matroska/WebM or AVI container (by its first bytes)")
    return ext


def _paths(column: Any) -> list[str | None]:
    """The file name each image cell records (Image features keep one), read without touching the bytes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_struct(kind) and kind.get_field_index("path") >= 0:
        return pc.struct_field(column, "path").to_pylist()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column.to_pylist()
    return [None] * len(column)


def list_rows(source: HubSource, extensions: Iterable[str], with_captions: bool
              ) -> tuple[list[RemoteObject], list[Failure], dict[str, Any]]:  # fmt: skip
    """One object per row; also what the manifest records about the dataset (its fingerprint, its rows)."""
    dataset = load(source)
    wanted = {e.lower() for e in extensions}
    name, key = _media_column(source, wanted)
    if name not in dataset.column_names:
        kind = key.split("_")[0]
        raise InputError(f"Hugging Face dataset '{source.dataset_name}' has no {kind} column '{name}' "
                         f"(its columns: {', '.join(dataset.column_names)}); set {key}")  # fmt: skip
    fingerprint = dataset._fingerprint
    if dataset._indices is not None:
        dataset = dataset.flatten_indices()
    column = dataset.data.column(name)
    caption_names = sorted({c.split(".")[0] for c in (*(source.caption_columns or (DEFAULT_CAPTION_COLUMN,)),
                                                      *filter(None, [source.fallback_caption_column]))})  # fmt: skip
    if with_captions:
        missing = [c for c in caption_names if c not in dataset.column_names]
        if missing:
            raise InputError(f"Hugging Face dataset '{source.dataset_name}' has no caption column '{missing[0]}' "
                             f"(its columns: {', '.join(dataset.column_names)}); set caption_column")  # fmt: skip
        rows = dataset.select_columns(caption_names).to_list()
    width = max(6, len(str(len(dataset))))
    objects, failures = [], []
    for row, path in enumerate(_paths(column)):
        ext = os.path.splitext(path)[1].lower() if isinstance(path, str) else ""
        if ext not in wanted and key == "video_column":
            try:
                ext = _video_ext(column, row)
            except ValueError as exc:
                failures.append(Failure(f"{row:0{width}d}", "not_a_video", f"row {row}: {exc}"))
                continue
        objects.append(RemoteObject(f"{row:0{width}d}{ext if ext in wanted else ''}", f"{fingerprint}:{row}",
                                    functools.partial(_image_bytes, column, row), name_by_content=ext not in wanted,
                                    captions=row_captions(rows[row], source) if with_captions else None))  # fmt: skip
    return objects, failures, {"fingerprint": fingerprint, "rows": len(dataset)}
