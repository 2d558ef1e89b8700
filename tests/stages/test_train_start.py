"""`st train` processes share this machine's shard verification: a shard verified once (here, in the test process) is
not hashed again by an `st train` process; a touched shard is hashed again, and a tampered one is refused by name."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from pipeline.errors import ManifestError
from pipeline.manifest import read_manifest
from pipeline.shardformat.verified import records_dir
from pipeline.train.data import CacheIndex, SampleReader, SampleRef
from tests.helpers.training import QUICK, ST, st_env

SETS = [*QUICK, "max_train_steps=1", "learning_rate=0.001", "lora_dropout=0", "caption_dropout_probability=0",
        'mixed_precision="no"']  # fmt: skip


def _train(config, cache, out) -> subprocess.CompletedProcess:
    args = [ST, "train", "-c", str(config), "-i", str(cache), "-o", str(out)]
    return subprocess.run([*args, *(a for s in SETS for a in ("--set", s))], env=st_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _forge(path) -> None:
    """Change the last byte (end-of-archive padding, which training never reads) keeping the size and the mtime."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_verification_is_reused_by_an_st_train_process_and_redone_for_a_touched_shard(cached, tmp_path):
    root, config = cached("sd1x")
    cache = shutil.copytree(root / "cache", tmp_path / "cache")
    index = CacheIndex(cache, read_manifest(cache, stage="cache"))
    for shard in index.shards:  # what a first run does with each shard it reads: hash it once, record it
        shard.ensure_verified()
    records = {json.loads(p.read_text())["path"] for p in records_dir().glob("*.json")}
    assert {str(s.path.resolve()) for s in index.shards} <= records

    for shard in index.shards:
        _forge(shard.path)
    run = _train(config, cache, tmp_path / "train")
    assert run.returncode == 0, run.stderr  # the records stand: no shard was hashed again (each would fail)

    for shard in index.shards:  # touched: this machine's record no longer describes the file, so it is hashed again
        os.utime(shard.path)
    first = CacheIndex(cache, read_manifest(cache, stage="cache")).shards[0]
    with pytest.raises(ManifestError, match=f"cache shard {re.escape(str(first.path))} does not match the manifest"):
        SampleReader().sample(SampleRef(first.keys[0], first, 0))
