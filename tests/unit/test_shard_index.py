"""The shard index: training reads the index the writer recorded, not the shards; each shard is verified once per
machine; caches written without an index still train; a crafted index or shard is refused by name."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import pipeline.shardformat.index as index_module
import pipeline.shardformat.tar as tar_module
from pipeline.errors import InputError, ManifestError
from pipeline.manifest import read_manifest
from pipeline.shardformat import LATENT, scan_shard, sidecar_path
from pipeline.shardformat.verified import records_dir, verify_once
from pipeline.train.data import CacheIndex, Cursor, EpochPlanner, SampleReader, TrainLoader
from tests.helpers.untrusted import build_tiny_cache, crafted_copy, rehash


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.getbasetemp() / "untrusted-cache")[1]


@pytest.fixture(scope="module")
def big_cache(tmp_path_factory):
    """600 samples in 20 shards of tiny latents, written through the real writer (bench/startup.py's builder)."""
    from bench.startup import build

    return build(tmp_path_factory.mktemp("index") / "cache", 600, per_shard=30)


class _Counting:
    """A shard file object that counts the bytes read through it."""

    total = 0

    def __init__(self, handle):
        self._handle = handle

    def read(self, size=-1):
        data = self._handle.read(size)
        _Counting.total += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


@pytest.fixture
def bytes_read(monkeypatch):
    """Every shard open of the shard format's reader goes through `_Counting`; yields a function giving the count."""
    real = tar_module._open_regular
    monkeypatch.setattr(tar_module, "_open_regular", lambda path: _Counting(real(path)))
    monkeypatch.setattr(index_module, "_open_regular", lambda path: _Counting(real(path)))
    _Counting.total = 0
    return lambda: _Counting.total


def _first_batch(cache):
    manifest = read_manifest(cache, stage="cache")
    index = CacheIndex(cache, manifest)
    planner = EpochPlanner(index, seed=0, global_batch=1, sampling="auto-weighting")
    empty = manifest["embeds"]["empty"]
    loader = TrainLoader(index, planner, rank=0, world=1, shared_text={empty: {}}, empty_key=empty,
                         caption_dropout=0.0, seed=0, prefetch=0)  # fmt: skip
    return index, next(iter(loader.iterate(Cursor(), 1)))


def _shard_bytes(cache):
    return [s["bytes"] for s in read_manifest(cache, stage="cache")["shards"]]


def test_training_starts_from_the_index_and_verifies_a_shard_once(big_cache, bytes_read):
    sizes = _shard_bytes(big_cache)
    manifest = read_manifest(big_cache, stage="cache")
    CacheIndex(big_cache, manifest)
    assert bytes_read() == 0  # the index comes from the sidecars alone

    index, batch = _first_batch(big_cache)
    assert len(index.samples) == 600 and len(sizes) == 20
    # First reads on this machine: the shards of the first batch's sample and of the first sample's metadata (the
    # conditioning check) are hashed and checked whole (headers against the index, every member decoded); no other
    # shard is read.
    first = bytes_read()
    assert max(sizes) <= first <= 2 * 3 * max(sizes) < sum(sizes) / 3

    _Counting.total = 0
    _, again = _first_batch(big_cache)  # as a second process would: the machine's record says the shard is verified
    assert again.keys == batch.keys
    assert 0 < bytes_read() < 4096  # the batch's members, nothing else


def test_touching_a_shard_makes_it_verified_again(big_cache, tmp_path):
    cache = shutil.copytree(big_cache, tmp_path / "cache")
    shard = cache / read_manifest(cache, stage="cache")["shards"][0]["path"]
    entry = read_manifest(cache, stage="cache")["shards"][0]
    calls = []
    assert verify_once(shard, entry["sha256"], "i", lambda: calls.append(1))
    assert not verify_once(shard, entry["sha256"], "i", lambda: calls.append(1))
    assert not verify_once(shard, entry["sha256"], "i", lambda: calls.append(1))
    os.utime(shard)  # a new mtime: the record no longer describes the file
    assert verify_once(shard, entry["sha256"], "i", lambda: calls.append(1))
    assert verify_once(shard, entry["sha256"], "another index", lambda: calls.append(1))
    assert len(calls) == 3 and len(list(records_dir().glob("*.json"))) >= 1


def _flip(path, position):
    """Flip one byte of `path` in place, keeping its size and its mtime (a forged tamper)."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_tampered_shard_is_refused_by_name(big_cache, tmp_path):
    cache = shutil.copytree(big_cache, tmp_path / "cache")
    _, batch = _first_batch(cache)  # every shard the first batch reads is now recorded as verified
    ref_shard = CacheIndex(cache, read_manifest(cache, stage="cache")).samples[batch.keys[0]].shard
    offset, size = ref_shard.members(ref_shard.keys.index(batch.keys[0]))[LATENT]

    _flip(ref_shard.path, offset + size - 2)  # inside the latent's zstd frame, size and mtime kept
    with pytest.raises(InputError) as caught:  # not re-hashed (the record matches), but the frame's checksum fails
        _first_batch(cache)
    assert f"{ref_shard.path}, member {batch.keys[0]}.{LATENT}" in str(caught.value)

    os.utime(ref_shard.path)  # touched: verified again, and the hash gives it away before any member is used
    with pytest.raises(ManifestError, match=f"cache shard {ref_shard.path} does not match the manifest"):
        _first_batch(cache)


def _strip_index(cache):
    """The cache as st wrote it before shards had an index: the sidecars without it, the manifest rehashed."""
    for shard in read_manifest(cache, stage="cache")["shards"]:
        sidecar = cache / sidecar_path(shard["path"])
        doc = json.loads(sidecar.read_text())
        del doc["index"]
        sidecar.write_text(json.dumps(doc, sort_keys=True) + "\n")
    rehash(cache)


def test_cache_without_an_index_still_trains(tiny_cache, tmp_path, caplog):
    cache = shutil.copytree(tiny_cache, tmp_path / "cache")
    _strip_index(cache)
    indexed, _ = _first_batch(tiny_cache)
    caplog.set_level("INFO", logger="st")
    unindexed, batch = _first_batch(cache)
    assert "have no recorded index" in caplog.text
    assert sorted(unindexed.samples) == sorted(indexed.samples) and len(batch.keys) == 1
    reader = SampleReader()
    for key, ref in indexed.samples.items():
        assert unindexed.samples[key].members == ref.members and unindexed.samples[key].repeats == ref.repeats
        assert reader.latent(unindexed.samples[key]).equal(reader.latent(ref))
    reader.close()


@pytest.mark.parametrize("case", ["zstd frame declaring 64 GiB", "zstd checksum mismatch", "bad JSON member"])
def test_crafted_shard_with_a_matching_index_is_refused_when_read(tiny_cache, tmp_path, case):
    """An attacker who rewrites the shard, its index and the manifest: the sample's checks refuse it by name."""
    cache, rel, member = crafted_copy(tiny_cache, tmp_path / "cache", case)
    sidecar = cache / sidecar_path(rel)
    doc = json.loads(sidecar.read_text())
    samples = scan_shard(cache / rel, expected_sha256=None)
    doc["index"]["spans"] = {suffix: [v for s in samples for v in s.members.get(suffix, (-1, 0))]
                             for suffix in doc["index"]["spans"]}  # fmt: skip
    sidecar.write_text(json.dumps(doc, sort_keys=True) + "\n")
    rehash(cache)
    index = CacheIndex(cache, read_manifest(cache, stage="cache"))
    reader = SampleReader()
    with pytest.raises(InputError) as caught:
        for ref in index.samples.values():
            reader.sample(ref)
    reader.close()
    assert f"cache shard {cache / rel}, member {member}" in str(caught.value)


def test_index_asking_for_huge_repeats_is_refused_before_planning(tiny_cache, tmp_path):
    cache = shutil.copytree(tiny_cache, tmp_path / "cache")
    shard = read_manifest(cache, stage="cache")["shards"][0]
    sidecar = cache / sidecar_path(shard["path"])
    doc = json.loads(sidecar.read_text())
    doc["index"]["repeats"][0] = 10**12
    sidecar.write_text(json.dumps(doc, sort_keys=True) + "\n")
    rehash(cache)
    with pytest.raises(InputError, match=f"member {doc['index']['keys'][0]}.json: repeats is 1000000000000"):
        CacheIndex(cache, read_manifest(cache, stage="cache"))
