"""Evaluation datasets (`dataset_type: eval`, eval_dataset_id, eval_dataset_pooling, eval_epoch_interval): which
samples the evaluation loss reads, how its values are named, and when it runs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.train import evaluation
from pipeline.train.options import EvaluationOptions
from tests.helpers.trainers import build_trainer
from tests.helpers.training import train

DATASETS = {"train": {"id": "train"}, "a": {"id": "a", "dataset_type": "eval"}, "b": {"id": "b", "dataset_type": "eval"}}
SAMPLES = {f"{d}{i}": SimpleNamespace(dataset_id=d) for d in ("train", "a", "b") for i in range(3)}


def options(**values) -> EvaluationOptions:
    return EvaluationOptions.from_config(Config(**values))


def test_eval_datasets_are_read_instead_of_training_samples():
    assert evaluation.sample_sets(SAMPLES, DATASETS, options(num_eval_images=2)) == {
        "eval_loss/a": ["a0", "a1"], "eval_loss/b": ["b0", "b1"]}  # fmt: skip
    pooled = evaluation.sample_sets(SAMPLES, DATASETS, options(num_eval_images=4, eval_dataset_pooling=True))
    assert pooled == {"eval_loss": ["a0", "a1", "a2", "b0"]}
    assert evaluation.sample_sets(SAMPLES, DATASETS, options(eval_dataset_id="b")) == {"eval_loss/b": ["b0", "b1", "b2"]}
    # no eval dataset: st's own evaluation on the first cached samples
    plain = {k: v for k, v in DATASETS.items() if k == "train"}
    assert evaluation.sample_sets(SAMPLES, plain, options(num_eval_images=2)) == {"eval_loss": ["a0", "a1"]}


def test_eval_dataset_id_must_name_an_eval_dataset():
    with pytest.raises(ConfigError, match=r"eval_dataset_id names 'train', which is not an eval dataset .*a, b"):
        evaluation.sample_sets(SAMPLES, DATASETS, options(eval_dataset_id=["a", "train"]))


def test_eval_epoch_interval_runs_at_each_fraction_of_an_epoch():
    due = options(eval_epoch_interval=0.5)
    assert [s for s in range(1, 13) if due.due(s, steps_per_epoch=4)] == [2, 4, 6, 8, 10, 12]
    both = options(eval_epoch_interval=2.0, eval_steps_interval=3)
    assert [s for s in range(1, 13) if both.due(s, steps_per_epoch=4)] == [3, 6, 8, 9, 12]
    tenth = options(eval_epoch_interval=0.1)  # 0.1 x 10 steps is not exactly 1.0 in floating point
    assert [s for s in range(1, 6) if tenth.due(s, steps_per_epoch=10)] == [1, 2, 3, 4, 5]
    assert not options().enabled and options(eval_epoch_interval=1.0).enabled


def test_per_dataset_losses_and_their_overall_mean(cached, tmp_path):
    """The evaluation of two eval datasets (two halves of the cached samples here) logs each one's loss, and
    eval_loss over all of their samples; a dataset's value is what evaluating it alone gives."""
    trainer = build_trainer(cached("sd1x"), tmp_path / "out", "num_eval_images=2")
    keys = sorted(trainer.index.samples)
    halves = {k: SimpleNamespace(dataset_id="a" if i % 2 else "b") for i, k in enumerate(keys)}
    datasets = {"a": {"dataset_type": "eval"}, "b": {"dataset_type": "eval"}}
    trainer.eval_sets = evaluation.sample_sets(halves, datasets, trainer.evaluation)
    values = trainer.evaluate()
    assert sorted(values) == ["eval_loss", "eval_loss/a", "eval_loss/b"]
    assert values["eval_loss/a"] != values["eval_loss/b"]
    assert values["eval_loss"] == pytest.approx((values["eval_loss/a"] + values["eval_loss/b"]) / 2)
    trainer.eval_sets = {"eval_loss": trainer.eval_sets["eval_loss/a"]}
    assert trainer.evaluate() == {"eval_loss": pytest.approx(values["eval_loss/a"], rel=1e-6)}


def test_eval_epoch_interval_schedules_the_evaluation(cached, tmp_path):
    """8 samples, batch 1: 8 steps an epoch, so eval_epoch_interval 0.25 evaluates every 2 steps (and at the start
    and the end, as eval_steps_interval does)."""
    root, config = cached("sd1x")
    out = tmp_path / "out"
    train(config, root / "cache", out, "max_train_steps=3", "eval_epoch_interval=0.25", "num_eval_images=1",
          "mixed_precision=\"no\"", "lora_dropout=0.0", "caption_dropout_probability=0.0", "learning_rate=1e-3")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 3]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["final_eval_loss"] == [r for r in records if "eval_loss" in r][-1]["eval_loss"]
