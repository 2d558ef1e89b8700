"""Training across machines is accelerate's multi-node launch: two `accelerate launch --num_machines 2` processes on
loopback stand in for two nodes of one process each (machine_rank 0 and 1, one rendezvous address). Each node's only
process is its *local* main process, so this catches any code that splits data or writes outputs by local rather than
global rank."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.manifest import read_manifest
from tests.helpers.training import QUICK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_train_disjoint_data_and_one_node_writes_the_outputs(cached, tmp_path):
    root, config = cached("sd1x")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    port, out = _free_port(), tmp_path / "out"
    nodes = [
        subprocess.Popen(
            [accelerate, "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
             "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipeline.cli", "train", "-c", str(config),
             "-i", str(root / "cache"), "-o", str(out), *sum((["--set", s] for s in QUICK), []),
             "--set", "max_train_steps=3", "--set", "num_processes=2"],
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n\n".join(log[-3000:] for log in logs)

    ranks = {r: [json.loads(x) for x in (out / "logs" / f"data-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    for step in (1, 2, 3):
        keys = [set(next(x for x in ranks[r] if x.get("step") == step and "keys" in x)["keys"]) for r in (0, 1)]
        assert keys[0] and keys[1] and not keys[0] & keys[1], f"step {step}: the nodes trained on the same samples"
    digests = [next(x["weights_sha256"] for x in ranks[r] if "weights_sha256" in x) for r in (0, 1)]
    assert digests[0] == digests[1], "the nodes ended with different weights"
    manifest = read_manifest(out)
    assert manifest["provenance"]["processes"] == 2
    assert (out / "final" / "pytorch_lora_weights.safetensors").exists()
    # The global main process alone writes the outputs: nothing half-written is left by a second writer.
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".part"))]
