"""A Hugging Face video dataset (SimpleTuner's `type: huggingface` + `dataset_type: video`, its `video_column`):
`st prepare`'s remote sync downloads each row's video into the download store under a video name, with the row's
caption, and the video probe reads every clip (frames, frame rate)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.datasets import SOURCE_CAPTIONS, load_dataset_list
from pipeline.ownership import claim_output
from pipeline.prepare.remote import sync_remote
from pipeline.prepare.video_probe import probe_video
from pipeline.prepare.walk import FileStat
from pipeline.sampledata import write_video
from pipeline.sources.spec import HubSource
from tests.helpers.videos import moving_square

FRAMES = 12


@pytest.fixture(scope="module")
def hub_videos(tmp_path_factory) -> Path:
    """A saved `datasets` dataset: two clips in a Video column (one cell naming its file, one bare bytes) and a row
    whose bytes are no video."""
    import datasets  # a dependency of st (type: huggingface)
    folder = tmp_path_factory.mktemp("hub-videos")
    clips = []
    for i, colour in enumerate(((250, 40, 40), (40, 40, 250))):
        path = folder / f"clip{i}.mp4"
        write_video(path, moving_square((64, 48), FRAMES, colour), fps=12)
        clips.append(path.read_bytes())
    features = datasets.Features({"video": datasets.Video(decode=False), "prompt": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"video": [{"bytes": clips[0], "path": "red.mp4"},
                                                  {"bytes": clips[1], "path": None},
                                                  {"bytes": b"plain text, not a video", "path": None}],
                                        "prompt": ["a red square slides", "a blue square slides", "no video"]},
                                       features=features)  # fmt: skip
    table.save_to_disk(str(folder / "saved"))
    return folder / "saved"


def _video_spec(tmp_path: Path, source: HubSource):
    """A video dataset spec as the dataset list gives it, its source the Hugging Face dataset."""
    (tmp_path / "videos").mkdir()
    entry = {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": "videos",
             "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel_area",
             "video": {"num_frames": 8, "min_frames": 8}}  # fmt: skip
    (tmp_path / "list.json").write_text(json.dumps([entry]))
    (tmp_path / "config.json").write_text(json.dumps({"model_family": "wan", "data_backend_config": "list.json"}))
    lists = load_dataset_list(load_config(tmp_path / "config.json"))
    spec = dataclasses.replace(lists.images[0], source=source, caption_strategy="parquet", parquet=SOURCE_CAPTIONS)
    return dataclasses.replace(lists, images=[spec])


def test_each_rows_video_is_downloaded_with_its_caption_and_probes(hub_videos, tmp_path):
    import pyarrow.parquet as pq

    source = HubSource(dataset_name=str(hub_videos), caption_columns=("prompt",))
    lists = _video_spec(tmp_path, source)
    out = tmp_path / "out"
    with claim_output(out, "prepare") as claim:
        synced = sync_remote(claim, lists, out)
    root = synced.lists.images[0].root
    videos = sorted(p.name for p in root.iterdir() if p.is_file())
    # The first row's cell names an .mp4; the second is bare bytes, named by its container's signature.
    assert videos == ["000000.mp4", "000001.mp4"]
    (skip,) = synced.skips["clips"]
    assert skip.reason == "not_a_video" and skip.path.endswith("000002") and "row 2" in skip.detail
    for name in videos:
        info = (root / name).stat()
        probe = probe_video(FileStat(str(root / name), info.st_size, info.st_mtime_ns))
        assert not probe.error and probe.frames == FRAMES and (probe.width, probe.height) == (64, 48)
    captions = pq.read_table(synced.lists.images[0].parquet.path).to_pylist()
    assert {str(row) for row in captions} and any("a red square slides" in str(row) for row in captions)


def test_a_dataset_without_the_video_column_names_the_key(hub_videos, tmp_path):
    from pipeline.errors import InputError
    from pipeline.prepare.video_probe import VIDEO_EXTENSIONS
    from pipeline.sources.hub import list_rows

    source = HubSource(dataset_name=str(hub_videos))
    object.__setattr__(source, "video_column", "clip")  # a column the dataset lacks
    with pytest.raises(InputError, match="no video column 'clip'.*set video_column"):
        list_rows(source, VIDEO_EXTENSIONS, with_captions=False)


def test_st_prepare_buckets_a_hugging_face_video_list(hub_videos, tmp_path, cli):
    """SimpleTuner's spelling (its LTX-Video example's list, pointed at the saved dataset): prepare buckets the
    videos by frames and takes each caption from the prompt column."""
    import pyarrow.parquet as pq

    entry = {"id": "clips", "type": "huggingface", "dataset_type": "video", "dataset_name": str(hub_videos),
             "caption_strategy": "huggingface", "metadata_backend": "huggingface", "resolution": 64,
             "resolution_type": "pixel_area", "crop": False, "video": {"num_frames": 8},
             "huggingface": {"video_column": "video", "caption_column": "prompt"}}  # fmt: skip
    (tmp_path / "list.json").write_text(json.dumps([entry]))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_family": "wan", "data_backend_config": "list.json", "train_batch_size": 1, "learning_rate": 1e-4,
        "resolution": 64, "resolution_type": "pixel_area"}))  # fmt: skip
    result = cli("prepare", "--config", tmp_path / "config.json", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "out" / "samples.parquet").to_pylist()
    assert sorted((r["path"], tuple(r["captions"]), r["bucket"], r["frames"]) for r in rows) == [
        ("000000.mp4", ("a red square slides",), "64x64@8", FRAMES),
        ("000001.mp4", ("a blue square slides",), "64x64@8", FRAMES)]
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [s["reason"] for s in skipped] == ["not_a_video"]
