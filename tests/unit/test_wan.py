"""Wan specifics: refused model folders, tokenizer_max_length as SimpleTuner treats it, block swap over `blocks`, and
the validation video writer (frame counts, MP4, frame grid)."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.families import get_family, load_components
from pipeline.train import validation_video
from tests.helpers.wan import pipeline_calls, prompt_inputs


@pytest.mark.parametrize(("change", "named"), [
    ({"_class_name": "WanImageToVideoPipeline", "transformer_2": ["diffusers", "WanTransformer3DModel"]},
     "two transformers .* set model_flavour to i2v-14b-2.2-high"),
    ({"transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875},
     "two transformers .* set model_flavour to animegen-t2v-high"),
])  # fmt: skip
def test_a_model_folder_st_cannot_train_is_refused_by_name(tmp_path, tiny_model, change, named):
    index = json.loads((tiny_model("wan") / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, **change}))
    with pytest.raises(ConfigError, match=named):
        get_family("wan").for_run(None, str(tmp_path))
    assert get_family("wan").for_run(None, str(tiny_model("wan"))) is get_family("wan")


def test_tokenizer_max_length_is_ignored_as_in_simpletuner(tiny_model, st_log):
    family = get_family("wan")
    loaded = load_components(family, tiny_model("wan"), which=("text_encoders",))
    records = st_log("families")
    short = family.encode_prompts(loaded["text_encoders"], loaded["tokenizers"], ["a cat"], max_length=64)
    plain = family.encode_prompts(loaded["text_encoders"], loaded["tokenizers"], ["a cat"])
    assert short[0]["attention_mask"].shape == plain[0]["attention_mask"].shape == (512,)
    assert any("tokenizer_max_length 64 is ignored" in r.getMessage() for r in records)


def test_block_swap_finds_wans_blocks(tiny_model):
    from pipeline.train.block_swap import transformer_blocks

    denoiser = load_components(get_family("wan"), tiny_model("wan"), which=("denoiser",))["denoiser"]
    assert transformer_blocks(denoiser, "wan") == list(denoiser.blocks)


@pytest.mark.parametrize(("requested", "expected"), [(None, 81), (9, 9), (10, 9), (8, 5), (1, 1), (200, 81)])
def test_validation_frames_round_to_what_the_vae_decodes(requested, expected):
    assert validation_video.frame_count(requested, 4) == expected


def test_mp4_and_frame_grid_hold_every_frame(tmp_path):
    import av

    rng = np.random.default_rng(0)
    video = np.zeros((5, 18, 22, 3), dtype=np.float32)
    video[:, :, :, 0] = np.linspace(0, 1, 5)[:, None, None]  # red rises frame by frame
    video += rng.uniform(0, 0.01, video.shape).astype(np.float32)
    (png,) = validation_video.save_videos(video[None], tmp_path / "prompt-22x18", fps=8)
    assert png.name == "prompt-22x18-0.png"
    with av.open(str(png.with_suffix(".mp4"))) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
    assert len(frames) == 5 and frames[0].shape == (18, 22, 3) and rate == 8
    reds = [float(f[..., 0].mean()) for f in frames]
    assert reds == sorted(reds) and reds[-1] - reds[0] > 150  # lossy, but the frames keep their order
    from PIL import Image

    grid = Image.open(png)
    assert grid.size == (5 * 22 + 6 * 2, 18 + 2 * 2)
    assert grid.getpixel((2 + 4 * 24 + 5, 2 + 5))[0] > 240  # the last frame's cell is red


@pytest.mark.parametrize(("fps", "expected"), [(24, 24), (15.0, 15), (23.976, Fraction(2997, 125))])
def test_mp4_plays_at_the_frame_rate_asked(tmp_path, fps, expected):
    """The stream rate read back is the rate asked, a fractional one exactly (not truncated to 23)."""
    import av

    path = validation_video.write_mp4(np.zeros((3, 16, 16, 3), dtype=np.uint8), tmp_path / "v.mp4", fps=fps)
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == expected
        assert len(list(container.decode(video=0))) == 3


def test_video_families_default_frame_rates_are_simpletuners():
    from pipeline.video_settings import family_framerate

    assert family_framerate(None, "ltxvideo") == 25 and family_framerate(None, "wan") == 15
    assert family_framerate(24, "wan") == 24 and family_framerate(None, "flux") is None


def test_predict_is_the_pipeline_call(wan_pipeline):
    """The transformer call of WanPipeline's denoising loop, replayed through `denoiser_forward` with st's cached
    text (encode_prompts + collate_text), gives the same output."""
    import torch

    family = get_family("wan")
    pipe = wan_pipeline()
    seen = pipeline_calls(pipe, prompt="a red  circle &amp; a square")[-1]
    text = prompt_inputs(pipe, "a red  circle &amp; a square")
    with torch.no_grad():
        ours = family.denoiser_forward(pipe.transformer, seen.kwargs["hidden_states"], seen.kwargs["timestep"], text)
    assert seen.kwargs["hidden_states"].shape == (1, 16, 2, 8, 8)
    torch.testing.assert_close(ours, seen.output, rtol=0, atol=0)
