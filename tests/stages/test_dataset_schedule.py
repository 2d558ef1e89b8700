"""Dataset scheduling on a real cache of two datasets for the tiny SD 1.x model: the keys travel from the dataset
list through `st prepare` and `st cache` to st train's data plan, which leaves a dataset's batches out while it is
not active (SimpleTuner's start_epoch / start_step / end_epoch / end_step), deterministically, so a resumed run trains
what an uninterrupted one does."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.manifest import read_manifest
from pipeline.train.data import CacheIndex, EpochPlanner
from tests.helpers.training import cached_dataset, train


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, tiny_model):
    """(root, config) of 8 sample images split into datasets 'early' (4 images) and 'late' (4 images, start_step
    3), prepared and cached; one bucket (crop to squares) so that each dataset's batches are easy to count."""
    root = tmp_path_factory.mktemp("scheduled")
    config = cached_dataset(root, "sd1x", tiny_model("sd1x"),
                            datasets={"early": (4, {}), "late": (4, {"start_step": 3})})
    return root, config


def planner(root: Path, accumulation: int = 1, **schedules: dict) -> EpochPlanner:
    """The planner of the cache, with each named dataset's schedule keys replaced by `schedules[name]` (what a cache
    built with those keys records)."""
    manifest = copy.deepcopy(read_manifest(root / "cache", stage="cache"))
    for entry in manifest["datasets"]:
        if entry["id"] in schedules:
            for key in ("start_epoch", "start_step", "end_epoch", "end_step"):
                entry.pop(key, None)
            entry.update(schedules[entry["id"]])
    index = CacheIndex(root / "cache", manifest)
    return EpochPlanner(index, seed=3, global_batch=1, sampling="uniform", accumulation=accumulation)


def datasets(plan) -> list[str]:
    return [batch.dataset_id for batch in plan]


def test_the_keys_reach_the_cache_manifest(two_datasets):
    root, _ = two_datasets
    prepared = {d["id"]: d for d in read_manifest(root / "prepare", stage="prepare")["datasets"]}
    cached = {d["id"]: d for d in read_manifest(root / "cache", stage="cache")["datasets"]}
    for manifest in (prepared, cached):
        assert manifest["late"]["start_step"] == 3
        assert not {"start_epoch", "start_step", "end_epoch", "end_step"} & set(manifest["early"])


def test_a_dataset_joins_at_its_start_step(two_datasets):
    root, _ = two_datasets
    first = datasets(planner(root).epoch(0))
    assert first[:2] == ["early", "early"]  # optimizer steps 1 and 2: 'late' starts at step 3
    assert sorted(first) == ["early"] * 4 + ["late"] * 4  # then it is sampled, all of its batches
    # with 2 batches per optimizer step, step 3 begins at the fifth batch
    assert datasets(planner(root, accumulation=2).epoch(0))[:4] == ["early"] * 4
    # every epoch from the second on has both datasets from its first batch
    assert set(datasets(planner(root).epoch(1))[:8]) == {"early", "late"}


def test_a_dataset_leaves_after_its_end_epoch(two_datasets):
    root, _ = two_datasets
    plan = planner(root, late={}, early={"end_epoch": 1})
    assert sorted(datasets(plan.epoch(0))) == ["early"] * 4 + ["late"] * 4
    assert datasets(plan.epoch(1)) == ["late"] * 4 and datasets(plan.epoch(2)) == ["late"] * 4
    assert plan.epoch_length(1) == 4 and plan.run_length(None, 3) == (16, 3)


def test_an_epoch_ends_early_when_the_rest_start_later(two_datasets):
    """SimpleTuner ends an epoch when its remaining datasets wait for a later step; the next epoch goes on from the
    step reached, so the plan of an epoch depends on the lengths of those before it."""
    root, _ = two_datasets
    plan = planner(root, late={"start_step": 6})
    assert datasets(plan.epoch(0)) == ["early"] * 4  # steps 1-4; 'late' waits for step 6: the epoch ends
    second = datasets(plan.epoch(1))
    assert second[0] == "early" and sorted(second) == ["early"] * 4 + ["late"] * 4  # step 5 'early' only, then both
    assert plan.run_length(7, 1) == (7, 2)  # 7 steps take 2 epochs (4 + 8 batches)


def test_the_plan_is_the_same_after_an_interruption(two_datasets):
    """A resumed run's planner starts at the checkpoint's epoch without having planned the earlier ones: it plans
    the same batches as the planner of the uninterrupted run."""
    root, _ = two_datasets
    straight = planner(root, late={"start_step": 6, "end_step": 14})
    expected = [straight.epoch(e) for e in range(3)]
    resumed = planner(root, late={"start_step": 6, "end_step": 14})
    assert resumed.epoch(2) == expected[2] and resumed.epoch(1) == expected[1]
    # epochs of 4 and 8 batches (steps 1-4, 5-12), so epoch 3 begins at step 13: 'late' trains at most at 13 and 14
    third = datasets(expected[2])
    assert "late" in third[:2] and "late" not in third[2:] and third.count("early") == 4
    assert straight.fingerprint()["schedules"] == {"late": {"start_step": 6, "end_step": 14}}


def test_a_schedule_that_excludes_nothing_plans_as_none(two_datasets):
    """The scheduled interleave draws as the plain one does while every dataset is active, and configs without the
    keys keep their plan and its fingerprint."""
    root, _ = two_datasets
    plain = planner(root, late={})
    assert not plain.scheduled
    assert set(plain.fingerprint()) == {"seed", "cache_digest", "global_batch", "sampling", "plan_version"}
    endless = planner(root, late={"end_step": 10**9})
    assert endless.scheduled
    assert [endless.epoch(e) for e in range(2)] == [plain.epoch(e) for e in range(2)]


def test_a_gap_with_no_dataset_is_an_error(two_datasets):
    root, _ = two_datasets
    plan = planner(root, early={"end_epoch": 1}, late={"start_epoch": 3})
    with pytest.raises(InputError, match=r"no dataset is sampled in epoch 2 at step 5: every training dataset has "
                                         r"ended or not yet started \(scheduled: 'early' \(end_epoch 1\), 'late' "
                                         r"\(start_epoch 3\)\)"):  # fmt: skip
        plan.run_length(None, 3)


def test_training_follows_the_schedule(two_datasets, tmp_path):
    """`st train` for 6 steps: 'late' trains from step 3 on (logs/data-rank0.jsonl names each step's samples)."""
    root, config = two_datasets
    index = CacheIndex(root / "cache", read_manifest(root / "cache", stage="cache"))
    result = train(config, root / "cache", tmp_path / "out", "max_train_steps=6", "eval_steps_interval=0")
    assert result.manifest["metrics"]["steps"] == 6
    records = [json.loads(line) for line in (tmp_path / "out" / "logs" / "data-rank0.jsonl").read_text().splitlines()]
    trained = {r["step"]: index.samples[r["keys"][0]].dataset_id for r in records if "keys" in r}
    assert sorted(trained) == [1, 2, 3, 4, 5, 6]
    assert trained[1] == trained[2] == "early" and "late" in {trained[s] for s in range(3, 7)}


def test_a_resumed_scheduled_run_trains_what_an_uninterrupted_one_does(two_datasets, tmp_path, caplog):
    """9 steps, then a resume to 12 (in epoch 2, whose plan the resumed process computes from epoch 1's length),
    equal an uninterrupted 12-step run: the same samples at each step and the same final weights."""
    root, config = two_datasets
    sets = ["checkpoint_step_interval=9", "eval_steps_interval=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config, root / "cache", straight, *sets, "max_train_steps=12")
    train(config, root / "cache", resumed, *sets, "max_train_steps=9")
    with caplog.at_level(logging.INFO):
        train(config, root / "cache", resumed, *sets, "max_train_steps=12", 'resume_from_checkpoint="latest"')
    assert "checkpoint-9 at step 9 (epoch 1, batch 1)" in caplog.text

    def order(folder):
        records = map(json.loads, (folder / "logs" / "data-rank0.jsonl").read_text().splitlines())
        return {r["step"]: (r["epoch"], r["keys"]) for r in records if "keys" in r}

    assert sorted(order(resumed)) == list(range(1, 13)) and order(resumed) == order(straight)
    assert order(straight)[9][0] == 1  # the resume starts in the second epoch
    weights = Path("final") / "pytorch_lora_weights.safetensors"
    assert (straight / weights).read_bytes() == (resumed / weights).read_bytes()
