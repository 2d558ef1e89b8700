"""A dataset's own `train_batch_size` (SimpleTuner's per-dataset batch size): read and checked from the dataset list,
used by `st prepare` to size (prune) that dataset's buckets, carried to the cache manifest, and used by st train's
plan to cut that dataset's batches (its size x the processes); datasets without it, and plans of configs without it,
stay as they were."""

from __future__ import annotations

import copy
import json

import pytest

from pipeline.config import load_config
from pipeline.datasets import parse_entry
from pipeline.errors import ConfigError
from pipeline.manifest import read_manifest
from pipeline.train.data import CacheIndex, EpochPlanner
from tests.helpers.files import make_image, write_config
from tests.helpers.training import cached_dataset, train


def test_the_key_is_read_and_checked(tmp_path, st_log):
    make_image(tmp_path / "a" / "img.png", size=(64, 64))
    loaded = load_config(write_config(tmp_path, [], resolution=64))
    entry = {"id": "d", "instance_data_dir": "a"}
    where = tmp_path / "multidatabackend.json"
    spec = parse_entry({**entry, "train_batch_size": "3"}, loaded, where, 0)
    assert spec.train_batch_size == 3 and spec.describe()["train_batch_size"] == 3
    for unset in (None, ""):
        spec = parse_entry({**entry, "train_batch_size": unset}, loaded, where, 0)
        assert spec.train_batch_size is None and "train_batch_size" not in spec.describe()
    assert parse_entry(entry, loaded, where, 0).describe() == spec.describe()  # the stage key stays as it was
    with pytest.raises(ConfigError, match=r"option 'train_batch_size' is 0, outside its range"):
        parse_entry({**entry, "train_batch_size": 0}, loaded, where, 0)
    with pytest.raises(ConfigError, match=r"option 'train_batch_size' .*must be int"):
        parse_entry({**entry, "train_batch_size": "many"}, loaded, where, 0)
    log = st_log("datasets")
    held = parse_entry({**entry, "dataset_type": "eval", "train_batch_size": 4}, loaded, where, 0)
    assert held.train_batch_size is None  # SimpleTuner evaluates one sample at a time, whatever the key says
    assert any("train_batch_size is not read on an eval dataset" in r.getMessage() for r in log)


def test_prepare_sizes_each_datasets_buckets_by_its_own_batch(tmp_path):
    """Two images per dataset: 'wide' (train_batch_size 3) cannot fill one batch and is pruned, naming its batch of
    3; 'narrow' (the global train_batch_size 1) keeps its images."""
    from pipeline.prepare.stage import run_prepare

    for name, colours in (("wide", (10, 20)), ("narrow", (30, 40))):
        for c in colours:
            make_image(tmp_path / name / f"{c}.png", size=(64, 64), colour=(c, c, c))
    config = write_config(tmp_path, [{"id": "wide", "instance_data_dir": "wide", "train_batch_size": 3},
                                     {"id": "narrow", "instance_data_dir": "narrow"}],
                          resolution=64, caption_strategy="filename")  # fmt: skip
    result = run_prepare(load_config(config), tmp_path / "prepare")
    datasets = {d["id"]: d for d in result.manifest["datasets"]}
    assert datasets["wide"]["samples"] == 0 and datasets["wide"]["train_batch_size"] == 3
    assert datasets["narrow"]["samples"] == 2 and "train_batch_size" not in datasets["narrow"]
    skipped = [json.loads(line) for line in (tmp_path / "prepare" / "skipped.jsonl").read_text().splitlines()]
    assert {s["dataset_id"] for s in skipped} == {"wide"}
    assert all(s["reason"] == "bucket_pruned" and "fewer than one batch of 3" in s["detail"] for s in skipped)


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, tiny_model):
    """(root, config) of 6 + 4 sample images for the tiny SD 1.x model: dataset 'big' with train_batch_size 3 and
    dataset 'small' at the global train_batch_size 1, one square bucket, prepared and cached."""
    root = tmp_path_factory.mktemp("batch-sizes")
    config = cached_dataset(root, "sd1x", tiny_model("sd1x"), images=10,
                            datasets={"big": (6, {"train_batch_size": 3}), "small": (4, {})})
    return root, config


def planner(root, processes: int = 1, drop_key: bool = False) -> EpochPlanner:
    manifest = copy.deepcopy(read_manifest(root / "cache", stage="cache"))
    if drop_key:  # what the same cache records without the key
        for entry in manifest["datasets"]:
            entry.pop("train_batch_size", None)
    index = CacheIndex(root / "cache", manifest)
    return EpochPlanner(index, seed=3, global_batch=processes, sampling="uniform", processes=processes)


def test_the_key_reaches_the_cache_manifest(two_datasets):
    root, _ = two_datasets
    datasets = {d["id"]: d for d in read_manifest(root / "cache", stage="cache")["datasets"]}
    assert datasets["big"]["train_batch_size"] == 3 and "train_batch_size" not in datasets["small"]


def test_the_plan_cuts_each_dataset_by_its_own_batch(two_datasets):
    root, _ = two_datasets
    for processes in (1, 2):
        plan = planner(root, processes)
        sizes = sorted((b.dataset_id, len(b.keys)) for b in plan.epoch(0))
        # big: 6 samples in global batches of 3 x processes; small: 4 samples in global batches of 1 x processes
        assert sizes == [("big", 3 * processes)] * (2 // processes) + [("small", processes)] * (4 // processes)
        assert plan.fingerprint()["batch_sizes"] == {"big": 3 * processes}
    plain = planner(root, drop_key=True)
    assert set(plain.fingerprint()) == {"seed", "cache_digest", "global_batch", "sampling", "plan_version"}
    assert all(len(b.keys) == 1 for b in plain.epoch(0)) and len(plain.epoch(0)) == 10


def test_each_rank_takes_its_share_of_the_datasets_batch(two_datasets):
    from pipeline.train.data import TrainLoader

    root, _ = two_datasets
    plan = planner(root, processes=2)
    shares = []
    for rank in (0, 1):
        loader = TrainLoader(plan.index, plan, rank=rank, world=2, shared_text={}, empty_key="", caption_dropout=0.0,
                             seed=0, prefetch=0)  # fmt: skip
        shares.append([planned.keys[slice(*loader.share(planned))] for planned in plan.epoch(0)])
    for planned, first, second in zip(plan.epoch(0), *shares):
        assert len(first) == len(second) == len(planned.keys) // 2 and first + second == planned.keys


def test_training_batches_have_their_datasets_size(two_datasets, tmp_path):
    """`st train` for 4 steps: each step's batch holds 3 samples of 'big' or 1 of 'small' (logs/data-rank0.jsonl)."""
    root, config = two_datasets
    big = {k for (d, _), keys in CacheIndex(root / "cache", read_manifest(root / "cache", stage="cache")).groups.items()
           if d == "big" for k in keys}  # fmt: skip
    result = train(config, root / "cache", tmp_path / "out", "max_train_steps=4", "eval_steps_interval=0")
    assert result.manifest["metrics"]["steps"] == 4
    records = [json.loads(line) for line in (tmp_path / "out" / "logs" / "data-rank0.jsonl").read_text().splitlines()]
    batches = [r["keys"] for r in records if "keys" in r]
    assert len(batches) == 4
    for keys in batches:
        assert (len(keys) == 3 and set(keys) <= big) or (len(keys) == 1 and not set(keys) & big)
    assert {len(keys) for keys in batches} == {1, 3}
