"""`st train` and `st verify` on crafted cache folders whose manifest matches every crafted file's hash.

`st train` must exit 2 with one message naming the crafted file (and member), `st verify` must exit 1 reporting it as
malformed; neither may change the cache folder.
"""

from __future__ import annotations

import pytest

from pipeline.manifest import read_manifest
from tests.helpers.untrusted import TRAIN_OPTIONS, build_tiny_cache, crafted_copy, tree_bytes

# The cases of the issue, plus the shared embeddings (read before the shards); the unit tests cover every case.
# A checksum mismatch shows up only when a frame is decompressed: it too must stop st train before the bytes are used.
E2E_CASES = ["zstd frame declaring 64 GiB", "safetensors header of 2^62 bytes", "bad JSON member", "not a tar file",
             "truncated tar", "shared embeddings declaring 64 GiB", "zstd checksum mismatch",
             "10^12 repeats in a sample's JSON"]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.getbasetemp() / "untrusted-cache")


def _settings() -> list[str]:
    return [arg for option in TRAIN_OPTIONS for arg in ("--set", option)]


def test_untouched_cache_trains_and_verifies(cli, tiny_run, tmp_path):
    config, cache = tiny_run
    result = cli("train", "-c", config, "-i", cache, "-o", tmp_path / "train", *_settings())
    assert result.exit_code == 0, result.output
    result = cli("verify", cache)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok  ")


@pytest.mark.parametrize("case", E2E_CASES)
def test_crafted_cache_fails_train_with_exit_2_and_verify_with_exit_1(cli, tiny_run, tmp_path, case):
    config, cache = tiny_run
    crafted, rel, member = crafted_copy(cache, tmp_path / "cache", case)
    before = tree_bytes(crafted)

    # A whole epoch, so every shard is read: a shard is checked when training first reads it, before its bytes are used.
    result = cli("train", "-c", config, "-i", crafted, "-o", tmp_path / "train", *_settings(), "--set",
                 "max_train_steps=4")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert str(crafted / rel) in result.stderr and member in result.stderr
    assert "re-run `st cache`" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "train" / "manifest.json").exists()  # the run never completed

    result = cli("verify", crafted)
    assert result.exit_code == 1, result.output
    assert f"FAILED  {crafted / 'manifest.json'}" in result.stdout
    assert f"  malformed: {rel} (" in result.stdout and member in result.stdout
    assert tree_bytes(crafted) == before


def test_a_cache_with_oversubscribed_buckets_passes_the_checks(cli, tiny_run, tmp_path):
    """allow_dataset_oversubscription raises a small bucket's repeats above its dataset's: an honest cache, not a
    crafted one, so st train and st verify accept it."""
    config, _ = tiny_run
    options = ["--set", "train_batch_size=4", "--set", "allow_dataset_oversubscription=true"]
    prepare, cache = tmp_path / "prepare", tmp_path / "cache"
    assert cli("prepare", "-c", config, "-o", prepare, *options).exit_code == 0
    raised = read_manifest(prepare, stage="prepare")["datasets"][0]["repeats_raised"]
    assert raised and all(r > 0 for r in raised.values())
    assert cli("cache", "-c", config, "-i", prepare, "-o", cache, *options).exit_code == 0
    result = cli("train", "-c", config, "-i", cache, "-o", tmp_path / "train", *options, *_settings())
    assert result.exit_code == 0, result.output
    assert cli("verify", cache).exit_code == 0
