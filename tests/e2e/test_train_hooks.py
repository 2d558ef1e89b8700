"""A `post_checkpoint_script` that never ends does not stop `st train` from finishing."""

from __future__ import annotations

import json

from pipeline.config import load_config
from pipeline.train.stage import run_train
from tests.helpers.training import QUICK
from tests.helpers.processes import alive, hanging_hook, wait_until


def test_training_finishes_while_a_hanging_checkpoint_hook_is_killed(tmp_path, cached):
    root, config = cached("sd1x")
    command, _ = hanging_hook(tmp_path, "pids-{global_step}.txt")
    sets = [*QUICK, "max_train_steps=2", "checkpoint_step_interval=1", "hook_timeout=3",
            f"post_checkpoint_script={json.dumps(command)}"]  # fmt: skip
    result = run_train(load_config(config, sets), root / "cache", tmp_path / "train")
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert result.manifest is not None and manifest["metrics"]["steps"] == 2
    assert [c["step"] for c in manifest["checkpoints"]] == [1, 2]
    for step in (1, 2):  # each checkpoint started a hook that never ends by itself: both were killed
        script_pid, child_pid = map(int, (tmp_path / f"pids-{step}.txt").read_text().split())
        assert not alive(script_pid)
        assert wait_until(lambda: not alive(child_pid))
