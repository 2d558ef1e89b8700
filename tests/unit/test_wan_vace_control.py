"""Wan 2.1 VACE control-video training (`wan_vace`) on `st tiny-model wan DIR --flavour vace`: video datasets paired
with conditioning clips (`conditioning_data`) cache the control latents WanVACEPipeline computes for `video=<clip>`
(bit for bit), train on them, and validate with the first cached clip as `video`; a clip whose frame count or size
differs from its video is refused by `st prepare`, naming both files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import InputError, NotSupportedError
from pipeline.families import get_family, wan_vace
from pipeline.manifest import read_manifest
from tests.helpers.training import train
from tests.helpers.videos import decoded_frames, moving_square, video_dataset
from tests.helpers.wan import vace_control

FLAVOUR = "vace-1.3b-2.1"
FRAMES, SIZE = 5, 64  # the sample clips' window (8 frames) trimmed to 1 + 4k, at their 64 x 64 bucket
CONTROL = {"id": "controls", "type": "local", "dataset_type": "conditioning", "conditioning_type": "controlnet",
           "instance_data_dir": "controls"}  # fmt: skip
MASK = {"id": "holes", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
        "instance_data_dir": "holes"}  # fmt: skip
SETS = ("validation_num_video_frames=5", 'validation_resolution="32"', "validation_num_inference_steps=2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path_factory.mktemp("wan-vace-control") / "model"
    result = CliRunner().invoke(app, ["tiny-model", "wan", str(out), "--flavour", "vace"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _pipe(folder):
    from diffusers import WanVACEPipeline

    pipe = WanVACEPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frames(size: tuple[int, int], count: int, colour) -> list:
    from PIL import Image

    return [Image.fromarray(f) for f in moving_square(size, count, colour)]



def test_control_latents_are_the_pipelines_for_a_clip_and_a_mask(folder):
    """`control_latents` of a control clip (and of a clip with its mask) equal WanVACEPipeline's control latents for
    `video=` (and `mask=`) exactly; a clip changes them from the zero control; `cached_control` stores them with
    the clip's pixels."""
    pipe = _pipe(folder)
    size = (32, 32)
    clip = _frames(size, FRAMES, (250, 40, 40))
    mask = [img.convert("L").point(lambda v: 255 if v > 100 else 0).convert("RGB") for img in clip]
    patch = pipe.transformer.config.patch_size
    ours = wan_vace.control_latents(pipe.vae, patch, FRAMES, 32, 32, video=clip)
    theirs = vace_control(pipe, size, FRAMES, video=clip)
    assert ours.shape == theirs.shape == (1, 48, 2, 8, 8)
    assert float((ours - theirs).abs().max()) == 0.0
    masked = wan_vace.control_latents(pipe.vae, patch, FRAMES, 32, 32, video=clip, mask=mask)
    assert float((masked - vace_control(pipe, size, FRAMES, video=clip, mask=mask)).abs().max()) == 0.0
    assert not torch.equal(masked, ours)
    assert not torch.allclose(ours, wan_vace.zero_control(pipe.vae, patch, FRAMES, 32, 32))
    pixels = torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1) for f in clip], dim=1)
    stored = wan_vace.cached_control(pipe.vae, [{"dataset_id": "controls", "kind": "controlnet"}],
                                     [pixels.float() / 127.5 - 1.0])  # fmt: skip
    assert torch.equal(stored["0.pixels"], pixels) and torch.equal(stored["0.latent"], ours[0])


def test_conditioning_the_run_cannot_use_is_refused_before_the_model_loads():
    """Cache-side refusals: conditioning clips for a family other than VACE; for VACE, conditioning images on image
    datasets, and clips other than one control clip and at most one mask clip."""
    control, mask = {"dataset_id": "controls", "kind": "controlnet"}, {"dataset_id": "holes", "kind": "mask"}
    clip = {"dataset_id": "clips", "window_frames": 8, "conditioning": [control]}
    still = {"dataset_id": "stills", "window_frames": None, "conditioning": [{**control, "dataset_id": "edges"}]}
    with pytest.raises(NotSupportedError, match="clips link conditioning clips .* only Wan VACE .* WanPipeline"):
        wan_vace.check_cache(get_family("wan"), [clip])
    with pytest.raises(NotSupportedError, match="stills link conditioning images to image datasets"):
        wan_vace.check_cache(wan_vace.FAMILY, [clip, still])
    for linked in ([mask], [control, control], [control, mask, mask], [control, {**mask, "kind": "segmentation"}]):
        with pytest.raises(NotSupportedError, match="'clips' links .* takes one control clip .* at most one mask"):
            wan_vace.check_cache(wan_vace.FAMILY, [{**clip, "conditioning": linked}])
    plain = {"dataset_id": "plain", "window_frames": 8}
    wan_vace.check_cache(wan_vace.FAMILY, [{**clip, "conditioning": [mask, control]}, plain])
    wan_vace.check_cache(get_family("wan"), [plain])


def _paired(root: Path, folder: Path, *, frames: int = 16, size: tuple[int, int] = (64, 64), masks: bool = False,
            **options) -> Path:  # fmt: skip
    """The sample clips (two usable) under root/videos, each paired with a control clip of `frames` frames at
    `size` under root/controls (and with `masks` a mask clip, a white square moving over black, under root/holes);
    returns the config."""
    from pipeline.sampledata import write_video

    config = video_dataset(root, "wan", folder, videos=2, **{"--model_flavour": FLAVOUR, **options})
    linked = [CONTROL, MASK] if masks else [CONTROL]
    for spec in linked:
        (root / spec["instance_data_dir"]).mkdir()
    for i, video in enumerate(sorted(p for p in (root / "videos").glob("0*.mp4"))):
        write_video(root / "controls" / video.name, moving_square(size, frames, (40, 40 + 100 * i, 250)), fps=12)
        if masks:
            square = [np.repeat(((f == 255).all(-1, keepdims=True) * 255).astype(np.uint8), 3, axis=-1)
                      for f in moving_square(size, frames, (255, 255, 255))]  # fmt: skip
            write_video(root / "holes" / video.name, square, fps=12)
    datasets = json.loads((root / "multidatabackend.json").read_text())
    datasets[0]["conditioning_data"] = [spec["id"] for spec in linked]
    datasets[1:1] = [dict(spec) for spec in linked]
    (root / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    return config


@pytest.mark.parametrize("frames, size, what", [(12, (64, 64), "12 frames of 64x64"),
                                                 (16, (64, 32), "16 frames of 64x32")])
def test_a_control_clip_of_another_frame_count_or_size_is_refused_naming_both_files(tmp_path, folder, frames, size,
                                                                                   what):  # fmt: skip
    from pipeline.config import load_config
    from pipeline.prepare.stage import run_prepare

    config = _paired(tmp_path / "data", folder, frames=frames, size=size)
    with pytest.raises(InputError, match=rf"conditioning clip .*controls/0000_\w+\.mp4 \(dataset 'controls'\) has "
                                         rf"{what}, but its video .*videos/0000_\w+\.mp4 \(dataset 'clips'\) has 16 "
                                         "frames of 64x64"):  # fmt: skip
        run_prepare(load_config(config), tmp_path / "prepare")


@pytest.fixture(scope="module")
def chain(tmp_path_factory, folder):
    """Two clips paired with control and mask clips, prepared, cached in fp32 and trained for 2 LoRA steps validated
    at step 2 (root, run)."""
    from pipeline.cache.stage import run_cache
    from pipeline.config import load_config
    from pipeline.prepare.stage import run_prepare

    root = tmp_path_factory.mktemp("wan-vace-paired")
    config = _paired(root / "data", folder, masks=True, **{"--cache_dtype": "fp32"})
    loaded = load_config(config)
    run_prepare(loaded, root / "prepare")
    run_cache(loaded, root / "prepare", root / "cache")
    run = root / "run"

    def zero_control(self, latents):
        raise AssertionError("a paired batch trained on the zero control")

    with pytest.MonkeyPatch.context() as patch:  # every batch is paired: its cached control latents train
        patch.setattr(wan_vace.ZeroControl, "conditioning", zero_control)
        train(config, root / "cache", run, *SETS, "validation_disable=false", "validation_step_interval=2")
    return root, run


def test_the_cache_holds_the_pipelines_control_latents_of_each_clip(chain, folder):
    """Each cached clip's control latents are WanVACEPipeline's for `video=` its control clip's frames and `mask=`
    its mask clip's (the window's first 5, decoded from the files), max difference 0, beside the clips' uint8
    pixels."""
    from pipeline.cache_reader import COND
    from pipeline.train.data import CacheIndex, SampleReader

    root, _ = chain
    index = CacheIndex(root / "cache", read_manifest(root / "cache"))
    pipe = _pipe(folder)
    reader = SampleReader()
    try:
        refs = sorted(index.samples.values(), key=lambda r: r.key)
        assert len(refs) == 2
        for ref in refs:
            partner, holes = ref.meta["conditioning"]
            assert [(p["dataset_id"], p["kind"]) for p in (partner, holes)] == [("controls", "controlnet"),
                                                                               ("holes", "mask")]  # fmt: skip
            stored = reader.tensors(ref, COND)
            clip = decoded_frames(root / "data" / "controls" / partner["path"], FRAMES)
            mask = decoded_frames(root / "data" / "holes" / holes["path"], FRAMES)
            expected = vace_control(pipe, (SIZE, SIZE), FRAMES, video=clip, mask=mask)[0]
            assert not torch.equal(expected, vace_control(pipe, (SIZE, SIZE), FRAMES, video=clip)[0])
            assert sorted(stored) == ["0.latent", "0.pixels", "1.pixels"]
            assert stored["0.latent"].dtype == torch.float32 and stored["0.latent"].shape == (48, 2, 16, 16)
            assert float((stored["0.latent"] - expected).abs().max()) == 0.0
            assert stored["0.pixels"].shape == (3, FRAMES, SIZE, SIZE)
            assert np.array_equal(stored["0.pixels"][:, 0].permute(1, 2, 0).numpy(), np.asarray(clip[0]))
    finally:
        reader.close()


def test_the_run_trains_on_the_control_clips_and_validates_with_the_first(chain):
    import av

    root, run = chain
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]  # fmt: skip
    assert len(losses) == 2 and all(np.isfinite(losses))
    folder = run / "validation" / "step-2"
    with av.open(str(folder / "validation-32x32-0.mp4")) as container:
        assert len(list(container.decode(video=0))) == FRAMES
    for name in ("control", "mask"):  # the first cached clip's control and mask clips, as rendered with
        assert decoded_frames(folder / f"validation-32x32-{name}.mp4", FRAMES)[0].size == (32, 32)


def test_the_trainer_passes_a_batchs_cached_control_latents(folder):
    """A batch with cached control latents gets them (not the zero control) as the VACE transformer's input; a batch
    without gets the zero control."""
    from types import SimpleNamespace

    pipe = _pipe(folder)
    provider = wan_vace.ZeroControl.for_run(wan_vace.FAMILY, str(folder), None, pipe.transformer, "cpu")
    latents = torch.zeros(2, 16, 2, 8, 8)
    cached = torch.randn(2, 48, 2, 8, 8)
    batch = SimpleNamespace(control_latents=cached, index=0, dataset_id="clips")
    assert torch.equal(provider.text_inputs(latents, batch)[wan_vace.CONTROL_KEY], cached)
    zero = provider.text_inputs(latents, SimpleNamespace(control_latents=None))[wan_vace.CONTROL_KEY]
    assert torch.equal(zero[0], wan_vace.zero_control(pipe.vae, (1, 2, 2), FRAMES, 32, 32)[0])
    with pytest.raises(InputError, match="cached control latents of batch 0 .* re-run `st cache`"):
        provider.text_inputs(torch.zeros(2, 16, 3, 8, 8), batch)
