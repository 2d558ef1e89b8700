"""RamTorch beyond the denoiser: `ramtorch_text_encoder` (every text encoder's Linear layers), `ramtorch_vae` (the VAE
mid blocks' Linear layers only) and `ramtorch_controlnet` (a ControlNet's, trainable ones included), on the real tiny
SDXL VAE and CLIP encoders and a tiny Flux ControlNet; the refusals; what the train manifest records.

ramtorch's own layer cannot run on a CPU-only machine (it pins host memory and copies on CUDA streams: constructing it
raises "Cannot access accelerator device when none is available"), so on the CPU the replacement is checked with the
host-memory stand-in of tests/unit/test_ramtorch.py, and on a GPU with ramtorch's own."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

from pipeline import ramtorch_layers
from pipeline.config import CACHE, TRAIN, Config, load_config
from pipeline.errors import ConfigError
from pipeline.ramtorch_layers import (
    ComponentOptions,
    check_components,
    stream_controlnet,
    stream_text_encoder,
    stream_vae,
)
from pipeline.train import offload
from tests.unit.test_ramtorch import CUDA, HostLinear

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sdxl_parts(tiny_model):
    """`parts()`: a fresh copy of the tiny SDXL VAE (fp32) and its two CLIP text encoders (frozen)."""
    from pipeline.families import get_family, load_components

    family, source = get_family("sdxl"), str(tiny_model("sdxl"))

    def parts():
        loaded = load_components(family, source, which=("vae", "text_encoders"), dtype=torch.float32)
        return loaded["vae"].eval(), [e.eval().requires_grad_(False) for e in loaded["text_encoders"]]  # as st does

    return parts


def linear_names(module, kind=nn.Linear) -> set[str]:
    return {n for n, m in module.named_modules() if type(m) is kind}


def vae_round_trip(vae):
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        return vae.decode(vae.encode(pixels).latent_dist.mean).sample


def test_vae_streams_its_mid_blocks_linear_layers_only_and_decodes_the_same(sdxl_parts):
    vae, _ = sdxl_parts()
    vae.decoder.up_blocks[0].add_module("extra", nn.Linear(4, 4))  # a Linear outside every mid block stays
    linears = linear_names(vae)
    mid = {n for n in linears if ".mid_block." in n}
    assert mid and linears - mid == {"decoder.up_blocks.0.extra"}
    expected = vae_round_trip(vae)

    record = stream_vae(vae, None, CPU, make_layer=HostLinear)

    assert linear_names(vae, HostLinear) == mid  # the attention of encoder.mid_block and decoder.mid_block
    assert linear_names(vae) == {"decoder.up_blocks.0.extra"}
    assert record == {"layers": len(mid), "of": len(mid), "targets": None,
                      "blocks": ["vae.encoder.mid_block", "vae.decoder.mid_block"]}  # fmt: skip
    assert torch.equal(vae_round_trip(vae), expected)


@pytest.mark.parametrize(("targets", "selected"), [
    (["*.to_q"], {"encoder.mid_block.attentions.0.to_q", "decoder.mid_block.attentions.0.to_q"}),
    (["vae.decoder.mid_block"], {f"decoder.mid_block.attentions.0.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")}),
    (["transformer_blocks.*"], set()),
])  # fmt: skip
def test_target_modules_limit_the_vae_as_in_simpletuner(sdxl_parts, targets, selected):
    """Names carry the component's prefix (`vae.`), so a denoiser-only pattern selects nothing there."""
    vae, _ = sdxl_parts()
    record = stream_vae(vae, targets, CPU, make_layer=HostLinear)
    assert linear_names(vae, HostLinear) == selected
    assert record["layers"] == len(selected) and record["of"] == 8


def test_text_encoders_stream_every_linear_layer_and_embed_the_same(sdxl_parts):
    _, encoders = sdxl_parts()
    ids = torch.arange(8)[None] % encoders[0].config.vocab_size
    expected = [e(ids, output_hidden_states=True).hidden_states[-2] for e in encoders]
    before = [linear_names(e) for e in encoders]

    records = [stream_text_encoder(e, i + 1, None, CPU, make_layer=HostLinear) for i, e in enumerate(encoders)]

    assert [linear_names(e, HostLinear) for e in encoders] == before  # the projection of CLIP-bigG included
    assert [r["layers"] for r in records] == [len(b) for b in before] == [12, 13]
    with torch.no_grad():
        for encoder, want in zip(encoders, expected, strict=True):
            assert torch.equal(encoder(ids, output_hidden_states=True).hidden_states[-2], want)


def test_a_trained_text_encoders_lora_stays_and_targets_name_the_encoder(sdxl_parts):
    from peft import LoraConfig, inject_adapter_in_model

    _, (clip_l, clip_g) = sdxl_parts()
    for encoder in (clip_l, clip_g):
        encoder.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), encoder)
    stream_text_encoder(clip_l, 1, ["text_encoder_1.*q_proj"], CPU, make_layer=HostLinear)
    stream_text_encoder(clip_g, 2, ["text_encoder_1.*q_proj"], CPU, make_layer=HostLinear)
    assert {n.rsplit(".", 2)[-2:][0] for n in linear_names(clip_l, HostLinear)} == {"q_proj"}
    assert all(n.endswith("q_proj.base_layer") for n in linear_names(clip_l, HostLinear))
    assert not linear_names(clip_g, HostLinear)
    assert all(".lora_" in n for n in linear_names(clip_l) if "q_proj" in n)  # the adapters stay plain Linear


class KeptLinear(HostLinear):
    """A stand-in that, like `ramtorch_layers._ramtorch_linear`, holds the replaced layer's own Parameter objects."""

    def __init__(self, linear: nn.Linear, device) -> None:
        nn.Module.__init__(self)
        self.weight, self.bias = linear.weight, linear.bias


def test_a_controlnet_streams_its_trainable_linear_layers_keeping_their_parameters(tiny_model):
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    torch.manual_seed(0)
    base = FluxTransformer2DModel.from_pretrained(tiny_model("flux") / "transformer")
    heads = {k: base.config[k] for k in ("attention_head_dim", "num_attention_heads")}
    controlnet = FluxControlNetModel.from_transformer(base, num_layers=1, num_single_layers=1, **heads)
    controlnet.requires_grad_(True)  # a ControlNet run trains it whole
    params = {n: p for n, p in controlnet.named_parameters()}
    linears = linear_names(controlnet)
    assert not ramtorch_layers.frozen_linears(controlnet, None)[0]  # the denoiser's rule would stream none of them

    record = stream_controlnet(controlnet, None, CPU, make_layer=KeptLinear)

    assert linear_names(controlnet, KeptLinear) == linears and record["layers"] == record["of"] == len(linears)
    assert dict(controlnet.named_parameters()) == params  # what an optimizer holds is still what trains
    assert all(p.requires_grad for p in controlnet.parameters())


def component_options(**changes) -> ComponentOptions:
    return dataclasses.replace(ComponentOptions.from_config(Config(ramtorch=True)), **changes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"ramtorch_text_encoder": True}, "ramtorch_text_encoder needs a CUDA or ROCm GPU .* encodes on cpu"),
    ({"ramtorch_vae": True}, "ramtorch_vae needs a CUDA"),
    ({"ramtorch_vae": True, "ramtorch_text_encoder": True}, "ramtorch_text_encoder and ramtorch_vae need a CUDA"),
])  # fmt: skip
def test_st_cache_refuses_them_without_a_gpu(changes, message):
    with pytest.raises(ConfigError, match=message):
        check_components(component_options(**changes), CPU, "encodes")
    check_components(component_options(**changes), CUDA, "encodes")
    check_components(component_options(ramtorch=False, **changes), CPU, "encodes")  # read only with ramtorch


def test_quantised_text_encoders_are_not_streamed():
    with pytest.raises(ConfigError, match="text_encoder_2_precision int8-quanto quantises them"):
        check_components(component_options(ramtorch_text_encoder=True), CUDA, "encodes",
                         ("no_change", "int8-quanto"))  # fmt: skip
    check_components(component_options(ramtorch_vae=True), CUDA, "encodes", ("no_change", "int8-quanto"))


def memory_options(**changes) -> offload.MemoryOptions:
    return dataclasses.replace(offload.MemoryOptions.from_config(Config(model_family="flux", ramtorch=True)),
                               **changes)  # fmt: skip


def test_st_train_names_every_ramtorch_option_it_cannot_run():
    with pytest.raises(ConfigError, match="ramtorch and ramtorch_text_encoder and ramtorch_vae need a CUDA"):
        offload.check(memory_options(ramtorch_text_encoder=True, ramtorch_vae=True), CPU)
    with pytest.raises(ConfigError, match="ramtorch and ramtorch_controlnet need a CUDA"):
        offload.check(memory_options(ramtorch_controlnet=True, controlnet=True, model_type="full"), CPU)
    # A ControlNet run trains the ControlNet whole and keeps the base frozen: ramtorch may stream the base.
    offload.check(memory_options(ramtorch_controlnet=True, controlnet=True, model_type="full"), CUDA)
    with pytest.raises(ConfigError, match="with model_type full every weight trains"):
        offload.check(memory_options(model_type="full"), CUDA)


def test_the_train_manifest_records_what_each_component_streamed(sdxl_parts, tiny_model, monkeypatch):
    """`stats.memory.ramtorch` gains `vae` once the validation VAE streamed its mid blocks (and `text_encoders`
    when trained text encoders did)."""
    from diffusers import FluxTransformer2DModel

    monkeypatch.setattr(ramtorch_layers, "_ramtorch_linear", HostLinear)
    denoiser = FluxTransformer2DModel.from_pretrained(tiny_model("flux") / "transformer").requires_grad_(False)
    memory = offload.hold(denoiser, memory_options(ramtorch_vae=True), "flux", CPU)
    assert set(memory.record()["ramtorch"]) == {"layers", "of", "targets"}
    vae, _ = sdxl_parts()
    offload.stream_vae(vae, denoiser, CPU)
    blocks = ["vae.encoder.mid_block", "vae.decoder.mid_block"]
    assert memory.record()["ramtorch"]["vae"] == {"layers": 8, "of": 8, "targets": None, "blocks": blocks}
    plain = FluxTransformer2DModel.from_pretrained(tiny_model("flux") / "transformer").requires_grad_(False)
    offload.hold(plain, memory_options(), "flux", CPU)  # ramtorch without ramtorch_vae
    untouched, _ = sdxl_parts()
    offload.stream_vae(untouched, plain, CPU)
    assert not linear_names(untouched, HostLinear)


def test_they_are_options_of_both_stages_outside_every_key(caplog):
    on = Config(model_family="flux", ramtorch=True, ramtorch_text_encoder=True, ramtorch_vae=True,
                ramtorch_controlnet=True, ramtorch_target_modules="*.to_q")  # fmt: skip
    off = Config(model_family="flux")
    for stage in (CACHE, TRAIN):
        assert on.stage_keys(stage) == off.stage_keys(stage)
        assert {"ramtorch", "ramtorch_text_encoder", "ramtorch_vae"} <= set(on.stage_keys(stage, key_only=False))


def test_without_ramtorch_they_change_nothing_and_say_so(tmp_path, caplog):
    path = tmp_path / "config.json"
    path.write_text('{"--model_family": "flux", "--ramtorch_vae": true}')
    with caplog.at_level(logging.WARNING):
        load_config(path)
    assert "ignoring option 'ramtorch_vae': SimpleTuner reads it only with ramtorch True" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="ramtorch's layers need a CUDA device")
def test_ramtorch_layers_encode_the_same_on_a_gpu(sdxl_parts):
    (reference_vae, reference_encoders), (vae, encoders) = sdxl_parts(), sdxl_parts()
    stream_vae(vae, None, CUDA)
    stream_text_encoder(encoders[0], 1, None, CUDA)
    streamed = [p for p in [*vae.parameters(), *encoders[0].parameters()] if getattr(p, "is_ramtorch", False)]
    assert len(streamed) == 2 * (8 + 12) and all(p.device.type == "cpu" and p.is_pinned() for p in streamed)
    pixels = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(CUDA)
    ids = (torch.arange(8)[None] % encoders[0].config.vocab_size).to(CUDA)
    with torch.no_grad():
        outputs = []
        for v, e in ((reference_vae, reference_encoders[0]), (vae, encoders[0])):
            v.to(CUDA), e.to(CUDA)  # the streamed layers ignore the move
            outputs.append((v.decode(v.encode(pixels).latent_dist.mean).sample, e(ids).last_hidden_state))
    torch.testing.assert_close(outputs[1], outputs[0])


def test_trained_text_encoders_stream_their_frozen_layers_and_the_manifest_says_so(tiny_model, monkeypatch):
    """`train_text_encoder` with `ramtorch_text_encoder`: each encoder's frozen base layers stream, its LoRA stays,
    and `stats.memory.ramtorch.text_encoders` records both encoders."""
    from diffusers import FluxTransformer2DModel

    from pipeline.families import get_family
    from pipeline.train import text_encoders

    monkeypatch.setattr(ramtorch_layers, "_ramtorch_linear", HostLinear)
    config = Config(model_family="sdxl", train_text_encoder=True, lora_rank=2, ramtorch=True,
                    ramtorch_text_encoder=True)  # fmt: skip
    options = text_encoders.TextEncoderOptions.from_config(config)
    trained = text_encoders.TextEncoders(get_family("sdxl"), str(tiny_model("sdxl")), options, CPU)
    assert [r["layers"] for r in trained.ramtorch] == [12, 13]
    assert all(n.endswith(("proj.base_layer", "fc1", "fc2", "text_projection"))
               for e in trained.encoders for n in linear_names(e, HostLinear))  # fmt: skip
    assert trained.parameters() and all(".lora_" in n for e in trained.encoders for n in linear_names(e))
    denoiser = FluxTransformer2DModel.from_pretrained(tiny_model("flux") / "transformer").requires_grad_(False)
    setattr(denoiser, text_encoders.ATTRIBUTE, trained)
    memory = offload.hold(denoiser, memory_options(ramtorch_text_encoder=True), "flux", CPU)
    assert memory.record()["ramtorch"]["text_encoders"] == trained.ramtorch
