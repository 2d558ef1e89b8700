"""Validation videos of the video families (Wan, LTX-Video): rendered through the family's pipeline, written as MP4
(PyAV) and as a frame grid PNG beside it.

The grid PNG carries the name an image render would have (`<prompt>-<W>x<H>-<i>.png`), so the validation grid, the
trackers and the model card show the videos through their frames; the MP4 has the same stem. SimpleTuner renders
`validation_num_video_frames` frames (Wan: at most 81, 81 when unset; LTX-Video: at most 125) and exports at
`framerate`, which SimpleTuner sets for the video families when it is unset (LTX-Video 25, Wan 15:
`video_settings.family_framerate`); 16 for a family without one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..log import get_logger

log = get_logger("train")

DEFAULT_FRAMES = 81  # Wan's validation length in SimpleTuner (min(81, validation_num_video_frames or 81))
# Families whose SimpleTuner validation length differs (LTX-Video: min(125, validation_num_video_frames or 125)).
FAMILY_FRAMES = {"ltxvideo": 125}
DEFAULT_FPS = 16  # SimpleTuner's export frame rate when `framerate` is unset and the family sets none
GRID_COLUMNS = 8
CODECS = ("libx264", "mpeg4")  # the first one the installed PyAV can encode


def frame_count(requested: int | None, temporal_compression: int, default: int = DEFAULT_FRAMES) -> int:
    """The frames a validation video gets: `requested` (or `default`), rounded down to 1 + k * temporal_compression,
    the lengths the video VAE decodes exactly (the pipelines round the same way, with a warning)."""
    frames = default if requested is None else min(int(requested), default)
    if frames < 1:
        raise InputError(f"validation_num_video_frames must be at least 1, got {requested}")
    return 1 + (frames - 1) // temporal_compression * temporal_compression


def video_call(extra: dict[str, Any], frames: int, call_params: set[str]) -> dict[str, Any]:
    """An image render's pipeline arguments made a video render's: `num_frames`, one video per image asked for,
    frames as numpy arrays."""
    out = {k: v for k, v in extra.items() if k != "num_images_per_prompt"}
    out["num_frames"] = frames
    out["output_type"] = "np"
    if "num_videos_per_prompt" in call_params:
        out["num_videos_per_prompt"] = extra.get("num_images_per_prompt", 1)
    return out


def as_uint8(frames: Any) -> Any:
    """Frames (F x H x W x 3, floats in 0..1 or uint8) as a uint8 numpy array."""
    import numpy as np

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"a video must be frames x height x width x 3, got shape {frames.shape}")
    return frames


def stream_rate(fps: float) -> Any:
    """The MP4 stream rate of `fps`: an int for a whole rate, else the exact fraction of its decimal value (23.976
    -> 2997/125). DEVIATION: SimpleTuner exports at int(framerate), so 23.976 plays at 23 frames per second."""
    from fractions import Fraction

    if float(fps) <= 0:
        raise InputError(f"a video's frame rate must be positive, got {fps}")
    rate = Fraction(str(fps))
    return int(rate) if rate.denominator == 1 else rate


def write_mp4(frames: Any, path: Path, fps: float = DEFAULT_FPS) -> Path:
    """Encode `frames` (F x H x W x 3) as an MP4 at `fps` (`stream_rate`) with the first codec of CODECS that PyAV
    has (yuv420p, so odd sizes are padded by one pixel)."""
    import av
    import numpy as np

    frames = as_uint8(frames)
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    codec = next((c for c in CODECS if _has_encoder(c)), None)
    if codec is None:
        raise InputError(f"the installed PyAV encodes none of {', '.join(CODECS)}: install a PyAV wheel with FFmpeg")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=stream_rate(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _has_encoder(name: str) -> bool:
    import av

    try:
        av.codec.Codec(name, "w")
    except Exception:  # noqa: BLE001 - PyAV raises its own error types for an unknown encoder
        return False
    return True


def frame_grid(frames: Any, columns: int = GRID_COLUMNS, pad: int = 2):
    """A PIL image of every frame, row by row, `columns` per row."""
    from PIL import Image

    frames = as_uint8(frames)
    count, height, width = frames.shape[:3]
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * width + (columns + 1) * pad, rows * height + (rows + 1) * pad), (24, 24, 24))
    for index, frame in enumerate(frames):
        row, col = divmod(index, columns)
        grid.paste(Image.fromarray(frame), (pad + col * (width + pad), pad + row * (height + pad)))
    return grid


def save_videos(videos: Any, stem: Path, fps: float = DEFAULT_FPS) -> list[Path]:
    """Each video of a render (V x F x H x W x 3) as `<stem>-<i>.mp4` and its frame grid `<stem>-<i>.png`; returns
    the PNG paths."""
    paths = []
    for i, video in enumerate(videos):
        png = stem.parent / f"{stem.name}-{i}.png"
        write_mp4(video, png.with_suffix(".mp4"), fps)
        frame_grid(video).save(png)
        paths.append(png)
    return paths


def render(pipe: Any, kwargs: dict[str, Any], extra: dict[str, Any], stem: Path, frames: int,
           fps: float = DEFAULT_FPS) -> list[Path]:  # fmt: skip
    """Render one prompt at one size through a video pipeline and save its videos (see `save_videos`)."""
    import torch

    call = video_call(extra, frames, set(_call_params(pipe)))
    with torch.no_grad():
        videos = pipe(**kwargs, **call).frames
    return save_videos(videos, stem, fps)


def _call_params(pipe: Any) -> list[str]:
    import inspect

    return list(inspect.signature(pipe.__call__).parameters)
