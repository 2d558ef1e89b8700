"""The Wan 2.1 image-to-video variant of the wan family (`wan_i2v.FAMILY`) and `st tiny-model wan DIR --flavour i2v`:
the folder the command writes is a WanImageToVideoPipeline, and the variant's denoiser call takes the first-frame
condition and CLIP embeddings from the text batch, as the trainer hands per-batch extras to the denoiser."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import InputError
from pipeline.families import get_family, wan, wan_i2v
from tests.helpers.wan import prompt_inputs


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model("wan", flavour="i2v")


def test_tiny_model_writes_the_i2v_pipeline_folder(folder):
    """`st tiny-model wan DIR --flavour i2v` writes a WanImageToVideoPipeline folder with its CLIP image encoder and
    image processor, small enough for tests."""
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["image_encoder"][1] == "CLIPVisionModel" and index["image_processor"][1].startswith("CLIPImageProcessor")
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 4 << 20


def test_tiny_model_refuses_a_flavour_the_family_has_no_tiny_model_of(cli, tmp_path):
    result = cli("tiny-model", "sd1x", tmp_path / "m", "--flavour", "i2v")
    assert result.exit_code == 2
    assert "no flavour 'i2v' for sd1x" in result.output
    assert not (tmp_path / "m").exists()


def test_the_variant_is_wan_with_the_i2v_pipeline_and_tiny_model():
    family = wan_i2v.FAMILY
    assert family.pipeline_class == "WanImageToVideoPipeline" and family.tiny is wan_i2v.tiny
    base = get_family("wan")
    assert (family.name, family.text_encoders, family.vae, family.lora_targets, family.video) == \
        (base.name, base.text_encoders, base.vae, base.lora_targets, base.video)  # fmt: skip
    assert family.takes_reference and family.variant is None
    assert family.temporal_compression == wan.TEMPORAL_COMPRESSION == wan_i2v.TEMPORAL


def test_denoiser_forward_is_the_pipelines_call_on_the_cached_condition(wan_pipeline):
    """`Family.denoiser_forward` of the variant, given the cached condition latents as `reference` (in the cache's
    dtype) and the CLIP embeddings beside the text, equals `wan_i2v.predict` on the 20-channel condition the
    pipeline builds; without the embeddings it refuses, naming them."""
    pipe = wan_pipeline("i2v", "WanImageToVideoPipeline")
    text = prompt_inputs(pipe)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 2, 8, 8, generator=generator)
    reference = torch.randn(1, 16, 2, 8, 8, generator=generator).half()
    embeds = torch.randn(1, 17, pipe.image_encoder.config.hidden_size, generator=generator).half()
    condition = torch.cat([wan_i2v.first_frame_mask(1, 2, 8, 8, wan_i2v.TEMPORAL), reference.float()], dim=1)
    timesteps = torch.tensor([500.0])
    with torch.no_grad():
        ours = wan_i2v.FAMILY.denoiser_forward(pipe.transformer, latents, timesteps,
                                               {**text, wan_i2v.IMAGE_EMBEDS_KEY: embeds}, reference=reference)
        expected = wan_i2v.predict(pipe.transformer, latents, timesteps, text, condition, embeds.float())
    assert ours.shape == latents.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    with pytest.raises(InputError, match="image_embeds"):
        wan_i2v.FAMILY.denoiser_forward(pipe.transformer, latents, timesteps, text, reference=reference)


def test_an_flf2v_transformer_is_refused_by_the_first_frame_i2v_call(folder, tmp_path):
    """A Wan 2.1 FLF2V transformer (pos_embed_seq_len: two images' CLIP tokens) handed to the first-frame i2v call (a
    denoiser override) is refused at its first call, naming the flavour that trains it; FLF2V folders themselves
    train as `wan_i2v.FLF2V_FAMILY` (tests/unit/test_wan_flf2v.py)."""
    import shutil

    flf2v = tmp_path / "flf2v"
    shutil.copytree(folder, flf2v)
    config_path = flf2v / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "pos_embed_seq_len": 2 * 17}))
    assert get_family("wan").for_run(None, str(folder)) is wan_i2v.FAMILY
    assert get_family("wan").for_run(None, str(flf2v)) is wan_i2v.FLF2V_FAMILY

    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(str(flf2v), subfolder="transformer")
    with pytest.raises(InputError, match="first/last-frame-to-video.*model_flavour flf2v-14b-2.1"):
        wan_i2v.family_predict(transformer, torch.zeros(1, 16, 2, 8, 8), torch.tensor([500.0]),
                               {wan_i2v.IMAGE_EMBEDS_KEY: torch.zeros(1, 17, 16)},
                               reference=torch.zeros(1, 16, 2, 8, 8))  # fmt: skip
