"""optimizer_release_gradients: optimi's fused optimizer step during the backward pass, its refusals, and the option
states of SimpleTuner's other optimizer-memory options."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError
from pipeline.simpletuner import OPTION_STATES, Accepted, Alias
from pipeline.train.optim import build_lr_scheduler, build_optimizer, check, prepare_gradient_release

RELEASE = {"optimizer": "optimi-adamw", "learning_rate": 1e-2, "max_grad_norm": 0.0,
           "optimizer_config": "weight_decay=0.01"}  # fmt: skip


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
    return torch.nn.functional.mse_loss(model(x), y)


def _train(release: bool, steps: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[bool]]:
    model = _model()
    config = Config(**RELEASE, optimizer_release_gradients=release, lr_scheduler="cosine", lr_end=1e-4)
    optimizer = build_optimizer(model.parameters(), config, device_type="cpu")
    scheduler = build_lr_scheduler(optimizer, config, total_steps=steps)
    if release:
        prepare_gradient_release(optimizer)
    grads_freed = []
    for step in range(steps):
        _loss(model, step).backward()
        grads_freed.append(all(p.grad is None for p in model.parameters()))
        if not release:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, grads_freed


def test_release_steps_as_optimizer_step_and_frees_gradients():
    """Three steps (with a cosine schedule, so the live lr matters) equal three plain steps, and no gradient survives
    a backward pass."""
    plain, _, plain_freed = _train(release=False)
    released, _, freed = _train(release=True)
    assert freed == [True, True, True] and plain_freed == [False, False, False]
    start = _model()
    for a, b, c in zip(plain.parameters(), released.parameters(), start.parameters()):
        assert not torch.equal(a, c)  # trained
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_release_state_dict_round_trip_continues_exactly():
    """The state_dict holds tensors only (no group links; kahan_comp is None for fp32 weights); loading it into a
    fresh release optimizer relinks the live groups and continues the uninterrupted trajectory bit for bit."""
    config = Config(**RELEASE, optimizer_release_gradients=True)

    def start(model):
        optimizer = build_optimizer(model.parameters(), config, device_type="cpu")
        prepare_gradient_release(optimizer)
        return optimizer

    straight = _model()
    start(straight)
    for step in range(3):
        _loss(straight, step).backward()
    model = _model()
    optimizer = start(model)
    for step in range(2):
        _loss(model, step).backward()
    saved = optimizer.state_dict()
    assert all("group" not in s for s in saved["state"].values())
    assert all(v is None or isinstance(v, torch.Tensor) for s in saved["state"].values() for v in s.values())
    assert all("group" in s for s in optimizer.state.values())  # the live state keeps its links

    resumed = _model(seed=1)
    resumed.load_state_dict(model.state_dict())
    again = start(resumed)
    again.load_state_dict(saved)
    assert all(again.state[p]["group"] is g for g in again.param_groups for p in g["params"])
    _loss(resumed, 2).backward()
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def _refusal(**values) -> str:
    with pytest.raises(ConfigError) as info:
        check(Config(**{**RELEASE, "optimizer_release_gradients": True, **values}))
    return str(info.value)


def test_refusals_name_the_option_and_the_fix():
    check(Config(**RELEASE, optimizer_release_gradients=True))  # allowed
    check(Config(**{**RELEASE, "optimizer": "optimi-stableadamw", "max_grad_norm": 2.0},
                 optimizer_release_gradients=True))  # never clipped (as in SimpleTuner): allowed  # fmt: skip
    message = _refusal(optimizer="adamw_bf16")
    assert "optimizer_release_gradients" in message and "optimizer=adamw_bf16" in message and "optimi-adamw" in message
    message = _refusal(gradient_accumulation_steps=2)
    assert "optimizer_release_gradients" in message and "gradient_accumulation_steps=1" in message
    message = _refusal(max_grad_norm=1.0)
    assert "optimizer_release_gradients" in message and "max_grad_norm=0" in message
    message = _refusal(num_processes=2)
    assert "optimizer_release_gradients" in message and "num_processes=1" in message
    message = _refusal(mixed_precision="fp16")
    assert "optimizer_release_gradients" in message and "mixed_precision" in message
    with pytest.raises(TypeError, match="gradient_release=True"):
        prepare_gradient_release(build_optimizer(_model().parameters(), Config(**RELEASE), device_type="cpu"))


def test_option_states():
    alias = OPTION_STATES["optimizer_release_gradient"]
    assert isinstance(alias, Alias) and alias.target == "optimizer_release_gradients"
    assert load_config(None, ["optimizer_release_gradient=true"]).config.optimizer_release_gradients is True
    for name in ("gradient_precision", "optimizer_offload_gradients", "fuse_optimizer"):
        assert isinstance(OPTION_STATES[name], Accepted), name
