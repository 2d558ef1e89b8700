"""A prepared and cached sample dataset, and a quick `st train` on it."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_config

QUICK = [
    "validation_disable=true", "disable_benchmark=true", "report_to=\"none\"", "dataloader_prefetch=false",
    "max_train_steps=2", "train_batch_size=1",
]  # fmt: skip


def cached_dataset(root: Path, family: str, model: Path, images: int = 8, **extra) -> Path:
    """A sample dataset for the tiny `family` model at `model` (the `tiny_model` fixture's), its prepare and its cache
    under `root` (data/, prepare/, cache/); `extra` updates the config (SimpleTuner's `--name` keys). Returns the
    config path."""
    from pipeline.cache.stage import run_cache
    from pipeline.prepare.stage import run_prepare
    from pipeline.sampledata import write_sample_dataset

    config = write_sample_dataset(root / "data", images=images, family=family, model=model, resolution=96)
    data = json.loads(config.read_text())
    data.update({"--validation_prompt": "a red circle on a white background", "--train_batch_size": 1,
                 "--num_validation_images": 1, **extra})  # fmt: skip
    config.write_text(json.dumps(data))
    loaded = load_config(config)
    run_prepare(loaded, root / "prepare")
    run_cache(loaded, root / "prepare", root / "cache")
    return config


def train(config: Path, cache: Path, out: Path, *sets: str):
    """`run_train` with the QUICK options, then `sets`."""
    from pipeline.train.stage import run_train

    return run_train(load_config(config, [*QUICK, *sets]), cache, out)
