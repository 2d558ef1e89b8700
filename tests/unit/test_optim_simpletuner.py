"""The optimizers st builds with SimpleTuner's settings: its first six (adamw_bf16, optimi-adamw/-stableadamw/-lion,
adamw_schedulefree, bnb-adamw8bit) and optimi-radam/-ranger/-adan/-adam/-sgd, torchao's ao-*, the adamw_schedulefree
variants and st's own SOAP (pipeline/train/soap.py)."""

from __future__ import annotations

import functools
import importlib
import logging
import re

import pytest
import torch

from pipeline.config import Config, build_config
from pipeline.errors import ConfigError, MachineError
from pipeline.train.optim import (
    SIMPLETUNER_DEFAULTS,
    TORCHAO,
    averaged_weights,
    build_lr_scheduler,
    build_optimizer,
    check,
    clip_gradients,
    optimizer_class,
    optimizer_kwargs,
)
from pipeline.train.options import OptimizerOptions
from pipeline.train.soap import SOAP
from pipeline.train.state_io import load_state, save_state

# SimpleTuner's optimizer_choices[...]["default_settings"] (helpers/training/optimizer_param.py), copied by hand.
SIMPLETUNER = {
    "optimi-radam": dict(betas=(0.9, 0.99), weight_decay=0.0, eps=1e-6, decouple_wd=True, decouple_lr=False,
                         kahan_sum=True, foreach=True),
    "optimi-ranger": dict(betas=(0.9, 0.99), weight_decay=0.0, eps=1e-6, k=6, alpha=0.5, decouple_wd=True,
                          decouple_lr=False, max_lr=None, kahan_sum=True, foreach=True),
    "optimi-adan": dict(betas=(0.98, 0.92, 0.999), weight_decay=2e-2, eps=1e-6, decouple_lr=False, max_lr=None,
                        adam_wd=False, kahan_sum=True, foreach=True),
    "optimi-adam": dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0, decouple_wd=False, decouple_lr=False,
                        kahan_sum=True, max_lr=None),
    "optimi-sgd": dict(momentum=0, weight_decay=0.0, dampening=False, decouple_wd=False, decouple_lr=False, max_lr=None,
                       torch_init=False, kahan_sum=True, foreach=True),
    "ao-adamw8bit": dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-6),
    "ao-adamw4bit": dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-6),
    "ao-adamfp8": dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-6),
    "ao-adamwfp8": dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-6),
    "adamw_schedulefree+aggressive": dict(betas=(0.9, 0.999), weight_decay=1e-3, eps=1e-6),
    # SimpleTuner also lists use_kahan=False, which its kwargs filter drops (its class takes kahan_sum).
    "adamw_schedulefree+no_kahan": dict(betas=(0.9, 0.999), weight_decay=1e-3, eps=1e-6),
    "soap": dict(betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8, weight_decay=0.01, precondition_frequency=10,
                 max_precond_dim=10000, merge_dims=False, precondition_1d=False, normalize_grads=False,
                 data_format="channels_first", correct_bias=True),
}  # fmt: skip
# st's first optimizers, built with betas (0.9, 0.999), adam_weight_decay and adam_epsilon before.
ORIGINAL = {
    "adamw_bf16": dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-6),
    "optimi-adamw": dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0, decouple_lr=False, kahan_sum=True,
                         max_lr=None),
    "optimi-stableadamw": dict(betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6, decouple_lr=False, max_lr=None,
                               kahan_sum=True, foreach=True),
    "optimi-lion": dict(betas=(0.9, 0.99), weight_decay=0.0, decouple_lr=False, max_lr=None, kahan_sum=True,
                        foreach=True),
    "adamw_schedulefree": dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8),
    "bnb-adamw8bit": dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-6),
}  # fmt: skip
CLASSES = {"optimi-radam": "optimi.RAdam", "optimi-ranger": "optimi.Ranger", "optimi-adan": "optimi.Adan",
           "optimi-adam": "optimi.Adam", "optimi-sgd": "optimi.SGD", "ao-adamw8bit": "torchao.optim.AdamW8bit",
           "ao-adamw4bit": "torchao.optim.AdamW4bit", "ao-adamfp8": "torchao.optim.AdamFp8",
           "ao-adamwfp8": "torchao.optim.AdamWFp8",
           "adamw_schedulefree+aggressive": "schedulefree.AdamWScheduleFree",
           "adamw_schedulefree+no_kahan": "schedulefree.AdamWScheduleFree",
           "soap": "pipeline.train.soap.SOAP", "adamw_bf16": "pipeline.train.optim.AdamWBF16",
           "optimi-adamw": "optimi.AdamW", "optimi-stableadamw": "optimi.StableAdamW", "optimi-lion": "optimi.Lion",
           "adamw_schedulefree": "schedulefree.AdamWScheduleFree"}  # fmt: skip
NEW = sorted(SIMPLETUNER)
ON_CPU = sorted(SIMPLETUNER.keys() | ORIGINAL.keys() - {"bnb-adamw8bit"})  # bitsandbytes' AdamW8bit needs CUDA


@pytest.fixture(autouse=True)
def eager_torchao(monkeypatch):
    """torchao compiles its step (inductor: 5-30 s per parameter shape on a CPU); here dynamo's eager backend runs
    the same traced step at once."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))


def lora_model() -> torch.nn.Module:
    """Two real peft LoRA layers: one whose A and B hold 4096 values (torchao quantises their moments), one small."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    config = LoraConfig(r=64, lora_alpha=64, target_modules=["0", "2"], rank_pattern={"2": 4}, alpha_pattern={"2": 4})
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def lora_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 64, generator=gen), torch.randn(16, 8, generator=gen)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def options(**values) -> OptimizerOptions:
    return OptimizerOptions.from_config(Config(**values))


@pytest.mark.parametrize("name", ON_CPU)
def test_kwargs_are_simpletuners_defaults_and_a_step_moves_the_lora(name):
    assert set(SIMPLETUNER_DEFAULTS) == set(SIMPLETUNER) | set(ORIGINAL)  # every optimizer but prodigy
    config = Config(optimizer=name, learning_rate=1e-2, lr_warmup_steps=3)
    cls = optimizer_class(name, device_type="cpu")
    module, _, class_name = CLASSES[name].rpartition(".")
    assert issubclass(cls, getattr(importlib.import_module(module), class_name))  # torchao's: a resumable subclass
    kwargs = optimizer_kwargs(OptimizerOptions.from_config(config), cls)
    expected = {"lr": 1e-2, **SIMPLETUNER.get(name, ORIGINAL.get(name))}
    if name.startswith("adamw_schedulefree"):
        expected["warmup_steps"] = 3  # SimpleTuner's can_warmup: lr_warmup_steps
    assert kwargs == expected
    model = lora_model()
    before = [p.detach().clone() for p in lora_params(model)]
    opt = build_optimizer(lora_params(model), config, device_type="cpu")
    train_steps(model, opt, range(2))  # SOAP's first step only gathers its statistics: two steps
    b_weights = [(a, p) for a, (n, p) in zip(before, ((n, p) for n, p in model.named_parameters() if p.requires_grad))
                 if "lora_B" in n]  # fmt: skip
    assert b_weights and all(not torch.equal(a, p) for a, p in b_weights), name  # B starts at 0: it moved
    assert all(torch.isfinite(p).all() for p in lora_params(model))


def test_bnb_adamw8bit_kwargs_are_simpletuners_defaults():
    # bitsandbytes' AdamW8bit takes lr, betas, eps and weight_decay under torch.optim.AdamW's names; without CUDA
    # (and bitsandbytes) here, the settings are checked against AdamW's signature.
    kwargs = optimizer_kwargs(options(optimizer="bnb-adamw8bit", learning_rate=1e-2, adam_epsilon=1e-3,
                                      adam_weight_decay=0.5), torch.optim.AdamW)  # fmt: skip
    assert kwargs == {"lr": 1e-2, **ORIGINAL["bnb-adamw8bit"]}


def test_simpletuners_default_keys_the_class_lacks_are_dropped_and_user_keys_refused():
    class NoForeach(torch.optim.SGD):
        def __init__(self, params, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0):
            super().__init__(params, lr=lr, weight_decay=weight_decay)

    kwargs = optimizer_kwargs(options(optimizer="optimi-lion", learning_rate=1e-2), NoForeach)
    assert kwargs == {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.0}  # decouple_lr, kahan_sum, ... dropped
    with pytest.raises(ConfigError, match=r"optimizer_config has 'foreach', which optimizer 'optimi-lion'"):
        optimizer_kwargs(options(optimizer="optimi-lion", optimizer_config="foreach=true"), NoForeach)


@pytest.mark.parametrize("name", ON_CPU)
def test_state_round_trips_through_a_checkpoint_exactly(name, tmp_path):
    config = Config(optimizer=name, learning_rate=1e-2,
                    optimizer_config="precondition_frequency=2" if name == "soap" else None)  # fmt: skip
    straight, resumed = lora_model(), lora_model()
    opt = build_optimizer(lora_params(straight), config, device_type="cpu")
    train_steps(straight, opt, range(3))
    save_state(tmp_path / "opt", opt.state_dict())  # st's checkpoint format: safetensors + JSON
    resumed.load_state_dict(straight.state_dict())
    train_steps(straight, opt, range(3, 6))
    again = build_optimizer(lora_params(resumed), config, device_type="cpu")
    again.load_state_dict(load_state(tmp_path / "opt"))
    train_steps(resumed, again, range(3, 6))
    for a, b in zip(lora_params(straight), lora_params(resumed)):
        assert torch.equal(a, b), name
    if name in TORCHAO:  # the 64x64 LoRA weights' moments are torchao's quantised tensors, before and after
        state = again.state[lora_params(resumed)[0]]
        assert type(state["exp_avg"]).__name__.startswith("OptimState")
        assert isinstance(again.param_groups[0]["lr"], float)


@pytest.mark.parametrize("name", ["optimi-adam", "ao-adamw8bit", "adamw_schedulefree+aggressive", "soap"])
def test_optimizer_config_and_both_betas_override_the_defaults(name, caplog):
    cls = optimizer_class(name, device_type="cpu")
    kwargs = optimizer_kwargs(options(optimizer=name, optimizer_config="weight_decay=0.5,eps=1e-3",
                                      optimizer_beta1=0.8, optimizer_beta2=0.85), cls)  # fmt: skip
    assert (kwargs["weight_decay"], kwargs["eps"], kwargs["betas"]) == (0.5, 1e-3, (0.8, 0.85))
    with caplog.at_level(logging.WARNING, logger="st"):
        kwargs = optimizer_kwargs(options(optimizer=name, optimizer_beta2=0.5), cls)
    assert kwargs["betas"] == SIMPLETUNER[name]["betas"] and "only together" in caplog.text
    with pytest.raises(ConfigError, match=rf"'bogus'.*{re.escape(name)}"):
        optimizer_kwargs(options(optimizer=name, optimizer_config="bogus=1"), cls)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="st"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], Config(optimizer=name, adam_weight_decay=0.3),
                        device_type="cpu")  # fmt: skip
    assert "adam_weight_decay and adam_epsilon are not used" in caplog.text


def test_adan_takes_three_betas_from_optimizer_config_only():
    with pytest.raises(ConfigError, match=r"optimizer=optimi-adan takes 3 betas .*optimizer_config=\"betas="):
        check(Config(optimizer="optimi-adan", optimizer_beta1=0.9, optimizer_beta2=0.9))
    group = build_optimizer([torch.nn.Parameter(torch.zeros(2))], Config(
        optimizer="optimi-adan", optimizer_config="betas=(0.9,0.8,0.99)"), device_type="cpu").param_groups[0]
    assert (group["beta1"], group["beta2"], group["beta3"]) == (0.9, 0.8, 0.99)


def test_config_accepts_every_optimizer_of_simpletuners_reference():
    from pathlib import Path

    reference = (Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "simpletuner-options.txt")
    choices = ["adamw_bf16", "ao-adamw8bit", "ao-adamw4bit", "ao-adamfp8", "ao-adamwfp8", "adamw_schedulefree",
               "adamw_schedulefree+aggressive", "adamw_schedulefree+no_kahan", "optimi-stableadamw", "optimi-adamw",
               "optimi-lion", "optimi-radam", "optimi-ranger", "optimi-adan", "optimi-adam", "optimi-sgd", "soap",
               "prodigy"]  # the reference's `--optimizer {...}`
    if reference.is_file():
        assert "{" + ",".join(choices) + "}" in reference.read_text()
    for name in choices:
        config, _ = build_config({"optimizer": name}, where="test")
        assert config.optimizer == name
        check(config)  # st check / st train's pre-work check: all run on this CPU


def test_fp8_moments_need_compute_capability_8_9_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    for name in ("ao-adamfp8", "ao-adamwfp8"):
        with pytest.raises(MachineError, match=rf"optimizer {name} keeps its moments in fp8.*8.9.*this GPU: 8.0"):
            check(Config(optimizer=name))
    check(Config(optimizer="ao-adamw8bit"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    check(Config(optimizer="ao-adamfp8"))


@pytest.mark.parametrize("name", ["adamw_schedulefree+aggressive", "adamw_schedulefree+no_kahan"])
def test_schedule_free_variants_schedule_themselves_and_switch_to_averaged_weights(name):
    config = Config(optimizer=name, lr_scheduler="cosine", lr_warmup_steps=4, learning_rate=1e-3)
    model = lora_model()
    opt = build_optimizer(lora_params(model), config, device_type="cpu")
    scheduler = build_lr_scheduler(opt, config, 10)
    for step in range(3):
        train_steps(model, opt, range(step, step + 1))
        scheduler.step()
    assert scheduler.get_last_lr() == [1e-3] and opt.param_groups[0]["warmup_steps"] == 4
    p = lora_params(model)[1]
    training = p.detach().clone()
    with averaged_weights(opt):
        assert opt.param_groups[0]["train_mode"] is False and not torch.equal(p, training)
    assert opt.param_groups[0]["train_mode"] is True


@pytest.mark.parametrize("name", NEW)
def test_new_optimizers_are_clipped(name):
    # SimpleTuner's should_clip_gradients skips only optimi-stableadamw and prodigy.
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([30.0, -40.0, 0.0])
    assert clip_gradients([p], Config(optimizer=name, max_grad_norm=1.0)) == 50.0
    assert p.grad.tolist() == [1.0, -1.0, 0.0]


# SOAP.


def least_squares():
    torch.manual_seed(0)
    a, b = torch.randn(10, 8), torch.randn(10, 6)
    solution = torch.linalg.lstsq(torch.cat([a, torch.ones(10, 1)], 1), b).solution
    best = ((torch.cat([a, torch.ones(10, 1)], 1) @ solution - b) ** 2).mean().item()
    return a, b, best


def test_soap_converges_on_a_quadratic_and_its_first_step_only_sets_the_basis():
    a, b, best = least_squares()
    w, bias = torch.nn.Parameter(torch.zeros(8, 6)), torch.nn.Parameter(torch.zeros(6))
    opt = SOAP([w, bias], lr=0.05, weight_decay=0.0)

    def loss():
        return ((a @ w + bias - b) ** 2).mean()

    opt.zero_grad()
    start = loss()
    start.backward()
    opt.step()
    assert torch.equal(w, torch.zeros(8, 6)) and opt.state[w]["step"] == 0  # statistics and eigenbasis only
    assert [s.shape for s in opt.state[w]["stats"]] == [(8, 8), (6, 6)] and opt.state[bias]["stats"] == [None]
    q = opt.state[w]["bases"][0]
    torch.testing.assert_close(q.T @ q, torch.eye(8), atol=1e-5, rtol=0)  # orthonormal
    for _ in range(300):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < best * 1.01 < start.item()  # at the least-squares optimum (1.16 -> 0.1424)


def test_soap_state_round_trips_exactly_through_refreshes_and_keeps_fp32_moments(tmp_path):
    def make(dtype):
        torch.manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(12, 5).to(dtype)), torch.nn.Parameter(torch.randn(2, 3, 4).to(dtype)),
                  torch.nn.Parameter(torch.randn(7).to(dtype))]  # fmt: skip
        return params, SOAP(params, lr=1e-2, precondition_frequency=3, precondition_1d=True)

    def steps(params, opt, span):
        for step in span:
            gen = torch.Generator().manual_seed(step)
            opt.zero_grad()
            sum(((p.float() - torch.randn(p.shape, generator=gen)) ** 2).sum() for p in params).backward()
            opt.step()

    for dtype in (torch.float32, torch.bfloat16):
        params, opt = make(dtype)
        steps(params, opt, range(5))  # refreshes after Adam steps 3 (and 6, 9 below)
        save_state(tmp_path / f"soap-{dtype}", opt.state_dict())
        steps(params, opt, range(5, 12))
        params2, opt2 = make(dtype)
        saved = load_state(tmp_path / f"soap-{dtype}")
        p_again, o_again = make(dtype)  # the parameters as they were at the save
        steps(p_again, o_again, range(5))
        with torch.no_grad():
            for p, q in zip(params2, p_again):
                p.copy_(q)
        opt2.load_state_dict(saved)
        assert all(s is None or s.dtype == torch.float32 for s in opt2.state[params2[0]]["stats"])
        assert opt2.state[params2[0]]["exp_avg_sq"].dtype == torch.float32
        steps(params2, opt2, range(5, 12))
        for p, q in zip(params, params2):
            assert torch.equal(p, q), dtype
        assert opt2.state[params2[2]]["step"] == 11


def test_soap_merge_dims_and_channels_last():
    conv = torch.nn.Parameter(torch.randn(4, 3, 2, 2))
    opt = SOAP([conv], lr=1e-2, merge_dims=True, max_precond_dim=8, data_format="channels_last")
    for _ in range(3):
        opt.zero_grad()
        (conv**2).sum().backward()
        opt.step()
    # NCHW (4, 2, 3, 2) from channels-last, merged while the product stays <= 8: (8, 6).
    assert [s.shape for s in opt.state[conv]["stats"]] == [(8, 8), (6, 6)]
    assert opt.state[conv]["exp_avg"].shape == (8, 6)
    with pytest.raises(ConfigError, match="optimizer 'soap' rejected its settings"):
        build_optimizer([conv], Config(optimizer="soap", optimizer_config="data_format=nhwc"), device_type="cpu")


def test_st_check_accepts_the_new_optimizers_and_reports_their_bad_settings(tmp_path):
    import json

    from pipeline.check import run_check
    from pipeline.train.checks import config_checks

    config = tmp_path / "config.json"
    base = {"model_family": "sd1x", "pretrained_model_name_or_path": str(tmp_path / "missing-model")}
    config.write_text(json.dumps({**base, "optimizer": "optimi-adam"}))  # exited 2 before st had it
    assert not [p for p in run_check(config, stage_checks=config_checks()).problems if "optimi" in p or "optimizer" in p]
    config.write_text(json.dumps({**base, "optimizer": "soap", "optimizer_config": "bogus=1"}))
    assert [p for p in run_check(config, stage_checks=config_checks()).problems if "optimizer_config has 'bogus', which optimizer 'soap'" in p]
