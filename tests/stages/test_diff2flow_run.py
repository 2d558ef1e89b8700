"""`st train` with diff2flow_enabled + diff2flow_loss on the tiny SD 1.x model: two steps with a finite loss, and a
resume at step 1 that ends in the uninterrupted run's weights (the bridge holds no state: it is rebuilt from the noise
schedule). That this loss is not the epsilon loss of the same prediction: tests/unit/test_diff2flow.py."""

from __future__ import annotations

import json
import math

from tests.helpers.training import WEIGHTS, train

OPTIONS = ["learning_rate=1e-3", "lora_dropout=0", "caption_dropout_probability=0", 'mixed_precision="no"', "seed=3",
           "eval_steps_interval=0"]
DIFF2FLOW = ["diff2flow_enabled=true", "diff2flow_loss=true"]


def losses(out) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_trains_with_the_flow_loss_and_resumes_exactly(cached, tmp_path):
    root, config = cached("sd1x")
    cache = root / "cache"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config, cache, straight, *OPTIONS, *DIFF2FLOW, "checkpoint_step_interval=1")
    flow = losses(straight)
    assert sorted(flow) == [1, 2] and all(math.isfinite(v) for v in flow.values())
    manifest = json.loads((straight / "manifest.json").read_text())
    assert manifest["config"]["diff2flow_loss"] is True  # in the train key: another objective is another run
    train(config, cache, resumed, *OPTIONS, *DIFF2FLOW,
          f'resume_from_checkpoint="{straight / "checkpoints" / "checkpoint-1"}"')  # fmt: skip
    assert losses(resumed) == {2: flow[2]}
    assert (resumed / WEIGHTS).read_bytes() == (straight / WEIGHTS).read_bytes()
