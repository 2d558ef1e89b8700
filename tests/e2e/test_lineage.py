"""Lineage between stages: a stage refuses an input whose files changed, or whose own parent changed since it was
built (naming both manifests, both digests and the stage to re-run); `--force` goes on and says so in the manifest."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from pipeline.cache.stage import run_cache
from pipeline.config import load_config
from pipeline.errors import LineageError, UserError
from pipeline.manifest import read_manifest
from pipeline.prepare.stage import run_prepare
from pipeline.publish.stage import run_publish
from pipeline.train.stage import run_train

TRAIN = ["max_train_steps=2", "validation_disable=true", "disable_benchmark=true", 'report_to="none"',
         "eval_steps_interval=0"]  # fmt: skip


@pytest.fixture(scope="module")
def chain(sd1x_run) -> Path:
    """prepare/, cache/, train/ of one tiny sd1x run (tests/e2e/conftest.py); its config is ../data/config.json."""
    return sd1x_run[1]


def config_of(run: Path, *sets: str):
    return load_config(run.parent / "data" / "config.json", list(sets))


def short(digest: str) -> str:
    return digest[:12] + "..."


def test_changed_prepare_refuses_the_old_cache_and_force_records_it(chain, tmp_path, caplog):
    # A prepare output of our own (a copy), a cache built from it, then prepare re-run with another resolution.
    shutil.copytree(chain / "prepare", tmp_path / "prepare")
    run_cache(config_of(chain), tmp_path / "prepare", tmp_path / "cache")
    built_from = read_manifest(tmp_path / "cache", stage="cache")["parent"]["digest"]
    run_prepare(config_of(chain, "resolution=64"), tmp_path / "prepare")
    now = read_manifest(tmp_path / "prepare", stage="prepare")["digest"]
    assert now != built_from

    cache_manifest = tmp_path / "cache" / "manifest.json"
    prepare_manifest = tmp_path / "prepare" / "manifest.json"
    expected = (f"{cache_manifest} was built from prepare digest {short(built_from)}, but {prepare_manifest} is now "
                f"{short(now)}; re-run `st cache`")  # fmt: skip
    with pytest.raises(LineageError) as refused:
        run_train(config_of(chain, *TRAIN), tmp_path / "cache", tmp_path / "train")
    assert expected in str(refused.value) and "--force" in str(refused.value)
    assert not (tmp_path / "train").exists()  # refused before touching the output folder

    with caplog.at_level(logging.WARNING, logger="st"):
        forced = run_train(config_of(chain, *TRAIN), tmp_path / "cache", tmp_path / "train", force=True)
    assert any(expected in r.getMessage() and "--force" in r.getMessage() for r in caplog.records)
    stored = read_manifest(tmp_path / "train", stage="train")
    assert stored["metrics"]["steps"] == 2 and stored["digest"] == forced.manifest["digest"]
    assert stored["provenance"]["lineage"] == {"forced": True, "reasons": [expected]}
    # The forced lineage is provenance: the digest still describes only the cache and what was trained.
    plain = read_manifest(chain / "train", stage="train")
    assert "lineage" not in plain["provenance"]

    # The cache is rebuilt from the new prepare output: now the train output is the stale one, for publish.
    trained_on = stored["parent"]["digest"]
    run_cache(config_of(chain, "resolution=64"), tmp_path / "prepare", tmp_path / "cache")
    cache_now = read_manifest(tmp_path / "cache", stage="cache")["digest"]
    assert cache_now != trained_on
    expected = (f"{tmp_path / 'train' / 'manifest.json'} was built from cache digest {short(trained_on)}, but "
                f"{cache_manifest} is now {short(cache_now)}; re-run `st train`")  # fmt: skip
    with pytest.raises(LineageError) as refused:
        run_publish(config_of(chain), tmp_path / "train", tmp_path / "publish")
    assert expected in str(refused.value)
    assert not (tmp_path / "publish").exists()
    published = run_publish(config_of(chain), tmp_path / "train", tmp_path / "publish", force=True)
    assert published.manifest["provenance"]["lineage"] == {"forced": True, "reasons": [expected]}
    assert published.manifest["dataset"]["summary"] is False  # the changed cache does not describe this run
    # ... and the fresh cache trains without complaint.
    fresh = run_train(config_of(chain, *TRAIN), tmp_path / "cache", tmp_path / "train")
    assert not fresh.up_to_date and "lineage" not in fresh.manifest["provenance"]


def test_modified_train_output_is_refused_by_publish(chain, tmp_path):
    shutil.copytree(chain / "train", tmp_path / "train")
    weights = tmp_path / "train" / "final" / "pytorch_lora_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    changed = rf"{re.escape(str(weights))} changed after `st train` wrote it .*; re-run `st train`$"
    with pytest.raises(LineageError, match=changed):
        run_publish(config_of(chain), tmp_path / "train", tmp_path / "publish")
    weights.unlink()
    missing = rf"{re.escape(str(weights))} is missing, but .*manifest.json lists it; re-run `st train`"
    with pytest.raises(LineageError, match=missing):
        run_publish(config_of(chain), tmp_path / "train", tmp_path / "publish", force=True)  # files: no override
    assert not (tmp_path / "publish").exists()


def test_damaged_cache_files_are_refused_by_train(chain, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(chain / "cache", cache)
    manifest = read_manifest(cache, stage="cache")
    shard = cache / manifest["shards"][0]["path"]
    original = shard.read_bytes()

    # Same size, one byte changed: caught by the hash check as the loader reads the shard.
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(UserError, match=rf"{re.escape(str(shard))} does not match the manifest: expected sha256 .*`st cache`"):
        run_train(config_of(chain, *TRAIN), cache, tmp_path / "train")

    # Truncated: caught before anything is loaded or written.
    shard.write_bytes(original[:-512])
    with pytest.raises(LineageError, match=rf"{re.escape(str(shard))} changed after `st cache` wrote it \(its size"):
        run_train(config_of(chain, *TRAIN), cache, tmp_path / "train-2")
    assert not (tmp_path / "train-2").exists()
    shard.write_bytes(original)

    embeds = cache / manifest["embeds"]["path"]
    embeds.write_bytes(embeds.read_bytes()[:-1] + bytes([embeds.read_bytes()[-1] ^ 1]))
    with pytest.raises(LineageError, match=rf"{re.escape(str(embeds))} changed after `st cache` wrote it .*`st cache`"):
        run_train(config_of(chain, *TRAIN), cache, tmp_path / "train-3", force=True)
    (cache / "index.parquet").unlink()
    embeds.unlink()
    missing = rf"{re.escape(str(embeds))} is missing, but {re.escape(str(cache / 'manifest.json'))} lists it"
    with pytest.raises(LineageError, match=missing):
        run_train(config_of(chain, *TRAIN), cache, tmp_path / "train-3")


def test_a_moved_parent_is_not_checked_but_an_unreadable_one_is_refused(chain, tmp_path, caplog):
    cache = tmp_path / "cache"
    shutil.copytree(chain / "cache", cache)
    doc = json.loads((cache / "manifest.json").read_text())
    # provenance is outside the digest: pointing it elsewhere is what copying the folder to another machine does.
    doc["provenance"]["parent_path"] = str(tmp_path / "gone" / "manifest.json")
    (cache / "manifest.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.INFO, logger="st"):
        result = run_train(config_of(chain, *TRAIN), cache, tmp_path / "train")
    assert result.manifest["metrics"]["steps"] == 2 and "lineage" not in result.manifest["provenance"]
    assert any("could not be checked" in r.getMessage() for r in caplog.records)

    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "manifest.json").write_text("{not json")
    unreadable = r"whose manifest can no longer be used .*re-run `st prepare` and `st cache`"
    with pytest.raises(LineageError, match=unreadable):
        run_train(config_of(chain, *TRAIN), cache, tmp_path / "train")
