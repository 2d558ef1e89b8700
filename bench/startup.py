"""Benchmark the start of training: time to the first optimizer step for caches of 1k and 50k samples.

Caches are built synthetically through the real writer (`shardformat.encode_sample`, `ShardWriter`, the sidecar with
the shard index, a manifest `read_manifest` accepts), with tiny latents (4x8x8 fp16, one shared by every sample) and
shared captions, 256 samples to a shard (`cache_shard_samples`' default). Each start
is a fresh Python process that imports st, reads the manifest, builds the training index (`CacheIndex`), plans the
epoch, loads the first batch through `TrainLoader` and takes one optimizer step of a small convolution on it. The
train step is the same for both caches, so the target is on the time to the first batch ready (the first step is
reported too: torch's lazy first-step work makes it the noisiest phase). Starts are cold (a fresh verification record:
the first batch's shard is hashed) and warm (best of `--repeats` later starts).

Baseline, in the same process: what the index did before the writer recorded offsets (and what it does for a cache
written without them): read and sha256 every shard whole and decompress every member of every sample.
Index memory: tracemalloc around `CacheIndex`. Run: `.venv/bin/python bench/startup.py [--sizes 1000 50000]`;
`--quick` for a smoke run (small caches, no targets).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PER_SHARD = 256  # st cache's default cache_shard_samples
BUCKET = "64x64"
PROMPT_KEY = "e3b0c44298fc1c14"
DATASET = "bench"


def _meta(key: str) -> dict:
    return {"sample_id": key, "dataset_id": DATASET, "path": f"{key[:12]}.jpg", "captions": ["a bench photo"],
            "text": [f"shared:{PROMPT_KEY}"], "bucket": BUCKET, "repeats": 0, "original_size": [64, 64],
            "target_size": [64, 64], "intermediate_size": [64, 64], "crop_top_left": [0, 0]}  # fmt: skip


def build(out: Path, samples: int, per_shard: int = PER_SHARD) -> Path:
    """A cache folder of `samples` samples, `per_shard` to a shard, written through the shard format's writer."""
    import torch

    from pipeline.fsutil import atomic_write_text
    from pipeline.hashing import sha256_file
    from pipeline.manifest import finalise, provenance, read_manifest
    from pipeline.shardformat import ShardWriter, encode_sample, pack_json, pack_tensors

    out.mkdir(parents=True)
    latent = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    # Every sample shares one latent (its bytes encoded once); keys and JSON members differ.
    template = encode_sample(_meta("0"), latent)
    shards, outputs = [], []
    for first in range(0, samples, per_shard):
        rel = f"shards/{BUCKET}/{DATASET}-{first // per_shard:06d}.tar"
        with ShardWriter(out / rel) as writer:
            for i in range(first, min(first + per_shard, samples)):
                key = hashlib.sha256(str(i).encode()).hexdigest()
                writer.add(key, {**template, "json": pack_json(_meta(key))})
            sidecar = {"shard_key": rel, "samples": writer.keys, "rejected": {}, "index": writer.index_doc()}
            atomic_write_text(out / rel.replace(".tar", ".json"), json.dumps(sidecar, sort_keys=True) + "\n")
        shards.append({"path": rel, "sha256": writer.sha256, "bytes": writer.bytes, "samples": writer.samples,
                       "bucket": BUCKET, "dataset_id": DATASET})  # fmt: skip
        for path in (rel, rel.replace(".tar", ".json")):
            outputs.append({"path": path, "sha256": sha256_file(out / path), "bytes": (out / path).stat().st_size})
    embeds = "embeds/shared.safetensors.zst"
    (out / "embeds").mkdir()
    (out / embeds).write_bytes(pack_tensors({f"{PROMPT_KEY}.prompt_embeds": torch.zeros(77, 32).half()}))
    outputs.append({"path": embeds, "sha256": sha256_file(out / embeds), "bytes": (out / embeds).stat().st_size})
    doc = {"schema": "st.cache/1", "stage": "cache", "key": "0" * 64, "parent": {"stage": "prepare", "digest": "0" * 64},
           "config": {}, "family": "sd1x", "model": {"vae": _component("vae"), "text_encoders": [], "tokenizers": []},
           "vae": {"scaling_factor": 0.18215, "shift_factor": None, "latent_channels": 4, "dtype": "fp32",
                   "class": "AutoencoderKL"},
           "text": {"max_lengths": [77], "tokenizer_max_length": None, "t5_padding": "unmodified", "trimmed": False,
                    "token_ids": False},
           "cache_dtype": "fp16", "embeds": {"path": embeds, "prompts": {PROMPT_KEY: ""}, "empty": PROMPT_KEY},
           "shards": shards, "buckets": {BUCKET: samples},
           "datasets": [{"id": DATASET, "samples": samples, "buckets": {BUCKET: samples}, "repeats": 0,
                         "probability": 1.0}],
           "outputs": outputs, "stats": {"samples": samples, "skipped": {}, "shards": len(shards)},
           "provenance": provenance(time.time(), time.time(), bench="startup")}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(finalise(doc), indent=2, sort_keys=True) + "\n")
    read_manifest(out, stage="cache")  # a manifest st accepts
    return out


def _component(subfolder: str) -> dict:
    return {"source": "bench", "subfolder": subfolder, "revision": None, "config_sha256": "0" * 64,
            "weights_sha256": "0" * 64, "files": {}}  # fmt: skip


# The start measured in a fresh process: imports, manifest, index, plan, first batch, one optimizer step.
START = r"""
import sys, time, json
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[2])
import torch
from pipeline.manifest import read_manifest
from pipeline.train.data import CacheIndex, Cursor, EpochPlanner, TrainLoader
t_import = time.perf_counter()
root = sys.argv[1]
manifest = read_manifest(root, stage="cache")
index = CacheIndex(__import__("pathlib").Path(root), manifest)
planner = EpochPlanner(index, seed=0, global_batch=1, sampling="auto-weighting")
t_index = time.perf_counter()
shared = {manifest["embeds"]["empty"]: {"prompt_embeds": torch.zeros(77, 32)}}
loader = TrainLoader(index, planner, rank=0, world=1, shared_text=shared, empty_key=manifest["embeds"]["empty"],
                     caption_dropout=0.0, seed=0, prefetch=0)
batch = next(iter(loader.iterate(Cursor(), 1)))
t_batch = time.perf_counter()
torch.manual_seed(0)
model = torch.nn.Conv2d(4, 4, 3, padding=1)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(batch.latents).pow(2).mean().backward()
optimizer.step()
t_step = time.perf_counter()
print(json.dumps({"imports": t_import - t0, "index": t_index - t_import, "first_batch": t_batch - t_index,
                  "to_first_batch": t_batch - t0, "to_first_step": t_step - t0}))
"""


def start(cache: Path, state: Path) -> dict:
    """One training start in a fresh process (verification records under `state`); its phases in seconds, and the
    whole process's wall time."""
    env = {**os.environ, "ST_STATE_DIR": str(state)}
    begun = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", START, str(cache), str(ROOT)], env=env, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"the start failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process"] = time.perf_counter() - begun
    return figures


def index_memory(cache: Path) -> int:
    """Bytes allocated by building the training index, tracemalloc's peak."""
    import tracemalloc

    from pipeline.manifest import read_manifest
    from pipeline.train.data import CacheIndex

    manifest = read_manifest(cache, stage="cache")
    tracemalloc.start()
    index = CacheIndex(cache, manifest)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(index.samples) == manifest["stats"]["samples"]
    return current


def baseline(cache: Path) -> float:
    """The old start: every shard read whole and hashed, every member of every sample decompressed."""
    from pipeline.manifest import read_manifest
    from pipeline.shardformat import CacheChecks, read_shard

    began = time.perf_counter()
    manifest = read_manifest(cache, stage="cache")
    checks = CacheChecks(manifest)
    for shard in manifest["shards"]:
        path = cache / shard["path"]
        for key, members in read_shard(path, expected_sha256=shard["sha256"], expected_bytes=shard["bytes"]):
            checks.check_sample(path, shard, key, members, decompress=True)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs=2, default=[1_000, 50_000])
    parser.add_argument("--repeats", type=int, default=5, help="warm starts per size (the best is reported)")
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 samples, one start each, no targets")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    sizes, repeats = ([100, 1_000], 1) if args.quick else (args.sizes, args.repeats)

    import torch

    figures: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, CPython {platform.python_version()}, "
                                f"torch {torch.__version__}"}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="st-bench-startup-"))
    try:
        for samples in sizes:
            began = time.perf_counter()
            cache = build(work / f"cache-{samples}", samples)
            row: dict = {"build_s": time.perf_counter() - began}
            state = work / f"state-{samples}"
            row["cold"] = start(cache, state)
            row["warm"] = min((start(cache, state) for _ in range(repeats)), key=lambda f: f["to_first_batch"])
            row["index_bytes_per_sample"] = index_memory(cache) / samples
            row["baseline_s"] = baseline(cache)
            figures[str(samples)] = row
            warm, cold = row["warm"], row["cold"]
            print(f"{samples:>7,} samples: first batch ready {warm['to_first_batch']:.3f} s warm, "
                  f"{cold['to_first_batch']:.3f} s cold (imports {warm['imports']:.3f} s, manifest + index + plan "
                  f"{warm['index']:.3f} s, first batch {warm['first_batch']:.3f} s); first step "
                  f"{warm['to_first_step']:.3f} s; index memory {row['index_bytes_per_sample']:.0f} B/sample; "
                  f"baseline (read + hash + decompress all) {row['baseline_s']:.3f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, large = (figures[str(s)] for s in sizes)
    for kind in ("warm", "cold"):
        for until in ("to_first_batch", "to_first_step"):
            figures[f"ratio_{kind}_{until}"] = large[kind][until] / small[kind][until]
    print(f"ratio {sizes[1]:,} / {sizes[0]:,}, first batch ready: {figures['ratio_warm_to_first_batch']:.2f} warm, "
          f"{figures['ratio_cold_to_first_batch']:.2f} cold; first optimizer step (target < 1.5): "
          f"{figures['ratio_warm_to_first_step']:.2f} warm, {figures['ratio_cold_to_first_step']:.2f} cold; index memory "
          f"{large['index_bytes_per_sample']:.0f} B/sample (target < 1024)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    # The target (issue: time to the first optimizer step, 50k / 1k samples, below 1.5; index below 1 KB a sample).
    if not args.quick and (figures["ratio_warm_to_first_step"] >= 1.5 or large["index_bytes_per_sample"] >= 1024):
        sys.exit(1)


if __name__ == "__main__":
    main()
