"""Structure checks of cache samples, bounded by what the cache manifest implies, and bounded decoding.

A cache folder can be crafted whole, manifest included, so matching hashes prove nothing about structure: a sample's
members, its JSON and the tensors its safetensors headers declare are checked before use, and every decompression is
bounded by the largest member the manifest's shapes allow (latent channels x bucket pixels (x frames), caption tokens x
a generous text width), a member never above `MAX_MEMBER_BYTES`. Errors name the shard and the member.

A video family's latents keep the time axis (C x f x h x w, an image one frame); a video bucket is `WxH@F`, F the
frames encoded, and bounds f by F.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping

from ..config import OPTION_RANGES
from ..tensorfile import SafetensorsFormatError, TensorSpec, read_header
from .codec import (
    COND,
    JSON,
    LATENT,
    MAX_MEMBER_BYTES,
    MEMBERS,
    TEXT,
    decode_json,
    decompress_frame,
    frame_content_size,
    group_captions,
    malformed,
    tensor_specs,
)

# The most a sample may repeat per epoch: the range of the `repeats` option (bounds a crafted cache's epoch plan).
MAX_REPEATS = int(OPTION_RANGES["repeats"].high)
CONDITIONING_KINDS = ("controlnet", "mask", "segmentation", "reference_strict", "reference_loose")
TEXT_WIDTH_MAX = 8192  # widest hidden size a cached caption may have (twice T5-XXL's 4096)
MARGIN = 1 << 20  # safetensors headers, pooled embeddings, attention masks
JSON_MEMBER_MAX = 16 << 20
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_TENSOR_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
_SIZE_FIELDS = ("original_size", "target_size", "intermediate_size", "crop_top_left")


@dataclass
class CheckedSample:
    """A sample whose metadata holds: the metadata, the captions stored in the sample itself, and (once its tensor
    members are checked) each one's declared decompressed size."""

    key: str
    meta: dict[str, Any]
    sizes: dict[str, int] = field(default_factory=dict)
    local_captions: list[int] = field(default_factory=list)


@dataclass
class DecodedSample:
    """A sample's members decoded: `captions` holds the captions stored in the sample (position -> field -> tensor),
    `conditioning` the cond member's tensors ("0.pixels", ...)."""

    key: str
    meta: dict[str, Any]
    latent: Any  # torch.Tensor, C x h x w (C x f x h x w for a video family)
    captions: dict[int, dict[str, Any]]
    conditioning: dict[str, Any]


class CacheChecks:
    """Structure checks of one cache output's samples and shared embeddings, bounded by what its manifest implies."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.channels = int(manifest["vae"]["latent_channels"])
        self.dtype = manifest["cache_dtype"]
        text = manifest["text"]
        tokens = sum(int(n) for n in text["max_lengths"]) + int(text.get("tokenizer_max_length") or 0)
        self.caption_bytes = tokens * TEXT_WIDTH_MAX * _DTYPE_BYTES[self.dtype] + MARGIN
        self.prompts = set(manifest["embeds"]["prompts"])
        self.repeats = {d["id"]: d["repeats"] for d in manifest["datasets"]}
        self._latent_shapes: dict[str, tuple[int, ...]] = {}  # bucket -> shape: one batch stacks one shape

    def latent_bytes(self, bucket: str) -> int:
        """The most bytes a latent of `bucket` ("WxH" pixels, "WxH@F" frames) can take: never more than one value per
        pixel of every frame."""
        width, height, frames = bucket_size(bucket)
        return min(self.channels * width * height * frames * _DTYPE_BYTES[self.dtype] + MARGIN, MAX_MEMBER_BYTES)

    def text_bytes(self, captions: int) -> int:
        return min(captions * self.caption_bytes + MARGIN, MAX_MEMBER_BYTES)

    def embeds_bytes(self) -> int:
        """The shared embeddings file holds one caption's tensors per listed prompt (not capped: it is one file)."""
        return len(self.prompts) * self.caption_bytes + MARGIN

    def check_meta(self, shard_path: Path, shard: dict[str, Any], key: str, data: bytes,
                   suffixes: Collection[str]) -> CheckedSample:  # fmt: skip
        """Check a sample's JSON member and which members it has (`suffixes`); raises `InputError` naming the shard
        and member. Its tensor members are checked when decoded (`decode_member`) or by `check_sample`."""

        def where(suffix: str) -> str:
            return member_where(shard_path, key, suffix)

        unknown = sorted(set(suffixes) - set(MEMBERS))
        if unknown:
            raise malformed(where(unknown[0]), "st writes no such member")
        if JSON not in suffixes or LATENT not in suffixes:
            raise malformed(where(JSON), f"the sample lacks its {JSON} or {LATENT} member")
        if len(data) > JSON_MEMBER_MAX:
            raise malformed(where(JSON), f"{len(data)} bytes of JSON, more than the {JSON_MEMBER_MAX} allowed")
        meta = decode_json(data, where(JSON))
        local = self._check_meta(meta, key, shard, where(JSON))
        if local and TEXT not in suffixes:
            raise malformed(where(JSON), f"captions {local} are stored in the sample, but it has no {TEXT} member")
        if bool(meta.get("conditioning")) != (COND in suffixes):
            raise malformed(where(JSON), f"the sample's conditioning list and its {COND} member disagree")
        return CheckedSample(key, meta, local_captions=local)

    def member_bound(self, shard: dict[str, Any], checked: CheckedSample, suffix: str) -> int:
        """The most bytes a tensor member of this sample may decompress to."""
        latent = self.latent_bytes(shard["bucket"])
        if suffix == LATENT:
            return latent
        if suffix == TEXT:
            return self.text_bytes(len(checked.local_captions))
        partners = len(checked.meta.get("conditioning", []))
        clip = bucket_size(shard["bucket"])[2]  # a video bucket's conditioning clips (Wan VACE) hold every frame
        return min(partners * (clip * self.pixel_bytes(shard["bucket"]) + latent) + MARGIN, MAX_MEMBER_BYTES)

    def check_specs(self, shard: dict[str, Any], checked: CheckedSample, suffix: str, specs: dict[str, TensorSpec],
                    where: str) -> None:  # fmt: skip
        """The tensors a member's safetensors header declares are those st writes for this sample."""
        if suffix == LATENT:
            self._check_latent(specs, shard["bucket"], where)
        elif suffix == TEXT:
            self._check_text(specs, checked.local_captions, where)
        else:
            meta = checked.meta
            self._check_cond(specs, meta["conditioning"], shard["bucket"], len(meta["text"]), where)

    def check_sample(self, shard_path: Path, shard: dict[str, Any], key: str, members: Mapping[str, bytes], *,
                     decompress: bool = False) -> CheckedSample:  # fmt: skip
        """Check one sample's members, JSON and tensor headers; `decompress` also decompresses every frame in full
        (checksums and declared sizes), as `st verify` does. Raises `InputError` naming the shard and member."""
        checked = self.check_meta(shard_path, shard, key, members.get(JSON, b""), members.keys())
        for suffix in (LATENT, TEXT, COND):
            if suffix in members:
                where = member_where(shard_path, key, suffix)
                bound = self.member_bound(shard, checked, suffix)
                specs, checked.sizes[suffix] = self._specs(members[suffix], bound, where, decompress)
                self.check_specs(shard, checked, suffix, specs, where)
        return checked

    def decode_member(self, shard_path: Path, shard: dict[str, Any], checked: CheckedSample, suffix: str,
                      data: bytes) -> dict[str, Any]:  # fmt: skip
        """A tensor member's tensors, decompressed within the bound the sample allows, its header checked first."""
        from safetensors.torch import load

        where = member_where(shard_path, checked.key, suffix)
        raw = decompress_frame(data, max_bytes=self.member_bound(shard, checked, suffix), where=where)
        try:
            specs = read_header(raw)[0]
        except SafetensorsFormatError as exc:
            raise malformed(where, str(exc)) from None
        self.check_specs(shard, checked, suffix, specs, where)
        try:
            return load(raw)
        except Exception as exc:  # safetensors' own SafetensorError
            raise malformed(where, f"not valid safetensors data ({exc})") from None

    def decode_sample(self, shard_path: Path, shard: dict[str, Any], key: str,
                      members: Mapping[str, bytes]) -> DecodedSample:  # fmt: skip
        """The inverse of `codec.encode_sample`, every member checked (see `check_meta`, `decode_member`)."""
        checked = self.check_meta(shard_path, shard, key, members.get(JSON, b""), members.keys())
        return self.decode_checked(shard_path, shard, checked, members)

    def decode_checked(self, shard_path: Path, shard: dict[str, Any], checked: CheckedSample,
                       members: Mapping[str, bytes]) -> DecodedSample:  # fmt: skip
        """`decode_sample` for a sample whose metadata is already checked."""

        def tensors(suffix: str) -> dict[str, Any]:
            return self.decode_member(shard_path, shard, checked, suffix, members[suffix]) if suffix in members else {}

        latent = tensors(LATENT)["latent"]
        return DecodedSample(checked.key, checked.meta, latent, group_captions(tensors(TEXT)), tensors(COND))

    @staticmethod
    def pixel_bytes(bucket: str) -> int:
        """The bytes of one uint8 RGB image of `bucket` ("WxH" pixels)."""
        width, height, _ = bucket_size(bucket)
        return 3 * width * height

    def _check_cond(self, specs: dict[str, TensorSpec], partners: list[Any], bucket: str, captions: int,
                    where: str) -> None:  # fmt: skip
        """`{i}.pixels`: uint8 [3, H, W] at the bucket's size, for every listed conditioning image; `{i}.latent`:
        shaped as the sample's latent; `{i}.last_pixels` (a Wan FLF2V clip's last frame): like `{i}.pixels`;
        `{i}.image_embeds` (Wan 2.1's CLIP tokens of its frames): tokens x dim in the cache's dtype."""
        width, height, frames = bucket_size(bucket)
        expected = {f"{i}.pixels" for i in range(len(partners))}
        latents = {name for name in specs if name.endswith(".latent")}
        lasts = {name for name in specs if name.endswith(".last_pixels")}
        embeds = {name for name in specs if name.endswith(".image_embeds")}
        slots = {str(i) for i in range(len(partners))}
        if set(specs) - latents - lasts - embeds != expected or any(n.partition(".")[0] not in slots
                                                                    for n in latents | lasts | embeds):  # fmt: skip
            raise malformed(where, f"expected tensors {sorted(expected)} (and latents of them), found {sorted(specs)}")
        # A video bucket's conditioning clip (Wan VACE's control video): U8 [3, F, H, W], its latent the pipeline's
        # control latents (their own channel count, the sample latent's f x h x w).
        clip_shape = [3, frames, height, width]
        clips = {n.partition(".")[0] for n in expected if frames > 1 and list(specs[n].shape) == clip_shape}
        # A clip's reference image (Wan VACE's `reference_images`): U8 [3, H, W]; the clip's control latents may sit on
        # it (no control clip) and hold one more latent frame (the reference's, prepended).
        references = {str(i) for i, p in enumerate(partners) if frames > 1 and
                      str(p.get("kind", "")).startswith("reference_")}  # fmt: skip
        for name in expected | lasts:
            spec = specs[name]
            if spec.dtype != "U8" or (list(spec.shape) != [3, height, width] and name.partition(".")[0] not in clips):
                raise malformed(where, f"{name} is {spec.dtype} {list(spec.shape)}, expected U8 [3, {height}, {width}]")
        shape = self._latent_shapes.get(bucket)
        for name in latents:
            spec = specs[name]
            start = 1 if name.partition(".")[0] in clips | references else 0  # a clip's control latents: any
            mismatch = shape is not None and tuple(spec.shape)[start:] != tuple(shape)[start:]  # channel count
            if mismatch and references and start and len(spec.shape) == len(shape) == 4:
                mismatch = (spec.shape[1] - shape[1], *spec.shape[2:]) != (1, *shape[2:])  # + the reference frame
            if spec.dtype != _TENSOR_DTYPES[self.dtype] or mismatch:
                raise malformed(where, f"{name} is {spec.dtype} {list(spec.shape)}, unlike the sample's latent")
        for name in embeds:
            spec = specs[name]
            if spec.dtype != _TENSOR_DTYPES[self.dtype] or len(spec.shape) != 2:
                raise malformed(where, f"{name} is {spec.dtype} {list(spec.shape)}, expected tokens x dim in "
                                       f"{_TENSOR_DTYPES[self.dtype]}")  # fmt: skip
        for partner in partners:
            if not isinstance(partner, dict) or partner.get("kind") not in CONDITIONING_KINDS:
                raise malformed(where, f"conditioning entry {partner!r} has no known kind")
            positions = partner.get("captions", [])
            if not isinstance(positions, list) or not all(type(i) is int and 0 <= i < captions for i in positions):
                raise malformed(where, f"conditioning entry {partner!r} names captions the sample does not have")

    def check_embeds(self, data: bytes, where: str, *, decompress: bool = False) -> None:
        """Check the shared embeddings file: bounded frame, valid safetensors, every tensor of a listed prompt."""
        specs, _ = self._specs(data, self.embeds_bytes(), where, decompress)
        self.check_embed_names(specs, where)

    def check_embed_names(self, names: Any, where: str) -> None:
        for name in names:
            prompt, dot, _ = name.partition(".")
            if not dot or prompt not in self.prompts:
                raise malformed(where, f"tensor {name!r} belongs to no prompt the cache manifest lists")

    def _specs(self, data: bytes, bound: int, where: str, decompress: bool) -> tuple[dict[str, TensorSpec], int]:
        if not decompress:
            size = frame_content_size(data, max_bytes=bound, where=where)
            return tensor_specs(data, max_bytes=bound, where=where), size
        raw = decompress_frame(data, max_bytes=bound, where=where)
        try:
            return read_header(raw)[0], len(raw)
        except SafetensorsFormatError as exc:
            raise malformed(where, str(exc)) from None

    def _check_meta(self, meta: Any, key: str, shard: dict[str, Any], where: str) -> list[int]:
        """The metadata st train relies on; returns the positions of the captions stored in the sample itself."""
        if not isinstance(meta, dict):
            raise malformed(where, "the sample metadata is not a JSON object")
        expected = {"sample_id": key, "dataset_id": shard["dataset_id"], "bucket": shard["bucket"]}
        for name, value in expected.items():
            if meta.get(name) != value or type(meta.get(name)) is not type(value):
                raise malformed(where, f"{name} is {meta.get(name)!r}, but the shard and manifest say {value!r}")
        # `allow_dataset_oversubscription` raises the repeats of a small bucket above its dataset's, so a sample may
        # repeat more often than the manifest's dataset entry says, but never less, and never past the option's range.
        least, repeats = self.repeats.get(shard["dataset_id"]), meta.get("repeats")
        if type(repeats) is not int or type(least) is not int or not least <= repeats <= MAX_REPEATS:
            raise malformed(where, f"repeats is {repeats!r}, but the manifest's dataset {shard['dataset_id']!r} "
                                   f"allows {least!r} to {MAX_REPEATS}")  # fmt: skip
        for name in _SIZE_FIELDS:
            pair = meta.get(name)
            if not isinstance(pair, list) or len(pair) != 2 or not all(type(v) is int and v >= 0 for v in pair):
                raise malformed(where, f"{name} must be two non-negative integers, found {pair!r}")
        refs = meta.get("text")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise malformed(where, "text must be a non-empty list of caption references")
        local = []
        for position, ref in enumerate(refs):
            kind, _, value = ref.partition(":")
            if kind == "sample":
                local.append(position)
            elif kind != "shared" or value not in self.prompts:
                raise malformed(where, f"caption reference {ref!r} names no stored caption or listed shared prompt")
        return local

    def _check_latent(self, specs: dict[str, TensorSpec], bucket: str, where: str) -> None:
        spec = specs.get("latent")
        width, height, frames = bucket_size(bucket)
        if set(specs) != {"latent"} or spec is None:
            raise malformed(where, f"expected one tensor named 'latent', found {sorted(specs)}")
        shape = spec.shape
        time = list(shape[1:-2])  # [] for C x h x w, [f] for a video family's C x f x h x w
        if (spec.dtype != _TENSOR_DTYPES[self.dtype] or len(shape) not in (3, 4) or shape[0] != self.channels
                or not all(0 < f <= frames for f in time)
                or not (0 < shape[-2] <= height and 0 < shape[-1] <= width)):  # fmt: skip
            raise malformed(where, f"the latent is {spec.dtype} {list(shape)}, but a {bucket} latent of this cache is "
                                   f"{_TENSOR_DTYPES[self.dtype]} [{self.channels}, (f <= {frames},) h <= {height}, "
                                   f"w <= {width}]")  # fmt: skip
        first = self._latent_shapes.setdefault(bucket, shape)
        if shape != first:
            raise malformed(where, f"the latent has shape {list(shape)}, but other {bucket} latents have {list(first)}")

    @staticmethod
    def _check_text(specs: dict[str, TensorSpec], local: list[int], where: str) -> None:
        found = set()
        for name in specs:
            index, dot, _ = name.partition(".")
            if not dot or not index.isdigit() or int(index) not in local:
                raise malformed(where, f"tensor {name!r} belongs to no caption stored in this sample")
            found.add(int(index))
        if found != set(local):
            raise malformed(where, f"captions {sorted(set(local) - found)} have no tensors")


def bucket_size(bucket: str) -> tuple[int, int, int]:
    """(width, height, frames) of a cache bucket: "WxH" (one frame) or a video's "WxH@F"."""
    size, _, frames = bucket.partition("@")
    width, _, height = size.partition("x")
    return int(width), int(height), int(frames or 1)


def member_where(shard_path: Path, key: str, suffix: str) -> str:
    """How errors name a member: `cache shard <path>, member <key>.<suffix>`."""
    return f"cache shard {shard_path}, member {key}.{suffix}"
