"""A prepared and cached sample dataset, and a quick `st train` on it."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_config

QUICK = [
    "validation_disable=true", "disable_benchmark=true", "report_to=\"none\"", "dataloader_prefetch=false",
    "max_train_steps=2", "train_batch_size=1",
]  # fmt: skip


def cached_dataset(root: Path, family: str, images: int = 8, **extra) -> Path:
    """A tiny `family` model, a sample dataset, its prepare and its cache under `root` (model/, data/, prepare/,
    cache/); `extra` updates the config (SimpleTuner's `--name` keys). Returns the config path."""
    from pipeline.cache.stage import run_cache
    from pipeline.families import get_family
    from pipeline.prepare.stage import run_prepare
    from pipeline.sampledata import write_sample_dataset

    get_family(family).tiny(root / "model", 0)
    config = write_sample_dataset(root / "data", images=images, family=family, model=root / "model", resolution=96)
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
