"""Output-folder ownership and locking (pipeline/ownership.py) on plain files: what a stage may remove or overwrite,
which output paths are refused, and how the lock names its holder or is taken over from a killed run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.ownership import LOCK_NAME, RECORD_NAME, OwnershipError, claim_output, remove_owned

REPO = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from pathlib import Path
from pipeline.ownership import claim_output
with claim_output(Path(sys.argv[1]), "cache"):
    Path(sys.argv[2]).write_text("held")
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
"""


def write(path: Path, text: str = "mine") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_only_recorded_files_are_removed_and_foreign_ones_are_reported_once(tmp_path, caplog):
    out = tmp_path / "out"
    notes = write(out / "shards" / "mine" / "notes.txt")
    with caplog.at_level(logging.WARNING, logger="st"), claim_output(out, "cache") as claim:
        claim.will_write("shards/a/1.tar", "shards/a/2.tar")
        assert json.loads((out / RECORD_NAME).read_text())["paths"] == ["shards/a/1.tar", "shards/a/2.tar"]
        write(out / "shards" / "a" / "1.tar")
        write(out / "shards" / "a" / "2.tar.tmp")  # a partial file of this run
        claim.remove_unlisted(out / "shards", keep=set())
    assert notes.read_text() == "mine"
    assert not (out / "shards" / "a").exists()
    reports = [r.getMessage() for r in caplog.records if "did not write" in r.getMessage()]
    assert reports == [f"{out}: leaving 1 file(s) that st cache did not write untouched: shards/mine/notes.txt"]


def test_a_killed_runs_partial_files_are_known_at_the_next_run(tmp_path):
    out = tmp_path / "out"
    with claim_output(out, "cache") as claim:
        claim.will_write("shards/a/1.tar")
        write(out / "shards" / "a" / "1.tar")
    # The next run plans other shards: the record of the earlier one still says 1.tar is st's.
    with claim_output(out, "cache") as claim:
        claim.will_write("shards/b/1.tar")
        claim.remove_unlisted(out / "shards", keep={"shards/b/1.tar"})
    assert not (out / "shards" / "a" / "1.tar").exists()


def test_a_foreign_file_at_a_planned_path_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    theirs = write(out / "README.md", "their card")
    with claim_output(out, "publish") as claim, pytest.raises(OwnershipError) as err:
        claim.will_write("README.md", "lineage.json")
    assert str(err.value) == (f"{theirs} was not written by st publish, and this run would overwrite it; move it "
                              "away or choose another --output")  # fmt: skip
    assert theirs.read_text() == "their card" and not (out / RECORD_NAME).exists()


def test_files_already_in_a_folder_st_takes_over_stay_foreign(tmp_path):
    out = tmp_path / "out"
    theirs = write(out / "final" / "notes.txt")
    with claim_output(out, "train") as claim:
        claim.will_write(folders=("final",))
        write(out / "final.tmp" / "weights.safetensors", "new")
        claim.install(out / "final.tmp", out / "final")
    assert theirs.read_text() == "mine" and (out / "final" / "weights.safetensors").read_text() == "new"
    with claim_output(out, "train") as claim:
        claim.remove(out / "final")
    assert [p.name for p in (out / "final").iterdir()] == ["notes.txt"]


def test_removal_outside_a_claim_and_of_foreign_checkpoints_does_nothing(tmp_path):
    out = tmp_path / "out"
    theirs = write(out / "checkpoints" / "checkpoint-1" / "weights.safetensors")
    remove_owned(out / "checkpoints" / "checkpoint-1")
    with claim_output(out, "train"):
        remove_owned(out / "checkpoints" / "checkpoint-1")
    assert theirs.exists()


@pytest.mark.parametrize("kind", ["file", "under_a_file", "other_stage", "input", "ancestor"])
def test_unusable_output_paths_are_refused(tmp_path, kind):
    (tmp_path / "prepare").mkdir()
    manifest = write(tmp_path / "prepare" / "manifest.json", json.dumps({"schema": "st.prepare/1"}))
    write(tmp_path / "file", "x")
    out, inputs, message = {
        "file": (tmp_path / "file", [], "is a file, not a folder"),
        "under_a_file": (tmp_path / "file" / "sub", [], "cannot create the output folder"),
        "other_stage": (tmp_path / "prepare", [], "holds the output of st prepare"),
        "input": (tmp_path / "prepare", [manifest], "is an input of st cache"),
        "ancestor": (tmp_path, [tmp_path / "prepare"], "contains an input of st cache"),
    }[kind]
    with pytest.raises(OwnershipError, match=message), claim_output(out, "cache", inputs=inputs):
        pass
    assert (tmp_path / "file").read_text() == "x" and json.loads(manifest.read_text()) == {"schema": "st.prepare/1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "prepare"]


@pytest.mark.parametrize("where", ["same", "ancestor", "inside"])
def test_prepare_output_may_not_overlap_a_dataset_folder(tmp_path, where):
    data = tmp_path / "data" / "images"
    write(data / "a.txt", "a caption")
    out = {"same": data, "ancestor": tmp_path / "data", "inside": data / "prepare"}[where]
    with pytest.raises(OwnershipError, match="dataset folder"), claim_output(out, "prepare", data_roots=[data]):
        pass
    assert sorted(p.name for p in data.iterdir()) == ["a.txt"]


CLAIM = """
import sys
from pathlib import Path
from pipeline.errors import UserError
from pipeline.ownership import claim_output
try:
    with claim_output(Path(sys.argv[1]), sys.argv[2]):
        pass
except UserError as exc:
    print(exc)
    sys.exit(2)
"""


def _permission_prefix() -> list[str] | None:
    """A command prefix under which permission bits apply: root loses the capability to write anywhere (its uid
    stays 0). None when that cannot be arranged."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if shutil.which("setpriv") else None


@pytest.mark.parametrize("stage", ["prepare", "cache", "train", "publish"])
def test_a_read_only_output_is_refused(tmp_path, stage):
    prefix = _permission_prefix()
    if prefix is None:
        pytest.skip("running as root without setpriv: every folder is writable")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", CLAIM, str(out), stage], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)  # fmt: skip
    finally:
        out.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot write to the output folder {out}" in proc.stdout
    assert list(out.iterdir()) == []


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    out, held, done = tmp_path / "out", tmp_path / "held", tmp_path / "done"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(held), str(done)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(held, proc)
        with pytest.raises(OwnershipError) as err, claim_output(out, "cache"):
            pass
        assert f"st cache (pid {proc.pid} on host " in str(err.value)
        assert str(err.value).endswith(f"is writing {out}; wait for it to finish or choose another --output")
    finally:
        done.write_text("")
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()
    assert not (out / LOCK_NAME).exists()  # a clean end leaves no lock file
    with claim_output(out, "cache"):  # and the folder is free again
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    import socket

    holder = {"stage": "train", "host": socket.gethostname(), "pid": gone.pid, "since": "2026-01-01T00:00:00+00:00"}
    (out / LOCK_NAME).write_text(json.dumps(holder))
    with caplog.at_level(logging.WARNING, logger="st"), claim_output(out, "train"):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    expected = (f"{out}: taking over the lock left by st train (pid {gone.pid} on host {holder['host']}, since "
                "2026-01-01T00:00:00+00:00), which no longer runs (it was killed)")  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == [expected]
