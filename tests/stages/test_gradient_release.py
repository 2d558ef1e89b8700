"""optimizer_release_gradients on a tiny sd1x LoRA run: the weights of plain optimizer steps, and an exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import ConfigError
from tests.helpers.training import WEIGHTS, losses, train

# No clipping and no accumulation: the per-parameter steps during backward must equal one optimizer.step().
SETS = ['optimizer="optimi-adamw"', "max_grad_norm=0", "learning_rate=1e-3"]
RELEASE = "optimizer_release_gradients=true"


def test_release_trains_as_plain_steps_and_resumes_exactly(cached, tmp_path):
    root, config = cached("sd1x")
    cache = root / "cache"
    plain, released, resumed = tmp_path / "plain", tmp_path / "released", tmp_path / "resumed"
    train(config, cache, plain, *SETS)  # QUICK: 2 steps
    train(config, cache, released, *SETS, RELEASE, "checkpoint_step_interval=1")
    a, b = load_file(str(plain / WEIGHTS)), load_file(str(released / WEIGHTS))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in b.items() if "lora_B" in k)  # it trained
    assert losses(released) == pytest.approx(losses(plain), rel=0, abs=1e-6)
    records = [json.loads(line) for line in (released / "metrics.jsonl").read_text().splitlines()]
    assert all("grad_norm" not in r for r in records if "loss" in r)  # no whole gradient exists to measure

    # Resume the release run from its step-1 checkpoint (optimizer state saved without optimi's group links).
    (checkpoint,) = released.glob("**/checkpoint-1")
    train(config, cache, resumed, *SETS, RELEASE, "checkpoint_step_interval=1",
          f'resume_from_checkpoint="{checkpoint}"')  # fmt: skip
    assert losses(resumed)[2] == losses(released)[2]
    assert (resumed / WEIGHTS).read_bytes() == (released / WEIGHTS).read_bytes()


def test_release_with_clipping_is_refused(cached, tmp_path):
    root, config = cached("sd1x")
    with pytest.raises(ConfigError, match="optimizer_release_gradients.*max_grad_norm=1.0"):
        train(config, root / "cache", tmp_path / "out", 'optimizer="optimi-adamw"', "max_grad_norm=1.0", RELEASE)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
