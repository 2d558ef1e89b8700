"""`st status` and `st verify` on a real tiny sd1x chain (prepare -> cache -> train -> publish), always on copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.manifest import read_manifest
from pipeline.status import NOT_FOUND, stage_status
from pipeline.verify import verify_paths

STAGES = ["prepare", "cache", "train", "publish"]


@pytest.fixture(scope="module")
def chain(sd1x_run):
    """(config path, run folder with prepare/, cache/, train/, publish/) of one real run (tests/e2e/conftest.py);
    tests copy it."""
    return sd1x_run


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def rows_by_stage(result) -> dict[str, str]:
    """stage -> the rest of its table row, from `st status` output."""
    lines = result.stdout.splitlines()
    return {line.split()[0]: line for line in lines[2:] if line.split() and line.split()[0] in STAGES}


def test_status_of_run_folder_shows_four_ok_rows_with_counts(cli, chain):
    _, run = chain
    result = cli("status", run)
    assert result.exit_code == 0, result.output
    rows = rows_by_stage(result)
    assert list(rows) == STAGES
    prepare = read_manifest(run / "prepare")
    cache = read_manifest(run / "cache")
    for stage, line in rows.items():
        assert "  ok  " in line, line
        assert read_manifest(run / stage)["digest"][:12] in line
    assert f"{prepare['stats']['samples']} samples" in rows["prepare"]
    assert f"{cache['stats']['samples']} samples" in rows["cache"]
    assert "2 steps" in rows["train"]
    assert "1 weight " in rows["publish"]


def test_status_of_one_stage_follows_recorded_paths_to_its_ancestors(chain):
    _, run = chain
    rows = stage_status([run / "publish"])
    assert [r.stage for r in rows] == STAGES
    assert [r.found_by for r in rows] == ["recorded path"] * 3 + ["given"]
    assert all(r.ok for r in rows), [r.message for r in rows]
    assert rows[1].parent.current_digest == rows[1].parent.recorded_digest == rows[0].digest


def test_verify_each_manifest_ok(cli, chain):
    _, run = chain
    result = cli("verify", *(run / s / "manifest.json" for s in STAGES))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("ok  ") for line in lines)
    files = len(read_manifest(run / "cache")["outputs"])
    assert f"{run / 'cache' / 'manifest.json'}  ({files} files, " in result.stdout


def test_verify_names_a_flipped_byte_in_a_cache_shard(cli, chain, tmp_path):
    _, run = chain
    copy = copy_run(run, tmp_path / "run")
    shard = read_manifest(copy / "cache")["shards"][0]["path"]
    data = bytearray((copy / "cache" / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "cache" / shard).write_bytes(bytes(data))
    result = cli("verify", copy / "prepare", copy / "cache")
    assert result.exit_code == 1
    assert f"ok  {copy / 'prepare' / 'manifest.json'}" in result.stdout
    assert f"FAILED  {copy / 'cache' / 'manifest.json'}" in result.stdout
    assert f"sha256 differs: {shard}" in result.stdout
    # status checks sizes only, unless asked to re-hash
    assert stage_status([copy])[1].ok
    row = stage_status([copy], verify=True)[1]
    assert row.state == "damaged" and row.message == f"damaged: {shard} sha256 differs"


def test_missing_and_resized_outputs_are_damaged(cli, chain, tmp_path):
    _, run = chain
    copy = copy_run(run, tmp_path / "run")
    (copy / "train" / "metrics.jsonl").unlink()
    with open(copy / "publish" / "README.md", "a") as handle:
        handle.write("edited\n")
    rows = rows_by_stage(cli("status", copy))
    assert "damaged: metrics.jsonl missing" in rows["train"]
    assert "damaged: README.md size differs" in rows["publish"]
    result = cli("verify", copy)
    assert result.exit_code == 1
    assert "missing: metrics.jsonl" in result.stdout and "size differs: README.md" in result.stdout


def test_rerun_prepare_makes_cache_stale(cli, chain, tmp_path):
    cfg, run = chain
    copy = copy_run(run, tmp_path / "run")
    before = read_manifest(copy / "prepare")["digest"]
    rerun = cli("prepare", "-c", cfg, "-o", copy / "prepare", "--set", "resolution=64")
    assert rerun.exit_code == 0, rerun.output
    after = read_manifest(copy / "prepare")["digest"]
    assert after != before
    result = cli("status", copy)
    assert result.exit_code == 0
    rows = rows_by_stage(result)
    assert f"stale: prepare changed (recorded {before[:8]}.. now {after[:8]}..); re-run `st cache`" in rows["cache"]
    assert "  ok  " in rows["prepare"] and "  ok  " in rows["train"] and "  ok  " in rows["publish"]
    assert "re-run the stages after it too (train, publish)" in result.stdout


def test_cache_copied_without_its_prepare(cli, chain, tmp_path):
    _, run = chain
    # Copied alone on this machine: the prepare it recorded is still where it was read from.
    shutil.copytree(run / "cache", tmp_path / "here" / "cache")
    rows = stage_status([tmp_path / "here" / "cache"])
    assert [(r.stage, r.found_by, r.state) for r in rows] == [("prepare", "recorded path", "ok"),
                                                              ("cache", "given", "ok")]  # fmt: skip
    # As if from another machine: the recorded path leads nowhere (provenance is outside the digest).
    elsewhere = tmp_path / "elsewhere" / "cache"
    shutil.copytree(run / "cache", elsewhere)
    doc = json.loads((elsewhere / "manifest.json").read_text())
    doc["provenance"]["parent_path"] = "/nonexistent/machine-b/prepare/manifest.json"
    (elsewhere / "manifest.json").write_text(json.dumps(doc))
    result = cli("status", elsewhere)
    assert result.exit_code == 0
    rows = rows_by_stage(result)
    assert list(rows) == ["cache"] and NOT_FOUND in rows["cache"]


def test_status_json_parses(cli, chain):
    _, run = chain
    result = cli("status", "--json", "--verify", run)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert [s["stage"] for s in data["stages"]] == STAGES
    assert all(s["state"] == "ok" and s["problems"] == [] for s in data["stages"])
    train = data["stages"][2]
    assert train["count"] == 2 and train["count_unit"] == "steps"
    assert train["parent"]["recorded_digest"] == data["stages"][1]["digest"]


def test_edited_manifest_is_invalid(cli, chain, tmp_path):
    _, run = chain
    copy = copy_run(run, tmp_path / "run")
    doc = json.loads((copy / "train" / "manifest.json").read_text())
    doc["metrics"]["steps"] = 200
    (copy / "train" / "manifest.json").write_text(json.dumps(doc))
    rows = rows_by_stage(cli("status", copy))
    assert "invalid:" in rows["train"] and "edited after it was written" in rows["train"]
    assert "parent train unreadable" in rows["publish"]
    [result] = verify_paths([copy / "train"])
    assert not result.ok and "edited after it was written" in result.error
    assert cli("verify", copy / "train").exit_code == 1


def test_paths_that_are_not_manifests_exit_2(cli, chain, tmp_path):
    cfg, run = chain
    for path in (cfg, tmp_path, tmp_path / "nope"):
        for command in ("verify", "status"):
            result = cli(command, path)
            assert result.exit_code == 2, (command, path, result.output)
            assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    # nothing is hashed before every path is known to be a manifest
    result = cli("verify", run / "cache", cfg)
    assert result.exit_code == 2 and result.stdout == ""
    assert "is not an st manifest" in result.stderr
