"""Families that take a reference image (`Family.takes_reference`, e.g. Flux Kontext): what their runs need.

The reference is a sample's conditioning image (a `conditioning` dataset of type reference_strict, reference_loose or
controlnet, or a generated one), cached as VAE latents beside the target (`Batch.control_latents`). Validation renders
through the family's pipeline with the first cached samples' conditioning images as its `image`.
"""

from __future__ import annotations

from typing import Any

from ..cache_reader import COND
from ..datasets import MASK_TYPES
from ..errors import ConfigError, InputError, NotSupportedError
from ..families import Family
from ..log import get_logger
from .controlnet import ValidationControl, read_conditioning
from .data import image_paired_datasets

log = get_logger("train")

IMAGE_ARGUMENT = "image"  # the edit pipelines' keyword for the reference image


def note_unused(family: Family, cache_manifest: dict[str, Any], *, controlnet: bool) -> None:
    """One warning when the cache pairs training samples with conditioning images (not masks) that this run does not
    use: only a ControlNet or a reference-image model trains with them, so a plain run is likely a missed option."""
    if controlnet or family.takes_reference:
        return
    paired, _ = image_paired_datasets(cache_manifest)
    if paired:
        log.warning("dataset(s) %s are paired with conditioning images, which only `controlnet: true` or an edit "
                    "model (model_flavour kontext) trains with; this run trains %s without them",
                    ", ".join(paired), family.name)  # fmt: skip


def check(family: Family, cache_manifest: dict[str, Any], *, controlnet: bool = False) -> None:
    """Refuse, before the model loads, a run of a reference family whose training datasets link no image (non-mask)
    conditioning dataset, or that asks for a ControlNet (its conditioning images are the references)."""
    if not family.takes_reference:
        return
    if controlnet:
        raise NotSupportedError(f"controlnet: true with {family.pipeline_class} (a reference-image model) is not "
                                "supported; set controlnet to false to train the model on its reference images")  # fmt: skip
    paired, unpaired = image_paired_datasets(cache_manifest)
    if paired and not unpaired:
        return
    which = f"dataset(s) {', '.join(unpaired)} have none (only masks, or no conditioning_data)" if unpaired else \
        "this cache has none"  # fmt: skip
    raise ConfigError(
        f"{family.pipeline_class} trains on (reference image, edited image) pairs and {which}: add "
        '`"conditioning_data": "<id>"` to each image dataset of the dataset list, with a '
        '`"dataset_type": "conditioning"`, `"conditioning_type": "reference_strict"` dataset of that id holding the '
        'source images (same relative paths as the edited ones), or mark the others `"dataset_type": "eval"`; '
        "then re-run `st prepare` and `st cache`"
    )


def latents(family: Family, batch: Any) -> Any:
    """The reference latents of a reference family's forward pass (None for other families): the batch's (training
    batches, and the evaluation loss's one-sample batches, carry them)."""
    if not family.takes_reference:
        return None
    found = None if batch is None else batch.control_latents
    if found is None:
        raise InputError(f"a {family.pipeline_class} batch (dataset {getattr(batch, 'dataset_id', '?')!r}) has no "
                         "reference image latents: every dataset it trains on needs conditioning_data; re-run "
                         "`st prepare` and `st cache` after linking one")  # fmt: skip
    return found


def validation_control(family: Family, denoiser: Any, index: Any, count: int) -> ValidationControl | None:
    """What validation renders with for a reference family (None for others): the family's pipeline on the live
    `denoiser`, prompt i with the reference image of the i-th cached sample that has one (modulo their number)."""
    if not family.takes_reference:
        return None
    from PIL import Image

    from .data import SampleReader

    reader = SampleReader()
    images = []
    try:
        for key in sorted(index.samples):
            ref = index.samples[key]
            kinds = [c.get("kind") for c in ref.meta.get("conditioning") or ()]
            if COND not in ref.members or all(kind in MASK_TYPES for kind in kinds):
                continue
            pixels, _ = read_conditioning(reader, ref)
            images.append(Image.fromarray(((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()))
            if len(images) >= max(1, count):
                break
    finally:
        reader.close()
    if not images:
        raise InputError(f"{family.pipeline_class} validation needs a cached reference image and the cache has none; "
                         "re-run `st cache` after linking conditioning_data")  # fmt: skip
    return ValidationControl(family.pipeline_class, denoiser, None, IMAGE_ARGUMENT, images)
