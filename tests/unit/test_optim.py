"""Optimizers, learning-rate schedules and gradient clipping."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import re

import pytest
import torch

from pipeline.config import OPTION_FIELDS, Config
from pipeline.distributed import check_world_size, global_batch
from pipeline.errors import ConfigError, MachineError, NotSupportedError
from pipeline.train.optim import (
    AdamWBF16,
    build_lr_scheduler,
    build_optimizer,
    clip_gradients,
    effective_learning_rate,
    averaged_weights,
    check,
    optimizer_eval_mode,
    optimizer_train_mode,
    parse_optimizer_config,
)
from pipeline.train.options import (
    AdapterOptions,
    CheckpointOptions,
    ObjectiveOptions,
    OptimizerOptions,
    ValidationOptions,
)

CPU_OPTIMIZERS = {
    "adamw_bf16": 0.1,
    "optimi-adamw": 0.1,
    "optimi-stableadamw": 0.1,
    "optimi-lion": 0.05,
    "prodigy": 1.0,  # not used: SimpleTuner's prodigy runs at lr 1.0 (its d0 is raised below for a 20-step test)
    "adamw_schedulefree": 0.1,
}


def quadratic(p: torch.Tensor) -> torch.Tensor:
    target = torch.tensor([1.0, -2.0, 0.5, 3.0])
    return ((p.float() - target) ** 2).sum()


@pytest.mark.parametrize("name", sorted(CPU_OPTIMIZERS))
def test_each_cpu_optimizer_reduces_a_quadratic(name):
    p = torch.nn.Parameter(torch.zeros(4))
    extra = {"optimizer_config": "d0=1e-2"} if name == "prodigy" else {}
    config = Config(optimizer=name, learning_rate=CPU_OPTIMIZERS[name], **extra)
    opt = build_optimizer([p], config, device_type="cpu")
    start = quadratic(p).item()
    for _ in range(20):
        optimizer_train_mode(opt)
        opt.zero_grad()
        quadratic(p).backward()
        opt.step()
    optimizer_eval_mode(opt)
    with torch.no_grad():
        end = quadratic(p).item()
    assert end < start * 0.9, (name, start, end)


def test_adamw_bf16_is_simpletuners_optimizer_with_its_settings():
    """The default optimizer is SimpleTuner's AdamWBF16 (its step is checked in test_adamw_bf16.py): SimpleTuner's
    settings, bf16 weights and moments stay bf16."""
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = build_optimizer([p], Config(learning_rate=1e-3), device_type="cpu")
    assert isinstance(opt, AdamWBF16)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-6, 1e-2)
    p.grad = torch.ones_like(p)
    opt.step()
    assert p.dtype == opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    assert p.float().mean().item() < 1.0


def test_bnb_needs_cuda_a_machine_need(tmp_path, monkeypatch):
    import json

    from pipeline.check import run_check
    from pipeline.train.checks import config_checks

    p = torch.nn.Parameter(torch.zeros(2))
    need = "optimizer bnb-adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit AdamW); this machine trains on 'cpu'"
    with pytest.raises(MachineError, match=re.escape(need) + ": choose adamw_bf16"):
        build_optimizer([p], Config(optimizer="bnb-adamw8bit"), device_type="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MachineError, match=re.escape(need)):
        check(Config(optimizer="bnb-adamw8bit"))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_family": "sd1x", "pretrained_model_name_or_path": str(tmp_path / "missing"),
                                  "optimizer": "bnb-adamw8bit"}))  # fmt: skip
    report = run_check(config, any_machine=True, stage_checks=config_checks())
    assert [n for n in report.machine_needs if need in n] and not [p for p in report.problems if "optimizer" in p]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_bnb_without_bitsandbytes_says_how_to_install():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(NotSupportedError, match="pip install bitsandbytes"):
        build_optimizer([p], Config(optimizer="bnb-adamw8bit"), device_type="cuda")


def test_optimizer_config_passes_kwargs_and_rejects_unknown():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], Config(optimizer="optimi-adamw", optimizer_config="weight_decay=0.1, betas=(0.8,0.9),"
                                      "kahan_sum=false"), device_type="cpu")  # fmt: skip
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.1 and group["kahan_sum"] is False
    assert (group["beta1"], group["beta2"]) == (0.8, 0.9)
    with pytest.raises(ConfigError, match=r"'bogus'.*optimi-lion"):
        build_optimizer([p], Config(optimizer="optimi-lion", optimizer_config="bogus=1"), device_type="cpu")


@pytest.mark.parametrize("name", sorted(CPU_OPTIMIZERS))
def test_adam_weight_decay_and_epsilon_warn_and_change_nothing(name, caplog):
    # SimpleTuner reads them only under DeepSpeed: every optimizer keeps its own settings.
    def group(**values):
        return build_optimizer(prodigy_params(), Config(optimizer=name, **values), device_type="cpu").param_groups[0]

    plain = group()
    with caplog.at_level(logging.WARNING, logger="st"):
        for values in ({"adam_weight_decay": 0.3}, {"adam_epsilon": 1e-3}):
            caplog.clear()
            changed = group(**values)
            assert {k: v for k, v in changed.items() if k != "params"} == {
                k: v for k, v in plain.items() if k != "params"}, values
            assert f"optimizer={name} uses SimpleTuner's settings" in caplog.text
            assert "adam_weight_decay and adam_epsilon are not used" in caplog.text
            assert 'optimizer_config="weight_decay=...,eps=..."' in caplog.text
        caplog.clear()
        group(adam_weight_decay=1e-2, adam_epsilon=1e-8)  # their defaults: no warning
    assert "adam_weight_decay" not in caplog.text


def test_one_beta_alone_is_not_used_and_lion_takes_no_eps(caplog):
    p = torch.nn.Parameter(torch.zeros(2))
    with caplog.at_level(logging.WARNING, logger="st"):
        opt = build_optimizer([p], Config(optimizer_beta2=0.95), device_type="cpu")
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and "only together" in caplog.text  # as SimpleTuner
    opt = build_optimizer([p], Config(optimizer_beta1=0.8, optimizer_beta2=0.95), device_type="cpu")
    assert opt.param_groups[0]["betas"] == (0.8, 0.95)
    lion = build_optimizer([p], Config(optimizer="optimi-lion"), device_type="cpu")  # Lion takes no eps
    assert "eps" not in lion.param_groups[0]


def test_parse_optimizer_config_values():
    parsed = parse_optimizer_config("a=1,b=2.5e-3,c=True,d=none,e=(1, 2),f=hello,g='x,y'")
    assert parsed == {"a": 1, "b": 2.5e-3, "c": True, "d": None, "e": (1, 2), "f": "hello", "g": "x,y"}
    with pytest.raises(ConfigError):
        parse_optimizer_config("novalue")


# SimpleTuner's optimizer_choices["prodigy"]["default_settings"] (helpers/training/optimizer_param.py).
SIMPLETUNER_PRODIGY = dict(lr=1.0, betas=(0.9, 0.99), beta3=None, weight_decay=0.0, weight_decay_by_lr=True,
                           use_bias_correction=False, d0=1e-6, d_coef=1, prodigy_steps=0, use_speed=False, eps=1e-8,
                           split_groups=True, split_groups_mean=True, factored=True, factored_fp32=True,
                           fused_back_pass=False, use_stableadamw=True, use_cautious=False, use_grams=False,
                           use_adopt=False, stochastic_rounding=True)  # fmt: skip


def prodigy_params(dtype=torch.float32):
    """Two groups (split_groups applies), one matrix large enough for the factored second moment (dims >= 32)."""
    torch.manual_seed(0)
    return [{"params": [torch.nn.Parameter(torch.randn(40, 36).to(dtype))]},
            {"params": [torch.nn.Parameter(torch.randn(6).to(dtype))]}]  # fmt: skip


def prodigy_steps_of(opt, groups, steps, start=0):
    params = [p for g in groups for p in g["params"]]
    for step in range(start, start + steps):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(step)
        sum(((p.float() - torch.randn(p.shape, generator=gen)) ** 2).sum() for p in params).backward()
        opt.step()


def test_prodigy_is_simpletuners_prodigy_plus_schedule_free(caplog):
    from prodigyplus.prodigy_plus_schedulefree import ProdigyPlusScheduleFree

    ours, reference = prodigy_params(), prodigy_params()
    with caplog.at_level(logging.WARNING, logger="st"):
        opt = build_optimizer(ours, Config(optimizer="prodigy", learning_rate=1e-4, adam_weight_decay=0.3,
                                           adam_epsilon=1e-3, max_grad_norm=0.01), device_type="cpu")  # fmt: skip
    assert isinstance(opt, ProdigyPlusScheduleFree)
    assert "learning_rate=0.0001 is not used" in caplog.text
    group = opt.param_groups[0]
    assert {k: group[k] for k in SIMPLETUNER_PRODIGY} == SIMPLETUNER_PRODIGY  # learning_rate, decay, eps unused
    ref = ProdigyPlusScheduleFree(reference, **SIMPLETUNER_PRODIGY)
    prodigy_steps_of(opt, ours, 30)
    prodigy_steps_of(ref, reference, 30)
    assert opt.param_groups[0]["d"] > 1e-6  # d has grown ...
    for a, b in zip(ours, reference):  # ... exactly as the package's optimizer with SimpleTuner's settings
        assert torch.equal(a["params"][0], b["params"][0])
    # Gradients are never clipped for prodigy (SimpleTuner's should_clip_gradients), whatever max_grad_norm says.
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([30.0, -40.0, 0.0])
    assert clip_gradients([p], Config(optimizer="prodigy", max_grad_norm=1.0)) == 50.0
    assert torch.equal(p.grad, torch.tensor([30.0, -40.0, 0.0]))


@pytest.mark.parametrize("optimizer, clipped", [("optimi-stableadamw", False), ("prodigy", False),
                                                ("optimi-adamw", True), ("adamw_bf16", True)])  # fmt: skip
def test_stableadamw_and_prodigy_are_never_clipped_as_in_simpletuner(optimizer, clipped):
    # SimpleTuner's trainer skips clipping for exactly these two (should_clip_gradients); the norm is still reported.
    for method in ("value", "norm"):
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.tensor([30.0, -40.0, 0.0])
        config = Config(optimizer=optimizer, max_grad_norm=1.0, grad_clip_method=method)
        assert clip_gradients([p], config) == 50.0
        assert torch.equal(p.grad, torch.tensor([30.0, -40.0, 0.0])) != clipped


def test_prodigy_settings_from_optimizer_config_betas_and_prodigy_steps(caplog):
    groups = prodigy_params()
    config = Config(optimizer="prodigy", optimizer_config="d_coef=2,lr=0.5,use_speed=true,prodigy_steps=7",
                    optimizer_beta1=0.95, optimizer_beta2=0.98, prodigy_steps=3)  # fmt: skip
    group = build_optimizer(groups, config, device_type="cpu").param_groups[0]
    assert (group["d_coef"], group["lr"], group["use_speed"]) == (2, 0.5, True)
    assert group["betas"] == (0.95, 0.98) and group["prodigy_steps"] == 3  # prodigy_steps > 0 wins
    group = build_optimizer(prodigy_params(), Config(optimizer="prodigy", optimizer_beta2=0.9, prodigy_steps=0,
                                                     optimizer_config="prodigy_steps=7"), device_type="cpu").param_groups[0]  # fmt: skip
    assert group["betas"] == (0.9, 0.99) and group["prodigy_steps"] == 7  # one beta alone is not used (SimpleTuner)
    with pytest.raises(ConfigError, match=r"'bogus'.*prodigy"):
        build_optimizer(prodigy_params(), Config(optimizer="prodigy", optimizer_config="bogus=1"), device_type="cpu")
    with caplog.at_level(logging.WARNING, logger="st"):
        build_optimizer(prodigy_params(), Config(optimizer="optimi-lion", prodigy_steps=5), device_type="cpu")
    assert "prodigy_steps=5 has no effect with optimizer=optimi-lion" in caplog.text


def test_prodigy_steps_freezes_the_step_size():
    frozen_groups, free_groups = prodigy_params(), prodigy_params()
    frozen = build_optimizer(frozen_groups, Config(optimizer="prodigy", prodigy_steps=10), device_type="cpu")
    free = build_optimizer(free_groups, Config(optimizer="prodigy"), device_type="cpu")
    prodigy_steps_of(frozen, frozen_groups, 9)
    prodigy_steps_of(free, free_groups, 9)
    d_last = [g["d"] for g in frozen.param_groups]  # set by step 9; step 10 (k = prodigy_steps) no longer adapts
    assert d_last == [g["d"] for g in free.param_groups] and d_last[0] > 1e-6  # the same run so far
    prodigy_steps_of(frozen, frozen_groups, 21, start=9)
    prodigy_steps_of(free, free_groups, 21, start=9)
    assert [g["d"] for g in frozen.param_groups] == d_last
    assert all(g["d"] > d for g, d in zip(free.param_groups, d_last))
    assert "p0" not in frozen.state[frozen_groups[0]["params"][0]]  # Prodigy's own state is released


def test_averaged_weights_switches_schedule_free_optimizers_and_restores_the_mode():
    groups = prodigy_params()
    opt = build_optimizer(groups, Config(optimizer="prodigy"), device_type="cpu")
    prodigy_steps_of(opt, groups, 3)
    p = groups[0]["params"][0]
    training = p.detach().clone()
    with averaged_weights(opt):
        assert opt.param_groups[0]["train_mode"] is False and not torch.equal(p, training)
    assert opt.param_groups[0]["train_mode"] is True
    torch.testing.assert_close(p, training)
    optimizer_eval_mode(opt)  # at the end of a run: the mode stays eval after a final validation
    with averaged_weights(opt):
        pass
    assert opt.param_groups[0]["train_mode"] is False


def test_invalid_value_is_a_config_error():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigError, match="optimi-adamw"):
        build_optimizer([p], Config(optimizer="optimi-adamw", optimizer_beta1=1.5, optimizer_beta2=0.9),
                        device_type="cpu")  # fmt: skip


# Learning-rate schedules.


def lrs(name, steps, total=100, lr=1.0, **options):
    p = torch.nn.Parameter(torch.zeros(1))
    config = Config(learning_rate=lr, lr_scheduler=name, **options)
    opt = build_optimizer([p], config, device_type="cpu")
    scheduler = build_lr_scheduler(opt, config, total)
    out = {}
    for step in range(max(steps) + 1):
        if step in steps:
            out[step] = opt.param_groups[0]["lr"]
        opt.step()
        scheduler.step()
    return out


def test_constant_and_warmup():
    assert lrs("constant", [0, 50]) == {0: 1.0, 50: 1.0}
    got = lrs("constant", [0, 5, 10, 50], lr_warmup_steps=10)
    assert got[0] == 0.0 and got[5] == pytest.approx(0.5) and got[10] == 1.0 and got[50] == 1.0
    got = lrs("constant_with_warmup", [0, 5, 10], lr_warmup_steps=10)
    assert got[5] == pytest.approx(0.5) and got[10] == 1.0


def test_decaying_schedules():
    got = lrs("linear", [0, 50, 100])
    assert got[0] == 1.0 and got[50] == pytest.approx(0.5) and got[100] == pytest.approx(0.0)
    got = lrs("polynomial", [0, 50, 100], lr_end=1e-3, lr_power=2.0)
    assert got[0] == 1.0 and got[50] == pytest.approx(1e-3 + (1 - 1e-3) * 0.25) and got[100] == pytest.approx(1e-3)


def test_cosine_is_simpletuners_wave_between_lr_and_lr_end():
    # SimpleTuner custom_schedule.Cosine: lr_end + (lr - lr_end)(1 + cos(pi t / P)) / 2 with P = lr_warmup_steps, no
    # warmup, for the whole run. lr 1, lr_end 0.1, P 10: t = 0: 1; t = 5: 0.55; t = 10: 0.1; t = 15: 0.55; t = 20: 1;
    # t = 250 (past the 100 planned steps, the wave goes on): cos(25 pi) = -1 -> 0.1.
    got = lrs("cosine", [0, 5, 10, 15, 20, 250], lr_warmup_steps=10, lr_end=0.1)
    expected = {0: 1.0, 5: 0.55, 10: 0.1, 15: 0.55, 20: 1.0, 250: 0.1}
    assert got == pytest.approx(expected)


def test_cosine_without_warmup_steps_uses_a_half_period_of_1000(caplog):
    # SimpleTuner's Cosine falls back to T_0 = 1000 (with a warning) when lr_warmup_steps is 0: t = 500 is half-way.
    got = lrs("cosine", [0, 500, 1000], lr_end=0.0)
    assert got == pytest.approx({0: 1.0, 500: 0.5, 1000: 0.0}, abs=1e-12)
    assert "half-period" in caplog.text


def test_sine_is_simpletuners_wave_between_lr_and_lr_end():
    # SimpleTuner custom_schedule.Sine: lr_end + (lr - lr_end)(1 + sin(pi t / P)) / 2, P = lr_warmup_steps.
    # lr 1, lr_end 0.1, P 10: t = 0: 0.55 (half-way); t = 5: 1; t = 10: 0.55; t = 15: 0.1; t = 20: 0.55.
    got = lrs("sine", [0, 5, 10, 15, 20], lr_warmup_steps=10, lr_end=0.1)
    assert got == pytest.approx({0: 0.55, 5: 1.0, 10: 0.55, 15: 0.1, 20: 0.55})


def test_cosine_with_restarts_is_the_sgdr_schedule_of_simpletuners_class():
    # SimpleTuner's CosineAnnealingHardRestarts (SGDR, T_mult 1): eta_min + (eta_max - eta_min)(1 + cos(pi T_cur / T))
    # / 2 with T_cur = t mod T, T = lr_warmup_steps. lr 1, lr_end 0.1, T 4: t = 0: 1; t = 2: 0.55; t = 3:
    # 0.1 + 0.9 (1 + cos(3 pi / 4)) / 2 = 0.1 + 0.45 (1 - 0.70711) = 0.23180; t = 4 (restart): 1; t = 6: 0.55.
    got = lrs("cosine_with_restarts", [0, 2, 3, 4, 6], lr_warmup_steps=4, lr_end=0.1)
    assert got == pytest.approx({0: 1.0, 2: 0.55, 3: 0.2318019, 4: 1.0, 6: 0.55})


@pytest.mark.parametrize("name", ["sine", "cosine_with_restarts"])
def test_waves_without_a_period_are_config_errors(name):
    p = torch.nn.Parameter(torch.zeros(1))
    config = Config(learning_rate=1.0, lr_scheduler=name)
    opt = build_optimizer([p], config, device_type="cpu")
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        build_lr_scheduler(opt, config, 100)


def test_polynomial_lr_end_above_lr_is_a_config_error():
    p = torch.nn.Parameter(torch.zeros(1))
    config = Config(learning_rate=1e-6, lr_scheduler="polynomial", lr_end=1e-3)
    opt = build_optimizer([p], config, device_type="cpu")
    with pytest.raises(ConfigError, match="lr_end"):
        build_lr_scheduler(opt, config, 100)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "polynomial",
                                  "linear", "sine"])  # fmt: skip
def test_scheduler_state_dict_round_trip_continues_identically(name, tmp_path):
    from pipeline.train.state_io import load_state, save_state

    config = Config(learning_rate=0.5, lr_scheduler=name, lr_warmup_steps=5, lr_num_cycles=3)

    def make():
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], config, device_type="cpu")
        return opt, build_lr_scheduler(opt, config, 60)

    opt, scheduler = make()
    for _ in range(17):
        opt.step()
        scheduler.step()
    save_state(tmp_path / "sched", {"scheduler": scheduler.state_dict(), "optimizer": opt.state_dict()})
    expected = []
    for _ in range(10):
        opt.step()
        scheduler.step()
        expected.append(opt.param_groups[0]["lr"])
    opt2, scheduler2 = make()
    saved = load_state(tmp_path / "sched")
    opt2.load_state_dict(saved["optimizer"])
    scheduler2.load_state_dict(saved["scheduler"])
    assert scheduler2.last_epoch == 17
    got = []
    for _ in range(10):
        opt2.step()
        scheduler2.step()
        got.append(opt2.param_groups[0]["lr"])
    assert got == expected


def test_schedule_free_gets_a_flat_schedule_and_its_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    config = Config(optimizer="adamw_schedulefree", lr_scheduler="cosine", lr_warmup_steps=7, learning_rate=1e-4)
    opt = build_optimizer([p], config, device_type="cpu")
    assert opt.param_groups[0]["warmup_steps"] == 7
    scheduler = build_lr_scheduler(opt, config, 10)
    for _ in range(5):
        p.grad = torch.ones_like(p)
        opt.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [1e-4]


def test_prodigy_keeps_the_lr_scheduler_over_its_lr_of_one():
    # SimpleTuner's prodigy: override_lr_scheduler False, can_warmup False: the schedule runs over lr 1.0.
    config = Config(optimizer="prodigy", lr_scheduler="linear", lr_warmup_steps=4, learning_rate=1e-4)
    groups = prodigy_params()
    opt = build_optimizer(groups, config, device_type="cpu")
    assert "warmup_steps" not in opt.param_groups[0]
    scheduler = build_lr_scheduler(opt, config, 10)
    lrs = []
    for step in range(6):
        prodigy_steps_of(opt, groups, 1, start=step)
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6])  # linear: warmup 4, then down to 0 at 10


def test_lr_scale():
    base = dict(learning_rate=1e-4, train_batch_size=4, gradient_accumulation_steps=2, num_processes=2)
    assert effective_learning_rate(Config(**base)) == 1e-4
    assert effective_learning_rate(Config(lr_scale=True, **base)) == pytest.approx(1.6e-3)
    assert effective_learning_rate(Config(lr_scale=True, lr_scale_sqrt=True, **base)) == pytest.approx(4e-4)
    assert effective_learning_rate(Config(lr_scale_sqrt=True, **base)) == 1e-4  # as SimpleTuner: needs lr_scale
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], Config(lr_scale=True, **base), device_type="cpu")
    assert opt.param_groups[0]["lr"] == pytest.approx(1.6e-3)
    options = OptimizerOptions.from_config(Config(lr_scale=True, **base))
    assert effective_learning_rate(options) == pytest.approx(1.6e-3)


def test_num_processes_must_match_the_processes_launched():
    """lr_scale and st prepare's bucket pruning count num_processes; a launch with another count is refused."""
    check_world_size(2, 2)
    with pytest.raises(ConfigError, match=r"num_processes is 1, but 2 process\(es\) were launched; set "
                                          r"num_processes = 2 .* re-run `st prepare`"):
        check_world_size(1, 2)
    assert global_batch(4, 2) == 8 and global_batch(4, 2, 3) == 24


def test_option_groups_name_real_options():
    for group in (OptimizerOptions, AdapterOptions, ObjectiveOptions, ValidationOptions, CheckpointOptions):
        assert {f.name for f in dataclasses.fields(group)} <= set(OPTION_FIELDS), group.__name__
    config = Config(checkpoint_step_interval=4, checkpointing_rolling_steps=2, checkpoint_epoch_interval=3,
                    validation_epoch_interval=2)  # fmt: skip
    checkpoints, validations = CheckpointOptions.from_config(config), ValidationOptions.from_config(config)
    assert [checkpoints.due(step, False, 0) for step in (1, 2, 3, 4)] == [None, "rolling", None, "checkpoint"]
    assert checkpoints.due(5, True, 2) == "checkpoint" and checkpoints.due(5, True, 1) is None
    assert validations.due(5, True, 1) and not validations.due(5, True, 0) and not validations.due(4, False, 1)


# Clipping.


def with_grads():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, -4.0]), torch.tensor([0.0, 12.0])
    return [a, b]


def test_clip_by_value():
    params = with_grads()
    norm = clip_gradients(params, Config(grad_clip_method="value", max_grad_norm=2.0))
    assert norm == pytest.approx(13.0)
    assert params[0].grad.tolist() == [2.0, -2.0] and params[1].grad.tolist() == [0.0, 2.0]


def test_clip_by_norm():
    params = with_grads()
    norm = clip_gradients(params, Config(grad_clip_method="norm", max_grad_norm=1.3))
    assert norm == pytest.approx(13.0)
    total = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    assert total == pytest.approx(1.3, rel=1e-4)
    torch.testing.assert_close(params[0].grad, torch.tensor([0.3, -0.4]), rtol=1e-4, atol=1e-6)


def test_clipping_disabled():
    params = with_grads()
    assert clip_gradients(params, Config(grad_clip_method="norm", max_grad_norm=0)) == pytest.approx(13.0)
    assert params[1].grad.tolist() == [0.0, 12.0]
    assert clip_gradients([torch.nn.Parameter(torch.zeros(1))], Config()) == 0.0


def test_adam_weight_decay_and_epsilon_load_and_are_listed_as_ignored():
    # SimpleTuner's examples set adam_weight_decay: such a config loads; `st options` says nothing reads it.
    from pipeline.config import build_config
    from pipeline.option_list import all_options

    config, ignored = build_config({"adam_weight_decay": 0.1, "adam_epsilon": 1e-6, "adam_beta2": 0.95}, where="test")
    assert (config.adam_weight_decay, config.adam_epsilon, config.optimizer_beta2) == (0.1, 1e-6, 0.95)
    rows = {row.name: row for row in all_options()}
    for name in ("adam_weight_decay", "adam_epsilon"):
        assert rows[name].state == "accepted" and "only under DeepSpeed" in rows[name].notes
        assert name not in Config().stage_keys("train")  # changing it re-trains nothing
    assert rows["adam_beta2"].state == "alias of optimizer_beta2"
