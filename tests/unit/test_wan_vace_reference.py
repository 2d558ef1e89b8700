"""Wan 2.1 VACE reference images (`wan_vace`, WanVACEPipeline's `reference_images`) on `st tiny-model wan DIR
--flavour vace`: the control latents with a reference (prepended frame) equal the pipeline's, the transformer call
denoises the prepended frame and drops it as the pipeline does, and a video dataset paired with control clips and a
`reference_strict` image dataset caches the pipeline's control latents, trains 2 steps and validates with the
reference; more than one reference per clip is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import NotSupportedError
from pipeline.families import get_family, wan_vace
from pipeline.manifest import read_manifest
from tests.helpers.training import train
from tests.helpers.videos import decoded_frames, moving_square, video_dataset

FLAVOUR = "vace-1.3b-2.1"
FRAMES, SIZE = 5, 64  # the sample clips' window trimmed to 1 + 4k, at their 64 x 64 bucket
CONTROL = {"id": "controls", "type": "local", "dataset_type": "conditioning", "conditioning_type": "controlnet",
           "instance_data_dir": "controls"}  # fmt: skip
REFERENCE = {"id": "refs", "type": "local", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
             "instance_data_dir": "refs"}  # fmt: skip
SETS = ("validation_num_video_frames=5", 'validation_resolution="32"', "validation_num_inference_steps=2")


@pytest.fixture(scope="module")
def folder(tiny_model) -> Path:
    return tiny_model("wan", flavour="vace")


def _pipe(folder):
    from diffusers import WanVACEPipeline

    pipe = WanVACEPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_call(pipe, size: tuple[int, int], frames: int, **inputs) -> dict:
    """The keywords WanVACEPipeline hands its transformer (one step) for `inputs` (video / reference_images)."""
    family = get_family("wan")
    text = family.collate_text(family.encode_prompts([pipe.text_encoder], [pipe.tokenizer], ["a red circle"]))
    seen: dict = {}
    handle = pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(prompt_embeds=text["prompt_embeds"], height=size[1], width=size[0], num_frames=frames,
                 num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                 generator=torch.Generator().manual_seed(0), **inputs)  # fmt: skip
    finally:
        handle.remove()
    return seen


def _frames(size: tuple[int, int], count: int, colour) -> list:
    from PIL import Image

    return [Image.fromarray(f) for f in moving_square(size, count, colour)]


def _portrait(width: int = 24, height: int = 40):
    """A reference image of another aspect than the clips (letterboxed by the pipeline)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_control_latents_with_a_reference_are_the_pipelines(folder):
    """`control_latents(reference=[image])` equals WanVACEPipeline's `control_hidden_states` for
    `reference_images=[image]` (with a control clip, and alone), max difference 0: one latent frame prepended (the
    reference's VAE mode, zeros for the reactive half and the mask); the pipeline's noise latents grow by that frame.
    `cached_control` stores it with the letterboxed reference; two references are refused."""
    pipe = _pipe(folder)
    patch = pipe.transformer.config.patch_size
    clip, image = _frames((32, 32), FRAMES, (250, 40, 40)), _portrait()
    ours = wan_vace.control_latents(pipe.vae, patch, FRAMES, 32, 32, video=clip, reference=[image])
    seen = _pipeline_call(pipe, (32, 32), FRAMES, video=clip, reference_images=[image])
    assert ours.shape == seen["control_hidden_states"].shape == (1, 48, 3, 8, 8)
    assert seen["hidden_states"].shape[2] == 3  # 2 video latent frames + the reference's
    assert float((ours - seen["control_hidden_states"]).abs().max()) == 0.0
    mask = [img.convert("L").point(lambda v: 255 if v > 100 else 0).convert("RGB") for img in clip]
    masked = wan_vace.control_latents(pipe.vae, patch, FRAMES, 32, 32, video=clip, mask=mask, reference=[image])
    expected = _pipeline_call(pipe, (32, 32), FRAMES, video=clip, mask=mask, reference_images=[image])
    assert float((masked - expected["control_hidden_states"]).abs().max()) == 0.0
    plain = wan_vace.control_latents(pipe.vae, patch, FRAMES, 32, 32, video=clip)
    assert torch.equal(ours[:, :, 1:], plain)  # the video's frames are the control of the clip alone
    assert float(ours[:, 16:, :1].abs().max()) == 0.0 and float(ours[:, :16, :1].abs().max()) > 0.0
    alone = wan_vace.control_latents(pipe.vae, patch, FRAMES, 32, 32, reference=[image])
    expected = _pipeline_call(pipe, (32, 32), FRAMES, reference_images=[image])["control_hidden_states"]
    assert float((alone - expected).abs().max()) == 0.0
    assert torch.equal(alone[:, :, 1:], wan_vace.zero_control(pipe.vae, patch, FRAMES, 32, 32))

    pixels = torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1) for f in clip], dim=1)
    reference = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    partners = [{"dataset_id": "controls", "kind": "controlnet"}, {"dataset_id": "refs", "kind": "reference_loose"}]
    stored = wan_vace.cached_control(pipe.vae, partners, [pixels.float() / 127.5 - 1.0,
                                                          reference.float() / 127.5 - 1.0])  # fmt: skip
    assert sorted(stored) == ["0.latent", "0.pixels", "1.pixels"] and torch.equal(stored["0.latent"], ours[0])
    canvas = stored["1.pixels"]  # the portrait centred on white at the clip's size
    assert canvas.shape == (3, 32, 32) and int(canvas[:, :, 0].min()) == 255 and int(canvas[:, :, 31].min()) == 255
    only = wan_vace.cached_control(pipe.vae, partners[1:], [reference.float() / 127.5 - 1.0],
                                   shape=(FRAMES, 32, 32))  # fmt: skip
    assert sorted(only) == ["0.latent", "0.pixels"] and torch.equal(only["0.latent"], alone[0])

    with pytest.raises(NotSupportedError, match="2 reference images, but st trains WanVACEPipeline with at most one"):
        wan_vace.control_latents(pipe.vae, patch, FRAMES, 32, 32, reference=[image, image])
    row = {"dataset_id": "clips", "path": "a.mp4", "window_frames": 8,
           "conditioning": [{**partners[1], "dataset_id": "refs"}, {**partners[1], "dataset_id": "more"}]}
    with pytest.raises(NotSupportedError, match="sample a.mp4 of dataset 'clips' has 2 reference images"):
        wan_vace.check_cache(wan_vace.FAMILY, [row])
    wan_vace.check_cache(wan_vace.FAMILY, [{**row, "conditioning": partners}, {**row, "conditioning": partners[1:]}])


def test_the_transformer_call_denoises_the_reference_frame_and_drops_it(folder):
    """With control latents one frame longer than the latents, `predict` runs the transformer on [the reference's
    latents noised at the batch's sigma, latents] and returns the video frames' prediction only (the pipeline
    discards the reference frame's output), so the loss covers the video frames; the reference changes them."""
    pipe = _pipe(folder)
    patch = pipe.transformer.config.patch_size
    clip = _frames((32, 32), FRAMES, (250, 40, 40))
    control = wan_vace.control_latents(pipe.vae, patch, FRAMES, 32, 32, video=clip, reference=[_portrait()])
    family = get_family("wan")
    text = family.collate_text(family.encode_prompts([pipe.text_encoder], [pipe.tokenizer], ["a red circle"]))
    latents = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([600.0])
    with torch.no_grad():
        torch.manual_seed(5)
        out = wan_vace.predict(pipe.transformer, latents, timesteps, {**text, wan_vace.CONTROL_KEY: control})
        torch.manual_seed(5)
        noise = torch.randn(1, 16, 1, 8, 8)
        hidden = torch.cat([0.4 * control[:, :16, :1] + 0.6 * noise, latents], dim=2)
        full = pipe.transformer(hidden_states=hidden, timestep=timesteps, encoder_hidden_states=text["prompt_embeds"],
                                control_hidden_states=control, return_dict=False)[0]  # fmt: skip
        without = wan_vace.predict(pipe.transformer, latents, timesteps,
                                   {**text, wan_vace.CONTROL_KEY: control[:, :, 1:]})  # fmt: skip
    assert out.shape == latents.shape
    assert float((out - full[:, :, 1:]).abs().max()) < 1e-5
    assert float((out - without).abs().max()) > 1e-4


def _paired(root: Path, folder: Path, **options) -> Path:
    """The sample clips (two usable) under root/videos, each paired with a control clip under root/controls and a
    reference image (another size and aspect, PNG) under root/refs; returns the config."""
    from PIL import Image

    from pipeline.sampledata import write_video

    config = video_dataset(root, "wan", folder, videos=2, **{"--model_flavour": FLAVOUR, **options})
    for spec in (CONTROL, REFERENCE):
        (root / spec["instance_data_dir"]).mkdir()
    for i, video in enumerate(sorted(p for p in (root / "videos").glob("0*.mp4"))):
        write_video(root / "controls" / video.name, moving_square((64, 64), 16, (40, 40 + 100 * i, 250)), fps=12)
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)).save(root / "refs" / f"{video.stem}.png")
    datasets = json.loads((root / "multidatabackend.json").read_text())
    datasets[0]["conditioning_data"] = [CONTROL["id"], REFERENCE["id"]]
    datasets[1:1] = [dict(CONTROL), dict(REFERENCE)]
    (root / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    return config


@pytest.fixture(scope="module")
def chain(tmp_path_factory, folder):
    """Two clips paired with control clips and reference images, prepared, cached in fp32 and trained for 2 LoRA
    steps validated at step 2 (root, run)."""
    from pipeline.cache.stage import run_cache
    from pipeline.config import load_config
    from pipeline.prepare.stage import run_prepare

    root = tmp_path_factory.mktemp("wan-vace-reference")
    config = _paired(root / "data", folder, **{"--cache_dtype": "fp32"})
    loaded = load_config(config)
    run_prepare(loaded, root / "prepare")
    run_cache(loaded, root / "prepare", root / "cache")
    run = root / "run"
    train(config, root / "cache", run, *SETS, "validation_disable=false", "validation_step_interval=2")
    return root, run



def test_the_cache_holds_the_pipelines_control_latents_with_the_reference(chain, folder):
    """Each cached clip's control latents are WanVACEPipeline's for `video=` its control clip's frames and
    `reference_images=[the PNG as opened]`, max difference 0 (3 latent frames: the reference's and the clip's 2)."""
    from PIL import Image

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
            control, reference = ref.meta["conditioning"]
            assert (control["kind"], reference["kind"]) == ("controlnet", "reference_strict")
            stored = reader.tensors(ref, COND)
            clip = decoded_frames(root / "data" / "controls" / control["path"], FRAMES)
            image = Image.open(root / "data" / "refs" / reference["path"]).convert("RGB")
            expected = _pipeline_call(pipe, (SIZE, SIZE), FRAMES, video=clip,
                                      reference_images=[image])["control_hidden_states"][0]  # fmt: skip
            assert sorted(stored) == ["0.latent", "0.pixels", "1.pixels"]
            assert stored["0.latent"].shape == (48, 3, 16, 16)
            assert float((stored["0.latent"] - expected).abs().max()) == 0.0
            assert stored["1.pixels"].shape == (3, SIZE, SIZE)
    finally:
        reader.close()


def test_the_run_trains_with_the_reference_and_validates_with_it(chain):
    """2 finite losses; the step-2 validation renders WanVACEPipeline with the first cached control clip and its
    reference image (saved beside the render), at the clip's frame count (the reference frame dropped)."""
    import av

    root, run = chain
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]  # fmt: skip
    assert len(losses) == 2 and all(np.isfinite(losses))
    step = run / "validation" / "step-2"
    with av.open(str(step / "validation-32x32-0.mp4")) as container:
        assert len(list(container.decode(video=0))) == FRAMES
    assert decoded_frames(step / "validation-32x32-control.mp4", FRAMES)[0].size == (32, 32)
    assert decoded_frames(step / "validation-32x32-reference_images.mp4", 1)[0].size == (32, 32)


def test_a_reference_alone_trains_on_the_zero_control_with_the_reference_frame(tmp_path, folder):
    """A video dataset paired with reference images only: the cache holds WanVACEPipeline's control latents for
    `reference_images=[image]` alone (the zero control with the reference frame prepended, max difference 0) on the
    reference's slot, 2 steps train, and validation renders with the reference as `reference_images`."""
    from PIL import Image

    from pipeline.cache.stage import run_cache
    from pipeline.cache_reader import COND
    from pipeline.config import load_config
    from pipeline.prepare.stage import run_prepare
    from pipeline.train.data import CacheIndex, SampleReader

    config = _paired(tmp_path / "data", folder, **{"--cache_dtype": "fp32"})
    datasets = json.loads((tmp_path / "data" / "multidatabackend.json").read_text())
    datasets[0]["conditioning_data"] = [REFERENCE["id"]]
    datasets = [d for d in datasets if d.get("id") != CONTROL["id"]]
    (tmp_path / "data" / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    loaded = load_config(config)
    run_prepare(loaded, tmp_path / "prepare")
    run_cache(loaded, tmp_path / "prepare", tmp_path / "cache")
    index = CacheIndex(tmp_path / "cache", read_manifest(tmp_path / "cache"))
    pipe, reader = _pipe(folder), SampleReader()
    try:
        ref = sorted(index.samples.values(), key=lambda r: r.key)[0]
        (reference,) = ref.meta["conditioning"]
        stored = reader.tensors(ref, COND)
        image = Image.open(tmp_path / "data" / "refs" / reference["path"]).convert("RGB")
        expected = _pipeline_call(pipe, (SIZE, SIZE), FRAMES, reference_images=[image])["control_hidden_states"][0]
        assert sorted(stored) == ["0.latent", "0.pixels"]
        assert float((stored["0.latent"] - expected).abs().max()) == 0.0
    finally:
        reader.close()
    run = tmp_path / "run"
    train(config, tmp_path / "cache", run, *SETS, "validation_disable=false", "validation_step_interval=2")
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]  # fmt: skip
    assert len(losses) == 2 and all(np.isfinite(losses))
    step = run / "validation" / "step-2"
    assert decoded_frames(step / "validation-32x32-0.mp4", FRAMES)[0].size == (32, 32)
    assert Image.open(step / "validation-32x32-control.png").size == (32, 32)  # the reference it rendered with
