"""Wan 2.2 I2V A14B (`wan22`, the i2v-14b-2.2-high / -low flavours) on `st tiny-model wan DIR --flavour i2v-2.2`: the
two experts' slots and boundary, the flavours' routing and refusals, the trained expert's weights, the denoiser call
replayed against WanImageToVideoPipeline's own calls, and validation's slots."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.families import get_family, wan22, wan_i2v
from tests.helpers.wan import assert_same_weights, pipeline_calls, pixels, prompt_inputs, random_frames, stage_config


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model("wan", flavour="i2v-2.2")


@pytest.fixture(scope="module")
def pipe(wan_pipeline):
    return wan_pipeline("i2v-2.2", "WanImageToVideoPipeline")


@pytest.fixture(scope="module")
def first_frame():
    return random_frames(1)[0]


def test_tiny_model_is_a_two_expert_i2v_folder_without_clip(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["boundary_ratio"] == 0.9
    assert index["transformer"][1] == index["transformer_2"][1] == "WanTransformer3DModel"
    assert index["image_encoder"] == [None, None]
    for sub in ("transformer", "transformer_2"):
        config = json.loads((folder / sub / "config.json").read_text())
        assert config["in_channels"] == 36 and config["image_dim"] is None
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() != \
        (folder / "transformer_2" / "diffusion_pytorch_model.safetensors").read_bytes()  # fmt: skip


def test_the_flavours_train_their_stage_and_a_two_expert_folder_needs_one(folder, tmp_path):
    wan = get_family("wan")
    assert wan.flavour_hub_id("i2v-14b-2.2-high") == wan.flavour_hub_id("i2v-14b-2.2-low") == wan22.HUB_ID
    high, low = wan.for_run("i2v-14b-2.2-high", str(folder)), wan.for_run("i2v-14b-2.2-low", str(folder))
    assert high is wan22.I2V_HIGH and low is wan22.I2V_LOW
    assert wan.for_run("i2v-14b-2.2-low", wan22.HUB_ID) is wan22.I2V_LOW  # a hub id not in the cache
    assert (wan22.stage_of(high).subfolder, wan22.stage_of(low).subfolder) == ("transformer", "transformer_2")
    assert high.default_flow_shift == low.default_flow_shift == 5.0  # SimpleTuner's stage flow_shift
    assert high.pipeline_class == wan_i2v.PIPELINE_CLASS and high.denoiser.subfolder == "transformer"
    with pytest.raises(ConfigError, match="i2v-14b-2.2-high.*i2v-14b-2.2-low"):
        wan.for_run(None, str(folder))
    one = tmp_path / "one"
    one.mkdir()
    (one / "model_index.json").write_text('{"_class_name": "WanImageToVideoPipeline", "transformer": '
                                          '["diffusers", "WanTransformer3DModel"]}')  # fmt: skip
    with pytest.raises(ConfigError, match="without transformer_2"):
        wan.for_run("i2v-14b-2.2-high", str(one))
    with pytest.raises(ConfigError, match="animegen-t2v-high trains one stage of AnimeGen.*WanImageToVideoPipeline"):  # a T2V stage on an i2v folder
        wan.for_run("animegen-t2v-high", str(folder))


def test_the_low_stage_reads_transformer_2(folder):
    """The low stage's weights come from `transformer_2` (its slot and LoRA prefix stay `transformer`); the high
    stage reads the model's own `transformer`."""
    from pipeline.families.identity import denoiser_source

    wan = get_family("wan")
    config = stage_config("i2v-14b-2.2-low")
    low = denoiser_source(config, wan, str(folder), folder)
    assert (low.source, low.subfolder) == (str(folder), "transformer_2")
    config.model_flavour = "i2v-14b-2.2-high"
    assert denoiser_source(config, wan, str(folder), folder) is None


def test_each_expert_call_of_the_pipeline_is_the_familys_denoiser_call(pipe, first_frame):
    """WanImageToVideoPipeline runs `transformer` at t >= 900 and `transformer_2` below; each call, replayed through
    the stage family's `denoiser_forward` with the condition latents as `reference`, gives the same output."""
    text = prompt_inputs(pipe)
    calls = pipeline_calls(pipe, "transformer", "transformer_2", steps=4, image=first_frame,
                           prompt_embeds=text["prompt_embeds"])  # fmt: skip
    routed = [(name, float(kw["timestep"][0]) >= 900) for name, _, kw, _ in calls]
    assert set(routed) == {("transformer", True), ("transformer_2", False)}  # both experts, each its side
    assert all(kw["encoder_hidden_states_image"] is None for _, _, kw, _ in calls)
    for name, module, kwargs, output in calls:
        family = wan22.I2V_HIGH if name == "transformer" else wan22.I2V_LOW
        hidden = kwargs["hidden_states"]
        assert hidden.shape == (1, 36, 2, 8, 8)
        with torch.no_grad():
            ours = family.denoiser_forward(module, hidden[:, :16], kwargs["timestep"], text, reference=hidden[:, 20:])
        torch.testing.assert_close(ours, output, rtol=0, atol=0)
        torch.testing.assert_close(hidden[:, 16:20], wan_i2v.first_frame_mask(1, 2, 8, 8, 4), rtol=0, atol=0)


def test_validation_slots_follow_wan_validation_load_other_stage(folder, pipe):
    """SimpleTuner's default: the trained expert alone in `transformer`, no boundary; with the other stage loaded,
    the trained expert in its own slot and the frozen other one (from the model folder) in the other."""
    trained = pipe.transformer_2
    alone = wan22.validation_components(wan22.I2V_LOW, str(folder), trained, False, "cpu")
    assert alone == {"transformer": trained, "transformer_2": None, "boundary_ratio": None}
    both = wan22.validation_components(wan22.I2V_LOW, str(folder), trained, True, "cpu")
    assert both["transformer_2"] is trained and both["boundary_ratio"] == 0.9
    assert not any(p.requires_grad for p in both["transformer"].parameters())
    assert_same_weights(both["transformer"], pipe.transformer)
    high = wan22.validation_components(wan22.I2V_HIGH, str(folder), pipe.transformer, True, "cpu")
    assert high["transformer"] is pipe.transformer and high["transformer_2"] is not pipe.transformer_2


@pytest.fixture(scope="module")
def ti2v_folder(tiny_model):
    return tiny_model("wan", flavour="ti2v")


def test_ti2v_folder_flavour_and_variant(ti2v_folder, folder):
    index = json.loads((ti2v_folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["expand_timesteps"] is True
    vae = json.loads((ti2v_folder / "vae" / "config.json").read_text())
    assert (vae["z_dim"], vae["patch_size"], vae["is_residual"], vae["scale_factor_temporal"]) == (48, 2, True, 4)
    wan = get_family("wan")
    assert wan.flavour_hub_id("ti2v-5b-2.2") == wan22.TI2V_HUB_ID
    for flavour in (None, "ti2v-5b-2.2"):
        assert wan.for_run(flavour, str(ti2v_folder)) is wan22.TI2V
    assert wan22.TI2V.latent_channels == 48 and wan22.TI2V.bucket_alignment == 64
    with pytest.raises(ConfigError, match="TI2V 5B.*expand_timesteps"):
        wan.for_run("ti2v-5b-2.2", str(folder))


def test_ti2v_denoiser_call_is_the_i2v_pipelines_with_expand_timesteps(wan_pipeline, first_frame):
    """WanImageToVideoPipeline (expand_timesteps) on the TI2V folder: latent frame 0 is the first frame's condition
    with timestep 0 on its tokens; the family's call on (latents, cached condition) gives the same output, and the
    condition `st cache` stores for the clip matches the pipeline's at frame 0."""
    pipe = wan_pipeline("ti2v", "WanImageToVideoPipeline")
    assert pipe.config.expand_timesteps and pipe.transformer_2 is None and pipe.image_encoder is None
    text = prompt_inputs(pipe)
    seen = pipeline_calls(pipe, steps=2, image=first_frame, prompt_embeds=text["prompt_embeds"])
    cached = wan_i2v.condition_from_first_frame(pipe.vae, pixels(pipe, first_frame), latent_frames=2)[:, 4:]
    for _, _, kwargs, output in seen:
        hidden, tokens = kwargs["hidden_states"], kwargs["timestep"]
        assert hidden.shape == (1, 48, 2, 4, 4) and tokens.shape == (1, 2 * 2 * 2)
        assert bool((tokens[:, :4] == 0).all()) and bool((tokens[:, 4:] > 0).all())
        torch.testing.assert_close(cached[:, :, :1], hidden[:, :, :1], rtol=1e-4, atol=1e-5)
        noisy = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
        noisy[:, :, 1:] = hidden[:, :, 1:]
        reference = torch.cat([hidden[:, :, :1], cached[:, :, 1:]], dim=2)
        with torch.no_grad():
            ours = wan22.TI2V.denoiser_forward(pipe.transformer, noisy, tokens[:, -1], text, reference=reference)
        torch.testing.assert_close(ours, output, rtol=0, atol=0)
