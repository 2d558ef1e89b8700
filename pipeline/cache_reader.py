"""Reading a cache output: the manifest, verified shards, decoded samples and shared prompt embeddings.

This is what `st train` (or any other consumer) uses; it needs nothing but the cache folder: no source images, no
prepare output, no models. Shards come from the manifest's list and are hash-checked before use.

A cache folder can be crafted whole, manifest included, so matching hashes prove nothing about structure:
`CacheChecks` checks every sample (its members, its JSON, the tensors its safetensors headers declare) and bounds
every decompression by the largest member the manifest's shapes allow (latent channels x bucket pixels, caption
tokens x a generous text width), a shard member never above `shards.MAX_MEMBER_BYTES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from .config import OPTION_RANGES
from .errors import ManifestError
from .manifest import MANIFEST_NAME, read_manifest
from .prompts import prompt_key
from .shards import (
    MAX_MEMBER_BYTES,
    decode_json,
    decompress_frame,
    frame_content_size,
    malformed,
    read_shard,
    tensor_specs,
    unpack_tensors,
)
from .tensorfile import SafetensorsFormatError, TensorSpec, read_header

# The most a sample may repeat per epoch: the range of the `repeats` option (bounds a crafted cache's epoch plan).
MAX_REPEATS = int(OPTION_RANGES["repeats"].high)

JSON = "json"
LATENT = "latent.safetensors.zst"
TEXT = "text.safetensors.zst"
COND = "cond.safetensors.zst"  # a paired sample's conditioning images (pixels, and latents where the model wants them)
MEMBERS = (JSON, LATENT, TEXT, COND)
CONDITIONING_KINDS = ("controlnet", "mask", "segmentation", "reference_strict", "reference_loose")
TEXT_WIDTH_MAX = 8192  # widest hidden size a cached caption may have (twice T5-XXL's 4096)
MARGIN = 1 << 20  # safetensors headers, pooled embeddings, attention masks
JSON_MEMBER_MAX = 16 << 20
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_TENSOR_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
_SIZE_FIELDS = ("original_size", "target_size", "intermediate_size", "crop_top_left")


@dataclass
class CachedSample:
    key: str
    meta: dict[str, Any]
    latent: Any  # torch.Tensor, C x h x w
    texts: list[dict[str, Any]]  # per caption: prompt_embeds, pooled_prompt_embeds, attention_mask, as stored
    conditioning: dict[str, Any] = field(default_factory=dict)  # the cond member's tensors ("0.pixels", ...)


@dataclass
class CheckedSample:
    """A sample whose structure holds: its metadata, and each tensor member's declared decompressed size."""

    key: str
    meta: dict[str, Any]
    sizes: dict[str, int]
    local_captions: list[int] = field(default_factory=list)


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
        """The most bytes a latent of `bucket` ("WxH" pixels) can take: never more than one value per pixel."""
        width, _, height = bucket.partition("x")
        return min(self.channels * int(width) * int(height) * _DTYPE_BYTES[self.dtype] + MARGIN, MAX_MEMBER_BYTES)

    def text_bytes(self, captions: int) -> int:
        return min(captions * self.caption_bytes + MARGIN, MAX_MEMBER_BYTES)

    def embeds_bytes(self) -> int:
        """The shared embeddings file holds one caption's tensors per listed prompt (not capped: it is one file)."""
        return len(self.prompts) * self.caption_bytes + MARGIN

    def check_sample(self, shard_path: Path, shard: dict[str, Any], key: str, members: Mapping[str, bytes], *,
                     decompress: bool = False) -> CheckedSample:  # fmt: skip
        """Check one sample's members, JSON and tensor headers; `decompress` also decompresses every frame in full
        (checksums and declared sizes), as `st verify` does. Raises `InputError` naming the shard and member."""

        def where(suffix: str) -> str:
            return f"cache shard {shard_path}, member {key}.{suffix}"

        unknown = sorted(set(members) - set(MEMBERS))
        if unknown:
            raise malformed(where(unknown[0]), "st writes no such member")
        if JSON not in members or LATENT not in members:
            raise malformed(where(JSON), f"the sample lacks its {JSON} or {LATENT} member")
        if len(members[JSON]) > JSON_MEMBER_MAX:
            raise malformed(where(JSON), f"{len(members[JSON])} bytes of JSON, more than the {JSON_MEMBER_MAX} allowed")
        meta = decode_json(members[JSON], where(JSON))
        local = self._check_meta(meta, key, shard, where(JSON))
        sizes: dict[str, int] = {}
        latent_bound = self.latent_bytes(shard["bucket"])
        specs, sizes[LATENT] = self._specs(members[LATENT], latent_bound, where(LATENT), decompress)
        self._check_latent(specs, shard["bucket"], where(LATENT))
        if TEXT in members or local:
            if TEXT not in members:
                raise malformed(where(JSON), f"captions {local} are stored in the sample, but it has no {TEXT} member")
            specs, sizes[TEXT] = self._specs(members[TEXT], self.text_bytes(len(local)), where(TEXT), decompress)
            self._check_text(specs, local, where(TEXT))
        partners = meta.get("conditioning", [])
        if partners or COND in members:
            if COND not in members or not partners:
                raise malformed(where(JSON), f"the sample's conditioning list and its {COND} member disagree")
            bound = len(partners) * (self.pixel_bytes(shard["bucket"]) + latent_bound) + MARGIN
            specs, sizes[COND] = self._specs(members[COND], min(bound, MAX_MEMBER_BYTES), where(COND), decompress)
            self._check_cond(specs, partners, shard["bucket"], len(meta["text"]), where(COND))
        return CheckedSample(key, meta, sizes, local)

    @staticmethod
    def pixel_bytes(bucket: str) -> int:
        """The bytes of one uint8 RGB image of `bucket` ("WxH" pixels)."""
        width, _, height = bucket.partition("x")
        return 3 * int(width) * int(height)

    def _check_cond(self, specs: dict[str, TensorSpec], partners: list[Any], bucket: str, captions: int,
                    where: str) -> None:  # fmt: skip
        """`{i}.pixels`: uint8 [3, H, W] at the bucket's size, for every listed conditioning image; `{i}.latent`:
        shaped as the sample's latent."""
        width, height = (int(v) for v in bucket.split("x"))
        expected = {f"{i}.pixels" for i in range(len(partners))}
        latents = {name for name in specs if name.endswith(".latent")}
        if set(specs) - latents != expected or any(n.partition(".")[0] not in {str(i) for i in range(len(partners))}
                                                   for n in latents):  # fmt: skip
            raise malformed(where, f"expected tensors {sorted(expected)} (and latents of them), found {sorted(specs)}")
        for name in expected:
            spec = specs[name]
            if spec.dtype != "U8" or list(spec.shape) != [3, height, width]:
                raise malformed(where, f"{name} is {spec.dtype} {list(spec.shape)}, expected U8 [3, {height}, {width}]")
        shape = self._latent_shapes.get(bucket)
        for name in latents:
            spec = specs[name]
            if spec.dtype != _TENSOR_DTYPES[self.dtype] or (shape is not None and spec.shape != shape):
                raise malformed(where, f"{name} is {spec.dtype} {list(spec.shape)}, unlike the sample's latent")
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
        width, height = (int(v) for v in bucket.split("x"))
        if set(specs) != {"latent"} or spec is None:
            raise malformed(where, f"expected one tensor named 'latent', found {sorted(specs)}")
        shape = spec.shape
        if (spec.dtype != _TENSOR_DTYPES[self.dtype] or len(shape) != 3 or shape[0] != self.channels
                or not (0 < shape[1] <= height and 0 < shape[2] <= width)):  # fmt: skip
            raise malformed(where, f"the latent is {spec.dtype} {list(shape)}, but a {bucket} latent of this cache is "
                                   f"{_TENSOR_DTYPES[self.dtype]} [{self.channels}, h <= {height}, w <= {width}]")
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


class CacheReader:
    """A cache output folder (or its manifest.json), validated and ready to stream."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.manifest_path = path / MANIFEST_NAME if path.is_dir() else path
        self.root = self.manifest_path.parent
        self.manifest = read_manifest(self.manifest_path, stage="cache")
        self.checks = CacheChecks(self.manifest)
        self._shared: dict[str, dict[str, Any]] | None = None

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    def shared_embeds(self) -> dict[str, dict[str, Any]]:
        """Shared prompt embeddings by prompt key (verified against the manifest's outputs)."""
        if self._shared is None:
            rel = self.manifest["embeds"]["path"]
            entry = next((o for o in self.manifest["outputs"] if o["path"] == rel), None)
            if entry is None:
                raise ManifestError(f"{self.manifest_path} does not list its shared embeddings {rel} among its "
                                    "outputs; re-run `st cache`")  # fmt: skip
            data = (self.root / rel).read_bytes()
            from .hashing import sha256_bytes

            if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
                raise ManifestError(f"{self.root / rel} does not match {self.manifest_path}; re-run `st cache`")
            where = str(self.root / rel)
            tensors = unpack_tensors(data, max_bytes=self.checks.embeds_bytes(), where=where)
            self.checks.check_embed_names(tensors, where)
            grouped: dict[str, dict[str, Any]] = {}
            for name, value in tensors.items():
                key, _, field_name = name.partition(".")
                grouped.setdefault(key, {})[field_name] = value
            self._shared = grouped
        return self._shared

    def prompt(self, text: str) -> dict[str, Any]:
        """Embeddings of a shared prompt by its text (the empty prompt, validation prompts, ...)."""
        key = prompt_key(text)
        shared = self.shared_embeds()
        if key not in shared:
            raise KeyError(f"prompt {text!r} is not among the cached shared prompts")
        return shared[key]

    def decode(self, shard_path: Path, checked: CheckedSample, members: dict[str, bytes]) -> CachedSample:
        """Tensors of a sample that passed `CacheChecks.check_sample`, each decompressed within its declared size."""

        def tensors(suffix: str) -> dict[str, Any]:
            where = f"cache shard {shard_path}, member {checked.key}.{suffix}"
            return unpack_tensors(members[suffix], max_bytes=checked.sizes[suffix], where=where)

        latent = tensors(LATENT)["latent"]
        local: dict[int, dict[str, Any]] = {}
        if TEXT in members:
            for name, value in tensors(TEXT).items():
                index, _, field_name = name.partition(".")
                local.setdefault(int(index), {})[field_name] = value
        texts = []
        for i, ref in enumerate(checked.meta["text"]):
            kind, _, value = ref.partition(":")
            texts.append(local[i] if kind == "sample" else self.shared_embeds()[value])
        conditioning = tensors(COND) if COND in members else {}
        return CachedSample(checked.key, checked.meta, latent, texts, conditioning)

    def iter_shard(self, shard: dict[str, Any]) -> Iterator[CachedSample]:
        path = self.root / shard["path"]
        for key, members in read_shard(path, expected_sha256=shard["sha256"], expected_bytes=shard["bytes"],
                                       expected_samples=shard["samples"]):  # fmt: skip
            yield self.decode(path, self.checks.check_sample(path, shard, key, members), members)

    def __iter__(self) -> Iterator[CachedSample]:
        for shard in self.shards:
            yield from self.iter_shard(shard)


def safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The `__metadata__` of raw safetensors bytes, read from the header alone (`ValueError` when malformed)."""
    return read_header(raw)[1]
