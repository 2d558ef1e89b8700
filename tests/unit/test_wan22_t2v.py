"""Wan 2.2 T2V A14B and SimpleTuner's AnimeGen stage flavours (`wan22.T2V_STAGES`) on `st tiny-model wan DIR --flavour
t2v-2.2`: the folder, the flavours' routing and refusals, each expert's call replayed against WanPipeline's own
around the boundary, the stage files (Wan's original keys or diffusers' layout) read through an offline hub cache,
and validation's slots with the other stage's file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError, InputError
from pipeline.families import get_family, wan22
from tests.helpers.wan import (animegen_cache, assert_same_weights, pipeline_calls, prompt_inputs, shifted,
                               stage_config)  # fmt: skip


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model("wan", flavour="t2v-2.2")


@pytest.fixture(scope="module")
def pipe(wan_pipeline):
    return wan_pipeline("t2v-2.2")


@pytest.fixture(scope="module")
def experts(pipe):
    """AnimeGen's stand-ins: the folder's experts, each moved (so that a stage file is told from the folder's)."""
    return shifted(pipe.transformer, 0.01), shifted(pipe.transformer_2, -0.01)


@pytest.fixture
def offline(monkeypatch):
    """`use(cache)`: this process reads the hub only from the hub cache `cache` (HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def use(cache: Path) -> None:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    return use


def test_tiny_model_is_a_two_expert_t2v_folder(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["boundary_ratio"] == 0.875
    assert index["transformer"][1] == index["transformer_2"][1] == "WanTransformer3DModel"
    for sub in ("transformer", "transformer_2"):
        config = json.loads((folder / sub / "config.json").read_text())
        assert config["in_channels"] == 16 and config["image_dim"] is None
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() != \
        (folder / "transformer_2" / "diffusion_pytorch_model.safetensors").read_bytes()  # fmt: skip


def test_the_animegen_flavours_train_their_stage_and_a_two_expert_folder_needs_one(folder, tmp_path):
    wan = get_family("wan")
    assert wan.flavour_hub_id("animegen-t2v-high") == wan.flavour_hub_id("animegen-t2v-low") == wan22.T2V_HUB_ID
    high, low = wan.for_run("animegen-t2v-high", str(folder)), wan.for_run("animegen-t2v-low", str(folder))
    assert high is wan22.T2V_HIGH and low is wan22.T2V_LOW
    assert wan.for_run("animegen-t2v-low", wan22.T2V_HUB_ID) is wan22.T2V_LOW  # a hub id not in the cache
    assert (wan22.stage_of(high).subfolder, wan22.stage_of(low).subfolder) == ("transformer", "transformer_2")
    stage = wan22.stage_of(low)  # SimpleTuner's WAN_STAGE_OVERRIDES values
    assert (stage.boundary_ratio, stage.flow_shift, stage.sample_steps, stage.guidance) == (0.875, 3.0, 8, 1.0)
    assert high.default_flow_shift == low.default_flow_shift == 3.0 and high.pipeline_class == "WanPipeline"
    assert high.latent_channels == 16 and wan22.weights_subfolder(low) is None  # its weights are the stage file's
    with pytest.raises(ConfigError, match="two transformers.*animegen-t2v-high.*animegen-t2v-low"):
        wan.for_run(None, str(folder))
    with pytest.raises(ConfigError, match="i2v-14b-2.2-low trains one expert of Wan 2.2 I2V A14B.*WanPipeline"):
        wan.for_run("i2v-14b-2.2-low", str(folder))
    one = tmp_path / "one"
    one.mkdir()
    (one / "model_index.json").write_text('{"_class_name": "WanPipeline", "transformer": '
                                          '["diffusers", "WanTransformer3DModel"]}')  # fmt: skip
    with pytest.raises(ConfigError, match="animegen-t2v-low.*without transformer_2"):
        wan.for_run("animegen-t2v-low", str(one))


def test_each_expert_call_of_the_pipeline_is_the_stage_familys_denoiser_call(pipe):
    """WanPipeline runs `transformer` at t >= 875 and `transformer_2` below; each call, replayed through the stage
    family's `denoiser_forward`, gives the same output, bit for bit."""
    text = prompt_inputs(pipe)
    calls = pipeline_calls(pipe, "transformer", "transformer_2", steps=6, prompt_embeds=text["prompt_embeds"])
    steps = [(name, float(kw["timestep"][0])) for name, _, kw, _ in calls]
    assert {(name, t >= 875) for name, t in steps} == {("transformer", True), ("transformer_2", False)}
    assert any(875 <= t < 950 for _, t in steps) and any(800 < t < 875 for _, t in steps)  # around the boundary
    for name, module, kwargs, output in calls:
        family = wan22.T2V_HIGH if name == "transformer" else wan22.T2V_LOW
        hidden = kwargs["hidden_states"]
        assert hidden.shape == (1, 16, 2, 8, 8)
        with torch.no_grad():
            ours = family.denoiser_forward(module, hidden, kwargs["timestep"], text)
        torch.testing.assert_close(ours, output, rtol=0, atol=0)


@pytest.mark.parametrize("original", [True, False], ids=["original-keys", "diffusers-layout"])
def test_stage_files_come_from_the_hub_cache_in_either_format(folder, experts, offline, tmp_path, original):
    """The stage's file is read through the (offline) hub cache and loaded as SimpleTuner does (from_single_file) with
    the base folder's slot config: the same weights whichever key format the file uses."""
    from pipeline.families.identity import denoiser_source

    offline(animegen_cache(tmp_path / "hub", *experts, original=original))
    wan = get_family("wan")
    for flavour, expert in zip(("animegen-t2v-high", "animegen-t2v-low"), experts, strict=True):
        source = denoiser_source(stage_config(flavour), wan, str(folder), folder)
        name = wan22.stage_of(wan.for_run(flavour, str(folder))).file
        assert Path(source.source).name == name and Path(source.source).is_file() and source.subfolder is None
        assert source.single_file_config == (str(folder), "transformer" if "high" in flavour else "transformer_2")
        assert wan22.single_file_format(source.source) == ("original" if original else "diffusers")
        loaded = wan22.load_single_file(wan, source.source, *source.single_file_config)
        assert_same_weights(loaded, expert)


def test_a_missing_or_foreign_stage_file_is_refused(folder, offline, tmp_path):
    from safetensors.torch import save_file

    from pipeline.families.identity import denoiser_source

    offline(tmp_path / "empty")
    with pytest.raises(InputError, match="low_noise.safetensors.*aidealab/AnimeGen-T2V.*hub cache"):
        denoiser_source(stage_config("animegen-t2v-low"), get_family("wan"), str(folder), folder)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(InputError, match="holds no Wan transformer"):
        wan22.single_file_format(foreign)
    # pretrained_transformer_model_name_or_path replaces the stage file (a file, or the folder's own expert)
    config = stage_config("animegen-t2v-high")
    config.pretrained_transformer_model_name_or_path = str(foreign)
    source = denoiser_source(config, get_family("wan"), str(folder), folder)
    assert (source.source, source.single_file_config) == (str(foreign), (str(folder), "transformer"))
    config = stage_config("animegen-t2v-low")
    config.pretrained_transformer_model_name_or_path, config.pretrained_transformer_subfolder = str(folder), \
        "transformer_2"  # fmt: skip
    source = denoiser_source(config, get_family("wan"), str(folder), folder)
    assert (source.source, source.subfolder, source.single_file_config) == (str(folder), "transformer_2", None)
    config.pretrained_transformer_subfolder = "transformer"  # the high-noise expert under the low stage's flavour
    with pytest.raises(ConfigError, match="animegen-t2v-low trains the low-noise expert.*set it to transformer_2"):
        denoiser_source(config, get_family("wan"), str(folder), folder)


def test_validation_loads_the_other_stages_file_beside_the_trained_one(folder, experts, offline, tmp_path):
    offline(animegen_cache(tmp_path / "hub", *experts))
    trained = experts[1]
    alone = wan22.pipeline_components(wan22.T2V_LOW, str(folder), trained, False, "cpu")
    assert alone == {"transformer": trained, "transformer_2": None, "boundary_ratio": None}
    both = wan22.pipeline_components(wan22.T2V_LOW, str(folder), trained, True, "cpu")
    assert both["transformer_2"] is trained and both["boundary_ratio"] == 0.875
    assert not any(p.requires_grad for p in both["transformer"].parameters())
    assert_same_weights(both["transformer"], experts[0])  # AnimeGen's high-noise file, not the folder's expert
