"""The frozen denoiser's precision: the dtype its weights are kept in, and `base_model_precision` quantisation.

As in SimpleTuner, frozen weights live in the training dtype (mixed_precision bf16 -> bf16, fp16 -> fp16) and only
what is trained is fp32; a quantised base keeps its unquantised parts in `base_model_default_dtype`. Quantisation is
optimum-quanto's (weights only): every preset st cannot run on this device or has not implemented stops the stage
with exit 2 before any work, never falling back to another precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, NotSupportedError
from .log import get_logger

log = get_logger("quantise")

NO_CHANGE = "no_change"
# optimum-quanto weight types by preset (the names SimpleTuner uses).
QUANTO_WEIGHTS = {"int8-quanto": "qint8", "int4-quanto": "qint4", "int2-quanto": "qint2", "fp8-quanto": "qfloat8",
                  "fp8uz-quanto": "qfloat8_e4m3fnuz"}  # fmt: skip
# Presets whose kernels exist only on CUDA.
CUDA_ONLY = {"nf4-bnb": "bitsandbytes NF4", "fp8-torchao": "torchao fp8 (Hopper or newer)",
             "int4-torchao": "torchao int4 (tinygemm)"}  # fmt: skip
NOT_IMPLEMENTED = {"int8-torchao": "torchao int8 weight-only quantisation"}
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
    unquantised weights) and `quantize_via` (where quantisation runs: "cpu" or "accelerator")."""

    preset: str = NO_CHANGE
    dtype: str = "float32"
    quantize_via: str = "cpu"

    @property
    def quantised(self) -> bool:
        return self.preset != NO_CHANGE

    @classmethod
    def from_config(cls, config: Any) -> "BasePrecision":
        """The precision of `config` (after `check`): fp32 for model_type full, else the training dtype."""
        preset = config.base_model_precision
        if config.model_type == "full" or config.mixed_precision == "no":
            dtype = "fp32"
        elif preset != NO_CHANGE and config.mixed_precision == "bf16":
            dtype = config.base_model_default_dtype
        else:
            dtype = config.mixed_precision
        return cls(preset=preset, dtype=_DTYPES[dtype], quantize_via=config.quantize_via)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def check(config: Any, cuda: bool | None = None) -> None:
    """Refuse, before any work, a base_model_precision this device or st cannot run (exit 2 naming why)."""
    preset = config.base_model_precision
    if preset == NO_CHANGE:
        return
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if preset in CUDA_ONLY and not cuda:
        raise ConfigError(f"base_model_precision {preset} ({CUDA_ONLY[preset]}) needs a CUDA GPU and none is present; "
                          "on this machine use int8-quanto, int4-quanto, int2-quanto or fp8-quanto, or no_change")  # fmt: skip
    if preset not in QUANTO_WEIGHTS:
        feature = CUDA_ONLY.get(preset) or NOT_IMPLEMENTED.get(preset, preset)
        raise ConfigError(f"base_model_precision {preset}: st does not implement {feature} yet; use one of "
                          f"{', '.join(QUANTO_WEIGHTS)} (optimum-quanto), or no_change")  # fmt: skip
    if config.quantize_via == "pipeline":
        raise ConfigError(f"quantize_via pipeline (diffusers' quantization_config) is not implemented; the quanto "
                          f"preset {preset} quantises with quantize_via cpu or accelerator")  # fmt: skip
    if config.model_type == "full":
        raise ConfigError(f"base_model_precision {preset} quantises the frozen base for LoRA training; model_type "
                          "full trains every weight, which cannot be quantised: use model_type lora, or no_change")  # fmt: skip
    if config.lora_type != "standard":
        raise NotSupportedError(f"st does not implement base_model_precision {preset} with lora_type "
                                f"{config.lora_type} yet: LyCORIS on a quantised base; set lora_type standard or "
                                "base_model_precision no_change")  # fmt: skip
    try:
        import optimum.quanto  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"base_model_precision {preset} needs the optimum-quanto package: "
                          f"pip install optimum-quanto ({exc})") from None  # fmt: skip


def quantise(denoiser: Any, precision: BasePrecision, family: str, device: Any) -> Any:
    """Quantise `denoiser`'s weights in place (frozen: its float weights are dropped) on the CPU or on `device`."""
    if not precision.quantised:
        return denoiser
    import optimum.quanto as quanto

    if precision.quantize_via == "accelerator":
        denoiser.to(device)
    weights = getattr(quanto, QUANTO_WEIGHTS[precision.preset])
    exclude = QUANTO_EXCLUDE.get(family)
    before = parameter_bytes(denoiser)
    quanto.quantize(denoiser, weights=weights, exclude=exclude)
    quanto.freeze(denoiser)
    for module in denoiser.modules():
        if isinstance(module, quanto.QLinear):
            module.register_forward_pre_hook(_contiguous_input)
    log.info("quantised the %s denoiser to %s (optimum-quanto, on %s): %.1f MiB -> %.1f MiB of weights", family,
             precision.preset, precision.quantize_via, before / 2**20, parameter_bytes(denoiser) / 2**20)  # fmt: skip
    return denoiser


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


def upcast_trainable(params: list[Any]) -> None:
    """Trainable parameters in fp32 whatever the frozen weights' dtype (peft creates adapters in the base's dtype)."""
    import torch

    for param in params:
        if param.dtype != torch.float32:
            param.data = param.data.float()
