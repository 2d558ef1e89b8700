"""`st train` tells a real webhook endpoint what happens and runs the user's checkpoint script."""

from __future__ import annotations

import json
import sys

from pipeline.config import load_config
from pipeline.train.stage import run_train
from tests.helpers.training import QUICK
from tests.helpers.webhooks import Recorder


def test_train_sends_events_and_runs_post_checkpoint_script(tmp_path, monkeypatch, cached):
    monkeypatch.setenv("ST_JOB_ID", "job-42")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    root, config = cached("sd1x")
    recorder = Recorder()
    try:
        script = tmp_path / "hook.py"
        script.write_text("import sys, pathlib\npathlib.Path(sys.argv[1]).write_text(' '.join(sys.argv[2:]))\n")
        marker = tmp_path / "hook-called.txt"
        webhook = json.dumps([{"webhook_type": "raw", "callback_url": recorder.url("/events"), "log_level": "info"}])
        sets = [*QUICK, "max_train_steps=2", "checkpoint_step_interval=2", "webhook_reporting_interval=0",
                "validation_disable=false", "validation_num_inference_steps=1", 'validation_resolution="32"',
                f"webhook_config='{webhook}'",
                f"post_checkpoint_script='{sys.executable} {script} {marker} {{global_step}} {{local_checkpoint_path}}'"]
        run_train(load_config(config, sets), root / "cache", tmp_path / "train")
        events = [json.loads(r["body"])["event"] for r in recorder.wait(6, "/events")]
        bodies = [json.loads(r["body"]) for r in recorder.requests]
    finally:
        recorder.close()
    assert events[0] == "start" and events[-1] == "finished"
    assert {"progress", "checkpoint", "validation"} <= set(events)
    assert all(b["job_id"] == "job-42" and b["stage"] == "train" for b in bodies)
    step, path = marker.read_text().split(" ", 1)
    assert step == "2" and path.endswith("checkpoint-2")
