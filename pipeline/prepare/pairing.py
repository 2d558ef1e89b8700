"""Pairing samples with their conditioning images: finding each partner in the conditioning datasets a sample's
dataset names (`conditioning_data`), and generating the partners of generated conditioning datasets.

A partner is the file with the sample's path relative to the conditioning dataset's folder; failing that, the one file
in the same folder with the same stem and another image extension (masks saved as .png beside .jpg photos). A sample
whose partner is missing or unreadable is skipped (`missing_conditioning`), never trained without it. The partner
takes its target's size and crop in `st cache`, so its own size only has to be readable.

Generated partners are written under OUT/conditioning/<dataset id>/ as PNG, named after their source's relative path;
an index there remembers (source hash, generator) -> output hash, so a re-run regenerates only what changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..datasets import ConditioningSpec, DatasetSpec
from ..errors import InputError
from ..fsutil import atomic_path, atomic_write_text
from ..hashing import sha256_bytes, sha256_json
from ..log import get_logger
from ..progress import progress_bar
from .discover import DatasetFiles, relative_path
from .scan import IMAGE_EXTENSIONS, Probe, list_files
from .select import Sample, Skip
from .video_probe import VIDEO_EXTENSIONS

log = get_logger("prepare")

GENERATED_FOLDER = "conditioning"
GENERATED_INDEX = "conditioning/index.json"
MISSING = "missing_conditioning"


@dataclass(frozen=True)
class Partner:
    """A sample's conditioning image: where it is, its content hash, its size and what it conditions."""

    dataset_id: str
    path: str  # relative to the conditioning dataset's folder
    sha256: str
    width: int
    height: int
    kind: str  # the dataset's conditioning_type
    # Positions in the sample's captions of the captions it trains with when this conditioning is chosen (a generated
    # dataset's `captions`); empty: the sample's own captions.
    captions: tuple[int, ...] = ()

    def as_row(self) -> dict[str, Any]:
        return {"dataset_id": self.dataset_id, "path": self.path, "sha256": self.sha256, "width": self.width,
                "height": self.height, "kind": self.kind, "captions": list(self.captions)}  # fmt: skip


def list_conditioning(spec: ConditioningSpec, videos: bool = False) -> DatasetFiles:
    """One walk of a conditioning folder (images only, or with `videos` the video files of a conditioning dataset a
    video dataset links; no captions are read)."""
    listing = list_files(spec.root, VIDEO_EXTENSIONS if videos else IMAGE_EXTENSIONS)
    return DatasetFiles(spec, listing.files, [], unlisted=listing.skips)  # type: ignore[arg-type]


class PartnerFinder:
    """The files of one conditioning dataset, by relative path and by (folder, stem)."""

    def __init__(self, files: DatasetFiles, probes: dict[str, Probe]) -> None:
        self.spec: ConditioningSpec = files.spec  # type: ignore[assignment]
        self.probes = probes
        self.by_path: dict[str, str] = {}
        self.by_stem: dict[str, list[str]] = {}
        for stat in files.images:
            rel = relative_path(self.spec.root, stat.path)
            self.by_path[rel] = stat.path
            self.by_stem.setdefault(os.path.splitext(rel)[0], []).append(rel)

    def find(self, rel: str) -> Partner | str:
        """The partner of the sample at `rel` (relative to its own dataset), or why there is none."""
        match = rel if rel in self.by_path else None
        if match is None:
            candidates = sorted(self.by_stem.get(os.path.splitext(rel)[0], []))
            if not candidates:
                return f"no {rel} (or same name with another image extension) in conditioning dataset " \
                       f"'{self.spec.id}' ({self.spec.root})"
            match = candidates[0]
        probe = self.probes[self.by_path[match]]
        if probe.error:
            return f"its conditioning image {match} in '{self.spec.id}' is unusable ({probe.error}: {probe.detail})"
        return Partner(self.spec.id, match, probe.sha256, probe.width, probe.height, self.spec.conditioning_type)


def pair_samples(samples: list[Sample], specs: list[DatasetSpec], finders: dict[str, PartnerFinder]
                 ) -> tuple[list[Sample], list[Skip]]:  # fmt: skip
    """Attach the partners found in the named (not generated) conditioning datasets; skip samples missing one."""
    by_id = {s.id: s for s in specs}
    kept, skips = [], []
    for sample in samples:
        partners, problem = [], None
        for ident in by_id[sample.dataset_id].conditioning_data:
            finder = finders.get(ident)
            if finder is None:  # generated after selection
                continue
            found = finder.find(sample.path)
            if isinstance(found, str):
                problem = found
                break
            if sample.video is not None and not found.kind.startswith("reference_"):  # a reference is an image
                check_clip_partner(sample, by_id[sample.dataset_id], finder, found)
            partners.append(found)
        if problem is not None:
            skips.append(Skip(sample.dataset_id, sample.path, MISSING, problem))
            continue
        sample.conditioning = partners
        kept.append(sample)
    return kept, skips


def check_clip_partner(sample: Sample, spec: DatasetSpec, finder: PartnerFinder, partner: Partner) -> None:
    """A video sample's conditioning clip (Wan VACE's control or mask video) must have the clip's frame count and
    frame size: it is read through the same frame window, resize and crop, frame for frame. InputError naming both
    files otherwise (a clip cut or scaled differently would condition frames on other frames)."""
    probe = finder.probes[finder.by_path[partner.path]]
    facts = sample.video
    if (probe.frames, probe.width, probe.height) == (facts.frames, sample.width, sample.height):
        return
    raise InputError(f"conditioning clip {probe.path} (dataset '{partner.dataset_id}') has {probe.frames} frames of "
                     f"{probe.width}x{probe.height}, but its video {os.path.join(str(spec.root), sample.path)} "
                     f"(dataset '{sample.dataset_id}') has {facts.frames} frames of {sample.width}x{sample.height}; "
                     "a conditioning clip needs its video's frame count and size: re-export it to match, or remove "
                     "the pair")  # fmt: skip


def generated_root(out_dir: Path, spec: ConditioningSpec) -> Path:
    return out_dir / GENERATED_FOLDER / spec.id


def _generated_name(rel: str) -> str:
    return rel + ".png"


class Generation:
    """Writes the partners of generated conditioning datasets into the prepare output folder."""

    def __init__(self, out_dir: Path, roots: dict[str, Path], seed: int) -> None:
        self.out_dir, self.roots, self.seed = out_dir, roots, seed
        self.index = self._read_index()
        self.generated = self.reused = 0

    def _read_index(self) -> dict[str, dict[str, list[str]]]:
        path = self.out_dir / GENERATED_INDEX
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def run(self, samples: list[Sample], specs: list[DatasetSpec], generated: dict[str, ConditioningSpec]) -> None:
        """Append each sample's generated partners, in its dataset's conditioning_data order."""
        by_id = {s.id: s for s in specs}
        work = [(s, generated[i]) for s in samples for i in by_id[s.dataset_id].conditioning_data if i in generated]
        if not work:
            return
        new_index: dict[str, dict[str, list[str]]] = {}
        with progress_bar(total=len(work), desc="conditioning", unit="img") as bar:
            for sample, cond in work:
                partner = self._one(sample, cond, new_index.setdefault(cond.id, {}))
                self._insert(sample, partner, by_id[sample.dataset_id].conditioning_data, cond.generator.captions)
                bar.update(1)
        atomic_write_text(self.out_dir / GENERATED_INDEX, json.dumps(new_index, sort_keys=True) + "\n")
        log.info("conditioning: %d image(s) generated, %d unchanged", self.generated, self.reused)

    @staticmethod
    def _insert(sample: Sample, partner: Partner, order: tuple[str, ...], captions: tuple[str, ...] | None) -> None:
        """Add `partner` in conditioning_data order; its own `captions` join the sample's, remembered by position."""
        if captions:
            start = len(sample.captions)
            sample.captions = [*sample.captions, *captions]
            partner = dataclasses.replace(partner, captions=tuple(range(start, start + len(captions))))
        sample.conditioning = sorted([*sample.conditioning, partner], key=lambda p: order.index(p.dataset_id))

    def _one(self, sample: Sample, cond: ConditioningSpec, index: dict[str, list[str]]) -> Partner:
        from PIL import Image

        from ..image_decode import decode_rgb
        from .generators import generate
        from .walk import read_regular_file

        name = _generated_name(sample.path)
        target = generated_root(self.out_dir, cond) / name
        generator_key = sha256_json(cond.generator.describe())
        known = self.index.get(cond.id, {}).get(name)
        if known and known[:2] == [sample.sample_id, generator_key] and target.is_file():
            data = target.read_bytes()
            if sha256_bytes(data) == known[2]:
                index[name] = known
                self.reused += 1
                with Image.open(target) as img:
                    return Partner(cond.id, name, known[2], img.width, img.height, cond.conditioning_type)
        source = decode_rgb(read_regular_file(str(self.roots[sample.dataset_id] / sample.path)))
        image = generate(cond.generator, source, f"{self.seed}:{sample.sample_id}:{cond.id}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            image.save(tmp, format="PNG")
        digest = sha256_bytes(target.read_bytes())
        index[name] = [sample.sample_id, generator_key, digest]
        self.generated += 1
        return Partner(cond.id, name, digest, image.width, image.height, cond.conditioning_type)
