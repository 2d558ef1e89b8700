"""`st prepare` on small real image folders: captions, buckets, pruning, bad input, re-runs and the manifest."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError, ManifestError, NotSupportedError
from pipeline.manifest import read_manifest
from pipeline.prepare.stage import run_prepare
from tests.helpers.files import make_image, write_config


def run(config_path: Path, out: Path, *sets: str, **kwargs):
    return run_prepare(load_config(config_path, list(sets)), out, **kwargs)


def rows(out: Path) -> list[dict]:
    return pq.read_table(out / "samples.parquet").to_pylist()


def skipped(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def small_dataset(tmp_path):
    """Six images in three aspect ratios, with text captions."""
    data = tmp_path / "data"
    sizes = [(128, 128), (128, 128), (160, 96), (160, 96), (96, 160), (96, 160)]
    for i, size in enumerate(sizes):
        make_image(data / f"img_{i}.jpg", size=size, colour=(10 * i, 100, 200))
        (data / f"img_{i}.txt").write_text(f"caption number {i}\n")
    config = write_config(tmp_path, [{"id": "main", "instance_data_dir": "data", "caption_strategy": "textfile"}],
                          resolution=128, aspect_bucket_alignment=32)  # fmt: skip
    return tmp_path, data, config


def test_outputs_columns_and_manifest(small_dataset):
    root, data, config = small_dataset
    result = run(config, root / "out")
    table = pq.read_table(root / "out" / "samples.parquet")
    for column in ("sample_id", "dataset_id", "path", "captions", "width", "height", "target_width", "target_height",
                   "intermediate_width", "intermediate_height", "crop_top", "crop_left", "bucket", "repeats"):  # fmt: skip
        assert column in table.column_names
    samples = table.to_pylist()
    assert len(samples) == 6
    first = samples[0]
    assert first["path"] == "img_0.jpg"
    assert first["sample_id"] == hashlib.sha256((data / "img_0.jpg").read_bytes()).hexdigest()
    assert first["captions"] == ["caption number 0"]
    assert result.manifest["buckets"] == {"128x128": 2, "160x96": 2, "96x160": 2}
    manifest = read_manifest(root / "out")
    assert manifest["schema"] == "st.prepare/1" and manifest["parent"] is None
    assert manifest["datasets"][0]["root"] == str(data.resolve())
    assert [o["path"] for o in manifest["outputs"]] == ["samples.parquet", "skipped.jsonl"]
    assert "learning_rate" not in manifest["config"]


def test_every_caption_strategy(tmp_path):
    data = tmp_path / "imgs"
    make_image(data / "a_red_ball.png", colour=(255, 0, 0))
    make_image(data / "sub" / "blue_cube.jpg", colour=(0, 0, 255))
    (data / "a_red_ball.txt").write_text("first caption\n\nsecond caption\n")
    (data / "sub" / "blue_cube.txt").write_text("a cube")
    pq.write_table(
        pa.table({"file": ["a_red_ball", "sub/blue_cube"], "text": [None, "cube from parquet"],
                  "alt": ["ball fallback", "unused"]}),
        tmp_path / "captions.parquet",
    )  # fmt: skip
    datasets = [
        {"id": "by-name", "instance_data_dir": "imgs", "caption_strategy": "filename"},
        {"id": "by-text", "instance_data_dir": "imgs", "caption_strategy": "textfile"},
        {"id": "by-table", "instance_data_dir": "imgs", "caption_strategy": "parquet",
         "parquet": {"path": "captions.parquet", "filename_column": "file", "caption_column": "text",
                     "fallback_caption_column": "alt"}},
        {"id": "by-instance", "instance_data_dir": "imgs", "caption_strategy": "instanceprompt",
         "instance_prompt": "sks toy"},
        {"id": "prepended", "instance_data_dir": "imgs", "caption_strategy": "filename",
         "instance_prompt": "sks", "prepend_instance_prompt": True},
        {"id": "only", "instance_data_dir": "imgs", "caption_strategy": "textfile", "instance_prompt": "sks",
         "only_instance_prompt": True},
    ]  # fmt: skip
    # Six datasets over the same two files: all but the first occurrence are duplicates, so give each its own copy.
    for spec in datasets[1:]:
        copy = tmp_path / spec["id"]
        for src in data.rglob("*"):
            if src.is_file():
                dst = copy / src.relative_to(data)
                dst.parent.mkdir(parents=True, exist_ok=True)
                payload = src.read_bytes()
                dst.write_bytes(payload + (spec["id"].encode() if src.suffix in (".png", ".jpg") else b""))
        spec["instance_data_dir"] = spec["id"]
    config = write_config(tmp_path, datasets, resolution=64)
    run(config, tmp_path / "out", "aspect_bucket_alignment=32")
    got = {(r["dataset_id"], r["path"]): r["captions"] for r in rows(tmp_path / "out")}
    assert got[("by-name", "a_red_ball.png")] == ["a red ball"]
    assert got[("by-text", "a_red_ball.png")] == ["first caption", "second caption"]
    assert got[("by-table", "a_red_ball.png")] == ["ball fallback"]
    assert got[("by-table", "sub/blue_cube.jpg")] == ["cube from parquet"]
    assert got[("by-instance", "sub/blue_cube.jpg")] == ["sks toy"]
    assert got[("prepended", "sub/blue_cube.jpg")] == ["sks blue cube"]
    assert got[("only", "a_red_ball.png")] == ["sks"]


def test_bad_inputs_are_skipped_with_reasons_and_nothing_is_touched(tmp_path):
    data = tmp_path / "data"
    for i in range(4):
        make_image(data / f"good_{i}.jpg", colour=(i * 40, 0, 0))
    good = (data / "good_0.jpg").read_bytes()
    (data / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (data / "empty.png").write_bytes(b"")
    (data / "notes.jpg").write_text("this is not an image")
    make_image(data / "tiny.jpg", size=(16, 16), colour=(0, 255, 0))
    (data / "zz_dupe.jpg").write_bytes((data / "good_1.jpg").read_bytes())
    os.symlink(data / "gone.jpg", data / "broken.jpg")
    from PIL import Image

    Image.new("1", (10_000, 10_000)).save(data / "bomb.png")
    config = write_config(tmp_path, [{"id": "d", "instance_data_dir": "data", "minimum_image_size": 32}],
                          resolution=64, aspect_bucket_alignment=32)  # fmt: skip
    before = tree_digest(data)
    result = run(config, tmp_path / "out")
    reasons = {s["path"]: s["reason"] for s in skipped(tmp_path / "out")}
    assert reasons == {
        "truncated.jpg": "corrupt_image", "empty.png": "empty_file", "notes.jpg": "not_an_image",
        "tiny.jpg": "too_small", "zz_dupe.jpg": "duplicate", "broken.jpg": "broken_symlink", "bomb.png": "decompression_bomb",
    }  # fmt: skip
    assert result.manifest["stats"]["skipped"] == {
        "corrupt_image": 1, "decompression_bomb": 1, "duplicate": 1, "empty_file": 1, "not_an_image": 1,
        "too_small": 1, "broken_symlink": 1,
    }  # fmt: skip
    assert sorted(r["path"] for r in rows(tmp_path / "out")) == [f"good_{i}.jpg" for i in range(4)]
    assert tree_digest(data) == before
    with pytest.raises(InputError, match=r"--strict: 7 image\(s\) would be skipped"):
        run(config, tmp_path / "strict-out", strict=True)
    assert not (tmp_path / "strict-out" / "manifest.json").exists()


def test_delete_flags_remove_only_what_they_name(tmp_path):
    data = tmp_path / "data"
    make_image(data / "ok.jpg", colour=(1, 2, 3))
    make_image(data / "ok2.jpg", colour=(3, 2, 1))
    (data / "broken.jpg").write_text("nope")
    make_image(data / "small.jpg", size=(8, 8))
    config = write_config(tmp_path, [{"id": "d", "instance_data_dir": "data", "minimum_image_size": 32}],
                          resolution=64, aspect_bucket_alignment=32)  # fmt: skip
    run(config, tmp_path / "out", "delete_problematic_images=true")
    assert not (data / "broken.jpg").exists()
    assert (data / "small.jpg").exists() and (data / "ok.jpg").exists()
    run(config, tmp_path / "out", "delete_unwanted_images=true")
    assert not (data / "small.jpg").exists() and (data / "ok.jpg").exists() and (data / "ok2.jpg").exists()


def test_missing_caption_file_is_skipped(small_dataset):
    root, data, config = small_dataset
    (data / "img_3.txt").unlink()
    (data / "img_4.txt").write_text("   \n")
    run(config, root / "out", "train_batch_size=1")
    got = {s["path"]: s["reason"] for s in skipped(root / "out")}
    assert got == {"img_3.jpg": "missing_caption", "img_4.jpg": "missing_caption"}


def test_exif_orientation_swaps_width_and_height(tmp_path):
    make_image(tmp_path / "d" / "rotated.jpg", size=(120, 80), exif_orientation=6)
    config = write_config(tmp_path, [{"id": "d", "instance_data_dir": "d"}], resolution=64, aspect_bucket_alignment=8)
    run(config, tmp_path / "out")
    (row,) = rows(tmp_path / "out")
    assert (row["width"], row["height"], row["orientation"]) == (80, 120, 6)
    assert row["target_height"] > row["target_width"]


def test_pruning_oversubscription_and_no_usable_batch(small_dataset, caplog):
    root, data, config = small_dataset
    make_image(data / "wide.jpg", size=(256, 96), colour=(1, 1, 1))
    (data / "wide.txt").write_text("a wide one")
    result = run(config, root / "pruned", "train_batch_size=2")
    assert "wide.jpg" in {s["path"] for s in skipped(root / "pruned") if s["reason"] == "bucket_pruned"}
    assert result.manifest["stats"]["skipped"] == {"bucket_pruned": 1}

    kept = run(config, root / "kept", "train_batch_size=2", "disable_bucket_pruning=true")
    assert kept.manifest["stats"]["samples"] == 7

    over = run(config, root / "over", "train_batch_size=2", "gradient_accumulation_steps=2",
               "allow_dataset_oversubscription=true")  # fmt: skip
    repeats = {r["path"]: r["repeats"] for r in rows(root / "over")}
    assert repeats["wide.jpg"] == 3 and repeats["img_0.jpg"] == 1
    wide_bucket = {r["path"]: r["bucket"] for r in rows(root / "over")}["wide.jpg"]
    assert over.manifest["datasets"][0]["repeats_raised"][wide_bucket] == 3

    explicit = run(config, root / "explicit", "train_batch_size=2", "allow_dataset_oversubscription=true",
                   "repeats=0")  # fmt: skip
    assert explicit.manifest["stats"]["skipped"] == {"bucket_pruned": 1}

    with pytest.raises(InputError, match=r"one batch of 8 .*128x128: 2.*allow_dataset_oversubscription"):
        run(config, root / "none", "train_batch_size=8")


def test_rerun_is_up_to_date_and_writes_nothing(small_dataset, caplog):
    root, data, config = small_dataset
    out = root / "out"
    first = run(config, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run(config, out, "learning_rate=2e-4")
    assert again.up_to_date and again.manifest["digest"] == first.manifest["digest"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    caplog.set_level(logging.INFO, logger="st")
    (data / "img_1.txt").write_text("an edited caption\n")
    make_image(data / "img_9.jpg", colour=(9, 9, 9))
    (data / "img_9.txt").write_text("a new one")
    edited = run(config, out)
    assert not edited.up_to_date
    assert "3 files changed (2 added, 1 modified, 0 removed)" in caplog.text
    assert edited.manifest["provenance"]["probed_files"] == 1
    assert {r["path"]: r["captions"] for r in rows(out)}["img_1.jpg"] == ["an edited caption"]

    run(config, out, "resolution=256")
    assert "config key resolution changed: 128.0 -> 256.0" in caplog.text


def test_same_inputs_give_byte_identical_outputs(small_dataset):
    root, data, config = small_dataset
    a = run(config, root / "a").manifest
    b = run(config, root / "b").manifest
    assert (root / "a" / "samples.parquet").read_bytes() == (root / "b" / "samples.parquet").read_bytes()
    strip = lambda m: {k: v for k, v in m.items() if k != "provenance"}  # noqa: E731
    assert strip(a) == strip(b)
    assert a["digest"] == b["digest"]


def test_damaged_output_is_rebuilt(small_dataset):
    root, data, config = small_dataset
    run(config, root / "out")
    (root / "out" / "samples.parquet").write_bytes(b"garbage")
    result = run(config, root / "out")
    assert not result.up_to_date
    assert len(rows(root / "out")) == 6


def test_manifest_is_validated_on_read(small_dataset):
    root, data, config = small_dataset
    run(config, root / "out")
    path = root / "out" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["stats"]["samples"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="edited after it was written"):
        read_manifest(path)
    doc["schema"] = "st.prepare/7"
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="st.prepare/7, which this st .* cannot read"):
        read_manifest(path)
    doc["schema"] = "st.prepare/1"
    del doc["buckets"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="'buckets' is a required property"):
        read_manifest(path)


def test_dataset_errors_name_the_problem(tmp_path):
    config = write_config(tmp_path, [{"id": "d", "instance_data_dir": "missing"}])
    with pytest.raises(InputError, match=r"dataset 'd': instance_data_dir .*missing does not exist"):
        run(config, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    config = write_config(tmp_path, [{"id": "d", "instance_data_dir": "empty"}])
    with pytest.raises(InputError, match="dataset 'd': no images"):
        run(config, tmp_path / "out")
    config = write_config(tmp_path, [{"id": "d", "type": "webshart", "instance_data_dir": "empty"}])
    with pytest.raises(NotSupportedError, match="storage type 'webshart' is not supported yet"):
        run(config, tmp_path / "out")
    config = write_config(tmp_path, [{"id": "d", "instance_data_dir": "empty", "crop_stlye": "center"}])
    with pytest.raises(ConfigError, match="unknown dataset key 'crop_stlye'; did you mean 'crop_style'"):
        run(config, tmp_path / "out")
    config = write_config(tmp_path, [{"id": "d", "instance_data_dir": "empty", "crop_aspect": "tall"}])
    with pytest.raises(ConfigError, match="crop_aspect.*'tall'.*square, preserve, closest, random"):
        run(config, tmp_path / "out")


def test_simpletuner_dataset_list_loads_unchanged(small_dataset, caplog):
    root, data, config = small_dataset
    caplog.set_level(logging.INFO, logger="st")
    datasets = [
        {"id": "main", "type": "local", "instance_data_dir": "data", "caption_strategy": "textfile",
         "cache_dir_vae": "cache/vae", "vae_cache_clear_each_epoch": False, "skip_file_discovery": "",
         "resolution": 128, "resolution_type": "pixel_area", "repeats": 1},
        {"id": "old", "type": "local", "instance_data_dir": "nowhere", "disabled": True},
        {"id": "embeds", "dataset_type": "text_embeds", "default": True, "type": "local", "cache_dir": "cache/text"},
    ]  # fmt: skip
    (root / "multidatabackend.json").write_text(json.dumps(datasets))
    result = run(config, root / "out")
    assert [d["id"] for d in result.manifest["datasets"]] == ["main"]
    assert result.manifest["datasets"][0]["repeats"] == 1
    assert "ignoring dataset 'embeds'" in caplog.text and "ignoring 'cache_dir_vae'" in caplog.text
