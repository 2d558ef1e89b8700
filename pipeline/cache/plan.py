"""What a cache run will write, decided before any encoding: entry keys, shared prompts and the shard plan.

A sample's entry key hashes everything its cached bytes depend on: the image content, its bucket/resize/crop, the
identities of the VAE and text encoders, dtypes, seed, the shape of the VAE calls (vae_batch_size, slicing, tiling)
and the format version. Shards group the samples of one (dataset, bucket) sorted by sample id; a shard's name carries
the hash of its entry keys, so a file under a final name is always exactly the planned content, and a re-run (or a
resumed run) keeps every shard it finds complete.

A video sample's content is its file's bytes (its sample id) and its frame window: the latent key adds the window's
start and F', the frames encoded (`videos.trimmed_frames`), and its bucket in the cache is `WxH@F'`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..hashing import sha256_json
from ..prompts import prompt_key
from ..shards import shard_name
from .options import CacheOptions
from .videos import cache_bucket, is_video_row, trimmed_frames

# 2: VAE and text-encoder calls padded to a fixed batch (a sample's bytes no longer depend on its batch neighbours).
FORMAT_VERSION = 2
PLAN_FIELDS = (
    "width", "height", "target_width", "target_height", "intermediate_width", "intermediate_height", "crop_top",
    "crop_left",
)  # fmt: skip


@dataclass
class Entry:
    """One sample as the cache stage sees it."""

    row: dict[str, Any]
    latent_key: str
    text_refs: list[str]  # per caption: "sample:<i>" (in this sample's text member) or "shared:<prompt key>"
    entry_key: str
    frames: int | None = None  # video samples: F', the frames of its window encoded
    # Wan 2.1 image-to-video: the clip's first frame is stored as its conditioning image (pixels, and the condition
    # latents `wan_i2v.condition_from_first_frame` builds from it, and Wan 2.1's CLIP embeddings of it), as
    # SimpleTuner's `i2v_first_frame` dataset.
    first_frame: bool = False
    # Wan 2.1 FLF2V: the clip's last frame too (`0.last_pixels`), and condition latents of both frames.
    last_frame: bool = False

    @property
    def bucket(self) -> str:
        """The sample's bucket in the cache (prepare's, with F' for the frame count of a video)."""
        return cache_bucket(self.row, self.frames) if self.frames else self.row["bucket"]

    @property
    def sample_id(self) -> str:
        return self.row["sample_id"]

    @property
    def local_captions(self) -> list[tuple[int, str]]:
        return [(i, c) for i, (c, ref) in enumerate(zip(self.row["captions"], self.text_refs)) if ref.startswith("sample:")]

    @property
    def conditioning(self) -> list[dict[str, Any]]:
        """The sample's conditioning images (prepare's `conditioning` column), in conditioning_data order."""
        return list(self.row.get("conditioning") or [])

    def metadata(self) -> dict[str, Any]:
        """The sample's `json` member."""
        row = self.row
        partners = [{**{k: c[k] for k in ("dataset_id", "path", "kind")},
                     **({"captions": list(c["captions"])} if c.get("captions") else {})} for c in self.conditioning]
        if self.first_frame:
            from ..families.wan_i2v import first_frame_partner, first_last_frame_partner

            partners = [first_last_frame_partner(row) if self.last_frame else first_frame_partner(row)]
        return {
            **({"conditioning": partners} if partners else {}),
            "sample_id": row["sample_id"],
            "dataset_id": row["dataset_id"],
            "path": row["path"],
            "captions": list(row["captions"]),
            "text": list(self.text_refs),
            "bucket": self.bucket,
            "repeats": row["repeats"],
            "original_size": [row["width"], row["height"]],
            "target_size": [row["target_width"], row["target_height"]],
            "intermediate_size": [row["intermediate_width"], row["intermediate_height"]],
            "crop_top_left": [row["crop_top"], row["crop_left"]],
            **({"video": self.video} if self.frames else {}),
        }

    @property
    def video(self) -> dict[str, Any]:
        """A video sample's frames as cached: the window's first frame, F' and the file's frame rate."""
        return {"window_start": self.row["window_start"], "frames": self.frames, "fps": self.row["fps"]}


@dataclass
class ShardPlan:
    path: str  # relative to the output folder
    dataset_id: str
    bucket: str
    shard_key: str
    entries: list[Entry] = field(default_factory=list)

    @property
    def sidecar(self) -> str:
        return self.path[: -len(".tar")] + ".json"


@dataclass
class CachePlan:
    shards: list[ShardPlan]
    shared_prompts: dict[str, str]  # prompt key -> text
    latent_identity: str
    text_identity: str


def identities(model: dict[str, Any], options: CacheOptions, vae_dtype: str) -> tuple[str, str]:
    """Hashes of what latents and text embeddings depend on (model identities without their paths, and options)."""
    from ..families import without_source as strip

    latent = sha256_json({"vae": strip(model["vae"]), "vae_dtype": vae_dtype, "seed": options.seed,
                          "cache_dtype": options.cache_dtype, "encode": options.vae_encode,
                          "format": FORMAT_VERSION})  # fmt: skip
    if "image_encoder" in model:  # Wan 2.1 i2v / FLF2V: the clip's CLIP image embeddings are stored with its frames
        latent = sha256_json({"latent": latent, "image_encoder": [strip(i) for i in model["image_encoder"]]})
    text = sha256_json({
        "text_encoders": [strip(i) for i in model["text_encoders"]],
        "tokenizers": [strip(i) for i in model["tokenizers"]],
        "tokenizer_max_length": options.tokenizer_max_length, "t5_padding": options.t5_padding,
        "cache_dtype": options.cache_dtype, "format": FORMAT_VERSION,
        **({"token_ids": True} if options.train_text_encoder else {}),  # the ids are stored beside the embeddings
    })  # fmt: skip
    return latent, text


def shared_prompt_set(rows: list[dict[str, Any]], extra: list[str]) -> dict[str, str]:
    """Prompts stored once: any caption used by more than one sample, the empty prompt, and `extra` prompts."""
    counts = Counter(c for row in rows for c in set(row["captions"]))
    texts = {c for c, n in counts.items() if n > 1} | {""} | {p for p in extra if p is not None}
    return {prompt_key(t): t for t in sorted(texts)}


def reference_position(row: dict[str, Any]) -> int:
    """The position of a sample's one reference image (its conditioning image that is not a mask) among its
    conditioning images; InputError when it has none or several (an edit model's captions are encoded with it)."""
    from ..datasets import MASK_TYPES

    found = [i for i, c in enumerate(row.get("conditioning") or ()) if c["kind"] not in MASK_TYPES]
    if len(found) == 1:
        return found[0]
    what = "no reference image" if not found else f"{len(found)} reference images"
    raise InputError(f"sample {row['path']} of dataset {row['dataset_id']!r} has {what}, and the model encodes each "
                     "caption with its sample's one reference image (Qwen2.5-VL sees it; several references per "
                     "sample, QwenImageEditPlusPipeline's multi-image editing, are not supported yet): link exactly "
                     'one `"dataset_type": "conditioning"` dataset (`"conditioning_type": "reference_strict"`) in its '
                     "conditioning_data (masks may be added), then re-run `st prepare` and `st cache`")  # fmt: skip


def build_plan(
    rows: list[dict[str, Any]],
    *,
    latent_identity: str,
    text_identity: str,
    shard_samples: int,
    extra_prompts: list[str],
    compression_level: int,
    control_latents: bool = False,
    temporal_compression: int = 1,
    first_frame: bool = False,
    per_sample_text: bool = False,
    last_frame: bool = False,
) -> CachePlan:
    """`control_latents`: conditioning images other than masks are also stored as latents (the family's control
    input is latents). `temporal_compression`: the video VAE's, which sets F' of each video sample. `first_frame`:
    each video sample stores its first frame as its conditioning image (`Entry.first_frame`), and with `last_frame` its
    last frame too (`Entry.last_frame`, Wan 2.1 FLF2V). `per_sample_text`:
    captions are encoded with the sample's reference image (`Family.text_with_reference`), so every caption is
    stored in its sample's text member and each sample needs exactly one reference image (`reference_position`)."""
    if per_sample_text:
        for row in rows:
            reference_position(row)
    shared = shared_prompt_set([] if per_sample_text else rows, extra_prompts)
    shared_texts = set(shared.values())
    groups: dict[tuple[str, str], list[Entry]] = {}
    for row in rows:
        material = [latent_identity, row["sample_id"], [row[f] for f in PLAN_FIELDS]]
        if row.get("conditioning"):  # its cond member depends on the partners' bytes and on what is stored of them
            material.append([[c["sha256"], c["kind"]] for c in row["conditioning"]] + [control_latents])
        frames = trimmed_frames(row["window_frames"], temporal_compression) if is_video_row(row) else None
        if frames:
            material.append(["video", row["window_start"], frames])
        latent_key = sha256_json(material)
        refs = [f"shared:{prompt_key(c)}" if c in shared_texts and not per_sample_text else f"sample:{i}"
                for i, c in enumerate(row["captions"])]  # fmt: skip
        entry = Entry(row, latent_key, refs, "", frames, first_frame=bool(first_frame and frames),
                      last_frame=bool(last_frame and first_frame and frames))  # fmt: skip
        entry.entry_key = sha256_json([latent_key, text_identity, entry.metadata(), compression_level])
        groups.setdefault((row["dataset_id"], entry.bucket), []).append(entry)
    shards = []
    for (dataset_id, bucket), entries in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        entries.sort(key=lambda e: e.sample_id)
        for index, start in enumerate(range(0, len(entries), shard_samples)):
            chunk = entries[start : start + shard_samples]
            key = sha256_json([FORMAT_VERSION, [e.entry_key for e in chunk]])
            name = shard_name(f"{dataset_id}-{key[:12]}", index)
            shards.append(ShardPlan(f"shards/{bucket}/{name}", dataset_id, bucket, key, chunk))
    return CachePlan(shards, shared, latent_identity, text_identity)
