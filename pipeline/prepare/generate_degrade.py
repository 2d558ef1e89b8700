"""Degraded copies as SimpleTuner's `superresolution`, `jpeg_artifacts` and `sdr` conditioning generators make them:
the same PIL filters and JPEG round trips, the same float arithmetic, noise from a seeded `numpy.random.RandomState`
and quality draws from a seeded `random.Random` (SimpleTuner draws both from the unseeded global generators)."""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def superresolution(img: Image.Image, p: dict[str, Any], noise: np.random.RandomState) -> Image.Image:
    result = img.copy()
    size = result.size
    factor = p["downscale_factor"]
    if factor is not None and factor > 1:
        result = result.resize((int(size[0] / factor), int(size[1] / factor)), Image.Resampling.BILINEAR)
        result = result.resize(size, Image.Resampling.BILINEAR)
    radius = p["blur_radius"]
    if p["blur_type"] == "gaussian":
        result = result.filter(ImageFilter.GaussianBlur(radius=radius))
    elif p["blur_type"] == "box":
        result = result.filter(ImageFilter.BoxBlur(radius=radius))
    else:  # "both"
        result = result.filter(ImageFilter.BoxBlur(radius=radius * 0.7))
        result = result.filter(ImageFilter.GaussianBlur(radius=radius * 0.7))
    if p["add_noise"] and p["noise_level"] > 0:
        result = gaussian_noise(result, p["noise_level"], noise)
    if p["jpeg_quality"] is not None:
        result = jpeg_round_trip(result, quality=p["jpeg_quality"])
    return result


def jpeg_artifacts(img: Image.Image, p: dict[str, Any], draws: random.Random, noise: np.random.RandomState):
    result = img.copy()
    if p["pre_blur"]:
        result = result.filter(ImageFilter.GaussianBlur(radius=p["pre_blur_radius"]))
    if p["add_noise"] and p["noise_level"] > 0:
        result = gaussian_noise(result, p["noise_level"], noise)
    for round_index in range(p["compression_rounds"]):
        result = jpeg_round_trip(
            result,
            quality=_round_quality(p, round_index, draws),
            optimize=p["optimize"],
            progressive=p["progressive"],
            subsampling=_SUBSAMPLING.get(p["subsampling"]),
        )
    if p["enhance_blocks"]:
        result = _enhance_blocks(result, p["block_noise_level"], noise)
    return result


def _round_quality(p: dict[str, Any], round_index: int, draws: random.Random) -> int:
    """A fresh base quality every round (as SimpleTuner draws it), decayed and clamped to 1..95 after the first."""
    mode = p["quality_mode"]
    if mode == "range":
        base = draws.randint(p["quality_range"][0], p["quality_range"][1])
    elif mode == "random":
        base = draws.choice(p["quality_list"])
    else:
        base = p["quality"]
    if round_index == 0:
        return base
    return max(1, min(95, int(base * (p["round_quality_decay"] ** round_index))))


def jpeg_round_trip(img: Image.Image, quality: int, subsampling: int | None = None, **options) -> Image.Image:
    buffer = io.BytesIO()
    extra = {} if subsampling is None else {"subsampling": subsampling}
    img.save(buffer, format="JPEG", quality=quality, **options, **extra)
    buffer.seek(0)
    with Image.open(buffer) as compressed:
        return compressed.convert("RGB")


def gaussian_noise(img: Image.Image, level: float, noise: np.random.RandomState) -> Image.Image:
    values = np.array(img).astype(np.float32) / 255.0
    noisy = np.clip(values + noise.normal(0, level, values.shape), 0, 1)
    return Image.fromarray((noisy * 255).astype(np.uint8))


def _enhance_blocks(img: Image.Image, level: float, noise: np.random.RandomState) -> Image.Image:
    """Noise on the rows and columns that start each 8x8 JPEG block."""
    values = np.array(img).astype(np.float32) / 255.0
    h, w, c = values.shape
    borders = np.zeros((h, w), dtype=np.float32)
    borders[::8, :] = 1.0
    borders[:, ::8] = 1.0
    block_noise = noise.normal(0, level, (h, w, c)) * borders[:, :, np.newaxis]
    return Image.fromarray((np.clip(values + block_noise, 0, 1) * 255).astype(np.uint8))


# SDR / LogC3 ---------------------------------------------------------------------------------------------------------

_LOGC3 = {"a": 5.555556, "b": 0.052272, "c": 0.247190, "d": 0.385537, "e": 5.367655, "f": 0.092809, "cut": 0.010591}


def sdr(img: Image.Image, p: dict[str, Any]) -> Image.Image:
    values = np.asarray(img).astype(np.float32) / 255.0
    values = values * p["input_scale"] * (2.0 ** p["exposure"])
    if p["transform"] == "logc3":
        x = np.clip(values.astype(np.float32, copy=False), 0.0, None)
        k = _LOGC3
        log_part = k["c"] * np.log10(k["a"] * x + k["b"]) + k["d"]
        out = np.clip(np.where(x >= k["cut"], log_part, k["e"] * x + k["f"]), 0.0, 1.0)
    elif p["transform"] == "srgb":
        x = np.clip(values.astype(np.float32, copy=False), 0.0, 1.0)
        out = np.where(x <= 0.0031308, x * 12.92, 1.055 * np.power(x, 1.0 / 2.4) - 0.055)
    else:  # rec709: already SDR, normalised and clamped
        out = np.clip(values.astype(np.float32, copy=False), 0.0, 1.0)
    return Image.fromarray((np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
