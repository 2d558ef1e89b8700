"""Cache shard format: payload packing, deterministic tar writing, verified reading, the recorded index, webdataset
compatibility."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
import zstandard

from pipeline.errors import InputError, ManifestError
from pipeline.hashing import sha256_file
from pipeline.shards import (
    ShardWriter,
    pack_json,
    pack_tensors,
    read_member,
    read_shard,
    shard_name,
    unpack_tensors,
    verify_shard,
    webdataset_decoder,
)


def _sample(i: int) -> tuple[str, dict[str, bytes]]:
    gen = torch.Generator().manual_seed(i)
    latent = {"latent": torch.randn(4, 8, 8, generator=gen).to(torch.bfloat16)}
    text = {
        "embeds": torch.randn(7, 16, generator=gen),
        "ids": torch.arange(7, dtype=torch.int64) * (i + 1),
    }
    meta = {"index": i, "caption": f"a photo number {i} – ünïcode", "size": [64, 64]}
    return f"{i:02x}ab{i:04x}", {
        "json": pack_json(meta),
        "latent.safetensors.zst": pack_tensors(latent),
        "text.safetensors.zst": pack_tensors(text),
    }


def _write(path, samples) -> ShardWriter:
    with ShardWriter(path) as writer:
        for key, members in samples:
            writer.add(key, members)
    return writer


@pytest.fixture
def samples():
    return [_sample(i) for i in range(3)]


def test_pack_unpack_round_trip_keeps_dtypes():
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "fp32": torch.randn(2, 2),
        "int64": torch.tensor([1, -2, 2**40]),
        "slice": torch.randn(4, 4)[1],
    }
    data = pack_tensors(tensors)
    out = unpack_tensors(data)
    assert set(out) == set(tensors)
    for name, tensor in tensors.items():
        assert out[name].dtype == tensor.dtype
        assert torch.equal(out[name], tensor)
    assert pack_tensors(dict(tensors)) == data  # deterministic


def test_zstd_frame_records_content_size():
    data = pack_tensors({"x": torch.zeros(10, 10)})
    size = zstandard.frame_content_size(data)
    assert size > 0
    assert size == len(zstandard.ZstdDecompressor().decompress(data))
    assert zstandard.get_frame_parameters(data).has_checksum


def test_unpack_rejects_garbage():
    with pytest.raises(InputError, match="not a zstd frame"):
        unpack_tensors(b"not zstd at all")
    with pytest.raises(InputError, match="not valid safetensors"):
        unpack_tensors(zstandard.ZstdCompressor().compress(b"\x80\x02pickle"))


def test_write_read_round_trip(tmp_path, samples):
    path = tmp_path / shard_name("cache", 0)
    writer = _write(path, samples)
    assert path.name == "cache-000000.tar"
    assert not (tmp_path / "cache-000000.tar.tmp").exists()
    assert writer.samples == 3
    assert writer.keys == [key for key, _ in samples]
    assert writer.bytes == path.stat().st_size
    assert writer.sha256 == sha256_file(path)

    got = list(read_shard(path, expected_sha256=writer.sha256, expected_bytes=writer.bytes))
    assert [key for key, _ in got] == writer.keys
    for (key, members), (_, expected) in zip(got, samples):
        assert members == expected
        assert json.loads(members["json"]) == json.loads(expected["json"])
        latent = unpack_tensors(members["latent.safetensors.zst"])["latent"]
        assert latent.dtype == torch.bfloat16
    verify_shard(path, writer.sha256, writer.bytes)


def test_tar_is_deterministic_and_normalised(tmp_path, samples):
    first = _write(tmp_path / "a.tar", samples)
    second = _write(tmp_path / "b.tar", [(k, dict(reversed(list(m.items())))) for k, m in samples])
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert first.sha256 == second.sha256
    with tarfile.open(tmp_path / "a.tar") as tar:
        infos = tar.getmembers()
    key = samples[0][0]
    assert [i.name for i in infos[:3]] == [f"{key}.json", f"{key}.latent.safetensors.zst", f"{key}.text.safetensors.zst"]
    for info in infos:
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o644)
        assert info.isreg() and not info.pax_headers


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_exception_removes_tmp_and_leaves_no_final(tmp_path, samples, exc_type):
    path = tmp_path / "shard.tar"
    with pytest.raises(exc_type):
        with ShardWriter(path) as writer:
            writer.add(*samples[0])
            assert (tmp_path / "shard.tar.tmp").exists()
            raise exc_type("boom")
    assert not path.exists()
    assert not (tmp_path / "shard.tar.tmp").exists()


def test_exception_keeps_existing_final(tmp_path, samples):
    path = tmp_path / "shard.tar"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as writer:
            writer.add(*samples[0])
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"


@pytest.mark.parametrize("key", ["", "ABCD", "ab.cd", "ab/cd", "../ab", "xyz", "ab cd", 12])
def test_bad_keys_rejected(tmp_path, key):
    with pytest.raises(ValueError):
        with ShardWriter(tmp_path / "s.tar") as writer:
            writer.add(key, {"json": b"{}"})
    assert not (tmp_path / "s.tar").exists()


@pytest.mark.parametrize("suffix", ["", "a/b", "..", "a..b", ".json", "json.", "JSON", "x" * 120])
def test_bad_suffixes_rejected(tmp_path, suffix):
    with ShardWriter(tmp_path / "s.tar") as writer:
        with pytest.raises(ValueError):
            writer.add("abcd", {suffix: b"x"})
        with pytest.raises(ValueError):
            writer.add("abcd", {})


def test_duplicate_key_rejected(tmp_path, samples):
    with ShardWriter(tmp_path / "s.tar") as writer:
        writer.add(*samples[0])
        with pytest.raises(ValueError, match="duplicate"):
            writer.add(*samples[0])


def test_tampered_shard_refused(tmp_path, samples):
    path = tmp_path / "cache-000003.tar"
    writer = _write(path, samples)
    data = bytearray(path.read_bytes())
    data[700] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError) as info:
        read_shard(path, expected_sha256=writer.sha256, expected_bytes=writer.bytes)
    message = str(info.value)
    assert "cache-000003.tar" in message and writer.sha256 in message and sha256_file(path) in message
    assert "st cache" in message
    with pytest.raises(ManifestError, match="cache-000003.tar"):
        verify_shard(path, writer.sha256, writer.bytes)
    with pytest.raises(ManifestError, match="cache-000003.tar"):
        verify_shard(path, sha256_file(path), writer.bytes + 1)


def test_missing_shard_refused(tmp_path):
    with pytest.raises(ManifestError, match="missing"):
        read_shard(tmp_path / "nope.tar", expected_sha256="0" * 64)


def _hand_made(path, info: tarfile.TarInfo, data: bytes = b"") -> str:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        good = tarfile.TarInfo("abcd.json")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"{}"))
        info.size = len(data) if info.isreg() else 0
        tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return sha256_file(path)


def _symlink(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    return info


def _fifo(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize(
    "info, fragment",
    [
        (tarfile.TarInfo("../evil.json"), "../evil.json"),
        (tarfile.TarInfo("ab/../../evil.json"), "ab/../../evil.json"),
        (tarfile.TarInfo("/abs.json"), "/abs.json"),
        (_symlink("beef.latent.safetensors.zst"), "beef.latent.safetensors.zst"),
        (_fifo("beef.json"), "beef.json"),
    ],
)
def test_unsafe_members_refused(tmp_path, info, fragment):
    path = tmp_path / "evil-000000.tar"
    sha = _hand_made(path, info, b"x")
    with pytest.raises(InputError) as caught:
        list(read_shard(path, expected_sha256=sha))
    assert "evil-000000.tar" in str(caught.value) and fragment in str(caught.value)


def test_not_a_tar_refused(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 100)
    with pytest.raises(InputError, match="junk.tar"):
        list(read_shard(path, expected_sha256=sha256_file(path)))


def test_webdataset_reads_shards(tmp_path, samples):
    """st's shards stay readable by webdataset (a test dependency only: st reads its shards by recorded offsets)."""
    webdataset = pytest.importorskip("webdataset")

    more = [_sample(i) for i in range(3, 5)]
    urls = []
    for index, group in enumerate([samples, more]):
        path = tmp_path / shard_name("cache", index)
        _write(path, group)
        urls.append(str(path))
    dataset = webdataset.WebDataset(urls, shardshuffle=False).map(webdataset_decoder)
    got = list(dataset)
    assert [s["__key__"] for s in got] == [key for key, _ in samples + more]
    for sample, (_, members) in zip(got, samples + more):
        assert sample["json"] == json.loads(members["json"])
        expected = unpack_tensors(members["latent.safetensors.zst"])
        assert sample["latent.safetensors.zst"]["latent"].dtype == torch.bfloat16
        assert torch.equal(sample["latent.safetensors.zst"]["latent"], expected["latent"])
        assert torch.equal(sample["text.safetensors.zst"]["ids"], unpack_tensors(members["text.safetensors.zst"])["ids"])


def test_shard_name():
    assert shard_name("train", 12) == "train-000012.tar"
    with pytest.raises(ValueError):
        shard_name("train", -1)


def test_writer_records_where_every_member_sits(tmp_path, samples):
    from pipeline.shardformat import scan_shard

    writer = _write(tmp_path / "s.tar", samples)
    doc = writer.index_doc()
    scanned = scan_shard(tmp_path / "s.tar", expected_sha256=writer.sha256)
    assert doc["keys"] == [s.key for s in scanned] and doc["repeats"] == [0, 0, 0]
    for suffix, column in doc["spans"].items():
        assert column == [v for s in scanned for v in s.members[suffix]]
    with open(tmp_path / "s.tar", "rb") as handle:
        for (key, members), sample in zip(samples, scanned):
            assert {s: read_member(handle, span) for s, span in sample.members.items()} == members


def test_encode_sample_round_trips_through_a_shard(tmp_path):
    from pipeline.shardformat import COND, LATENT, TEXT, encode_sample, group_captions

    latent = torch.randn(4, 8, 8).half()
    captions = {1: {"prompt_embeds": torch.randn(7, 16)}, 0: {"prompt_embeds": torch.randn(7, 16)}}
    cond = {"0.pixels": torch.zeros(3, 64, 64, dtype=torch.uint8)}
    members = encode_sample({"repeats": 2, "text": ["sample:", "sample:"]}, latent, captions=captions,
                            conditioning=cond)  # fmt: skip
    assert sorted(members) == sorted(["json", LATENT, TEXT, COND])
    writer = _write(tmp_path / "s.tar", [("ab", members)])
    assert writer.index_doc()["repeats"] == [2]
    [(_, read)] = list(read_shard(tmp_path / "s.tar", expected_sha256=writer.sha256))
    assert torch.equal(unpack_tensors(read[LATENT])["latent"], latent)
    grouped = group_captions(unpack_tensors(read[TEXT]))
    assert sorted(grouped) == [0, 1] and torch.equal(grouped[1]["prompt_embeds"], captions[1]["prompt_embeds"])
    assert sorted(encode_sample({}, latent)) == ["json", LATENT]  # no caption or conditioning member when none
