"""pipeline.speed on the CPU: every speed option is honoured (kernel choice, compilation, checkpointing interval,
TF32 flags, VAE slicing/tiling, QKV fusion, cache clearing) and `st train` runs with them."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import speed
from pipeline.config import Config
from pipeline.errors import ConfigError, NotSupportedError
from pipeline.families.sd1x import unet as tiny_unet

FLASH_CPU = "_scaled_dot_product_flash_attention_for_cpu"


class _Ops(TorchDispatchMode):
    """Records the aten ops that run (below autograd: the kernels SDPA dispatched to, forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _unet(seed: int = 0):
    torch.manual_seed(seed)
    return tiny_unet(cross_attention_dim=32).train()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g)


def _forward(model):
    x, t, e = _inputs()
    return model(x, t, encoder_hidden_states=e, return_dict=False)[0]


# ------------------------------------------------------------------------------------------------------- attention


def test_native_math_runs_forward_and_backward_on_the_math_kernel():
    model = _unet()
    with speed.attention_context("native-math"), _Ops() as seen:
        _forward(model).square().mean().backward()
    assert FLASH_CPU not in seen.ops and f"{FLASH_CPU}_backward" not in seen.ops
    assert "_safe_softmax" in seen.ops or "_softmax" in seen.ops  # the math path: softmax(QK^T)V
    assert all(p.grad is not None for n, p in model.named_parameters() if "attn1.to_q" in n)


@pytest.mark.parametrize("name", ["native-flash", "diffusers"])
def test_flash_on_cpu_and_the_default_pick_the_cpu_flash_kernel(name):
    model = _unet()
    with speed.attention_context(name), _Ops() as seen:
        out = _forward(model)
        out.square().mean().backward()
    assert FLASH_CPU in seen.ops and f"{FLASH_CPU}_backward" in seen.ops
    with speed.attention_context("native-math"):
        reference = _forward(_unet())
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["native-efficient", "cudnn"])
def test_cuda_only_kernels_fail_on_cpu_and_are_refused_up_front(name):
    # What torch does: with only a CUDA kernel allowed, SDPA on CPU tensors finds no kernel.
    with speed.attention_context(name), pytest.raises(RuntimeError, match="No viable backend"):
        _forward(_unet())
    # What st does: refuse the run before it starts, with advice (exit 2).
    with pytest.raises(ConfigError, match=f"'{name}' is a CUDA kernel") as info:
        speed.check_attention(name, torch.device("cpu"))
    assert info.value.exit_code == 2
    assert speed.check_attention(name, torch.device("cuda", 0)) == name


def test_the_default_never_allows_cudnn():
    from torch.nn.attention import SDPBackend

    assert "CUDNN_ATTENTION" not in speed.SDPA_BACKENDS["diffusers"]
    assert speed.SDPA_BACKENDS["cudnn"] == ("CUDNN_ATTENTION",)
    assert Config().attention_mechanism == "diffusers"
    with speed.attention_context("diffusers"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    with speed.attention_context("cudnn"):
        assert torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert SDPBackend.CUDNN_ATTENTION  # the member st names exists in this torch


@pytest.mark.parametrize("name", speed.ATTENTION_NOT_YET)
def test_simpletuner_mechanisms_not_in_st_yet_exit_2(name):
    with pytest.raises(NotSupportedError, match=f"attention_mechanism '{name}' is not supported by st yet") as info:
        speed.attention_context(name)
    assert info.value.exit_code == 2


def test_unknown_mechanism_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError, match="unknown attention_mechanism 'fast'; choose one of diffusers, native-flash, "
                                          "native-efficient, native-math, cudnn"):  # fmt: skip
        speed.attention_context("fast")


def test_backward_must_be_inside_the_context_when_checkpointing():
    """Checkpointed blocks re-run their forward during backward: outside the context the recomputation picks another
    kernel, whose saved tensors differ, and torch's checkpoint refuses it."""
    from torch.utils.checkpoint import CheckpointError

    model = _unet()
    speed.gradient_checkpointing(model)
    with speed.attention_context("native-math"):
        out = _forward(model)
    with pytest.raises(CheckpointError, match="Recomputed values"):
        out.square().mean().backward()
    model.zero_grad()
    with speed.attention_context("native-math"):
        out = _forward(model)
        with _Ops() as inside:
            out.square().mean().backward()
    assert FLASH_CPU not in inside.ops


# --------------------------------------------------------------------------------------------------------- compile


def test_eager_backend_compiles_and_matches_eager():
    reference = _forward(_unet())
    model = _unet()
    compiled = speed.compile_module(model, Config(dynamo_backend="eager", dynamo_use_regional_compilation=False))
    assert compiled == [""] and speed.compiled_submodules(model) == [""]
    torch._dynamo.reset()
    out = _forward(model)
    torch.testing.assert_close(out, reference)
    out.square().mean().backward()
    assert set(model.state_dict()) == set(_unet().state_dict())  # compiled in place: names unchanged


def test_regional_compilation_compiles_each_repeated_block():
    model = _unet()
    compiled = speed.compile_module(model, Config(dynamo_backend="eager"))
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert compiled == blocks and len(blocks) == 4
    assert speed.compiled_submodules(model) == blocks
    torch.testing.assert_close(_forward(model), _forward(_unet()))


def test_regional_compilation_falls_back_to_block_lists():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
            self.head = torch.nn.Linear(4, 1)

        def forward(self, x):
            for block in self.blocks:
                x = block(x).relu()
            return self.head(x)

    net = Net()
    assert speed.compile_module(net, Config(dynamo_backend="eager")) == ["blocks.0", "blocks.1", "blocks.2"]
    assert net(torch.ones(2, 4)).shape == (2, 1)


def test_compilation_is_off_by_default_and_for_no(monkeypatch):
    monkeypatch.delenv(speed.ENV_DYNAMO_BACKEND, raising=False)
    model = _unet()
    assert speed.compile_module(model, Config()) == [] and speed.compiled_submodules(model) == []
    assert speed.dynamo_backend(Config(dynamo_backend="no")) is None
    assert speed.dynamo_backend(Config(dynamo_backend="NO")) is None


def test_training_dynamo_backend_env_is_honoured(monkeypatch):
    monkeypatch.setenv("TRAINING_DYNAMO_BACKEND", "eager")
    assert speed.dynamo_backend(Config()) == "eager"
    model = _unet()
    assert speed.compile_module(model, Config(dynamo_use_regional_compilation=False)) == [""]
    assert speed.compiled_submodules(model) == [""]
    # The config option wins over the environment.
    assert speed.dynamo_backend(Config(dynamo_backend="no")) is None
    assert speed.dynamo_backend(Config(dynamo_backend="inductor")) == "inductor"
    monkeypatch.setenv("TRAINING_DYNAMO_BACKEND", "warp-drive")
    with pytest.raises(ConfigError, match="TRAINING_DYNAMO_BACKEND 'warp-drive' is not a torch.compile backend"):
        speed.dynamo_backend(Config())


def test_compile_options_carry_mode_fullgraph_dynamic():
    options = speed.compile_options(Config(dynamo_backend="inductor", dynamo_mode="max-autotune",
                                           dynamo_fullgraph=True, dynamo_dynamic=True))  # fmt: skip
    assert options == {"backend": "inductor", "mode": "max-autotune", "fullgraph": True, "dynamic": True}
    with pytest.raises(ConfigError, match="unknown dynamo_mode 'turbo'"):
        speed.compile_options(Config(dynamo_backend="inductor", dynamo_mode="turbo"))
    with pytest.raises(ConfigError, match="inductor backend only"):
        speed.compile_options(Config(dynamo_backend="eager", dynamo_mode="max-autotune"))


# ------------------------------------------------------------------------------------------ gradient checkpointing


def _saved_tensors(model) -> int:
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _forward(model)
    out.square().mean().backward()
    return count[0]


def test_gradient_checkpointing_interval_2_checkpoints_every_second_block():
    model = _unet()
    report = speed.gradient_checkpointing(model, 2)
    flags = {n: m._st_checkpoint for n, m in model.named_modules() if hasattr(m, "_st_checkpoint")}
    resnets = [flags[n] for n in flags if type(model.get_submodule(n)).__name__ == "ResnetBlock2D"]
    blocks = [flags[n] for n in flags if type(model.get_submodule(n)).__name__ == "BasicTransformerBlock"]
    assert resnets == [i % 2 == 0 for i in range(len(resnets))] and len(resnets) == 8
    assert blocks == [True, False, True, False]
    assert report == {"interval": 2, "checkpointed": sum(flags.values()), "kept": len(flags) - sum(flags.values())}

    every = _unet()
    speed.gradient_checkpointing(every)
    saved = {"none": _saved_tensors(_unet()), "every 2nd": _saved_tensors(model), "every": _saved_tensors(every)}
    assert saved["every"] < saved["every 2nd"] < saved["none"], saved

    # Same outputs and gradients as without checkpointing.
    plain, gated = _unet(), _unet()
    speed.gradient_checkpointing(gated, 2)
    for m in (plain, gated):
        _forward(m).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), gated.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_gradient_checkpointing_interval_must_be_positive():
    with pytest.raises(ConfigError, match="gradient_checkpointing_interval must be an integer >= 1"):
        speed.gradient_checkpointing(_unet(), 0)
    with pytest.raises(ConfigError, match="gradient_checkpointing_interval must be an integer >= 1"):
        speed.check_train_options(Config(gradient_checkpointing_interval=0))


def test_interval_without_checkpointing_is_ignored():
    model = _unet()
    speed.setup_denoiser(model, Config(gradient_checkpointing=False, gradient_checkpointing_interval=2))
    assert not model.is_gradient_checkpointing
    speed.setup_denoiser(model, Config(gradient_checkpointing=True, gradient_checkpointing_interval=2))
    assert model.is_gradient_checkpointing


# ----------------------------------------------------------------------------------------------------- TF32, VAE


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_disable_tf32(tf32_flags):
    speed.setup_denoiser(_unet(), Config(disable_tf32=True))
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    speed.setup_denoiser(_unet(), Config())
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True


def _tiny_vae():
    from pipeline.families import tiny_parts

    torch.manual_seed(0)
    return tiny_parts.vae(4, 0.18215)


@pytest.mark.parametrize("slicing,tiling", [(True, False), (False, True), (True, True), (False, False)])
def test_vae_slicing_and_tiling_flags(slicing, tiling):
    vae = speed.vae_memory(_tiny_vae(), slicing, tiling)
    assert vae.use_slicing is slicing and vae.use_tiling is tiling


def test_cache_encoders_apply_the_vae_options(tf32_flags):
    from pipeline.cache.encode import Encoders
    from pipeline.families import get_family

    options = speed.SpeedOptions(attention_mechanism="native-math", vae_enable_slicing=True, vae_enable_tiling=True,
                                 disable_tf32=True, dynamo_backend="eager")  # fmt: skip
    encoders = Encoders(get_family("sd1x"), "unused", None, None, None, None, "fp32", torch.device("cpu"),
                        speed=options)  # fmt: skip
    vae = encoders.use_vae(_tiny_vae())
    assert vae.use_slicing and vae.use_tiling and torch.backends.cuda.matmul.allow_tf32 is False
    assert speed.compiled_submodules(vae) == ["encoder"]
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with _Ops() as seen:
        latents = encoders.encode_latents(pixels, ["a", "b"], seed=0)
    assert latents.shape == (2, 4, 16, 16) and FLASH_CPU not in seen.ops
    plain = Encoders(get_family("sd1x"), "unused", None, None, None, None, "fp32", torch.device("cpu"))
    plain.use_vae(_tiny_vae())
    torch.testing.assert_close(plain.encode_latents(pixels, ["a", "b"], seed=0), latents, atol=1e-4, rtol=1e-4)
    bad = Encoders(get_family("sd1x"), "unused", None, None, None, None, "fp32", torch.device("cpu"),
                   speed=speed.SpeedOptions(attention_mechanism="cudnn"))  # fmt: skip
    with pytest.raises(ConfigError, match="CUDA kernel"):
        bad.use_vae(_tiny_vae())


# ------------------------------------------------------------------------------------------------ fusing, clearing


def test_fuse_qkv_for_full_fine_tunes_keeps_weights_and_names():
    reference = _unet()
    fused = _unet()
    assert speed.fuse_qkv(fused, model_type="full") == 8  # 4 self-attention q/k/v + 4 cross-attention k/v
    assert set(fused.state_dict()) == set(reference.state_dict())
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in reference.parameters())
    out = _forward(fused)
    torch.testing.assert_close(out, _forward(reference), atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    attn = fused.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert attn.to_q.weight.grad is not None and attn.to_v.weight.grad is not None
    with torch.no_grad():  # an update of to_k is what the fused projection reads next
        attn.to_k.weight.add_(1.0)
    assert not torch.allclose(_forward(fused), out)


def test_fuse_qkv_is_refused_for_lora():
    with pytest.raises(ConfigError, match="fuse_qkv_projections works with model_type full only"):
        speed.check_train_options(Config(fuse_qkv_projections=True))  # model_type lora (the default)
    speed.check_train_options(Config(fuse_qkv_projections=True, model_type="full"))


def test_cache_clear_interval(monkeypatch):
    calls = []
    monkeypatch.setattr(speed.gc, "collect", lambda: calls.append(1))
    cleared = [step for step in range(1, 7) if speed.maybe_clear_cache(step, 3)]
    assert cleared == [3, 6] and len(calls) == 2
    assert not any(speed.maybe_clear_cache(step, None) for step in range(1, 5))
    with pytest.raises(ConfigError, match="accelerator_cache_clear_interval"):
        speed.check_train_options(Config(accelerator_cache_clear_interval=0))


# --------------------------------------------------------------------------------------------------- st train


@pytest.fixture(scope="module")
def sd1x_cache(tmp_path_factory, tiny_model):
    from tests.helpers.training import cached_dataset

    root = tmp_path_factory.mktemp("speed-train")
    return root, cached_dataset(root, "sd1x", tiny_model("sd1x"))


def test_train_runs_with_native_math_and_eager_compilation(sd1x_cache, tmp_path, monkeypatch, tf32_flags):
    from pipeline.manifest import read_manifest
    from tests.helpers.training import train

    seen = {"compiled": [], "cleared": [], "attention": []}
    compile_module, clear, attention = speed.compile_module, speed.maybe_clear_cache, speed.attention_context
    monkeypatch.setattr(speed, "compile_module", lambda m, c, **kw: seen["compiled"].append(compile_module(m, c, **kw))
                        or seen["compiled"][-1])  # fmt: skip
    monkeypatch.setattr(speed, "maybe_clear_cache", lambda step, n: seen["cleared"].append(clear(step, n)))
    monkeypatch.setattr(speed, "attention_context", lambda name, *a, **k: seen["attention"].append(name)
                        or attention(name, *a, **k))  # fmt: skip
    root, config = sd1x_cache
    train(config, root / "cache", tmp_path / "out", 'attention_mechanism="native-math"', 'dynamo_backend="eager"',
          "gradient_checkpointing=true", "gradient_checkpointing_interval=2", "accelerator_cache_clear_interval=1",
          "disable_tf32=true", "validation_disable=false", "validation_num_inference_steps=1",
          'validation_resolution="64"', "keep_vae_loaded=true", "eval_steps_interval=2",
          "num_eval_images=1")  # fmt: skip
    manifest = read_manifest(tmp_path / "out")
    assert manifest["metrics"]["steps"] == 2 and manifest["validations"] == ["step-2"]
    assert manifest["metrics"]["final_eval_loss"] > 0
    assert seen["compiled"] == [[n for n in seen["compiled"][0] if n.endswith("transformer_blocks.0")]]
    assert len(seen["compiled"][0]) == 4 and seen["cleared"] == [True, True]
    assert set(seen["attention"]) == {"native-math"} and len(seen["attention"]) >= 3  # 2 steps + validation
    assert torch.backends.cuda.matmul.allow_tf32 is False
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses)


def test_train_full_with_fused_qkv_saves_unfused_weights(sd1x_cache, tmp_path):
    from safetensors.torch import load_file

    from tests.helpers.training import train

    root, config = sd1x_cache
    train(config, root / "cache", tmp_path / "out", 'model_type="full"', "fuse_qkv_projections=true")
    (weights,) = (tmp_path / "out" / "final" / "unet").glob("*.safetensors")
    keys = set(load_file(str(weights)))
    assert any(k.endswith("attn1.to_q.weight") for k in keys) and not any("to_qkv" in k or "to_kv" in k for k in keys)


def test_unsupported_attention_exits_2_from_the_cli(sd1x_cache, tmp_path, cli):
    from tests.helpers.training import QUICK

    root, config = sd1x_cache
    sets = sum((["--set", s] for s in [*QUICK, 'attention_mechanism="sla"']), [])
    result = cli("train", "-c", config, "-i", root / "cache", "-o", tmp_path / "out", *sets)
    assert result.exit_code == 2
    assert "attention_mechanism 'sla' is not supported by st yet" in result.stderr
