"""`st cache`: a prepare manifest -> compressed, content-addressed webdataset shards of latents and text embeddings.

Order of work: read and check the prepare manifest, identify the model components and compute the stage key
(`context`); stop if the output is up to date (`pipeline.runner`); plan the shards (`plan`); keep every planned shard
already complete under its final name; for the rest, reuse entry bytes from the previous output where the entry key
matches (`reuse`) and encode only the new entries (`write`); finally write the shared embeddings (`embeds`), then the
index, the skipped list and the manifest, last (`document`). `--part i/n` and `st cache merge` are in `merge`.
Video datasets are cached for the video families only (`videos`, `refuse_video`).
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import CACHE, LoadedConfig
from ..distributed import barrier, rank_and_world
from ..errors import InputError, NotSupportedError
from ..log import get_logger
from ..manifest import MANIFEST_NAME, read_manifest
from ..ownership import OutputClaim, claim_output
from ..progress import progress_bar
from ..runner import StageResult, StageRun, damaged_outputs
from .checks import check_sources, disk_full_message, refuse_corrupt
from .context import build_context, encode_device
from .document import finish, skipped_records, vae_description
from .embeds import write_shared_embeds
from .layout import PART_NAME, SCHEMA_VERSION, planned_paths, read_sidecar, recorded_skips, shard_complete
from .merge import copy_parts, parse_part, write_part
from .reuse import PreviousEntries
from .write import ShardEncoder

log = get_logger("cache")


@dataclass(kw_only=True)
class CacheResult(StageResult):
    encoded: int = 0  # samples encoded by this run
    reused: int = 0  # samples copied from the previous output


def run_cache(loaded: LoadedConfig, input_path: Path, out_dir: Path, *, part: str | None = None,
              force: bool = False, strict: bool = False) -> CacheResult:  # fmt: skip
    """Run the cache stage (or one part of it) into `out_dir`, holding the folder for the whole run. `strict`: an
    image that cannot be decoded stops the run (exit 2) instead of being skipped."""
    refuse_video(input_path, loaded.config.model_family)
    with claim_output(out_dir, CACHE, inputs=[input_path]) as claim:
        return _run_cache(claim, loaded, input_path, Path(out_dir), part=part, force=force, strict=strict)


def refuse_video(input_path: Path, model_family: str | None) -> None:
    """A prepare output with video datasets stops here, before any model is loaded, unless the run's family trains on
    video (`Family.video`). (An unreadable manifest is left to the normal checks, which say what is wrong with it.)"""
    from ..families import FAMILIES

    if model_family in FAMILIES and FAMILIES[model_family].video:
        return
    path = Path(input_path)
    try:
        parent = read_manifest(path / MANIFEST_NAME if path.is_dir() else path, stage="prepare")
    except Exception:  # noqa: BLE001 - reported by build_context with its own message
        return
    videos = [d["id"] for d in parent.get("datasets", []) if d.get("dataset_type") == "video"]
    if videos:
        family = f"model_family {model_family!r} trains on images only" if model_family else "model_family is not set"
        video_families = ", ".join(sorted(name for name, f in FAMILIES.items() if f.video))
        raise NotSupportedError(
            f"video dataset(s) {', '.join(repr(v) for v in videos)} in {input_path}, but {family}; video datasets "
            f"train with the video families ({video_families}): set model_family to one of them, or remove the video "
            "datasets from the dataset list (or disable them) and re-run st prepare"
        )  # fmt: skip


def _run_cache(claim: OutputClaim, loaded: LoadedConfig, input_path: Path, out_dir: Path, *, part: str | None,
               force: bool, strict: bool) -> CacheResult:  # fmt: skip
    started = time.time()
    ctx = build_context(loaded, input_path)
    explicit_part = parse_part(part)
    rank, world = explicit_part or rank_and_world()
    run = StageRun(CACHE, SCHEMA_VERSION, out_dir, ctx.key, ctx.stage_config, force=force)
    if explicit_part is None and run.up_to_date:
        if strict:
            refuse_corrupt(ctx.roots, recorded_skips(out_dir))
        return CacheResult(out_dir, run.previous.manifest, up_to_date=True)
    previous = run.previous
    reasons = run.reasons(announce=rank == 0)

    plan = ctx.plan
    previous_entries = PreviousEntries(out_dir, previous.manifest)
    check_sources(ctx, out_dir, previous_entries)
    device = encode_device()
    encoders = ctx.encoders(device)
    mine = [s for i, s in enumerate(plan.shards) if i % world == rank]
    # A damaged shard is rebuilt, not kept: its sidecar alone would let the new manifest record the damaged bytes.
    damaged = damaged_outputs(out_dir, previous.manifest) if previous.manifest else {}
    kept = [s for s in mine if shard_complete(out_dir, s) and s.path not in damaged]
    kept_sidecars = {s.path: read_sidecar(out_dir, s) for s in kept}
    todo = [s for s in mine if s.path not in kept_sidecars]
    if kept:
        log.info("cache: %d of %d shard(s) already complete, keeping them", len(kept), len(mine))
    if strict:
        refuse_corrupt(ctx.roots, skipped_records(ctx.parent, kept, kept_sidecars))
    claim.will_write(*planned_paths(plan, PART_NAME if explicit_part is not None else MANIFEST_NAME))
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_encoder = ShardEncoder(ctx.options, ctx.roots, out_dir, encoders, previous_entries, strict=strict)
    # Samples of kept shards are reused too: encoded + reused is every sample written.
    shard_encoder.reused = sum(len(side["samples"]) for side in kept_sidecars.values())
    try:
        if todo:  # no bar when every shard is kept
            with progress_bar(total=sum(len(s.entries) for s in todo), desc="cache", unit="img") as bar:
                shard_encoder.write_all(todo, bar)
        if rank == 0:
            write_shared_embeds(out_dir, plan, encoders, ctx.options)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise InputError(disk_full_message(out_dir, plan.shards, todo)) from None
        raise
    run_stats = {"encoded": shard_encoder.encoded, "reused_entries": shard_encoder.reused, "kept_shards": len(kept),
                 "part": [rank, world], "device": str(device), "loaded": encoders.loaded,
                 **({"ramtorch": encoders.streamed} if encoders.streamed else {})}  # fmt: skip
    result = CacheResult(out_dir, None, False, reasons, encoded=shard_encoder.encoded, reused=shard_encoder.reused)
    if explicit_part is not None:
        write_part(ctx, out_dir, rank, world, run_stats)
        return result
    if world > 1:
        barrier()
        if rank != 0:
            return result
    result.manifest = finish(ctx, run, started, run_stats, vae_description(ctx, encoders), claim)
    log.debug("cache: %d samples in %d shards (%d encoded, %d reused) -> %s", result.manifest["stats"]["samples"],
             len(result.manifest["shards"]), result.encoded, result.reused, out_dir / MANIFEST_NAME)  # fmt: skip
    return result


def merge_parts(loaded: LoadedConfig, input_path: Path, parts: list[Path], out_dir: Path) -> CacheResult:
    """Combine the outputs of `st cache --part i/n` runs (made on machines sharing no filesystem) into one output,
    with the same manifest a single run writes."""
    with claim_output(out_dir, CACHE, inputs=[input_path, *parts]) as claim:
        started = time.time()
        out_dir = Path(out_dir)
        ctx = build_context(loaded, input_path)
        claim.will_write(*planned_paths(ctx.plan, MANIFEST_NAME))
        copy_parts(ctx, parts, out_dir)
        run = StageRun(CACHE, SCHEMA_VERSION, out_dir, ctx.key, ctx.stage_config)
        vae = vae_description(ctx, ctx.encoders(encode_device()))
        doc = finish(ctx, run, started, {"merged_parts": len(parts)}, vae, claim)
        return CacheResult(out_dir, doc, False)
