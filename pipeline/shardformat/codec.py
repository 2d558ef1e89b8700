"""Member payloads of a cache sample: the names st writes, and their bytes (canonical JSON, or safetensors compressed
as one zstd frame that records its content size and a checksum).

Every decode is bounded: a frame must declare its content size and the caller's bound must cover it before anything
is allocated; only safetensors is deserialised, never pickle. Malformed bytes raise `InputError` naming where.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import InputError
from ..hashing import canonical_json
from ..tensorfile import SafetensorsFormatError, TensorSpec, header_length, parse_header, read_header

if TYPE_CHECKING:
    import torch

JSON = "json"
LATENT = "latent.safetensors.zst"
TEXT = "text.safetensors.zst"  # the captions stored in the sample itself: "<caption position>.<field>" tensors
COND = "cond.safetensors.zst"  # a paired sample's conditioning images (pixels, and latents where the model wants them)
MEMBERS = (JSON, LATENT, TEXT, COND)
TENSOR_SUFFIX = ".safetensors.zst"
# No shard member st writes comes near this: the default bound, and the cap on bounds derived from a manifest.
MAX_MEMBER_BYTES = 1 << 30
RECACHE_HINT = "the cache is damaged or was not written by st: re-run `st cache`"


def encode_sample(meta: Mapping[str, Any], latent: "torch.Tensor", *,
                  captions: Mapping[int, Mapping[str, Any]] | None = None,
                  conditioning: Mapping[str, "torch.Tensor"] | None = None, level: int = 3) -> dict[str, bytes]:  # fmt: skip
    """A sample's members: its metadata, its latent, the captions stored in it (position -> field -> tensor) and its
    conditioning tensors ("<i>.pixels", "<i>.latent"). `decode_sample` (in `checks`) is the inverse."""
    members = {JSON: pack_json(dict(meta)), LATENT: pack_tensors({"latent": latent}, level)}
    flat = {f"{i}.{name}": value for i, fields in (captions or {}).items() for name, value in fields.items()}
    if flat:
        members[TEXT] = pack_tensors(flat, level)
    if conditioning:
        members[COND] = pack_tensors(conditioning, level)
    return members


def group_captions(tensors: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """A text member's "<position>.<field>" tensors as position -> field -> tensor."""
    grouped: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, _, field_name = name.partition(".")
        grouped.setdefault(int(index), {})[field_name] = value
    return grouped


def pack_tensors(tensors: Mapping[str, "torch.Tensor"], level: int = 3) -> bytes:
    """Serialise tensors with safetensors and compress them as one zstd frame (content size and checksum on)."""
    import torch
    import zstandard
    from safetensors.torch import save

    prepared = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"pack_tensors wants str -> torch.Tensor, got {type(name).__name__} -> {type(tensor).__name__}")
        prepared[name] = tensor.detach().cpu().contiguous()
    raw = save(prepared)
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True).compress(raw)


def malformed(where: str, problem: str) -> InputError:
    """The error for member bytes that are not what st writes: `<where>: <problem>; <how to fix>`."""
    return InputError(f"{where}: {problem}; {RECACHE_HINT}")


def frame_content_size(data: bytes, *, max_bytes: int, where: str) -> int:
    """The content size a zstd frame declares in its header, refused when absent or above `max_bytes`."""
    import zstandard

    try:
        size = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise malformed(where, f"not a zstd frame ({exc})") from None
    if size == zstandard.CONTENTSIZE_UNKNOWN:
        raise malformed(where, "its zstd frame does not declare its content size")
    if size > max_bytes:
        raise malformed(where, f"its zstd frame declares {size} bytes, more than the {max_bytes} its shape allows")
    return size


def decompress_frame(data: bytes, *, max_bytes: int = MAX_MEMBER_BYTES, where: str = "zstd member") -> bytes:
    """Decompress one zstd frame whose declared content size is within `max_bytes` (nothing may follow it)."""
    import zstandard

    size = frame_content_size(data, max_bytes=max_bytes, where=where)
    if size == 0:  # max_output_size=0 would mean "no limit"
        return b""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise malformed(where, f"its zstd frame does not decompress ({exc})") from None
    if len(raw) != size:
        raise malformed(where, f"its zstd frame declares {size} bytes but holds {len(raw)}")
    return raw


def tensor_specs(data: bytes, *, max_bytes: int = MAX_MEMBER_BYTES,
                 where: str = "zstd member") -> dict[str, TensorSpec]:  # fmt: skip
    """The tensors a compressed safetensors member holds, from its header alone: only the header is decompressed,
    and its length and tensor table are checked against the frame's declared content size."""
    import zstandard

    size = frame_content_size(data, max_bytes=max_bytes, where=where)
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as stream:
            length = header_length(_read_exact(stream, 8), size)
            header = _read_exact(stream, length)
        return parse_header(header, size - 8 - length)[0]
    except zstandard.ZstdError as exc:
        raise malformed(where, f"its zstd frame does not decompress ({exc})") from None
    except SafetensorsFormatError as exc:
        raise malformed(where, str(exc)) from None


def _read_exact(stream: Any, count: int) -> bytes:
    parts, missing = [], count
    while missing:
        chunk = stream.read(missing)
        if not chunk:
            raise SafetensorsFormatError(f"the data ends before its safetensors header ({count} bytes) does")
        parts.append(chunk)
        missing -= len(chunk)
    return b"".join(parts)


def unpack_tensors(data: bytes, *, max_bytes: int = MAX_MEMBER_BYTES,
                   where: str = "zstd member") -> dict[str, "torch.Tensor"]:  # fmt: skip
    """Inverse of `pack_tensors`, bounded by `max_bytes` of decompressed data; only safetensors is deserialised, never
    pickle. Malformed bytes raise `InputError` starting with `where`."""
    from safetensors.torch import load

    raw = decompress_frame(data, max_bytes=max_bytes, where=where)
    try:
        read_header(raw)
        return load(raw)
    except Exception as exc:  # SafetensorsFormatError, or safetensors' own SafetensorError
        raise malformed(where, f"not valid safetensors data ({exc})") from None


def decode_json(data: bytes, where: str) -> Any:
    """A `json` member's value (UTF-8 JSON; deep nesting and bad bytes are refused, not crashed on)."""
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise malformed(where, f"not valid UTF-8 JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


def pack_json(value: Any) -> bytes:
    """Canonical UTF-8 JSON (sorted keys, no whitespace) for a `json` member."""
    return canonical_json(value)


def webdataset_decoder(sample: dict) -> dict:
    """Decode a webdataset sample: `*safetensors.zst` members -> tensor dicts, `json` members -> values.

    Keys keep their names; `__key__`, `__url__` and other members pass through unchanged.
    """
    out = {}
    for name, value in sample.items():
        if name.startswith("__"):
            out[name] = value
        elif name == TENSOR_SUFFIX[1:] or name.endswith(TENSOR_SUFFIX):
            out[name] = unpack_tensors(value, where=f"member {sample.get('__key__')}.{name}")
        elif name == "json" or name.endswith(".json"):
            out[name] = decode_json(value, f"member {sample.get('__key__')}.{name}")
        else:
            out[name] = value
    return out


