"""Wan 2.2 I2V A14B first/last-frame stages (flf2v-14b-2.2-high / -low, `wan22.FLF2V_HIGH` / `FLF2V_LOW`) on a tiny
two-expert folder (`wan22.tiny`): routing, the condition latents and the transformer call against
WanImageToVideoPipeline with `last_image`, and a cached 2-step LoRA run of each stage (the high one validated through
the pipeline with `last_image`, the low one published and loaded into `transformer_2`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.families import get_family, wan22, wan_i2v
from pipeline.manifest import read_manifest
from tests.helpers.training import train
from tests.helpers.wan import (FRAMES, SIZE, VALIDATION, cached_samples, pipeline_calls, pixels, prompt_inputs,
                               random_frames, render_lora, run_losses, trained_run, video_frames)  # fmt: skip

HIGH, LOW = wan22.FLF2V_FLAVOURS


@pytest.fixture(scope="module")
def folder(tiny_model) -> Path:
    return tiny_model("wan", flavour="i2v-2.2")


@pytest.fixture(scope="module")
def pipe(wan_pipeline):
    return wan_pipeline("i2v-2.2", "WanImageToVideoPipeline")


@pytest.fixture(scope="module")
def frames():
    return random_frames(2)


def test_the_flavours_train_one_expert_on_first_and_last_frames(folder):
    wan = get_family("wan")
    assert wan.flavour_hub_id(HIGH) == wan.flavour_hub_id(LOW) == wan22.HUB_ID
    high, low = wan.for_run(HIGH, str(folder)), wan.for_run(LOW, wan22.HUB_ID)
    assert high is wan22.FLF2V_HIGH and low is wan22.FLF2V_LOW
    assert (wan22.stage_of(high).subfolder, wan22.stage_of(low).subfolder) == ("transformer", "transformer_2")
    assert wan22.weights_subfolder(low) == "transformer_2" and high.default_flow_shift == 5.0
    assert wan_i2v.is_flf2v(high) and wan_i2v.is_flf2v(low) and not wan_i2v.uses_clip(high)
    assert not wan_i2v.is_flf2v(wan22.I2V_HIGH) and high.image_encoder == ()
    assert high.train_key_entries(high) == {wan_i2v.CONDITION_FRAMES_KEY: "first_last"}
    assert wan22.I2V_HIGH.train_key_entries(wan22.I2V_HIGH) == {}


def test_condition_and_call_are_the_pipelines_with_last_image(pipe, frames):
    """`prepare_latents(..., last_image)` of the two-expert folder equals the cached condition builder's, and the
    high expert's call in the pipeline's loop (`image` + `last_image`) is replayed exactly by the stage's call; the
    I2V stage's (first-frame mask) differs."""
    first, last = (pixels(pipe, image) for image in frames)
    with torch.no_grad():
        _, expected = pipe.prepare_latents(first, 1, 16, SIZE, SIZE, FRAMES, torch.float32, torch.device("cpu"),
                                           torch.Generator().manual_seed(0), None, last)  # fmt: skip
    middle = torch.rand(1, 3, FRAMES - 2, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    clip = torch.cat([first.unsqueeze(2), middle, last.unsqueeze(2)], dim=2)[0]
    cached = wan_i2v.cached_conditioning(pipe.vae, clip, 2, last=True)["0.latent"]
    assert float((cached - expected[0, 4:]).abs().max()) == 0.0
    assert float((wan_i2v.masked_condition(cached[None], last=True) - expected).abs().max()) == 0.0

    text = prompt_inputs(pipe)
    call = pipeline_calls(pipe, image=frames[0], last_image=frames[1], prompt_embeds=text["prompt_embeds"])[-1]
    seen = {**call.kwargs, "output": call.output}
    latents, reference = seen["hidden_states"][:, :16], seen["hidden_states"][:, 20:]
    assert seen["encoder_hidden_states_image"] is None
    with torch.no_grad():
        ours = wan22.FLF2V_HIGH.denoiser_forward(pipe.transformer, latents, seen["timestep"], text,
                                                 reference=reference)  # fmt: skip
        i2v = wan22.I2V_HIGH.denoiser_forward(pipe.transformer, latents, seen["timestep"], text, reference=reference)
    assert float((ours - seen["output"]).abs().max()) == 0.0
    assert not torch.allclose(i2v, ours)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, folder):
    """Two generated clips cached for the high FLF2V stage; a 2-step LoRA of it validated at step 2 with the frozen
    low expert beside it, and a 2-step LoRA of the low stage on the same cache (root, config, high run, low run)."""
    root = tmp_path_factory.mktemp("wan22-flf2v-chain")
    config, high = trained_run(root, folder, HIGH, *VALIDATION, "wan_validation_load_other_stage=true", run="high")
    low = root / "low"
    train(config, root / "cache", low, *VALIDATION, f'model_flavour="{LOW}"')
    return root, config, high, low


def test_each_stage_trains_its_expert_from_cached_first_and_last_frames(chain):
    root, _, high, low = chain
    for run, subfolder in ((high, "transformer"), (low, "transformer_2")):
        manifest = read_manifest(run)
        assert manifest["model"]["denoiser"]["subfolder"] == subfolder
        assert manifest["config"][wan_i2v.CONDITION_FRAMES_KEY] == "first_last"
        losses = run_losses(run)
        assert len(losses) == 2 and all(np.isfinite(losses))
    stored = cached_samples(root / "cache")[0].conditioning
    assert sorted(stored) == ["0.last_pixels", "0.latent", "0.pixels"]  # no CLIP tokens: Wan 2.2 has no image_dim


def test_validation_renders_between_the_first_clips_first_and_last_frames(chain):
    from PIL import Image

    root, _, high, _ = chain
    folder = high / "validation" / "step-2"
    saved = {n: np.asarray(Image.open(folder / f"validation-32x32-{n}.png").convert("RGB"))
             for n in ("control", "last_image")}  # fmt: skip
    assert saved["control"].shape == saved["last_image"].shape == (32, 32, 3)
    assert not np.array_equal(saved["control"], saved["last_image"])
    assert len(video_frames(folder / "validation-32x32-0.mp4")) == FRAMES


def test_the_low_stages_published_lora_loads_into_transformer_2_and_changes_the_video(chain, folder, tmp_path):
    from PIL import Image

    from pipeline.config import load_config
    from pipeline.publish.stage import run_publish

    _, config, high, low = chain
    out = tmp_path / "published"
    run_publish(load_config(config, [f'model_flavour="{LOW}"']), low, out)
    card = (out / "README.md").read_text()
    assert "load_into_transformer_2=True" in card and "last_image=last_frame" in card
    images = [Image.open(high / "validation" / "step-2" / f"validation-32x32-{n}.png").convert("RGB")
              for n in ("control", "last_image")]  # fmt: skip

    base, tuned = (render_lora(folder, lora, cls="WanImageToVideoPipeline", into_transformer_2=True, steps=4,
                               image=images[0], last_image=images[1])
                   for lora in (None, out / "pytorch_lora_weights.safetensors"))  # fmt: skip
    assert base.shape == tuned.shape == (1, FRAMES, 32, 32, 3)
    assert np.abs(tuned - base).max() > 1e-4


def test_a_first_frame_stage_refuses_the_first_last_frame_cache(chain, tmp_path):
    """The i2v stage's mask does not fit condition latents that hold the last frame: its run on the FLF2V cache stops
    at the first batch, naming `st cache` (and the FLF2V stage refuses a batch cached without last frames)."""
    from pipeline.errors import InputError
    from pipeline.train.data import Batch

    root, config, _, _ = chain
    with pytest.raises(InputError, match="cached for first/last-frame-to-video.*st cache"):
        train(config, root / "cache", tmp_path / "i2v", 'model_flavour="i2v-14b-2.2-high"')
    batch = Batch(torch.zeros(1, 16, 2, 8, 8), [], [], ["a"], [False], 0, 0, dataset_id="clips",
                  control_latents=torch.zeros(1, 16, 2, 8, 8))  # fmt: skip
    with pytest.raises(InputError, match="'clips'.*has no last frame"):
        wan_i2v.check_condition_frames(wan22.FLF2V_LOW, batch)
    wan_i2v.check_condition_frames(wan22.I2V_LOW, batch)
