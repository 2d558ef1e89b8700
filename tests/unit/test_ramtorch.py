"""RamTorch (`ramtorch`, `ramtorch_target_modules`): which Linear layers of a LoRA-wrapped tiny Flux are streamed
from host memory, that the adapters are never among them, and the refusals. ramtorch's layers need CUDA; on the CPU
the replacement is checked with a host-memory layer of the same contract (its weights stay on the CPU whatever
`.to()` says), and on a GPU with ramtorch's own."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError
from pipeline.ramtorch_layers import frozen_linears, matches, parse_targets, stream
from pipeline.train import offload

CUDA = torch.device("cuda")


class HostLinear(nn.Module):
    """Keeps its weights on the CPU (device moves are ignored, as ramtorch's layer does) and computes on the
    input's device."""

    def __init__(self, linear: nn.Linear, device) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.data.to("cpu"), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)

    def _apply(self, fn, recurse=True):
        return self

    def forward(self, x):
        return F.linear(x, self.weight.to(x.device), None if self.bias is None else self.bias.to(x.device))


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("", None), (" , ", None), ("transformer_blocks.*", ["transformer_blocks.*"]),
    ("a.*, b ,,c", ["a.*", "b", "c"]), (["a,b", "c"], ["a", "b", "c"]),
])  # fmt: skip
def test_target_modules_are_comma_separated_globs(value, expected):
    assert parse_targets(value) == expected


@pytest.mark.parametrize(("name", "patterns", "selected"), [
    ("transformer_blocks.0.attn.to_q", None, True),
    ("transformer_blocks.0.attn.to_q", ["transformer_blocks.*"], True),
    ("single_transformer_blocks.0.proj_out", ["transformer_blocks.*"], False),
    ("transformer_blocks.0.attn.to_q", ["*.to_q"], True),
    ("transformer_blocks.0.attn.to_k", ["*.to_q"], False),
    ("transformer_blocks.0.attn.to_q", ["transformer_blocks.0"], True),  # a bare name covers what is under it
    ("transformer_blocks.10.attn.to_q", ["transformer_blocks.1"], False),
    ("transformer_blocks.3.ff.net.2", ["3.ff.*"], True),  # the name without its first component
    ("proj_out", ["Linear"], True),  # the class name
])  # fmt: skip
def test_targets_match_as_in_simpletuner(name, patterns, selected):
    assert matches(name, "Linear", patterns) is selected


@pytest.fixture(scope="module")
def flux_with_lora(tiny_model):
    """A tiny Flux with a rank-4 LoRA on SimpleTuner's default targets, as `st train` attaches it."""
    from diffusers import FluxTransformer2DModel

    from pipeline.families import get_family
    from pipeline.train import adapters
    from pipeline.train.options import AdapterOptions

    def build():
        torch.manual_seed(0)
        model = FluxTransformer2DModel.from_pretrained(tiny_model("flux") / "transformer")
        config = Config(model_family="flux", lora_rank=4, lora_dropout=0.0)
        adapters.attach(model, AdapterOptions.from_config(config), get_family("flux"))
        for name, param in model.named_parameters():  # lora_B starts at zero: give the adapters an effect
            if param.requires_grad:
                param.data.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        return model

    return build


def flux_inputs(model):
    g = torch.Generator().manual_seed(1)
    c = model.config
    return {"hidden_states": torch.randn(1, 16, c.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(1, 8, c.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g),
            "timestep": torch.tensor([0.5]), "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3),
            "guidance": torch.tensor([3.5]) if c.guidance_embeds else None}  # fmt: skip


def output_and_grads(model):
    model.zero_grad(set_to_none=True)
    out = model(**flux_inputs(model)).sample
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_streamed_layers_are_the_frozen_linears_the_patterns_name(flux_with_lora):
    model = flux_with_lora()
    expected_out, expected_grads = output_and_grads(model)
    frozen = {n for n, m in model.named_modules() if type(m) is nn.Linear and not m.weight.requires_grad}
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    storage = {n: p.data_ptr() for n, p in lora.items()}

    record = stream(model, ["single_transformer_blocks.*"], torch.device("cpu"), make_layer=HostLinear)

    streamed = {n for n, m in model.named_modules() if isinstance(m, HostLinear)}
    # Named as without adapters in the patterns, the peft wrapper's base layer is what is replaced.
    assert streamed == {n for n in frozen if n.startswith("single_transformer_blocks.")}
    assert any(n.endswith(".to_q.base_layer") for n in streamed)
    assert record == {"layers": len(streamed), "of": len(frozen), "targets": ["single_transformer_blocks.*"]}
    assert not any(".lora_" in n for n in streamed)
    assert {n: p.data_ptr() for n, p in model.named_parameters() if p.requires_grad} == storage
    out, grads = output_and_grads(model)
    assert torch.equal(out, expected_out)
    assert grads.keys() == expected_grads.keys()
    assert all(torch.equal(grads[n], expected_grads[n]) for n in grads)


def test_place_streams_first_and_moves_the_rest(flux_with_lora, monkeypatch):
    """`place` hands the layers to host memory before moving the denoiser; `hold` records what it streamed."""
    from pipeline import ramtorch_layers

    monkeypatch.setattr(ramtorch_layers, "_ramtorch_linear", HostLinear)
    model = flux_with_lora()
    options = dataclasses.replace(offload.MemoryOptions.from_config(Config(model_family="flux")), ramtorch=True)
    offload.place(model, options, torch.device("cpu"))
    memory = offload.hold(model, options, "flux", torch.device("cpu"))
    total = len(frozen_linears(flux_with_lora(), None)[0])
    assert memory.record()["ramtorch"] == {"layers": total, "of": total, "targets": None}
    assert not frozen_linears(model, None)[0]  # every frozen Linear streams; none was replaced twice


def options(**changes) -> offload.MemoryOptions:
    base = offload.MemoryOptions.from_config(Config(model_family="flux", ramtorch=True))
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"enable_group_offload": True}, "ramtorch and enable_group_offload"),
    ({"musubi_blocks_to_swap": 2}, "ramtorch and musubi_blocks_to_swap"),
    ({"enable_model_cpu_offload": True}, "ramtorch and enable_model_cpu_offload"),
    ({"base_model_precision": "int8-quanto"}, "base_model_precision int8-quanto quantises them"),
    ({"model_type": "full"}, "with model_type full every weight trains"),
    ({"num_processes": 2}, "several processes"),
    ({"ramtorch_target_modules": " , "}, "names no pattern"),
])  # fmt: skip
def test_combinations_simpletuner_refuses_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        offload.check(options(**changes), CUDA)


def test_ramtorch_needs_a_gpu_and_passes_on_one():
    offload.check(options(ramtorch_target_modules="transformer_blocks.*"), CUDA)
    with pytest.raises(ConfigError, match="ramtorch needs a CUDA or ROCm GPU .* this run trains on cpu"):
        offload.check(options(), torch.device("cpu"))


def test_simpletuner_configs_with_ramtorch_load(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"--model_family": "flux", "--ramtorch": True, "--ramtorch_target_modules": "*.to_q",
                                "--ramtorch_controlnet": True, "--ramtorch_text_encoder": True,
                                "--ramtorch_vae": True}))  # fmt: skip
    config = load_config(path).config
    assert (config.ramtorch, config.ramtorch_target_modules) == (True, "*.to_q")
    assert (config.ramtorch_text_encoder, config.ramtorch_vae, config.ramtorch_controlnet) == (True, True, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="ramtorch's layers need a CUDA device")
def test_ramtorch_layers_train_the_same_lora_on_a_gpu(flux_with_lora):
    reference = flux_with_lora().to(CUDA)
    expected_out, expected_grads = output_and_grads(_on(reference))
    model = flux_with_lora()
    offload.place(model, options(), CUDA)
    streamed = [m for m in model.modules() if getattr(m, "is_ramtorch", False)]
    assert streamed and all(m.weight.device.type == "cpu" and m.weight.is_pinned() for m in streamed)
    assert all(p.device.type == "cuda" for p in model.parameters() if p.requires_grad)
    out, grads = output_and_grads(_on(model))
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-6)


def _on(model):
    """`model` whose forward receives its inputs on the GPU."""
    forward = model.forward
    model.forward = lambda **kw: forward(**{k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in kw.items()})
    return model
