"""Bucket arithmetic against SimpleTuner's documented examples and rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.datasets import DatasetSpec
from pipeline.prepare import buckets as b


def spec(**overrides) -> DatasetSpec:
    values = dict(
        id="d", root=Path("/data"), caption_strategy="filename", instance_prompt=None, prepend_instance_prompt=False,
        only_instance_prompt=False, resolution=1024.0, resolution_type="pixel_area", minimum_image_size=None,
        maximum_image_size=None, target_downsample_size=None, minimum_aspect_ratio=None, maximum_aspect_ratio=None,
        crop=False, crop_style="center", crop_aspect="square", crop_aspect_buckets=None, max_upscale_threshold=None,
        repeats=0, probability=1.0,
    )  # fmt: skip
    values.update(overrides)
    return DatasetSpec(**values)


def plan(w, h, **overrides):
    return b.plan(w, h, spec(**overrides), alignment=overrides.pop("alignment", 64), rounding=2, seed=0, sample_id="ab")


def test_align_rounds_to_the_nearest_multiple_and_never_below_one_step():
    assert b.align(10, 64) == 64
    assert b.align(1237.3, 64) == 1216
    assert b.align(1270, 64) == 1280
    assert b.align(96, 64) == 128  # 1.5 rounds half to even: 2


@pytest.mark.parametrize(
    "size, expected",
    [((1000, 1000), (1024, 1024)), ((1460, 1000), (1216, 832)), ((1000, 1460), (832, 1216)),
     ((4000, 4000), (1024, 1024)), ((512, 512), (1024, 1024))],
)  # fmt: skip
def test_pixel_area_documented_examples(size, expected):
    aspect = b.aspect_ratio(*size, 2)
    assert b.bucket_size(aspect, 1024, "pixel_area", 64) == expected


def test_area_in_megapixels_behaves_like_pixel_area():
    assert b.bucket_size(1.0, 1.0, "area", 64) == (1024, 1024)
    assert b.bucket_size(1.46, 1.0, "area", 64) == b.bucket_size(1.46, 1024, "pixel_area", 64)


def test_pixel_mode_short_edge_is_the_resolution():
    # SimpleTuner's documented example before alignment: 1024x1024, 1766x1024, 1024x1766.
    assert b.bucket_size(1.0, 1024, "pixel", 1) == (1024, 1024)
    assert b.bucket_size(1.725, 1024, "pixel", 1) == (1766, 1024)
    assert b.bucket_size(1 / 1.725, 1024, "pixel", 1) == (1024, 1766)
    assert b.bucket_size(1.725, 1024, "pixel", 64) == (1792, 1024)


def test_without_crop_the_image_is_resized_to_its_bucket():
    p = plan(1460, 1000)
    assert (p.target_width, p.target_height) == (1216, 832)
    assert (p.intermediate_width, p.intermediate_height, p.crop_left, p.crop_top) == (1216, 832, 0, 0)
    assert p.bucket == "1216x832"


def test_square_crop_covers_the_target_then_crops_by_style():
    centre = plan(2000, 1000, crop=True, crop_aspect="square", crop_style="center")
    assert (centre.target_width, centre.target_height) == (1024, 1024)
    assert (centre.intermediate_width, centre.intermediate_height) == (2048, 1024)
    assert (centre.crop_left, centre.crop_top) == (512, 0)
    corner = plan(2000, 1000, crop=True, crop_aspect="square", crop_style="corner")
    assert (corner.crop_left, corner.crop_top) == (1024, 0)


def test_random_crop_is_seeded_per_sample_and_stays_inside_the_image():
    s = spec(crop=True, crop_aspect="square", crop_style="random")
    first = b.plan(3000, 1000, s, alignment=64, rounding=2, seed=7, sample_id="aa")
    again = b.plan(3000, 1000, s, alignment=64, rounding=2, seed=7, sample_id="aa")
    assert first == again
    offsets = {b.plan(3000, 1000, s, alignment=64, rounding=2, seed=7, sample_id=f"{i:x}").crop_left for i in range(20)}
    assert len(offsets) > 5
    assert all(0 <= o <= first.intermediate_width - 1024 for o in offsets)


def test_crop_aspect_closest_and_preserve():
    closest = plan(1500, 1000, crop=True, crop_aspect="closest", crop_aspect_buckets=((1.0, 1.0), (1.33, 1.0)))
    assert (closest.target_width, closest.target_height) == b.bucket_size(1.33, 1024, "pixel_area", 64)
    preserve = plan(1500, 1000, crop=True, crop_aspect="preserve")
    assert (preserve.target_width, preserve.target_height) == b.bucket_size(1.5, 1024, "pixel_area", 64)


def test_size_and_aspect_filters_give_reasons():
    with pytest.raises(b.Rejected) as small:
        plan(300, 300, minimum_image_size=512)
    assert small.value.reason == "too_small"
    with pytest.raises(b.Rejected) as wide:
        plan(3000, 1000, maximum_aspect_ratio=2.0)
    assert wide.value.reason == "aspect_ratio_out_of_range"
    with pytest.raises(b.Rejected) as upscale:
        plan(256, 256, max_upscale_threshold=0.2)
    assert upscale.value.reason == "upscale_exceeds_threshold"
    assert plan(1000, 1000, max_upscale_threshold=0.2).bucket == "1024x1024"


def test_minimum_image_size_units_follow_resolution_type():
    with pytest.raises(b.Rejected):
        plan(900, 900, resolution_type="area", resolution=1.0, minimum_image_size=1.0)  # 0.81 MP < 1 MP
    assert plan(1100, 1000, resolution_type="area", resolution=1.0, minimum_image_size=1.0).bucket
    with pytest.raises(b.Rejected):
        plan(2000, 500, resolution_type="pixel", resolution=512, minimum_image_size=512)  # short edge 500


def test_oversized_images_are_downsampled_before_cropping():
    p = plan(4000, 4000, crop=True, crop_aspect="square", crop_style="center", resolution_type="pixel",
             resolution=1024, maximum_image_size=2048, target_downsample_size=1280)  # fmt: skip
    assert (p.intermediate_width, p.intermediate_height) == (1280, 1280)
    assert (p.crop_left, p.crop_top) == (128, 128)
