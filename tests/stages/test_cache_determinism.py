"""A cached sample's bytes depend on the sample and the stage key only: never on which other samples share its VAE or
text-encoder batch, nor on how many samples a run encodes (incremental build == fresh build, byte for byte)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.cache.stage import run_cache
from pipeline.config import load_config
from pipeline.families import get_family
from pipeline.prepare.stage import run_prepare
from tests.helpers.files import write_config

SIZE = (96, 96)  # one 64x64 bucket at resolution 64: every sample shares its shard and batches with the others


@pytest.fixture(scope="module")
def sd1x(tiny_model) -> Path:
    return tiny_model("sd1x")


def noise_image(path: Path, seed: int) -> Path:
    """A photo-like image of coloured noise: its latents use every bit, so batch effects show up in bf16."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    path.with_suffix(".txt").write_text(f"noise picture number {seed}\n")
    return path


def dataset(folder: Path, model: Path) -> Path:
    """One dataset of noise images; latents stored in fp32, so a difference in any bit of the VAE output shows."""
    datasets = [{"id": "noise", "type": "local", "instance_data_dir": "images", "caption_strategy": "textfile",
                 "crop": False}]  # fmt: skip
    return write_config(folder, datasets, resolution=64, resolution_type="pixel_area", aspect_bucket_alignment=32,
                        model_family="sd1x", pretrained_model_name_or_path=str(model), seed=7, max_workers=0,
                        cache_dtype="fp32")  # fmt: skip


def build(config: Path, prep: Path, out: Path, *sets: str):
    loaded = load_config(config, list(sets))
    run_prepare(loaded, prep)
    return run_cache(loaded, prep, out)


def file_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file a user sees (not the manifest, whose provenance differs, nor hidden bookkeeping)."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"
            and not p.name.startswith(".")}  # fmt: skip


def test_incremental_cache_equals_fresh_build_byte_for_byte(sd1x, tmp_path):
    """5 images cached, 3 more added: every output file equals a fresh build of all 8. At vae_batch_size 4 the first
    build encodes its 5th image in a batch of its own, the fresh build in a batch of 4: unpadded, they would differ."""
    config = dataset(tmp_path / "data", sd1x)
    images = tmp_path / "data" / "images"
    for i in range(5):
        noise_image(images / f"{i:02d}.png", i)
    first = build(config, tmp_path / "prepare", tmp_path / "incremental")
    assert (first.encoded, first.manifest["stats"]["samples"]) == (5, 5)

    for i in range(5, 8):
        noise_image(images / f"{i:02d}.png", i)
    added = build(config, tmp_path / "prepare", tmp_path / "incremental")
    fresh = build(config, tmp_path / "prepare-fresh", tmp_path / "fresh")
    assert (added.encoded, added.reused) == (3, 5)
    assert (fresh.encoded, fresh.reused) == (8, 0)

    # Same shards (names, hashes, sizes), sidecars, index, shared embeddings.
    assert added.manifest["shards"] == fresh.manifest["shards"]
    assert added.manifest["outputs"] == fresh.manifest["outputs"]
    assert file_hashes(tmp_path / "incremental") == file_hashes(tmp_path / "fresh")
    assert added.manifest["digest"] == fresh.manifest["digest"]


def test_vae_batch_size_is_part_of_the_key(sd1x, tmp_path):
    """The VAE batch shape decides the last bits of each latent: changing it re-encodes, and says why."""
    config = dataset(tmp_path / "data", sd1x)
    for i in range(3):
        noise_image(tmp_path / "data" / "images" / f"{i:02d}.png", i)
    first = build(config, tmp_path / "prepare", tmp_path / "cache")
    again = run_cache(load_config(config, ["vae_batch_size=2"]), tmp_path / "prepare", tmp_path / "cache")
    assert not again.up_to_date and (again.encoded, again.reused) == (3, 0)
    assert "config key vae_batch_size changed: 4 -> 2" in again.reasons
    assert again.manifest["key"] != first.manifest["key"]


def test_a_sample_encodes_to_the_same_bytes_alone_or_with_neighbours(sd1x):
    """Encoders pad every VAE call to vae_batch_size rows and every text call to a fixed batch."""
    import torch

    from pipeline.cache.encode import Encoders

    encoders = Encoders(get_family("sd1x"), str(sd1x), None, None, None, None, "fp32", torch.device("cpu"))
    pixels = torch.rand((3, 3, 64, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1
    alone = encoders.encode_latents(pixels[:1], ["a"], seed=1, batch_size=4)
    together = encoders.encode_latents(pixels, ["a", "b", "c"], seed=1, batch_size=4)
    assert alone.shape[0] == 1 and together.shape[0] == 3
    assert torch.equal(alone[0], together[0])

    single = encoders.encode_prompts(["a red square"], None, "unmodified")
    crowd = encoders.encode_prompts([f"caption {i}" for i in range(20)] + ["a red square"], None, "unmodified")
    assert len(single) == 1 and len(crowd) == 21
    assert torch.equal(single[0]["prompt_embeds"], crowd[-1]["prompt_embeds"])
