"""`st prepare`: image folders + captions -> OUT/samples.parquet, OUT/skipped.jsonl and OUT/manifest.json.

The stage runs through the stage runner: discover and probe the datasets (`discover`), key them, and when the output
is not up to date, select samples and prune buckets (`select`), then write the files (`document`) and the manifest.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..config import PREPARE, LoadedConfig
from ..datasets import DatasetSpec, load_datasets
from ..errors import InputError
from ..hashing import sha256_json
from ..log import get_logger
from ..manifest import MANIFEST_NAME, output_entry, provenance
from ..ownership import OutputClaim, claim_output
from ..runner import StageResult, StageRun
from .discover import DatasetFiles, changed_files, dataset_key, discover, probe_all
from .document import SAMPLES_NAME, SKIPPED_NAME, dataset_entries, write_samples, write_skipped
from .index import INDEX_NAME, load_index, save_index
from .notices import warn_about
from .scan import Probe
from .select import batch_size, delete_files, prune, refuse_empty, select

log = get_logger("prepare")

SCHEMA = "st.prepare/1"
SCHEMA_VERSION = 1
# Bump when the meaning of prepare's outputs changes, so that every existing output is rebuilt.
FORMAT_VERSION = 1

PrepareResult = StageResult


def _key(config: dict[str, Any], datasets: list[DatasetFiles], probes: dict[str, Probe]) -> str:
    material = {
        "format": FORMAT_VERSION,
        "config": config,
        "datasets": [dataset_key(files, probes) for files in datasets],
    }
    return sha256_json(material)


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
    datasets = discover(specs)
    index = load_index(out_dir)
    probes, probe_stats = probe_all(datasets, index, config.max_workers)
    stage_config = config.stage_keys(PREPARE)
    key = _key(stage_config, datasets, probes)

    run = StageRun(PREPARE, SCHEMA_VERSION, out_dir, key, stage_config, force=force)
    if run.up_to_date:
        return PrepareResult(out_dir, run.previous.manifest, up_to_date=True)
    reasons = run.reasons(extra=[changed_files(datasets, probes, index)])

    samples, skips = select(datasets, probes, config.aspect_bucket_alignment, config.aspect_bucket_rounding,
                             config.seed or 0)  # fmt: skip
    kept, pruned, raised = prune(samples, specs, loaded)
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
        refuse_empty(skips, by_reason)
    warn_about(specs, {d.spec.id: len(d.images) for d in datasets}, kept, skips)
    deleted = delete_files(skips, specs, config) if (config.delete_problematic_images or
                                                      config.delete_unwanted_images) else 0  # fmt: skip

    claim.will_write(SAMPLES_NAME, SKIPPED_NAME, INDEX_NAME, MANIFEST_NAME)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_samples(out_dir / SAMPLES_NAME, kept)
    write_skipped(out_dir / SKIPPED_NAME, skips)
    save_index(out_dir, list(probes.values()))
    doc = {
        "schema": SCHEMA,
        "stage": PREPARE,
        "key": key,
        "parent": None,
        "config": stage_config,
        "datasets": dataset_entries(datasets, kept, skips, raised),
        "buckets": dict(sorted(Counter(s.plan.bucket for s in kept).items())),
        "outputs": [output_entry(out_dir, out_dir / SAMPLES_NAME), output_entry(out_dir, out_dir / SKIPPED_NAME)],
        "stats": {
            "files": sum(len(d.images) for d in datasets),
            "samples": len(kept),
            "skipped": by_reason,
            "deleted": deleted,
            "batch_size": batch_size(config),
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
