"""`st prepare`: image folders + captions -> OUT/samples.parquet, OUT/skipped.jsonl and OUT/manifest.json.

The stage runs through the stage runner: download what changed of remote datasets (`remote`, into
OUT/.st/downloads/), discover and probe the datasets and their conditioning datasets (`discover`), key them, and when
the output is not up to date, select samples, pair them with their conditioning images (`pairing`) and prune buckets
(`select`), generate the conditioning images of generated conditioning datasets (under OUT/conditioning/), then write
the files (`document`) and the manifest.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..config import PREPARE, LoadedConfig
from ..datasets import ConditioningSpec, DatasetList, DatasetSpec, load_dataset_list
from ..errors import InputError
from ..hashing import sha256_json
from ..log import get_logger
from ..manifest import MANIFEST_NAME, output_entry, provenance
from ..ownership import OutputClaim, claim_output
from ..runner import StageResult, StageRun
from .discover import DatasetFiles, changed_files, dataset_key, discover, probe_all
from .document import SAMPLES_NAME, SKIPPED_NAME, conditioning_entries, dataset_entries, write_samples, write_skipped
from .index import INDEX_NAME, load_index, save_index
from .notices import warn_about
from .pairing import GENERATED_FOLDER, GENERATED_INDEX, Generation, PartnerFinder, generated_root, list_conditioning
from .pairing import pair_samples
from .remote import sync_remote
from .scan import Probe
from .select import batch_size, cap_samples, delete_files, prune, refuse_empty, select

log = get_logger("prepare")

SCHEMA = "st.prepare/1"
SCHEMA_VERSION = 1
# Bump when the meaning of prepare's outputs changes, so that every existing output is rebuilt.
FORMAT_VERSION = 1

PrepareResult = StageResult


def _key(config: dict[str, Any], datasets: list[DatasetFiles], probes: dict[str, Probe],
         conditioning: list[DatasetFiles], generated: list[ConditioningSpec]) -> str:  # fmt: skip
    material = {
        "format": FORMAT_VERSION,
        "config": config,
        "datasets": [dataset_key(files, probes) for files in datasets],
    }
    if conditioning or generated:  # only then, so that the keys of outputs without paired data stay as they were
        material["conditioning"] = [dataset_key(files, probes) for files in conditioning]
        material["generated"] = [{**c.describe(), "root": None} for c in generated]
    return sha256_json(material)


def run_prepare(loaded: LoadedConfig, out_dir: Path, *, strict: bool = False, force: bool = False) -> PrepareResult:
    """Run the prepare stage into `out_dir`, or report that its output is already up to date; the folder is held for
    the whole run."""
    lists = load_dataset_list(loaded)
    roots = [spec.root for spec in lists.images if spec.source is None]
    roots += [c.root for c in lists.conditioning if c.root is not None]
    with claim_output(out_dir, PREPARE, data_roots=roots) as claim:
        return _run_prepare(claim, loaded, lists, Path(out_dir), strict=strict, force=force)


def _run_prepare(claim: OutputClaim, loaded: LoadedConfig, lists: DatasetList, out_dir: Path, *, strict: bool,
                 force: bool) -> PrepareResult:  # fmt: skip
    started = time.time()
    config = loaded.config
    remote = sync_remote(claim, lists, out_dir)
    lists = remote.lists
    specs = lists.images
    datasets = discover(specs)
    for files in datasets:
        files.unlisted.extend(remote.skips.get(files.spec.id, ()))
    cap_samples(datasets)  # before probing: the files max_num_samples leaves out are never read
    # Generated conditioning datasets live in this output folder; the others are walked like image folders.
    generated = {c.id: dataclasses.replace(c, root=generated_root(out_dir.absolute(), c))
                 for c in lists.conditioning if c.generator is not None}  # fmt: skip
    # A conditioning dataset linked from a video dataset holds clips (Wan VACE's control / mask videos).
    # Its reference images (reference_strict / reference_loose: WanVACEPipeline's `reference_images`) stay images.
    clip_linked = {i for spec in specs if spec.video is not None for i in spec.conditioning_data} - \
        {c.id for c in lists.conditioning if c.conditioning_type.startswith("reference_")}  # fmt: skip
    conditioning = [list_conditioning(c, videos=c.id in clip_linked) for c in lists.conditioning if c.generator is None]
    index = load_index(out_dir)
    probes, probe_stats = probe_all(datasets + conditioning, index, config.max_workers)
    stage_config = config.stage_keys(PREPARE)
    key = _key(stage_config, datasets, probes, conditioning, list(generated.values()))

    run = StageRun(PREPARE, SCHEMA_VERSION, out_dir, key, stage_config, force=force)
    if run.up_to_date:
        return PrepareResult(out_dir, run.previous.manifest, up_to_date=True)
    reasons = run.reasons(extra=[changed_files(datasets + conditioning, probes, index)])

    samples, skips = select(datasets, probes, config.aspect_bucket_alignment, config.aspect_bucket_rounding,
                             config.seed or 0)  # fmt: skip
    samples, unpaired = pair_samples(samples, specs, {f.spec.id: PartnerFinder(f, probes) for f in conditioning})
    skips.extend(unpaired)
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
    # Remote datasets are never deleted from: their files here are downloads, and the source is not st's to change.
    # Nor are videos: a video's frame rules are the dataset's, not a fault of the file.
    videos = {spec.id for spec in specs if spec.video is not None}
    local_skips = [k for k in skips if k.dataset_id not in remote.facts and k.dataset_id not in videos]
    deleted = delete_files(local_skips, specs, config) if (config.delete_problematic_images or
                                                            config.delete_unwanted_images) else 0  # fmt: skip

    if generated:
        claim.will_write(SAMPLES_NAME, SKIPPED_NAME, INDEX_NAME, MANIFEST_NAME, GENERATED_INDEX,
                         folders=[GENERATED_FOLDER])  # fmt: skip
    else:
        claim.will_write(SAMPLES_NAME, SKIPPED_NAME, INDEX_NAME, MANIFEST_NAME)
    out_dir.mkdir(parents=True, exist_ok=True)
    generated_files: set[str] = set()
    if generated:
        Generation(out_dir, {s.id: s.root for s in specs}, config.seed or 0).run(kept, specs, generated)
        generated_files = {f"{GENERATED_FOLDER}/{p.dataset_id}/{p.path}" for s in kept for p in s.conditioning
                           if p.dataset_id in generated}  # fmt: skip
        claim.remove_unlisted(GENERATED_FOLDER, generated_files | {GENERATED_INDEX})
    write_samples(out_dir / SAMPLES_NAME, kept)
    write_skipped(out_dir / SKIPPED_NAME, skips)
    save_index(out_dir, list(probes.values()))
    doc = {
        "schema": SCHEMA,
        "stage": PREPARE,
        "key": key,
        "parent": None,
        "config": stage_config,
        "datasets": [{**entry, "source": remote.facts[entry["id"]]} if entry["id"] in remote.facts else entry
                     for entry in dataset_entries(datasets, kept, skips, raised)],
        **conditioning_entries(conditioning, list(generated.values()), kept),
        "buckets": dict(sorted(Counter(s.plan.bucket for s in kept).items())),
        "outputs": [output_entry(out_dir, out_dir / SAMPLES_NAME), output_entry(out_dir, out_dir / SKIPPED_NAME),
                    *(output_entry(out_dir, out_dir / rel) for rel in sorted(generated_files))],
        "stats": {
            "files": sum(len(d.images) + d.capped for d in datasets),
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
