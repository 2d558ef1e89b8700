"""`st cache` under `accelerate launch` with 2 CPU processes: disjoint shards, one manifest, same result."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from pipeline.config import load_config
    from pipeline.families import get_family
    from pipeline.prepare.stage import run_prepare
    from pipeline.sampledata import write_sample_dataset

    root = tmp_path_factory.mktemp("mp")
    get_family("sd1x").tiny(root / "model", 0)
    config = write_sample_dataset(root / "data", images=8, family="sd1x", model=root / "model")
    run_prepare(load_config(config), root / "prepare")
    return root, config


def _run(args: list[str], cwd: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_split_the_shards_and_match_a_single_run(prepared):
    root, config = prepared
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is installed with the project"
    common = ["cache", "-c", str(config), "-i", str(root / "prepare"), "--set", "cache_shard_samples=2"]
    launched = _run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "pipeline.cli", *common, "-o",
         str(root / "two")],
        root, {"CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    two = json.loads((root / "two" / "manifest.json").read_text())
    assert two["provenance"]["part"] == [0, 2]
    assert two["stats"]["samples"] == 8 and len(two["shards"]) >= 3
    # torchrun gives each process one thread; a single run with one thread must produce the same bytes.
    single = _run([sys.executable, "-m", "pipeline.cli", *common, "-o", str(root / "one")], root, {"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((root / "one" / "manifest.json").read_text())
    assert one["digest"] == two["digest"]
