"""Wan 2.1 image-to-video pieces against WanImageToVideoPipeline on a tiny random model: the 36-channel input (mask and
first-frame condition latents), the CLIP image embeddings and the transformer call of the pipeline's loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.families import get_family, wan_i2v
from tests.helpers.wan import (FRAMES, SIZE, lora_by_hand, pipeline, pipeline_calls, pixels, prompt_inputs,
                               random_frames, render)  # fmt: skip

I2V = "WanImageToVideoPipeline"


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model("wan", flavour="i2v")


@pytest.fixture(scope="module")
def pipe(wan_pipeline):
    return wan_pipeline("i2v", I2V)


@pytest.fixture(scope="module")
def first_frame():
    return random_frames(1)[0]


def test_condition_is_the_pipelines_prepare_latents(pipe, first_frame):
    """Mask ones on latent frame 0 only (4 channels), then the VAE mode of [first frame, black frames], normalised:
    exactly the condition `prepare_latents` builds for the denoising loop."""
    image = pixels(pipe, first_frame)
    _, expected = pipe.prepare_latents(image, 1, 16, SIZE, SIZE, FRAMES, torch.float32, torch.device("cpu"),
                                       torch.Generator().manual_seed(0))  # fmt: skip
    ours = wan_i2v.condition_from_first_frame(pipe.vae, image, latent_frames=2)
    assert ours.shape == (1, 20, 2, 8, 8)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert bool((ours[:, :4, 0] == 1).all()) and bool((ours[:, :4, 1:] == 0).all())


def test_first_latent_frame_of_the_condition_is_the_clips_first_frame_encoding(pipe, first_frame):
    """The Wan VAE is causal: latent frame 0 of a whole clip encodes its first frame alone, so the condition built
    from the first frame and SimpleTuner's fallback from the cached clip latents agree on it."""
    image = pixels(pipe, first_frame)
    later = torch.rand(1, 3, FRAMES - 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    clip = torch.cat([image.unsqueeze(2), later], dim=2)
    with torch.no_grad():
        clip_latents = wan_i2v.normalise(pipe.vae, pipe.vae.encode(clip).latent_dist.mode())
    from_pixels = wan_i2v.condition_from_first_frame(pipe.vae, image, latent_frames=2)
    from_latents = wan_i2v.condition_from_latents(clip_latents, temporal=4)
    torch.testing.assert_close(from_pixels[:, 4:, 0], clip_latents[:, :, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_latents[:, :, 0], from_pixels[:, :, 0], rtol=1e-4, atol=1e-5)
    assert bool((from_latents[:, 4:, 1:] == 0).all()) and bool((from_latents[:, :4] == from_pixels[:, :4]).all())


def test_predict_is_the_pipelines_transformer_call(pipe, first_frame):
    """The transformer call of WanImageToVideoPipeline's loop, replayed through `wan_i2v.predict` with st's text
    embeddings, the condition and the CLIP embeddings of `encode_image`, gives the same output."""
    text = prompt_inputs(pipe)
    call = pipeline_calls(pipe, image=first_frame, prompt_embeds=text["prompt_embeds"])[-1]
    seen = {**call.kwargs, "output": call.output}
    embeds = wan_i2v.encode_image(pipe.image_encoder, pipe.image_processor, [first_frame])
    torch.testing.assert_close(embeds, seen["encoder_hidden_states_image"], rtol=0, atol=0)
    latents, condition = seen["hidden_states"][:, :16], seen["hidden_states"][:, 16:]
    with torch.no_grad():
        ours = wan_i2v.predict(pipe.transformer, latents, seen["timestep"], text, condition, embeds)
    assert seen["hidden_states"].shape == (1, 36, 2, 8, 8)
    torch.testing.assert_close(ours, seen["output"], rtol=0, atol=0)


def test_the_image_embeddings_change_the_prediction(pipe, first_frame):
    """The CLIP tokens reach the transformer (its added K/V projections): other embeddings, another output."""
    text = prompt_inputs(pipe)
    latents = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    condition = wan_i2v.condition_from_latents(latents, temporal=4)
    embeds = wan_i2v.encode_image(pipe.image_encoder, pipe.image_processor, [first_frame])
    with torch.no_grad():
        one = wan_i2v.predict(pipe.transformer, latents, torch.tensor([500.0]), text, condition, embeds)
        other = wan_i2v.predict(pipe.transformer, latents, torch.tensor([500.0]), text, condition, embeds + 1)
    assert one.shape == latents.shape and not torch.allclose(one, other)


def test_a_lora_trained_on_the_i2v_input_loads_into_the_pipeline_and_changes_it(folder, first_frame, tmp_path):
    """Two flow-matching steps of a LoRA (Wan's targets) through `wan_i2v.predict` on a clip's latents, with the
    condition from its first latent frame and the CLIP embeddings of its first frame; the file st writes loads into
    WanImageToVideoPipeline and changes the video it renders."""
    from pipeline.families import lora

    trained = pipeline(folder, I2V)
    text = prompt_inputs(trained)
    first = pixels(trained, first_frame)
    clip = torch.cat([first.unsqueeze(2), first.unsqueeze(2).flip(-1).expand(-1, -1, FRAMES - 1, -1, -1)], dim=2)
    with torch.no_grad():
        latents = wan_i2v.normalise(trained.vae, trained.vae.encode(clip).latent_dist.mode())
    condition = wan_i2v.condition_from_latents(latents, temporal=4)
    embeds = wan_i2v.encode_image(trained.image_encoder, trained.image_processor, [first_frame])

    def predict(noisy, timesteps):
        return wan_i2v.predict(trained.transformer, noisy, timesteps, text, condition, embeds)

    losses, written = lora_by_hand(trained.transformer, latents, predict, tmp_path)
    assert all(np.isfinite(losses))
    plain = pipeline(folder, I2V)
    before = render(plain, image=first_frame, prompt_embeds=text["prompt_embeds"])
    lora.load_weights(get_family("wan"), plain, written)
    after = render(plain, image=first_frame, prompt_embeds=text["prompt_embeds"])
    assert before.shape == after.shape == (1, FRAMES, SIZE, SIZE, 3)
    assert float(np.abs(after - before).max()) > 1e-3


def test_a_clips_extras_are_what_the_pipeline_builds_from_its_first_frame(pipe):
    """From a clip as `st cache` decodes it, the condition and CLIP embeddings equal those the pipeline builds when
    given the clip's first frame as its image."""
    generator = torch.Generator().manual_seed(4)
    clip = torch.randint(0, 256, (3, FRAMES, SIZE, SIZE), generator=generator).float() / 127.5 - 1.0
    extras = wan_i2v.sample_extras(pipe.vae, pipe.image_encoder, pipe.image_processor, clip)
    image = wan_i2v.first_frame_image(clip)
    _, expected = pipe.prepare_latents(pixels(pipe, image), 1, 16, SIZE, SIZE, FRAMES, torch.float32,
                                       torch.device("cpu"))  # fmt: skip
    assert extras["i2v_condition"].shape == (20, 2, 8, 8)
    torch.testing.assert_close(extras["i2v_condition"], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extras["image_embeds"], pipe.encode_image(image, torch.device("cpu"))[0], rtol=0, atol=0)


def test_validation_renders_an_i2v_video_from_a_first_frame(pipe, first_frame, tmp_path):
    """The validation video writer renders through WanImageToVideoPipeline with the first frame as `image`."""
    from pipeline.train import validation_video

    text = prompt_inputs(pipe)
    kwargs = {"prompt_embeds": text["prompt_embeds"], "height": SIZE, "width": SIZE, "num_inference_steps": 1,
              "guidance_scale": 1.0}  # fmt: skip
    extra = {"image": first_frame, "num_images_per_prompt": 1, "generator": torch.Generator().manual_seed(0)}
    (png,) = validation_video.render(pipe, kwargs, extra, tmp_path / "prompt-32x32", FRAMES, fps=8)
    assert png.exists() and png.with_suffix(".mp4").exists()


def test_the_i2v_flavours_and_folders_train_as_the_i2v_variant(folder, tmp_path):
    """The 2.1 i2v flavours and a WanImageToVideoPipeline folder train as `wan_i2v.FAMILY`; an i2v flavour on a
    text-to-video folder is refused, naming both."""
    from pipeline.errors import ConfigError

    wan = get_family("wan")
    assert wan.for_run(None, str(folder)) is wan_i2v.FAMILY
    for flavour in ("i2v-14b-2.1", "i2v-14b-2.1-720p"):
        assert wan.flavour_hub_id(flavour).startswith("Wan-AI/Wan2.1-I2V-14B-")
        assert wan.for_run(flavour, wan.flavour_hub_id(flavour)) is wan_i2v.FAMILY
    (tmp_path / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    with pytest.raises(ConfigError, match="i2v-14b-2.1 is Wan 2.1 image-to-video.*WanPipeline"):
        wan.for_run("i2v-14b-2.1", str(tmp_path))
