"""Stages reading and writing `s3://bucket/prefix` against a real S3 server on loopback (moto): prepare, cache,
train and publish with S3 outputs and inputs, training that streams shards through a bounded shard cache, a tampered
shard object, a prefix holding foreign objects, and an upload killed midway then finished by a re-run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from pipeline.hashing import sha256_file
from tests.helpers.training import QUICK, ST, st_env

BUCKET = "st-runs"
GB = 1024**3


class _SlowPuts:
    """WSGI middleware: while `slow` is set, each PUT takes `delay` seconds (an upload that can be killed midway)."""

    def __init__(self, app, delay: float = 0.4) -> None:
        self.app, self.delay, self.slow = app, delay, threading.Event()

    def __call__(self, environ, start_response):
        if self.slow.is_set() and environ["REQUEST_METHOD"] == "PUT":
            time.sleep(self.delay)
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a loopback port with one bucket; the AWS environment points st (and its subprocesses)
    at it. Yields (boto3 client, the middleware that can slow PUTs down)."""
    from moto.moto_server.threaded_moto_server import MotoRequestHandler
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    middleware = _SlowPuts(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, middleware, True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}  # fmt: skip
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client, middleware
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.shutdown()


def objects(client, prefix: str) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
    return {o["Key"][len(prefix) + 1:]: o["Size"] for page in pages for o in page.get("Contents", [])}


def remote_manifest(client, prefix: str) -> dict:
    return json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json")["Body"].read())


def quick_sets() -> list[str]:
    return [item for s in [*QUICK, "learning_rate=0.001", "lora_dropout=0", "caption_dropout_probability=0",
                           'mixed_precision="no"'] for item in ("--set", s)]  # fmt: skip


@pytest.fixture(scope="module")
def s3_cache(s3, cached, cli):
    """`st prepare` and `st cache` of the sd1x sample data, both into the bucket (the cache reads its input from the
    bucket too). Returns (config, the cache prefix)."""
    _, config = cached("sd1x")
    result = cli("prepare", "-c", config, "-o", f"s3://{BUCKET}/chain/prepare")
    assert result.exit_code == 0, result.output
    result = cli("cache", "-c", config, "-i", f"s3://{BUCKET}/chain/prepare", "-o", f"s3://{BUCKET}/chain/cache")
    assert result.exit_code == 0, result.output
    return config, "chain/cache"


@pytest.fixture(scope="module")
def cli(request):
    """The in-process `st` of tests/conftest.py, module-scoped for the module fixtures."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


class PeakSize:
    """Polls a folder's total file size (temporary downloads included) in a thread; `peak` is the largest seen."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak = folder, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            total = 0
            for path in self.folder.rglob("*.tar*") if self.folder.exists() else ():
                try:
                    total += path.stat().st_size
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_cache_train_publish_through_the_bucket_with_a_bounded_shard_cache(s3, s3_cache, cli, cached, tmp_path):
    client, _ = s3
    config, prefix = s3_cache
    cache = remote_manifest(client, prefix)
    assert cache["digest"] == json.loads((cached("sd1x")[0] / "cache" / "manifest.json").read_text())["digest"]
    sizes = sorted(s["bytes"] for s in cache["shards"])
    total = sum(sizes)
    limit = sizes[-1] + sizes[0]  # the largest shard and one more: less than the whole cache
    assert limit < total
    shard_cache = tmp_path / "shards"
    with PeakSize(shard_cache) as measured:
        result = cli("train", "-c", config, "-i", f"s3://{BUCKET}/{prefix}", "-o", f"s3://{BUCKET}/chain/train",
                     "--shard-cache", shard_cache, "--shard-cache-limit", repr(limit / GB), *quick_sets(),
                     )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert 0 < measured.peak <= limit
    train = remote_manifest(client, "chain/train")
    assert train["parent"]["digest"] == cache["digest"]
    listed = objects(client, "chain/train")
    assert all(entry["path"] in listed for entry in train["outputs"])
    assert ".st-lock" not in listed  # released

    result = cli("publish", "-c", config, "-i", f"s3://{BUCKET}/chain/train", "-o", f"s3://{BUCKET}/chain/publish")
    assert result.exit_code == 0, result.output
    published = remote_manifest(client, "chain/publish")
    assert published["parent"]["digest"] == train["digest"]
    assert set(objects(client, "chain/publish")) >= {e["path"] for e in published["outputs"]}

    # A re-run on the same machine finds every output up to date and uploads nothing new.
    before = {k: v for k, v in objects(client, "chain/train").items()}
    result = cli("train", "-c", config, "-i", f"s3://{BUCKET}/{prefix}", "-o", f"s3://{BUCKET}/chain/train",
                 "--shard-cache", shard_cache, *quick_sets())  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output
    assert objects(client, "chain/train") == before


def test_a_tampered_shard_object_is_refused_by_name(s3, s3_cache, cli, tmp_path):
    client, _ = s3
    config, prefix = s3_cache
    for key in objects(client, prefix):  # a copy of the cache, one shard of it rewritten
        client.copy_object(Bucket=BUCKET, Key=f"tampered/{key}", CopySource={"Bucket": BUCKET, "Key": f"{prefix}/{key}"})
    shard = remote_manifest(client, prefix)["shards"][0]
    data = bytearray(client.get_object(Bucket=BUCKET, Key=f"tampered/{shard['path']}")["Body"].read())
    data[600] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=f"tampered/{shard['path']}", Body=bytes(data))
    result = cli("train", "-c", config, "-i", f"s3://{BUCKET}/tampered", "-o", tmp_path / "train", "--shard-cache",
                 tmp_path / "shards", *quick_sets())  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"s3://{BUCKET}/tampered/{shard['path']}" in result.output
    assert "does not match" in result.output
    assert not list((tmp_path / "shards").rglob(Path(shard["path"]).name))  # never renamed into place


def test_a_prefix_with_foreign_objects_is_refused(s3, cached, cli):
    client, _ = s3
    _, config = cached("sd1x")
    client.put_object(Bucket=BUCKET, Key="foreign/notes.txt", Body=b"someone else's")
    result = cli("prepare", "-c", config, "-o", f"s3://{BUCKET}/foreign")
    assert result.exit_code == 2
    assert "notes.txt" in result.output and "st did not write" in result.output
    assert set(objects(client, "foreign")) == {"notes.txt"}


def test_sigkill_during_the_upload_then_a_rerun_gives_the_same_output(s3, cached, cli, tmp_path):
    client, middleware = s3
    root, config = cached("sd1x")
    args = [ST, "prepare", "-c", str(config), "-o", f"s3://{BUCKET}/killed"]
    middleware.slow.set()
    try:
        process = subprocess.Popen(args, env=st_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while not any(k != ".st-lock" and not k.startswith(".st-owned") for k in objects(client, "killed")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        middleware.slow.clear()
    left = objects(client, "killed")
    assert "manifest.json" not in left  # no commit point: readers do not trust the prefix
    refused = cli("cache", "-c", config, "-i", f"s3://{BUCKET}/killed", "-o", tmp_path / "cache")
    assert refused.exit_code == 2 and "holds no manifest.json" in refused.output
    result = cli(*args[1:])  # the re-run: the killed run's lock is taken over, the missing objects uploaded
    assert result.exit_code == 0, result.output
    manifest = remote_manifest(client, "killed")
    local = root / "prepare"  # the same prepare run into a local folder, never interrupted
    assert manifest["digest"] == json.loads((local / "manifest.json").read_text())["digest"]
    for entry in manifest["outputs"]:
        head = client.head_object(Bucket=BUCKET, Key=f"killed/{entry['path']}")
        assert (head["ContentLength"], head["Metadata"]["sha256"]) == (entry["bytes"], entry["sha256"])
        assert sha256_file(local / entry["path"]) == entry["sha256"]


def test_batches_streamed_from_the_bucket_equal_the_local_ones_from_any_cursor(s3, s3_cache, cached, tmp_path):
    """What a resumed run reads from a cursor is what an uninterrupted one reads there, shard cache or not: the
    plan decides, the fetching follows it (evicting and fetching shards again as the limit requires)."""
    import torch

    from pipeline.artifacts import S3Prefix
    from pipeline.cache_reader import CacheReader
    from pipeline.train.data import CacheIndex, Cursor, EpochPlanner, TrainLoader
    from pipeline.train.shard_cache import attached, open_remote_cache

    client, _ = s3
    _, prefix = s3_cache
    sizes = sorted(s["bytes"] for s in remote_manifest(client, prefix)["shards"])
    limit = sizes[-1] + sizes[0]
    remote_root = open_remote_cache(S3Prefix(BUCKET, prefix), tmp_path / "shards", limit / GB)

    def batches(root: Path, cursor: Cursor) -> list[tuple[list[str], torch.Tensor]]:
        reader = CacheReader(root)
        index = CacheIndex(root, reader.manifest)
        planner = EpochPlanner(index, seed=5, global_batch=1, sampling="auto-weighting")
        loader = TrainLoader(index, planner, rank=0, world=1, shared_text=reader.shared_embeds(),
                             empty_key=reader.manifest["embeds"]["empty"], caption_dropout=0.0, seed=5, prefetch=0)
        return [(batch.keys, batch.latents) for batch in loader.iterate(cursor, epochs=3)]

    local_root = cached("sd1x")[0] / "cache"
    for cursor in (Cursor(0, 0), Cursor(1, 3)):
        streamed, local = batches(remote_root, cursor), batches(local_root, cursor)
        assert [keys for keys, _ in streamed] == [keys for keys, _ in local]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(streamed, local))
    cache = attached(remote_root)
    assert cache.peak <= limit < sum(sizes)
    assert cache.fetched > len(sizes)  # shards were evicted and fetched again as the plan came back to them


def test_cache_parts_written_to_the_bucket_merge_there_into_one_run(s3, s3_cache, cli):
    client, _ = s3
    config, prefix = s3_cache
    for part in ("0/2", "1/2"):
        result = cli("cache", "-c", config, "-i", f"s3://{BUCKET}/chain/prepare", "--part", part, "-o",
                     f"s3://{BUCKET}/parts/{part[0]}")  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "part.json" in objects(client, f"parts/{part[0]}")
    result = cli("cache", "merge", f"s3://{BUCKET}/parts/0", f"s3://{BUCKET}/parts/1", "-c", config, "-i",
                 f"s3://{BUCKET}/chain/prepare", "-o", f"s3://{BUCKET}/merged")  # fmt: skip
    assert result.exit_code == 0, result.output
    merged, single = remote_manifest(client, "merged"), remote_manifest(client, prefix)
    assert merged["digest"] == single["digest"]
    listed = objects(client, "merged")
    assert all(listed[entry["path"]] == entry["bytes"] for entry in merged["outputs"])


def final_digests(manifest: dict) -> dict[str, str]:
    return {entry["path"]: entry["sha256"] for entry in manifest["final"]["files"]}


def machine(state: Path) -> dict[str, str]:
    """The environment of an `st` on another machine: its own state folder; one thread, as in this process, so
    that its arithmetic matches the in-process reference run's."""
    return {**st_env(), "ST_STATE_DIR": str(state), "OMP_NUM_THREADS": "1"}


def test_a_train_killed_on_one_machine_resumes_from_the_bucket_on_another(s3, s3_cache, cli, tmp_path):
    """Checkpoints reach the bucket as they are written; a run on a machine that never saw the output (an empty
    state folder) fetches the latest of them, only that one, and ends with the uninterrupted run's weights."""
    client, middleware = s3
    config, prefix = s3_cache
    sets = [*quick_sets(), "--set", "max_train_steps=3", "--set", "checkpointing_steps=1", "--set",
            "checkpoints_total_limit=5", "--set", 'resume_from_checkpoint="latest"']  # fmt: skip
    reference = cli("train", "-c", config, "-i", f"s3://{BUCKET}/{prefix}", "-o", tmp_path / "reference", *sets)
    assert reference.exit_code == 0, reference.output
    expected = final_digests(json.loads((tmp_path / "reference" / "manifest.json").read_text()))

    args = [ST, "train", "-c", str(config), "-i", f"s3://{BUCKET}/{prefix}", "-o", f"s3://{BUCKET}/moved", *sets]
    middleware.slow.set()  # uploads take a while: the run is killed before it ends
    try:
        first = subprocess.Popen(args, env=machine(tmp_path / "machine-a"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 300
        while not any(re.fullmatch(r"checkpoints/checkpoint-\d+/manifest.json", key) for key in objects(client, "moved")):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-4000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        middleware.slow.clear()
    assert "manifest.json" not in objects(client, "moved")  # it did not finish

    second = subprocess.run(args, env=machine(tmp_path / "machine-b"), capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert second.returncode == 0, second.stderr
    fetched = [line for line in second.stderr.splitlines() if "to resume from it" in line]
    assert len(fetched) == 1, second.stderr  # the checkpoint it resumes from, not every one
    manifest = remote_manifest(client, "moved")
    assert manifest["stats"]["resumed_from"] is not None
    assert final_digests(manifest) == expected


def test_status_and_verify_check_a_prefix_in_the_bucket_and_name_a_tampered_object(s3, s3_cache, cli):
    client, _ = s3
    _, prefix = s3_cache
    result = cli("status", f"s3://{BUCKET}/chain/prepare", f"s3://{BUCKET}/{prefix}", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["stages"]
    assert [(r["stage"], r["folder"], r["state"]) for r in rows] == [
        ("prepare", f"s3://{BUCKET}/chain/prepare", "ok"), ("cache", f"s3://{BUCKET}/{prefix}", "ok")]
    result = cli("verify", f"s3://{BUCKET}/{prefix}")
    assert result.exit_code == 0, result.output
    assert f"ok  s3://{BUCKET}/{prefix}/manifest.json" in result.output

    for key in objects(client, prefix):  # a copy of the cache with one shard changed, its size kept
        client.copy_object(Bucket=BUCKET, Key=f"inspected/{key}", CopySource={"Bucket": BUCKET, "Key": f"{prefix}/{key}"})
    shard = remote_manifest(client, prefix)["shards"][0]["path"]
    data = bytearray(client.get_object(Bucket=BUCKET, Key=f"inspected/{shard}")["Body"].read())
    data[600] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=f"inspected/{shard}", Body=bytes(data))
    result = cli("verify", f"s3://{BUCKET}/inspected")
    assert result.exit_code == 1
    assert f"sha256 differs: {shard}" in result.output
    assert "ok" in cli("status", f"s3://{BUCKET}/inspected").output  # sizes only: the same
    result = cli("status", f"s3://{BUCKET}/inspected", "--verify")
    assert "damaged" in result.output and shard in result.output
    client.delete_object(Bucket=BUCKET, Key=f"inspected/{shard}")
    assert f"{shard} missing" in cli("status", f"s3://{BUCKET}/inspected").output
    result = cli("verify", f"s3://{BUCKET}/nothing-here")
    assert result.exit_code == 2 and "holds no manifest.json" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_stream_from_the_bucket_each_within_the_limit_and_train_as_from_a_local_cache(
        s3, s3_cache, cached, tmp_path):  # fmt: skip
    from pipeline.artifacts import S3Prefix

    client, _ = s3
    config, prefix = s3_cache
    sizes = sorted(s["bytes"] for s in remote_manifest(client, prefix)["shards"])
    limit = sizes[-1] + sizes[0]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))

    def launch(input: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
             "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "pipeline.cli", "train",
             "-c", str(config), "-i", input, "-o", str(out), *quick_sets(), "--set", "max_train_steps=3", "--set",
             "num_processes=2", *flags],
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    shards = tmp_path / "shards"
    folders = [shards / S3Prefix(BUCKET, prefix).local_name() / f"rank-{rank}" for rank in (0, 1)]
    with PeakSize(folders[0]) as rank0, PeakSize(folders[1]) as rank1:
        streamed = launch(f"s3://{BUCKET}/{prefix}", tmp_path / "streamed", "--shard-cache", str(shards),
                          "--shard-cache-limit", repr(limit / GB))  # fmt: skip
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    assert 0 < rank0.peak <= limit and 0 < rank1.peak <= limit < sum(sizes)  # each process's own cache, bounded
    local = launch(str(cached("sd1x")[0] / "cache"), tmp_path / "local")
    assert local.returncode == 0, local.stderr[-3000:]
    for rank in (0, 1):  # the same batches on each process, and the same weights
        logged = [(tmp_path / run / "logs" / f"data-rank{rank}.jsonl").read_text() for run in ("streamed", "local")]
        keys = [[json.loads(x).get("keys") for x in text.splitlines()] for text in logged]
        assert keys[0] == keys[1] and any(keys[0])
    manifests = [json.loads((tmp_path / run / "manifest.json").read_text()) for run in ("streamed", "local")]
    assert final_digests(manifests[0]) == final_digests(manifests[1])
