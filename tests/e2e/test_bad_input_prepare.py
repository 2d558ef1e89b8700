"""`st prepare` on a dataset folder full of traps, run as a user runs it: every trap ends as a skip with its reason
(or, with --strict, exit 2 naming the file), and the dataset folder is byte-identical afterwards.

The corpus is generated here (no committed binaries). Runs that meet FIFOs or symlink loops go through a subprocess
with a timeout, so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.files import make_image, write_config

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
# Root reads every file regardless of its mode: drop the capabilities that let it (the uid stays 0).
_DROP_ROOT_READ = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def tree_state(*folders: Path) -> dict[str, str]:
    """Every entry under `folders`, links not followed: file bytes, link targets, modes and special file kinds."""
    state: dict[str, str] = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(os.fsencode(folder)):
            for name in sorted(dirnames + filenames):
                path = os.path.join(dirpath, name)
                info = os.lstat(path)
                key = os.fsdecode(path)
                if stat.S_ISLNK(info.st_mode):
                    state[key] = f"link -> {os.fsdecode(os.readlink(path))}"
                elif stat.S_ISREG(info.st_mode):
                    with open(path, "rb") as handle:
                        state[key] = f"file {oct(info.st_mode)} {hashlib.sha256(handle.read()).hexdigest()}"
                else:
                    state[key] = f"{stat.S_IFMT(info.st_mode)} {oct(info.st_mode)}"
    return state


def image_with_caption(folder: Path, name: str, colour: tuple[int, int, int], size=(64, 64)) -> None:
    make_image(folder / name, size=size, colour=colour)
    (folder / name).with_suffix(".txt").write_text(f"a picture called {name}\n")


def dataset(tmp_path: Path, **options) -> tuple[Path, Path]:
    """A textfile-captioned dataset of four good 64x64 images; returns (config, images folder)."""
    images = tmp_path / "images"
    for i in range(4):
        image_with_caption(images, f"good_{i}.png", (40 * i, 10, 10))
    config = write_config(tmp_path, [{"id": "d", "instance_data_dir": "images", "caption_strategy": "textfile"}],
                          resolution=64, aspect_bucket_alignment=32, **options)  # fmt: skip
    return config, images


def st(*args: str | Path, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """`st ...` in its own process, killed after TIMEOUT_S (a hang fails the test instead of blocking the suite)."""
    command = [*(prefix or []), sys.executable, "-m", "pipeline.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO)


def skips(out: Path) -> dict[str, tuple[str, str]]:
    lines = (out / "skipped.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["path"]: (r["reason"], r["detail"]) for r in map(json.loads, lines)}


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def sample_paths(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    return sorted(pq.read_table(out / "samples.parquet").column("path").to_pylist())


def add_traps(images: Path, outside: Path) -> dict[str, str]:
    """Every kind of bad entry; returns {path relative to the dataset: expected skip reason}."""
    image_with_caption(images / "sub", "deep.png", (1, 200, 1))
    os.symlink("..", images / "sub" / "loop")  # a loop back to the dataset folder
    os.symlink(".", images / "self_a")  # two self-links: 2^depth paths if followed blindly
    os.symlink(".", images / "self_b")
    os.mkfifo(images / "pipe.png")  # opening it would block forever
    make_image(images / "dangling.png", size=(64, 64), colour=(2, 2, 200))
    os.symlink("no-such-caption.txt", images / "dangling.txt")
    make_image(images / "piped_caption.png", size=(64, 64), colour=(3, 3, 3))
    os.mkfifo(images / "piped_caption.txt")
    with open(os.path.join(os.fsencode(images), b"caf\xe9.png"), "wb") as handle:  # Latin-1 name, not UTF-8
        handle.write((images / "good_0.png").read_bytes())
    image_with_caption(images, "sliver.png", (9, 9, 90), size=(4, 1000))  # aspect rounds to 0.0
    image_with_caption(outside, "secret.png", (7, 7, 7))
    os.symlink(outside, images / "escape")
    os.symlink(outside / "secret.png", images / "escape.png")
    return {
        "sub/loop": "folder_already_scanned",
        "self_a": "folder_already_scanned",
        "self_b": "folder_already_scanned",
        "pipe.png": "special_file",
        "dangling.png": "missing_caption",
        "piped_caption.png": "missing_caption",
        "caf\\xe9.png": "invalid_file_name",
        "sliver.png": "aspect_ratio_out_of_range",
        "escape": "symlink_outside_dataset",
        "escape.png": "symlink_outside_dataset",
    }


def test_every_trap_is_a_skip_with_its_reason_and_nothing_is_touched(tmp_path):
    config, images = dataset(tmp_path)
    outside = tmp_path / "outside"
    expected = add_traps(images, outside)
    before = tree_state(images, outside)

    proc = st("prepare", "-c", config, "-o", tmp_path / "out")

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    found = skips(tmp_path / "out")
    assert {path: reason for path, (reason, _) in found.items()} == expected
    assert "broken_symlink" in found["dangling.png"][1] and "dangling.txt" in found["dangling.png"][1]
    assert "FIFO" in found["piped_caption.png"][1]
    assert str(outside) in found["escape"][1]
    assert sample_paths(tmp_path / "out") == ["good_0.png", "good_1.png", "good_2.png", "good_3.png", "sub/deep.png"]
    counts = manifest(tmp_path / "out")["stats"]["skipped"]
    assert counts == {"aspect_ratio_out_of_range": 1, "folder_already_scanned": 3, "invalid_file_name": 1,
                      "missing_caption": 2, "special_file": 1, "symlink_outside_dataset": 2}  # fmt: skip
    assert "folder_already_scanned 3" in proc.stdout and "special_file 1" in proc.stdout
    assert tree_state(images, outside) == before

    again = st("prepare", "-c", config, "-o", tmp_path / "out")
    assert again.returncode == 0 and "up to date" in again.stdout, again.stderr


def test_strict_exits_2_naming_the_first_bad_file_and_writes_nothing(tmp_path):
    config, images = dataset(tmp_path)
    os.mkfifo(images / "pipe.png")
    before = tree_state(images)

    proc = st("prepare", "-c", config, "-o", tmp_path / "out", "--strict")

    assert proc.returncode == 2, proc.stderr
    assert "d/pipe.png (special_file: a FIFO" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert tree_state(images) == before


def _drop_root_read() -> list[str] | None:
    """The command prefix under which permission bits apply to this user; None when that cannot be arranged."""
    if os.geteuid() != 0:
        return []
    return _DROP_ROOT_READ if shutil.which("setpriv") else None


def test_unreadable_folder_caption_and_image_are_reported_not_dropped(tmp_path):
    prefix = _drop_root_read()
    if prefix is None:
        pytest.skip("running as root without setpriv: every file is readable")
    config, images = dataset(tmp_path)
    image_with_caption(images / "locked", "inside.png", (5, 50, 5))
    image_with_caption(images, "no_caption_access.png", (6, 60, 6))
    image_with_caption(images, "no_access.png", (8, 80, 8))
    before = tree_state(images)
    locked = [images / "locked", images / "no_caption_access.txt", images / "no_access.png"]
    for path in locked:
        path.chmod(0)
    try:
        proc = st("prepare", "-c", config, "-o", tmp_path / "out", prefix=prefix)
    finally:
        for path in locked:
            path.chmod(0o755 if path.is_dir() else 0o644)

    assert proc.returncode == 0, proc.stderr
    found = skips(tmp_path / "out")
    assert found["locked"] == ("unreadable_folder", "cannot list the folder: Permission denied")
    reason, detail = found["no_caption_access.png"]
    assert reason == "missing_caption" and "no_caption_access.txt cannot be read" in detail
    assert found["no_access.png"][0] == "unreadable"
    assert sample_paths(tmp_path / "out") == ["good_0.png", "good_1.png", "good_2.png", "good_3.png"]
    assert tree_state(images) == before


def test_delete_problematic_images_never_reaches_outside_the_dataset(cli, tmp_path):
    config, images = dataset(tmp_path, delete_problematic_images=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "corrupt.jpg").write_bytes(b"not a jpeg, and not st's to delete")
    os.symlink(outside, images / "linked")  # a folder link that leaves the dataset
    (images / "broken.jpg").write_bytes(b"not a jpeg either")
    os.symlink("broken.jpg", images / "alias.jpg")  # a link inside: the link itself is never deleted
    outside_before = tree_state(outside)

    result = cli("prepare", "-c", config, "-o", tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert tree_state(outside) == outside_before
    assert not (images / "broken.jpg").exists()  # the option works on what it may delete
    assert os.path.islink(images / "alias.jpg")
    reasons = {path: reason for path, (reason, _) in skips(tmp_path / "out").items()}
    assert reasons == {"alias.jpg": "not_an_image", "broken.jpg": "not_an_image", "linked": "symlink_outside_dataset"}
    assert manifest(tmp_path / "out")["stats"]["deleted"] == 1


@pytest.mark.parametrize("resolution_type, resolution", [("pixel", 64), ("pixel_area", 64), ("area", 0.01)])
def test_extreme_aspect_ratios_are_skipped_in_every_resolution_type(cli, tmp_path, resolution_type, resolution):
    config, images = dataset(tmp_path)
    image_with_caption(images, "tall.png", (1, 2, 3), size=(4, 1000))
    image_with_caption(images, "wide.png", (3, 2, 1), size=(1000, 4))
    before = tree_state(images)

    result = cli("prepare", "-c", config, "-o", tmp_path / "out", "--set", f'resolution_type="{resolution_type}"',
                 "--set", f"resolution={resolution}")  # fmt: skip

    assert result.exit_code == 0, result.output
    found = skips(tmp_path / "out")
    assert found["tall.png"] == ("aspect_ratio_out_of_range",
                                 "4x1000 has aspect ratio 0.004, outside 1:100 .. 100:1 at aspect_bucket_rounding 2")
    assert found["wide.png"][0] == "aspect_ratio_out_of_range"
    assert len(sample_paths(tmp_path / "out")) == 4
    assert tree_state(images) == before
