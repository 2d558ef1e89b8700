"""Benchmark `st cache`: a cold run over N generated, captioned JPEGs with a tiny model, an up-to-date re-run, and
the size of what it writes.

Baseline, in the same process and with the same VAE: a bare loop that only calls the VAE encoder
(`vae.encode(x).latent_dist.sample()`) on pixel tensors already decoded, resized and cropped in memory, batched as
`st cache` batches them (per bucket, `vae_batch_size` at a time), timed after one warm-up batch. `st cache` is timed
end to end in process: context and hashing, model loading, image decoding and resizing, text encoding, latent
sampling, zstd compression, shard writing (fsync) and the index and manifest. Both use `torch.set_num_threads(cores)`
(`--threads` to change). Bare and st runs alternate `--repeats` times; the ratio uses the best of each (on a shared VM
single runs vary 2-5x), medians are shown too, and the time st spends inside `Encoders.encode_latents` (VAE load,
encode, noise) gives the share of st's wall time that is VAE work, a figure that noise moves much less.

Sizes: the shards' bytes per sample against one uncompressed `torch.save` file per sample holding the same tensors
(latent in the cache dtype, text embeddings padded to full length as `family.collate_text` gives them), and the zstd
ratio of the tensor members (safetensors bytes / compressed bytes).

Run: `.venv/bin/python bench/cache.py [--images 64] [--family sd1x] [--repeats 5] [--json out.json]
[--profile out.txt] [--set max_workers=0]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (width, height) of the generated JPEGs; at resolution 128 (pixel area), alignment 32 they land in three buckets
# (square, landscape, portrait) and every one is downscaled, as real photos are.
SIZES = ((256, 256), (320, 240), (240, 320), (288, 288))
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "diamond")


def generate(folder: Path, count: int) -> None:
    """`count` unique JPEGs (noise plus a shape, an id pattern) with unique `.txt` captions (stored per sample)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    base = {s: Image.effect_noise(s, 40).convert("RGB") for s in SIZES}
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        img = base[size].copy()
        draw = ImageDraw.Draw(img)
        colour, shape = COLOURS[(i // len(SHAPES)) % len(COLOURS)], SHAPES[i % len(SHAPES)]
        w, h = size
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        for bit in range(20):  # the image number as black/white blocks: every file (and sample id) is unique
            shade = 255 if (i >> bit) & 1 else 0
            img.paste((shade, shade, shade), (8 * bit, 0, 8 * bit + 8, 8))
        img.save(folder / f"{i:06d}.jpg", quality=90)
        (folder / f"{i:06d}.txt").write_text(f"photo number {i} of a {colour} {shape} on a noisy background\n")


def write_config(work: Path, family: str, model: Path) -> Path:
    datasets = [{"id": "bench", "type": "local", "instance_data_dir": "images", "caption_strategy": "textfile",
                 "crop": False}]  # fmt: skip
    (work / "multidatabackend.json").write_text(json.dumps(datasets, indent=2) + "\n")
    config = {
        "--data_backend_config": "multidatabackend.json",
        "--resolution": 128,
        "--resolution_type": "pixel_area",
        "--aspect_bucket_alignment": 32,
        "--model_family": family,
        "--pretrained_model_name_or_path": str(model),
        "--vae_batch_size": 8,
        "--seed": 0,
    }
    path = work / "config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def preloaded_batches(prepare_dir: Path, batch_size: int) -> list:
    """The pixel batches `st cache` will encode (same buckets, order and batch size), decoded and resized up front."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.cache.images import job_for, load_pixels

    manifest = json.loads((prepare_dir / "manifest.json").read_text())
    roots = {d["id"]: d["root"] for d in manifest["datasets"]}
    rows = pq.read_table(prepare_dir / "samples.parquet").to_pylist()
    groups: dict[tuple[str, str], list] = {}
    for row in rows:
        groups.setdefault((row["dataset_id"], row["bucket"]), []).append(row)
    batches = []
    for (_, _), members in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        members.sort(key=lambda r: r["sample_id"])
        pixels = [load_pixels(job_for(r, roots[r["dataset_id"]])) for r in members]
        batches += [torch.stack(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    return batches


def bare_encode(vae, batches: list) -> float:
    """Seconds to encode every batch (after one warm-up batch, not counted)."""
    import torch

    with torch.no_grad():
        vae.encode(batches[0]).latent_dist.sample()
        t = time.perf_counter()
        for x in batches:
            vae.encode(x).latent_dist.sample()
        return time.perf_counter() - t


def sizes(out_dir: Path, family, scratch: Path) -> dict:
    """Shard bytes vs one uncompressed torch.save file per sample, and the zstd ratio of the tensor members."""
    import torch
    import zstandard

    from pipeline.cache_reader import CacheReader
    from pipeline.shards import read_shard

    reader = CacheReader(out_dir)
    manifest = reader.manifest
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    output_bytes = sum(o["bytes"] for o in manifest["outputs"]) + (out_dir / "manifest.json").stat().st_size
    raw = {"latent": 0, "text": 0}
    packed = {"latent": 0, "text": 0}
    decompressor = zstandard.ZstdDecompressor()
    for shard in manifest["shards"]:
        for _, members in read_shard(out_dir / shard["path"], expected_sha256=shard["sha256"]):
            for name, data in members.items():
                if name.endswith(".safetensors.zst"):
                    kind = "latent" if name.startswith("latent") else "text"
                    packed[kind] += len(data)
                    raw[kind] += len(decompressor.decompress(data))
    scratch.mkdir(parents=True, exist_ok=True)
    samples = 0
    plain_bytes = 0
    for sample in reader:
        tensors = {"latent": sample.latent}
        for i, text in enumerate(sample.texts):
            full = family.collate_text([text])  # padded to full length, as training receives them
            tensors.update({f"{i}.{k}": v[0].clone() for k, v in full.items()})
        path = scratch / f"{sample.key}.pt"
        torch.save(tensors, path)
        plain_bytes += path.stat().st_size
        samples += 1
    one = next(iter(reader))
    return {
        "samples": samples,
        "latent_shape": list(one.latent.shape),
        "latent_dtype": str(one.latent.dtype).replace("torch.", ""),
        "text_shapes": {k: list(v.shape[1:]) for k, v in family.collate_text([one.texts[0]]).items()},
        "shard_bytes_per_sample": round(shard_bytes / samples),
        "output_bytes_per_sample": round(output_bytes / samples),
        "torch_save_bytes_per_sample": round(plain_bytes / samples),
        "ratio_torch_save_over_shards": round(plain_bytes / shard_bytes, 2),
        "zstd_ratio_all": round(sum(raw.values()) / sum(packed.values()), 2),
        "zstd_ratio_latent": round(raw["latent"] / packed["latent"], 2),
        "zstd_ratio_text": round(raw["text"] / packed["text"], 2) if packed["text"] else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--family", default="sd1x")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile one more cold run; write the top here")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved bare/st cold runs; the best of each gives the ratio (medians shown too)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both (default: the CPU count)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the st cache runs (e.g. max_workers=0), repeatable")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    args = parser.parse_args()

    import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(args.threads or cores)  # for the baseline and st cache alike (same process)

    from pipeline.cache.encode import Encoders
    from pipeline.cache.stage import run_cache
    from pipeline.config import load_config
    from pipeline.families import get_family, load_components
    from pipeline.prepare.stage import run_prepare

    family = get_family(args.family)
    work = Path(tempfile.mkdtemp(prefix="st-bench-cache-"))
    try:
        t = time.perf_counter()
        family.tiny(work / "model", 0)
        generate(work / "images", args.images)
        config = write_config(work, family.name, work / "model")
        prepared = run_prepare(load_config(config), work / "prepare")
        setup_s = time.perf_counter() - t
        buckets = prepared.manifest["buckets"]
        loaded = load_config(config, args.set)
        batch_size = loaded.config.vae_batch_size

        # Baseline: the VAE alone on tensors already in memory.
        t = time.perf_counter()
        vae = load_components(family, str(work / "model"), which=("vae",), dtype=torch.float32)["vae"].eval()
        vae.requires_grad_(False)
        vae_load_s = time.perf_counter() - t
        batches = preloaded_batches(work / "prepare", batch_size)
        images = sum(len(b) for b in batches)

        # Time spent inside the VAE during st cache (a wrapper, for the breakdown only): noise on this machine
        # slows the VAE and the rest alike, so the share is steadier than the absolute times.
        inside = [0.0]
        encode_latents = Encoders.encode_latents

        def timed_encode_latents(self, *a, **k):
            t = time.perf_counter()
            try:
                return encode_latents(self, *a, **k)
            finally:
                inside[0] += time.perf_counter() - t

        Encoders.encode_latents = timed_encode_latents

        def st_cold(name: str) -> tuple[float, float]:
            inside[0] = 0.0
            t = time.perf_counter()
            result = run_cache(load_config(config, args.set), work / "prepare", work / name)
            elapsed = time.perf_counter() - t
            assert result.encoded == images and result.manifest["stats"]["samples"] == images, (result.encoded, images)
            return elapsed, inside[0]

        # Interleaved repeats (bare, then st cache into a fresh folder) so that machine noise hits both alike.
        bare_runs, cold_runs, vae_runs = [], [], []
        for i in range(args.repeats):
            bare_runs.append(bare_encode(vae, batches))
            if i:
                shutil.rmtree(work / "cache-again", ignore_errors=True)
            elapsed, in_vae = st_cold("cache" if i == 0 else "cache-again")
            cold_runs.append(elapsed)
            vae_runs.append(in_vae)
        best = cold_runs.index(min(cold_runs))
        bare_s, cold_s = min(bare_runs), min(cold_runs)
        bare_med, cold_med = statistics.median(bare_runs), statistics.median(cold_runs)
        t = time.perf_counter()
        warm = run_cache(load_config(config, args.set), work / "prepare", work / "cache")
        warm_s = time.perf_counter() - t
        assert warm.up_to_date
        Encoders.encode_latents = encode_latents

        size = sizes(work / "cache", family, work / "torch-save")

        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            run_cache(load_config(config, args.set), work / "prepare", work / "cache-profiled")
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("cumulative").print_stats(45)
            stats.sort_stats("tottime").print_stats(30)
            args.profile.write_text(out.getvalue())

        figures = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {cores} cores, {platform.python_implementation()} "
            f"{platform.python_version()}, {platform.system()} {platform.release()}",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "family": family.name,
            "images": images,
            "buckets": buckets,
            "vae_batch_size": batch_size,
            "setup_s": round(setup_s, 2),
            "vae_load_s": round(vae_load_s, 3),
            "overrides": list(args.set),
            "repeats": args.repeats,
            "bare_vae_encode_s_runs": [round(x, 3) for x in bare_runs],
            "st_cold_s_runs": [round(x, 3) for x in cold_runs],
            "bare_best_s": round(bare_s, 3),
            "bare_images_per_s": round(images / bare_s, 1),
            "st_cold_best_s": round(cold_s, 3),
            "st_cold_images_per_s": round(images / cold_s, 1),
            "ratio_st_over_bare": round(bare_s / cold_s, 2),
            "ratio_st_over_bare_medians": round(bare_med / cold_med, 2),
            "st_best_run_s_in_encode_latents": round(vae_runs[best], 3),
            "st_best_run_s_outside_encode_latents": round(cold_runs[best] - vae_runs[best], 3),
            "st_vae_share_runs": [round(v / c, 2) for v, c in zip(vae_runs, cold_runs)],
            "st_vae_share_median": round(statistics.median(v / c for v, c in zip(vae_runs, cold_runs)), 2),
            "st_up_to_date_rerun_s": round(warm_s, 3),
            **size,
        }
        width = max(map(len, figures))
        for key, value in figures.items():
            print(f"{key.ljust(width)}  {value}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
