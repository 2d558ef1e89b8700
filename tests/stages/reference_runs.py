"""What the reference-image tests (Flux Kontext, channel-wise control) share: a quick LoRA run of the tiny Flux model
on the paired sample data (pictures and their edge images), with a validation when asked."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_config
from tests.helpers.training import QUICK

LORA = ["learning_rate=1e-2", "lora_dropout=0", "caption_dropout_probability=0", 'mixed_precision="no"',
        "checkpoint_step_interval=1", "lora_rank=4"]  # fmt: skip
VALIDATION = ["validation_disable=false", "validation_step_interval=100", 'validation_resolution="64"',
              "validation_num_inference_steps=2", "validation_guidance=1.0"]  # fmt: skip


def train_lora(setup: tuple[Path, Path], out: Path, *sets: str):
    """`st train` in this process with the QUICK and LORA options, then `sets`."""
    from pipeline.train.stage import run_train

    root, config = setup
    return run_train(load_config(config, [*QUICK, *LORA, *sets]), root / "cache", out)
