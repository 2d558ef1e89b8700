"""The four stages through the CLI: they touch only files st wrote, refuse output folders they must not write (exit 2
naming the folder, nothing changed), and one run at a time holds an output folder."""

from __future__ import annotations

import hashlib
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
from pipeline.ownership import LOCK_NAME, claim_output
from pipeline.prepare.stage import run_prepare
from pipeline.sampledata import write_sample_dataset
from pipeline.train.stage import run_train

QUICK = ["max_train_steps=2", "train_batch_size=1", "validation_disable=true", "disable_benchmark=true",
         'report_to="none"', "eval_steps_interval=0", "checkpoint_step_interval=0"]  # fmt: skip
SETS = [arg for value in QUICK for arg in ("--set", value)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model) -> Path:
    """data/ (4 images + config.json), prepare/, cache/ and train/ of one tiny sd1x run."""
    root = tmp_path_factory.mktemp("ownership")
    config = write_sample_dataset(root / "data", images=4, family="sd1x", model=tiny_model("sd1x"), resolution=64)
    loaded = load_config(config)
    run_prepare(loaded, root / "prepare")
    run_cache(loaded, root / "prepare", root / "cache")
    run_train(load_config(config, QUICK), root / "cache", root / "train")
    return root


def digest_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def stage_args(chain: Path, stage: str, source: Path, out: Path) -> list:
    config = chain / "data" / "config.json"
    if stage == "prepare":
        return ["prepare", "-c", config, "-o", out]
    return [stage, "-c", config, "-i", source, "-o", out, *(SETS if stage == "train" else [])]


PARENT = {"cache": "prepare", "train": "cache", "publish": "train"}


# ---------------------------------------------------------------------------------------------- foreign files


def test_cache_keeps_foreign_files_under_shards_and_removes_only_its_own_stale_shards(chain, cli, tmp_path):
    out = tmp_path / "cache"
    notes = out / "shards" / "mine" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_bytes(b"my notes\n")
    first = cli("cache", "-c", chain / "data" / "config.json", "-i", chain / "prepare", "-o", out)
    assert first.exit_code == 0, first.output
    assert "leaving 1 file(s) that st cache did not write untouched: shards/mine/notes.txt" in first.stderr
    old_shards = {p for p in (out / "shards").rglob("*.tar")}
    # Another compression level names other shards: the earlier ones are st's, and stale.
    second = cli("cache", "-c", chain / "data" / "config.json", "-i", chain / "prepare", "-o", out,
                 "--set", "cache_compression_level=1")  # fmt: skip
    assert second.exit_code == 0, second.output
    new_shards = {p for p in (out / "shards").rglob("*.tar")}
    assert new_shards and not (old_shards & new_shards)
    listed = {o["path"] for o in json.loads((out / "manifest.json").read_text())["outputs"]}
    assert {p.relative_to(out).as_posix() for p in new_shards} <= listed
    assert notes.read_bytes() == b"my notes\n"


def test_a_fresh_train_keeps_files_it_did_not_write_in_final_and_validation(chain, cli, tmp_path):
    out = tmp_path / "train"
    theirs = {out / "final" / "notes.txt": b"my final notes", out / "validation" / "mine.png": b"not an st image"}
    for path, data in theirs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    first = cli(*stage_args(chain, "train", chain / "cache", out), "--set", "validation_disable=false",
                "--set", "validation_num_inference_steps=1", "--set", "validation_resolution='64'")  # fmt: skip
    assert first.exit_code == 0, first.output
    ours = sorted((out / "validation").rglob("*.png"))
    assert len(ours) > 1 and (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not {"final/notes.txt", "validation/mine.png"} & {o["path"] for o in manifest["outputs"]}
    # A fresh run (another learning rate, no validation) removes the earlier run's images and weights only.
    second = cli(*stage_args(chain, "train", chain / "cache", out), "--set", "learning_rate=2e-3")
    assert second.exit_code == 0, second.output
    assert sorted((out / "validation").rglob("*.png")) == [out / "validation" / "mine.png"]
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert all(path.read_bytes() == data for path, data in theirs.items())


def test_checkpoint_rotation_keeps_checkpoint_folders_st_did_not_write(chain, cli, tmp_path):
    out = tmp_path / "train"
    copied = out / "checkpoints" / "checkpoint-0"
    copied.mkdir(parents=True)
    (copied / "manifest.json").write_text('{"schema": "st.checkpoint/1", "files": []}')
    result = cli(*stage_args(chain, "train", chain / "cache", out), "--set", "max_train_steps=3",
                 "--set", "checkpoint_step_interval=1", "--set", "checkpoints_total_limit=1")  # fmt: skip
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-0", "checkpoint-3"]
    assert (copied / "manifest.json").read_text() == '{"schema": "st.checkpoint/1", "files": []}'


def test_publish_refuses_to_overwrite_a_file_it_did_not_write(chain, cli, tmp_path):
    out = tmp_path / "publish"
    out.mkdir()
    (out / "README.md").write_text("my own model card")
    result = cli(*stage_args(chain, "publish", chain / "train", out))
    refused(result, f"{out / 'README.md'} was not written by st publish, and this run would overwrite it")
    assert (out / "README.md").read_text() == "my own model card"
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]


# ------------------------------------------------------------------------------------------ refused outputs


@pytest.mark.parametrize("stage", ["cache", "train", "publish"])
def test_input_and_output_naming_the_same_folder_is_refused(chain, cli, stage):
    parent = chain / PARENT[stage]
    before = digest_tree(parent)
    result = cli(*stage_args(chain, stage, parent, parent))
    refused(result, f"--output {parent} is an input of st {stage}")
    assert digest_tree(parent) == before


@pytest.mark.parametrize("stage", ["cache", "train", "publish"])
def test_an_output_that_contains_the_input_is_refused(chain, cli, tmp_path, stage):
    parent = tmp_path / "run" / PARENT[stage]
    shutil.copytree(chain / PARENT[stage], parent)
    before = digest_tree(tmp_path / "run")
    result = cli(*stage_args(chain, stage, parent, tmp_path / "run"))
    refused(result, f"--output {tmp_path / 'run'} contains an input of st {stage}")
    assert digest_tree(tmp_path / "run") == before


def test_merging_parts_into_one_of_the_parts_is_refused(chain, cli, tmp_path):
    config, part = chain / "data" / "config.json", tmp_path / "part0"
    written = cli("cache", "-c", config, "-i", chain / "prepare", "-o", part, "--part", "0/2")
    assert written.exit_code == 0, written.output
    before = digest_tree(part)
    result = cli("cache", "merge", part, tmp_path / "part1", "-c", config, "-i", chain / "prepare", "-o", part)
    refused(result, f"--output {part} is an input of st cache ({part})")
    assert digest_tree(part) == before


def test_an_output_holding_another_stage_is_refused(chain, cli):
    before = digest_tree(chain / "prepare")
    result = cli(*stage_args(chain, "train", chain / "cache", chain / "prepare"))
    refused(result, f"{chain / 'prepare'} holds the output of st prepare")
    assert digest_tree(chain / "prepare") == before


@pytest.mark.parametrize("stage", ["prepare", "cache", "train", "publish"])
def test_an_output_path_that_is_a_file_is_refused(chain, cli, tmp_path, stage):
    path = tmp_path / "out"
    path.write_bytes(b"a file of mine")
    source = chain / PARENT.get(stage, "data")
    refused(cli(*stage_args(chain, stage, source, path)), f"--output {path} is a file, not a folder")
    refused(cli(*stage_args(chain, stage, source, path / "sub")), f"cannot create the output folder {path / 'sub'}")
    assert path.read_bytes() == b"a file of mine"


def test_prepare_output_inside_the_dataset_folder_is_refused(chain, cli):
    images = chain / "data" / "images"
    before = digest_tree(chain / "data")
    result = cli("prepare", "-c", chain / "data" / "config.json", "-o", images / "prepare")
    refused(result, f"--output {images / 'prepare'} is inside the dataset folder {images}")
    assert digest_tree(chain / "data") == before and not (images / "prepare").exists()


# ------------------------------------------------------------------------------------------------- locking


@pytest.mark.parametrize("stage", ["cache", "train"])
def test_a_second_run_into_a_busy_folder_exits_2_naming_the_holder(chain, cli, tmp_path, stage):
    out = tmp_path / "out"
    out.mkdir()
    with claim_output(out, stage):
        result = cli(*stage_args(chain, stage, chain / PARENT[stage], out))
    refused(result, f"st {stage} (pid {os.getpid()} on host {socket.gethostname()}, since ",
            f"is writing {out}; wait for it to finish or choose another --output")  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_lock_left_by_a_killed_run_is_taken_over(chain, cli, tmp_path):
    out = tmp_path / "prepare"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    holder = {"stage": "prepare", "host": socket.gethostname(), "pid": gone.pid, "since": "2026-01-01T00:00:00+00:00"}
    (out / LOCK_NAME).write_text(json.dumps(holder))
    result = cli("prepare", "-c", chain / "data" / "config.json", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"taking over the lock left by st prepare (pid {gone.pid} on host" in result.stderr
    assert (out / "manifest.json").is_file() and not (out / LOCK_NAME).exists()
