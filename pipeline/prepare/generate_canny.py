"""Canny edge maps as SimpleTuner's `canny` conditioning generator draws them.

SimpleTuner converts the image to grey with trainingsample (`0.299 R + 0.587 G + 0.114 B` in float32, truncated) and
runs imageproc 0.25's `edges::canny`: a float32 Gaussian blur of sigma 1.4 (7 taps, edges padded by continuity,
truncated to 8 bits after each pass), 3x3 Sobel gradients, non-maximum suppression on four directions and a
hysteresis walk. This is the same arithmetic in numpy, float32 where imageproc uses f32, so the edge pixels are the
same; it is not OpenCV's Canny (which blurs nothing and uses other gradient rounding).
"""

from __future__ import annotations

import math

import numpy as np

SIGMA = 1.4
# The hysteresis walk of imageproc 0.25 follows these six neighbours only (not (0, -1) nor (+1, -1)).
_WALK = ((1, 0), (1, 1), (0, 1), (-1, -1), (-1, 0), (-1, 1))


def canny_rgb(rgb: np.ndarray, low: float, high: float) -> np.ndarray:
    """H x W x 3 uint8 edge map (255 on edges, 0 elsewhere, the grey value in all three channels)."""
    edges = canny_grey(grey(rgb), low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def grey(rgb: np.ndarray) -> np.ndarray:
    channels = rgb.astype(np.float32)
    value = np.float32(0.299) * channels[..., 0] + np.float32(0.587) * channels[..., 1]
    value = value + np.float32(0.114) * channels[..., 2]
    return np.clip(value, 0, 255).astype(np.uint8)


def canny_grey(image: np.ndarray, low: float, high: float) -> np.ndarray:
    blurred = _gaussian_blur(image, SIGMA)
    gx = _correlate3x3(blurred, ((-1, 0, 1), (-2, 0, 2), (-1, 0, 1)))
    gy = _correlate3x3(blurred, ((-1, -2, -1), (0, 0, 0), (1, 2, 1)))
    strength = np.hypot(gx.astype(np.float32), gy.astype(np.float32))
    thinned = _non_maximum_suppression(strength, gx, gy)
    return _hysteresis(thinned, np.float32(low), np.float32(high))


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """imageproc's `gaussian_kernel_f32`, operation by operation in float32."""
    f32 = np.float32
    radius = math.ceil(2.0 * float(f32(sigma)))
    scale = f32(1.0) / (f32(math.sqrt(f32(2.0 * math.pi))) * f32(sigma))
    two_r2 = f32(2.0) * (f32(sigma) * f32(sigma))
    kernel = np.zeros(2 * radius + 1, dtype=np.float32)
    for i in range(radius + 1):
        exponent = f32(-(f32(i) * f32(i))) / two_r2
        kernel[radius + i] = kernel[radius - i] = scale * f32(math.exp(float(exponent)))
    total = f32(0.0)
    for value in kernel:
        total = f32(total + value)
    return (kernel / total).astype(np.float32)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    kernel = _gaussian_kernel(sigma)
    return _filter_1d(_filter_1d(image, kernel, axis=1), kernel, axis=0)


def _filter_1d(image: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Correlation along one axis, padded by continuity, summed tap by tap in float32 and truncated to uint8."""
    half = len(kernel) // 2
    size = image.shape[axis]
    padded = np.take(image, np.clip(np.arange(-half, size + half), 0, size - 1), axis=axis).astype(np.float32)
    acc = np.zeros(image.shape, dtype=np.float32)
    for i, weight in enumerate(kernel):
        acc = acc + np.take(padded, np.arange(i, i + size), axis=axis) * weight
    return np.clip(acc, 0, 255).astype(np.uint8)


def _correlate3x3(image: np.ndarray, kernel) -> np.ndarray:
    h, w = image.shape
    padded = np.pad(image.astype(np.int32), 1, mode="edge")
    out = np.zeros((h, w), dtype=np.int32)
    for ky in range(3):
        for kx in range(3):
            if kernel[ky][kx]:
                out += kernel[ky][kx] * padded[ky : ky + h, kx : kx + w]
    return out.astype(np.int16)


def _non_maximum_suppression(g: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    h, w = g.shape
    out = np.zeros_like(g)
    if h < 3 or w < 3:
        return out
    angle = np.arctan2(gy.astype(np.float32), gx.astype(np.float32)) * (np.float32(180.0) / np.float32(math.pi))
    angle = np.where(angle < 0, angle + np.float32(180.0), angle)[1:-1, 1:-1]
    centre = g[1:-1, 1:-1]

    def at(dx: int, dy: int) -> np.ndarray:
        return g[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx]

    horizontal = (angle < 22.5) | (angle >= 157.5)
    diagonal = (angle >= 22.5) & (angle < 67.5)
    vertical = (angle >= 67.5) & (angle < 112.5)
    cmp1 = np.select([horizontal, diagonal, vertical], [at(-1, 0), at(1, 1), at(0, -1)], at(-1, 1))
    cmp2 = np.select([horizontal, diagonal, vertical], [at(1, 0), at(-1, -1), at(0, 1)], at(1, -1))
    out[1:-1, 1:-1] = np.where((centre < cmp1) | (centre < cmp2), np.float32(0.0), centre)
    return out


def _hysteresis(strength: np.ndarray, low: np.float32, high: np.float32) -> np.ndarray:
    """Pixels reachable from a strong pixel (>= high, not on the border) through pixels >= low along the walk's
    six directions; the set does not depend on the order of the walk, so a stack is enough."""
    h, w = strength.shape
    out = np.zeros((h, w), dtype=np.uint8)
    weak = strength >= low
    seeds = np.zeros_like(weak)
    seeds[1:-1, 1:-1] = strength[1:-1, 1:-1] >= high
    stack = [(int(y), int(x)) for y, x in zip(*np.nonzero(seeds))]
    for y, x in stack:
        out[y, x] = 255
    while stack:
        y, x = stack.pop()
        for dx, dy in _WALK:
            ny, nx = y + dy, x + dx
            if 0 <= ny < h and 0 <= nx < w and weak[ny, nx] and not out[ny, nx]:
                out[ny, nx] = 255
                stack.append((ny, nx))
    return out
