"""Aspect-bucket arithmetic, as SimpleTuner users know it.

- `aspect = round(W / H, aspect_bucket_rounding)`; `align(v) = max(round(v / a) * a, a)`.
- pixel_area (resolution in px, area = resolution^2) and area (resolution in megapixels, area = resolution * 1e6):
  `edge = align(int(sqrt(area)))`, `W = align(edge * sqrt(aspect))`, `H = align(edge / sqrt(aspect))`.
- pixel: the short side becomes `resolution`, the long side `int(short * aspect)`, both aligned.

A sample's plan says how its image becomes a training tensor: resize to the intermediate size (aspect kept, covering
the target), then crop the target from it at (crop_left, crop_top). Without `crop` the image is resized straight to
its bucket size.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..config import MAX_BUCKET_PIXELS
from ..datasets import DatasetSpec

MEGAPIXEL = 1_000_000


class _LazyRandom:
    """A `random.Random` seeded on first use: most plans (no random crop or aspect) never need one."""

    def __init__(self, seed: str) -> None:
        self._seed = seed
        self._rng: random.Random | None = None

    def __getattr__(self, name: str):
        if self._rng is None:
            self._rng = random.Random(self._seed)
        return getattr(self._rng, name)


@dataclass(frozen=True)
class Plan:
    target_width: int
    target_height: int
    intermediate_width: int
    intermediate_height: int
    crop_left: int
    crop_top: int
    frames: int = 0  # video samples: the frame count in the bucket key (`video_buckets`)

    @property
    def bucket(self) -> str:
        size = f"{self.target_width}x{self.target_height}"
        return f"{size}@{self.frames}" if self.frames else size


class Rejected(Exception):
    """The image cannot be used under the dataset's size rules; `reason` is the skip reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def align(value: float, alignment: int) -> int:
    # Python's round() is round-half-even, as in SimpleTuner.
    return max(int(round(value / alignment)) * alignment, alignment)


def aspect_ratio(width: int, height: int, rounding: int) -> float:
    return round(width / height, rounding)


def target_area(resolution: float, resolution_type: str) -> float:
    """Pixel area a bucket aims for in the area-based modes."""
    return resolution * MEGAPIXEL if resolution_type == "area" else resolution * resolution


def bucket_size(aspect: float, resolution: float, resolution_type: str, alignment: int) -> tuple[int, int]:
    """Target (W, H) for an aspect ratio."""
    if resolution_type == "pixel":
        short = resolution
        if aspect >= 1:
            return align(int(short * aspect), alignment), align(short, alignment)
        return align(short, alignment), align(int(short / aspect), alignment)
    edge = align(int(math.sqrt(target_area(resolution, resolution_type))), alignment)
    if aspect == 1:
        return edge, edge
    root = math.sqrt(aspect)
    return align(edge * root, alignment), align(edge / root, alignment)


def image_measure(width: int, height: int, resolution_type: str) -> float:
    """An image's size in the units of `resolution` (short edge px, megapixels, or edge of the equal-area square)."""
    if resolution_type == "pixel":
        return float(min(width, height))
    if resolution_type == "area":
        return width * height / MEGAPIXEL
    return math.sqrt(width * height)


def _choose_aspect(spec: DatasetSpec, aspect: float, rng: random.Random) -> float:
    if not spec.crop or spec.crop_aspect == "preserve":
        return aspect
    if spec.crop_aspect == "square":
        return 1.0
    buckets = spec.crop_aspect_buckets or ((1.0, 1.0),)
    if spec.crop_aspect == "closest":
        return min(buckets, key=lambda b: (abs(b[0] - aspect), b[0]))[0]
    aspects, weights = zip(*buckets)
    return rng.choices(aspects, weights=weights, k=1)[0]


def _cover(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """Smallest aspect-preserving resize of (width, height) that covers the target."""
    scale = max(target_w / width, target_h / height)
    return max(round(width * scale), target_w), max(round(height * scale), target_h)


def _crop_offsets(spec: DatasetSpec, iw: int, ih: int, tw: int, th: int, rng: random.Random) -> tuple[int, int]:
    """(left, top) of the crop window inside the intermediate image."""
    spare_w, spare_h = iw - tw, ih - th
    if spec.crop_style in ("center", "centre"):
        return spare_w // 2, spare_h // 2
    if spec.crop_style == "corner":
        # SimpleTuner's corner crop keeps the bottom-right corner.
        return spare_w, spare_h
    return rng.randint(0, spare_w), rng.randint(0, spare_h)


def _check_extreme_aspect(width: int, height: int, aspect: float, rounding: int) -> None:
    """An aspect ratio that rounds to 0 (taller than 1:10^rounding) has no bucket; wider than 10^rounding:1 is
    refused symmetrically. Either way the image is skipped, never a division by zero."""
    limit = 10.0**rounding
    if aspect <= 0 or aspect > limit:
        raise Rejected(
            "aspect_ratio_out_of_range",
            f"{width}x{height} has aspect ratio {width / height:.4g}, outside 1:{limit:g} .. {limit:g}:1 at "
            f"aspect_bucket_rounding {rounding}",
        )


def plan(width: int, height: int, spec: DatasetSpec, *, alignment: int, rounding: int, seed: int, sample_id: str) -> Plan:
    """Work out the bucket, resize and crop of one image, or raise Rejected."""
    aspect = aspect_ratio(width, height, rounding)
    _check_extreme_aspect(width, height, aspect, rounding)
    if spec.minimum_aspect_ratio is not None and aspect < spec.minimum_aspect_ratio:
        raise Rejected("aspect_ratio_out_of_range", f"aspect {aspect} < minimum_aspect_ratio {spec.minimum_aspect_ratio}")
    if spec.maximum_aspect_ratio is not None and aspect > spec.maximum_aspect_ratio:
        raise Rejected("aspect_ratio_out_of_range", f"aspect {aspect} > maximum_aspect_ratio {spec.maximum_aspect_ratio}")
    measure = image_measure(width, height, spec.resolution_type)
    if spec.minimum_image_size is not None and measure < spec.minimum_image_size:
        raise Rejected(
            "too_small",
            f"{width}x{height} is {measure:g} in {spec.resolution_type} units, under minimum_image_size "
            f"{spec.minimum_image_size:g}",
        )
    # A per-sample generator: the plan of one image never depends on which other images are in the dataset.
    rng = _LazyRandom(f"{seed}:{sample_id}")
    chosen = _choose_aspect(spec, aspect, rng)
    tw, th = bucket_size(chosen, spec.resolution, spec.resolution_type, alignment)
    if tw * th > MAX_BUCKET_PIXELS:
        raise Rejected(
            "aspect_ratio_out_of_range",
            f"{width}x{height} (aspect {aspect}) would need a {tw}x{th} bucket, over {MAX_BUCKET_PIXELS} pixels; "
            "set maximum_aspect_ratio / minimum_aspect_ratio, or crop = true",
        )
    upscale = max(tw / width, th / height) if spec.crop else math.sqrt((tw * th) / (width * height))
    if spec.max_upscale_threshold is not None and upscale - 1 > spec.max_upscale_threshold:
        raise Rejected(
            "upscale_exceeds_threshold",
            f"{width}x{height} needs {upscale:.2f}x upscaling to reach {tw}x{th}; max_upscale_threshold is "
            f"{spec.max_upscale_threshold:g}",
        )
    if not spec.crop:
        return Plan(tw, th, tw, th, 0, 0)
    iw, ih = _cover(width, height, tw, th)
    if (
        spec.maximum_image_size is not None
        and spec.target_downsample_size is not None
        and measure > spec.maximum_image_size
    ):
        # Very large images are first brought down to target_downsample_size, then cropped.
        factor = spec.target_downsample_size / measure
        if spec.resolution_type == "area":
            factor = math.sqrt(factor)
        dw, dh = round(width * factor), round(height * factor)
        if dw >= tw and dh >= th:
            iw, ih = dw, dh
    left, top = _crop_offsets(spec, iw, ih, tw, th, rng)
    return Plan(tw, th, iw, ih, left, top)
