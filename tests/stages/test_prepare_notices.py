"""Warnings `st prepare` gives before a user spends GPU hours: many images skipped, images stretched to a bucket."""

from __future__ import annotations

from pipeline.config import load_config
from pipeline.prepare.stage import run_prepare
from tests.helpers.files import make_image, write_config


def _dataset(tmp_path, sizes, captioned, crop=False):
    data = tmp_path / "data"
    for i, size in enumerate(sizes):
        make_image(data / f"img_{i}.jpg", size=size, colour=(10 * i, 100, 200))
        if i < captioned:
            (data / f"img_{i}.txt").write_text(f"caption {i}\n")
    return write_config(tmp_path, [{"id": "main", "instance_data_dir": "data", "caption_strategy": "textfile",
                                    "crop": crop}], resolution=128, aspect_bucket_alignment=32)  # fmt: skip


def test_more_than_a_tenth_skipped_is_a_warning_naming_the_reasons(tmp_path, st_log):
    config = _dataset(tmp_path, [(128, 128)] * 12, captioned=10)
    records = st_log("prepare")
    run_prepare(load_config(config), tmp_path / "out")
    warnings = [r.getMessage() for r in records if r.levelname == "WARNING"]
    assert "dataset 'main': 2 of 12 images skipped (missing_caption 2); see skipped.jsonl" in warnings


def test_one_in_twelve_skipped_is_not_worth_a_warning(tmp_path, st_log):
    config = _dataset(tmp_path, [(128, 128)] * 12, captioned=11)
    records = st_log("prepare")
    run_prepare(load_config(config), tmp_path / "out")
    assert not [r for r in records if r.levelname == "WARNING"]


def test_stretched_images_are_named_by_bucket_unless_cropped(tmp_path, st_log):
    # 150x128 (aspect 1.17) lands in the square 128x128 bucket at this resolution and alignment: its aspect ratio
    # changes by 1.17 / 1 - 1 = 17%; 140x128 by 9%; the square images not at all.
    sizes = [(150, 128), (140, 128), (128, 128), (128, 128)]
    config = _dataset(tmp_path, sizes, captioned=4)
    records = st_log("prepare")
    run_prepare(load_config(config), tmp_path / "out")
    marker = "stretched to their bucket's aspect ratio"
    stretched = [r.getMessage() for r in records if marker in r.getMessage()]
    assert stretched == ["dataset 'main': crop is false, so images are stretched to their bucket's aspect ratio: "
                         "128x128 (up to 17%); set crop = true to crop instead"]  # fmt: skip
    cropped = _dataset(tmp_path / "cropped", sizes, captioned=4, crop=True)
    run_prepare(load_config(cropped), tmp_path / "cropped" / "out")
    assert len([r for r in records if marker in r.getMessage()]) == 1  # nothing new for the cropped dataset
