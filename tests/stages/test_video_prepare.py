"""`st prepare` on video datasets: generated clips (`st sample-data --video`) probed through PyAV, bucketed by
(width, height, frames), bad clips skipped with their reasons, and `st cache` refusing the output when no video
model family is set."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.datasets import load_dataset_list
from pipeline.errors import ConfigError, NotSupportedError
from pipeline.manifest import read_manifest
from pipeline.prepare.buckets import Rejected
from pipeline.prepare.scan import Probe
from pipeline.prepare.stage import run_prepare
from pipeline.prepare.video_buckets import frame_window
from pipeline.video_settings import parse_video_block


SIMPLETUNER = Path("/tmp/simpletuner-src")


def st(*args) -> object:
    """The `st` command in-process: the click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _dataset_list(config: Path) -> list[dict]:
    return json.loads((config.parent / "multidatabackend.json").read_text())


def _with_video_block(config: Path, **block) -> None:
    entries = _dataset_list(config)
    entries[0]["video"] = block
    (config.parent / "multidatabackend.json").write_text(json.dumps(entries))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """`st sample-data --video`: six 16-frame clips (four 64x64, two 128x64), one of 4 frames, one cut short."""
    root = tmp_path_factory.mktemp("clips")
    done = st("sample-data", root / "data", "--video")
    assert done.exit_code == 0, done.output
    return root / "data" / "config.json"


@pytest.fixture(scope="module")
def prepared(clips) -> tuple[Path, Path, dict[str, str]]:
    before = _digest(clips.parent / "videos")
    out = clips.parent / "out"
    run_prepare(load_config(clips), out)
    return clips, out, before


def test_clips_prepare_into_frame_buckets_with_their_facts(prepared):
    config, out, before = prepared
    manifest = read_manifest(out)  # schema-checked
    assert manifest["buckets"] == {"64x64@8": 4, "96x32@8": 2}
    (dataset,) = manifest["datasets"]
    assert dataset["dataset_type"] == "video"
    assert dataset["video"] == {"num_frames": 8, "min_frames": 8, "max_frames": None, "is_i2v": False,
                                "bucket_strategy": "aspect_ratio", "frame_interval": None}  # fmt: skip
    rows = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(rows) == 6
    for row in rows:
        assert (row["frames"], row["fps"], row["window_start"], row["window_frames"]) == (16, 12.0, 0, 8)
        assert row["duration"] == pytest.approx(16 / 12, abs=0.01)
        assert row["format"] == "video/h264" and row["captions"][0].startswith("a ")
        data = (config.parent / "videos" / row["path"]).read_bytes()
        assert row["sample_id"] == hashlib.sha256(data).hexdigest()  # content-addressed by the file's bytes
    assert _digest(config.parent / "videos") == before  # the user's files are never modified


def test_short_and_truncated_clips_are_skipped_with_their_reasons(prepared):
    _, out, _ = prepared
    skipped = {json.loads(line)["path"]: json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()}
    reasons = {re.sub(r"_\d+.*", "", path): (k["reason"], k["detail"]) for path, k in skipped.items()}
    assert reasons["short"] == ("too_few_frames", "4 frames, under video.min_frames 8")
    reason, detail = reasons["truncated"]
    assert reason == "truncated_video" and "header states 16 frames" in detail


def test_a_rerun_is_up_to_date_and_st_cache_refuses_video(prepared):
    config, out, _ = prepared
    assert run_prepare(load_config(config), out).up_to_date
    done = st("cache", "-c", config, "-i", out, "-o", out.parent / "cache")
    assert done.exit_code == 2
    assert "video dataset(s) 'clips'" in done.stderr and "model_family is not set" in done.stderr
    assert not (out.parent / "cache").exists()


def test_resolution_frames_buckets_by_frame_count_rounded_to_frame_interval(clips, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(clips.parent, root, ignore=shutil.ignore_patterns("out", "cache"))
    _with_video_block(root / "config.json", num_frames=8, min_frames=8, bucket_strategy="resolution_frames",
                      frame_interval=5, is_i2v=True)  # fmt: skip
    before = _digest(root / "videos")
    deleting = ["delete_problematic_images=true", "delete_unwanted_images=true"]
    manifest = run_prepare(load_config(root / "config.json", deleting), tmp_path / "out").manifest
    assert _digest(root / "videos") == before  # skipped videos are never deleted, whatever the delete options say
    assert manifest["buckets"] == {"64x64@15": 4, "96x32@15": 2}
    assert manifest["datasets"][0]["video"]["is_i2v"] is True
    rows = pq.read_table(tmp_path / "out" / "samples.parquet").to_pylist()
    assert {r["window_frames"] for r in rows} == {8}  # a sample still takes the first num_frames frames


def test_frame_limits():
    settings = parse_video_block({"num_frames": 8, "max_frames": 12}, "here")
    probe = Probe("v.mp4", 1, 1, "0" * 64, 64, 64, frames=16, fps=24.0, duration=16 / 24)
    with pytest.raises(Rejected) as caught:
        frame_window(settings, probe)
    assert caught.value.reason == "too_many_frames" and "video.max_frames 12" in caught.value.detail
    window = frame_window(parse_video_block({"num_frames": 8}, "here"), probe)
    assert (window.window_start, window.window_frames, window.frames) == (0, 8, 16)


def test_video_block_defaults_as_simpletuner():
    settings = parse_video_block(None, "here", framerate=24)
    assert (settings.num_frames, settings.min_frames, settings.max_frames, settings.is_i2v) == (120, 120, None, False)
    assert parse_video_block({}, "here").num_frames == 150  # framerate 30 unless set
    # unset, SimpleTuner's check_user_config sets the family's rate before the datasets read it: Wan 15, LTX-Video 25
    assert parse_video_block({}, "here", model_family="wan").num_frames == 75
    assert parse_video_block({}, "here", model_family="ltxvideo").num_frames == 125
    assert parse_video_block({}, "here", framerate=8, model_family="wan").num_frames == 40
    assert parse_video_block({}, "here", model_family="ltxvideo").is_i2v
    assert parse_video_block({"is_i2v": False}, "here", model_family="wan", model_flavour="i2v-14b-2.1").is_i2v


def _video_list(root: Path, videos: Path, block, **options) -> Path:
    root.mkdir()
    (root / "multidatabackend.json").write_text(json.dumps(
        [{"id": "clips", "dataset_type": "video", "instance_data_dir": str(videos), "video": block}]))
    (root / "config.json").write_text(json.dumps({"data_backend_config": "multidatabackend.json", **options}))
    return root / "config.json"


def test_framerate_sets_the_default_num_frames(clips, tmp_path):
    config = _video_list(tmp_path / "data", clips.parent / "videos", {"is_i2v": True}, framerate=4)
    (spec,) = load_dataset_list(load_config(config)).images
    assert (spec.video.num_frames, spec.video.min_frames, spec.video.is_i2v) == (20, 20, True)


@pytest.mark.parametrize(
    ("block", "names"),
    [
        ({"num_frame": 8}, "unknown video key 'num_frame'"),
        ({"num_frames": 0}, "video.num_frames"),
        ({"num_frames": 8.5}, "video.num_frames"),
        ({"num_frames": 9, "min_frames": 8}, "video.min_frames (8) is below video.num_frames (9)"),
        ({"num_frames": 8, "max_frames": 4}, "video.max_frames (4) is below video.min_frames (8)"),
        ({"bucket_strategy": "frames"}, "video.bucket_strategy 'frames'"),
        ({"frame_interval": -1}, "video.frame_interval"),
        ({"is_i2v": "yes"}, "video.is_i2v"),
        ([8], "'video' must be an object"),
    ],
)
def test_bad_video_blocks_name_their_key(clips, tmp_path, block, names):
    config = _video_list(tmp_path / "data", clips.parent / "videos", block)
    with pytest.raises(ConfigError, match=re.escape(names)):
        load_dataset_list(load_config(config))


def _documented_video_lists() -> list[list[dict]]:
    """The video dataset lists of SimpleTuner's DATALOADER documentation."""
    text = (SIMPLETUNER / "documentation" / "DATALOADER.md").read_text()
    found = []
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.S):
        if '"dataset_type": "video"' in block:
            data = json.loads(block)
            found.append(data if isinstance(data, list) else [data])
    return found


def _with_folders(folder: Path, entries: list[dict]) -> Path:
    """`entries` as folder/list.json, their local folders created, and a config naming the list; the config's path."""
    for entry in entries:
        if "instance_data_dir" in entry:
            (folder / entry["instance_data_dir"]).mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "list.json").write_text(json.dumps(entries))
    (folder / "config.json").write_text(json.dumps({"data_backend_config": "list.json"}))
    return folder / "config.json"


@pytest.mark.skipif(not SIMPLETUNER.is_dir(), reason="SimpleTuner's documentation is not extracted here")
def test_simpletuners_video_lists_load_or_are_refused_clearly(tmp_path):
    loaded = 0
    for i, entries in enumerate(_documented_video_lists()):
        config = _with_folders(tmp_path / f"doc{i}", entries)
        if any("audio" in entry for entry in entries):
            with pytest.raises(ConfigError, match="`audio`"):
                load_dataset_list(load_config(config))
            continue
        if "num_frames" not in entries[0]["video"]:
            # num_frames defaults to framerate * 5 = 150, above this example's min_frames: SimpleTuner refuses it too
            with pytest.raises(ConfigError, match=re.escape("video.min_frames (25) is below video.num_frames (150)")):
                load_dataset_list(load_config(config))
            continue
        (video,) = load_dataset_list(load_config(config)).images
        assert video.dataset_type == "video" and video.video.min_frames >= video.video.num_frames
        loaded += 1
    assert loaded == 1
    examples = sorted((SIMPLETUNER / "simpletuner" / "examples").rglob("*.json"))
    video_lists = [p for p in examples if '"dataset_type": "video"' in p.read_text()]
    assert len(video_lists) >= 10
    hub_lists = 0
    for path in video_lists:
        config = _with_folders(tmp_path / path.stem, json.loads(path.read_text()))
        try:
            datasets = load_dataset_list(load_config(config)).images
        except (ConfigError, NotSupportedError) as exc:
            # audio blocks are a feature st lacks (ids with dots and max_num_samples load: LTX-2's examples)
            assert re.search(r"`audio`", str(exc)), (path, str(exc))
            continue
        # the lists that load are Hugging Face video datasets (SimpleTuner's Wan / LTX-Video examples)
        assert any(d.dataset_type == "video" and getattr(d.source, "kind", None) == "huggingface" for d in datasets), path
        hub_lists += 1
    assert hub_lists >= 1
