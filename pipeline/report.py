"""Plain-text tables for the terminal."""

from __future__ import annotations

from typing import Any, Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; columns listed in `right` are right-aligned (numbers)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def bucket_table(manifest: dict[str, Any]) -> str:
    """Buckets of a prepare manifest: one row per (dataset, bucket), with a total."""
    rows = []
    for dataset in manifest["datasets"]:
        for bucket, count in dataset["buckets"].items():
            width, height = bucket.split("x")
            raised = dataset.get("repeats_raised", {}).get(bucket)
            repeats = raised if raised is not None else dataset["repeats"]
            rows.append([dataset["id"], bucket, f"{int(width) / int(height):.2f}", count, repeats])
    rows.append(["total", f"{len(manifest['buckets'])} buckets", "", manifest["stats"]["samples"], ""])
    return format_table(["dataset", "bucket", "aspect", "samples", "repeats"], rows, right=(2, 3, 4))


def skipped_summary(manifest: dict[str, Any]) -> str:
    skipped = manifest["stats"].get("skipped", {})
    if not skipped:
        return "skipped: none"
    return "skipped: " + ", ".join(f"{reason} {count}" for reason, count in skipped.items())


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def cache_table(manifest: dict[str, Any]) -> str:
    """Shards of a cache manifest per (dataset, bucket), with sizes."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for shard in manifest["shards"]:
        groups.setdefault((shard["dataset_id"], shard["bucket"]), []).append(shard)
    rows = []
    for (dataset, bucket), shards in sorted(groups.items()):
        samples = sum(s["samples"] for s in shards)
        size = sum(s["bytes"] for s in shards)
        rows.append([dataset, bucket, len(shards), samples, _size(size), _size(size // max(samples, 1))])
    total = sum(s["bytes"] for s in manifest["shards"])
    rows.append(["total", f"{len(groups)} groups", len(manifest["shards"]), manifest["stats"]["samples"], _size(total), ""])
    table = format_table(["dataset", "bucket", "shards", "samples", "bytes", "per sample"], rows, right=(2, 3, 4, 5))
    skipped = manifest["stats"].get("skipped") or {}
    note = "skipped: " + (", ".join(f"{k} {v}" for k, v in skipped.items()) if skipped else "none")
    return f"{table}\n{note}"
