"""Warnings about a prepared dataset that a user should read before spending GPU hours on it: a dataset that lost more
than a tenth of its images, and images squashed to a bucket's aspect ratio (crop = false) by more than a few percent."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from ..datasets import DatasetSpec
from ..log import get_logger
from .select import Sample, Skip

log = get_logger("prepare")

SKIPPED_SHARE = 0.10  # warn when more than this share of a dataset's images is skipped
SQUASH_LIMIT = 0.05  # warn when an image's aspect ratio changes by more than this (crop = false)
_LISTED = 3


def squash(sample: Sample) -> float:
    """How much resizing to the bucket changes the image's aspect ratio (0.1: 10% wider or narrower)."""
    source = sample.width / sample.height
    target = sample.plan.target_width / sample.plan.target_height
    return math.exp(abs(math.log(target / source))) - 1


def warn_about(specs: list[DatasetSpec], files: dict[str, int], kept: list[Sample], skips: list[Skip]) -> None:
    """Log the warnings for each dataset (`files`: images found per dataset id)."""
    for spec in specs:
        skipped = [k for k in skips if k.dataset_id == spec.id]
        found = files.get(spec.id, 0)
        if found and len(skipped) / found > SKIPPED_SHARE:
            reasons = ", ".join(f"{reason} {n}" for reason, n in Counter(k.reason for k in skipped).most_common())
            kind = "videos" if spec.video is not None else "images"
            log.warning("dataset '%s': %d of %d %s skipped (%s); see skipped.jsonl", spec.id, len(skipped), found, kind,
                        reasons)  # fmt: skip
        if spec.crop:
            continue
        worst: dict[str, float] = defaultdict(float)
        for sample in (s for s in kept if s.dataset_id == spec.id):
            worst[sample.plan.bucket] = max(worst[sample.plan.bucket], squash(sample))
        squashed = sorted(((v, b) for b, v in worst.items() if v > SQUASH_LIMIT), reverse=True)
        if squashed:
            listing = ", ".join(f"{bucket} (up to {value:.0%})" for value, bucket in squashed[:_LISTED])
            more = f" and {len(squashed) - _LISTED} more" if len(squashed) > _LISTED else ""
            log.warning("dataset '%s': crop is false, so images are stretched to their bucket's aspect ratio: %s%s; "
                        "set crop = true to crop instead", spec.id, listing, more)  # fmt: skip
