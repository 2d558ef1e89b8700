"""lycoris_config read as SimpleTuner reads it, checked key by key; init_lokr_norm and init_lora on a tiny UNet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import lycoris_settings
from pipeline.errors import ConfigError
from pipeline.families import get_family, load_components
from pipeline.train import lycoris

EXAMPLE = {"algo": "lokr", "multiplier": 1.0, "full_matrix": True, "linear_alpha": 1, "factor": 16,
           "apply_preset": {"target_module": ["Attention", "FeedForward"],
                            "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}}}}  # fmt: skip


def write(folder: Path, settings) -> Path:
    path = folder / "lycoris.json"
    path.write_text(settings if isinstance(settings, str) else json.dumps(settings))
    return path


def test_simpletuner_example_is_read_as_is(tmp_path):
    assert lycoris_settings.read_config(write(tmp_path, EXAMPLE)) == EXAMPLE


@pytest.mark.parametrize(("settings", "named"), [
    ({"algo": "lokr", "linera_dim": 4}, "'linera_dim'"),
    ({"algo": "lokrr"}, "'algo'"),
    ({"algo": "tlora"}, "'algo'"),
    ({"linear_dim": "four"}, "'linear_dim'"),
    ({"linear_dim": 0}, "'linear_dim'"),
    ({"preset": "everything"}, "'preset'"),
    ({"apply_preset": ["Attention"]}, "'apply_preset'"),
    ({"apply_preset": {"target_modules": ["Attention"]}}, "'apply_preset.target_modules'"),
    ({"apply_preset": {"module_algo_map": {"Attention": {"factr": 2}}}}, "'apply_preset.module_algo_map.Attention.factr'"),
    ("[1, 2]", "JSON object"),
    ("{not json", "not valid JSON"),
])  # fmt: skip
def test_bad_settings_name_the_file_and_key(tmp_path, settings, named):
    path = write(tmp_path, settings)
    with pytest.raises(ConfigError) as error:
        lycoris_settings.read_config(path)
    assert str(path) in str(error.value) and named in str(error.value)


def test_missing_file_and_relative_paths(tmp_path):
    with pytest.raises(ConfigError, match="lycoris_config .*nowhere.json.*cannot be read"):
        lycoris_settings.read_config(tmp_path / "nowhere.json")
    with pytest.raises(ConfigError, match="needs lycoris_config"):
        lycoris_settings.resolve_config_path(None, tmp_path)
    assert lycoris_settings.resolve_config_path("sub/l.json", tmp_path) == tmp_path / "sub" / "l.json"


def unet(tiny_model):
    return load_components(get_family("sd1x"), str(tiny_model("sd1x")), which=("denoiser",))["denoiser"]


def test_init_lokr_norm_starts_w1_at_one_and_w2_near_the_base_statistics(tiny_model):
    import torch

    denoiser = unet(tiny_model)
    torch.manual_seed(0)
    network = lycoris.build(denoiser, {"algo": "lokr", "linear_dim": 4, "factor": 4, "full_matrix": True},
                            source="test", init_lokr_norm=1e-3)  # fmt: skip
    assert network.loras
    for module in network.loras:
        assert torch.equal(module.lokr_w1, torch.ones_like(module.lokr_w1))
        base = module.org_module[0].weight.detach()
        assert float(module.lokr_w2.detach().abs().max()) > 0
        assert abs(float(module.lokr_w2.detach().mean()) - float(base.mean()) * 1e-3) < 1e-7
    with pytest.raises(ConfigError, match="init_lokr_norm needs LoKr modules"):
        lycoris.build(unet(tiny_model), {"algo": "loha"}, source="test", init_lokr_norm=1e-3)


def test_init_lora_starts_from_a_saved_network(tiny_model, tmp_path):
    import torch

    first = lycoris.build(unet(tiny_model), {"algo": "loha", "linear_dim": 2}, source="test")
    with torch.no_grad():
        for p in first.parameters():
            p.normal_()
    saved = lycoris.save(first, tmp_path / "start.safetensors", {"algo": "loha"})
    second = lycoris.build(unet(tiny_model), {"algo": "lokr"}, source="test", init_lora=saved)
    state = lycoris.state(second)
    assert {type(m).__name__ for m in second.loras} == {"LohaModule"}  # the file's algorithm, not the config's
    assert state.keys() == lycoris.state(first).keys()
    assert all(torch.equal(v, lycoris.state(first)[k]) for k, v in state.items())


def test_a_preset_does_not_leak_into_the_next_network(tiny_model):
    narrow = lycoris.build(unet(tiny_model), {"algo": "locon", "apply_preset": {"target_module": ["FeedForward"]}},
                           source="test")  # fmt: skip
    wide = lycoris.build(unet(tiny_model), {"algo": "locon"}, source="test")
    assert 0 < len(narrow.loras) < len(wide.loras)


def test_the_stage_key_part_is_the_file_content(tmp_path):
    from pipeline.config import Config

    config = Config(model_type="lora", lora_type="lycoris", lycoris_config="lycoris.json")
    write(tmp_path, EXAMPLE)
    first = lycoris_settings.key_content(config, tmp_path)
    write(tmp_path, {**EXAMPLE, "factor": 8})
    assert first == EXAMPLE and lycoris_settings.key_content(config, tmp_path)["factor"] == 8
    assert lycoris_settings.key_content(Config(model_type="lora"), tmp_path) is None


def test_init_lora_without_lycoris_modules_is_refused(tiny_model, tmp_path):
    import torch

    from pipeline.errors import InputError
    from pipeline.tensorfile import save_tensors

    peft_style = tmp_path / "peft.safetensors"
    save_tensors(peft_style, {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 4)})
    with pytest.raises(InputError, match="init_lora .*peft.safetensors: holds no LyCORIS module"):
        lycoris.build(unet(tiny_model), {"algo": "lokr"}, source="test", init_lora=peft_style)
