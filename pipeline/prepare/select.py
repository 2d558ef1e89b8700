"""Which images become samples: captions, duplicates and bucket plans (`select`), buckets too small for a batch
(`prune`), and the optional deletion of skipped files inside the dataset folder."""

from __future__ import annotations

import math
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from ..config import LoadedConfig
from ..datasets import DatasetSpec
from ..distributed import global_batch
from ..errors import InputError
from ..log import get_logger
from . import buckets as bucketing
from .captions import MissingCaption, caption_file_for, captions_for
from .discover import DatasetFiles, relative_path
from .scan import Probe
from .video_buckets import VideoFacts, frame_window, video_plan
from .walk import delete_inside

log = get_logger("prepare")

PROBLEMATIC = frozenset({"empty_file", "not_an_image", "corrupt_image", "decompression_bomb"})
UNWANTED = frozenset({"too_small", "aspect_ratio_out_of_range", "upscale_exceeds_threshold"})


@dataclass
class Sample:
    sample_id: str
    dataset_id: str
    path: str
    captions: list[str]
    width: int
    height: int
    plan: bucketing.Plan
    orientation: int
    format: str
    bytes: int
    repeats: int
    conditioning: list = field(default_factory=list)  # `pairing.Partner`s, in conditioning_data order
    video: VideoFacts | None = None  # video samples: frames, rate, length and frame window


@dataclass
class Skip:
    dataset_id: str
    path: str
    reason: str
    detail: str

    def as_json(self) -> dict[str, str]:
        return {"dataset_id": self.dataset_id, "path": self.path, "reason": self.reason, "detail": self.detail}


def cap_samples(datasets: list[DatasetFiles]) -> None:
    """max_num_samples: keep at most that many of each dataset's image files, the subset SimpleTuner picks
    (`_apply_max_num_samples_limit`): the paths sorted, shuffled by a generator seeded with the dataset id, the first
    N kept. It is the same subset on every run and machine while the folder holds the same files; it is picked
    before any file is read, so a skipped image is not replaced. Kept files stay in folder order."""
    for files in datasets:
        limit = files.spec.max_num_samples
        if limit is None or len(files.images) <= limit:
            continue
        order = sorted(stat.path for stat in files.images)
        random.Random(files.spec.id).shuffle(order)
        kept = set(order[:limit])
        files.capped = len(files.images) - limit
        files.images = [stat for stat in files.images if stat.path in kept]
        log.info("dataset '%s': max_num_samples %d keeps %d of %d files (a fixed subset chosen by the dataset id); "
                 "%d left out", files.spec.id, limit, limit, limit + files.capped, files.capped)  # fmt: skip


def select(
    datasets: list[DatasetFiles], probes: dict[str, Probe], alignment: int, rounding: int, seed: int
) -> tuple[list[Sample], list[Skip]]:
    samples: list[Sample] = []
    skips: list[Skip] = []
    seen: dict[str, tuple[str, str]] = {}
    for files in datasets:
        spec = files.spec
        skips.extend(Skip(spec.id, relative_path(spec.root, k.path), k.reason, k.detail) for k in files.unlisted)
        for stat in files.images:
            probe = probes[stat.path]
            rel = relative_path(spec.root, stat.path)
            if probe.error:
                skips.append(Skip(spec.id, rel, probe.error, probe.detail))
                continue
            if probe.sha256 in seen:
                first_ds, first_path = seen[probe.sha256]
                skips.append(Skip(spec.id, rel, "duplicate", f"same bytes as {first_path} in dataset '{first_ds}'"))
                continue
            try:
                check_caption_file(files, probes, stat.path)
                captions = captions_for(spec, rel, stat.path, files.table)
            except MissingCaption as exc:
                skips.append(Skip(spec.id, rel, "missing_caption", str(exc)))
                continue
            try:
                facts = frame_window(spec.video, probe) if spec.video is not None else None
                plan = bucketing.plan(
                    probe.width, probe.height, spec, alignment=alignment, rounding=rounding, seed=seed,
                    sample_id=probe.sha256,
                )  # fmt: skip
                if facts is not None:
                    plan = video_plan(plan, spec.video, facts)
            except bucketing.Rejected as exc:
                skips.append(Skip(spec.id, rel, exc.reason, exc.detail))
                continue
            seen[probe.sha256] = (spec.id, rel)
            samples.append(
                Sample(
                    probe.sha256, spec.id, rel, captions, probe.width, probe.height, plan, probe.orientation,
                    probe.format, probe.size, spec.repeats, video=facts,
                )  # fmt: skip
            )
    return samples, skips


def check_caption_file(files: DatasetFiles, probes: dict[str, Probe], image_path: str) -> None:
    """Raise MissingCaption when the image's caption file was refused by the walk or could not be read."""
    if files.spec.caption_strategy != "textfile" or files.spec.only_instance_prompt:
        return
    path = caption_file_for(image_path)
    name = os.path.basename(path)
    refused = files.refused_captions.get(path)
    if refused is not None:
        raise MissingCaption(f"caption file {name} was left out ({refused.reason}: {refused.detail})")
    probe = probes.get(path)
    if probe is not None and probe.error:
        raise MissingCaption(f"caption file {name} cannot be read ({probe.detail})")


def batch_size(config, spec: DatasetSpec | None = None) -> int:
    """Samples per optimizer step of the training run (`st train` checks num_processes against its launch), with
    `spec`'s own train_batch_size where it sets one (SimpleTuner's per-dataset bucket sizing:
    dataset train_batch_size x num_processes x gradient_accumulation_steps)."""
    per_process = spec.train_batch_size if spec is not None and spec.train_batch_size is not None else \
        config.train_batch_size  # fmt: skip
    return global_batch(per_process, config.num_processes, config.gradient_accumulation_steps)


def prune(samples: list[Sample], specs: list[DatasetSpec],
          loaded: LoadedConfig) -> tuple[list[Sample], list[Skip], dict]:  # fmt: skip
    """Drop (or, with allow_dataset_oversubscription, repeat) buckets too small for one batch."""
    config = loaded.config
    by_bucket: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in samples:
        by_bucket[(s.dataset_id, s.plan.bucket)].append(s)
    spec_by_id = {s.id: s for s in specs}
    kept: list[Sample] = []
    skips: list[Skip] = []
    raised: dict[str, dict[str, int]] = defaultdict(dict)
    for (dataset_id, bucket), members in by_bucket.items():
        spec = spec_by_id[dataset_id]
        batch = batch_size(config, spec)
        effective = len(members) * (spec.repeats + 1)
        if effective >= batch or config.disable_bucket_pruning:
            kept.extend(members)
            continue
        if config.allow_dataset_oversubscription and not spec.repeats_explicit:
            repeats = math.ceil(batch / len(members)) - 1
            for s in members:
                s.repeats = repeats
            raised[dataset_id][bucket] = repeats
            log.info(
                "dataset '%s': bucket %s has %d image(s), fewer than a batch of %d; repeats raised to %d",
                dataset_id, bucket, len(members), batch, repeats,
            )  # fmt: skip
            kept.extend(members)
            continue
        for s in members:
            skips.append(
                Skip(dataset_id, s.path, "bucket_pruned",
                     f"bucket {bucket} has {effective} sample(s) with repeats, fewer than one batch of {batch}")
            )  # fmt: skip
    order = {(s.dataset_id, s.path): i for i, s in enumerate(samples)}
    kept.sort(key=lambda s: order[(s.dataset_id, s.path)])
    if not kept and samples:
        sizes = Counter(s.plan.bucket for s in samples)
        listing = ", ".join(f"{b}: {n}" for b, n in sorted(sizes.items()))
        batch = " / ".join(sorted({str(batch_size(config, s)) for s in specs}, key=int))
        sizes_set = f"train_batch_size {config.train_batch_size}" + "".join(
            f", dataset '{s.id}': {s.train_batch_size}" for s in specs if s.train_batch_size is not None)
        raise InputError(
            f"no bucket holds enough images for one batch of {batch} ({sizes_set} x "
            f"num_processes {config.num_processes} x gradient_accumulation_steps {config.gradient_accumulation_steps}); "
            f"images per bucket: {listing}. Lower train_batch_size, set allow_dataset_oversubscription = true, "
            "raise repeats, or use crop = true with crop_aspect = \"square\" to gather images into fewer buckets"
        )
    return kept, skips, dict(raised)


def refuse_empty(skips: list[Skip], by_reason: dict[str, int]) -> None:
    """No image survived: an empty output would only fail later, in `st cache` or `st train`."""
    listing = ", ".join(f"{reason}: {n}" for reason, n in by_reason.items()) or "no image files"
    first = f"; first: {skips[0].dataset_id}/{skips[0].path} ({skips[0].reason}: {skips[0].detail})" if skips else ""
    raise InputError(f"no usable image in any dataset ({listing}){first}. Fix the images or the options that "
                     "skip them (resolution, minimum_image_size, aspect ratio limits)")  # fmt: skip


def delete_files(skips: list[Skip], specs: list[DatasetSpec], config) -> int:
    roots = {s.id: s.root for s in specs}
    doomed = set()
    if config.delete_problematic_images:
        doomed |= PROBLEMATIC
    if config.delete_unwanted_images:
        doomed |= UNWANTED
    deleted = 0
    for skip in skips:
        if skip.reason in doomed:
            # Only a regular file whose folder resolves inside the dataset folder: never a link, never outside.
            try:
                path = delete_inside(roots[skip.dataset_id], skip.path)
                deleted += 1
                log.warning("deleted %s (%s) because delete_%s_images is set", path, skip.reason,
                            "problematic" if skip.reason in PROBLEMATIC else "unwanted")  # fmt: skip
            except OSError as exc:
                log.warning("left %s/%s in place: %s", skip.dataset_id, skip.path, exc)
    return deleted
