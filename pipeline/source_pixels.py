"""A source image's pixels as the prepare plan fits them: read back by content hash, decoded, resized and cropped.

Shared by `st cache` (which encodes them) and by `st train`'s validation from dataset images (which renders from
them), so that both see exactly the pixels the plan describes. Images are decoded as `pipeline.image_decode.decode_rgb`
says (8-bit RGB, as SimpleTuner's loader sees them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .image_decode import decode_rgb

CORRUPT = "corrupt_image"
# Not a property of the image (a bug, or the machine ran out of memory): the run stops and names the file.
LOADER_FAILURE = "loader_failure"


class SourceProblem(Exception):
    """The source image is missing, changed since prepare saw it, or cannot be decoded; `reason` is the skip reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def unreadable(path: str, exc: OSError) -> SourceProblem:
    if isinstance(exc, FileNotFoundError):
        return SourceProblem("missing_source", f"{path} no longer exists")
    return SourceProblem("missing_source", f"{path} cannot be read: {exc}")


def changed(path: str) -> SourceProblem:
    return SourceProblem("source_changed", f"{path} changed since `st prepare` (its content hash differs)")


def read_verified(path: str, sample_id: str) -> bytes:
    """The file's bytes, if they still hash to `sample_id` (what `st prepare` recorded). Raises SourceProblem."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise unreadable(path, exc) from None
    if hashlib.sha256(data).hexdigest() != sample_id:
        raise changed(path)
    return data


@dataclass(frozen=True)
class ImageJob:
    sample_id: str  # the content hash the file must still have
    path: str  # absolute
    intermediate: tuple[int, int]
    crop_box: tuple[int, int, int, int]  # left, top, right, bottom in the intermediate image
    # A conditioning image is first resized to its target's original size when its own differs, then takes the
    # target's resize and crop, so that it stays pixel-aligned with the target.
    source_size: tuple[int, int] | None = None
    partners: tuple[ImageJob, ...] = ()  # the sample's conditioning images

    def load(self):
        return load_pixels(self)


def job_for(row: dict[str, Any], root: str, roots: dict[str, str] | None = None) -> ImageJob:
    """The job of a prepare row; `roots` (dataset id -> folder) locates its conditioning images."""
    left, top = row["crop_left"], row["crop_top"]
    intermediate = (row["intermediate_width"], row["intermediate_height"])
    crop_box = (left, top, left + row["target_width"], top + row["target_height"])
    partners = tuple(
        ImageJob(c["sha256"], f"{str(roots[c['dataset_id']]).rstrip('/')}/{c['path']}", intermediate, crop_box,
                 source_size=(row["width"], row["height"]))
        for c in row.get("conditioning") or ()
    )  # fmt: skip
    return ImageJob(row["sample_id"], f"{root.rstrip('/')}/{row['path']}", intermediate, crop_box, partners=partners)


def load_pixels(job: ImageJob):
    """RGB pixels in [-1, 1], CHW float32, after EXIF orientation, resize and crop. Raises SourceProblem."""
    from PIL import Image

    data = read_verified(job.path, job.sample_id)
    try:
        img = decode_rgb(data)
        if job.source_size is not None and img.size != job.source_size:
            img = img.resize(job.source_size, Image.Resampling.LANCZOS)
        return fitted_pixels(img, job.intermediate, job.crop_box)
    except MemoryError:
        raise
    except Exception as exc:  # whatever the decoder says about these bytes, it says it on every run
        raise SourceProblem(CORRUPT, f"cannot be decoded ({type(exc).__name__}: {exc})") from None


def fitted_pixels(img, intermediate: tuple[int, int], crop_box: tuple[int, int, int, int]):
    """An RGB PIL image resized to the prepare plan's intermediate size and cropped to its box: CHW float32 in
    [-1, 1]. Video frames take the same path, so a frame is fitted exactly as an image of its bucket."""
    import numpy as np
    import torch
    from PIL import Image

    if img.size != intermediate:
        img = img.resize(intermediate, Image.Resampling.LANCZOS)
    if crop_box != (0, 0, *intermediate):
        img = img.crop(crop_box)
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
