"""Training batches from cache shards, in an order that is a pure function of (seed, epoch, the cache's contents).

The loader reads the cache's shard index (`shardformat.index`: where each sample's members sit in its shard and how
often it repeats, recorded by the shard writer), not the shards, so the start does not grow with the cache. An epoch's
plan is then computed, not streamed: every (dataset, bucket) group's samples, each repeated `1 + repeats` times, are
shuffled with a generator seeded by (seed, epoch, the cache's contents) and cut into global batches of `train_batch_size
x num_processes` (the dataset's own train_batch_size where it sets one); datasets are interleaved by weight
(`probability`, times the dataset's size under `data_backend_sampling: auto-weighting`), each batch drawn among the
datasets whose schedule (start_epoch, start_step, end_epoch, end_step) has them active at its optimizer step. Rank r
of n takes slice r of every global batch, so processes read disjoint samples. A cursor (epoch, batch) is all a
checkpoint needs to resume exactly; the plan does not depend on the number of processes as long as the global batch
size is the same.

Reading a sample is a seek and a read of its members (tar shards are uncompressed; each member is one zstd frame).
The first time a shard is read on this machine, one process checks its sha256, its tar headers against the index and
every sample in it (`shardformat.verified`); a sample's structure is also checked whenever it is decoded, every frame
within the bounds the cache manifest implies (`shardformat.checks`), so damaged or crafted bytes stop the run, naming
the shard and member, before they are used.
Caption choice and caption dropout are seeded per (epoch, batch, sample, slot), so they too replay exactly.
"""

from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..datasets import MASK_TYPES, DatasetSchedule
from ..errors import InputError
from ..log import get_logger
from ..shardformat import JSON, LATENT, CacheChecks, CheckedSample, DecodedSample, read_member
from ..shardformat.index import IndexedSample, IndexedShard, load_index

log = get_logger("train")


class SampleRef(IndexedSample):
    """A sample of the index; its metadata (`meta`) is read from its shard and checked when asked for."""

    __slots__ = ()

    @property
    def meta(self) -> dict[str, Any]:
        return self.shard.read_meta(self.row).meta


def image_paired_datasets(cache_manifest: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The training (non-eval) datasets of a cache whose samples have a conditioning image that is not a mask, and
    those that have none: what ControlNet and reference-image runs need, and what a plain run leaves unused."""
    kinds = {c["id"]: c.get("conditioning_type") for c in cache_manifest.get("conditioning_datasets", [])}
    paired, unpaired = [], []
    for dataset in cache_manifest.get("datasets", []):
        if dataset.get("dataset_type", "image") == "eval":
            continue
        linked = dataset.get("conditioning_data") or ()
        has_image = any(kinds.get(i) not in (None, *MASK_TYPES) for i in linked)
        (paired if has_image else unpaired).append(dataset["id"])
    return paired, unpaired


def caption_positions(meta: dict[str, Any], chosen: int | None, count: int) -> list[int]:
    """The captions a sample may train with: those of its chosen conditioning image when that has its own (a
    generated dataset's `captions`), else its own (those no conditioning image claims)."""
    partners = meta.get("conditioning", [])
    if chosen is not None and partners[chosen].get("captions"):
        return list(partners[chosen]["captions"])
    claimed = {i for p in partners for i in p.get("captions", [])}
    own = [i for i in range(count) if i not in claimed]
    return own or list(range(count))


@dataclass(frozen=True)
class PlannedBatch:
    dataset_id: str
    bucket: str
    keys: tuple[str, ...]  # the global batch


@dataclass
class Cursor:
    epoch: int = 0
    batch: int = 0  # index of the next global batch within the epoch

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}


class CacheIndex:
    """Every sample of a cache output, grouped by (dataset, bucket), from the shard index alone."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.samples: dict[str, SampleRef] = {}
        from .shard_cache import attached, load_fetched_index

        self.fetcher = attached(root)  # the local side of a cache on S3: shards are fetched as the plan reaches them
        self.shards: list[IndexedShard] = (load_fetched_index(root, manifest, CacheChecks(manifest), self.fetcher)
                                           if self.fetcher else load_index(root, manifest, CacheChecks(manifest)))
        self.groups: dict[tuple[str, str], list[str]] = {}
        for shard in self.shards:
            for row, key in enumerate(shard.keys):
                self.samples[key] = SampleRef(key, shard, row)
            self.groups.setdefault((shard.dataset_id, shard.bucket), []).extend(shard.keys)
        if sum(len(s.keys) for s in self.shards) != len(self.samples):  # a key in two shards: the last one's
            self.groups = {}
            for key, ref in self.samples.items():
                self.groups.setdefault((ref.dataset_id, ref.bucket), []).append(key)
        for keys in self.groups.values():
            keys.sort()
        self.datasets = {d["id"]: d for d in manifest["datasets"]}

    def is_eval(self, dataset_id: str) -> bool:
        """Whether the dataset is an eval dataset (`dataset_type: eval`): never in training batches."""
        return self.datasets.get(dataset_id, {}).get("dataset_type") == "eval"

    def eval_keys(self, dataset_id: str | None = None) -> list[str]:
        """The samples of the eval datasets (or of one), sorted by dataset then sample id."""
        return [k for (d, _), keys in sorted(self.groups.items()) if self.is_eval(d) and dataset_id in (None, d)
                for k in keys]  # fmt: skip

    def is_regularisation(self, dataset_id: str) -> bool:
        return bool(self.datasets.get(dataset_id, {}).get("is_regularisation_data"))

    def check_conditioning(self, sampling: str) -> None:
        """Refuse what training cannot use: several mask datasets on one dataset (which mask weights the loss?), and
        `combined` sampling of several conditioning images (st's Kontext takes one reference image)."""
        for dataset_id, spec in sorted(self.datasets.items()):
            partners = next((self.samples[k].meta.get("conditioning", []) for (d, _), keys in self.groups.items()
                             if d == dataset_id for k in keys[:1]), [])  # fmt: skip
            masks = [p["dataset_id"] for p in partners if p["kind"] in MASK_TYPES]
            controls = [p["dataset_id"] for p in partners if p["kind"] not in MASK_TYPES]
            if len(masks) > 1:
                raise InputError(f"dataset '{dataset_id}' is paired with {len(masks)} mask datasets ({', '.join(masks)}); "
                                 "name one mask dataset in its conditioning_data")  # fmt: skip
            if len(controls) > 1 and sampling == "combined":
                raise InputError(f"dataset '{dataset_id}' is paired with {len(controls)} conditioning datasets and "
                                 "conditioning_multidataset_sampling is 'combined' (all of them at once, as "
                                 "SimpleTuner's multi-reference Flux Kontext takes them), which st does not train: "
                                 "diffusers' FluxKontextPipeline, which st validates and publishes with, takes one "
                                 "reference image; set it to 'random' (one conditioning image per sample)")  # fmt: skip


def _contents_digest(index: CacheIndex) -> str:
    """sha256 of what the plan draws from: each training group's dataset id, bucket and sample keys with their repeats,
    and each dataset's probability."""
    import hashlib
    import json

    groups = [[d, str(b), [[k, index.samples[k].repeats] for k in keys]]
              for (d, b), keys in sorted(index.groups.items())]  # fmt: skip
    probabilities = {d: float(spec.get("probability", 1.0)) for d, spec in sorted(index.datasets.items())}
    payload = json.dumps({"groups": groups, "probabilities": probabilities}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class EpochPlanner:
    """The batches of each epoch, a pure function of (seed, epoch, the cache's contents, global batch size).

    The shuffles are seeded with the cache's contents (dataset ids, buckets, sample keys, repeats, probabilities), not
    its manifest digest: that digest covers where the data folder was when `st prepare` ran, and the same images
    prepared from another folder or machine must train in the same order under the same seed."""

    PLAN_VERSION = 2  # 1: seeded with the cache manifest's digest

    def __init__(self, index: CacheIndex, *, seed: int, global_batch: int, sampling: str,
                 accumulation: int = 1, processes: int = 1) -> None:  # fmt: skip
        """`global_batch`: train_batch_size x `processes` (the data-parallel processes)."""
        self.index = index
        self.seed = seed
        self.global_batch = global_batch
        self.sampling = sampling
        self.digest = index.manifest["digest"]
        self.contents = _contents_digest(index)
        # Datasets with start_epoch / start_step / end_epoch / end_step set (`DatasetSchedule`). A step-scheduled
        # plan depends on which optimizer step each batch falls on, hence on gradient accumulation and on the
        # lengths of the epochs before it; without schedules every epoch has the same number of batches.
        self.schedules = {d: DatasetSchedule.from_manifest(spec) for d, spec in sorted(index.datasets.items())
                          if DatasetSchedule.from_manifest(spec).describe() and not index.is_eval(d)}  # fmt: skip
        self.accumulation = max(1, accumulation)
        # Training datasets with their own train_batch_size (SimpleTuner's per-dataset key): their global batch is
        # that size x the data-parallel processes; the others keep `global_batch`. Eval datasets are never batched
        # for training (SimpleTuner sizes them 1).
        self.batch_sizes = {d: int(spec["train_batch_size"]) * max(1, processes)
                            for d, spec in sorted(index.datasets.items())
                            if spec.get("train_batch_size") is not None and not index.is_eval(d)}  # fmt: skip
        self._lengths: list[int] = []  # scheduled plans: the number of batches of epochs 0, 1, ...
        self._lock = threading.RLock()  # the loader's thread plans ahead while the trainer asks for lengths
        self._cache: dict[int, list[PlannedBatch]] = {0: self._plan(0)}
        self._count = len(self._cache[0])  # without schedules, every epoch has this number of batches

    @property
    def scheduled(self) -> bool:
        return bool(self.schedules)

    def fingerprint(self) -> dict[str, Any]:
        out = {"seed": self.seed, "cache_digest": self.digest, "global_batch": self.global_batch,
               "sampling": self.sampling, "plan_version": self.PLAN_VERSION}  # fmt: skip
        if self.scheduled:  # only then, so that the fingerprints of unscheduled runs stay as they were
            out["schedules"] = {d: s.describe() for d, s in self.schedules.items()}
            out["accumulation"] = self.accumulation
        if self.batch_sizes:  # likewise: only with per-dataset batch sizes
            out["batch_sizes"] = dict(self.batch_sizes)
        return out

    def batch_size(self, dataset_id: str) -> int:
        """The global batch of `dataset_id`'s planned batches."""
        return self.batch_sizes.get(dataset_id, self.global_batch)

    def epoch(self, epoch: int) -> list[PlannedBatch]:
        if epoch not in self._cache:
            self._cache = {epoch: self._plan(epoch)}
        return self._cache[epoch]

    def batches_per_epoch(self) -> int:
        """The number of batches of the first epoch (of every epoch, without schedules)."""
        return self._count

    def epoch_length(self, epoch: int) -> int:
        """The number of batches of `epoch`."""
        if not self.scheduled:
            return self._count
        self._offset(epoch + 1)
        return self._lengths[epoch]

    def _offset(self, epoch: int) -> int:
        """Scheduled plans: the number of batches before `epoch` (every earlier epoch planned once, its length kept)."""
        with self._lock:
            while len(self._lengths) < epoch:
                self._plan(len(self._lengths))
            return sum(self._lengths[:epoch])

    def run_length(self, max_train_steps: int | None, num_train_epochs: int) -> tuple[int, int]:
        """Scheduled plans: (optimizer steps, epochs) of a run of `max_train_steps` steps, else of `num_train_epochs`
        epochs, from the epochs' real lengths. Epoch lengths vary with schedules, so the run is counted, not
        estimated; an epoch in which no dataset is sampled stops with an error (`_plan`)."""
        accum = self.accumulation
        if max_train_steps:
            epochs, batches = 0, 0
            while batches < max_train_steps * accum:
                batches += self.epoch_length(epochs)
                epochs += 1
            return max_train_steps, epochs
        return sum(self.epoch_length(e) for e in range(num_train_epochs)) // accum, num_train_epochs

    def _plan(self, epoch: int) -> list[PlannedBatch]:
        rng = random.Random(f"{self.seed}:{epoch}:{self.contents}")
        per_dataset: dict[str, list[PlannedBatch]] = {}
        for (dataset_id, bucket), keys in sorted(self.index.groups.items()):
            if self.index.is_eval(dataset_id):
                continue
            items = [k for k in keys for _ in range(1 + self.index.samples[k].repeats)]
            rng.shuffle(items)
            size = self.batch_size(dataset_id)
            batches = [PlannedBatch(dataset_id, bucket, tuple(items[i : i + size]))
                       for i in range(0, len(items) - size + 1, size)]  # fmt: skip
            per_dataset.setdefault(dataset_id, []).extend(batches)
        for batches in per_dataset.values():
            rng.shuffle(batches)
        weights = {}
        for dataset_id, batches in per_dataset.items():
            probability = float(self.index.datasets.get(dataset_id, {}).get("probability", 1.0))
            weights[dataset_id] = probability * (len(batches) if self.sampling == "auto-weighting" else 1.0)
        order: list[PlannedBatch] = []
        remaining = {d: list(b) for d, b in per_dataset.items() if b and weights[d] > 0}
        if self.scheduled:
            return self._scheduled_order(epoch, rng, remaining, weights)
        while remaining:
            if len(remaining) == 1:  # what the draws below would give, without a draw per batch
                order.extend(reversed(remaining.popitem()[1]))
                break
            names = sorted(remaining)
            chosen = rng.choices(names, weights=[weights[n] for n in names], k=1)[0]
            order.append(remaining[chosen].pop())
            if not remaining[chosen]:
                del remaining[chosen]
        return order

    def _scheduled_order(self, epoch: int, rng: random.Random, remaining: dict[str, list[PlannedBatch]],
                         weights: dict[str, float]) -> list[PlannedBatch]:  # fmt: skip
        """The epoch's interleave when datasets are scheduled, as SimpleTuner's sampler draws: each batch comes from
        the datasets active at its optimizer step (`DatasetSchedule.active`; epochs 1-based), by weight; a dataset
        that has ended leaves the epoch, one not yet started waits; the epoch ends when no remaining dataset is
        active (SimpleTuner ends it early too). The batch with global position g (over the whole run) falls on
        optimizer step g // gradient_accumulation_steps + 1."""
        offset = self._offset(epoch)
        order: list[PlannedBatch] = []
        always = DatasetSchedule()
        planned_any = bool(remaining)  # else no bucket holds a batch: the trainer says so
        while remaining:
            step = (offset + len(order)) // self.accumulation + 1
            names = []
            for name in sorted(remaining):
                schedule = self.schedules.get(name, always)
                if schedule.active(epoch + 1, step):
                    names.append(name)
                elif (schedule.end_epoch is not None and epoch + 1 > schedule.end_epoch) or \
                        (schedule.end_step is not None and step > schedule.end_step):  # fmt: skip
                    del remaining[name]  # ended: steps only grow
            if not names:  # the rest start later
                break
            chosen = names[0] if len(names) == 1 else rng.choices(names, weights=[weights[n] for n in names], k=1)[0]
            order.append(remaining[chosen].pop())
            if not remaining[chosen]:
                del remaining[chosen]
        if not order and planned_any:
            raise InputError(self._idle_message(epoch, offset // self.accumulation + 1))
        with self._lock:
            if epoch == len(self._lengths):
                self._lengths.append(len(order))
        return order

    def _idle_message(self, epoch: int, step: int) -> str:
        scheduled = ", ".join(f"'{d}' ({', '.join(f'{k} {v}' for k, v in s.describe().items())})"
                              for d, s in self.schedules.items())  # fmt: skip
        return (f"no dataset is sampled in epoch {epoch + 1} at step {step}: every training dataset has ended or "
                f"not yet started (scheduled: {scheduled}); the run needs data there: change the datasets' "
                "start_epoch / start_step / end_epoch / end_step, or lower max_train_steps / num_train_epochs, and "
                "re-run `st prepare`, `st cache` and `st train`")  # fmt: skip


class SampleReader:
    """Reads and decodes samples of the index, with the shard files kept open (each verified when first opened)."""

    def __init__(self) -> None:
        self._handles: dict[Path, Any] = {}

    def _handle(self, ref: SampleRef) -> Any:
        handle = self._handles.get(ref.shard.path)
        if handle is None:
            handle = self._handles[ref.shard.path] = ref.shard.open()
        return handle

    def read(self, ref: SampleRef, suffix: str) -> bytes:
        return read_member(self._handle(ref), ref.members[suffix])

    def checked(self, ref: SampleRef) -> CheckedSample:
        """The sample's checked metadata (`shardformat.checks`), read from its JSON member."""
        return ref.shard.check_meta(ref.row, ref.shard.read_json(self._handle(ref), ref.row))

    def sample(self, ref: SampleRef) -> DecodedSample:
        """Every member of the sample, checked and decoded (the inverse of `shardformat.encode_sample`)."""
        checked = self.checked(ref)
        members = {suffix: self.read(ref, suffix) for suffix in ref.members if suffix != JSON}
        return ref.shard.checks.decode_checked(ref.shard.path, ref.shard.entry, checked, members)

    def tensors(self, ref: SampleRef, suffix: str) -> dict[str, Any]:
        """One tensor member, decompressed within the bound the sample's metadata allows."""
        return ref.shard.checks.decode_member(ref.shard.path, ref.shard.entry, self.checked(ref), suffix,
                                              self.read(ref, suffix))  # fmt: skip

    def latent(self, ref: SampleRef) -> Any:
        """A sample's latent as a float32 tensor (C x h x w; C x f x h x w for a video family)."""
        return self.tensors(ref, LATENT)["latent"].float()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


@dataclass
class Batch:
    latents: Any  # torch.Tensor B x C x h x w, float32 (B x C x f x h x w for a video family: a batch is one bucket)
    texts: list[dict[str, Any]]  # per sample, the chosen caption's stored tensors
    meta: list[dict[str, Any]]
    keys: list[str]
    dropped: list[bool]
    epoch: int
    index: int  # global batch index within the epoch
    # Paired data (a batch holds samples of one dataset, so these are per batch). None / False when absent.
    dataset_id: str = ""
    regularisation: bool = False  # the dataset has is_regularisation_data: the target is the base model's prediction
    # The conditioning image chosen for each sample (conditioning_type controlnet / reference_*), at the target's size:
    control_pixels: Any = None  # B x 3 x H x W float32 in [-1, 1]
    control_latents: Any = None  # B x C x h x w float32 VAE latents (scaled as `latents`), families with control_input "latents"
    # The sample's mask image (conditioning_type mask / segmentation), at the target's size, as SimpleTuner's
    # conditioning_pixel_values: B x 3 x H x W float32 in [-1, 1]; `mask_kind` says how the loss reads it.
    mask_pixels: Any = None
    mask_kind: str | None = None
    # Wan 2.1 FLF2V: each clip's last frame (B x 3 x H x W float32 in [-1, 1]), beside its first (`control_pixels`).
    last_pixels: Any = None
    # Wan 2.1 i2v / FLF2V: the CLIP image embeddings `st cache` stored for each clip's frames (B x tokens x dim).
    image_embeds: Any = None


class TrainLoader:
    """Iterates this rank's share of the planned batches from a cursor on, decoding ahead in a thread."""

    def __init__(
        self,
        index: CacheIndex,
        planner: EpochPlanner,
        *,
        rank: int,
        world: int,
        shared_text: dict[str, dict[str, Any]],
        empty_key: str,
        caption_dropout: float,
        seed: int,
        prefetch: int = 4,
        conditioning_sampling: str = "random",
    ) -> None:
        self.index, self.planner = index, planner
        self.rank, self.world = rank, world
        self.shared_text, self.empty_key = shared_text, empty_key
        self.caption_dropout, self.seed = caption_dropout, seed
        self.prefetch = max(0, prefetch)
        self.conditioning_sampling = conditioning_sampling
        index.check_conditioning(conditioning_sampling)

    def captions(self, sample: DecodedSample) -> list[dict[str, Any]]:
        """The stored text tensors of each of a sample's captions, in caption order (shared ones from the cache's
        shared embeddings)."""
        texts = []
        for i, ref_text in enumerate(sample.meta["text"]):
            kind, _, value = ref_text.partition(":")
            texts.append(sample.captions[i] if kind == "sample" else self.shared_text[value])
        return texts

    def load(self, planned: PlannedBatch, epoch: int, batch_index: int, reader: SampleReader) -> Batch:
        import torch

        start, stop = self.share(planned)
        keys = list(planned.keys[start:stop])
        latents, texts, metas, dropped = [], [], [], []
        parts = []
        for slot, key in enumerate(keys):
            sample = reader.sample(self.index.samples[key])
            latents.append(sample.latent.float())
            rng = random.Random(f"{self.seed}:{epoch}:{batch_index}:{start + slot}:{key}")
            drop = self.caption_dropout > 0 and rng.random() < self.caption_dropout
            options = self.captions(sample)
            chosen = self._chosen_control(sample, f"{self.seed}:{epoch}:{batch_index}:{start + slot}:{key}:conditioning")
            allowed = caption_positions(sample.meta, chosen, len(options))
            texts.append(self.shared_text[self.empty_key] if drop else options[allowed[rng.randrange(len(allowed))]])
            metas.append(sample.meta)
            dropped.append(drop)
            if sample.conditioning:
                parts.append(self.conditioning(sample, chosen))
        batch = Batch(torch.stack(latents), texts, metas, keys, dropped, epoch, batch_index,
                      dataset_id=planned.dataset_id, regularisation=self.index.is_regularisation(planned.dataset_id))
        if parts:
            self._add_conditioning(batch, parts)
        return batch

    def share(self, planned: PlannedBatch) -> tuple[int, int]:
        """This rank's slice [start, stop) of a planned global batch (its dataset's batch size x the processes)."""
        per_rank = len(planned.keys) // self.world
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def sample_batch(self, key: str, reader: SampleReader) -> Batch:
        """One sample as a batch of one, for the evaluation loss: its latent, its first caption and, when it has
        conditioning, its first conditioning image and its mask (never a regularisation target)."""
        ref = self.index.samples[key]
        sample = reader.sample(ref)
        batch = Batch(sample.latent.float()[None], self.captions(sample)[:1], [sample.meta], [key], [False], 0, 0,
                      dataset_id=ref.dataset_id)  # fmt: skip
        if sample.conditioning:
            controls = [i for i, p in enumerate(sample.meta["conditioning"]) if p["kind"] not in MASK_TYPES]
            self._add_conditioning(batch, [self.conditioning(sample, controls[0] if controls else None)])
        return batch

    @staticmethod
    def _chosen_control(ref: SampleRef | DecodedSample, seed_key: str) -> int | None:
        """Which of the sample's non-mask conditioning images it trains with: the only one, or one chosen by a
        generator seeded per (epoch, batch, global slot, sample), so that it replays exactly on any process count."""
        controls = [i for i, p in enumerate(ref.meta.get("conditioning", [])) if p["kind"] not in MASK_TYPES]
        if not controls:
            return None
        if "video" in ref.meta:  # a clip's conditioning (Wan VACE: control clip, reference image) trains as one
            return controls[0]  # tensor, cached on its first non-mask partner (`wan_vace.cached_control`)
        return controls[0] if len(controls) == 1 else random.Random(seed_key).choice(controls)

    def conditioning(self, sample: DecodedSample, chosen: int | None) -> dict[str, Any]:
        """A sample's conditioning as the batch fields hold it: `control_pixels` / `control_latents` of its chosen
        conditioning image and `mask_pixels` / `mask_kind` of its mask."""
        stored = sample.conditioning
        partners = sample.meta["conditioning"]
        out: dict[str, Any] = {}
        masks = [i for i, p in enumerate(partners) if p["kind"] in MASK_TYPES]
        if chosen is not None:
            out["control_pixels"] = stored[f"{chosen}.pixels"].float() / 127.5 - 1.0
            if f"{chosen}.latent" in stored:
                out["control_latents"] = stored[f"{chosen}.latent"].float()
            if f"{chosen}.last_pixels" in stored:  # a Wan FLF2V clip's last frame
                out["last_pixels"] = stored[f"{chosen}.last_pixels"].float() / 127.5 - 1.0
            if f"{chosen}.image_embeds" in stored:  # Wan 2.1's CLIP embeddings of the clip's frames
                out["image_embeds"] = stored[f"{chosen}.image_embeds"].float()
        if masks:
            out["mask_pixels"] = stored[f"{masks[0]}.pixels"].float() / 127.5 - 1.0
            out["mask_kind"] = partners[masks[0]]["kind"]
        return out

    @staticmethod
    def _add_conditioning(batch: Batch, parts: list[dict[str, Any]]) -> None:
        """Stack the samples' conditioning (`conditioning` of each) into the batch."""
        import torch

        if len(parts) != len(batch.keys):
            raise InputError(f"batch {batch.index} of dataset '{batch.dataset_id}' mixes samples with and without "
                             "conditioning images; re-run `st prepare` and `st cache`")  # fmt: skip
        for name in ("control_pixels", "control_latents", "mask_pixels", "last_pixels", "image_embeds"):
            if all(name in part for part in parts):
                setattr(batch, name, torch.stack([part[name] for part in parts]))
            elif any(name in part for part in parts):
                raise InputError(f"batch {batch.index} of dataset '{batch.dataset_id}' mixes samples with and without "
                                 f"{name.replace('_', ' ')}; re-run `st prepare` and `st cache`")  # fmt: skip
        kinds = {part.get("mask_kind") for part in parts}
        batch.mask_kind = kinds.pop() if len(kinds) == 1 else None

    def shards_ahead(self, cursor: Cursor, epochs: int) -> Iterator[tuple[str, ...]]:
        """The shards this rank reads for each batch from `cursor` on, in plan order (what a cache on S3 fetches
        ahead and keeps)."""
        epoch, position = cursor.epoch, cursor.batch
        while epoch < epochs:
            plan = self.planner.epoch(epoch)
            for planned in plan[position:]:
                start, stop = self.share(planned)
                keys = planned.keys[start:stop]
                yield tuple(dict.fromkeys(self.index.samples[k].shard.entry["path"] for k in keys))
            epoch, position = epoch + 1, 0

    def iterate(self, cursor: Cursor, epochs: int) -> Iterator[Batch]:
        """Batches from `cursor` to the end of epoch `epochs - 1`, in plan order."""

        def produce() -> Iterator[Batch]:
            reader = SampleReader()
            fetcher = self.index.fetcher
            if fetcher is not None:
                fetcher.follow(self.shards_ahead(cursor, epochs))
            try:
                epoch, position = cursor.epoch, cursor.batch
                while epoch < epochs:
                    plan = self.planner.epoch(epoch)
                    for i in range(position, len(plan)):
                        if fetcher is not None:
                            reader.close()  # no handle keeps an evicted shard's bytes on disk
                            fetcher.reading()
                        yield self.load(plan[i], epoch, i, reader)
                    epoch, position = epoch + 1, 0
            finally:
                reader.close()
                if fetcher is not None:
                    fetcher.close()

        if self.prefetch == 0:
            yield from produce()
            return
        yield from _prefetched(produce(), self.prefetch)


_DONE = object()


def _prefetched(source: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run `source` in a thread, `depth` batches ahead; errors surface in the consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            buffer.put(exc)

    thread = threading.Thread(target=work, name="st-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
