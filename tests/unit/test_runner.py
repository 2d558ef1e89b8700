"""The stage runner: key first, then stat, then hashes; damaged outputs are found; reasons are explained."""

from __future__ import annotations

import os

import pytest

from pipeline import filecheck
from pipeline.manifest import output_entry, provenance
from pipeline.runner import StageRun, damaged_outputs


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("ST_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.fixture
def hashes(monkeypatch):
    """Paths sha256-hashed by the file check (instrumented, not replaced)."""
    seen = []
    real = filecheck.sha256_file

    def counting(path):
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(filecheck, "sha256_file", counting)
    return seen


def _run(out, key="1"*64, config=None, force=False):
    return StageRun("prepare", 1, out, key, config if config is not None else {"resolution": 512}, force=force)


def _write(out, key="1"*64, config=None):
    out.mkdir(exist_ok=True)
    (out / "samples.parquet").write_bytes(b"rows" * 100)
    (out / "skipped.jsonl").write_text("")
    run = _run(out, key, config)
    doc = {"schema": "st.prepare/1", "stage": "prepare", "key": key, "parent": None, "config": run.config,
           "datasets": [{"id": "d", "root": str(out), "caption_strategy": "filename", "files": 0, "samples": 0,
                         "skipped": 0, "repeats": 0, "probability": 1.0, "buckets": {}}], "buckets": {}, "stats": {"files": 0, "samples": 0, "skipped": {}, "deleted": 0,
                                                    "batch_size": 1},
           "outputs": [output_entry(out, out / "samples.parquet"), output_entry(out, out / "skipped.jsonl")],
           "provenance": provenance(0.0, 1.0)}  # fmt: skip
    return run.write_manifest(doc)


def test_up_to_date_output_is_checked_by_stat_without_hashing(tmp_path, hashes, state):
    out = tmp_path / "out"
    _write(out)
    assert list(state.iterdir()), "the stat record lives in the state folder"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "samples.parquet", "skipped.jsonl"]
    assert _run(out).up_to_date
    assert hashes == []


def test_a_different_key_reads_no_output(tmp_path, hashes, state):
    out = tmp_path / "out"
    _write(out)
    for child in state.iterdir():
        child.unlink()  # no stat record: a same-key check would hash everything
    run = _run(out, key="2"*64, config={"resolution": 1024})
    assert not run.up_to_date and hashes == []
    assert run.reasons() == ["config key resolution changed: 512 -> 1024"]


def test_same_size_edit_with_restored_mtime_is_found(tmp_path, hashes):
    out = tmp_path / "out"
    _write(out)
    target = out / "samples.parquet"
    before = target.stat()
    target.write_bytes(b"ROWS" * 100)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    run = _run(out)
    assert not run.up_to_date
    assert run.reasons() == ["the previous output is damaged: samples.parquet was modified"]
    assert hashes == ["samples.parquet"]


def test_missing_output_and_force(tmp_path):
    out = tmp_path / "out"
    _write(out)
    (out / "skipped.jsonl").unlink()
    assert damaged_outputs(out, _run(out).previous.manifest) == {"skipped.jsonl": "is missing"}
    _write(out)
    assert _run(out, force=True).reasons() == ["--force was given"]


def test_without_a_record_outputs_are_hashed_once_then_statted(tmp_path, hashes, state):
    out = tmp_path / "out"
    _write(out)
    for child in state.iterdir():
        child.unlink()
    assert _run(out).up_to_date and sorted(hashes) == ["samples.parquet", "skipped.jsonl"]
    hashes.clear()
    assert _run(out).up_to_date and hashes == []


def test_check_file_phrases():
    mismatch = filecheck.FileMismatch(filecheck.Path("x"), filecheck.SIZE, 12, 10)
    assert mismatch.describe() == "has 12 bytes, not the 10 recorded"
