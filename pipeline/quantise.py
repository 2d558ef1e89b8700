"""The frozen denoiser's precision: the dtype its weights are kept in, and `base_model_precision` quantisation.

As in SimpleTuner, frozen weights live in the training dtype (mixed_precision bf16 -> bf16, fp16 -> fp16); LoRA /
LyCORIS weights are bf16 with a bf16 base and fp32 otherwise (`adapter_dtype`); a quantised base keeps its
unquantised parts in `base_model_default_dtype`. Quantisation is optimum-quanto's or torchao's after loading
(quantize_via cpu / accelerator), or diffusers' while loading (quantize_via pipeline, nf4-bnb, int4-torchao,
quantization_config: pipeline.quantise_pipeline). Every preset this device cannot run stops the stage with exit 2
before any work, never falling back to another precision.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, NotSupportedError
from .log import get_logger
from .machine import require
from .quantise_gguf import gguf_path
from .quantise_pipeline import PIPELINE_ONLY, LoadQuantisation, read_quantization_config, resolve

log = get_logger("quantise")

NO_CHANGE = "no_change"
# optimum-quanto weight types by preset (the names SimpleTuner uses).
QUANTO_WEIGHTS = {"int8-quanto": "qint8", "int4-quanto": "qint4", "int2-quanto": "qint2", "fp8-quanto": "qfloat8",
                  "fp8uz-quanto": "qfloat8_e4m3fnuz"}  # fmt: skip
# quanto quantises activations only to 8-bit types (SimpleTuner uses the weights' type for them).
QUANTO_ACTIVATION_PRESETS = ("int8-quanto", "fp8-quanto", "fp8uz-quanto")
TORCHAO_PRESETS = ("int8-torchao", "int4-torchao", "fp8-torchao")
# Presets whose kernels exist only on CUDA.
CUDA_ONLY = {"nf4-bnb": "bitsandbytes NF4", "fp8-torchao": "torchao fp8 (compute capability 8.9 or newer)",
             "int4-torchao": "torchao int4 (tinygemm, with the mslk package)"}  # fmt: skip
# Modules SimpleTuner leaves unquantised (norms, embedders and the output projection are sensitive to rounding).
QUANTO_EXCLUDE = {
    "flux": ["*.norm", "*.norm1", "*.norm2", "*.norm2_context", "proj_out", "x_embedder", "norm_out",
             "context_embedder"],
    "sd3": ["*norm*", "proj_out*", "*pos_embed*", "*context_embedder*", "*time_text_embed*", "*time_proj*"],
}  # fmt: skip
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "no": "float32"}


@dataclass(frozen=True)
class BasePrecision:
    """How the frozen denoiser is held: `preset` (a base_model_precision), `dtype` (torch dtype name of its
    unquantised weights), `quantize_via` (where quantisation runs: cpu, accelerator or pipeline), `activations`
    (quantize_activations) and `load` (the diffusers quantisation applied while loading, if any)."""

    preset: str = NO_CHANGE
    dtype: str = "float32"
    quantize_via: str = "cpu"
    activations: bool = False
    load: LoadQuantisation | None = field(default=None)
    gguf: str | None = None  # the path of a GGUF transformer (already quantised)

    @property
    def quantised(self) -> bool:
        return self.preset != NO_CHANGE or self.load is not None or self.gguf is not None

    @classmethod
    def from_config(cls, config: Any, base_dir: Path | None = None) -> "BasePrecision":
        """The precision of `config` (after `check`): the training dtype (SimpleTuner's `weight_dtype`: bf16 under
        mixed_precision bf16, for full training too), fp32 under mixed_precision no and for fp16 full training.
        `base_dir`: where a relative quantization_config path is read from (the config file's folder)."""
        from .families import get_family

        preset = config.base_model_precision
        family = get_family(config.model_family)
        if preset in family.refused_precisions:
            raise ConfigError(f"base_model_precision {preset} does not work with model_family {family.name} (SimpleTuner "
                              "refuses it too); choose another preset, e.g. int8-quanto or fp8-torchao")  # fmt: skip
        settings = read_quantization_config(config.quantization_config, base_dir or Path.cwd())
        load = resolve(preset, config.quantize_via, settings, family.denoiser.subfolder)
        gguf = gguf_path(config, base_dir)
        if config.mixed_precision == "no" or (config.model_type == "full" and config.mixed_precision != "bf16"):
            dtype = "fp32"  # DEVIATION: fp16 full training keeps fp32 weights (see adapter_dtype)
        elif (preset != NO_CHANGE or load is not None or gguf) and config.mixed_precision == "bf16":
            dtype = config.base_model_default_dtype
        else:
            dtype = config.mixed_precision
        return cls(preset=preset, dtype=_DTYPES[dtype], quantize_via=config.quantize_via,
                   activations=config.quantize_activations, load=load, gguf=gguf and str(gguf))  # fmt: skip

    @property
    def backend(self) -> str:
        """The library that quantises: optimum-quanto, torchao or bitsandbytes."""
        if self.gguf is not None:
            return "gguf"
        if self.load is not None:
            return {"quanto": "optimum-quanto"}.get(self.load.backend, self.load.backend)
        return "torchao" if self.preset in TORCHAO_PRESETS else "optimum-quanto"

    @property
    def described(self) -> str:
        """The option that quantises, for messages."""
        if self.gguf is not None:
            return f"the GGUF transformer {Path(self.gguf).name}"
        return f"base_model_precision {self.preset}" if self.preset != NO_CHANGE else "quantization_config"

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def record(self) -> dict[str, Any]:
        """What the train manifest and model card say about the base (beside its parameter bytes)."""
        record: dict[str, Any] = {"base_model_precision": self.preset, "dtype": self.dtype}
        if self.quantised:
            record["backend"] = self.backend
            record["quantize_via"] = "pipeline" if self.load is not None or self.gguf else self.quantize_via
            record["quantize_activations"] = self.activations
        if self.load is not None:
            record["quantization_config"] = self.load.record()
        if self.gguf is not None:
            record["gguf"] = Path(self.gguf).name
        return record


def check(config: Any, cuda: bool | None = None, base_dir: Path | None = None) -> None:
    """Refuse, before any work, a base_model_precision this device or st cannot run (exit 2 naming why)."""
    if config.quantization_config not in (None, "") and config.model_type != "lora":
        raise ConfigError("quantization_config is only supported for LoRA training (SimpleTuner's rule); set "
                          "model_type lora or remove quantization_config")  # fmt: skip
    precision = BasePrecision.from_config(config, base_dir)
    preset = precision.preset
    if not precision.quantised:
        if config.quantize_activations:
            raise ConfigError("quantize_activations quantises the activations of a quanto-quantised base; set "
                              "base_model_precision to int8-quanto, fp8-quanto or fp8uz-quanto, or remove it")  # fmt: skip
        return
    requirement = precision.load.cuda_requirement if precision.load else CUDA_ONLY.get(preset)
    if requirement:
        require(cuda_capable(preset) if cuda is None else cuda,
                f"base_model_precision {preset} ({requirement}) needs a CUDA GPU and none is present; on this machine "
                "use int8-quanto, int4-quanto, int2-quanto, fp8-quanto or int8-torchao, or no_change")  # fmt: skip
    if precision.load is not None and preset not in (NO_CHANGE, *PIPELINE_ONLY) and config.quantize_via != "pipeline":
        raise ConfigError(f"quantization_config quantises the denoiser while loading, and base_model_precision "
                          f"{preset} with quantize_via {config.quantize_via} would quantise it again; set "
                          f"quantize_via pipeline (the preset then gives the config's defaults) or remove "
                          "quantization_config")  # fmt: skip
    if config.quantize_activations and (precision.load is not None or preset not in QUANTO_ACTIVATION_PRESETS):
        raise ConfigError(f"quantize_activations needs optimum-quanto 8-bit weights ({', '.join(QUANTO_ACTIVATION_PRESETS)}"
                          f" with quantize_via cpu or accelerator); base_model_precision {preset} cannot quantise "
                          "activations: remove quantize_activations")  # fmt: skip
    if config.model_type == "full":
        raise ConfigError(f"{precision.described} quantises the frozen base for LoRA training; model_type full "
                          "trains every weight, which cannot be quantised: use model_type lora, or an unquantised base")  # fmt: skip
    if config.lora_type != "standard" and precision.backend != "optimum-quanto":
        _check_lycoris_base(config, precision, base_dir)
    _require_backend(preset, precision.backend)


def cuda_capable(preset: str) -> bool:
    """Whether this machine has a CUDA GPU that runs `preset` (fp8-torchao: compute capability 8.9 or newer)."""
    import torch

    return torch.cuda.is_available() and (preset != "fp8-torchao" or torch.cuda.get_device_capability() >= (8, 9))


def _check_lycoris_base(config: Any, precision: BasePrecision, base_dir: Path | None) -> None:
    """LyCORIS on a quantised base other than optimum-quanto's: int8-torchao (quantised after loading) in LyCORIS's
    bypass mode only. Without bypass_mode a LyCORIS module adds its weight difference to the base layer's weight on
    every forward, an addition torchao's int8 training weight does not implement; in bypass mode the base layer runs
    as it is and the LyCORIS path is added to its output (gradients reach the LyCORIS weights, the int8 base stays
    frozen). The other torchao presets (CUDA-only) and diffusers' load-time quantisation are refused."""
    from .lycoris_settings import read_config, resolve_config_path

    if precision.preset != "int8-torchao" or precision.load is not None or precision.gguf is not None:
        raise NotSupportedError(f"st does not implement {precision.described} with lora_type {config.lora_type} yet: "
                                f"LyCORIS on a {precision.backend} base (optimum-quanto presets work, and "
                                "int8-torchao with quantize_via cpu or accelerator and \"bypass_mode\": true); set "
                                "lora_type standard, use a *-quanto preset or an unquantised base")  # fmt: skip
    try:
        path = resolve_config_path(config.lycoris_config, base_dir)
        settings = read_config(path)
    except ConfigError:
        return  # a missing or bad lycoris_config is reported by its own check (st check, st train)
    preset = settings.get("apply_preset") or {}
    overrides = [o for key in ("module_algo_map", "name_algo_map") for o in (preset.get(key) or {}).values()]
    bypass = settings.get("bypass_mode") is True and all(o.get("bypass_mode", True) is True for o in overrides)
    if not bypass:
        raise ConfigError(f"base_model_precision int8-torchao with lora_type lycoris needs \"bypass_mode\": true in "
                          f"lycoris_config {path}: without it LyCORIS adds its weight difference to each base weight, "
                          "which torchao's int8 weights cannot take (in bypass mode the LyCORIS path is added to the "
                          "int8 layer's output); set \"bypass_mode\": true, or use a *-quanto preset")  # fmt: skip


def _require_backend(preset: str, backend: str) -> None:
    """The package the chosen backend needs, or exit 2 naming the pip install."""
    from importlib.util import find_spec

    require(find_spec("optimum.quanto" if backend == "optimum-quanto" else backend) is not None,
            f"base_model_precision {preset} needs the {backend} package: pip install {backend}")


def key_content(config: Any, base_dir: Path) -> dict[str, Any]:
    """What the train stage key holds for quantisation files: the settings of a quantization_config and the
    weights of a GGUF transformer, not their paths (editing the file re-runs training, moving it does not)."""
    from .families import component_identity, without_source
    from .quantise_gguf import OPTION as GGUF_OPTION

    content: dict[str, Any] = {}
    if config.quantization_config is not None:
        content["quantization_config"] = read_quantization_config(config.quantization_config, base_dir)
    gguf = gguf_path(config, base_dir)
    if gguf is not None:
        content[GGUF_OPTION] = without_source(component_identity(gguf, None))
    return content


def load_base(family: Any, source: str, precision: BasePrecision) -> dict[str, Any]:
    """The frozen denoiser (quantised while loading where `precision` says so) and the scheduler of `source`."""
    from .families import load_components

    if precision.gguf is not None:
        from .quantise_gguf import load_gguf_denoiser

        parts = load_components(family, source, which=("scheduler",))
        return {**parts, "denoiser": load_gguf_denoiser(family, Path(precision.gguf), source, precision.torch_dtype())}
    return load_components(family, source, which=("denoiser", "scheduler"), dtype=precision.torch_dtype(),
                           quantization_config=load_quantisation(precision))  # fmt: skip


def load_quantisation(precision: BasePrecision) -> Any:
    """The diffusers quantization_config to load the denoiser with (None: quantised after loading, or not at all)."""
    if precision.load is None:
        return None
    from .quantise_pipeline import build

    return build(precision.load, precision.torch_dtype())


def quantise(denoiser: Any, precision: BasePrecision, family: str, device: Any) -> Any:
    """Quantise `denoiser`'s weights in place (frozen: its float weights are dropped) on the CPU or on `device`.
    A denoiser quantised while loading (precision.load, precision.gguf) is returned as it is."""
    if not precision.quantised or precision.load is not None or precision.gguf is not None:
        return denoiser
    if precision.quantize_via == "accelerator":
        denoiser.to(device)
    before = parameter_bytes(denoiser)
    if precision.preset in TORCHAO_PRESETS:
        _torchao(denoiser, precision.preset)
        backend = "torchao"
    else:
        _quanto(denoiser, precision, family)
        backend = "optimum-quanto, activations too" if precision.activations else "optimum-quanto"
    log.info("quantised the %s denoiser to %s (%s, on %s): %.1f MiB -> %.1f MiB of weights", family,
             precision.preset, backend, precision.quantize_via, before / 2**20,
             parameter_bytes(denoiser) / 2**20)  # fmt: skip
    return denoiser


def _quanto(denoiser: Any, precision: BasePrecision, family: str) -> None:
    import optimum.quanto as quanto

    weights = getattr(quanto, QUANTO_WEIGHTS[precision.preset])
    quanto.quantize(denoiser, weights=weights, activations=weights if precision.activations else None,
                    exclude=QUANTO_EXCLUDE.get(family))  # fmt: skip
    quanto.freeze(denoiser)
    for module in denoiser.modules():
        if isinstance(module, quanto.QLinear):
            module.register_forward_pre_hook(_contiguous_input)


def _torchao(denoiser: Any, preset: str) -> None:
    """SimpleTuner's torchao presets: int8 weights for training (every linear), fp8 dynamic activations and weights
    (linears whose sizes are multiples of 16)."""
    from torchao.quantization import quantize_

    if preset == "int8-torchao":
        from torchao.prototype.quantized_training import int8_weight_only_quantized_training

        quantize_(denoiser, int8_weight_only_quantized_training())
        import torch

        for module in denoiser.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(_contiguous_input)
                module.register_forward_hook(_contiguous_grad)
    else:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

        quantize_(denoiser, Float8DynamicActivationFloat8WeightConfig(), filter_fn=_fp8_linear)


def _contiguous_grad(module: Any, args: tuple, output: Any) -> Any:
    """torchao's int8 training backward views the output gradient, which fails when the next op made it a strided
    view (SDXL's proj_out is followed by a permute): hand it a contiguous gradient."""
    return _contiguous_grad_function().apply(output)


@functools.cache
def _contiguous_grad_function():
    """An identity whose backward makes the gradient contiguous (built on first use: this module avoids importing
    torch at import time)."""
    import torch

    class ContiguousGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, tensor):
            return tensor.view_as(tensor)

        @staticmethod
        def backward(ctx, grad):
            return grad.contiguous()

    return ContiguousGrad


def _fp8_linear(module: Any, name: str) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def _contiguous_input(module: Any, args: tuple) -> tuple:
    """quanto's CPU int8 matmul refuses inputs that are not contiguous (a transposed view, as SDXL's proj_in gets)."""
    return tuple(a.contiguous() if hasattr(a, "contiguous") else a for a in args)


def parameter_bytes(module: Any) -> int:
    """Bytes the module's parameters and buffers occupy, counting a quantised tensor by its packed data and scales."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(tensor: Any) -> int:
    import torch

    inner = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    flatten = getattr(inner, "__tensor_flatten__", None)
    if type(inner) is torch.Tensor or flatten is None:
        return inner.numel() * inner.element_size()
    names, _ = flatten()
    return sum(_tensor_bytes(getattr(inner, name)) for name in names)


def adapter_dtype(precision: BasePrecision) -> str:
    """The torch dtype name LoRA / LyCORIS weights are held, trained and saved in: bf16 when the frozen denoiser is
    bf16 (mixed_precision bf16, or a quantised base whose base_model_default_dtype is bf16), else fp32.

    As in SimpleTuner: peft creates adapters in the base layer's dtype, the trainer then moves the trained component
    (adapters included) and the LyCORIS network to `weight_dtype`, adamw_bf16 updates the bf16 weights with stochastic
    rounding, and the saved file keeps their dtype. DEVIATION: with fp16 the adapters are fp32 (accelerate's fp16
    gradient scaler cannot unscale fp16 gradients), and under mixed_precision no they stay fp32 even with adamw_bf16
    (SimpleTuner converts them to bf16 for that optimizer; st keeps the full precision the config asked for)."""
    return "bfloat16" if precision.dtype == "bfloat16" else "float32"


def cast_trainable(params: list[Any], dtype: str) -> None:
    """Hold the trainable parameters in `dtype` (a torch dtype name), in place: the Parameter objects stay the same."""
    import torch

    target = getattr(torch, dtype)
    for param in params:
        if param.is_floating_point() and param.dtype != target:
            param.data = param.data.to(target)
