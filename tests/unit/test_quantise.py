"""pipeline.quantise: the frozen denoiser's dtype, which presets run where, and quantised parameter bytes."""

from __future__ import annotations

import pytest

from pipeline.config import build_config
from pipeline.errors import ConfigError, UserError
from pipeline.quantise import BasePrecision, check, parameter_bytes, quantise


def config(**options):
    return build_config({"model_family": "sd1x", **options})[0]


@pytest.mark.parametrize(("options", "dtype"), [
    ({"mixed_precision": "bf16"}, "bfloat16"),
    ({"mixed_precision": "fp16"}, "float16"),
    ({"mixed_precision": "no"}, "float32"),
    ({"mixed_precision": "bf16", "model_type": "full"}, "float32"),
    ({"mixed_precision": "bf16", "base_model_precision": "int8-quanto"}, "bfloat16"),
    ({"mixed_precision": "bf16", "base_model_precision": "int8-quanto", "base_model_default_dtype": "fp32"}, "float32"),
])  # fmt: skip
def test_frozen_dtype_follows_the_training_dtype(options, dtype):
    assert BasePrecision.from_config(config(**options)).dtype == dtype


@pytest.mark.parametrize("preset", ["nf4-bnb", "fp8-torchao", "int4-torchao"])
def test_cuda_only_presets_name_the_requirement(preset):
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        check(config(base_model_precision=preset), cuda=False)


@pytest.mark.parametrize(("options", "message"), [
    ({"base_model_precision": "int8-torchao"}, "does not implement torchao int8"),
    ({"base_model_precision": "int8-quanto", "quantize_via": "pipeline"}, "quantize_via pipeline"),
    ({"base_model_precision": "int8-quanto", "model_type": "full"}, "model_type full"),
    ({"base_model_precision": "int8-quanto", "lora_type": "lycoris"}, "LyCORIS on a quantised base"),
])  # fmt: skip
def test_combinations_st_cannot_train_are_refused(options, message):
    with pytest.raises(UserError, match=message):
        check(config(**options), cuda=False)


def test_quanto_presets_pass_the_check():
    for preset in ("no_change", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "fp8uz-quanto"):
        check(config(base_model_precision=preset, mixed_precision="bf16"), cuda=False)


@pytest.mark.parametrize(("preset", "bound"), [("int8-quanto", 0.55), ("int4-quanto", 0.35)])
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
