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

from pipeline.cache.stage import run_cache
from pipeline.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model):
    from pipeline.prepare.stage import run_prepare
    from pipeline.sampledata import write_sample_dataset

    root = tmp_path_factory.mktemp("mp")
    config = write_sample_dataset(root / "data", images=8, family="sd1x", model=tiny_model("sd1x"))
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
    # torchrun gives each process one thread; a single run with one thread (this process: conftest's
    # one_torch_thread) must produce the same bytes.
    single = run_cache(load_config(config, ["cache_shard_samples=2"]), root / "prepare", root / "one")
    assert single.manifest["digest"] == two["digest"]
