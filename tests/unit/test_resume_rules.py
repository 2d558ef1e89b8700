"""Which checkpoint `resume_from_checkpoint` may continue, and the reason given when it may not."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.config import TRAIN, Config
from pipeline.train.checkpoint import CHECKPOINT_SCHEMA
from pipeline.train.resume import RESUMABLE_OPTIONS, ResumeMismatch, RunRecord, choose_checkpoint, differences


def run_record(**options) -> RunRecord:
    config = Config(**{"learning_rate": 1e-4, "max_train_steps": 10, **options}).stage_keys(TRAIN)
    return RunRecord(key="k", config=config, parent_digest="a" * 64, denoiser={"weights_sha256": "d" * 64},
                     family="sd1x", format=1)  # fmt: skip


def write_checkpoint(folder: Path, step: int, run: RunRecord | None) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    info = {"schema": CHECKPOINT_SCHEMA, "step": step, "files": []}
    if run is not None:
        info["run"] = run.as_dict()
    (path / "manifest.json").write_text(json.dumps(info))
    return path


@pytest.fixture
def records(st_log):
    return st_log("train")


def test_resumable_options_are_real_train_options_and_leave_the_resume_key_alone():
    assert set(RESUMABLE_OPTIONS) <= set(Config().stage_keys(TRAIN))
    base = run_record()
    assert run_record(max_train_steps=20, num_train_epochs=3, validation_seed=5).resume_key == base.resume_key
    assert run_record(learning_rate=2e-4).resume_key != base.resume_key
    assert replace(base, parent_digest="b" * 64).resume_key != base.resume_key


def test_the_reason_names_what_differs():
    run = run_record(learning_rate=2e-4, lora_rank=4)
    expected = "learning_rate changed 0.0001 -> 0.0002, lora_rank changed 16 -> 4"
    assert differences(run_record().as_dict(), run) == expected
    edited = replace(run_record(), parent_digest="b" * 64).as_dict()  # a caption edit re-encodes the cache
    assert differences(edited, run_record()).startswith("the cache changed (digest bbbbbbbbbbbb -> aaaaaaaaaaaa")
    assert differences({}, run) == "it records no train key (it was written by an older st)"


def test_latest_takes_the_newest_checkpoint_of_this_run(tmp_path):
    folder = tmp_path / "checkpoints"
    mine = write_checkpoint(folder, 3, run_record(max_train_steps=3))
    write_checkpoint(folder, 6, run_record(learning_rate=5e-4))
    plan = choose_checkpoint("latest", folder, tmp_path, run_record())
    assert (plan.path, plan.step) == (mine, 3)
    assert plan.summary(run_record().config)["changed"] == {"max_train_steps": [3, 10]}


def test_latest_with_only_other_runs_starts_fresh_or_stops_when_strict(tmp_path, records):
    folder = tmp_path / "checkpoints"
    write_checkpoint(folder, 2, None)
    write_checkpoint(folder, 4, run_record(learning_rate=5e-4))
    assert choose_checkpoint("latest", folder, tmp_path, run_record()).path is None
    reason = "not resuming from checkpoint-4: learning_rate changed 0.0005 -> 0.0001"
    assert f"train: {reason}; starting from step 0" in [r.getMessage() for r in records]
    with pytest.raises(ResumeMismatch, match=f"{reason} \\(--resume-strict\\)"):
        choose_checkpoint("latest", folder, tmp_path, run_record(), strict=True)
    with pytest.raises(ResumeMismatch, match="checkpoint-2 belongs to another run: it records no train key"):
        choose_checkpoint("checkpoint-2", folder, tmp_path, run_record())
