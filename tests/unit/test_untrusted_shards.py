"""Untrusted cache bytes: crafted shards in a real tiny cache whose manifest was rewritten so that every hash matches.

Every reader of shard bytes (the training index, `CacheReader`, `st verify`'s structure check) must end in an
`InputError` naming the file and member, never a MemoryError, a ValueError traceback or a hang; an untouched cache
must still pass all of them.
"""

from __future__ import annotations

import json

import pytest
import zstandard

from pipeline.cache_reader import CacheReader
from pipeline.errors import InputError
from pipeline.manifest import read_manifest
from pipeline.shards import MAX_MEMBER_BYTES, tensor_specs, unpack_tensors
from pipeline.tensorfile import SafetensorsFormatError, header_length, read_header
from pipeline.train.data import CacheIndex, SampleReader
from pipeline.verify import verify_paths
from tests.helpers.untrusted import (
    CASES,
    GIB,
    build_tiny_cache,
    crafted_copy,
    frame_declaring,
    honest_frame,
    target_shard,
    tree_bytes,
)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.getbasetemp() / "untrusted-cache")[1]


def _index(cache):
    """The training index, and every sample read through it as training reads them."""
    index = CacheIndex(cache, read_manifest(cache, stage="cache"))
    reader = SampleReader()
    try:
        for ref in index.samples.values():
            reader.sample(ref)
    finally:
        reader.close()
    return index


def _read_all(cache):
    reader = CacheReader(cache)
    reader.shared_embeds()
    return list(reader)


def test_untouched_cache_passes_every_reader(tiny_cache):
    index = _index(tiny_cache)
    samples = _read_all(tiny_cache)
    assert len(samples) == len(index.samples) == read_manifest(tiny_cache)["stats"]["samples"] > 0
    assert len(read_manifest(tiny_cache)["shards"]) >= 2  # so a crafted first shard is told from the others
    for ref in index.samples.values():
        assert ref.members["latent.safetensors.zst"][1] > 0
    [result] = verify_paths([tiny_cache], progress=False)
    assert result.ok, result.mismatches


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_cache_is_refused_by_every_reader(tiny_cache, tmp_path, case):
    cache, rel, member = crafted_copy(tiny_cache, tmp_path / "cache", case)
    before = tree_bytes(cache)
    read_manifest(cache, stage="cache")  # the manifest itself is valid: only structure gives the crafted file away

    readers = [_read_all] if CASES[case][1] == "embeds" else [_index, _read_all]
    for read in readers:
        with pytest.raises(InputError) as caught:
            read(cache)
        message = str(caught.value)
        assert str(cache / rel) in message, message
        assert member in message and "re-run `st cache`" in message, message

    [result] = verify_paths([cache], progress=False)
    assert not result.ok
    assert [(m.path, m.problem) for m in result.mismatches] == [(rel, "malformed")]
    assert member in result.mismatches[0].detail
    assert tree_bytes(cache) == before


def test_frame_bound_comes_from_the_manifest_shape(tiny_cache, tmp_path):
    """A latent frame declaring a little more than a bucket's pixels allow is refused, far below the global cap."""
    cache, rel, member = crafted_copy(tiny_cache, tmp_path / "cache", "zstd frame declaring 64 GiB")
    shard = target_shard(cache)
    width, height = (int(v) for v in shard["bucket"].split("x"))
    bound = CacheReader(cache).checks.latent_bytes(shard["bucket"])
    assert width * height < bound < MAX_MEMBER_BYTES // 100
    with pytest.raises(InputError, match=f"declares {64 * GIB} bytes, more than the {bound}"):
        _read_all(cache)


def test_frames_without_a_content_size_or_beyond_the_bound_are_refused():
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 100)
    with pytest.raises(InputError, match="does not declare its content size"):
        unpack_tensors(unsized, where="m")
    with pytest.raises(InputError, match=r"^m: its zstd frame declares 68719476736 bytes"):
        unpack_tensors(frame_declaring(64 * GIB), where="m")
    with pytest.raises(InputError, match="declares 2000 bytes, more than the 1000"):
        tensor_specs(frame_declaring(2000), max_bytes=1000, where="m")
    with pytest.raises(InputError, match="does not decompress"):  # declares 2000 bytes, holds 64
        unpack_tensors(frame_declaring(2000), where="m")
    with pytest.raises(InputError, match="does not decompress"):  # a second frame after the first
        unpack_tensors(honest_frame(b"x") + honest_frame(b"y"), where="m")


def _safetensors(header: object, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _tensor(dtype: str, shape: list[int], offsets: list[int]) -> dict:
    return {"x": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


@pytest.mark.parametrize(
    "raw, problem",
    [
        (b"\1\0\0", "too few"),
        ((1 << 62).to_bytes(8, "little") + b"{}", "declares 4611686018427387904 bytes, but only 2 follow"),
        ((4).to_bytes(8, "little") + b"[1,2", "not valid JSON"),
        (_safetensors([], b""), "not a JSON object"),
        (_safetensors(_tensor("F32", [2], [0, 8]), b"\0" * 4), "does not fit"),
        (_safetensors(_tensor("F32", [1], [0, 4]), b"\0" * 8), "cover 4 of the 8"),
        (_safetensors(_tensor("PY", [1], [0, 4]), b"\0" * 4), "no known dtype"),
        (_safetensors(_tensor("F32", [-1], [0, 4]), b"\0" * 4), "invalid shape"),
    ],
)
def test_safetensors_headers_are_checked_before_use(raw, problem):
    with pytest.raises(SafetensorsFormatError, match=problem):
        read_header(raw)
    assert read_header(_safetensors(_tensor("F32", [1], [0, 4]), b"\0" * 4))[0]["x"].shape == (1,)


def test_header_length_never_trusts_the_declared_length():
    assert header_length((16).to_bytes(8, "little"), 8 + 16) == 16
    with pytest.raises(SafetensorsFormatError):
        header_length((17).to_bytes(8, "little"), 8 + 16)


def test_json_decoding_errors_name_the_member(tiny_cache, tmp_path):
    cache, _, member = crafted_copy(tiny_cache, tmp_path / "cache", "bad JSON member")
    with pytest.raises(InputError) as caught:
        _read_all(cache)
    assert f"member {member}: not valid UTF-8 JSON" in str(caught.value)
