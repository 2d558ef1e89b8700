"""SimpleTuner's `conditioning` generators (`pipeline.prepare.generators`): what each draws on small synthetic images,
determinism by seed key, and how the generator list is read and refused."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.errors import ConfigError, NotSupportedError
from pipeline.prepare.generators import dataset_id, generate, parse_generators

BACKGROUND = (40, 60, 80)
BOX = (20, 16, 70, 60)  # inclusive corners of the light rectangle


def shapes(width=96, height=80) -> Image.Image:
    """A plain background with a light rectangle and a dark red disc overlapping it."""
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.rectangle(BOX, fill=(230, 220, 200))
    draw.ellipse([50, 30, 90, 75], fill=(120, 10, 10))
    return img


def spec(**entry):
    return parse_generators([entry], "datasets[0]")[0]


def png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def high_frequency_energy(img: Image.Image) -> float:
    grey = np.asarray(img.convert("L")).astype(np.float64)
    laplacian = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float((laplacian**2).mean())


# Drawing ------------------------------------------------------------------------------------------------------------


def test_canny_marks_the_shape_borders_and_nothing_in_flat_areas():
    source = shapes(96, 80)
    edges = np.asarray(generate(spec(type="canny"), source, "a"))
    assert edges.shape == (80, 96, 3) and np.array_equal(edges[..., 0], edges[..., 2])
    on = edges[..., 0] == 255
    assert set(np.unique(edges)) == {0, 255}
    # Every edge pixel lies within 2 px of a colour change of the source; flat regions stay black.
    colours = np.asarray(source).astype(int)
    change = np.zeros(on.shape, bool)
    change[:, 1:] |= np.any(colours[:, 1:] != colours[:, :-1], axis=2)
    change[1:, :] |= np.any(colours[1:] != colours[:-1], axis=2)
    near = np.zeros_like(change)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            near |= np.roll(np.roll(change, dy, 0), dx, 1)
    assert on.sum() > 150 and not (on & ~near).any()
    # The rectangle's left side (x = 20, rows clear of the disc) is found along its length.
    assert on[20:55, 18:23].any(axis=1).all()


def test_canny_is_simpletuners_imageproc_canny():
    """Pinned output for the synthetic image: the grey conversion and imageproc 0.25's canny (blur, Sobel, thinning,
    six-neighbour hysteresis) that SimpleTuner's trainingsample runs, checked once against a transcription of it."""
    edges = generate(spec(type="edges"), shapes(96, 80), "a")
    assert hashlib.sha256(np.asarray(edges).tobytes()).hexdigest() == (
        "884ae1d2a5518221118e4feea6a96d5bd452a74b0ef7f1e2887ef026317ee3d6"
    )
    tighter = generate(spec(type="canny", low_threshold=400, high_threshold=600), shapes(96, 80), "a")
    assert (np.asarray(tighter) > 0).sum() < (np.asarray(edges) > 0).sum()


@pytest.mark.parametrize("key", ["a", "b", "c", "d"])
def test_random_masks_cover_what_was_asked(key):
    """Shapes are added until the coverage target (drawn in [min_coverage, max_coverage]) is reached, so the cover
    is at least min_coverage and overshoots max_coverage by at most one shape."""
    gen = spec(type="random_masks", mask_types=["rectangle"], min_coverage=0.2, max_coverage=0.3, max_masks=60,
               rect_max_size=0.3, edge_blur=False, edge_feather=False)  # fmt: skip
    mask = np.asarray(generate(gen, shapes(160, 128), key))
    assert mask.shape == (128, 160, 3) and set(np.unique(mask)) <= {0, 255}
    cover = (mask[..., 0] > 0).mean()
    assert 0.2 <= cover <= 0.3 + 0.3 * 0.3 + 0.02


def test_masked_image_whitens_only_the_masked_part():
    gen = spec(type="inpainting", output_mode="masked_image", edge_blur=False, edge_feather=False)
    assert gen.conditioning_type == "controlnet"
    source = shapes(160, 128)
    masked = np.asarray(generate(gen, source, "a")).astype(int)
    changed = np.any(masked != np.asarray(source), axis=2)
    assert 0.05 < changed.mean() < 0.9
    assert (masked[changed] == 255).all()


def test_default_masks_are_soft_and_the_same_size():
    mask = generate(spec(type="random_masks"), shapes(160, 128), "a")
    values = np.unique(np.asarray(mask))
    assert mask.size == (160, 128) and len(values) > 10  # feathered edges


def test_superresolution_blurs_and_keeps_the_size():
    source = shapes(96, 80)
    checker = (np.indices((80, 96)).sum(0) // 2 % 2 * 120 + 60).astype(np.uint8)
    source.paste(Image.fromarray(np.stack([checker] * 3, 2)).crop((0, 0, 30, 30)), (60, 5))
    for entry in ({}, {"blur_type": "both", "downscale_factor": 2, "jpeg_quality": 70}, {"blur_type": "box"}):
        low = generate(spec(type="superresolution", **entry), source, "a")
        assert low.size == source.size and low.mode == "RGB"
        assert high_frequency_energy(low) < 0.2 * high_frequency_energy(source)


def test_jpeg_artifacts_differ_from_the_source_by_a_bounded_amount():
    source = shapes(96, 80)
    for entry in ({}, {"quality_mode": "range", "quality_range": [10, 30], "compression_rounds": 2},
                  {"quality_mode": "random", "enhance_blocks": True, "subsampling": "4:2:0"}):  # fmt: skip
        out = np.asarray(generate(spec(type="jpeg_artifacts", **entry), source, "a")).astype(int)
        diff = np.abs(out - np.asarray(source).astype(int))
        assert out.shape == (80, 96, 3) and diff.max() > 0
        assert diff.mean() < 12


def test_sdr_rec709_keeps_8_bit_images_and_logc3_lifts_shadows():
    source = shapes(96, 80)
    assert np.array_equal(np.asarray(generate(spec(type="sdr"), source, "a")), np.asarray(source))
    logc3 = np.asarray(generate(spec(type="logc3_sdr"), source, "a")).astype(int)
    assert logc3[0, 0, 0] > BACKGROUND[0]


@pytest.mark.parametrize("entry", [{"type": "canny"}, {"type": "superresolution"}, {"type": "jpeg"},
                                   {"type": "jpeg", "quality_mode": "range", "add_noise": True},
                                   {"type": "random_masks"}, {"type": "sdr"}])  # fmt: skip
def test_the_same_seed_key_gives_the_same_bytes(entry):
    gen = spec(**entry)
    source = shapes(160, 128)
    assert png(generate(gen, source, "7:sample:ds")) == png(generate(gen, source.copy(), "7:sample:ds"))


def test_another_seed_key_draws_other_masks_and_noise():
    source = shapes(160, 128)
    masks = {png(generate(spec(type="random_masks"), source, f"key{i}")) for i in range(4)}
    assert len(masks) == 4
    noisy = spec(type="superresolution")
    assert png(generate(noisy, source, "x")) != png(generate(noisy, source, "y"))


def test_an_image_too_small_for_the_brush_is_refused_with_the_key():
    with pytest.raises(ConfigError, match="brush_max_width"):
        generate(spec(type="random_masks", mask_types=["brush"]), shapes(60, 60), "a")


# Reading the list ---------------------------------------------------------------------------------------------------


def test_defaults_aliases_and_names_follow_simpletuner():
    canny, masks, low = parse_generators(
        [{"type": "edges"}, {"type": "inpainting"}, {"type": "lowres", "params": {"blur_radius": 1.5}}], "d"
    )
    assert (canny.type, canny.params) == ("canny", {"low_threshold": 50, "high_threshold": 100})
    assert masks.type == "random_masks" and masks.conditioning_type == "mask"
    assert masks.params["mask_types"] == ("rectangle", "circle", "brush", "irregular")
    assert (masks.params["min_coverage"], masks.params["max_coverage"], masks.params["max_masks"]) == (0.1, 0.5, 5)
    assert low.type == "superresolution" and low.params["blur_radius"] == 1.5 and low.params["noise_level"] == 0.02
    assert dataset_id("photos", canny) == "photos_conditioning_edges"
    assert dataset_id("photos", masks) == "photos_conditioning_inpainting"
    jpeg = spec(type="jpeg_artifacts")
    assert (jpeg.params["quality_mode"], jpeg.params["quality"], jpeg.params["quality_range"]) == (
        "fixed",
        25,
        (10, 50),
    )
    described = json.loads(json.dumps(canny.describe()))
    assert described["version"] >= 1 and described["type"] == "canny" and described["conditioning_type"] == "controlnet"
    assert parse_generators({"type": "edges"}, "d") == (canny,)  # one object as SimpleTuner accepts it
    assert spec(type="canny", conditioning_type="reference_strict").conditioning_type == "reference_strict"


def test_params_under_params_win_over_the_top_level():
    gen = spec(type="canny", low_threshold=10, params={"low_threshold": 20})
    assert gen.params["low_threshold"] == 20


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"type": "canny", "low_treshold": 10}, r"unknown key 'low_treshold'.*did you mean 'low_threshold'"),
        ({"type": "canny", "params": {"hi_threshold": 10}}, r"unknown key 'hi_threshold'"),
        ({"type": "canny", "low_threshold": "ten"}, r"datasets\[0\]\.conditioning\[0\]\.low_threshold"),
        ({"type": "canny", "low_threshold": 300, "high_threshold": 200}, r"low_threshold .* must not exceed"),
        ({"type": "cany"}, r"unknown conditioning type 'cany'.*did you mean 'canny'"),
        ({"low_threshold": 1}, r"'type' is required"),
        ({"type": "superresolution", "blur_type": "motion"}, r"blur_type: expected one of"),
        ({"type": "random_masks", "mask_types": ["star"]}, r"mask_types"),
        ({"type": "random_masks", "mask_type_weights": [1, 2]}, r"mask_type_weights"),
        ({"type": "jpeg", "quality_range": [30]}, r"quality_range"),
        ({"type": "canny", "conditioning_type": "depth"}, r"conditioning_type"),
    ],
)
def test_bad_entries_name_the_key(entry, match):
    with pytest.raises(ConfigError, match=match):
        parse_generators([entry], "datasets[0]")


def test_two_generators_of_one_type_are_refused():
    with pytest.raises(ConfigError, match="two generators of type 'canny'"):
        parse_generators([{"type": "canny"}, {"type": "canny", "low_threshold": 20}], "d")


@pytest.mark.parametrize("kind", ["depth", "depth_midas", "segmentation", "optical_flow", "flow"])
def test_generators_that_need_a_model_are_refused(kind):
    with pytest.raises(NotSupportedError, match=rf"'{kind}' needs .*downloads no models.*dataset_type 'conditioning'"):
        parse_generators([{"type": kind}], "d")


def test_captions_are_a_caption_or_a_list_and_false_is_absent():
    assert parse_generators([{"type": "canny", "captions": ["edges of a photo", "edges"]}], "d")[0].captions == (
        "edges of a photo", "edges")
    assert parse_generators([{"type": "canny", "captions": "edges"}], "d")[0].captions == ("edges",)
    assert parse_generators([{"type": "canny", "captions": False}], "d")[0].captions is None
    assert "captions" not in parse_generators([{"type": "canny"}], "d")[0].describe()
    with pytest.raises(ConfigError, match=r"d.conditioning\[0\].captions: expected a caption"):
        parse_generators([{"type": "canny", "captions": [1]}], "d")
    with pytest.raises(NotSupportedError, match="instance_prompt"):
        parse_generators([{"type": "canny", "instance_prompt": "a photo"}], "d")
    with pytest.raises(NotSupportedError, match="instance_data_dir"):
        parse_generators([{"type": "canny", "instance_data_dir": "/data/edges"}], "d")
