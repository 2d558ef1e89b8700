"""Turning a source image into the pixel tensor the VAE encodes, following the prepare plan exactly.

Runs in DataLoader worker processes so that decoding, resizing and cropping overlap the encoder.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any


class SourceProblem(Exception):
    """The source image is missing or no longer the one prepare saw; `reason` is the skip reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageJob:
    sample_id: str
    path: str  # absolute
    intermediate: tuple[int, int]
    crop_box: tuple[int, int, int, int]  # left, top, right, bottom in the intermediate image


def job_for(row: dict[str, Any], root: str) -> ImageJob:
    left, top = row["crop_left"], row["crop_top"]
    return ImageJob(
        sample_id=row["sample_id"],
        path=f"{root.rstrip('/')}/{row['path']}",
        intermediate=(row["intermediate_width"], row["intermediate_height"]),
        crop_box=(left, top, left + row["target_width"], top + row["target_height"]),
    )


def load_pixels(job: ImageJob):
    """RGB pixels in [-1, 1], CHW float32, after EXIF orientation, resize and crop. Raises SourceProblem."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    try:
        with open(job.path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise SourceProblem("missing_source", f"{job.path} no longer exists") from None
    except OSError as exc:
        raise SourceProblem("missing_source", f"{job.path} cannot be read: {exc}") from None
    if hashlib.sha256(data).hexdigest() != job.sample_id:
        raise SourceProblem("source_changed", f"{job.path} changed since `st prepare` (its content hash differs)")
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
    if img.size != job.intermediate:
        img = img.resize(job.intermediate, Image.Resampling.LANCZOS)
    if job.crop_box != (0, 0, *job.intermediate):
        img = img.crop(job.crop_box)
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class BatchLoader:
    """A map-style dataset whose items are whole batches: (sample ids, pixels or None, problems by sample id)."""

    def __init__(self, batches: list[list[ImageJob]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        import torch

        ids, tensors, problems = [], [], {}
        for job in self.batches[index]:
            try:
                tensors.append(load_pixels(job))
                ids.append(job.sample_id)
            except SourceProblem as exc:
                problems[job.sample_id] = (exc.reason, exc.detail)
        return ids, (torch.stack(tensors) if tensors else None), problems


def _as_is(item):
    return item


def iterate_batches(batches: list[list[ImageJob]], workers: int):
    """Yield loaded batches in order, decoding in `workers` processes (0: in this process)."""
    if workers <= 0 or len(batches) <= 1:
        loader = BatchLoader(batches)
        for i in range(len(loader)):
            yield loader[i]
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(BatchLoader(batches), batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_as_is, prefetch_factor=2)  # fmt: skip
    yield from loader
