"""Closing a cache output: from the shards and sidecars present, the index, the skipped list and the manifest (last)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..config import CACHE
from ..errors import InputError
from ..fsutil import atomic_path, atomic_write_text
from ..manifest import output_entry, provenance
from ..ownership import OutputClaim
from ..runner import StageRun
from .context import CacheContext
from .encode import Encoders
from .layout import EMBEDS_PATH, INDEX_NAME, SCHEMA, SKIPPED_NAME, read_sidecar, shard_complete
from .plan import CachePlan, ShardPlan


def _write_index(out_dir: Path, plan: CachePlan, sidecars: dict[str, dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"sample_id": [], "entry_key": [], "dataset_id": [], "bucket": [], "shard": []}
    for shard in plan.shards:
        present = set(sidecars[shard.path]["samples"])
        for entry in shard.entries:
            if entry.sample_id in present:
                rows["sample_id"].append(entry.sample_id)
                rows["entry_key"].append(entry.entry_key)
                rows["dataset_id"].append(shard.dataset_id)
                rows["bucket"].append(shard.bucket)
                rows["shard"].append(shard.path)
    with atomic_path(out_dir / INDEX_NAME) as tmp:
        pq.write_table(pa.table(rows), tmp, compression="zstd")


def skipped_records(parent: dict[str, Any], shards: list[ShardPlan],
                    sidecars: dict[str, dict[str, Any]]) -> list[dict[str, str]]:  # fmt: skip
    """The samples the shards' sidecars record as rejected, in prepare's skipped.jsonl form, ordered by the parent
    manifest's datasets, then by path."""
    order = {d["id"]: i for i, d in enumerate(parent["datasets"])}
    records = []
    for shard in shards:
        rejected = sidecars[shard.path]["rejected"]
        for entry in shard.entries:
            if entry.sample_id in rejected:
                info = rejected[entry.sample_id]
                records.append({"dataset_id": shard.dataset_id, "path": entry.row["path"], "reason": info["reason"],
                                "detail": info["detail"], "sample_id": entry.sample_id})  # fmt: skip
    return sorted(records, key=lambda r: (order.get(r["dataset_id"], len(order)), r["path"], r["sample_id"]))


def _write_skipped(ctx: CacheContext, out_dir: Path, sidecars: dict[str, dict[str, Any]]) -> None:
    records = skipped_records(ctx.parent, ctx.plan.shards, sidecars)
    atomic_write_text(out_dir / SKIPPED_NAME, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def vae_description(ctx: CacheContext, encoders: Encoders) -> dict[str, Any]:
    """Scaling/shift factors and channels from the VAE's config (read without loading weights when possible)."""
    family = ctx.family
    path = Path(ctx.sources.vae or ctx.sources.model)
    candidates = [path / "config.json", path / family.vae.subfolder / "config.json"] if path.is_dir() else []
    for candidate in candidates:
        if candidate.is_file():
            cfg = json.loads(candidate.read_text())
            if "scaling_factor" in cfg or "latent_channels" in cfg:
                channels = int(cfg.get("latent_channels", family.latent_channels))
                if channels != family.latent_channels:
                    raise InputError(f"the VAE at {candidate.parent} has {channels} latent channels, but "
                                     f"{family.name} needs {family.latent_channels}")  # fmt: skip
                return {"scaling_factor": float(cfg.get("scaling_factor", 0.18215)),
                        "shift_factor": None if cfg.get("shift_factor") is None else float(cfg["shift_factor"]),
                        "latent_channels": channels, "dtype": ctx.vae_dtype,
                        "class": cfg.get("_class_name", family.vae.class_name)}  # fmt: skip
    return encoders.vae_description()


def _summary(out_dir: Path, plan: CachePlan, sidecars: dict[str, dict[str, Any]]):
    """The manifest's shard entries, and the samples counted by bucket, by dataset and bucket, and skips by reason."""
    shards, skipped, buckets, datasets = [], Counter(), Counter(), {}
    for shard in plan.shards:
        side = sidecars[shard.path]
        entry = output_entry(out_dir, out_dir / shard.path)
        shards.append({**entry, "samples": len(side["samples"]), "bucket": shard.bucket, "dataset_id": shard.dataset_id})
        for info in side["rejected"].values():
            skipped[info["reason"]] += 1
        buckets[shard.bucket] += len(side["samples"])
        ds = datasets.setdefault(shard.dataset_id, Counter())
        ds[shard.bucket] += len(side["samples"])
    return shards, skipped, buckets, datasets


# A dataset's paired-data fields and a video dataset's `video` block (num_frames, is_i2v, ...), copied from the
# prepare manifest where present (st train reads them here).
PAIRED_DATASET_FIELDS = ("dataset_type", "conditioning_data", "is_regularisation_data", "video")
# When st train samples the dataset (`pipeline.datasets.SCHEDULE_KEYS`), carried when set.
SCHEDULE_FIELDS = ("start_epoch", "start_step", "end_epoch", "end_step")
# How st train draws the dataset's batches (`pipeline.datasets.TRAINING_KEYS`), carried when set.
TRAINING_FIELDS = ("timestep_sampling_offset", "train_batch_size")


def finish(ctx: CacheContext, run: StageRun, started: float, run_stats: dict[str, Any], vae: dict[str, Any],
           claim: OutputClaim) -> dict[str, Any]:  # fmt: skip
    """Write the index, the skipped list and the manifest from the shards and sidecars present in the run's output
    folder (all planned shards must be there); then drop shards no longer listed."""
    out_dir, plan = run.out_dir, ctx.plan
    missing = [s.path for s in plan.shards if not shard_complete(out_dir, s)]
    if missing:
        raise InputError(f"{len(missing)} planned shard(s) are missing from {out_dir}, e.g. {missing[0]}; run the "
                         "missing part(s) of `st cache` again")  # fmt: skip
    sidecars = {s.path: read_sidecar(out_dir, s) for s in plan.shards}
    _write_index(out_dir, plan, sidecars)
    _write_skipped(ctx, out_dir, sidecars)
    shards, skipped, buckets, datasets = _summary(out_dir, plan, sidecars)
    parent_datasets = {d["id"]: d for d in ctx.parent["datasets"]}
    outputs = [*({k: s[k] for k in ("path", "sha256", "bytes")} for s in shards),
               *(output_entry(out_dir, out_dir / s.sidecar) for s in plan.shards),
               output_entry(out_dir, out_dir / INDEX_NAME), output_entry(out_dir, out_dir / EMBEDS_PATH),
               output_entry(out_dir, out_dir / SKIPPED_NAME)]  # fmt: skip
    options = ctx.options
    doc = {
        "schema": SCHEMA,
        "stage": CACHE,
        "key": ctx.key,
        "parent": {"stage": "prepare", "digest": ctx.parent["digest"]},
        "config": ctx.stage_config,
        "family": ctx.family.name,
        "model": ctx.model,
        "vae": vae,
        "text": {
            "max_lengths": [s.max_length for s in ctx.family.text_encoders],
            "tokenizer_max_length": options.tokenizer_max_length,
            "t5_padding": options.t5_padding,
            "trimmed": ctx.family.trims_text,
            "token_ids": options.train_text_encoder,
        },
        "cache_dtype": options.cache_dtype,
        "embeds": {"path": EMBEDS_PATH, "prompts": plan.shared_prompts, "empty": _key_of(plan, "")},
        "shards": sorted(shards, key=lambda s: s["path"]),
        "buckets": dict(sorted(buckets.items())),
        "datasets": [
            {"id": ds_id, "samples": sum(c.values()), "buckets": dict(sorted(c.items())),
             "repeats": parent_datasets[ds_id]["repeats"], "probability": parent_datasets[ds_id]["probability"],
             **{k: parent_datasets[ds_id][k] for k in (*PAIRED_DATASET_FIELDS, *SCHEDULE_FIELDS, *TRAINING_FIELDS)
                if k in parent_datasets[ds_id]}}
            for ds_id, c in sorted(datasets.items())
        ],  # fmt: skip
        **({"conditioning_datasets": ctx.parent["conditioning_datasets"]}
           if "conditioning_datasets" in ctx.parent else {}),  # fmt: skip
        "outputs": outputs,
        "stats": {"samples": sum(buckets.values()), "skipped": dict(sorted(skipped.items())), "shards": len(shards)},
    }
    # Where the parent was read from is provenance: the same inputs give the same digest in any folder.
    doc["provenance"] = provenance(started, time.time(), parent_path=str(ctx.parent_path), **run_stats)
    doc = run.write_manifest(doc)
    claim.remove_unlisted(out_dir / "shards", keep={o["path"] for o in doc["outputs"]})
    return doc


def _key_of(plan: CachePlan, text: str) -> str:
    return next(k for k, v in plan.shared_prompts.items() if v == text)
