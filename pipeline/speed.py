"""Speed and memory options (SimpleTuner's names), applied to the denoiser by `st train` and to the VAE by `st cache`.

What each option does here:

- `attention_mechanism`: which PyTorch scaled-dot-product-attention kernel diffusers' attention processors may use.
  `attention_context(name)` returns the context manager the trainer enters around each step's forward AND backward
  (with gradient checkpointing the backward re-runs forwards, which must use the same kernel) and `st cache` around
  VAE encodes. `diffusers` (the default) lets PyTorch pick among flash, memory-efficient and math, but never cuDNN:
  cuDNN attention's backward crashed with an illegal memory access on Flux shapes (torch 2.11, H100), so it runs only
  when asked for by name (`cudnn`). `native-flash`, `native-efficient`, `native-math` and `cudnn` allow only that
  kernel (`torch.nn.attention.sdpa_kernel`); where it cannot run (the efficient and cuDNN kernels have no CPU
  implementation) `check_attention(name, device)` refuses the run before it starts.
  SimpleTuner's diffusers-dispatcher values (flash-attn, flash-attn-2, flash-attn-3, flash-attn-3-varlen, their -hub
  variants, flex, native, native-npu, native-xla; `DISPATCHER_BACKENDS`, its alias table) and sageattention* enter
  diffusers' `attention_backend(...)` context around each step as well, for the transformers whose attention
  processors call `dispatch_attention_fn` (Flux, Chroma, FLUX.2, Qwen-Image, Z-Image, Cosmos, Wan, LTX-Video); other
  families (the UNets, SD3, PixArt, ...) refuse them, as they would change nothing there. sageattention* runs where
  `sageattention_usage` says (default: validation only). `xformers` sets diffusers' xformers processors on the
  denoiser. The package and device each kernel needs are checked before any model loads
  (`check_attention_requirements`, also by `st check`): missing, the run exits 2 naming the package (SimpleTuner
  raises too; nothing falls back to SDPA). They are machine needs (`pipeline.machine.require`), which
  `st check --any-machine` lists instead of refusing. `sla` and the Metal kernels exit 2 as not supported yet.
- `dynamo_backend` (else env `TRAINING_DYNAMO_BACKEND`; unset, "no" or "none": off), `dynamo_mode`,
  `dynamo_fullgraph`, `dynamo_dynamic`: `torch.compile` settings. `compile_module` compiles in place
  (`nn.Module.compile`), so parameter names, state dicts, checkpoints and saved weights are unchanged.
  `dynamo_use_regional_compilation` (default on) compiles only the repeated blocks (diffusers'
  `compile_repeated_blocks` where the model names them, else each element of the model's `*blocks` lists). PyTorch's
  and diffusers' regional-compilation recipes report step times close to whole-model compilation for a fraction of
  the compile time (st's own figures come from bench/gpu.py on a GPU); the blocks also stay compiled when gradient
  checkpointing calls them one by one. Compilation is off unless a backend is set.
- `gradient_checkpointing_interval` N (with `gradient_checkpointing`): checkpoint every Nth block (1 = all).
  See `gradient_checkpointing`.
- `fuse_qkv_projections`: one GEMM for q, k and v (k and v for cross-attention). See `fuse_qkv`; refused for LoRA.
- `disable_tf32`: TF32 matmuls and convolutions are on unless this is set (`apply_tf32`); CUDA only.
- `vae_enable_slicing` / `vae_enable_tiling`: diffusers' VAE slicing (one image at a time) and tiling (overlapping
  tiles for large images), for memory (`vae_memory`).
- `accelerator_cache_clear_interval` N: `gc.collect()` and the accelerator's `empty_cache()` every N optimizer steps
  (`maybe_clear_cache`).
- `keep_vae_loaded` is applied by `pipeline.train.validation.Validator` (the VAE of validation stays on the
  accelerator between validations, else it waits on the CPU).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

from .config import OptionGroup
from .errors import ConfigError, NotSupportedError
from .log import get_logger
from .machine import require

log = get_logger("speed")

ENV_DYNAMO_BACKEND = "TRAINING_DYNAMO_BACKEND"
_OFF = ("", "no", "none", "off", "false", "0")

# attention_mechanism -> the SDPA backends allowed (names of torch.nn.attention.SDPBackend members).
SDPA_BACKENDS: dict[str, tuple[str, ...]] = {
    "diffusers": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),  # PyTorch's choice, cuDNN left out
    "native-flash": ("FLASH_ATTENTION",),
    "native-efficient": ("EFFICIENT_ATTENTION",),
    "native-math": ("MATH",),
    "cudnn": ("CUDNN_ATTENTION",),
}
# attention_mechanism -> diffusers' attention-dispatcher backend (`AttentionBackendName` value): SimpleTuner's
# `_DIFFUSERS_BACKEND_TARGETS` (helpers/training/attention_backend.py; "_" and "-" are the same there) and its
# sageattention values. DEVIATION: SimpleTuner also sends cudnn and native-* through the dispatcher; st restricts
# SDPA to the same kernel with `sdpa_kernel` (SDPA_BACKENDS), which reaches UNets too and keeps diffusers' native
# backend, which context parallelism uses.
DISPATCHER_BACKENDS: dict[str, str] = {
    "flash": "flash", "flash-attn": "flash", "flash-hub": "flash_hub", "flash-attn-hub": "flash_hub",
    "flash-attn-2": "flash_varlen", "flash-attn-varlen": "flash_varlen", "flash-varlen": "flash_varlen",
    "flash-varlen-hub": "flash_varlen_hub", "flash-attn-varlen-hub": "flash_varlen_hub",
    "flash-attn-3": "_flash_3", "flash3": "_flash_3", "flash-attn3": "_flash_3",
    "flash3-hub": "_flash_3_hub", "flash-attn-3-hub": "_flash_3_hub",
    "flash-attn-3-varlen": "_flash_varlen_3", "flash3-varlen": "_flash_varlen_3",
    "flash-attn3-varlen": "_flash_varlen_3",
    "flash3-varlen-hub": "_flash_3_varlen_hub", "flash-attn-3-varlen-hub": "_flash_3_varlen_hub",
    "flash4-hub": "flash_4_hub", "flash-attn-4-hub": "flash_4_hub",
    "flex": "flex", "flex-attn": "flex", "native": "native", "native-npu": "_native_npu", "native-xla": "_native_xla",
    # SimpleTuner swaps torch's SDPA for these SageAttention kernels; st selects diffusers' backends of the same ones.
    "sageattention": "sage", "sageattention-int8-fp16-triton": "_sage_qk_int8_pv_fp16_triton",
    "sageattention-int8-fp16-cuda": "_sage_qk_int8_pv_fp16_cuda",
    "sageattention-int8-fp8-cuda": "_sage_qk_int8_pv_fp8_cuda",
}  # fmt: skip
XFORMERS = "xformers"  # diffusers' enable_xformers_memory_efficient_attention on the denoiser, as in SimpleTuner
ATTENTION_MECHANISMS = (*SDPA_BACKENDS, XFORMERS, *DISPATCHER_BACKENDS)  # and native-cudnn (normalise_attention)
# SimpleTuner's other values: known, not available in st yet.
ATTENTION_NOT_YET = (
    "sla", "metal-flash-attention", "metal-flash-attention-int8", "metal-flash-attention-int4", "metal-sdpa", "umfa",
    "universal-metal-flash-attention",
)  # fmt: skip
# Kernels PyTorch implements only for CUDA devices.
_CUDA_ONLY = ("native-efficient", "cudnn")
# diffusers backend -> (the module it imports, how to get it, the device type it runs on). Training needs flex's
# backward, which PyTorch's FlexAttention has on CUDA only.
_HUB = ("kernels", "pip install kernels; diffusers then downloads the kernel from the Hugging Face Hub on first use",
        "cuda")  # fmt: skip
_SAGE = ("sageattention", "pip install sageattention", "cuda")
_FA3 = ("flash_attn_interface", "install it by building flash-attention's hopper/ folder; Hopper GPUs", "cuda")
_REQUIREMENTS: dict[str, tuple[str | None, str, str | None]] = {
    "flash": ("flash_attn", "pip install flash-attn", "cuda"),
    "flash_varlen": ("flash_attn", "pip install flash-attn", "cuda"),
    "_flash_3": _FA3, "_flash_varlen_3": _FA3,
    "flash_hub": _HUB, "flash_varlen_hub": _HUB, "_flash_3_hub": _HUB, "_flash_3_varlen_hub": _HUB, "flash_4_hub": _HUB,
    "flex": (None, "", "cuda"),
    "native": (None, "", None),
    "_native_npu": ("torch_npu", "pip install torch-npu", "npu"),
    "_native_xla": ("torch_xla", "pip install torch-xla", "xla"),
    "sage": _SAGE, "_sage_qk_int8_pv_fp16_triton": _SAGE, "_sage_qk_int8_pv_fp16_cuda": _SAGE,
    "_sage_qk_int8_pv_fp8_cuda": _SAGE,
    XFORMERS: ("xformers", "pip install xformers", "cuda"),
}  # fmt: skip
SAGEATTENTION_USAGES = ("training", "inference", "training+inference")

# Whole compiled graphs are kept per input shape (aspect buckets, the last short batch); torch's default of 8 would
# fall back to eager after the 8th bucket shape.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class SpeedOptions(OptionGroup):
    """The speed options of one run (a `Config` has the same attributes; this is what `st cache`'s encoders take)."""

    attention_mechanism: str = "diffusers"
    dynamo_backend: str | None = None
    dynamo_mode: str | None = None
    dynamo_fullgraph: bool = False
    dynamo_dynamic: bool = False
    dynamo_use_regional_compilation: bool = True
    disable_tf32: bool = False
    vae_enable_slicing: bool = False
    vae_enable_tiling: bool = False


# ------------------------------------------------------------------------------------------------------- attention


def normalise_attention(name: Any) -> str:
    """SimpleTuner's spelling rules: case and surrounding space ignored, "_" read as "-", native-cudnn is cudnn;
    unset is diffusers."""
    value = str(name or "diffusers").strip().lower().replace("_", "-")
    return "cudnn" if value == "native-cudnn" else value


_OFFERED = ("diffusers, native-flash, native-efficient, native-math, cudnn, xformers, flash-attn, flash-attn-2, "
            "flash-attn-3, flash-attn-3-varlen, flash-attn-hub, flash-attn-3-hub, flex, native, native-npu, "
            "native-xla, sageattention, sageattention-int8-fp16-triton, sageattention-int8-fp16-cuda, "
            "sageattention-int8-fp8-cuda")


def check_attention(name: str, device: Any = None) -> str:
    """Validate `attention_mechanism` (and, given `device`, that an SDPA kernel exists there); returns its
    normalised name. Requirements of the other kernels: `check_attention_requirements`."""
    value = normalise_attention(name)
    if value in ATTENTION_NOT_YET:
        why = ("SparseLinearAttention trains extra projection weights that st does not save" if value == "sla" else
               "Apple's Metal flash-attention extension")  # fmt: skip
        raise NotSupportedError(f"attention_mechanism '{name}' is not supported by st yet ({why}); choose one of "
                                f"{_OFFERED}")  # fmt: skip
    if value not in ATTENTION_MECHANISMS:
        raise ConfigError(f"unknown attention_mechanism '{name}'; choose one of {_OFFERED} (SimpleTuner's "
                          f"{', '.join(ATTENTION_NOT_YET)} are not supported yet)")  # fmt: skip
    if device is not None and value in _CUDA_ONLY:
        here = _device_type(device)
        require(here == "cuda", f"attention_mechanism '{value}' is a CUDA kernel and this run is on {here}; use "
                                "diffusers, native-flash or native-math there")  # fmt: skip
    return value


def attention_backend_of(name: str) -> str | None:
    """The diffusers dispatcher backend `attention_mechanism` selects (None: SDPA kernel choices, xformers)."""
    return DISPATCHER_BACKENDS.get(normalise_attention(name))


def check_attention_requirements(name: str, device: Any = None) -> str:
    """Refuse, before any model loads, a kernel whose package or device is missing (exit 2 naming the value, the
    package and how to get it). `device`: the run's device; None (`st check`): the device `st train` would use here.
    SimpleTuner raises in these cases too (no fallback to SDPA)."""
    device = local_device() if device is None else device
    value = check_attention(name, device)
    backend = XFORMERS if value == XFORMERS else DISPATCHER_BACKENDS.get(value)
    if backend is None:
        return value
    module, how, needs = _REQUIREMENTS[backend]
    what = ("xformers' memory-efficient attention" if backend == XFORMERS else
            f"diffusers' '{backend}' attention backend")  # fmt: skip
    missing = []
    package_missing = module is not None and importlib.util.find_spec(module) is None
    if package_missing:
        missing.append(f"the {module} package ({how})")
    here = _device_type(device)
    if needs is not None and here != needs:
        device_name = {"cuda": "a CUDA GPU", "npu": "an Ascend NPU", "xla": "an XLA device"}[needs]
        if backend == XFORMERS:
            device_name += " of compute capability below 9.0"
        why = "; PyTorch's FlexAttention has no backward pass on other devices" if backend == "flex" else ""
        missing.append(f"{device_name} (this run is on {here}{why})")
    require(not missing, f"attention_mechanism {value} ({what}) needs {' and '.join(missing)}; on this machine use "
                         "diffusers, native-flash or native-math")  # fmt: skip
    if backend == XFORMERS:
        import torch

        if torch.cuda.is_available():  # SimpleTuner's rule (xformers_compute_capability_error)
            require(torch.cuda.get_device_capability()[0] < 9, "attention_mechanism xformers does not support GPUs "
                    "of compute capability 9.0 or newer; use diffusers or flash-attn-3")  # fmt: skip
        return value
    if package_missing:  # (recorded above by `st check --any-machine`): diffusers' version checks need the package
        return value
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:  # the package versions diffusers needs
        _check_attention_backend_requirements(AttentionBackendName(backend))
    except RuntimeError as exc:
        require(False, f"attention_mechanism {value}: {exc}")
    return value


def local_device() -> str:
    """The device `st train` picks on this machine (accelerate's order: CUDA, then MPS, else the CPU)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


@functools.cache
def _dispatches(processor_class: type) -> bool:
    """Whether an attention processor class computes attention through diffusers' `dispatch_attention_fn`."""
    import inspect

    try:
        return "dispatch_attention_fn" in inspect.getsource(processor_class)
    except (OSError, TypeError):
        return False


def dispatcher_class(denoiser_class: type) -> bool:
    """Whether a diffusers model class's attention processors go through the dispatcher (read from the module that
    defines the class: the processors it declares)."""
    import inspect

    module = inspect.getmodule(denoiser_class)
    processors = [v for n, v in vars(module).items() if inspect.isclass(v) and "Processor" in n] if module else []
    return any(_dispatches(p) for p in processors)


def check_attention_family(name: str, family_name: str | None) -> None:
    """A dispatcher value is refused for a family whose transformer does not use diffusers' attention dispatcher
    (the UNets, SD3, PixArt, ...): it would change nothing there. DEVIATION: SimpleTuner enters the dispatcher's
    context for every model, and says its UNets keep PyTorch SDPA."""
    value = normalise_attention(name)
    if family_name is None or value not in DISPATCHER_BACKENDS:
        return
    from .families import get_family

    spec = get_family(family_name).denoiser
    try:
        cls = spec.load_class()
    except (ImportError, AttributeError):
        return
    if not dispatcher_class(cls):
        raise ConfigError(_not_dispatched(value, f"model_family {family_name}'s {spec.class_name}"))


def _not_dispatched(value: str, what: str) -> str:
    return (f"attention_mechanism {value} selects diffusers' attention-dispatcher backend "
            f"'{DISPATCHER_BACKENDS[value]}', and {what} computes attention without that dispatcher (it calls PyTorch "
            "SDPA itself), so it would change nothing; use diffusers, native-flash, native-math, cudnn or xformers "
            "for it")  # fmt: skip


def check_attention_settings(config: Any, device: Any = None) -> str:
    """Everything `st train` decides about attention_mechanism before a model loads (and `st check` with no device):
    the value, the family, the packages and device it needs. Returns the normalised value."""
    check_attention_family(check_attention(config.attention_mechanism), getattr(config, "model_family", None))
    value = check_attention_requirements(config.attention_mechanism, device)
    usage = str(getattr(config, "sageattention_usage", None) or "inference")
    if usage not in SAGEATTENTION_USAGES:
        raise ConfigError(f"sageattention_usage '{usage}' is not one of {', '.join(SAGEATTENTION_USAGES)}")
    return value


def _phase_uses(value: str, phase: str, usage: str) -> bool:
    """Whether `phase` ("training" or "inference") runs `value`'s kernel: SageAttention only where
    sageattention_usage allows it (SimpleTuner's AttentionBackendMode), every other kernel always."""
    if not value.startswith("sageattention"):
        return True
    usage = usage or "inference"
    return usage == "training+inference" or usage == phase


def attention_context(name: str = "diffusers", device: Any = None, phase: str | None = None,
                      usage: str | None = "inference") -> contextlib.AbstractContextManager:  # fmt: skip
    """A context manager for attention_mechanism `name`: SDPA restricted to its kernel(s), and for a dispatcher
    value diffusers' `attention_backend` context, which every `dispatch_attention_fn` call inside uses. Enter it
    around the forward and the backward. `phase`: "training" or "inference" (the denoiser; sageattention_usage
    `usage` says which use SageAttention); None: not the denoiser (`st cache`'s VAE), which gets SDPA's default
    for the dispatcher values. A fresh context is returned on each call (enter it once per step)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    value = check_attention(name, device)
    kernels = sdpa_kernel([getattr(SDPBackend, b) for b in SDPA_BACKENDS.get(value, SDPA_BACKENDS["diffusers"])])
    backend = DISPATCHER_BACKENDS.get(value)
    if phase is None or backend is None or not _phase_uses(value, phase, usage or "inference"):
        return kernels
    return _dispatched(kernels, backend)


@contextlib.contextmanager
def _dispatched(kernels: contextlib.AbstractContextManager, backend: str):
    from diffusers.models.attention_dispatch import attention_backend

    with kernels, attention_backend(backend):
        yield


def active_dispatcher_backend() -> str:
    """The backend diffusers' dispatcher uses now (its registry's active backend)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    name, _ = _AttentionBackendRegistry.get_active_backend()
    return getattr(name, "value", str(name))


def setup_attention(denoiser: Any, value: str, usage: str | None = "inference") -> str | None:
    """What attention_mechanism does to the loaded denoiser: xformers sets diffusers' xformers processors; a
    dispatcher value needs every attention processor to go through the dispatcher (a flavour's class may differ from
    its family's). Returns what was set up (None for the SDPA kernel choices)."""
    if value == XFORMERS:
        if not hasattr(denoiser, "enable_xformers_memory_efficient_attention"):  # SimpleTuner falls back likewise
            log.warning("%s has no xformers attention: attention_mechanism xformers falls back to diffusers (PyTorch "
                        "SDPA)", type(denoiser).__name__)  # fmt: skip
            return None
        denoiser.enable_xformers_memory_efficient_attention()
        return XFORMERS
    backend = DISPATCHER_BACKENDS.get(value)
    if backend is None:
        return None
    processors = {type(m.processor) for m in denoiser.modules() if getattr(m, "processor", None) is not None}
    others = sorted(p.__name__ for p in processors if not _dispatches(p))
    if not processors or others:
        raise ConfigError(_not_dispatched(value, f"{type(denoiser).__name__} ({', '.join(others) or 'no processors'})"))
    from diffusers.models.attention_dispatch import attention_backend

    try:  # the requirements again, and a hub kernel's download (once), before the first step rather than in it
        with attention_backend(backend):
            pass
    except (RuntimeError, ValueError, ImportError, OSError) as exc:
        raise ConfigError(f"attention_mechanism {value}: diffusers cannot use its '{backend}' backend: {exc}") from None
    if value.startswith("sageattention") and _phase_uses(value, "training", usage or "inference"):
        log.warning("attention_mechanism %s with sageattention_usage %s: SageAttention's kernels propagate no "
                    "gradients to the q/k/v projections, so the attention layers are not trained (as SimpleTuner "
                    "warns; experimental)", value, usage)  # fmt: skip
    log.info("attention: diffusers' '%s' backend for %s's %d attention processor class(es)", backend,
             type(denoiser).__name__, len(processors))  # fmt: skip
    return backend


def check_context_parallel_attention(config: Any) -> None:
    """context_parallel_size > 1 runs diffusers' context-parallel attention, which only some dispatcher backends
    implement: refuse the others (and xformers, whose processors bypass it)."""
    value = normalise_attention(config.attention_mechanism)
    size = int(getattr(config, "context_parallel_size", None) or 1)
    usage = str(getattr(config, "sageattention_usage", None) or "inference")
    backend = DISPATCHER_BACKENDS.get(value) if _phase_uses(value, "training", usage) else None
    if value != XFORMERS and backend is None:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    able = _AttentionBackendRegistry._supports_context_parallel
    if backend is not None and _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(backend)):
        return
    offered = [k for k, v in DISPATCHER_BACKENDS.items() if AttentionBackendName(v) in able and "-" in k]
    raise ConfigError(f"context_parallel_size {size} with attention_mechanism {value}: "
                      + ("xformers' processors bypass diffusers' context-parallel attention" if backend is None else
                         f"diffusers' '{backend}' backend has no context-parallel attention")
                      + f"; use diffusers, native-flash, native-math, cudnn or one of {', '.join(offered)}, or set "
                      "context_parallel_size 1")  # fmt: skip


def _device_type(device: Any) -> str:
    return getattr(device, "type", None) or str(device).split(":")[0]


# ------------------------------------------------------------------------------------------------------ precision


def apply_tf32(disable: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on (SimpleTuner's default), or off with `disable_tf32`.
    These flags only change CUDA kernels; CPU results are unaffected."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = not disable
    torch.backends.cudnn.allow_tf32 = not disable


# -------------------------------------------------------------------------------------------------------- compile


def dynamo_backend(config: Any) -> str | None:
    """The `torch.compile` backend: `dynamo_backend`, else env TRAINING_DYNAMO_BACKEND; None when off."""
    value = config.dynamo_backend
    if value is None:
        value = os.environ.get(ENV_DYNAMO_BACKEND)
    if value is None or str(value).strip().lower() in _OFF:
        return None
    backend = str(value).strip().lower()
    import torch._dynamo

    known = sorted(set(torch._dynamo.list_backends(exclude_tags=())) | {"inductor"})
    if backend not in known:
        source = "dynamo_backend" if config.dynamo_backend is not None else ENV_DYNAMO_BACKEND
        raise ConfigError(f"{source} '{value}' is not a torch.compile backend; choose no or one of {', '.join(known)}")
    return backend


def compile_options(config: Any) -> dict[str, Any] | None:
    """`torch.compile` keyword arguments from the config (None when compilation is off)."""
    backend = dynamo_backend(config)
    if backend is None:
        return None
    options: dict[str, Any] = {"backend": backend, "fullgraph": bool(config.dynamo_fullgraph),
                               "dynamic": bool(config.dynamo_dynamic)}  # fmt: skip
    mode = config.dynamo_mode
    if mode is not None and str(mode).strip().lower() not in ("", "default", "none"):
        if backend != "inductor":
            raise ConfigError(f"dynamo_mode '{mode}' applies to the inductor backend only, not '{backend}'")
        import torch._inductor

        modes = list(torch._inductor.list_mode_options())
        if mode not in modes:
            raise ConfigError(f"unknown dynamo_mode '{mode}'; choose one of {', '.join(modes)}")
        options["mode"] = mode
    return options


def _raise_recompile_limit() -> None:
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < RECOMPILE_LIMIT:
            setattr(cfg, name, RECOMPILE_LIMIT)


_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "down_blocks", "up_blocks", "layers")


def _repeated_blocks(module: Any) -> list[tuple[str, Any]]:
    """The blocks regional compilation compiles: classes named by diffusers' `_repeated_blocks`, else the elements
    of the model's `*blocks` module lists and its `mid_block`."""
    import torch

    names = tuple(getattr(module, "_repeated_blocks", None) or ())
    if names:
        found = [(n, m) for n, m in module.named_modules() if type(m).__name__ in names]
        if found:
            return found
    found = []
    for attr in _BLOCK_LISTS:
        blocks = getattr(module, attr, None)
        if isinstance(blocks, torch.nn.ModuleList):
            found += [(f"{attr}.{i}", block) for i, block in enumerate(blocks)]
    mid = getattr(module, "mid_block", None)
    if isinstance(mid, torch.nn.Module):
        found.append(("mid_block", mid))
    return found


def compile_module(module: Any, config: Any, *, regional: bool | None = None) -> list[str]:
    """Compile `module` in place as the config says; returns the names of the compiled submodules ("" for the whole
    module), empty when compilation is off. `regional` overrides `dynamo_use_regional_compilation`."""
    options = compile_options(config)
    if options is None:
        return []
    _raise_recompile_limit()
    regional = config.dynamo_use_regional_compilation if regional is None else regional
    if regional:
        blocks = _repeated_blocks(module)
        if blocks:
            for _, block in blocks:
                block.compile(**options)
            log.info("compiled %d %s block(s) with torch.compile(%s)", len(blocks), type(module).__name__,
                     _describe(options))  # fmt: skip
            return [name for name, _ in blocks]
        log.info("%s has no repeated blocks to compile: compiling it whole", type(module).__name__)
    module.compile(**options)
    log.info("compiled %s with torch.compile(%s)", type(module).__name__, _describe(options))
    return [""]


def compiled_submodules(module: Any) -> list[str]:
    """Names of the submodules (and "" for `module` itself) that are compiled in place."""
    return [name for name, m in module.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]


def eager_stance(active: bool = True) -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly inside (validation renders other shapes than training; recompiling for them
    costs more than it saves). A no-op where torch lacks `torch.compiler.set_stance` or `active` is false."""
    import torch

    set_stance = getattr(torch.compiler, "set_stance", None)
    if not active or set_stance is None:
        return contextlib.nullcontext()
    return set_stance("force_eager")


def _describe(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


# ------------------------------------------------------------------------------------------ gradient checkpointing


def gradient_checkpointing(module: Any, interval: int | None = None) -> dict[str, int] | None:
    """Turn on diffusers' gradient checkpointing, for every block (`interval` None or 1) or every Nth block.

    How the interval works: diffusers' models call `self._gradient_checkpointing_func(block, *args)` for each block
    when checkpointing is on (`enable_gradient_checkpointing` sets that function and the `gradient_checkpointing`
    flag on every submodule that has one). st passes its own function, a gate: the blocks of each class (ResNet
    blocks, transformer blocks, single-stream blocks, ...) that sit in the module lists of those submodules are
    numbered in module order, and each gets `_st_checkpoint = (index % interval == 0)`. The gate runs
    `torch.utils.checkpoint.checkpoint(block, ..., use_reentrant=False)` for blocks marked True (and any block it
    does not know, as diffusers would) and calls the others directly, keeping their activations. So interval 2
    checkpoints blocks 0, 2, 4, ... of each kind: about half the recomputation and more activation memory.

    Returns {"interval": N, "checkpointed": n, "kept": m} over the blocks st numbered (None when the module has no
    gradient checkpointing).
    """
    if not hasattr(module, "enable_gradient_checkpointing"):
        log.warning("%s has no gradient checkpointing; gradient_checkpointing is ignored", type(module).__name__)
        return None
    if interval is not None and (isinstance(interval, bool) or int(interval) < 1):
        raise ConfigError(f"gradient_checkpointing_interval must be an integer >= 1, got {interval!r}")
    interval = int(interval or 1)
    if interval == 1:
        module.enable_gradient_checkpointing()  # diffusers' own function: every block
    else:
        module.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint_gate)
    counts: dict[str, int] = {}
    marked = {"interval": interval, "checkpointed": 0, "kept": 0}
    for block in _checkpointed_blocks(module):
        index = counts.get(type(block).__name__, 0)
        counts[type(block).__name__] = index + 1
        block._st_checkpoint = index % interval == 0
        marked["checkpointed" if block._st_checkpoint else "kept"] += 1
    if interval > 1:
        log.info("gradient checkpointing every %d blocks: %d checkpointed, %d kept", interval,
                 marked["checkpointed"], marked["kept"])  # fmt: skip
    return marked


_NOT_CHECKPOINTED = ("downsamplers", "upsamplers")  # module lists diffusers never passes to the checkpoint function


def _checkpointed_blocks(module: Any) -> list[Any]:
    """The elements of the module lists owned by submodules that carry diffusers' `gradient_checkpointing` flag."""
    import torch

    seen: set[int] = set()
    blocks = []
    for owner in module.modules():
        if not hasattr(owner, "gradient_checkpointing"):
            continue
        for name, child in owner.named_children():
            if isinstance(child, torch.nn.ModuleList) and name not in _NOT_CHECKPOINTED:
                for block in child:
                    if id(block) not in seen:
                        seen.add(id(block))
                        blocks.append(block)
    return blocks


def _checkpoint_gate(block: Any, *args: Any) -> Any:
    import torch.utils.checkpoint

    if getattr(block, "_st_checkpoint", True):
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
    return block(*args)


# ---------------------------------------------------------------------------------------------------------- fusing


def fuse_qkv(module: Any, *, model_type: str = "full") -> int:
    """fuse_qkv_projections: run the q, k and v projections (k and v for cross-attention, and the added q/k/v of
    joint attention) as one GEMM. Returns the number of fused projections.

    Only for full fine-tunes. diffusers' `fuse_qkv_projections` creates new `to_qkv` / `to_kv` / `to_added_qkv`
    layers holding copies of the weights, which would leave the trained weights out of sync with the `to_q`, `to_k`,
    `to_v` that every saved model and checkpoint uses. st replaces each created layer by a view that concatenates the
    live `to_q`/`to_k`/`to_v` weights at each call, so the parameters, their names and everything saved stay as
    without fusion, and the optimizer updates the weights the fused GEMM reads.

    LoRA is refused (ConfigError): the fused projection bypasses the LoRA layers peft puts on `to_q`/`to_k`/`to_v`
    (they would not train), and targeting `to_qkv` instead yields LoRA weights that diffusers' and ComfyUI's loaders
    do not read.
    """
    if model_type != "full":
        raise ConfigError(
            "fuse_qkv_projections works with model_type full only: with LoRA the fused q/k/v projection bypasses "
            "the adapters on to_q/to_k/to_v, and adapters on a fused to_qkv do not load in diffusers or ComfyUI; "
            "set fuse_qkv_projections false"
        )
    fuse = getattr(module, "fuse_qkv_projections", None)
    if fuse is None:
        raise NotSupportedError(f"fuse_qkv_projections: {type(module).__name__} cannot fuse its QKV projections")
    try:
        fuse()
    except ValueError as exc:
        raise NotSupportedError(f"fuse_qkv_projections: {type(module).__name__}: {exc}") from None
    fused = 0
    for attn in module.modules():
        for name, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v")),
                            ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))):  # fmt: skip
            layer = attn._modules.get(name)
            if layer is None or getattr(layer, "_st_concat", False):
                continue
            sources = [getattr(attn, p) for p in parts]
            setattr(attn, name, _concat_linear_class()(sources))
            fused += 1
    if not fused:
        raise NotSupportedError(f"fuse_qkv_projections: {type(module).__name__} has no attention to fuse")
    log.info("fused %d QKV projection(s) of %s", fused, type(module).__name__)
    return fused


@functools.cache
def _concat_linear_class():
    import torch

    class _ConcatLinear(torch.nn.Module):
        """A linear layer whose weight is the concatenation of other linear layers' weights, read at each call.
        It owns no parameters: the source layers stay registered where they were."""

        _st_concat = True

        def __init__(self, sources) -> None:
            super().__init__()
            object.__setattr__(self, "sources", tuple(sources))  # not registered: no duplicate parameters

        def forward(self, x):
            weight = torch.cat([s.weight for s in self.sources])
            biases = [s.bias for s in self.sources]
            bias = None if any(b is None for b in biases) else torch.cat(biases)
            return torch.nn.functional.linear(x, weight, bias)

        def extra_repr(self) -> str:
            return f"sources={len(self.sources)}"

    return _ConcatLinear


# ------------------------------------------------------------------------------------------------------------- VAE


def vae_memory(vae: Any, slicing: bool, tiling: bool) -> Any:
    """Set diffusers' VAE slicing and tiling as asked (both off by default: they save memory, not time, and tiling
    changes the latents of images larger than the VAE's tile size). Returns the VAE."""
    for wanted, on, off, label in ((slicing, "enable_slicing", "disable_slicing", "vae_enable_slicing"),
                                   (tiling, "enable_tiling", "disable_tiling", "vae_enable_tiling")):  # fmt: skip
        method = getattr(vae, on if wanted else off, None)
        if method is None:
            if wanted:
                raise NotSupportedError(f"{label}: {type(vae).__name__} has no {on}()")
            continue
        method()
    return vae


# ----------------------------------------------------------------------------------------------------------- cache


def maybe_clear_cache(step: int, interval: int | None) -> bool:
    """accelerator_cache_clear_interval: every `interval` steps collect garbage and return the accelerator's cached
    blocks to the driver. Returns whether it cleared."""
    if not interval or interval < 1 or step % interval:
        return False
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()
    return True


# ---------------------------------------------------------------------------------------------------- the denoiser


def setup_denoiser(denoiser: Any, config: Any) -> dict[str, Any]:
    """What `st train` does to the denoiser before adapters are added: TF32, attention (`setup_attention`), QKV
    fusion, gradient checkpointing. A bad attention value fails here, before the model moves to the device."""
    value = check_attention(config.attention_mechanism)
    apply_tf32(config.disable_tf32)
    report: dict[str, Any] = {}
    attention = setup_attention(denoiser, value, getattr(config, "sageattention_usage", None))
    if attention is not None:
        report["attention"] = attention
    if config.fuse_qkv_projections:
        report["fused"] = fuse_qkv(denoiser, model_type=config.model_type)
    interval = config.gradient_checkpointing_interval
    if config.gradient_checkpointing:
        report["checkpointing"] = gradient_checkpointing(denoiser, interval)
    elif interval is not None:
        log.warning("gradient_checkpointing_interval %s is ignored: gradient_checkpointing is off", interval)
    return report


def check_train_options(config: Any, device: Any = None) -> None:
    """Fail on bad speed options before any model is loaded."""
    check_attention_settings(config, device)
    compile_options(config)
    if config.fuse_qkv_projections and config.model_type != "full":
        fuse_qkv(None, model_type=config.model_type)  # raises the ConfigError that explains why
    interval = config.gradient_checkpointing_interval
    if interval is not None and interval < 1:
        raise ConfigError(f"gradient_checkpointing_interval must be an integer >= 1, got {interval!r}")
    clear = config.accelerator_cache_clear_interval
    if clear is not None and clear < 1:
        raise ConfigError(f"accelerator_cache_clear_interval must be an integer >= 1 (or unset), got {clear!r}")
