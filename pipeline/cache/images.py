"""Batches of source images for the VAE, loaded in DataLoader worker processes so that decoding, resizing and
cropping overlap the encoder. Each image's pixels follow the prepare plan exactly (`pipeline.source_pixels`).
"""

from __future__ import annotations

from ..image_decode import BACKGROUND, decode_rgb  # noqa: F401 - BACKGROUND: the colour transparent pixels show
from ..source_pixels import (  # noqa: F401 - the cache's names for them
    CORRUPT,
    LOADER_FAILURE,
    ImageJob,
    SourceProblem,
    changed,
    fitted_pixels,
    job_for,
    load_pixels,
    read_verified,
    unreadable,
)


class BatchLoader:
    """A map-style dataset whose items are whole batches: (sample ids, pixels or None, problems by sample id,
    conditioning pixels by sample id). A job is an `ImageJob` (or a `videos.VideoJob`, a batch holding one kind). A
    sample whose conditioning image cannot be loaded is a problem too, named after that image."""

    def __init__(self, batches: list[list[ImageJob]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        import torch

        ids, tensors, problems, partners = [], [], {}, {}
        for job in self.batches[index]:
            try:
                pixels = job.load()
                partner_pixels = [_partner_pixels(p) for p in job.partners]
            except SourceProblem as exc:
                problems[job.sample_id] = (exc.reason, exc.detail)
                continue
            except Exception as exc:  # reported by file in the main process instead of dying in a worker
                problems[job.sample_id] = (LOADER_FAILURE, f"{type(exc).__name__}: {exc}")
                continue
            tensors.append(pixels)
            ids.append(job.sample_id)
            if partner_pixels:
                partners[job.sample_id] = partner_pixels
        return ids, (torch.stack(tensors) if tensors else None), problems, partners


def _partner_pixels(job: ImageJob):
    try:
        return job.load()  # a conditioning image, or a video job's conditioning clip
    except SourceProblem as exc:
        detail = exc.detail if job.path in exc.detail else f"{job.path} {exc.detail}"
        raise SourceProblem(exc.reason, f"conditioning image {detail}") from None


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
