"""SimpleTuner's `conditioning` generators in `st prepare`: an image dataset's `"conditioning": [{"type": "canny"}]`
makes a conditioning dataset `<id>_conditioning_<type>` drawn from its images. The list is read in
`pipeline.generator_specs` (re-exported here); `generate` draws one image the way SimpleTuner does, with every random
draw taken from generators seeded by the sample's key, so a prepare re-run gives the same bytes.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np

from ..errors import ConfigError
from ..generator_specs import GeneratorSpec, dataset_id, parse_generators
from . import generate_canny, generate_degrade, generate_masks

__all__ = ["GeneratorSpec", "dataset_id", "generate", "parse_generators"]


def generate(spec: GeneratorSpec, image, seed_key: str):
    """The conditioning image for `image` (8-bit RGB, EXIF-oriented, original size), of the same size. Random draws
    come from generators seeded by `seed_key` alone."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    seed = int.from_bytes(hashlib.sha256(seed_key.encode()).digest()[:8], "big")
    draws = random.Random(seed)
    noise = np.random.RandomState(seed % 2**32)
    p = spec.params
    if spec.type == "canny":
        from PIL import Image

        return Image.fromarray(generate_canny.canny_rgb(np.asarray(image), p["low_threshold"], p["high_threshold"]))
    if spec.type == "superresolution":
        return generate_degrade.superresolution(image, p, noise)
    if spec.type == "jpeg_artifacts":
        return generate_degrade.jpeg_artifacts(image, p, draws, noise)
    if spec.type == "sdr":
        return generate_degrade.sdr(image, p)
    problem = generate_masks.check_fits(image.size, p)
    if problem:
        raise ConfigError(
            f"conditioning type '{spec.name}': image {image.width}x{image.height} is too small: {problem}"
        )
    return generate_masks.random_mask_image(image, p, draws)
