"""SingLoRA's ramp and its plain-LoRA form, against peft-singlora's own layer; options read only with another."""

from __future__ import annotations

import logging

import pytest

from pipeline.singlora_format import ramp_factor, ramp_up_steps, step_after, to_plain_lora


def singlora_layer(in_features: int, out_features: int, ramp_steps: int, step: int):
    import torch
    from peft_singlora import Linear

    torch.manual_seed(0)
    layer = Linear(torch.nn.Linear(in_features, out_features), "default", r=3, lora_alpha=6)
    layer.ramp_up_steps = ramp_steps
    layer.update_global_step(step)
    return layer


@pytest.mark.parametrize("step", [0, 1, 3, 7, 20])
@pytest.mark.parametrize(("in_features", "out_features"), [(8, 5), (5, 8), (6, 6)])
def test_ramp_and_plain_lora_equal_the_packages_update(in_features, out_features, step):
    """u(t) = min(t / T, 1), and B = A[:out], A' = u A[:in]^T at the same rank and alpha give the layer's update."""
    import torch

    layer = singlora_layer(in_features, out_features, ramp_steps=7, step=step)
    assert ramp_factor(step, 7) == pytest.approx(min(step / 7, 1.0))
    update = layer._get_update_weight("default")
    a = layer.lora_A["default"].detach()
    assert torch.allclose(update, ramp_factor(step, 7) * 2.0 * a[:out_features] @ a[:in_features].T)
    state = {"m.lora_A.default": a, "m.training_step_default": torch.tensor(float(step))}
    plain = to_plain_lora(state, {"m": (out_features, in_features)}, 7)
    assert set(plain) == {"m.lora_A.weight", "m.lora_B.weight"}
    assert torch.allclose(2.0 * plain["m.lora_B.weight"] @ plain["m.lora_A.weight"], update, atol=1e-7)
    x = torch.randn(4, in_features)
    with torch.no_grad():
        expected = layer(x)
        lora = layer.base_layer(x) + 2.0 * (x @ plain["m.lora_A.weight"].T) @ plain["m.lora_B.weight"].T
    assert torch.allclose(lora, expected, atol=1e-6)


def test_steps_follow_simpletuner():
    """SimpleTuner: `singlora_ramp_up_steps or 100`; after optimizer step n the buffer holds the global step n - 1."""
    assert [ramp_up_steps(v) for v in (None, 0, 5)] == [100, 100, 5]
    assert [step_after(n) for n in (0, 1, 2, 5)] == [0, 0, 1, 4]


@pytest.mark.parametrize(("option", "switch"), [("validation_lycoris_strength=0.5", 'lora_type="lycoris"'),
                                                ("singlora_ramp_up_steps=10", 'peft_lora_mode="singlora"')])
def test_option_read_only_with_another_warns_when_set_without_it(caplog, option, switch):
    from pipeline.config import load_config

    name = option.split("=")[0]
    with caplog.at_level(logging.INFO, logger="st"):
        load_config(None, [option])
    assert [r.message for r in caplog.records if name in r.message] == [
        f"ignoring option '{name}': SimpleTuner reads it only with {switch.split('=')[0]} {switch.split('=')[1][1:-1]}"
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="st"):
        load_config(None, [option, switch])
        load_config(None, [])
    assert not [r for r in caplog.records if name in r.message]
