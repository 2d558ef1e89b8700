"""pipeline.quantise: the frozen denoiser's dtype, which presets run where, the diffusers configs of quantising
while loading (quantize_via pipeline, quantization_config), and quantised parameter bytes."""

from __future__ import annotations

import json

import pytest

from pipeline.config import build_config
from pipeline.errors import ConfigError, UserError
from pipeline.quantise import BasePrecision, check, load_quantisation, parameter_bytes, quantise


def config(family="sd1x", **options):
    return build_config({"model_family": family, **options})[0]


@pytest.mark.parametrize(("options", "dtype"), [
    ({"mixed_precision": "bf16"}, "bfloat16"),
    ({"mixed_precision": "fp16"}, "float16"),
    ({"mixed_precision": "no"}, "float32"),
    ({"mixed_precision": "bf16", "model_type": "full"}, "bfloat16"),  # SimpleTuner's weight_dtype: full trains in bf16
    ({"mixed_precision": "fp16", "model_type": "full"}, "float32"),  # fp16 weights cannot take fp16 gradient scaling
    ({"mixed_precision": "bf16", "base_model_precision": "int8-quanto"}, "bfloat16"),
    ({"mixed_precision": "bf16", "base_model_precision": "int8-quanto", "base_model_default_dtype": "fp32"}, "float32"),
])  # fmt: skip
def test_frozen_dtype_follows_the_training_dtype(options, dtype):
    assert BasePrecision.from_config(config(**options)).dtype == dtype


@pytest.mark.parametrize(("options", "requirement"), [
    ({"base_model_precision": "nf4-bnb"}, "bitsandbytes"),
    ({"base_model_precision": "fp8-torchao"}, "compute capability 8.9"),
    ({"base_model_precision": "int4-torchao"}, "tinygemm"),
    ({"base_model_precision": "int8-torchao", "quantize_via": "pipeline",
      "quantization_config": {"unet": {"quant_type": "int4_weight_only"}}}, "tinygemm"),
    ({"quantization_config": {"default": {"load_in_4bit": True}}}, "bitsandbytes"),
])  # fmt: skip
def test_cuda_only_presets_name_the_requirement(options, requirement):
    with pytest.raises(ConfigError, match=f"needs a CUDA GPU") as error:
        check(config(**options), cuda=False)
    assert requirement in str(error.value)
    # On CUDA the preset passes, unless its package is missing (bitsandbytes is not installed by `make setup`).
    from importlib.util import find_spec

    if requirement == "bitsandbytes" and find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match="pip install bitsandbytes"):
            check(config(**options), cuda=True)
    else:
        check(config(**options), cuda=True)


@pytest.mark.parametrize(("options", "message"), [
    ({"base_model_precision": "int8-quanto", "model_type": "full"}, "model_type full"),
    ({"base_model_precision": "int8-torchao", "quantize_via": "pipeline", "lora_type": "lycoris"},
     "LyCORIS on a torchao base"),
    ({"base_model_precision": "int4-quanto", "quantize_activations": True}, "quantize_activations needs"),
    ({"base_model_precision": "int8-torchao", "quantize_activations": True}, "quantize_activations needs"),
    ({"base_model_precision": "int8-quanto", "quantize_via": "pipeline", "quantize_activations": True},
     "quantize_activations needs"),
    ({"quantize_activations": True}, "quanto-quantised base"),
    ({"quantization_config": {"unet": {"weights_dtype": "int8"}}, "model_type": "full"}, "only supported for LoRA"),
    ({"base_model_precision": "int8-quanto", "quantization_config": {"unet": {"weights_dtype": "int4"}}},
     "would quantise it again"),
    ({"quantization_config": "{not json"}, "not valid JSON"),
    ({"quantization_config": "missing.json"}, "no such file"),
    ({"quantization_config": {"unet": {"group_size": 64}}}, "cannot tell the backend"),
    ({"quantization_config": {"unet": "int5-quanto"}}, "diffusers cannot load with"),
    ({"quantization_config": {"unet": {"quant_type": "int3_magic"}}}, "is not one of"),
])  # fmt: skip
def test_combinations_st_cannot_train_are_refused(options, message, tmp_path):
    with pytest.raises(UserError, match=message):
        check(config(**options), cuda=False, base_dir=tmp_path)


@pytest.mark.parametrize(("family", "options", "message"), [
    ("sd1x", {"pretrained_transformer_model_name_or_path": "model.gguf"}, "sd1x has none"),
    ("flux", {"pretrained_transformer_model_name_or_path": "missing.gguf"}, "no such file"),
    ("flux", {"pretrained_transformer_model_name_or_path": "model.gguf", "base_model_precision": "int8-quanto"},
     "already quantised"),
    ("flux", {"pretrained_transformer_model_name_or_path": "model.gguf", "model_type": "full"},
     "GGUF transformer model.gguf quantises the frozen base"),
])  # fmt: skip
def test_gguf_transformers_are_checked(family, options, message, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match=message):
        check(config(family, **options), cuda=False, base_dir=tmp_path)


@pytest.mark.parametrize("options", [
    *({"base_model_precision": p} for p in ("no_change", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto",
                                            "fp8uz-quanto", "int8-torchao")),
    *({"base_model_precision": p, "quantize_activations": True} for p in ("int8-quanto", "fp8-quanto")),
    *({"base_model_precision": p, "quantize_via": "pipeline"} for p in ("no_change", "int8-quanto", "int8-torchao")),
    {"quantization_config": {"transformer": {"weights_dtype": "int8"}}},  # no entry for sd1x's unet: nothing
])  # fmt: skip
def test_presets_this_cpu_runs_pass_the_check(options):
    check(config(mixed_precision="bf16", **options), cuda=False)


def test_quantization_config_is_json_text_an_object_or_a_file(tmp_path):
    settings = {"transformer": {"weights_dtype": "int4"}, "text_encoder": {"quant_type": "int8_weight_only"}}
    (tmp_path / "quant.json").write_text(json.dumps(settings))
    loads = [BasePrecision.from_config(config("flux", quantization_config=value), tmp_path).load
             for value in (settings, json.dumps(settings), "quant.json")]  # fmt: skip
    assert loads[0] == loads[1] == loads[2]
    assert loads[0].record() == {"backend": "quanto", "weights_dtype": "int4"}


@pytest.mark.parametrize(("options", "record"), [
    ({"base_model_precision": "nf4-bnb"}, {"backend": "bitsandbytes", "load_in_4bit": True,
     "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_type": "nf4"}),
    ({"base_model_precision": "int4-torchao"}, {"backend": "torchao", "quant_type": "int4_weight_only"}),
    ({"base_model_precision": "fp8-torchao", "quantize_via": "pipeline"},
     {"backend": "torchao", "quant_type": "float8_dynamic_activation_float8_weight"}),
    ({"base_model_precision": "fp8uz-quanto", "quantize_via": "pipeline"}, {"backend": "quanto", "weights_dtype": "float8"}),
    ({"base_model_precision": "nf4-bnb", "quantization_config": {"unet": {"bnb_4bit_quant_type": "fp4"}}},
     {"backend": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_type": "fp4"}),
    ({"quantize_via": "pipeline", "quantization_config": {"default": "int8-torchao"}},
     {"backend": "torchao", "quant_type": "int8_weight_only"}),
    ({"quantization_config": {"model": {"weights": "int2"}}}, {"backend": "quanto", "weights_dtype": "int2"}),
])  # fmt: skip
def test_load_time_quantisation_follows_simpletuner(options, record):
    """The preset gives the defaults, the denoiser's entry (unet, model, default) overrides them."""
    assert BasePrecision.from_config(config(**options)).load.record() == record


def test_diffusers_configs_are_built():
    import torch
    from diffusers import QuantoConfig, TorchAoConfig

    int4 = built(base_model_precision="int4-torchao",
                 quantization_config={"unet": {"group_size": 64, "modules_to_not_convert": ["conv_in"]}})
    assert isinstance(int4, TorchAoConfig) and type(int4.quant_type).__name__ == "Int4WeightOnlyConfig"
    assert int4.quant_type.group_size == 64 and int4.modules_to_not_convert == ["conv_in"]
    quanto = built(base_model_precision="int4-quanto", quantize_via="pipeline")
    assert isinstance(quanto, QuantoConfig) and quanto.weights_dtype == "int4"
    assert built(base_model_precision="int8-quanto") is None  # quantised after loading


def test_nf4_config_is_built():
    """diffusers builds a BitsAndBytesConfig only where bitsandbytes is installed (CUDA machines; not `make setup`)."""
    import torch

    pytest.importorskip("bitsandbytes")
    from diffusers import BitsAndBytesConfig

    bnb = built(base_model_precision="nf4-bnb")
    assert isinstance(bnb, BitsAndBytesConfig) and bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4"
    assert bnb.bnb_4bit_use_double_quant and bnb.bnb_4bit_compute_dtype == torch.bfloat16


def built(**options):
    """The diffusers quantisation config st loads the denoiser with, for these options (bf16 training)."""
    return load_quantisation(BasePrecision.from_config(config(mixed_precision="bf16", **options)))


@pytest.mark.parametrize(("preset", "bound"), [("int8-quanto", 0.55), ("int4-quanto", 0.35), ("int8-torchao", 0.55)])
def test_quantised_parameter_bytes_fall(preset, bound):
    """A linear-heavy model: quantised weights (with their scales) against the same model in bf16."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).bfloat16()
    reference = parameter_bytes(model)
    precision = BasePrecision(preset=preset, dtype="bfloat16")
    quantise(model, precision, "sd1x", torch.device("cpu"))
    assert parameter_bytes(model) <= bound * reference
    assert model(torch.randn(2, 256, dtype=torch.bfloat16).t().contiguous().t()).shape == (2, 256)


def test_quantize_activations_rounds_what_flows_between_layers():
    """int8-quanto with quantize_activations: the same weights give another output (the activations are int8)."""
    import torch

    outputs = []
    for activations in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
        quantise(model, BasePrecision(preset="int8-quanto", activations=activations), "sd1x", torch.device("cpu"))
        with torch.no_grad():
            outputs.append(model(torch.linspace(-3, 3, 128).reshape(2, 64)))
    assert float((outputs[0] - outputs[1]).abs().max()) > 1e-3
