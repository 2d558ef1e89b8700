"""Qwen-Image-Edit (`qwen_image` flavour edit-v1): the tiny model with its vision tower and PIL processor, prompt
embeddings computed with the reference image exactly as QwenImageEditPipeline.encode_prompt, the denoiser call with the
reference latents after the noisy ones, which runs choose the edit pipelines, Qwen-Image-Edit-Plus's (2509 / 2511)
prompt embeddings and zero_cond_t call (edit-v2+: tests/unit/test_qwen_image_edit_v2_plus.py)."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, InputError
from pipeline.families import get_family, load_components, qwen_image_edit

BASE = get_family("qwen_image")
EDIT = qwen_image_edit.FAMILY
PLUS = qwen_image_edit.PLUS_FAMILY
PROMPTS = ["make it red", "turn the circle into a square on a blue background"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen-edit") / "model"
    qwen_image_edit.tiny(folder, 0)
    return folder


@pytest.fixture(scope="module")
def pipe(model):
    from diffusers import QwenImageEditPipeline

    processor = load_components(EDIT, str(model), which=("text_encoders",))["tokenizers"][0]
    loaded = QwenImageEditPipeline.from_pretrained(str(model), processor=processor)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def picture(seed: int, size=(48, 40)):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_tiny_model_folder_is_an_edit_model_with_a_pil_processor(model):
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline"
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert (model / "processor" / "preprocessor_config.json").is_file()
    parts = load_components(EDIT, str(model), which=("text_encoders",))
    (encoder,), (processor,) = parts["text_encoders"], parts["tokenizers"]
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert encoder.config.vision_config.depth == 1  # the vision tower is there
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == encoder.config.image_token_id


def test_prompt_embeds_are_the_pipelines_with_the_reference_image(pipe):
    images = [picture(0), picture(1, (64, 32))]
    ours = EDIT.encode_prompts([pipe.text_encoder], [pipe.processor], PROMPTS, images=images)
    for prompt, image, item in zip(PROMPTS, images, ours):
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt(prompt, image=image, device="cpu")
        assert mask is None and bool(item["attention_mask"].all())  # one prompt: every token real
        assert torch.equal(item["prompt_embeds"], embeds[0])  # bit for bit
    # the image is part of the prompt: another reference gives other embeddings for the same caption
    other = EDIT.encode_prompts([pipe.text_encoder], [pipe.processor], PROMPTS[:1], images=[picture(2)])[0]
    assert not torch.equal(other["prompt_embeds"], ours[0]["prompt_embeds"])
    # without a reference (caption dropout's empty prompt): SimpleTuner's black 224x224 stand-in
    from PIL import Image

    blank = EDIT.encode_prompts([pipe.text_encoder], [pipe.processor], [""])[0]
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt("", image=Image.new("RGB", (224, 224)), device="cpu")
    assert torch.equal(blank["prompt_embeds"], embeds[0])
    with pytest.raises(ConfigError, match="tokenizer_max_length"):
        EDIT.encode_prompts([pipe.text_encoder], [pipe.processor], PROMPTS, max_length=64)


@pytest.mark.parametrize("reference_size", [(8, 12), (12, 8)], ids=["same", "other-size"])
def test_predict_is_the_pipelines_denoiser_call(pipe, reference_size):
    images = [picture(0), picture(1)]
    items = EDIT.encode_prompts([pipe.text_encoder], [pipe.processor], PROMPTS, images=images)
    batch = EDIT.collate_text(items)
    b, h, w = 2, 8, 12
    rh, rw = reference_size
    scale = pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(b, 16, h, w, generator=generator)
    pixels = torch.rand(b, 3, 1, rh * scale, rw * scale, generator=generator) * 2 - 1
    timesteps = torch.tensor([700.0, 250.0])
    with torch.no_grad():
        reference = pipe._encode_vae_image(pixels, None)  # B x C x 1 x h' x w', normalised per channel
        ours = EDIT.denoiser_forward(pipe.transformer, latents, timesteps, batch, reference=reference[:, :, 0])
        # the pipeline's loop: packed noise, then the packed image latents of prepare_latents
        packed, image_latents = pipe.prepare_latents(pixels, b, 16, h * scale, w * scale, torch.float32, "cpu", None,
                                                     latents=pipe._pack_latents(latents.unsqueeze(1), b, 16, h, w))
        padded_embeds = batch["prompt_embeds"]
        theirs = pipe.transformer(hidden_states=torch.cat([packed, image_latents], dim=1), timestep=timesteps / 1000,
                                  guidance=None, encoder_hidden_states_mask=batch["attention_mask"],
                                  encoder_hidden_states=padded_embeds,
                                  img_shapes=[[(1, h // 2, w // 2), (1, rh // 2, rw // 2)]] * b,
                                  return_dict=False)[0][:, : packed.shape[1]]  # fmt: skip
    assert torch.equal(ours, pipe._unpack_latents(theirs, h * scale, w * scale, scale)[:, :, 0])
    with pytest.raises(Exception, match="needs reference image latents"):
        EDIT.denoiser_forward(pipe.transformer, latents, timesteps, batch)


def test_flavours_and_edit_folders_choose_the_edit_pipelines(model, tmp_path):
    assert BASE.flavour_hub_id("edit-v1") == "Qwen/Qwen-Image-Edit"
    assert BASE.for_run("edit-v1", "Qwen/Qwen-Image-Edit") is EDIT
    assert BASE.for_run(None, str(model)) is EDIT  # the folder's model_index.json names QwenImageEditPipeline
    assert BASE.for_run("v2.0", "Qwen/Qwen-Image-2512") is BASE
    assert EDIT.takes_reference and EDIT.text_with_reference and EDIT.pipeline_class == "QwenImageEditPipeline"
    for flavour, hub_id in (("edit-v2", "Qwen/Qwen-Image-Edit-2509"), ("edit-v3", "Qwen/Qwen-Image-Edit-2511")):
        assert BASE.flavour_hub_id(flavour) == hub_id
    assert BASE.for_run("edit-v2", "Qwen/Qwen-Image-Edit-2509") is PLUS
    assert BASE.for_run("edit-v3", "Qwen/Qwen-Image-Edit-2511") is qwen_image_edit.V3_FAMILY
    plus = tmp_path / "plus"
    qwen_image_edit.tiny_plus(plus, 0)
    assert json.loads((plus / "model_index.json").read_text())["_class_name"] == "QwenImageEditPlusPipeline"
    assert BASE.for_run(None, str(plus)) is PLUS and PLUS.text_with_reference and PLUS.takes_reference


def test_plus_prompt_embeds_are_the_plus_pipelines(pipe):
    """QwenImageEditPlusPipeline gives Qwen2.5-VL each reference resized to a 384x384 area, in a "Picture 1:" slot."""
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    plus = QwenImageEditPlusPipeline(**pipe.components)
    images = [picture(0), picture(1, (64, 32))]
    ours = PLUS.encode_prompts([pipe.text_encoder], [pipe.processor], PROMPTS, images=images)
    for prompt, image, item in zip(PROMPTS, images, ours):
        width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, image.width / image.height)
        shown = plus.image_processor.resize(image, height, width)  # as its __call__ resizes before encode_prompt
        assert qwen_image_edit.condition_image(image).tobytes() == shown.tobytes()
        with torch.no_grad():
            embeds, _ = plus.encode_prompt(prompt, image=[shown], device="cpu")
        assert torch.equal(item["prompt_embeds"], embeds[0])
    v1 = EDIT.encode_prompts([pipe.text_encoder], [pipe.processor], PROMPTS[:1], images=images[:1])[0]
    assert not torch.equal(v1["prompt_embeds"], ours[0]["prompt_embeds"])  # another template and image size


def test_the_plus_call_with_zero_cond_t_is_the_pipelines(pipe):
    """Qwen-Image-Edit-2511's transformer gives the reference tokens timestep 0 itself (zero_cond_t in its config):
    the same call, whatever the flag."""
    items = PLUS.encode_prompts([pipe.text_encoder], [pipe.processor], PROMPTS[:1], images=[picture(0)])
    batch = PLUS.collate_text(items)
    generator = torch.Generator().manual_seed(3)
    latents, reference = torch.randn(1, 16, 8, 8, generator=generator), torch.randn(1, 16, 6, 10, generator=generator)
    timesteps = torch.tensor([500.0])
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_config({**pipe.transformer.config, "zero_cond_t": True}).eval()
    transformer.load_state_dict(pipe.transformer.state_dict())
    with torch.no_grad():
        plain = PLUS.denoiser_forward(pipe.transformer, latents, timesteps, batch, reference=reference)
        zero = PLUS.denoiser_forward(transformer, latents, timesteps, batch, reference=reference)
        packed = torch.cat([pipe._pack_latents(latents.unsqueeze(1), 1, 16, 8, 8),
                            pipe._pack_latents(reference.unsqueeze(1), 1, 16, 6, 10)], dim=1)  # fmt: skip
        theirs = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=None,
                             encoder_hidden_states_mask=None, encoder_hidden_states=batch["prompt_embeds"],
                             img_shapes=[[(1, 4, 4), (1, 3, 5)]], return_dict=False)[0][:, :16]  # fmt: skip
    scale = pipe.vae_scale_factor
    assert torch.equal(zero, pipe._unpack_latents(theirs, 8 * scale, 8 * scale, scale)[:, :, 0])
    assert not torch.equal(zero, plain)
    # edit-v3 trains with zero_cond_t (SimpleTuner's): a transformer without it is refused
    v3 = qwen_image_edit.V3_FAMILY
    with torch.no_grad():
        assert torch.equal(v3.denoiser_forward(transformer, latents, timesteps, batch, reference=reference), zero)
    with pytest.raises(InputError, match="edit-v3 .* zero_cond_t"):
        v3.denoiser_forward(pipe.transformer, latents, timesteps, batch, reference=reference)
