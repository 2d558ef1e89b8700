"""`pipeline.quantise_modules`: which text-encoder precisions a family and this machine can run, and what quantising
a frozen module does to its weights."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError, NotSupportedError
from pipeline.families import get_family
from pipeline.quantise import parameter_bytes
from pipeline.quantise_modules import check_text_encoder_precisions, quantise_module

PLAIN = ("no_change",) * 4


def precisions(**chosen: str) -> tuple[str, ...]:
    """The four presets with `chosen` ones set by number: precisions(te2="int8-quanto")."""
    return tuple(chosen.get(f"te{n}", "no_change") for n in range(1, 5))


@pytest.mark.parametrize("family", ["sd1x", "sdxl", "sd3", "flux", "pixart_sigma"])
def test_each_encoder_the_family_has_accepts_a_quanto_preset(family):
    count = len(get_family(family).text_encoders)
    check_text_encoder_precisions(PLAIN, get_family(family))
    check_text_encoder_precisions(precisions(**{f"te{count}": "int4-quanto"}), get_family(family))
    with pytest.raises(ConfigError, match=f"text_encoder_{count + 1}_precision is int8-quanto, but {family} has "
                                          f"{count} text encoder"):  # fmt: skip
        check_text_encoder_precisions(precisions(**{f"te{count + 1}": "int8-quanto"}), get_family(family))


def test_cuda_presets_need_a_gpu_and_load_time_presets_are_the_denoisers():
    flux = get_family("flux")
    for preset in ("fp8-torchao", "nf4-bnb", "int4-torchao"):
        with pytest.raises(ConfigError, match=f"text_encoder_2_precision {preset} .* needs a CUDA GPU"):
            check_text_encoder_precisions(precisions(te2=preset), flux, cuda=False)
    check_text_encoder_precisions(precisions(te2="fp8-torchao"), flux, cuda=True)
    with pytest.raises(NotSupportedError, match="st does not implement text_encoder_2_precision nf4-bnb"):
        check_text_encoder_precisions(precisions(te2="nf4-bnb"), flux, cuda=True)


def test_trained_text_encoders_are_not_quantised():
    with pytest.raises(NotSupportedError, match="text_encoder_1_precision int8-quanto with train_text_encoder"):
        check_text_encoder_precisions(precisions(te1="int8-quanto"), get_family("sdxl"), trained=True)
    check_text_encoder_precisions(PLAIN, get_family("sdxl"), trained=True)


@pytest.mark.parametrize("preset", ["int8-quanto", "int8-torchao"])
def test_quantised_module_keeps_its_outputs_close_in_a_fraction_of_the_bytes(preset):
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).eval()
    inputs = torch.randn(4, 64)
    with torch.no_grad():
        expected = module(inputs)
    before = parameter_bytes(module)
    assert quantise_module(module, "no_change", "flux", "a module") is module and parameter_bytes(module) == before
    quantise_module(module, preset, "flux", "a module")
    with torch.no_grad():
        got = module(inputs.t().contiguous().t())  # a transposed view, as some encoders pass
    assert parameter_bytes(module) <= 0.3 * before  # int8 of fp32 weights, plus per-row scales
    assert not torch.equal(got, expected)
    assert torch.allclose(got, expected, atol=0.02 * expected.abs().max().item())
