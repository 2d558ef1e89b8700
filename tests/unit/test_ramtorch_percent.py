"""`ramtorch_transformer_percent` (the share of the denoiser's selected Linear layers ramtorch streams, chosen as
SimpleTuner chooses them), the GPU sync after each streamed layer, and the states of SimpleTuner's other RamTorch and
context-parallel options."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.ramtorch_layers import convert, frozen_linears, stream
from pipeline.train import offload

from .test_ramtorch import HostLinear, flux_with_lora  # noqa: F401 (a fixture)


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False)


def test_the_share_is_the_first_layers_in_module_order(flux_with_lora):
    model = flux_with_lora()
    order = [t.name for t in frozen_linears(model, ["transformer_blocks.*"])[0]]
    record = stream(model, ["transformer_blocks.*"], torch.device("cpu"), make_layer=HostLinear, percent=30)
    streamed = [t.name for t in frozen_linears(flux_with_lora(), None)[0]
                if isinstance(model.get_submodule(_in_model(model, t.name)), HostLinear)]
    share = math.ceil(len(order) * 30 / 100)
    assert streamed == order[:share]
    assert record["layers"] == share and record["percent"] == 30


def _in_model(model: nn.Module, name: str) -> str:
    """A layer's name without adapters -> its name in the LoRA-wrapped model (peft's base layer)."""
    names = {n for n, _ in model.named_modules()}
    return f"{name}.base_layer" if f"{name}.base_layer" in names else name


def test_a_layer_inside_a_block_comes_before_the_next_sibling():
    """SimpleTuner walks depth-first: block.inner (inside the first child) is chosen before the parent's own head."""
    model = _frozen(nn.Module())
    model.block = nn.Sequential(nn.Linear(4, 4))
    model.head = nn.Linear(4, 4)
    _frozen(model)
    convert(model, None, torch.device("cpu"), label="test", make_layer=HostLinear, percent=50)
    assert isinstance(model.block[0], HostLinear) and type(model.head) is nn.Linear


@pytest.mark.parametrize(("percent", "streamed"), [(0, 0), (0.1, 1), (100, 10), (None, 10)])
def test_zero_streams_none_and_any_share_above_zero_at_least_one(percent, streamed):
    model = _frozen(nn.Sequential(*(nn.Linear(2, 2) for _ in range(10))))
    record = convert(model, None, torch.device("cpu"), label="test", make_layer=HostLinear, percent=percent)
    assert record["layers"] == streamed == sum(isinstance(m, HostLinear) for m in model)


def test_each_streamed_layer_waits_for_the_gpu_after_its_forward():
    model = _frozen(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    convert(model, None, torch.device("cuda"), label="test", make_layer=HostLinear)
    assert all(len(layer._forward_hooks) == 1 for layer in model)
    cpu = _frozen(nn.Sequential(nn.Linear(2, 2)))
    convert(cpu, None, torch.device("cpu"), label="test", make_layer=HostLinear)
    assert not cpu[0]._forward_hooks  # nothing to wait for off CUDA


def _load(tmp_path, **options):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_family": "wan", "ramtorch": True, **options}))
    return load_config(path)


def test_simpletuners_ramtorch_example_options_load(tmp_path):
    loaded = _load(tmp_path, ramtorch_transformer_percent=40, ramtorch_disable_extensions=True,
                   ramtorch_disable_sync_hooks=False, context_parallel_size=1,
                   context_parallel_comm_strategy="allgather")  # fmt: skip
    assert loaded.config.ramtorch_transformer_percent == 40
    assert "ramtorch_disable_sync_hooks" in loaded.ignored
    assert (loaded.config.context_parallel_size, loaded.config.context_parallel_comm_strategy) == (1, "allgather")


@pytest.mark.parametrize(("options", "message"), [
    ({"ramtorch_transformer_percent": 150}, "ramtorch_transformer_percent"),
    ({"ramtorch_disable_extensions": False}, "ramtorch_disable_extensions.*Linear layers only"),
])  # fmt: skip
def test_what_st_cannot_do_is_refused_naming_the_option(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, **options)


def test_place_streams_the_configured_share(flux_with_lora, monkeypatch):
    from pipeline import ramtorch_layers
    from pipeline.config import Config

    monkeypatch.setattr(ramtorch_layers, "_ramtorch_linear", HostLinear)
    model = flux_with_lora()
    total = len(frozen_linears(model, None)[0])
    options = dataclasses.replace(offload.MemoryOptions.from_config(Config(model_family="flux")), ramtorch=True,
                                  ramtorch_transformer_percent=50)  # fmt: skip
    offload.place(model, options, torch.device("cpu"))
    assert len(frozen_linears(model, None)[0]) == total - math.ceil(total / 2)
