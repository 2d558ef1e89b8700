"""`st train` with CREPA on the tiny Wan model and generated video clips: it trains with the alignment loss (logged),
resumes exactly (the projector is in the checkpoint), crepa_lambda 0 trains exactly as without CREPA, and an image
family refuses it."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pipeline.errors import ConfigError  # noqa: E402
from tests.helpers.training import WEIGHTS, train  # noqa: E402

OPTIONS = ["learning_rate=1e-3", "lora_dropout=0", "caption_dropout_probability=0", 'mixed_precision="no"',
           "eval_steps_interval=0", "seed=3"]  # fmt: skip


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, wan_clips):
    """(config, cache, CREPA options) for two generated clips prepared and cached for the tiny Wan model (`wan_clips`),
    with a tiny DINOv2 as the CREPA encoder."""
    from pipeline.train.crepa_encoder import write_tiny_dinov2

    root, config = wan_clips
    dino = write_tiny_dinov2(tmp_path_factory.mktemp("crepa-wan") / "dino")
    crepa = ["crepa_enabled=true", "crepa_block_index=0", f'crepa_model="{dino}"', "crepa_encoder_image_size=16"]
    return config, root / "cache", [*OPTIONS, *crepa]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trains_with_crepa_and_resumes_exactly(video_run, tmp_path):
    config, cache, crepa = video_run
    straight = tmp_path / "straight"
    train(config, cache, straight, *crepa, "checkpoint_step_interval=1")
    steps = {m["step"]: m for m in metrics(straight) if "loss" in m}
    assert all(steps[s]["crepa_loss"] != 0 and "crepa_similarity_self" in steps[s] for s in (1, 2))
    assert set(load_file(straight / "checkpoints" / "checkpoint-1" / "crepa.safetensors")) == {
        "projector.0.weight", "projector.0.bias", "projector.1.weight", "projector.1.bias"}

    resumed = tmp_path / "resumed"
    train(config, cache, resumed, *crepa, f'resume_from_checkpoint="{straight / "checkpoints" / "checkpoint-1"}"')
    again = {m["step"]: m for m in metrics(resumed) if "loss" in m}
    assert list(again) == [2]
    assert again[2]["loss"] == steps[2]["loss"] and again[2]["crepa_loss"] == steps[2]["crepa_loss"]
    assert (resumed / WEIGHTS).read_bytes() == (straight / WEIGHTS).read_bytes()


def test_lambda_zero_trains_as_without_crepa(video_run, tmp_path):
    config, cache, crepa = video_run
    train(config, cache, tmp_path / "plain", *OPTIONS, "max_train_steps=1")
    train(config, cache, tmp_path / "zero", *crepa, "crepa_lambda=0", "max_train_steps=1")
    train(config, cache, tmp_path / "half", *crepa, "crepa_lambda=0.5", "max_train_steps=1")
    assert (tmp_path / "zero" / WEIGHTS).read_bytes() == (tmp_path / "plain" / WEIGHTS).read_bytes()
    assert (tmp_path / "half" / WEIGHTS).read_bytes() != (tmp_path / "plain" / WEIGHTS).read_bytes()


def test_image_family_refuses_crepa(cached, tmp_path):
    root, config = cached("sd1x")
    with pytest.raises(ConfigError, match="model_family sd1x trains images"):
        train(config, root / "cache", tmp_path / "out", "crepa_enabled=true", "crepa_block_index=0")
    assert not (tmp_path / "out" / "final").exists()
