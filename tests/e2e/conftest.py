"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest

TRAIN = ["max_train_steps=2", "validation_disable=true", "disable_benchmark=true", 'report_to="none"',
         "eval_steps_interval=0", "checkpoint_step_interval=0"]  # fmt: skip


@pytest.fixture(scope="session")
def sd1x_run(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """(config path, run folder with prepare/, cache/, train/, publish/) of one real tiny sd1x chain on 6 images,
    built once; the config sits in data/ beside the run folder. Tests read it or work on copies."""
    from pipeline.cache.stage import run_cache
    from pipeline.config import load_config
    from pipeline.prepare.stage import run_prepare
    from pipeline.publish.stage import run_publish
    from pipeline.sampledata import write_sample_dataset
    from pipeline.train.stage import run_train

    root = tmp_path_factory.mktemp("sd1x-run")
    config = write_sample_dataset(root / "data", images=6, family="sd1x", model=tiny_model("sd1x"), resolution=96)
    run = root / "run"
    run_prepare(load_config(config), run / "prepare")
    run_cache(load_config(config), run / "prepare", run / "cache")
    run_train(load_config(config, TRAIN), run / "cache", run / "train")
    run_publish(load_config(config), run / "train", run / "publish")
    return config, run
