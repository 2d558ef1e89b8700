"""Writing planned shards: entries the previous output holds are copied, the rest encoded in bucket-homogeneous
batches (a video shard: one clip per batch, see `encode`); each shard's sidecar records the samples written and those
rejected (with the reason)."""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

from ..datasets import MASK_TYPES
from ..errors import InputError
from ..fsutil import atomic_write_text
from ..log import get_logger
from ..shardformat import ShardWriter, encode_sample
from .encode import Encoders, encode_latent_batch, encode_texts, torch_dtype
from .images import LOADER_FAILURE, ImageJob, iterate_batches, job_for
from .layout import sidecar_doc
from .options import CacheOptions
from .plan import Entry, ShardPlan, reference_position
from .reuse import PreviousEntries
from .videos import UNDECODABLE, video_job_for

log = get_logger("cache")


def _take(stream: Iterator, count: int):
    """The next `count` items of an iterator, lazily (so decoding keeps running ahead in the loader's workers)."""
    for _ in range(count):
        yield next(stream)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _is_video(entries: list[Entry]) -> bool:
    """Whether the entries (of one shard: all video or all images) are video samples."""
    return any(e.frames for e in entries)


class ShardEncoder:
    """Writes planned shards into `out_dir`; `encoded` and `reused` count the samples written each way."""

    def __init__(self, options: CacheOptions, roots: dict[str, str], out_dir: Path, encoders: Encoders,
                 previous: PreviousEntries, strict: bool = False) -> None:  # fmt: skip
        self.options, self.roots, self.out_dir = options, roots, out_dir
        self.encoders, self.previous, self.strict = encoders, previous, strict
        self.cache_dtype = torch_dtype(options.cache_dtype)
        self.encoded = self.reused = 0

    def _job(self, entry: Entry) -> ImageJob:
        root = self.roots[entry.row["dataset_id"]]
        if entry.frames:
            return video_job_for(entry.row, root, entry.frames, self.roots)
        return job_for(entry.row, root, self.roots)

    def _batches(self, entries: list[Entry]) -> list[list[ImageJob]]:
        """The entries' jobs in VAE batches: one clip per batch for video, `vae_batch_size` images otherwise."""
        return _chunks([self._job(e) for e in entries], 1 if _is_video(entries) else self.options.batch)

    def _control_latents(self, entries: dict[str, Entry], partners: dict[str, list]) -> dict[str, Any]:
        """VAE latents of a loaded batch's non-mask conditioning images (families whose control input is latents),
        by "<sample id>:conditioning:<i>", encoded in calls of `vae_rows` rows like the targets (not one call each)."""
        import torch

        if self.encoders.family.control_input != "latents":
            return {}
        keys, images = [], []
        for sample_id, pixels in partners.items():
            if entries[sample_id].frames:  # conditioning clips: `_control_clip`
                continue
            for i, partner in enumerate(entries[sample_id].conditioning):
                if partner["kind"] not in MASK_TYPES:
                    keys.append(f"{sample_id}:conditioning:{i}")
                    images.append(pixels[i])
        rows = self.options.vae_rows
        latents = {}
        for start in range(0, len(keys), rows):
            chunk = keys[start : start + rows]
            encoded = encode_latent_batch(self.encoders, torch.stack(images[start : start + rows]), chunk,
                                          self.options.seed, rows)  # fmt: skip
            latents.update(zip(chunk, encoded))
        return latents

    def _conditioning(self, sample_id: str, images: list, latents: dict[str, Any]) -> dict[str, Any] | None:
        """The sample's conditioning tensors: `{i}.pixels` (uint8, at the target's size) for each image, and
        `{i}.latent` where `latents` (`_control_latents`) has one. None when a latent is not finite."""
        import torch

        tensors = {}
        for i, pixels in enumerate(images):
            tensors[f"{i}.pixels"] = ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
            latent = latents.get(f"{sample_id}:conditioning:{i}")
            if latent is not None:
                if not bool(latent.isfinite().all()):
                    return None
                tensors[f"{i}.latent"] = latent.to(self.cache_dtype)
        return tensors

    def _first_frame(self, clip, latent, last: bool = False) -> dict[str, Any] | None:
        """A Wan i2v clip's conditioning tensors: its first frame (`0.pixels`, uint8) and the condition latents of
        [first frame, black frames] (`0.latent`, shaped as its latent); with `last` (Wan 2.1 FLF2V) its last frame
        (`0.last_pixels`) and the condition latents of [first frame, black frames, last frame]; for Wan 2.1 the CLIP
        image embeddings of those frames (`0.image_embeds`). None when they are not finite."""
        from ..families.wan_i2v import IMAGE_EMBEDS, cached_conditioning, cached_image_embeds, uses_clip

        tensors = cached_conditioning(self.encoders.vae, clip, latent.shape[1], last=last)
        if uses_clip(self.encoders.family):  # Wan 2.1 (not 2.2): the CLIP embeddings of the frames, as SimpleTuner
            tensors[f"0.{IMAGE_EMBEDS}"] = cached_image_embeds(*self.encoders.clip, tensors).cpu()
        if not all(bool(t.isfinite().all()) for t in tensors.values() if t.is_floating_point()):
            return None
        return {name: t.to(self.cache_dtype) if t.is_floating_point() else t for name, t in tensors.items()}

    def _control_clip(self, entry: Entry, clips: list, clip: Any = None) -> dict[str, Any] | None:
        """A video sample's conditioning clips (Wan VACE; and its reference image): each one's uint8 pixels and the
        control latents WanVACEPipeline computes for them (`wan_vace.cached_control`; `clip`: the sample's own
        pixels, whose shape a reference without a control clip takes). None when they are not finite."""
        from ..families.wan_vace import cached_control, transformer_patch_size

        shape = None if clip is None else tuple(int(n) for n in clip.shape[1:])
        if getattr(self, "_vace_patch", None) is None:  # what the pipeline reads of its transformer, read once a run
            self._vace_patch = transformer_patch_size(self.encoders.source, self.encoders.revision)
        tensors = cached_control(self.encoders.vae, entry.conditioning, clips, self.encoders.device, shape=shape,
                                 patch_size=self._vace_patch)  # fmt: skip
        if not all(bool(t.isfinite().all()) for t in tensors.values() if t.is_floating_point()):
            return None
        return {name: t.to(self.cache_dtype) if t.is_floating_point() else t for name, t in tensors.items()}

    def _encode_texts(self, entries: list[Entry]) -> dict[str, dict[str, Any]]:
        captions = sorted({c for e in entries for _, c in e.local_captions})
        return dict(zip(captions, encode_texts(self.encoders, captions, self.options)))

    def _reference_texts(self, entry: Entry, conditioning: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """A sample's captions, each encoded with its reference image as cached (`{i}.pixels`, uint8 at the target's
        size and crop: the image its reference latents come from), for a `Family.text_with_reference` family."""
        from PIL import Image

        pixels = conditioning[f"{reference_position(entry.row)}.pixels"]
        image = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())
        captions = entry.local_captions
        encoded = encode_texts(self.encoders, [c for _, c in captions], self.options, images=[image] * len(captions))
        return {i: values for (i, _), values in zip(captions, encoded, strict=True)}

    def _reject(self, entry: Entry, reason: str, detail: str) -> None:
        """Stop on a problem that must be fixed first; otherwise log the skip (the shard's sidecar records it)."""
        dataset_id, path = entry.row["dataset_id"], entry.row["path"]
        source = Path(self.roots[dataset_id]) / path
        if reason == LOADER_FAILURE:
            raise RuntimeError(f"loading {source} (dataset {dataset_id}) failed: {detail}")
        if reason in UNDECODABLE:
            if self.strict:
                raise InputError(f"--strict: {source} (dataset {dataset_id}) {detail}; replace or remove it and re-run "
                                 "`st prepare`, or run `st cache` without --strict to skip it")  # fmt: skip
            log.warning("cache: skipping %s (dataset %s): %s", source, dataset_id, detail)
        elif not self.options.ignore_missing_files:
            raise InputError(f"{detail}; re-run `st prepare`, or set ignore_missing_files to skip it")

    def write_all(self, shards: list[ShardPlan], bar) -> None:
        """Write `shards` in order. One image loader serves the whole run, so the next shard's images decode while
        this shard's text and latents are encoded; batches never span shards, so a shard's bytes do not depend on
        which other shards a run writes (resume, parts and processes give the same shards)."""
        plans: list[tuple[ShardPlan, list[Entry], int]] = []
        batches: list[list[ImageJob]] = []
        for shard in shards:
            todo = [e for e in shard.entries if e.entry_key not in self.previous.where]
            shard_batches = self._batches(todo)
            batches.extend(shard_batches)
            plans.append((shard, todo, len(shard_batches)))
        stream = iterate_batches(batches, self.options.workers if len(batches) > 1 else 0)
        for shard, todo, count in plans:
            self._write_one(shard, todo, _take(stream, count), bar)

    def _write_one(self, shard: ShardPlan, todo: list[Entry], loaded_batches, bar) -> None:
        members: dict[str, dict[str, bytes]] = {}
        planned = {e.sample_id for e in todo}
        late: list[Entry] = []
        for entry in shard.entries:
            if entry.sample_id in planned:
                continue
            found = self.previous.get(entry.entry_key)
            if found is not None:
                members[entry.sample_id] = found
                self.reused += 1
                bar.update(1)
            else:  # the previous shard holding it turned out unreadable: encode it after all
                late.append(entry)
        rejected: dict[str, tuple[str, str]] = {}
        encode = todo + late
        if encode:
            members.update(self._encode(encode, late, loaded_batches, rejected, bar))
        self._write_shard(shard, members, rejected)

    def _encode(self, encode: list[Entry], late: list[Entry], loaded_batches, rejected: dict[str, tuple[str, str]],
                bar) -> dict[str, dict[str, bytes]]:  # fmt: skip
        """Members of the `encode` entries (the loaded batches, then those of `late`); rejections go to `rejected`."""
        level = self.options.cache_compression_level
        with_reference = self.encoders.family.text_with_reference  # captions encoded per sample, in the loop below
        texts = {} if with_reference else self._encode_texts(encode)
        if not with_reference:
            self.encoders.release_text()
        by_id = {e.sample_id: e for e in encode}
        extra = self._batches(late)
        rows = 1 if _is_video(encode) else self.options.vae_rows
        members: dict[str, dict[str, bytes]] = {}
        for ids, pixels, problems, partners in chain(loaded_batches, iterate_batches(extra, 0)):
            for sample_id, (reason, detail) in problems.items():
                self._reject(by_id[sample_id], reason, detail)
                rejected[sample_id] = (reason, detail)
                bar.update(1)
            if pixels is None:
                continue
            latents = encode_latent_batch(self.encoders, pixels, ids, self.options.seed, rows)
            control = self._control_latents(by_id, partners)
            for sample_id, latent, clip in zip(ids, latents, pixels):
                bar.update(1)
                if not bool(latent.isfinite().all()):
                    rejected[sample_id] = ("non_finite_latent", "the VAE produced NaN or Inf for this image")
                    continue
                entry = by_id[sample_id]
                if entry.first_frame:
                    conditioning = self._first_frame(clip, latent, entry.last_frame)
                elif entry.frames and entry.conditioning:
                    conditioning = self._control_clip(entry, partners[sample_id], clip)
                else:
                    conditioning = self._conditioning(sample_id, partners[sample_id], control) if entry.conditioning \
                        else {}  # fmt: skip
                if conditioning is None:
                    rejected[sample_id] = ("non_finite_latent", "the VAE produced NaN or Inf for its conditioning image")
                    continue
                captions = self._reference_texts(entry, conditioning) if with_reference else \
                    {i: texts[caption] for i, caption in entry.local_captions}  # fmt: skip
                members[sample_id] = encode_sample(entry.metadata(), latent.to(self.cache_dtype), captions=captions,
                                                   conditioning=conditioning, level=level)  # fmt: skip
                self.encoded += 1
        return members

    def _write_shard(self, shard: ShardPlan, members: dict[str, dict[str, bytes]],
                     rejected: dict[str, tuple[str, str]]) -> None:  # fmt: skip
        written = [e.sample_id for e in shard.entries if e.sample_id in members]
        final = self.out_dir / shard.path
        final.parent.mkdir(parents=True, exist_ok=True)
        with ShardWriter(final) as writer:
            for sample_id in written:
                writer.add(sample_id, members[sample_id])
            # The sidecar lands before the shard's rename: a shard under its final name always has one. It also
            # keeps the shard's index (where each member's bytes sit), so that training reads it instead of the shard.
            doc = {**sidecar_doc(shard, written, rejected), "index": writer.index_doc()}
            atomic_write_text(self.out_dir / shard.sidecar, json.dumps(doc, sort_keys=True) + "\n")
