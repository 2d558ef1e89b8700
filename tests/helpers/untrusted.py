"""Crafted cache outputs for the untrusted-bytes tests: a real tiny sd1x cache, one shard (or the shared embeddings)
replaced by hostile bytes, and the manifest rewritten so that every size, sha256 and the digest match again.

Each case is built in the test from the real cache's bytes; no binary is committed. Nothing here allocates the sizes
the crafted headers declare.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile
from pathlib import Path
from typing import Callable

import zstandard

from pipeline.hashing import sha256_file
from pipeline.manifest import MANIFEST_NAME, finalise
from pipeline.shards import ShardWriter, read_shard

LATENT = "latent.safetensors.zst"
GIB = 1 << 30
TRAIN_OPTIONS = ["max_train_steps=2", "validation_disable=true", "disable_benchmark=true", 'report_to="none"',
                 "eval_steps_interval=0", "checkpoint_step_interval=0"]  # fmt: skip


def build_tiny_cache(base: Path) -> tuple[Path, Path]:
    """(config path, cache folder) of a real tiny sd1x prepare + cache run under `base`, built once per test session
    (the unit and e2e tests share it)."""
    config, cache = base / "data" / "config.json", base / "run" / "cache"
    if (cache / MANIFEST_NAME).is_file():
        return config, cache
    from pipeline.cache.stage import run_cache
    from pipeline.config import load_config
    from pipeline.families import get_family
    from pipeline.prepare.stage import run_prepare
    from pipeline.sampledata import write_sample_dataset

    get_family("sd1x").tiny(base / "model", 0)
    config = write_sample_dataset(base / "data", images=6, family="sd1x", model=base / "model", resolution=96)
    run_prepare(load_config(config), base / "run" / "prepare")
    run_cache(load_config(config, ["cache_shard_samples=3"]), base / "run" / "prepare", cache)  # 2 shards
    return config, cache


def manifest_of(cache: Path) -> dict:
    return json.loads((cache / MANIFEST_NAME).read_text())


def rehash(cache: Path) -> None:
    """Rewrite the manifest so that it records the files as they are now (sizes, sha256, digest): what an attacker who
    crafts a whole cache folder can always do."""
    doc = manifest_of(cache)
    for entry in [*doc["shards"], *doc["outputs"]]:
        file = cache / entry["path"]
        entry["sha256"], entry["bytes"] = sha256_file(file), file.stat().st_size
    (cache / MANIFEST_NAME).write_text(json.dumps(finalise(doc), indent=2, sort_keys=True) + "\n")


def frame_declaring(size: int, payload: bytes = b"\0" * 64) -> bytes:
    """A zstd frame whose header declares `size` content bytes (it holds far fewer)."""
    frame = zstandard.ZstdCompressor(write_content_size=False, write_checksum=False).compress(payload)
    descriptor = frame[4]
    assert descriptor & 0xE0 == 0, "expected a frame without a content size and with a window descriptor"
    # Frame_Content_Size_flag 3: an 8-byte content size after the window descriptor.
    return frame[:4] + bytes([descriptor | 0xC0]) + frame[5:6] + struct.pack("<Q", size) + frame[6:]


def honest_frame(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(raw)


def target_shard(cache: Path) -> dict:
    """The manifest entry of the shard the cases craft: the one with the most samples."""
    return max(manifest_of(cache)["shards"], key=lambda s: (s["samples"], s["path"]))


def crafted_shard(cache: Path) -> Path:
    return cache / target_shard(cache)["path"]


def replace_member(cache: Path, suffix: str, data: bytes) -> str:
    """Rewrite the first shard with the first sample's `suffix` member replaced by `data`; returns the member name."""
    path = crafted_shard(cache)
    samples = list(read_shard(path, expected_sha256=None))
    samples[0][1][suffix] = data
    path.unlink()
    with ShardWriter(path) as writer:
        for key, members in samples:
            writer.add(key, members)
    return f"{samples[0][0]}.{suffix}"


def zstd_64_gib(cache: Path) -> str:
    return replace_member(cache, LATENT, frame_declaring(64 * GIB))


def safetensors_header_2_62(cache: Path) -> str:
    header = b'{"latent":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}}'
    return replace_member(cache, LATENT, honest_frame(struct.pack("<Q", 1 << 62) + header + b"\0\0"))


def zstd_checksum_mismatch(cache: Path) -> str:
    """A frame whose header and safetensors header are fine, but whose checksum is not: found only when decoded."""
    path = crafted_shard(cache)
    frame = bytearray(dict(next(read_shard(path, expected_sha256=None))[1])[LATENT])
    frame[-1] ^= 0xFF
    return replace_member(cache, LATENT, bytes(frame))


def bad_json(cache: Path) -> str:
    return replace_member(cache, "json", b'{"sample_id": "abc", "bucket": ')


def huge_repeats(cache: Path) -> str:
    """Metadata asking for 10^12 repeats: an epoch plan of that size would exhaust memory before the first step."""
    path = crafted_shard(cache)
    meta = json.loads(dict(next(read_shard(path, expected_sha256=None))[1])["json"])
    meta["repeats"] = 10**12
    return replace_member(cache, "json", json.dumps(meta).encode())


def deeply_nested_json(cache: Path) -> str:
    return replace_member(cache, "json", b"[" * 100_000 + b"]" * 100_000)


def not_a_tar(cache: Path) -> str:
    crafted_shard(cache).write_bytes(b"this is not a tar file\n" * 100)
    return ""


def truncated_tar(cache: Path) -> str:
    path = crafted_shard(cache)
    with tarfile.open(path) as tar:
        second = tar.getmembers()[1]  # cut inside the first sample's latent member
    path.write_bytes(path.read_bytes()[: second.offset_data + second.size // 2])
    return ""


def tar_cut_at_member_boundary(cache: Path) -> str:
    """A tar cut right after a complete sample: every remaining header is intact, the end-of-archive marker is gone."""
    path = crafted_shard(cache)
    with tarfile.open(path) as tar:
        third = tar.getmembers()[3]  # the second sample's json header starts here
    path.write_bytes(path.read_bytes()[: third.offset])
    return ""


def symlink_member(cache: Path) -> str:
    path = crafted_shard(cache)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("abcd.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    path.write_bytes(buffer.getvalue())
    return "abcd.json"


def shared_embeds_64_gib(cache: Path) -> str:
    (cache / manifest_of(cache)["embeds"]["path"]).write_bytes(frame_declaring(64 * GIB))
    return ""


# name -> (craft, which file the findings name: the first "shard" or the shared "embeds")
CASES: dict[str, tuple[Callable[[Path], str], str]] = {
    "zstd frame declaring 64 GiB": (zstd_64_gib, "shard"),
    "safetensors header of 2^62 bytes": (safetensors_header_2_62, "shard"),
    "zstd checksum mismatch": (zstd_checksum_mismatch, "shard"),
    "bad JSON member": (bad_json, "shard"),
    "10^12 repeats in a sample's JSON": (huge_repeats, "shard"),
    "deeply nested JSON member": (deeply_nested_json, "shard"),
    "not a tar file": (not_a_tar, "shard"),
    "truncated tar": (truncated_tar, "shard"),
    "tar cut at a member boundary": (tar_cut_at_member_boundary, "shard"),
    "symlink member": (symlink_member, "shard"),
    "shared embeddings declaring 64 GiB": (shared_embeds_64_gib, "embeds"),
}


def crafted_copy(cache: Path, dest: Path, case: str) -> tuple[Path, str, str]:
    """A copy of `cache` with `case` applied and the manifest rehashed: (folder, the crafted file relative to it, the
    member name the errors must mention or "")."""
    shutil.copytree(cache, dest)
    craft, target = CASES[case]
    member = craft(dest)
    doc = manifest_of(dest)
    rel = target_shard(dest)["path"] if target == "shard" else doc["embeds"]["path"]
    rehash(dest)
    return dest, rel, member


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to show that a command changed nothing."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
