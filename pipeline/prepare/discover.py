"""Finding a dataset's files and probing them: one walk per dataset folder, images probed only when they changed
since the last scan (the index), and what changed, for the stage key and for the log."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..datasets import DatasetSpec
from ..errors import InputError
from ..hashing import sha256_bytes, sha256_file
from ..log import get_logger
from ..progress import progress_bar
from .captions import ParquetCaptionTable
from .index import reusable
from .scan import IMAGE_EXTENSIONS, FileStat, Probe, list_files, probe_files
from .video_probe import VIDEO_EXTENSIONS
from .walk import NotRegularFile, WalkSkip, read_regular_file

log = get_logger("prepare")

CAPTION_SUFFIX = ".txt"


@dataclass
class DatasetFiles:
    spec: DatasetSpec
    images: list[FileStat]
    caption_files: list[FileStat]
    table: ParquetCaptionTable | None = None
    parquet_sha256: str | None = None
    # Entries the walk left out (links leaving the folder, loops, special files, unreadable folders, bad names).
    unlisted: list[WalkSkip] = field(default_factory=list)
    # Caption files the walk refused, by absolute path: their image is skipped as missing_caption with the reason.
    refused_captions: dict[str, WalkSkip] = field(default_factory=dict)
    # Image files left out by the dataset's max_num_samples (`select.cap_samples`).
    capped: int = 0


def relative_path(root: Path, path: str) -> str:
    """`path` relative to `root`, '/'-separated (string slicing: pathlib costs more than the probe itself)."""
    prefix = str(root).rstrip(os.sep) + os.sep
    if not path.startswith(prefix):
        return Path(path).relative_to(root).as_posix()
    rel = path[len(prefix) :]
    return rel if os.sep == "/" else rel.replace(os.sep, "/")


def is_caption(path: str) -> bool:
    return path.lower().endswith(CAPTION_SUFFIX)


def list_dataset(spec: DatasetSpec) -> DatasetFiles:
    """One walk of the dataset folder: images (videos for a video dataset), caption files (textfile strategy) and
    what was left out."""
    wants_captions = spec.caption_strategy == "textfile"
    media = VIDEO_EXTENSIONS if spec.dataset_type == "video" else IMAGE_EXTENSIONS
    listing = list_files(spec.root, media | {CAPTION_SUFFIX} if wants_captions else media)
    images = [f for f in listing.files if not is_caption(f.path)]
    captions = [f for f in listing.files if is_caption(f.path)]
    unlisted = [k for k in listing.skips if not is_caption(k.path)]
    refused = {k.path: k for k in listing.skips if is_caption(k.path)}
    for skip in unlisted:
        log.debug("dataset '%s': left out %s (%s: %s)", spec.id, skip.path, skip.reason, skip.detail)
    if not images:
        unreadable_root = next((k for k in unlisted if k.path == str(spec.root)), None)
        if unreadable_root is not None:
            raise InputError(f"dataset '{spec.id}': cannot read instance_data_dir {spec.root} "
                             f"({unreadable_root.detail})")  # fmt: skip
        wanted = ("videos (" + ", ".join(sorted(VIDEO_EXTENSIONS)) if media is VIDEO_EXTENSIONS
                  else "images (.jpg, .jpeg, .png, .webp, .bmp, .tif, .tiff")  # fmt: skip
        raise InputError(
            f"dataset '{spec.id}': no {wanted}) under {spec.root}"
            + (f"; {len(unlisted)} entr{'y was' if len(unlisted) == 1 else 'ies were'} left out, first "
               f"{unlisted[0].path} ({unlisted[0].reason}: {unlisted[0].detail})" if unlisted else "")
        )  # fmt: skip
    return DatasetFiles(spec, images, captions, unlisted=unlisted, refused_captions=refused)


def discover(specs: list[DatasetSpec]) -> list[DatasetFiles]:
    found = []
    for spec in specs:
        files = list_dataset(spec)
        if spec.caption_strategy == "parquet" and spec.parquet is not None and not spec.only_instance_prompt:
            files.table = ParquetCaptionTable(spec.parquet, spec.id)
            files.parquet_sha256 = sha256_file(spec.parquet.path)
        found.append(files)
    return found


def probe_all(datasets: list[DatasetFiles], index: dict[str, Probe], workers: int | None) -> tuple[dict, dict]:
    """Probe every image and caption file that changed since the index was written."""
    probes: dict[str, Probe] = {}
    todo: list[FileStat] = []
    reused = 0
    for files in datasets:
        for stat in files.images:
            known = index.get(stat.path)
            if reusable(stat, known):
                probes[stat.path] = known
                reused += 1
            else:
                todo.append(stat)
        for stat in files.caption_files:
            known = index.get(stat.path)
            if reusable(stat, known):
                probes[stat.path] = known
            else:
                probes[stat.path] = caption_probe(stat)
    stats = {"reused": reused, "probed": len(todo)}
    if todo:
        log.info("scanning %d image files (%d unchanged since the last scan)", len(todo), stats["reused"])
        with progress_bar(total=len(todo), desc="scan", unit="img") as bar:
            for probe in probe_files(todo, workers, progress=bar.update):
                probes[probe.path] = probe
    return probes, stats


def caption_probe(stat: FileStat) -> Probe:
    """A caption file's hash; an unreadable one gets an error instead (its image is then skipped)."""
    try:
        data = read_regular_file(stat.path)
    except OSError as exc:
        detail = str(exc) if isinstance(exc, NotRegularFile) else f"{type(exc).__name__}: {exc.strerror or exc}"
        return Probe(stat.path, stat.size, stat.mtime_ns, format="caption", error="unreadable", detail=detail)
    return Probe(stat.path, stat.size, stat.mtime_ns, sha256_bytes(data), format="caption")


def dataset_key(files: DatasetFiles, probes: dict[str, Probe]) -> dict[str, Any]:
    root = files.spec.root

    def identity(stat: FileStat) -> list:
        return [relative_path(root, stat.path), probes[stat.path].sha256 or probes[stat.path].error]

    material = {
        "spec": files.spec.describe(),
        "images": [identity(s) for s in files.images],
        "captions": [identity(s) for s in files.caption_files],
        "parquet": files.parquet_sha256,
    }
    left_out = [*files.unlisted, *files.refused_captions.values()]
    if left_out:  # only when there is something, so that the keys of clean datasets stay as they were
        material["unlisted"] = sorted([relative_path(root, k.path), k.reason] for k in left_out)
    return material


def changed_files(datasets: list[DatasetFiles], probes: dict[str, Probe], index: dict[str, Probe]) -> str | None:
    if not index:
        return None
    current = {s.path: probes[s.path].sha256 for files in datasets for s in (*files.images, *files.caption_files)}
    added = sum(1 for p in current if p not in index)
    removed = sum(1 for p in index if p not in current)
    changed = sum(1 for p, sha in current.items() if p in index and index[p].sha256 != sha)
    if not (added or removed or changed):
        return None
    total = added + removed + changed
    return f"{total} file{'s' if total != 1 else ''} changed ({added} added, {changed} modified, {removed} removed)"
