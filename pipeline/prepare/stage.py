"""`st prepare`: image folders + captions -> OUT/samples.parquet, OUT/skipped.jsonl and OUT/manifest.json."""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PREPARE, LoadedConfig
from ..datasets import DatasetSpec, load_datasets
from ..distributed import global_batch
from ..errors import InputError
from ..fsutil import atomic_path, atomic_write_text
from ..hashing import sha256_bytes, sha256_file, sha256_json
from ..log import get_logger
from ..manifest import MANIFEST_NAME, output_entry, provenance
from ..ownership import OutputClaim, claim_output
from ..runner import StageResult, StageRun
from ..progress import progress_bar
from . import buckets as bucketing
from .captions import MissingCaption, ParquetCaptionTable, caption_file_for, captions_for
from .index import INDEX_NAME, load_index, reusable, save_index
from .scan import IMAGE_EXTENSIONS, FileStat, Probe, list_files, probe_files
from .walk import NotRegularFile, WalkSkip, delete_inside, read_regular_file

log = get_logger("prepare")

SCHEMA = "st.prepare/1"
SCHEMA_VERSION = 1
# Bump when the meaning of prepare's outputs changes, so that every existing output is rebuilt.
FORMAT_VERSION = 1
SAMPLES_NAME = "samples.parquet"
SKIPPED_NAME = "skipped.jsonl"
# Config keys that do not enter the key directly: the dataset list enters as resolved specs instead of its path.
CAPTION_SUFFIX = ".txt"
PROBLEMATIC = frozenset({"empty_file", "not_an_image", "corrupt_image", "decompression_bomb"})
UNWANTED = frozenset({"too_small", "aspect_ratio_out_of_range", "upscale_exceeds_threshold"})


@dataclass
class Sample:
    sample_id: str
    dataset_id: str
    path: str
    captions: list[str]
    width: int
    height: int
    plan: bucketing.Plan
    orientation: int
    format: str
    bytes: int
    repeats: int


@dataclass
class Skip:
    dataset_id: str
    path: str
    reason: str
    detail: str

    def as_json(self) -> dict[str, str]:
        return {"dataset_id": self.dataset_id, "path": self.path, "reason": self.reason, "detail": self.detail}


PrepareResult = StageResult


@dataclass
class _DatasetFiles:
    spec: DatasetSpec
    images: list[FileStat]
    caption_files: list[FileStat]
    table: ParquetCaptionTable | None = None
    parquet_sha256: str | None = None
    # Entries the walk left out (links leaving the folder, loops, special files, unreadable folders, bad names).
    unlisted: list[WalkSkip] = field(default_factory=list)
    # Caption files the walk refused, by absolute path: their image is skipped as missing_caption with the reason.
    refused_captions: dict[str, WalkSkip] = field(default_factory=dict)


def _rel(root: Path, path: str) -> str:
    """`path` relative to `root`, '/'-separated (string slicing: pathlib costs more than the probe itself)."""
    prefix = str(root).rstrip(os.sep) + os.sep
    if not path.startswith(prefix):
        return Path(path).relative_to(root).as_posix()
    rel = path[len(prefix) :]
    return rel if os.sep == "/" else rel.replace(os.sep, "/")


def _is_caption(path: str) -> bool:
    return path.lower().endswith(CAPTION_SUFFIX)


def _list_dataset(spec: DatasetSpec) -> _DatasetFiles:
    """One walk of the dataset folder: images, caption files (textfile strategy) and what was left out."""
    wants_captions = spec.caption_strategy == "textfile"
    listing = list_files(spec.root, IMAGE_EXTENSIONS | {CAPTION_SUFFIX} if wants_captions else IMAGE_EXTENSIONS)
    images = [f for f in listing.files if not _is_caption(f.path)]
    captions = [f for f in listing.files if _is_caption(f.path)]
    unlisted = [k for k in listing.skips if not _is_caption(k.path)]
    refused = {k.path: k for k in listing.skips if _is_caption(k.path)}
    for skip in unlisted:
        log.debug("dataset '%s': left out %s (%s: %s)", spec.id, skip.path, skip.reason, skip.detail)
    if not images:
        unreadable_root = next((k for k in unlisted if k.path == str(spec.root)), None)
        if unreadable_root is not None:
            raise InputError(f"dataset '{spec.id}': cannot read instance_data_dir {spec.root} "
                             f"({unreadable_root.detail})")  # fmt: skip
        raise InputError(
            f"dataset '{spec.id}': no images (.jpg, .jpeg, .png, .webp, .bmp, .tif, .tiff) under {spec.root}"
            + (f"; {len(unlisted)} entr{'y was' if len(unlisted) == 1 else 'ies were'} left out, first "
               f"{unlisted[0].path} ({unlisted[0].reason}: {unlisted[0].detail})" if unlisted else "")
        )  # fmt: skip
    return _DatasetFiles(spec, images, captions, unlisted=unlisted, refused_captions=refused)


def _discover(specs: list[DatasetSpec]) -> list[_DatasetFiles]:
    found = []
    for spec in specs:
        files = _list_dataset(spec)
        if spec.caption_strategy == "parquet" and spec.parquet is not None and not spec.only_instance_prompt:
            files.table = ParquetCaptionTable(spec.parquet, spec.id)
            files.parquet_sha256 = sha256_file(spec.parquet.path)
        found.append(files)
    return found


def _probe_all(datasets: list[_DatasetFiles], index: dict[str, Probe], workers: int | None) -> tuple[dict, dict]:
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
                probes[stat.path] = _caption_probe(stat)
    stats = {"reused": reused, "probed": len(todo)}
    if todo:
        log.info("scanning %d image files (%d unchanged since the last scan)", len(todo), stats["reused"])
        with progress_bar(total=len(todo), desc="scan", unit="img") as bar:
            for probe in probe_files(todo, workers, progress=bar.update):
                probes[probe.path] = probe
    return probes, stats


def _caption_probe(stat: FileStat) -> Probe:
    """A caption file's hash; an unreadable one gets an error instead (its image is then skipped)."""
    try:
        data = read_regular_file(stat.path)
    except OSError as exc:
        detail = str(exc) if isinstance(exc, NotRegularFile) else f"{type(exc).__name__}: {exc.strerror or exc}"
        return Probe(stat.path, stat.size, stat.mtime_ns, format="caption", error="unreadable", detail=detail)
    return Probe(stat.path, stat.size, stat.mtime_ns, sha256_bytes(data), format="caption")


def _stage_config(loaded: LoadedConfig) -> dict[str, Any]:
    return loaded.config.stage_keys(PREPARE)


def _key(config: dict[str, Any], datasets: list[_DatasetFiles], probes: dict[str, Probe]) -> str:
    material = {
        "format": FORMAT_VERSION,
        "config": config,
        "datasets": [_dataset_key(files, probes) for files in datasets],
    }
    return sha256_json(material)


def _dataset_key(files: _DatasetFiles, probes: dict[str, Probe]) -> dict[str, Any]:
    root = files.spec.root
    material = {
        "spec": files.spec.describe(),
        "images": [[_rel(root, s.path), probes[s.path].sha256 or probes[s.path].error] for s in files.images],
        "captions": [[_rel(root, s.path), probes[s.path].sha256 or probes[s.path].error] for s in files.caption_files],
        "parquet": files.parquet_sha256,
    }
    left_out = [*files.unlisted, *files.refused_captions.values()]
    if left_out:  # only when there is something, so that the keys of clean datasets stay as they were
        material["unlisted"] = sorted([_rel(root, k.path), k.reason] for k in left_out)
    return material


def _changed_files(datasets: list[_DatasetFiles], probes: dict[str, Probe], index: dict[str, Probe]) -> str | None:
    if not index:
        return None
    current = {p: probes[p].sha256 for files in datasets for s in (*files.images, *files.caption_files) for p in [s.path]}
    added = sum(1 for p in current if p not in index)
    removed = sum(1 for p in index if p not in current)
    changed = sum(1 for p, sha in current.items() if p in index and index[p].sha256 != sha)
    if not (added or removed or changed):
        return None
    total = added + removed + changed
    return f"{total} file{'s' if total != 1 else ''} changed ({added} added, {changed} modified, {removed} removed)"


def _select(
    datasets: list[_DatasetFiles], probes: dict[str, Probe], alignment: int, rounding: int, seed: int
) -> tuple[list[Sample], list[Skip]]:
    samples: list[Sample] = []
    skips: list[Skip] = []
    seen: dict[str, tuple[str, str]] = {}
    for files in datasets:
        spec = files.spec
        skips.extend(Skip(spec.id, _rel(spec.root, k.path), k.reason, k.detail) for k in files.unlisted)
        for stat in files.images:
            probe = probes[stat.path]
            rel = _rel(spec.root, stat.path)
            if probe.error:
                skips.append(Skip(spec.id, rel, probe.error, probe.detail))
                continue
            if probe.sha256 in seen:
                first_ds, first_path = seen[probe.sha256]
                skips.append(Skip(spec.id, rel, "duplicate", f"same bytes as {first_path} in dataset '{first_ds}'"))
                continue
            try:
                _check_caption_file(files, probes, stat.path)
                captions = captions_for(spec, rel, stat.path, files.table)
            except MissingCaption as exc:
                skips.append(Skip(spec.id, rel, "missing_caption", str(exc)))
                continue
            try:
                plan = bucketing.plan(
                    probe.width, probe.height, spec, alignment=alignment, rounding=rounding, seed=seed,
                    sample_id=probe.sha256,
                )  # fmt: skip
            except bucketing.Rejected as exc:
                skips.append(Skip(spec.id, rel, exc.reason, exc.detail))
                continue
            seen[probe.sha256] = (spec.id, rel)
            samples.append(
                Sample(
                    probe.sha256, spec.id, rel, captions, probe.width, probe.height, plan, probe.orientation,
                    probe.format, probe.size, spec.repeats,
                )  # fmt: skip
            )
    return samples, skips


def _check_caption_file(files: _DatasetFiles, probes: dict[str, Probe], image_path: str) -> None:
    """Raise MissingCaption when the image's caption file was refused by the walk or could not be read."""
    if files.spec.caption_strategy != "textfile" or files.spec.only_instance_prompt:
        return
    path = caption_file_for(image_path)
    name = os.path.basename(path)
    refused = files.refused_captions.get(path)
    if refused is not None:
        raise MissingCaption(f"caption file {name} was left out ({refused.reason}: {refused.detail})")
    probe = probes.get(path)
    if probe is not None and probe.error:
        raise MissingCaption(f"caption file {name} cannot be read ({probe.detail})")


def _batch_size(config) -> int:
    """Samples per optimizer step of the training run (`st train` checks num_processes against its launch)."""
    return global_batch(config.train_batch_size, config.num_processes, config.gradient_accumulation_steps)


def _prune(samples: list[Sample], specs: list[DatasetSpec], loaded: LoadedConfig) -> tuple[list[Sample], list[Skip], dict]:
    """Drop (or, with allow_dataset_oversubscription, repeat) buckets too small for one batch."""
    config = loaded.config
    batch = _batch_size(config)
    by_bucket: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in samples:
        by_bucket[(s.dataset_id, s.plan.bucket)].append(s)
    spec_by_id = {s.id: s for s in specs}
    kept: list[Sample] = []
    skips: list[Skip] = []
    raised: dict[str, dict[str, int]] = defaultdict(dict)
    for (dataset_id, bucket), members in by_bucket.items():
        spec = spec_by_id[dataset_id]
        effective = len(members) * (spec.repeats + 1)
        if effective >= batch or config.disable_bucket_pruning:
            kept.extend(members)
            continue
        if config.allow_dataset_oversubscription and not spec.repeats_explicit:
            repeats = math.ceil(batch / len(members)) - 1
            for s in members:
                s.repeats = repeats
            raised[dataset_id][bucket] = repeats
            log.info(
                "dataset '%s': bucket %s has %d image(s), fewer than a batch of %d; repeats raised to %d",
                dataset_id, bucket, len(members), batch, repeats,
            )  # fmt: skip
            kept.extend(members)
            continue
        for s in members:
            skips.append(
                Skip(dataset_id, s.path, "bucket_pruned",
                     f"bucket {bucket} has {effective} sample(s) with repeats, fewer than one batch of {batch}")
            )  # fmt: skip
    order = {(s.dataset_id, s.path): i for i, s in enumerate(samples)}
    kept.sort(key=lambda s: order[(s.dataset_id, s.path)])
    if not kept and samples:
        sizes = Counter(s.plan.bucket for s in samples)
        listing = ", ".join(f"{b}: {n}" for b, n in sorted(sizes.items()))
        raise InputError(
            f"no bucket holds enough images for one batch of {batch} (train_batch_size {config.train_batch_size} x "
            f"num_processes {config.num_processes} x gradient_accumulation_steps {config.gradient_accumulation_steps}); "
            f"images per bucket: {listing}. Lower train_batch_size, set allow_dataset_oversubscription = true, "
            "raise repeats, or use crop = true with crop_aspect = \"square\" to gather images into fewer buckets"
        )
    return kept, skips, dict(raised)


def _delete_files(skips: list[Skip], specs: list[DatasetSpec], config) -> int:
    roots = {s.id: s.root for s in specs}
    doomed = set()
    if config.delete_problematic_images:
        doomed |= PROBLEMATIC
    if config.delete_unwanted_images:
        doomed |= UNWANTED
    deleted = 0
    for skip in skips:
        if skip.reason in doomed:
            # Only a regular file whose folder resolves inside the dataset folder: never a link, never outside.
            try:
                path = delete_inside(roots[skip.dataset_id], skip.path)
                deleted += 1
                log.warning("deleted %s (%s) because delete_%s_images is set", path, skip.reason,
                            "problematic" if skip.reason in PROBLEMATIC else "unwanted")  # fmt: skip
            except OSError as exc:
                log.warning("left %s/%s in place: %s", skip.dataset_id, skip.path, exc)
    return deleted


def _write_samples(path: Path, samples: list[Sample]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    int32 = pa.int32()
    schema = pa.schema(
        [
            ("sample_id", pa.string()), ("dataset_id", pa.string()), ("path", pa.string()),
            ("captions", pa.list_(pa.string())), ("width", int32), ("height", int32), ("target_width", int32),
            ("target_height", int32), ("intermediate_width", int32), ("intermediate_height", int32),
            ("crop_top", int32), ("crop_left", int32), ("bucket", pa.string()), ("repeats", int32),
            ("orientation", pa.int8()), ("format", pa.string()), ("bytes", pa.int64()),
        ]
    )  # fmt: skip
    rows = {
        "sample_id": [s.sample_id for s in samples],
        "dataset_id": [s.dataset_id for s in samples],
        "path": [s.path for s in samples],
        "captions": [s.captions for s in samples],
        "width": [s.width for s in samples],
        "height": [s.height for s in samples],
        "target_width": [s.plan.target_width for s in samples],
        "target_height": [s.plan.target_height for s in samples],
        "intermediate_width": [s.plan.intermediate_width for s in samples],
        "intermediate_height": [s.plan.intermediate_height for s in samples],
        "crop_top": [s.plan.crop_top for s in samples],
        "crop_left": [s.plan.crop_left for s in samples],
        "bucket": [s.plan.bucket for s in samples],
        "repeats": [s.repeats for s in samples],
        "orientation": [s.orientation for s in samples],
        "format": [s.format for s in samples],
        "bytes": [s.bytes for s in samples],
    }
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(rows, schema=schema), tmp, compression="zstd")


def _dataset_entries(datasets: list[_DatasetFiles], samples: list[Sample], skips: list[Skip], raised: dict) -> list:
    entries = []
    for files in datasets:
        spec = files.spec
        mine = [s for s in samples if s.dataset_id == spec.id]
        entries.append(
            {
                "id": spec.id,
                "root": str(spec.root),
                "caption_strategy": spec.caption_strategy,
                "files": len(files.images),
                "samples": len(mine),
                "skipped": sum(1 for k in skips if k.dataset_id == spec.id),
                "repeats": spec.repeats,
                "probability": spec.probability,
                "buckets": dict(sorted(Counter(s.plan.bucket for s in mine).items())),
                "repeats_raised": raised.get(spec.id, {}),
                "resolution": spec.resolution,
                "resolution_type": spec.resolution_type,
            }
        )
    return entries


def _refuse_empty(skips: list[Skip], by_reason: dict[str, int]) -> None:
    """No image survived: an empty output would only fail later, in `st cache` or `st train`."""
    listing = ", ".join(f"{reason}: {n}" for reason, n in by_reason.items()) or "no image files"
    first = f"; first: {skips[0].dataset_id}/{skips[0].path} ({skips[0].reason}: {skips[0].detail})" if skips else ""
    raise InputError(f"no usable image in any dataset ({listing}){first}. Fix the images or the options that "
                     "skip them (resolution, minimum_image_size, aspect ratio limits)")  # fmt: skip


def run_prepare(loaded: LoadedConfig, out_dir: Path, *, strict: bool = False, force: bool = False) -> PrepareResult:
    """Run the prepare stage into `out_dir`, or report that its output is already up to date; the folder is held for
    the whole run."""
    specs = load_datasets(loaded)
    with claim_output(out_dir, PREPARE, data_roots=[spec.root for spec in specs]) as claim:
        return _run_prepare(claim, loaded, specs, Path(out_dir), strict=strict, force=force)


def _run_prepare(claim: OutputClaim, loaded: LoadedConfig, specs: list[DatasetSpec], out_dir: Path, *, strict: bool,
                 force: bool) -> PrepareResult:  # fmt: skip
    started = time.time()
    config = loaded.config
    datasets = _discover(specs)
    index = load_index(out_dir)
    probes, probe_stats = _probe_all(datasets, index, config.max_workers)
    stage_config = _stage_config(loaded)
    key = _key(stage_config, datasets, probes)

    run = StageRun(PREPARE, SCHEMA_VERSION, out_dir, key, stage_config, force=force)
    if run.up_to_date:
        return PrepareResult(out_dir, run.previous.manifest, up_to_date=True)
    reasons = run.reasons(extra=[_changed_files(datasets, probes, index)])

    samples, skips = _select(datasets, probes, config.aspect_bucket_alignment, config.aspect_bucket_rounding,
                             config.seed or 0)  # fmt: skip
    kept, pruned, raised = _prune(samples, specs, loaded)
    skips.extend(pruned)
    order = {spec.id: i for i, spec in enumerate(specs)}
    skips.sort(key=lambda k: (order[k.dataset_id], k.path))
    by_reason = dict(sorted(Counter(k.reason for k in skips).items()))
    if strict and skips:
        listing = ", ".join(f"{reason}: {n}" for reason, n in by_reason.items())
        first = skips[0]
        raise InputError(
            f"--strict: {len(skips)} image(s) would be skipped ({listing}); first: {first.dataset_id}/{first.path} "
            f"({first.reason}: {first.detail}). Fix or remove them, or run without --strict"
        )
    if not kept:
        _refuse_empty(skips, by_reason)
    deleted = _delete_files(skips, specs, config) if (config.delete_problematic_images or
                                                      config.delete_unwanted_images) else 0  # fmt: skip

    claim.will_write(SAMPLES_NAME, SKIPPED_NAME, INDEX_NAME, MANIFEST_NAME)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_samples(out_dir / SAMPLES_NAME, kept)
    atomic_write_text(out_dir / SKIPPED_NAME, "".join(json.dumps(k.as_json(), sort_keys=True) + "\n" for k in skips))
    save_index(out_dir, list(probes.values()))
    doc = {
        "schema": SCHEMA,
        "stage": PREPARE,
        "key": key,
        "parent": None,
        "config": stage_config,
        "datasets": _dataset_entries(datasets, kept, skips, raised),
        "buckets": dict(sorted(Counter(s.plan.bucket for s in kept).items())),
        "outputs": [output_entry(out_dir, out_dir / SAMPLES_NAME), output_entry(out_dir, out_dir / SKIPPED_NAME)],
        "stats": {
            "files": sum(len(d.images) for d in datasets),
            "samples": len(kept),
            "skipped": by_reason,
            "deleted": deleted,
            "batch_size": _batch_size(config),
        },
    }
    finished = time.time()
    doc["provenance"] = provenance(started, finished, probed_files=probe_stats["probed"],
                                   reused_files=probe_stats["reused"], forced=force,
                                   cwd=os.getcwd())  # fmt: skip
    doc = run.write_manifest(doc)
    log.debug("prepare: %d samples in %d buckets, %d skipped -> %s", len(kept), len(doc["buckets"]), len(skips),
             out_dir / MANIFEST_NAME)  # fmt: skip
    return PrepareResult(out_dir, doc, up_to_date=False, reasons=reasons)
