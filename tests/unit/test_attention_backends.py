"""attention_mechanism values that select diffusers' attention-dispatcher backends (flash-attn*, the -hub kernels, flex,
native, native-npu/xla, sageattention*) and xformers: what runs on this CPU machine trains and is really the backend
diffusers' dispatcher uses; what needs a package or a GPU this machine lacks is refused up front by `st train` and
`st check` alike, naming the value, the package and how to get it."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend

from pipeline import speed
from pipeline.config import Config, build_config
from pipeline.context_parallel_settings import check as check_context_parallel
from pipeline.errors import ConfigError, NotSupportedError, UserError

CUDA = torch.cuda.is_available()


@pytest.fixture
def dispatched(monkeypatch):
    """Records, for each attention computed through diffusers' dispatcher, the backend it ran on (each registered
    backend function wrapped: it still computes the attention)."""
    calls: list[str] = []
    for name, fn in list(_AttentionBackendRegistry._backends.items()):
        def spy(*args, _name=name, _fn=fn, **kwargs):
            calls.append(_name.value)
            return _fn(*args, **kwargs)

        monkeypatch.setitem(_AttentionBackendRegistry._backends, name, spy)
    return calls


# ------------------------------------------------------------------------------------------------- st train, CPU


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_native_backend_trains_as_the_sdpa_default_and_is_the_backend_used(family, cached, tmp_path, monkeypatch,
                                                                          dispatched):  # fmt: skip
    """`native` enters diffusers' `attention_backend("native")` around every step: it wins over the registry's
    default (here `_native_math`, as DIFFUSERS_ATTN_BACKEND=_native_math sets it; the spy sees every attention call
    run on "native"), and trains exactly as st's default (PyTorch SDPA through the native backend)."""
    from pipeline.manifest import read_manifest
    from tests.helpers.training import losses, train

    root, config = cached(family)
    train(config, root / "cache", tmp_path / "default", "seed=3")
    assert dispatched and set(dispatched) == {"native"}  # the default: PyTorch SDPA through the native backend
    reference = losses(tmp_path / "default")

    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", AttentionBackendName._NATIVE_MATH)
    dispatched.clear()
    validation = ("validation_disable=false", "validation_num_inference_steps=1", 'validation_resolution="64"')
    train(config, root / "cache", tmp_path / "native", "seed=3", 'attention_mechanism="native"',
          *(validation if family == "wan" else ()))  # fmt: skip
    assert dispatched and set(dispatched) == {"native"}  # training steps and (Wan) the validation render
    if family == "wan":
        assert read_manifest(tmp_path / "native")["validations"] == ["step-2"]
    assert losses(tmp_path / "native") == reference  # same kernel, same losses, bit for bit
    assert _AttentionBackendRegistry._active_backend == AttentionBackendName._NATIVE_MATH  # restored after each step
    assert len(reference) == 2 and all(loss == loss and loss > 0 for loss in reference.values())


def test_flex_runs_on_the_dispatcher_on_cpu_forward_only(tiny_model, dispatched):
    """flex on a real Wan transformer: the dispatcher runs FlexAttention and gives SDPA's output; its backward has no
    CPU kernel, which is why `st train` refuses flex without a CUDA GPU."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(tiny_model("wan"), subfolder="transformer").eval()
    g = torch.Generator().manual_seed(0)
    channels, text = model.config.in_channels, model.config.text_dim
    x = torch.randn(1, channels, 1, 8, 8, generator=g)
    t, e = torch.tensor([500]), torch.randn(1, 6, text, generator=g)
    with torch.no_grad(), speed.attention_context("diffusers", phase="training"):
        reference = model(x, t, e, return_dict=False)[0]
    assert set(dispatched) == {"native"}
    dispatched.clear()
    with torch.no_grad(), speed.attention_context("flex", phase="training"):
        out = model(x, t, e, return_dict=False)[0]
    assert dispatched and set(dispatched) == {"flex"}
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    with speed.attention_context("flex", phase="training"), pytest.raises(NotImplementedError, match="backward on CPU"):
        model(x, t, e, return_dict=False)[0].sum().backward()
    if not CUDA:
        with pytest.raises(ConfigError, match=r"attention_mechanism flex .* needs a CUDA GPU \(this run is on cpu; "
                                              "PyTorch's FlexAttention has no backward pass"):  # fmt: skip
            speed.check_train_options(Config(attention_mechanism="flex", model_family="wan"), torch.device("cpu"))


# ------------------------------------------------------------------------------------ requirements and refusals


@pytest.mark.parametrize(("value", "package"), [
    ("flash-attn", "flash_attn"), ("flash-attn-2", "flash_attn"), ("flash-attn-3", "flash_attn_interface"),
    ("flash-attn-3-varlen", "flash_attn_interface"), ("flash-attn-3-hub", "kernels"), ("flash_attn_hub", "kernels"),
    ("sageattention", "sageattention"), ("sageattention-int8-fp8-cuda", "sageattention"), ("xformers", "xformers"),
    ("native-npu", "torch_npu"), ("native-xla", "torch_xla"),
])  # fmt: skip
def test_kernels_this_machine_lacks_are_refused_up_front(value, package):
    if importlib.util.find_spec(package) is not None and CUDA:
        pytest.skip(f"{package} and a CUDA GPU are present")
    config = Config(attention_mechanism=value, model_family="wan")
    with pytest.raises(ConfigError) as info:
        speed.check_train_options(config, torch.device("cpu"))
    message = str(info.value)
    assert info.value.exit_code == 2 and message.startswith(f"attention_mechanism {value.replace('_', '-')} (")
    if importlib.util.find_spec(package) is None:
        assert f"the {package} package (" in message and "install" in message
    assert "this run is on cpu" in message and "use diffusers, native-flash or native-math" in message


@pytest.mark.parametrize("value", ["flash-attn-3-hub", "native-npu", "flex"])
def test_the_dispatcher_itself_refuses_what_is_missing(value):
    """The code path is diffusers' own: entering its backend context checks the same requirements."""
    backend = speed.attention_backend_of(value)
    if value == "flex":  # flex's forward works on the CPU; the package check passes
        with attention_backend(backend):
            return
    with pytest.raises(RuntimeError, match="not usable|isn't available"):
        with speed.attention_context(value, phase="training"):
            pass


def test_sageattention_usage_decides_the_phase_that_uses_it():
    """SimpleTuner's AttentionBackendMode: with the default usage (inference) training keeps SDPA and validation
    enters the SageAttention backend (which diffusers refuses here: no sageattention package)."""
    before = _AttentionBackendRegistry._active_backend
    with speed.attention_context("sageattention", phase="training", usage="inference"):
        assert _AttentionBackendRegistry._active_backend == before
    for phase, usage in (("inference", "inference"), ("training", "training"), ("inference", "training+inference")):
        context = speed.attention_context("sageattention", phase=phase, usage=usage)
        if importlib.util.find_spec("sageattention") is None:
            with pytest.raises(RuntimeError, match="Sage Attention backend 'sage' is not usable"), context:
                pass
    with speed.attention_context("sageattention", phase="inference", usage="training"):
        assert _AttentionBackendRegistry._active_backend == before
    assert Config().sageattention_usage == "inference"
    with pytest.raises(UserError, match="sageattention_usage"):
        build_config({"sageattention_usage": "always"})


def test_st_cache_keeps_sdpa_for_the_vae():
    """Without a phase (st cache's VAE encodes) a dispatcher value leaves the dispatcher alone."""
    before = _AttentionBackendRegistry._active_backend
    with speed.attention_context("flash-attn-3-hub"):
        assert _AttentionBackendRegistry._active_backend == before
    assert speed.check_attention("flash_attn_3_hub", torch.device("cpu")) == "flash-attn-3-hub"


@pytest.mark.parametrize("family", ["sdxl", "sd3", "pixart_sigma"])
def test_dispatcher_values_are_refused_for_transformers_that_bypass_the_dispatcher(family):
    with pytest.raises(ConfigError, match=f"attention_mechanism native selects diffusers' attention-dispatcher backend "
                                          f"'native', and model_family {family}'s"):  # fmt: skip
        speed.check_train_options(Config(attention_mechanism="native", model_family=family), torch.device("cpu"))
    speed.check_train_options(Config(attention_mechanism="native-math", model_family=family), torch.device("cpu"))


@pytest.mark.parametrize("family", ["flux", "wan", "qwen_image", "z_image", "flux2", "ltxvideo", "chroma",
                                    "cosmos2image"])  # fmt: skip
def test_dispatcher_families_accept_them(family):
    speed.check_train_options(Config(attention_mechanism="native", model_family=family), torch.device("cpu"))


def test_the_loaded_denoiser_is_checked_too(tiny_model):
    """A flavour's transformer may differ from its family's: the processors of the model loaded are checked."""
    from diffusers import UNet2DConditionModel, WanTransformer3DModel

    wan = WanTransformer3DModel.from_pretrained(tiny_model("wan"), subfolder="transformer")
    assert speed.setup_attention(wan, "native") == "native"
    assert speed.setup_attention(wan, "native-math") is None
    unet = UNet2DConditionModel.from_pretrained(tiny_model("sd1x"), subfolder="unet")
    with pytest.raises(ConfigError, match=r"UNet2DConditionModel \(AttnProcessor2_0\) computes attention without"):
        speed.setup_attention(unet, "flash-attn")
    if importlib.util.find_spec("xformers") is None:  # diffusers' own xformers switch refuses it here
        with pytest.raises((ModuleNotFoundError, ValueError)):
            speed.setup_attention(unet, "xformers")


@pytest.mark.parametrize("value", ["sla", "metal-flash-attention"])
def test_simpletuner_values_st_does_not_offer_exit_2(value):
    with pytest.raises(NotSupportedError, match=f"attention_mechanism '{value}' is not supported by st yet"):
        speed.check_train_options(Config(attention_mechanism=value))


# --------------------------------------------------------------------------------------------- context parallel


@pytest.mark.parametrize(("value", "ok"), [("diffusers", True), ("native-math", True), ("native", True),
                                           ("flash-attn-3-hub", True), ("flash-attn", True), ("flex", False),
                                           ("flash-attn-3", False), ("xformers", False),
                                           ("sageattention", True)])  # fmt: skip
def test_context_parallel_takes_the_backends_with_context_parallel_attention(value, ok):
    config = Config(attention_mechanism=value, model_family="wan", context_parallel_size=2,
                    context_parallel_comm_strategy="alltoall")  # fmt: skip
    if ok:
        check_context_parallel(config, "wan", "WanTransformer3DModel")
        return
    with pytest.raises(ConfigError, match=f"context_parallel_size 2 with attention_mechanism {value}: .*"
                                          "flash-attn-3-hub.*or set context_parallel_size 1"):  # fmt: skip
        check_context_parallel(config, "wan", "WanTransformer3DModel")


# ------------------------------------------------------------------------------------------------------ st check


def test_st_check_reports_what_st_train_refuses(cached, cli):
    _, config = cached("sd1x")
    for value, family_problem in (("native", True), ("flash-attn-3-hub", True), ("native-math", False)):
        result = cli("check", "--config", config, "--set", f'attention_mechanism="{value}"')
        if not family_problem:
            assert result.exit_code == 0 and "check: ok" in result.output, result.output
            continue
        assert result.exit_code == 2, result.output
        assert f"attention_mechanism {value} selects diffusers' attention-dispatcher backend" in result.output
