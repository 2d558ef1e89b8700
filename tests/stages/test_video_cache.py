"""`st cache` on video datasets with the tiny Wan model: latents keep the time axis (C x f x h x w, f from F' frames),
clips are fitted to their bucket exactly as images, damaged clips are skipped with their reason, re-runs encode only
what changed, images mixed into a video run are one frame, and an image family refuses video datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cache.images import SourceProblem
from pipeline.cache.stage import run_cache
from pipeline.cache.videos import TRUNCATED_VIDEO, VideoJob, load_clip, trimmed_frames, video_job_for
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.manifest import read_manifest
from pipeline.prepare.stage import run_prepare
from pipeline.train.data import CacheIndex, SampleReader
from tests.helpers.videos import cached_video_dataset, moving_square

TEMPORAL = 4  # the Wan VAE's temporal compression
SPATIAL = 4  # the tiny Wan VAE's spatial factor


@pytest.fixture(scope="module")
def video_cache(tmp_path_factory, tiny_model) -> Path:
    """Three clips (two 64x64, one 128x64), a short and a truncated one, a clip damaged mid-stream, and two images
    in a second dataset, prepared and cached for the tiny Wan model; returns the root (data/, prepare/, cache/)."""
    root = tmp_path_factory.mktemp("video-cache")
    cached_video_dataset(root, "wan", tiny_model("wan"), videos=3, images=2, damaged=True)
    return root


def _samples(cache: Path) -> dict[str, tuple]:
    """sample id -> (latent, metadata) of every sample the train loader reads from `cache`."""
    index = CacheIndex(cache, read_manifest(cache))
    reader = SampleReader()
    try:
        return {key: (reader.sample(ref).latent, ref.meta) for key, ref in index.samples.items()}
    finally:
        reader.close()


def test_video_latents_keep_the_time_axis_and_images_are_one_frame(video_cache):
    manifest = read_manifest(video_cache / "cache")
    frames = trimmed_frames(8, TEMPORAL)  # the sample config's window of 8 frames
    assert frames == 5
    assert manifest["family"] == "wan"
    clips = next(d for d in manifest["datasets"] if d["id"] == "clips")
    assert clips["dataset_type"] == "video" and clips["video"]["num_frames"] == 8  # train reads is_i2v here
    video_buckets = {b for b in manifest["buckets"] if "@" in b}
    assert video_buckets == {"64x64@5", "96x32@5"}
    latent_frames = 1 + (frames - 1) // TEMPORAL
    seen = {"video": 0, "image": 0}
    for latent, meta in _samples(video_cache / "cache").values():
        width, height = meta["target_size"]
        if meta["dataset_id"] == "clips":
            assert meta["video"] == {"window_start": 0, "frames": frames, "fps": 12.0}
            assert tuple(latent.shape) == (16, latent_frames, height // SPATIAL, width // SPATIAL)
            seen["video"] += 1
        else:
            assert "video" not in meta and "@" not in meta["bucket"]
            assert tuple(latent.shape) == (16, 1, height // SPATIAL, width // SPATIAL)
            seen["image"] += 1
        assert latent.isfinite().all() and latent.std() > 0
    assert seen == {"video": 3, "image": 2}


def test_a_clip_is_its_window_fitted_like_an_image(video_cache):
    """The pixels the VAE encodes: the first F' frames of the window, resized and cropped by the prepare plan."""
    import av
    from PIL import Image

    rows = pq.read_table(video_cache / "prepare" / "samples.parquet").to_pylist()
    row = next(r for r in rows if r.get("window_frames") and r["width"] == 128)
    root = str(video_cache / "data" / "videos")
    clip = load_clip(video_job_for(row, root, 5))
    assert tuple(clip.shape) == (3, 5, row["target_height"], row["target_width"])
    with av.open(f"{root}/{row['path']}") as container:
        decoded = [f.to_image() for _, f in zip(range(5), container.decode(video=0))]
    left, top = row["crop_left"], row["crop_top"]
    for i, frame in enumerate(decoded):
        fitted = frame.resize((row["intermediate_width"], row["intermediate_height"]), Image.Resampling.LANCZOS)
        fitted = fitted.crop((left, top, left + row["target_width"], top + row["target_height"]))
        expected = np.asarray(fitted, dtype=np.float32) / 127.5 - 1.0
        np.testing.assert_array_equal(clip[:, i].permute(1, 2, 0).numpy(), expected)


def test_bad_clips_are_skipped_with_their_reasons(video_cache):
    prepare_skips = [json.loads(line) for line in (video_cache / "prepare" / "skipped.jsonl").read_text().splitlines()]
    reasons = {(k["path"].split("_")[0], k["reason"]) for k in prepare_skips}
    assert reasons >= {("truncated", "truncated_video"), ("short", "too_few_frames")}
    manifest = read_manifest(video_cache / "cache")
    (skip,) = [json.loads(line) for line in (video_cache / "cache" / "skipped.jsonl").read_text().splitlines()]
    assert skip["path"].startswith("damaged_") and skip["reason"] == "corrupt_video"
    assert "cannot be decoded after" in skip["detail"]
    assert manifest["stats"]["skipped"] == {"corrupt_video": 1}
    with pytest.raises(InputError, match=r"--strict: .*damaged_0099_yellow_square\.mp4 \(dataset clips\) cannot be"):
        run_cache(load_config(video_cache / "data" / "config.json"), video_cache / "prepare", video_cache / "cache",
                  strict=True)  # fmt: skip


def test_a_window_past_the_end_of_the_file_is_truncated(video_cache, tmp_path):
    from pipeline.sampledata import write_video

    path = tmp_path / "six.mp4"
    write_video(path, moving_square((64, 64), 6, (0, 200, 0)), fps=12)
    import hashlib

    job = VideoJob(hashlib.sha256(path.read_bytes()).hexdigest(), str(path), (64, 64), (0, 0, 64, 64),
                   window_start=2, frames=5)  # fmt: skip
    with pytest.raises(SourceProblem) as caught:
        load_clip(job)
    assert caught.value.reason == TRUNCATED_VIDEO
    assert "only 6 frame(s) decode" in caught.value.detail


def test_reruns_encode_only_what_changed(video_cache, tmp_path):
    config = video_cache / "data" / "config.json"
    loaded = load_config(config)
    assert run_cache(loaded, video_cache / "prepare", video_cache / "cache").up_to_date
    # A copy whose one clip has new content: prepare and cache again into the copied cache.
    data = tmp_path / "data"
    shutil.copytree(video_cache / "data", data)
    shutil.copytree(video_cache / "cache", tmp_path / "cache")
    from pipeline.sampledata import write_video

    clip = min((data / "videos").glob("0000_*.mp4"))
    write_video(clip, moving_square((64, 64), 16, (255, 0, 255)), fps=12)
    loaded = load_config(data / "config.json")
    run_prepare(loaded, tmp_path / "prepare")
    before = _samples(video_cache / "cache")
    result = run_cache(loaded, tmp_path / "prepare", tmp_path / "cache")
    assert (result.encoded, result.reused) == (1, 4)
    after = _samples(tmp_path / "cache")
    assert len(set(after) - set(before)) == 1 and len(set(before) - set(after)) == 1
    for key in set(after) & set(before):  # the others are the same bytes
        assert after[key][0].equal(before[key][0])


def test_an_image_family_refuses_video_datasets(video_cache, cli, tmp_path):
    config = video_cache / "data" / "config.json"
    done = cli("cache", "-c", config, "-i", video_cache / "prepare", "-o", tmp_path / "cache",
               "--set", "model_family=sd1x")  # fmt: skip
    assert done.exit_code == 2
    message = " ".join(done.stderr.split())
    assert "video dataset(s) 'clips'" in message and "model_family 'sd1x' trains on images only" in message
    assert "video families (ltxvideo, wan)" in message
    assert not (tmp_path / "cache").exists()


def test_st_verify_checks_video_samples(video_cache, cli):
    done = cli("verify", video_cache / "cache")
    assert done.exit_code == 0, done.output


def test_training_batches_stack_clips_and_one_frame_images(video_cache):
    """The train loader batches within a (dataset, bucket) group: B x C x f x h x w for clips, B x C x 1 x h x w for
    the images of the same run."""
    from pipeline.cache_reader import CacheReader
    from pipeline.train.data import Cursor, EpochPlanner, TrainLoader

    reader = CacheReader(video_cache / "cache")
    index = CacheIndex(video_cache / "cache", reader.manifest)
    planner = EpochPlanner(index, seed=0, global_batch=2, sampling="uniform")
    loader = TrainLoader(index, planner, rank=0, world=1, shared_text=reader.shared_embeds(),
                         empty_key=reader.manifest["embeds"]["empty"], caption_dropout=0.0, seed=0,
                         prefetch=0)  # fmt: skip
    shapes = {(b.dataset_id, b.meta[0]["bucket"]): tuple(b.latents.shape) for b in loader.iterate(Cursor(), 1)}
    assert shapes["clips", "64x64@5"] == (2, 16, 2, 16, 16)
    assert shapes["stills", "64x64"] == (2, 16, 1, 16, 16)
