"""`st cache`: a prepare manifest -> compressed, content-addressed webdataset shards of latents and text embeddings.

Order of work: read and check the prepare manifest; identify the model components (config + weight-header hashes,
no model load); compute the stage key and stop if the output is up to date; plan the shards; keep every planned shard
already complete under its final name; for the rest, reuse entry bytes from the previous output where the entry key
matches and encode only the new entries; finally write the index, the shared embeddings and the manifest (last).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CACHE, LoadedConfig
from ..speed import SpeedOptions
from ..distributed import barrier, local_rank, rank_and_world
from ..errors import ConfigError, InputError, LineageError, ManifestError
from ..families import Family, check_model_family, component_identity, get_family, without_source
from ..fsutil import atomic_path, atomic_write_bytes, atomic_write_text
from ..hashing import canonical_json, sha256_file, sha256_json
from ..lineage import verify_outputs
from ..log import get_logger
from ..manifest import MANIFEST_NAME, output_entry, provenance, read_manifest, write_manifest
from ..ownership import OutputClaim, claim_output
from ..progress import progress_bar
from ..shards import ShardWriter, pack_tensors, read_shard, unpack_tensors
from ..stagekeys import explain_rerun, up_to_date
from .encode import Encoders, encode_latent_batch, torch_dtype
from .images import CORRUPT, LOADER_FAILURE, ImageJob, job_for, iterate_batches
from .reader import safetensors_metadata
from .plan import FORMAT_VERSION, CachePlan, Entry, ShardPlan, build_plan, identities

log = get_logger("cache")

SCHEMA = "st.cache/1"
SCHEMA_VERSION = 1
PART_NAME = "part.json"
INDEX_NAME = "index.parquet"
EMBEDS_PATH = "embeds/shared.safetensors.zst"
# Paths and knobs that never change what is written stay out of the stage key.
_KEY_EXCLUDED = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path",
                 "pretrained_t5_model_name_or_path", "ignore_missing_files")  # fmt: skip
# Speed knobs that set the shape of each VAE call, and so the last bits of every latent: they enter the stage key.
_ENCODE_SHAPE_KEYS = ("vae_batch_size", "vae_enable_slicing", "vae_enable_tiling")
SKIPPED_NAME = "skipped.jsonl"


@dataclass
class CacheResult:
    out_dir: Path
    manifest: dict[str, Any] | None
    up_to_date: bool
    encoded: int = 0
    reused: int = 0
    reasons: list[str] = field(default_factory=list)


@dataclass
class _Context:
    """Everything a cache run works from, resolved once."""

    loaded: LoadedConfig
    family: Family
    parent: dict[str, Any]
    parent_path: Path
    rows: list[dict[str, Any]]
    roots: dict[str, str]
    model: dict[str, Any]
    settings: dict[str, Any]
    stage_config: dict[str, Any]
    key: str


# ----------------------------------------------------------------------------------------------------- context


def _read_rows(samples_path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(samples_path).to_pylist()


def _model_sources(config) -> tuple[str, str | None, str | None]:
    if not config.model_family:
        raise ConfigError("option 'model_family' is not set; choose one of sd1x, sd2x, sdxl, sd3, flux, pixart_sigma")
    if not config.pretrained_model_name_or_path:
        raise ConfigError(
            "option 'pretrained_model_name_or_path' is not set; point it at a diffusers folder, a .safetensors "
            "checkpoint or a hub id (`st tiny-model FAMILY DIR` writes a small test model)"
        )
    return config.pretrained_model_name_or_path, config.pretrained_vae_model_name_or_path, \
        config.pretrained_t5_model_name_or_path  # fmt: skip


def resolve_path(loaded: LoadedConfig, value: str | None) -> str | None:
    """Model paths in a config file are relative to it; hub ids stay as they are."""
    if value is None:
        return None
    candidate = loaded.resolve_path(value)
    return str(candidate.resolve()) if candidate.exists() else value


def model_identity(family: Family, source: str, vae_source: str | None, t5_source: str | None,
                   revision: str | None) -> dict[str, Any]:  # fmt: skip
    """Identities of the VAE, text encoders and tokenizers, from configs and weight headers (nothing is loaded)."""

    def identify(component, override: str | None) -> dict[str, Any]:
        if override is None:
            return component_identity(source, component.subfolder, revision)
        path = Path(override)
        if path.is_dir() and (path / component.subfolder).is_dir():
            return component_identity(override, component.subfolder, revision)
        return component_identity(override, None, revision)

    single_file = Path(source).is_file()
    if single_file:
        whole = component_identity(source, None, revision)
        return {"vae": whole, "text_encoders": [whole], "tokenizers": [whole]}
    is_t5 = [spec.kind == "t5" for spec in family.text_encoders]
    return {
        "vae": identify(family.vae, vae_source),
        "text_encoders": [identify(s.model, t5_source if t5 else None) for s, t5 in zip(family.text_encoders, is_t5)],
        "tokenizers": [identify(s.tokenizer, t5_source if t5 and t5_source and Path(t5_source, s.tokenizer.subfolder)
                                .is_dir() else None) for s, t5 in zip(family.text_encoders, is_t5)],
    }  # fmt: skip


def build_context(loaded: LoadedConfig, input_path: Path) -> _Context:
    config = loaded.config
    # Absolute, because it goes into provenance: a later stage looks for this manifest there to check lineage.
    parent_path = Path(input_path).absolute()
    parent_path = parent_path / MANIFEST_NAME if parent_path.is_dir() else parent_path
    parent = read_manifest(parent_path, stage="prepare")
    verify_outputs(parent, parent_path.parent, parent_path, writer="prepare")
    rows = _read_rows(parent_path.parent / "samples.parquet")
    family = get_family(config.model_family) if config.model_family else None
    source, vae_source, t5_source = _model_sources(config)
    source, vae_source, t5_source = (resolve_path(loaded, v) for v in (source, vae_source, t5_source))
    check_model_family(family, source)
    model = model_identity(family, source, vae_source, t5_source, config.revision)
    vae_dtype = config.vae_dtype
    if vae_dtype == "default":
        import torch

        vae_dtype = "bf16" if torch.cuda.is_available() else "fp32"
    settings = {
        "source": source, "vae_source": vae_source, "t5_source": t5_source, "vae_dtype": vae_dtype,
        "seed": config.seed or 0, "cache_dtype": config.cache_dtype, "tokenizer_max_length": config.tokenizer_max_length,
        "t5_padding": config.t5_padding, "vae_encode": {k: getattr(config, k) for k in _ENCODE_SHAPE_KEYS},
    }  # fmt: skip
    stage_config = {k: v for k, v in config.stage_keys(CACHE).items() if k not in _KEY_EXCLUDED}
    stage_config.update({k: getattr(config, k) for k in _ENCODE_SHAPE_KEYS})
    stripped = {part: ([without_source(i) for i in v] if isinstance(v, list) else without_source(v)) for part, v in model.items()}
    # The prompt texts (not just the user_prompt_library path) decide what the shared embeddings hold.
    key = sha256_json({"format": FORMAT_VERSION, "parent": parent["digest"], "config": stage_config,
                       "model": stripped, "vae_dtype": vae_dtype,
                       "prompts": sorted(validation_prompt_texts(loaded))})  # fmt: skip
    roots = {d["id"]: d["root"] for d in parent["datasets"]}
    return _Context(loaded, family, parent, parent_path, rows, roots, model, settings, stage_config, key)


# ------------------------------------------------------------------------------------------------------ reuse


class _PreviousEntries:
    """Entry bytes of the previous output, read shard by shard when first needed (verified against its manifest)."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any] | None) -> None:
        self.out_dir = out_dir
        self.where: dict[str, str] = {}
        self.shards: dict[str, dict[str, Any]] = {}
        self._loaded: dict[str, dict[str, dict[str, bytes]]] = {}
        if manifest is None or not (out_dir / INDEX_NAME).is_file():
            return
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(out_dir / INDEX_NAME).to_pylist()
        except Exception:  # a damaged index only costs re-encoding
            return
        self.shards = {s["path"]: s for s in manifest.get("shards", [])}
        self.where = {r["entry_key"]: r["shard"] for r in table if r["shard"] in self.shards}
        self.keys = {r["entry_key"]: r["sample_id"] for r in table}

    def get(self, entry_key: str) -> dict[str, bytes] | None:
        shard = self.where.get(entry_key)
        if shard is None:
            return None
        if shard not in self._loaded:
            meta = self.shards[shard]
            try:
                by_sample = dict(read_shard(self.out_dir / shard, expected_sha256=meta["sha256"],
                                            expected_bytes=meta["bytes"]))  # fmt: skip
            except (ManifestError, InputError) as exc:
                log.warning("not reusing %s: %s", shard, exc)
                by_sample = {}
            self._loaded[shard] = by_sample
        return self._loaded[shard].get(self.keys[entry_key])


# ----------------------------------------------------------------------------------------------------- writing


def _sidecar_doc(shard: ShardPlan, written: list[str], rejected: dict[str, tuple[str, str]]) -> dict[str, Any]:
    return {"shard_key": shard.shard_key, "samples": written,
            "rejected": {k: {"reason": r, "detail": d} for k, (r, d) in sorted(rejected.items())}}  # fmt: skip


def shard_complete(out_dir: Path, shard: ShardPlan) -> bool:
    sidecar = out_dir / shard.sidecar
    if not (out_dir / shard.path).is_file() or not sidecar.is_file():
        return False
    try:
        return json.loads(sidecar.read_text()).get("shard_key") == shard.shard_key
    except (OSError, json.JSONDecodeError):
        return False


def _text_member(entry: Entry, encoded: dict[str, dict[str, Any]], cache_dtype, level: int) -> bytes | None:
    tensors = {}
    for i, caption in entry.local_captions:
        for name, value in encoded[caption].items():
            tensors[f"{i}.{name}"] = value if not value.is_floating_point() else value.to(cache_dtype)
    return pack_tensors(tensors, level) if tensors else None


class _ShardEncoder:
    """Writes planned shards: reused entries are copied, the rest encoded in bucket-homogeneous batches."""

    def __init__(self, ctx: _Context, out_dir: Path, encoders: Encoders, previous: _PreviousEntries,
                 strict: bool = False) -> None:  # fmt: skip
        config = ctx.loaded.config
        self.ctx, self.out_dir, self.encoders, self.previous = ctx, out_dir, encoders, previous
        self.strict = strict
        self.level = config.cache_compression_level
        self.cache_dtype = torch_dtype(config.cache_dtype)
        self.batch = max(1, config.vae_batch_size)
        # With slicing the VAE encodes one image per call whatever the batch, so padding would only cost time.
        self.vae_rows = 1 if config.vae_enable_slicing else self.batch
        self.workers = config.max_workers if config.max_workers is not None else min(4, os.cpu_count() or 1)
        self.encoded = self.reused = 0

    def _encode_texts(self, entries: list[Entry]) -> dict[str, dict[str, Any]]:
        captions = sorted({c for e in entries for _, c in e.local_captions})
        settings = self.ctx.settings
        encoded = self.encoders.encode_prompts(captions, settings["tokenizer_max_length"], settings["t5_padding"])
        return dict(zip(captions, encoded))

    def _reject(self, entry: Entry, reason: str, detail: str) -> None:
        """Stop on a problem that must be fixed first; otherwise log the skip (the shard's sidecar records it)."""
        dataset_id, path = entry.row["dataset_id"], entry.row["path"]
        source = Path(self.ctx.roots[dataset_id]) / path
        if reason == LOADER_FAILURE:
            raise RuntimeError(f"loading {source} (dataset {dataset_id}) failed: {detail}")
        if reason == CORRUPT:
            if self.strict:
                raise InputError(f"--strict: {source} (dataset {dataset_id}) {detail}; replace or remove it and re-run "
                                 "`st prepare`, or run `st cache` without --strict to skip it")  # fmt: skip
            log.warning("cache: skipping %s (dataset %s): %s", source, dataset_id, detail)
        elif not self.ctx.loaded.config.ignore_missing_files:
            raise InputError(f"{detail}; re-run `st prepare`, or set ignore_missing_files to skip it")

    def write_all(self, shards: list[ShardPlan], bar) -> None:
        """Write `shards` in order. One image loader serves the whole run, so the next shard's images decode while
        this shard's text and latents are encoded; batches never span shards, so a shard's bytes do not depend on
        which other shards a run writes (resume, parts and processes give the same shards)."""
        plans: list[tuple[ShardPlan, list[Entry], int]] = []
        batches: list[list[ImageJob]] = []
        for shard in shards:
            todo = [e for e in shard.entries if e.entry_key not in self.previous.where]
            jobs = [job_for(e.row, self.ctx.roots[e.row["dataset_id"]]) for e in todo]
            shard_batches = [jobs[i : i + self.batch] for i in range(0, len(jobs), self.batch)]
            batches.extend(shard_batches)
            plans.append((shard, todo, len(shard_batches)))
        stream = iterate_batches(batches, self.workers if len(batches) > 1 else 0)
        for shard, todo, count in plans:
            self._write_one(shard, todo, _take(stream, count), bar)

    def _write_one(self, shard: ShardPlan, todo: list[Entry], loaded_batches, bar) -> None:
        members: dict[str, dict[str, bytes]] = {}
        planned = {e.sample_id for e in todo}
        late: list[Entry] = []
        for entry in shard.entries:
            if entry.sample_id in planned:
                continue
            found = self.previous.get(entry.entry_key)
            if found is not None:
                members[entry.sample_id] = found
                self.reused += 1
                bar.update(1)
            else:  # the previous shard holding it turned out unreadable: encode it after all
                late.append(entry)
        rejected: dict[str, tuple[str, str]] = {}
        encode = todo + late
        if encode:
            texts = self._encode_texts(encode)
            self.encoders.release_text()
            by_id = {e.sample_id: e for e in encode}
            extra = [jobs for jobs in _chunks([job_for(e.row, self.ctx.roots[e.row["dataset_id"]]) for e in late],
                                             self.batch)]  # fmt: skip
            for ids, pixels, problems in _chain(loaded_batches, iterate_batches(extra, 0)):
                for sample_id, (reason, detail) in problems.items():
                    self._reject(by_id[sample_id], reason, detail)
                    rejected[sample_id] = (reason, detail)
                    bar.update(1)
                if pixels is None:
                    continue
                latents = encode_latent_batch(self.encoders, pixels, ids, self.ctx.settings["seed"], self.vae_rows)
                for sample_id, latent in zip(ids, latents):
                    bar.update(1)
                    if not bool(latent.isfinite().all()):
                        rejected[sample_id] = ("non_finite_latent", "the VAE produced NaN or Inf for this image")
                        continue
                    entry = by_id[sample_id]
                    item = {"json": canonical_json(entry.metadata()),
                            "latent.safetensors.zst": pack_tensors({"latent": latent.to(self.cache_dtype)}, self.level)}
                    text = _text_member(entry, texts, self.cache_dtype, self.level)
                    if text is not None:
                        item["text.safetensors.zst"] = text
                    members[sample_id] = item
                    self.encoded += 1
        written = [e.sample_id for e in shard.entries if e.sample_id in members]
        final = self.out_dir / shard.path
        final.parent.mkdir(parents=True, exist_ok=True)
        with ShardWriter(final) as writer:
            for sample_id in written:
                writer.add(sample_id, members[sample_id])
            # The sidecar lands before the shard's rename: a shard under its final name always has one.
            atomic_write_text(self.out_dir / shard.sidecar,
                              json.dumps(_sidecar_doc(shard, written, rejected), sort_keys=True) + "\n")  # fmt: skip


def _take(stream, count: int):
    """The next `count` items of an iterator, lazily (so decoding keeps running ahead in the loader's workers)."""
    for _ in range(count):
        yield next(stream)


def _chain(*iterables):
    for iterable in iterables:
        yield from iterable


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _write_shared_embeds(ctx: _Context, out_dir: Path, plan: CachePlan, encoders: Encoders) -> None:
    """All shared prompts in one safetensors file (reused from the previous one when the text identity matches)."""
    path = out_dir / EMBEDS_PATH
    config = ctx.loaded.config
    cache_dtype = torch_dtype(config.cache_dtype)
    previous: dict[str, Any] = {}
    if path.is_file():
        try:
            import zstandard
            from safetensors.torch import load

            raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
            meta = json.loads(safetensors_metadata(raw).get("st", "{}"))
            if meta.get("text_identity") == plan.text_identity:
                previous = load(raw)
        except Exception:  # unreadable old file: re-encode
            previous = {}
    tensors: dict[str, Any] = {}
    missing = [k for k in plan.shared_prompts if not any(name.startswith(f"{k}.") for name in previous)]
    if missing:
        texts = [plan.shared_prompts[k] for k in missing]
        encoded = encoders.encode_prompts(texts, ctx.settings["tokenizer_max_length"], ctx.settings["t5_padding"])
        for key, values in zip(missing, encoded):
            for name, value in values.items():
                tensors[f"{key}.{name}"] = value.to(cache_dtype) if value.is_floating_point() else value
    for key in plan.shared_prompts:
        for name, value in previous.items():
            if name.startswith(f"{key}."):
                tensors[name] = value
    meta = {"st": json.dumps({"text_identity": plan.text_identity, "prompts": plan.shared_prompts}, sort_keys=True)}
    from safetensors.torch import save

    import zstandard

    data = save(dict(sorted(tensors.items())), metadata=meta)
    compressor = zstandard.ZstdCompressor(level=config.cache_compression_level, write_content_size=True,
                                          write_checksum=True)  # fmt: skip
    atomic_write_bytes(path, compressor.compress(data))


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


def skipped_records(ctx: _Context, shards: list[ShardPlan],
                    sidecars: dict[str, dict[str, Any]]) -> list[dict[str, str]]:  # fmt: skip
    """The samples the shards' sidecars record as rejected, in prepare's skipped.jsonl form, by dataset then path."""
    order = {d["id"]: i for i, d in enumerate(ctx.parent["datasets"])}
    records = []
    for shard in shards:
        rejected = sidecars[shard.path]["rejected"]
        for entry in shard.entries:
            if entry.sample_id in rejected:
                info = rejected[entry.sample_id]
                records.append({"dataset_id": shard.dataset_id, "path": entry.row["path"], "reason": info["reason"],
                                "detail": info["detail"], "sample_id": entry.sample_id})  # fmt: skip
    return sorted(records, key=lambda r: (order.get(r["dataset_id"], len(order)), r["path"], r["sample_id"]))


def _write_skipped(ctx: _Context, out_dir: Path, plan: CachePlan, sidecars: dict[str, dict[str, Any]]) -> None:
    records = skipped_records(ctx, plan.shards, sidecars)
    atomic_write_text(out_dir / SKIPPED_NAME, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def finalise(ctx: _Context, out_dir: Path, plan: CachePlan, started: float, run_stats: dict[str, Any],
             claim: OutputClaim) -> dict:  # fmt: skip
    """Write the index and the manifest from the shards and sidecars present in `out_dir` (all must be there)."""
    missing = [s.path for s in plan.shards if not shard_complete(out_dir, s)]
    if missing:
        raise InputError(f"{len(missing)} planned shard(s) are missing from {out_dir}, e.g. {missing[0]}; run the "
                         "missing part(s) of `st cache` again")  # fmt: skip
    sidecars = {s.path: json.loads((out_dir / s.sidecar).read_text()) for s in plan.shards}
    _write_index(out_dir, plan, sidecars)
    _write_skipped(ctx, out_dir, plan, sidecars)
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
    parent_datasets = {d["id"]: d for d in ctx.parent["datasets"]}
    outputs = [*({k: s[k] for k in ("path", "sha256", "bytes")} for s in shards),
               *(output_entry(out_dir, out_dir / s.sidecar) for s in plan.shards),
               output_entry(out_dir, out_dir / INDEX_NAME), output_entry(out_dir, out_dir / EMBEDS_PATH),
               output_entry(out_dir, out_dir / SKIPPED_NAME)]  # fmt: skip
    vae = run_stats.pop("vae")
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
            "tokenizer_max_length": ctx.settings["tokenizer_max_length"],
            "t5_padding": ctx.settings["t5_padding"],
            "trimmed": ctx.family.trims_text,
        },
        "cache_dtype": ctx.settings["cache_dtype"],
        "embeds": {"path": EMBEDS_PATH, "prompts": plan.shared_prompts, "empty": _key_of(plan, "")},
        "shards": sorted(shards, key=lambda s: s["path"]),
        "buckets": dict(sorted(buckets.items())),
        "datasets": [
            {"id": ds_id, "samples": sum(c.values()), "buckets": dict(sorted(c.items())),
             "repeats": parent_datasets[ds_id]["repeats"], "probability": parent_datasets[ds_id]["probability"]}
            for ds_id, c in sorted(datasets.items())
        ],  # fmt: skip
        "outputs": outputs,
        "stats": {"samples": sum(buckets.values()), "skipped": dict(sorted(skipped.items())), "shards": len(shards)},
    }
    # Where the parent was read from is provenance: the same inputs give the same digest in any folder.
    doc["provenance"] = provenance(started, time.time(), parent_path=str(ctx.parent_path), **run_stats)
    doc = write_manifest(out_dir, doc, "cache", SCHEMA_VERSION)
    claim.remove_unlisted(out_dir / "shards", keep={o["path"] for o in doc["outputs"]})
    return doc


def _key_of(plan: CachePlan, text: str) -> str:
    return next(k for k, v in plan.shared_prompts.items() if v == text)


def _planned_paths(plan: CachePlan, last: str) -> list[str]:
    """Every file a run of `plan` may write (relative to the output folder), `last` being manifest.json or part.json."""
    return [*(p for s in plan.shards for p in (s.path, s.sidecar)), INDEX_NAME, EMBEDS_PATH, SKIPPED_NAME, last]


# --------------------------------------------------------------------------------------------------------- run


def validation_prompt_texts(loaded: LoadedConfig) -> list[str]:
    """Prompts st train renders at validation: their embeddings are cached once in the shared embeds file."""
    from ..train.validation import library_prompts

    return library_prompts(loaded.config, loaded.base_dir)


def _parse_part(part: str | None) -> tuple[int, int] | None:
    if part is None:
        return None
    try:
        index, count = (int(x) for x in part.split("/"))
    except ValueError:
        raise ConfigError(f"--part expects i/n (e.g. 0/2), got {part!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise ConfigError(f"--part {part}: i must be in 0..n-1")
    return index, count


def run_cache(loaded: LoadedConfig, input_path: Path, out_dir: Path, *, part: str | None = None,
              force: bool = False, strict: bool = False) -> CacheResult:  # fmt: skip
    """Run the cache stage (or one part of it) into `out_dir`, holding the folder for the whole run. `strict`: an
    image that cannot be decoded stops the run (exit 2) instead of being skipped."""
    with claim_output(out_dir, CACHE, inputs=[input_path]) as claim:
        return _run_cache(claim, loaded, input_path, Path(out_dir), part=part, force=force, strict=strict)


def _refuse_corrupt(ctx: _Context, records: list[dict[str, str]]) -> None:
    """--strict: samples an earlier run skipped as undecodable (kept shards, an up-to-date output) fail it too."""
    for record in records:
        if record["reason"] == CORRUPT:
            source = Path(ctx.roots[record["dataset_id"]]) / record["path"]
            raise InputError(f"--strict: {source} (dataset {record['dataset_id']}) {record['detail']} (an earlier "
                             "run skipped it); replace or remove it and re-run `st prepare`, or run `st cache` "
                             "without --strict to skip it")  # fmt: skip


def _recorded_skips(out_dir: Path) -> list[dict[str, str]]:
    path = out_dir / SKIPPED_NAME  # verified with every other output by `up_to_date`
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def _run_cache(claim: OutputClaim, loaded: LoadedConfig, input_path: Path, out_dir: Path, *, part: str | None,
               force: bool, strict: bool) -> CacheResult:  # fmt: skip
    started = time.time()
    ctx = build_context(loaded, input_path)
    config = loaded.config
    explicit_part = _parse_part(part)
    rank, world = explicit_part or rank_and_world()
    previous = up_to_date(out_dir, SCHEMA, ctx.key)
    if previous.current and not force and explicit_part is None:
        if strict:
            _refuse_corrupt(ctx, _recorded_skips(out_dir))
        log.info("cache: %s is up to date (key %s), nothing to do", out_dir / MANIFEST_NAME, ctx.key[:12])
        return CacheResult(out_dir, previous.manifest, up_to_date=True)
    reasons = explain_rerun(previous, ctx.stage_config, force=force)
    if rank == 0:
        for reason in reasons:
            log.info("cache: running because %s", reason)

    latent_id, text_id = identities(ctx.model, ctx.settings)
    extra = validation_prompt_texts(loaded)
    plan = build_plan(ctx.rows, latent_identity=latent_id, text_identity=text_id, shard_samples=config.cache_shard_samples,
                      extra_prompts=extra, compression_level=config.cache_compression_level)  # fmt: skip
    previous_entries = _PreviousEntries(out_dir, previous.manifest)
    _check_sources(ctx, plan, out_dir, previous_entries)
    device = _device()
    encoders = Encoders(ctx.family, ctx.settings["source"], ctx.settings["vae_source"], ctx.settings["t5_source"],
                        config.revision, config.variant, ctx.settings["vae_dtype"], device,
                        offload=config.offload_during_startup, speed=SpeedOptions.from_config(config))  # fmt: skip
    mine = [s for i, s in enumerate(plan.shards) if i % world == rank]
    # A damaged shard is rebuilt, not kept: its sidecar alone would let the new manifest record the damaged bytes.
    recorded = {o["path"]: o for o in previous.manifest["outputs"]} if previous.manifest and previous.damaged else {}
    complete = {s.path for s in mine if shard_complete(out_dir, s) and _as_recorded(out_dir, s, recorded)}
    todo = [s for s in mine if s.path not in complete]
    kept = len(mine) - len(todo)
    if kept:
        log.info("cache: %d of %d shard(s) already complete, keeping them", kept, len(mine))
    if strict:
        kept_shards = [s for s in mine if s.path in complete]
        _refuse_corrupt(ctx, skipped_records(ctx, kept_shards, {s.path: json.loads((out_dir / s.sidecar).read_text())
                                                                for s in kept_shards}))  # fmt: skip
    claim.will_write(*_planned_paths(plan, PART_NAME if explicit_part is not None else MANIFEST_NAME))
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_encoder = _ShardEncoder(ctx, out_dir, encoders, previous_entries, strict=strict)
    # Samples of kept shards are reused too: encoded + reused is every sample written.
    shard_encoder.reused = sum(len(json.loads((out_dir / s.sidecar).read_text())["samples"]) for s in mine
                               if s.path in complete)  # fmt: skip
    try:
        with progress_bar(total=sum(len(s.entries) for s in todo), desc="cache", unit="img") as bar:
            shard_encoder.write_all(todo, bar)
        if rank == 0:
            _write_shared_embeds(ctx, out_dir, plan, encoders)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise InputError(_disk_full_message(out_dir, plan, todo)) from None
        raise
    run_stats = {"encoded": shard_encoder.encoded, "reused_entries": shard_encoder.reused, "kept_shards": kept,
                 "part": [rank, world], "device": str(device), "loaded": encoders.loaded}  # fmt: skip
    if explicit_part is not None:
        _write_part(ctx, out_dir, plan, rank, world, run_stats)
        return CacheResult(out_dir, None, False, shard_encoder.encoded, shard_encoder.reused, reasons)
    if world > 1:
        barrier()
        if rank != 0:
            return CacheResult(out_dir, None, False, shard_encoder.encoded, shard_encoder.reused, reasons)
    run_stats["vae"] = _vae_description(ctx, encoders)
    doc = finalise(ctx, out_dir, plan, started, run_stats, claim)
    log.info("cache: %d samples in %d shards (%d encoded, %d reused) -> %s", doc["stats"]["samples"],
             len(doc["shards"]), shard_encoder.encoded, shard_encoder.reused, out_dir / MANIFEST_NAME)  # fmt: skip
    return CacheResult(out_dir, doc, False, shard_encoder.encoded, shard_encoder.reused, reasons)


def _as_recorded(out_dir: Path, shard: ShardPlan, recorded: dict[str, dict[str, Any]]) -> bool:
    """Whether a shard file still has the size and sha256 the previous manifest recorded (True if unrecorded)."""
    entry = recorded.get(shard.path)
    if entry is None:
        return True
    path = out_dir / shard.path
    return path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


def _vae_description(ctx: _Context, encoders: Encoders) -> dict[str, Any]:
    """Scaling/shift factors and channels from the VAE's config (read without loading weights when possible)."""
    source = ctx.settings["vae_source"] or ctx.settings["source"]
    path = Path(source)
    candidates = [path / "config.json", path / ctx.family.vae.subfolder / "config.json"] if path.is_dir() else []
    for candidate in candidates:
        if candidate.is_file():
            cfg = json.loads(candidate.read_text())
            if "scaling_factor" in cfg or "latent_channels" in cfg:
                channels = int(cfg.get("latent_channels", ctx.family.latent_channels))
                if channels != ctx.family.latent_channels:
                    raise InputError(f"the VAE at {candidate.parent} has {channels} latent channels, but "
                                     f"{ctx.family.name} needs {ctx.family.latent_channels}")  # fmt: skip
                return {"scaling_factor": float(cfg.get("scaling_factor", 0.18215)),
                        "shift_factor": None if cfg.get("shift_factor") is None else float(cfg["shift_factor"]),
                        "latent_channels": channels, "dtype": ctx.settings["vae_dtype"],
                        "class": cfg.get("_class_name", ctx.family.vae.class_name)}  # fmt: skip
    return encoders.vae_description()


def _check_sources(ctx: _Context, plan: CachePlan, out_dir: Path, previous: _PreviousEntries) -> None:
    """Source images of samples that must be encoded exist (else exit 2, or skip with ignore_missing_files). Entries
    the previous output already holds need no source: a cache can be extended where the old images are gone."""
    if ctx.loaded.config.ignore_missing_files:
        return
    missing = []
    for shard in plan.shards:
        if shard_complete(out_dir, shard):
            continue
        for entry in shard.entries:
            if entry.entry_key in previous.where:
                continue
            path = Path(ctx.roots[entry.row["dataset_id"]]) / entry.row["path"]
            if not path.is_file():
                missing.append(str(path))
    if missing:
        raise InputError(f"{len(missing)} source image(s) listed by {ctx.parent_path} are missing, e.g. {missing[0]}; "
                         "re-run `st prepare`, or set ignore_missing_files = true to skip them")  # fmt: skip


def _disk_full_message(out_dir: Path, plan: CachePlan, todo: list[ShardPlan]) -> str:
    free = shutil.disk_usage(out_dir).free
    done = [out_dir / s.path for s in plan.shards if (out_dir / s.path).is_file()]
    per_sample = (sum(p.stat().st_size for p in done) / max(1, sum(1 for _ in done))) if done else 0
    need = int(per_sample * len(todo)) if per_sample else 0
    need_text = f"about {need / 1e6:.0f} MB more" if need else "more space"
    return (f"the disk holding {out_dir} is full ({free / 1e6:.0f} MB free; the unfinished shard was discarded); "
            f"the remaining {len(todo)} shard(s) need {need_text}. Free space and re-run: completed shards are kept")


def _device():
    import torch

    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def _write_part(ctx: _Context, out_dir: Path, plan: CachePlan, rank: int, world: int, stats: dict[str, Any]) -> None:
    doc = {"schema": "st.cache-part/1", "key": ctx.key, "part": [rank, world],
           "shards": [s.path for i, s in enumerate(plan.shards) if i % world == rank], "stats": stats}  # fmt: skip
    atomic_write_text(out_dir / PART_NAME, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    log.info("cache: part %d/%d written to %s; combine the parts with `st cache-merge`", rank, world, out_dir)


def merge_parts(loaded: LoadedConfig, input_path: Path, parts: list[Path], out_dir: Path) -> CacheResult:
    """Combine the outputs of `st cache --part i/n` runs (made on machines sharing no filesystem) into one output."""
    with claim_output(out_dir, CACHE, inputs=[input_path, *parts]) as claim:
        return _merge_parts(claim, loaded, input_path, parts, Path(out_dir))


def _merge_parts(claim: OutputClaim, loaded: LoadedConfig, input_path: Path, parts: list[Path],
                 out_dir: Path) -> CacheResult:  # fmt: skip
    started = time.time()
    ctx = build_context(loaded, input_path)
    config = loaded.config
    latent_id, text_id = identities(ctx.model, ctx.settings)
    extra = validation_prompt_texts(loaded)
    plan = build_plan(ctx.rows, latent_identity=latent_id, text_identity=text_id, shard_samples=config.cache_shard_samples,
                      extra_prompts=extra, compression_level=config.cache_compression_level)  # fmt: skip
    seen: set[int] = set()
    world = None
    claim.will_write(*_planned_paths(plan, MANIFEST_NAME))
    for folder in parts:
        part_file = Path(folder) / PART_NAME
        if not part_file.is_file():
            raise InputError(f"{folder} is not the output of `st cache --part i/n` (no {PART_NAME})")
        doc = json.loads(part_file.read_text())
        if doc.get("key") != ctx.key:
            raise LineageError(f"{part_file} was made from other inputs or options than this merge (key "
                               f"{str(doc.get('key'))[:12]} vs {ctx.key[:12]}); run every part with the same config")
        rank, count = doc["part"]
        world = world or count
        if count != world:
            raise InputError(f"{part_file} is part {rank}/{count}, but other parts are of {world}")
        seen.add(rank)
        for shard in plan.shards:
            if shard.path in doc["shards"]:
                for rel in (shard.path, shard.sidecar):
                    target = out_dir / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(target) as tmp:
                        shutil.copyfile(Path(folder) / rel, tmp)
        if rank == 0:
            target = out_dir / EMBEDS_PATH
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copyfile(Path(folder) / EMBEDS_PATH, tmp)
    absent = sorted(set(range(world or 0)) - seen)
    if absent:
        raise InputError(f"parts {', '.join(map(str, absent))} of {world} are missing from the merge")
    encoders = Encoders(ctx.family, ctx.settings["source"], ctx.settings["vae_source"], ctx.settings["t5_source"],
                        config.revision, config.variant, ctx.settings["vae_dtype"], _device(),
                        speed=SpeedOptions.from_config(config))  # fmt: skip
    stats = {"vae": _vae_description(ctx, encoders), "merged_parts": len(parts)}
    doc = finalise(ctx, out_dir, plan, started, stats, claim)
    return CacheResult(out_dir, doc, False)

