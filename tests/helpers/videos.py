"""A video sample dataset for a video family's tiny model (`st sample-data --video` clips, optionally with an image
dataset mixed in and a clip damaged mid-stream), prepared and cached."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_config

IMAGE_DATASET = {"id": "stills", "type": "local", "instance_data_dir": "images", "caption_strategy": "textfile",
                 "crop": False, "resolution": 64, "resolution_type": "pixel_area"}  # fmt: skip


def moving_square(size: tuple[int, int], count: int, colour: tuple[int, int, int]) -> list:
    """`count` RGB frames (numpy) of a square sliding right over a grey background."""
    import numpy as np

    width, height = size
    frames = []
    for i in range(count):
        frame = np.full((height, width, 3), 90, dtype=np.uint8)
        left = i * (width - 16) // max(count - 1, 1)
        frame[height // 4 : height // 4 + 16, left : left + 16] = colour
        frames.append(frame)
    return frames


def write_damaged_clip(path: Path, frames: int = 16) -> Path:
    """A 64x64 clip whose header and packets are all there and whose first frame decodes (so `st prepare` keeps it),
    but whose fifth packet is zeroed: decoding stops partway through, as on a disk error after prepare."""
    import av

    from pipeline.sampledata import write_video

    write_video(path, moving_square((64, 64), frames, (250, 200, 0)), fps=12)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [(p.pos, p.size) for p in container.demux(stream) if p.size]
    data = bytearray(path.read_bytes())
    position, size = packets[4]
    data[position : position + size] = bytes(size)
    path.write_bytes(bytes(data))
    path.with_suffix(".txt").write_text("a yellow square moving right\n")
    return path


def video_dataset(root: Path, family: str, model: Path, *, videos: int = 3, images: int = 0, damaged: bool = False,
                  **options) -> Path:  # fmt: skip
    """`st sample-data --video` clips under root/videos (`videos` usable ones, one too short, one truncated), plus
    `images` images as a second dataset and a clip damaged mid-stream when asked; the config names the tiny model
    and the test defaults (batch 1, fp32), updated by `options` (SimpleTuner's `--name` keys). Returns the config."""
    from pipeline.sampledata import write_images, write_sample_dataset

    config = write_sample_dataset(root, videos=videos, family=family, model=model)
    data = json.loads(config.read_text())
    data.update({"--train_batch_size": 1, "--mixed_precision": "no", "--vae_dtype": "fp32",
                 "--validation_resolution": "64", **options})  # fmt: skip
    config.write_text(json.dumps(data, indent=2))
    if images:
        write_images(root / "images", images, 0)
        datasets = json.loads((root / "multidatabackend.json").read_text())
        datasets.insert(1, dict(IMAGE_DATASET))
        (root / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    if damaged:
        write_damaged_clip(root / "videos" / "damaged_0099_yellow_square.mp4")
    return config


def cached_video_dataset(root: Path, family: str, model: Path, **kwargs) -> Path:
    """`video_dataset` under root/data, prepared into root/prepare and cached into root/cache. Returns the config."""
    from pipeline.cache.stage import run_cache
    from pipeline.prepare.stage import run_prepare

    config = video_dataset(root / "data", family, model, **kwargs)
    loaded = load_config(config)
    run_prepare(loaded, root / "prepare")
    run_cache(loaded, root / "prepare", root / "cache")
    return config


def decoded_frames(path, count: int) -> list:
    """The first `count` frames of a clip as PIL images, decoded as `st cache` decodes them (PyAV, RGB)."""
    import av

    with av.open(str(path)) as container:
        frames = []
        for frame in container.decode(video=0):
            frames.append(frame.to_image())
            if len(frames) == count:
                return frames
    raise AssertionError(f"{path} has fewer than {count} frames")
