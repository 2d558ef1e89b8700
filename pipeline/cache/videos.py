"""Turning a video sample's frame window into the clip the video VAE encodes, following the prepare plan exactly.

A clip of F frames encodes to f = 1 + (F - 1) // temporal_compression latent frames, so `st cache` takes the first
F' = 1 + k * temporal_compression frames of the sample's window (the largest such F' within it) and records F'. The
file is hashed and decoded through one descriptor (as `st prepare` probes it), frames are decoded in order through
PyAV and stop at the window's end, and each frame is resized and cropped exactly as an image of the same bucket
(`images.fitted_pixels`) as soon as it is decoded: at most the window's frames are held, never the whole video.

A video that no longer decodes to the end of its window (damaged, or cut short after prepare) is skipped with its
reason, as an undecodable image is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .images import CORRUPT, ImageJob, SourceProblem, changed, fitted_pixels, job_for, read_verified, unreadable

CORRUPT_VIDEO = "corrupt_video"
TRUNCATED_VIDEO = "truncated_video"
# Skip reasons that are properties of the file's bytes: skipped (or, under --strict, fatal) on every run.
UNDECODABLE = frozenset({CORRUPT, CORRUPT_VIDEO, TRUNCATED_VIDEO})
_CHUNK = 1 << 20


def is_video_row(row: dict[str, Any]) -> bool:
    """Whether a prepare row is a video sample (its frame window is recorded)."""
    return row.get("window_frames") is not None


def trimmed_frames(window_frames: int, temporal_compression: int) -> int:
    """F': the largest 1 + k * temporal_compression not above the window's frame count."""
    return 1 + (window_frames - 1) // temporal_compression * temporal_compression


def cache_bucket(row: dict[str, Any], frames: int) -> str:
    """A video sample's bucket in the cache: its frame size and F' (`WxH@F'`), so prepare buckets whose frame counts
    trim to the same F' (the same latent shape) merge."""
    return f"{row['bucket'].partition('@')[0]}@{frames}"


@dataclass(frozen=True)
class VideoJob(ImageJob):
    """A video sample: its file, hash, resize and crop as an image job has them, and its frames to encode."""

    window_start: int = 0
    frames: int = 1  # F'

    def load(self):
        return load_clip(self)


def video_job_for(row: dict[str, Any], root: str, frames: int, roots: dict[str, str] | None = None) -> VideoJob:
    """The job of a video row; `roots` (dataset id -> folder) locates its conditioning clips (Wan VACE's control /
    mask videos, which `st prepare` checked have the clip's frame count and size): each is read through the same
    window, resize and crop, frame for frame."""
    image = job_for(row, root, roots)
    window = {"window_start": int(row["window_start"]), "frames": frames}
    kinds = [c["kind"] for c in row.get("conditioning") or ()]
    # A reference image (Wan VACE's `reference_images`, conditioning_type reference_*) is read at its own size: the
    # pipeline letterboxes it onto the clip's frame size itself (`wan_vace.cached_control`).
    partners = tuple(ReferenceJob(p.sample_id, p.path, p.intermediate, p.crop_box) if kind.startswith("reference_")
                     else VideoJob(p.sample_id, p.path, p.intermediate, p.crop_box, **window)
                     for p, kind in zip(image.partners, kinds, strict=True))  # fmt: skip
    return VideoJob(image.sample_id, image.path, image.intermediate, image.crop_box, partners=partners, **window)


@dataclass(frozen=True)
class ReferenceJob(ImageJob):
    """A clip's reference image: decoded (EXIF orientation, RGB) at its own size, neither resized nor cropped."""

    def load(self):
        return load_reference(self)


def load_reference(job: ImageJob):
    """The image's pixels in [-1, 1]: 3 x H x W float32 at its own size. Raises SourceProblem."""
    import numpy as np
    import torch

    from ..image_decode import decode_rgb

    data = read_verified(job.path, job.sample_id)
    try:
        array = np.asarray(decode_rgb(data), dtype=np.float32) / 127.5 - 1.0
    except MemoryError:
        raise
    except Exception as exc:  # whatever the decoder says about these bytes, it says it on every run
        raise SourceProblem(CORRUPT, f"cannot be decoded ({type(exc).__name__}: {exc})") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_clip(job: VideoJob):
    """The clip's pixels in [-1, 1]: 3 x F' x H x W float32. Raises SourceProblem."""
    try:
        handle = open(job.path, "rb")  # noqa: SIM115 - closed below, after PyAV has read it
    except OSError as exc:
        raise unreadable(job.path, exc) from None
    with handle:
        digest = hashlib.sha256()
        try:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
            handle.seek(0)
        except OSError as exc:
            raise unreadable(job.path, exc) from None
        if digest.hexdigest() != job.sample_id:
            raise changed(job.path)
        return _decode_window(handle, job)


def _decode_window(handle, job: VideoJob):
    """Frames window_start .. window_start + F' - 1, each fitted to the bucket as it is decoded and written into the
    clip tensor (allocated once: the clip is the only copy of its frames)."""
    import av
    import torch

    end = job.window_start + job.frames
    clip, position = None, 0
    try:
        with av.open(handle, mode="r") as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if position >= job.window_start:
                    pixels = fitted_pixels(frame.to_image(), job.intermediate, job.crop_box)
                    if clip is None:
                        clip = torch.empty((pixels.shape[0], job.frames, *pixels.shape[1:]), dtype=pixels.dtype)
                    clip[:, position - job.window_start] = pixels
                position += 1
                if position >= end:
                    break
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the decoder says about these bytes, it says on every run
        raise SourceProblem(CORRUPT_VIDEO, f"cannot be decoded after {position} frame(s) ({type(exc).__name__}: "
                                           f"{exc})") from None  # fmt: skip
    if position < end:
        raise SourceProblem(TRUNCATED_VIDEO, f"only {position} frame(s) decode, but its window needs frames "
                                             f"{job.window_start} to {end - 1}")  # fmt: skip
    return clip
