"""Paired data through prepare and cache: conditioning images found by path, aligned with their target, stored in the
sample, re-encoded only when they change; mask, eval and regularisation datasets reach the training batches."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cache.images import job_for, load_pixels
from pipeline.cache.stage import run_cache
from pipeline.cache_reader import CacheReader
from pipeline.config import load_config
from pipeline.prepare.stage import run_prepare
from pipeline.train.data import CacheIndex, Cursor, EpochPlanner, TrainLoader
from tests.helpers.files import make_image, write_config
from tests.helpers.training import ST, st_env

COLOURS = [(200, 30, 30), (30, 160, 60), (40, 60, 200), (220, 200, 40)]


def _rows(prepare: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(prepare / "samples.parquet").to_pylist()


def _skips(prepare: Path) -> list[dict]:
    return [json.loads(line) for line in (prepare / "skipped.jsonl").read_text().splitlines()]


def _photo(path: Path, colour, size=(96, 96)) -> Path:
    """A picture with structure (a bar at one side), so that resizing or misalignment shows in its pixels."""
    make_image(path, size=size, colour=colour)
    img = Image.open(path).convert("RGB")
    img.paste((250, 250, 250), (0, 0, size[0] // 4, size[1]))
    img.save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=95)
    return path


def _datasets(**image_keys) -> list[dict]:
    return [
        {"id": "photos", "instance_data_dir": "images", "caption_strategy": "filename", "conditioning_data": "ctrl",
         **image_keys},
        {"id": "ctrl", "dataset_type": "conditioning", "instance_data_dir": "ctrl", "resolution": 96, "crop": False},
        {"id": "held", "dataset_type": "eval", "instance_data_dir": "held", "caption_strategy": "filename"},
        {"id": "reg", "instance_data_dir": "reg", "caption_strategy": "filename", "is_regularisation_data": True},
        {"id": "masks", "dataset_type": "conditioning", "conditioning_type": "mask", "instance_data_dir": "masks",
         "source_dataset_id": "reg"},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def paired_sd1x(tmp_path_factory, tiny_model):
    """Four photos with conditioning images found four ways (same path, same path at twice the size, same stem as
    .png, in a subfolder) and one without; an eval dataset; a regularisation dataset with masks; prepared and
    cached for the tiny sd1x model."""
    root = tmp_path_factory.mktemp("paired-sd1x")
    data = root / "data"
    a = _photo(data / "images/a.png", COLOURS[0])
    b = _photo(data / "images/b.png", COLOURS[1])
    c = _photo(data / "images/c.jpg", COLOURS[2])
    d = _photo(data / "images/sub/d.png", COLOURS[3])
    _photo(data / "images/e.png", (90, 90, 90))  # no partner
    (data / "ctrl/sub").mkdir(parents=True)
    (data / "masks").mkdir()
    shutil.copy(a, data / "ctrl/a.png")
    Image.open(b).resize((192, 192), Image.Resampling.LANCZOS).save(data / "ctrl/b.png")
    Image.open(c).save(data / "ctrl/c.png")
    shutil.copy(d, data / "ctrl/sub/d.png")
    for i in range(2):
        _photo(data / f"held/h{i}.png", (10 + 40 * i, 200, 200))
        _photo(data / f"reg/r{i}.png", (200, 10 + 40 * i, 200))
        mask = Image.new("RGB", (96, 96), (0, 0, 0))
        mask.paste((255, 255, 255), (48, 0, 96, 96))
        mask.save(data / f"masks/r{i}.png")
    config = write_config(data, _datasets(), model_family="sd1x", pretrained_model_name_or_path=str(tiny_model("sd1x")),
                          resolution=96, resolution_type="pixel_area", aspect_bucket_alignment=32,
                          cache_dtype="fp32")  # fmt: skip
    loaded = load_config(config)
    run_prepare(loaded, root / "prepare")
    run_cache(loaded, root / "prepare", root / "cache")
    return root, config


def test_prepare_pairs_by_relative_path_or_stem_and_skips_samples_without_a_partner(paired_sd1x):
    root, _ = paired_sd1x
    rows = {r["path"]: r for r in _rows(root / "prepare")}
    partners = {path: [(c["dataset_id"], c["path"], c["kind"]) for c in row.get("conditioning") or []]
                for path, row in rows.items()}  # fmt: skip
    assert partners["a.png"] == [("ctrl", "a.png", "controlnet")]
    assert partners["b.png"] == [("ctrl", "b.png", "controlnet")]
    assert partners["c.jpg"] == [("ctrl", "c.png", "controlnet")]  # same stem, another extension
    assert partners["sub/d.png"] == [("ctrl", "sub/d.png", "controlnet")]
    assert partners["r0.png"] == [("masks", "r0.png", "mask")]  # linked by source_dataset_id
    assert partners["h0.png"] == []
    [skip] = [s for s in _skips(root / "prepare") if s["path"] == "e.png"]
    assert skip["reason"] == "missing_conditioning" and "e.png" in skip["detail"] and "'ctrl'" in skip["detail"]
    manifest = json.loads((root / "prepare/manifest.json").read_text())
    by_id = {d["id"]: d for d in manifest["datasets"]}
    assert by_id["held"]["dataset_type"] == "eval" and by_id["reg"]["is_regularisation_data"] is True
    assert by_id["reg"]["conditioning_data"] == ["masks"]
    assert {c["id"]: c["paired"] for c in manifest["conditioning_datasets"]} == {"ctrl": 4, "masks": 2}


def test_cache_stores_each_conditioning_image_aligned_with_its_target(paired_sd1x):
    root, _ = paired_sd1x
    rows = {r["sample_id"]: r for r in _rows(root / "prepare")}
    stored = {s.meta["path"]: (s, rows[s.key]) for s in CacheReader(root / "cache")}
    for path in ("a.png", "sub/d.png"):  # a byte-identical copy of the target: exactly the target's pixels
        sample, row = stored[path]
        target = load_pixels(job_for({**row, "conditioning": None}, str(root / "data/images")))
        expected = ((target + 1) * 127.5).round().byte()
        assert sample.conditioning["0.pixels"].equal(expected), path
        assert sample.meta["conditioning"] == [{"dataset_id": "ctrl", "path": path, "kind": "controlnet"}]
    sample, row = stored["b.png"]  # twice the size: resized to the target's size first, so still aligned
    target = ((load_pixels(job_for({**row, "conditioning": None}, str(root / "data/images"))) + 1) * 127.5).round()
    assert sample.conditioning["0.pixels"].shape == target.shape
    assert (sample.conditioning["0.pixels"].float() - target).abs().mean() < 3
    assert "0.latent" not in sample.conditioning  # sd1x's ControlNet takes pixels
    assert not stored["h0.png"][0].conditioning


def test_batches_carry_conditioning_masks_and_regularisation_and_never_eval_samples(paired_sd1x):
    root, _ = paired_sd1x
    reader = CacheReader(root / "cache")
    index = CacheIndex(root / "cache", reader.manifest)
    planner = EpochPlanner(index, seed=0, global_batch=1, sampling="uniform")
    loader = TrainLoader(index, planner, rank=0, world=1, shared_text=reader.shared_embeds(),
                         empty_key=reader.manifest["embeds"]["empty"], caption_dropout=0.0, seed=0,
                         prefetch=0)  # fmt: skip
    batches = list(loader.iterate(Cursor(), 1))
    assert {b.dataset_id for b in batches} == {"photos", "reg"}  # the eval dataset never trains
    assert len(batches) == 6 and index.eval_keys() == sorted(k for (d, _), ks in index.groups.items() if d == "held"
                                                             for k in ks)  # fmt: skip
    for batch in batches:
        width, height = batch.meta[0]["target_size"]
        if batch.dataset_id == "photos":
            assert batch.control_pixels.shape == (1, 3, height, width) and batch.mask_pixels is None
            assert -1 <= batch.control_pixels.min() and batch.control_pixels.max() <= 1
            assert not batch.regularisation
        else:
            assert batch.regularisation and batch.control_pixels is None and batch.mask_kind == "mask"
            left, right = batch.mask_pixels[0, 0, :, :40], batch.mask_pixels[0, 0, :, 56:]
            assert bool((left == -1).all()) and bool((right == 1).all())


def test_a_changed_conditioning_image_reencodes_only_its_sample(paired_sd1x, tmp_path):
    root, _ = paired_sd1x
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    config = data / "config.json"
    shutil.copytree(root / "prepare", tmp_path / "prepare")
    shutil.copytree(root / "cache", tmp_path / "cache")
    Image.open(data / "ctrl/a.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "ctrl/a.png")
    loaded = load_config(config)
    run_prepare(loaded, tmp_path / "prepare")
    result = run_cache(loaded, tmp_path / "prepare", tmp_path / "cache")
    assert (result.encoded, result.reused) == (1, 7)
    assert subprocess.run([ST, "verify", str(tmp_path / "cache")], env=st_env(), capture_output=True).returncode == 0


def test_a_conditioning_dataset_paired_with_nothing_is_refused_with_the_fix(tmp_path):
    data = tmp_path / "data"
    _photo(data / "images/a.png", COLOURS[0])
    _photo(data / "ctrl/a.png", COLOURS[1])
    datasets = _datasets()[:2]
    del datasets[0]["conditioning_data"]
    config = write_config(data, datasets)
    done = subprocess.run([ST, "prepare", "-c", str(config), "-o", str(tmp_path / "out")], env=st_env(),
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "conditioning dataset 'ctrl' is paired with nothing" in done.stderr
    assert '"conditioning_data": "ctrl"' in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_latent_model_caches_conditioning_latents_and_masks_as_pixels_only(paired):
    root, _ = paired("flux", ("controlnet", "mask"))
    sample = next(iter(CacheReader(root / "cache")))
    kinds = [c["kind"] for c in sample.meta["conditioning"]]
    assert kinds == ["controlnet", "mask"]
    assert sample.conditioning["0.latent"].shape == sample.latent.shape
    assert "1.latent" not in sample.conditioning and sample.conditioning["1.pixels"].dtype.is_floating_point is False


def test_generated_conditioning_is_written_into_the_prepare_output_and_regenerated_only_when_its_options_change(
        tmp_path):  # fmt: skip
    data = tmp_path / "data"
    for i, colour in enumerate(COLOURS[:2]):
        _photo(data / f"images/p{i}.png", colour)
    generators = [{"type": "canny", "low_threshold": 50, "high_threshold": 150}]
    datasets = [{"id": "photos", "instance_data_dir": "images", "caption_strategy": "filename",
                 "conditioning": generators}]  # fmt: skip
    config = write_config(data, datasets, resolution=96, resolution_type="pixel_area", aspect_bucket_alignment=32)
    out = tmp_path / "prepare"
    run_prepare(load_config(config), out)
    rows = _rows(out)
    [partner] = rows[0]["conditioning"]
    assert partner["dataset_id"] == "photos_conditioning_canny" and partner["kind"] == "controlnet"
    edges = out / "conditioning/photos_conditioning_canny" / partner["path"]
    with Image.open(edges) as img:
        assert img.size == (96, 96)
        column = [img.getpixel((24, y))[0] for y in range(96)]  # the bar's edge at x = 24 is an edge everywhere
    assert max(column) == 255
    before = edges.stat().st_mtime_ns
    assert run_prepare(load_config(config), out).up_to_date
    generators[0]["low_threshold"] = 20
    write_config(data, datasets, resolution=96, resolution_type="pixel_area", aspect_bucket_alignment=32)
    run_prepare(load_config(config), out)
    assert edges.stat().st_mtime_ns != before
    done = subprocess.run([ST, "verify", str(out)], env=st_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_crafted_conditioning_member_is_refused_by_name(paired_sd1x, tmp_path):
    import torch

    from pipeline.shards import ShardWriter, pack_tensors, read_shard
    from tests.helpers.untrusted import manifest_of, rehash

    root, _ = paired_sd1x
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache)
    shard = next(s for s in manifest_of(cache)["shards"] if s["dataset_id"] == "photos")
    path = cache / shard["path"]
    samples = list(read_shard(path, expected_sha256=None))
    key, members = samples[0]
    members["cond.safetensors.zst"] = pack_tensors({"0.pixels": torch.zeros(3, 4, 4, dtype=torch.uint8)})
    path.unlink()
    with ShardWriter(path) as writer:
        for name, sample_members in samples:
            writer.add(name, sample_members)
    rehash(cache)  # an attacker can always rewrite the manifest too
    done = subprocess.run([ST, "verify", str(cache)], env=st_env(), capture_output=True, text=True)
    assert done.returncode != 0
    assert f"{key}.cond.safetensors.zst" in done.stdout + done.stderr and "expected U8 [3," in done.stdout + done.stderr


def test_a_generated_dataset_with_captions_captions_the_samples_that_train_with_it(tmp_path, tiny_model):
    from pipeline.prompts import prompt_key

    data = tmp_path / "data"
    for i, colour in enumerate(COLOURS):
        _photo(data / f"images/p{i}.png", colour)
    generators = [{"type": "canny", "captions": "edges of a shape"}, {"type": "superresolution"}]
    datasets = [{"id": "photos", "instance_data_dir": "images", "caption_strategy": "filename",
                 "conditioning": generators}]  # fmt: skip
    config = write_config(data, datasets, model_family="sd1x", pretrained_model_name_or_path=str(tiny_model("sd1x")),
                          resolution=96, resolution_type="pixel_area", aspect_bucket_alignment=32)  # fmt: skip
    loaded = load_config(config)
    run_prepare(loaded, tmp_path / "prepare")
    row = _rows(tmp_path / "prepare")[0]
    assert row["captions"] == ["p0", "edges of a shape"]
    assert [c["captions"] for c in row["conditioning"]] == [[1], []]
    run_cache(loaded, tmp_path / "prepare", tmp_path / "cache")
    reader = CacheReader(tmp_path / "cache")
    index = CacheIndex(tmp_path / "cache", reader.manifest)
    shared = reader.shared_embeds()
    loader = TrainLoader(index, EpochPlanner(index, seed=0, global_batch=1, sampling="uniform"), rank=0, world=1,
                         shared_text=shared, empty_key=reader.manifest["embeds"]["empty"], caption_dropout=0.0,
                         seed=0, prefetch=0)  # fmt: skip
    edges_caption = shared[prompt_key("edges of a shape")]
    seen = set()
    for batch in loader.iterate(Cursor(), 4):
        ref = index.samples[batch.keys[0]]
        chosen = loader._chosen_control(ref, f"0:{batch.epoch}:{batch.index}:0:{batch.keys[0]}:conditioning")
        kind = ref.meta["conditioning"][chosen]["dataset_id"]
        seen.add(kind)
        assert (batch.texts[0] is edges_caption) == (kind == "photos_conditioning_canny"), kind
    assert seen == {"photos_conditioning_canny", "photos_conditioning_superresolution"}
