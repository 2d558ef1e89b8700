"""Random inpainting masks as SimpleTuner's `random_masks` conditioning generator draws them.

The same draws in the same order from a `random.Random` (SimpleTuner uses the global `random` module), the same PIL
drawing calls, blur, feathering and inversion. Feathering reproduces SimpleTuner's formula as it stands, which keeps a
ring about 10 px wide inside each shape's border and also marks everything further than about 10 px outside the shapes
(see `feather`); set `edge_feather: false` for masks that cover only the drawn shapes.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FEATHER_WIDTH = 10  # pixels, fixed in SimpleTuner


def random_mask_image(rgb: Image.Image, p: dict[str, Any], rng: random.Random) -> Image.Image:
    mask = random_mask(rgb.size, p, rng)
    if p["output_mode"] == "mask":
        return mask.convert("RGB")
    image = np.array(rgb)
    weight = np.array(mask).astype(np.float32) / 255.0
    masked = image.copy()
    for c in range(3):
        masked[:, :, c] = (image[:, :, c] * (1 - weight) + 255 * weight).astype(np.uint8)
    return Image.fromarray(masked)


def random_mask(size: tuple[int, int], p: dict[str, Any], rng: random.Random) -> Image.Image:
    """An "L" mask (255 = masked) of `size`."""
    width, height = size
    mask = Image.new("L", size, 0)
    count = rng.randint(p["min_masks"], p["max_masks"])
    coverage = np.array(mask)
    target = rng.uniform(p["min_coverage"], p["max_coverage"])
    for _ in range(count):
        if np.sum(coverage > 0) / (width * height) >= target:
            break
        if p["mask_type_weights"]:
            kind = rng.choices(p["mask_types"], weights=p["mask_type_weights"])[0]
        else:
            kind = rng.choice(p["mask_types"])
        _SHAPES[kind](ImageDraw.Draw(mask), size, p, rng)
        coverage = np.array(mask)
    if p["edge_blur"]:
        mask = mask.filter(ImageFilter.GaussianBlur(radius=p["edge_blur_radius"]))
    if p["edge_feather"]:
        mask = feather(mask)
    if p["invert_mask"]:
        mask = Image.eval(mask, lambda x: 255 - x)
    return mask


def _rectangle(draw, size, p, rng) -> None:
    width, height = size
    rect_w = int(width * rng.uniform(p["rect_min_size"], p["rect_max_size"]))
    rect_h = int(height * rng.uniform(p["rect_min_size"], p["rect_max_size"]))
    x = rng.randint(0, width - rect_w)
    y = rng.randint(0, height - rect_h)
    draw.rectangle([x, y, x + rect_w, y + rect_h], fill=p["mask_value"])


def _circle(draw, size, p, rng) -> None:
    width, height = size
    radius = int(min(width, height) * rng.uniform(p["circle_min_radius"], p["circle_max_radius"]))
    cx = rng.randint(radius, width - radius)
    cy = rng.randint(radius, height - radius)
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=p["mask_value"])


def _brush(draw, size, p, rng) -> None:
    width, height = size
    brush = rng.randint(p["brush_min_width"], p["brush_max_width"])
    length = int(min(width, height) * rng.uniform(p["brush_min_length"], p["brush_max_length"]))
    points = [(rng.randint(brush, width - brush), rng.randint(brush, height - brush))]
    for _ in range(max(2, length // 20) - 1):
        prev_x, prev_y = points[-1]
        angle = rng.uniform(0, 2 * np.pi)
        distance = rng.uniform(20, 50)
        new_x = int(prev_x + distance * np.cos(angle))
        new_y = int(prev_y + distance * np.sin(angle))
        points.append((max(brush, min(width - brush, new_x)), max(brush, min(height - brush, new_y))))
    for start, end in itertools.pairwise(points):
        draw.line([start, end], fill=p["mask_value"], width=brush)
    for x, y in points:
        draw.ellipse([x - brush // 2, y - brush // 2, x + brush // 2, y + brush // 2], fill=p["mask_value"])


def _irregular(draw, size, p, rng) -> None:
    width, height = size
    count = rng.randint(p["irregular_min_points"], p["irregular_max_points"])
    cx = rng.randint(width // 4, 3 * width // 4)
    cy = rng.randint(height // 4, 3 * height // 4)
    points = []
    for i in range(count):
        angle = (2 * np.pi * i) / count + rng.uniform(-0.3, 0.3)
        radius = rng.uniform(0.1, 0.3) * min(width, height)
        x = max(0, min(width - 1, int(cx + radius * np.cos(angle))))
        y = max(0, min(height - 1, int(cy + radius * np.sin(angle))))
        points.append((x, y))
    draw.polygon(points, fill=p["mask_value"])


_SHAPES = {"rectangle": _rectangle, "circle": _circle, "brush": _brush, "irregular": _irregular}


def feather(mask: Image.Image) -> Image.Image:
    """SimpleTuner's `_feather_edges`: inside the shape 1 up to FEATHER_WIDTH px from its border, falling to 0 at twice
    that; outside 0 at the border rising to 1 at FEATHER_WIDTH px away."""
    values = np.array(mask).astype(np.float32) / 255.0
    inside = values > 0.5
    limit = 2 * FEATHER_WIDTH
    dist_outside = _distance_to(inside, limit)
    dist_inside = _distance_to(~inside, limit)
    feathered = np.ones_like(values)
    feathered[~inside] = np.clip(dist_outside[~inside] / FEATHER_WIDTH, 0, 1)
    feathered[inside] = np.clip(1 - (dist_inside[inside] - FEATHER_WIDTH) / FEATHER_WIDTH, 0, 1)
    return Image.fromarray((feathered * 255).astype(np.uint8))


def _distance_to(target: np.ndarray, limit: int) -> np.ndarray:
    """Euclidean distance from each pixel to the nearest `target` pixel (0 on targets), exact up to `limit`; farther
    pixels get a value above `limit`, which the feathering clips the same way. Rows then columns: the nearest target
    within a column, then the best column within `limit` on either side."""
    h, w = target.shape
    far = limit + 1
    column = np.full((h, w), far, dtype=np.int32)
    run = np.full(w, far, dtype=np.int32)
    for y in range(h):
        run = np.where(target[y], 0, np.minimum(run + 1, far))
        column[y] = run
    run = np.full(w, far, dtype=np.int32)
    for y in range(h - 1, -1, -1):
        run = np.where(target[y], 0, np.minimum(run + 1, far))
        column[y] = np.minimum(column[y], run)
    squared = np.ascontiguousarray(column.T.astype(np.int16) ** 2)  # columns as rows: contiguous shifted slices
    best = squared.copy()
    shifted = np.empty_like(squared)
    for dx in range(1, min(limit, w - 1) + 1):
        np.add(squared[:-dx], dx * dx, out=shifted[:-dx])
        np.minimum(best[dx:], shifted[:-dx], out=best[dx:])
        np.add(squared[dx:], dx * dx, out=shifted[dx:])
        np.minimum(best[:-dx], shifted[dx:], out=best[:-dx])
    return np.sqrt(best.T.astype(np.float64))


def check_fits(size: tuple[int, int], p: dict[str, Any]) -> str | None:
    """Why SimpleTuner's draws cannot place a shape on an image of `size` (its random ranges would be empty)."""
    width, height = size
    if "brush" in p["mask_types"] and min(width, height) < 2 * p["brush_max_width"]:
        return f"brush strokes need a side of at least 2 x brush_max_width ({2 * p['brush_max_width']} px)"
    if "circle" in p["mask_types"] and math.floor(min(width, height) * p["circle_max_radius"]) * 2 > min(width, height):
        return "circle_max_radius must be at most 0.5"
    return None
