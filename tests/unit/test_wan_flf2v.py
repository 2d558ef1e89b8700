"""Wan 2.1 first/last-frame-to-video (`wan_i2v.FLF2V_FAMILY`) against WanImageToVideoPipeline called with
`last_image` on a tiny random FLF2V model (`st tiny-model wan DIR --flavour flf2v`): the condition latents and mask,
the two images' CLIP tokens, the transformer call of the pipeline's loop, the flavour / folder routing and a LoRA."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, InputError
from pipeline.families import get_family, wan_i2v
from tests.helpers.wan import (FRAMES, SIZE, lora_by_hand, pipeline, pipeline_calls, pixels, prompt_inputs,
                               random_frames, render)  # fmt: skip

I2V = "WanImageToVideoPipeline"


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model("wan", flavour="flf2v")


@pytest.fixture(scope="module")
def pipe(wan_pipeline):
    return wan_pipeline("flf2v", I2V)


@pytest.fixture(scope="module")
def frames():
    """A random first and last frame (PIL images)."""
    return random_frames(2)


def test_tiny_model_is_an_flf2v_pipeline_folder(folder):
    index = json.loads((folder / "model_index.json").read_text())
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["image_encoder"][1] == "CLIPVisionModel"
    assert config["pos_embed_seq_len"] == 2 * 17  # two images of 16 patches and a class token
    assert get_family("wan").for_run(None, str(folder)) is wan_i2v.FLF2V_FAMILY


def test_condition_is_the_pipelines_prepare_latents_with_last_image(pipe, frames):
    """The mask (latent frame 0, and the last pixel frame's slot of the last latent frame) and the VAE mode of
    [first, black, last] frames: exactly what `prepare_latents` builds with `last_image`; the cache's builder, from a
    clip, gives the same from its first and last frames."""
    first, last = (pixels(pipe, image) for image in frames)
    with torch.no_grad():
        _, expected = pipe.prepare_latents(first, 1, 16, SIZE, SIZE, FRAMES, torch.float32, torch.device("cpu"),
                                           torch.Generator().manual_seed(0), None, last)  # fmt: skip
    ours = wan_i2v.condition_from_first_last_frames(pipe.vae, first, last, latent_frames=2)
    assert ours.shape == expected.shape == (1, 20, 2, 8, 8)
    assert float((ours - expected).abs().max()) == 0.0
    assert ours[0, :4, :, 0, 0].tolist() == [[1, 0], [1, 0], [1, 0], [1, 1]]
    i2v = wan_i2v.condition_from_first_frame(pipe.vae, first, latent_frames=2)
    assert not torch.allclose(i2v[:, 4:, 1], ours[:, 4:, 1])  # the last frame is in the last latent frame

    middle = torch.rand(1, 3, FRAMES - 2, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    clip = torch.cat([first.unsqueeze(2), middle, last.unsqueeze(2)], dim=2)[0]
    cached = wan_i2v.cached_conditioning(pipe.vae, clip, 2, last=True)
    assert cached["0.last_pixels"].dtype == torch.uint8 and tuple(cached["0.last_pixels"].shape) == (3, SIZE, SIZE)
    assert float((cached["0.latent"] - expected[0, 4:]).abs().max()) == 0.0


def test_predict_is_the_pipelines_transformer_call_with_last_image(pipe, frames):
    """The transformer call of the pipeline's loop with `image` and `last_image`, replayed through the FLF2V family's
    denoiser call with the cached-form inputs (condition latents, B x 2T CLIP tokens of both frames), is identical;
    the order of the two images matters (the image embedder's position embedding)."""
    text = prompt_inputs(pipe)
    call = pipeline_calls(pipe, image=frames[0], last_image=frames[1], prompt_embeds=text["prompt_embeds"])[-1]
    seen = {**call.kwargs, "output": call.output}
    embeds = wan_i2v.encode_first_last(pipe.image_encoder, pipe.image_processor, [frames[0]], [frames[1]])
    assert embeds.shape == (1, 34, 16)
    torch.testing.assert_close(wan_i2v.pair_tokens(embeds), seen["encoder_hidden_states_image"], rtol=0, atol=0)
    latents, reference = seen["hidden_states"][:, :16], seen["hidden_states"][:, 20:]
    family = wan_i2v.FLF2V_FAMILY
    with torch.no_grad():
        ours = family.denoiser_forward(pipe.transformer, latents, seen["timestep"],
                                       {**text, wan_i2v.IMAGE_EMBEDS_KEY: embeds}, reference=reference)  # fmt: skip
        swapped = wan_i2v.encode_first_last(pipe.image_encoder, pipe.image_processor, [frames[1]], [frames[0]])
        other = family.denoiser_forward(pipe.transformer, latents, seen["timestep"],
                                        {**text, wan_i2v.IMAGE_EMBEDS_KEY: swapped}, reference=reference)  # fmt: skip
    assert float((ours - seen["output"]).abs().max()) == 0.0
    assert not torch.allclose(ours, other)


def test_the_flf2v_call_refuses_inputs_of_another_model(pipe, folder):
    """One image's CLIP tokens, or an image-to-video transformer (no pos_embed_seq_len), are refused by name."""
    from diffusers import WanTransformer3DModel

    latents, reference = torch.zeros(1, 16, 2, 8, 8), torch.zeros(1, 16, 2, 8, 8)
    with pytest.raises(InputError, match="34 per sample.*pos_embed_seq_len"):
        wan_i2v.flf2v_family_predict(pipe.transformer, latents, torch.tensor([500.0]),
                                     {wan_i2v.IMAGE_EMBEDS_KEY: torch.zeros(1, 17, 16)}, reference=reference)
    i2v = WanTransformer3DModel.from_config({**dict(pipe.transformer.config), "pos_embed_seq_len": None})
    with pytest.raises(InputError, match="no pos_embed_seq_len"):
        wan_i2v.flf2v_family_predict(i2v, latents, torch.tensor([500.0]),
                                     {wan_i2v.IMAGE_EMBEDS_KEY: torch.zeros(1, 34, 16)}, reference=reference)


def test_training_embeds_each_clips_first_and_last_frames(folder, frames):
    """The trainer's embedder of an FLF2V run gives each batch sample the CLIP tokens of its cached first and last
    frames: those `st cache` stored (`Batch.image_embeds`; the encoder is then never loaded), else embedded from the
    cached frames (`Batch.control_pixels`, `Batch.last_pixels`) as the pipeline embeds `[image, last_image]`; a batch
    cached without last frames is refused, and an i2v run refuses a batch cached for FLF2V."""
    from pipeline.train.data import Batch
    from pipeline.train.image_embeds import ImageEmbeds

    embedder = ImageEmbeds.for_run(wan_i2v.FLF2V_FAMILY, str(folder), "cpu")
    pixels = [torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1 for image in frames]
    cached = torch.randn(2, 34, 16)
    batch = Batch(torch.zeros(2, 16, 2, 8, 8), [], [], ["a", "b"], [False, False], 0, 0, dataset_id="clips",
                  control_pixels=torch.stack(pixels), last_pixels=torch.stack(pixels[::-1]),
                  image_embeds=cached)  # fmt: skip
    assert embedder.text_inputs(batch)[wan_i2v.IMAGE_EMBEDS_KEY] is cached and embedder._encoder is None
    batch.image_embeds = None  # a cache written before st stored them
    embeds = embedder.text_inputs(batch)[wan_i2v.IMAGE_EMBEDS_KEY]
    expected = wan_i2v.encode_first_last(*embedder.encoder, list(frames), list(frames[::-1]))
    assert embeds.shape == (2, 34, 16)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    batch.last_pixels = None
    with pytest.raises(InputError, match="'clips'.*no last frame.*st cache"):
        embedder.text_inputs(batch)
    batch.last_pixels = batch.control_pixels
    with pytest.raises(InputError, match="'clips' was cached for Wan 2.1 first/last-frame-to-video"):
        ImageEmbeds.for_run(wan_i2v.FAMILY, str(folder), "cpu").text_inputs(batch)


def test_the_flf2v_flavour_and_folders_train_as_flf2v(folder, tmp_path):
    """model_flavour flf2v-14b-2.1 (its hub id, or an FLF2V folder) and an FLF2V folder without a flavour train as
    `FLF2V_FAMILY`; the flavour on an image-to-video folder or a text-to-video model is refused, naming both."""
    wan = get_family("wan")
    hub_id = wan.flavour_hub_id("flf2v-14b-2.1")
    assert hub_id == "Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers"
    assert wan.for_run("flf2v-14b-2.1", hub_id) is wan_i2v.FLF2V_FAMILY
    assert wan.for_run("flf2v-14b-2.1", str(folder)) is wan_i2v.FLF2V_FAMILY
    i2v = tmp_path / "i2v"
    shutil.copytree(folder, i2v)
    config_path = i2v / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "pos_embed_seq_len": None}))
    assert wan.for_run(None, str(i2v)) is wan_i2v.FAMILY
    with pytest.raises(ConfigError, match="flf2v-14b-2.1 needs a Wan 2.1 FLF2V transformer.*i2v-14b-2.1"):
        wan.for_run("flf2v-14b-2.1", str(i2v))
    t2v = tmp_path / "t2v"
    t2v.mkdir()
    (t2v / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    with pytest.raises(ConfigError, match="first/last-frame-to-video, but the model at .* is a WanPipeline"):
        wan.for_run("flf2v-14b-2.1", str(t2v))


def test_a_lora_trained_through_the_flf2v_call_loads_into_the_pipeline_and_changes_it(folder, frames, tmp_path):
    """Two flow-matching steps of a LoRA through the FLF2V denoiser call on a clip's latents, its cached-form
    condition and both frames' CLIP tokens; the file st writes loads into WanImageToVideoPipeline and changes the
    video it renders from the same first and last frames."""
    from pipeline.families import lora

    trained = pipeline(folder, I2V)
    text = prompt_inputs(trained)
    first, last = (pixels(trained, image) for image in frames)
    clip = torch.cat([first.unsqueeze(2), first.unsqueeze(2).flip(-1).expand(-1, -1, FRAMES - 2, -1, -1),
                      last.unsqueeze(2)], dim=2)  # fmt: skip
    with torch.no_grad():
        latents = wan_i2v.normalise(trained.vae, trained.vae.encode(clip).latent_dist.mode())
    reference = wan_i2v.cached_conditioning(trained.vae, clip[0], 2, last=True)["0.latent"][None]
    embeds = wan_i2v.encode_first_last(trained.image_encoder, trained.image_processor, [frames[0]], [frames[1]])

    def predict(noisy, timesteps):
        return wan_i2v.FLF2V_FAMILY.denoiser_forward(trained.transformer, noisy, timesteps,
                                                     {**text, wan_i2v.IMAGE_EMBEDS_KEY: embeds},
                                                     reference=reference)  # fmt: skip

    losses, written = lora_by_hand(trained.transformer, latents, predict, tmp_path)
    assert all(np.isfinite(losses))
    plain = pipeline(folder, I2V)
    inputs = {"image": frames[0], "last_image": frames[1], "prompt_embeds": text["prompt_embeds"]}
    before = render(plain, **inputs)
    lora.load_weights(get_family("wan"), plain, written)
    after = render(plain, **inputs)
    assert before.shape == after.shape == (1, FRAMES, SIZE, SIZE, 3)
    assert float(np.abs(after - before).max()) > 1e-3
