"""The scan index: what the last run learnt about each file, keyed by absolute path.

It lets a re-run recognise unchanged files by (path, size, mtime) instead of re-hashing them. It is a local cache,
not an output: it is not listed in the manifest and not part of any digest, and deleting it only costs a re-scan.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..fsutil import atomic_path
from .scan import FileStat, Probe

INDEX_NAME = ".scan-index.parquet"
_FIELDS = [f.name for f in dataclasses.fields(Probe)]


def load_index(out_dir: Path) -> dict[str, Probe]:
    path = out_dir / INDEX_NAME
    if not path.is_file():
        return {}
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        if table.column_names != _FIELDS:
            return {}
        columns = [table.column(name).to_pylist() for name in _FIELDS]
    except Exception:  # a damaged index is only a lost speed-up
        return {}
    return {row[0]: Probe(*row) for row in zip(*columns)}


def save_index(out_dir: Path, probes: list[Probe]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    probes = sorted(probes, key=lambda p: p.path)
    columns = {name: [getattr(p, name) for p in probes] for name in _FIELDS}
    table = pa.table(columns)
    with atomic_path(out_dir / INDEX_NAME) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def reusable(stat: FileStat, known: Probe | None) -> bool:
    """A file is unchanged when its size and mtime are those recorded; unreadable files are always retried."""
    return (
        known is not None
        and known.size == stat.size
        and known.mtime_ns == stat.mtime_ns
        and known.error != "unreadable"
        and stat.size >= 0
    )
