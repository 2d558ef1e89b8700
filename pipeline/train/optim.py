"""Optimizers, learning-rate schedules and gradient clipping, configured by SimpleTuner's option names.

`build_optimizer` turns `optimizer` (+ `optimizer_config`, betas, weight decay, eps, learning rate) into a
`torch.optim.Optimizer`; `build_lr_scheduler` gives a torch `LambdaLR` whose `state_dict` round-trips through JSON;
`clip_gradients` applies `grad_clip_method` / `max_grad_norm`; `prepare_gradient_release` runs
`optimizer_release_gradients` (optimi's fused per-parameter step in the backward pass).

`optimizer=prodigy` is SimpleTuner's: `prodigyplus.ProdigyPlusScheduleFree` built from SimpleTuner's settings
(`PRODIGY_DEFAULTS`, helpers/training/optimizer_param.py), not the reference `prodigyopt.Prodigy`. Every other
optimizer (`SIMPLETUNER_DEFAULTS`) is built as SimpleTuner builds it: learning_rate, then SimpleTuner's default
settings, then `optimizer_config`, then the betas when optimizer_beta1 and optimizer_beta2 are both set.
`adam_weight_decay` and `adam_epsilon` are read by no optimizer (SimpleTuner reads them only under DeepSpeed, which st
does not run); `build_optimizer` warns when they are set.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import importlib.util
import inspect
import io
import itertools
import math
from typing import Any, Callable, Iterable, Iterator

import torch

from ..errors import ConfigError, NotSupportedError
from ..distributed import global_batch
from ..log import get_logger
from ..machine import require
from .options import OptimizerOptions

log = get_logger("train.optim")

DEFAULT_BETAS = (0.9, 0.999)
# Optimizers that schedule (and warm up) their own learning rate: SimpleTuner's `override_lr_scheduler` / `can_warmup`.
# prodigy is schedule-free too (train()/eval() switch its weights) but keeps the lr_scheduler, as in SimpleTuner.
SCHEDULE_FREE = ("adamw_schedulefree", "adamw_schedulefree+aggressive", "adamw_schedulefree+no_kahan")
# SimpleTuner's optimizers that are never clipped (its `should_clip_gradients`): StableAdamW and Prodigy-Plus (run with
# use_stableadamw) scale each update by its own RMS, which does the clipping's work.
UNCLIPPED = ("prodigy", "optimi-stableadamw")

# SimpleTuner's `optimizer_choices["prodigy"]["default_settings"]`. `optimizer_config` overrides them, then
# optimizer_beta1 with optimizer_beta2 (both set) the betas, then `prodigy_steps` (> 0); learning_rate,
# adam_weight_decay and adam_epsilon are not used, as in SimpleTuner.
PRODIGY_DEFAULTS: dict[str, Any] = {
    "lr": 1.0, "betas": (0.9, 0.99), "beta3": None, "weight_decay": 0.0, "weight_decay_by_lr": True,
    "use_bias_correction": False, "d0": 1e-6, "d_coef": 1, "prodigy_steps": 0, "use_speed": False, "eps": 1e-8,
    "split_groups": True, "split_groups_mean": True, "factored": True, "factored_fp32": True,
    "fused_back_pass": False, "use_stableadamw": True, "use_cautious": False, "use_grams": False,
    "use_adopt": False, "stochastic_rounding": True,
}  # fmt: skip

# SimpleTuner's `optimizer_choices[name]["default_settings"]` for every optimizer but prodigy (`simpletuner_kwargs`):
# learning_rate, these, then optimizer_config, then both betas; adam_weight_decay and adam_epsilon are not used. A key
# the installed class does not take is dropped, as SimpleTuner's `_sanitize_optimizer_kwargs` drops it.
# adamw_schedulefree+no_kahan's `use_kahan: False` is left out: SimpleTuner's own class takes `kahan_sum`, so its
# kwargs filter drops `use_kahan` (and +no_kahan runs exactly as +aggressive there); st's schedule-free AdamW (the
# schedulefree package's) has no Kahan summation in any variant.
_OPTIMI_COMMON = {"decouple_lr": False, "kahan_sum": True}
_AO_ADAM = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6}
SIMPLETUNER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw_bf16": {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6},
    "optimi-adamw": {"betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.0, **_OPTIMI_COMMON, "max_lr": None},
    "optimi-stableadamw": {"betas": (0.9, 0.99), "weight_decay": 1e-2, "eps": 1e-6, **_OPTIMI_COMMON, "max_lr": None,
                           "foreach": True},
    "optimi-lion": {"betas": (0.9, 0.99), "weight_decay": 0.0, **_OPTIMI_COMMON, "max_lr": None, "foreach": True},
    "bnb-adamw8bit": {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6},
    "optimi-radam": {"betas": (0.9, 0.99), "weight_decay": 0.0, "eps": 1e-6, "decouple_wd": True, **_OPTIMI_COMMON,
                     "foreach": True},
    "optimi-ranger": {"betas": (0.9, 0.99), "weight_decay": 0.0, "eps": 1e-6, "k": 6, "alpha": 0.5, "decouple_wd": True,
                      **_OPTIMI_COMMON, "max_lr": None, "foreach": True},
    "optimi-adan": {"betas": (0.98, 0.92, 0.999), "weight_decay": 2e-2, "eps": 1e-6, **_OPTIMI_COMMON, "max_lr": None,
                    "adam_wd": False, "foreach": True},
    "optimi-adam": {"betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.0, "decouple_wd": False, **_OPTIMI_COMMON,
                    "max_lr": None},
    "optimi-sgd": {"momentum": 0, "weight_decay": 0.0, "dampening": False, "decouple_wd": False, **_OPTIMI_COMMON,
                   "max_lr": None, "torch_init": False, "foreach": True},
    "ao-adamw8bit": _AO_ADAM, "ao-adamw4bit": _AO_ADAM, "ao-adamfp8": _AO_ADAM, "ao-adamwfp8": _AO_ADAM,
    "adamw_schedulefree": {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8},
    "adamw_schedulefree+aggressive": {"betas": (0.9, 0.999), "weight_decay": 1e-3, "eps": 1e-6},
    "adamw_schedulefree+no_kahan": {"betas": (0.9, 0.999), "weight_decay": 1e-3, "eps": 1e-6},
    "soap": {"betas": (0.95, 0.95), "shampoo_beta": -1, "eps": 1e-8, "weight_decay": 0.01, "precondition_frequency": 10,
             "max_precond_dim": 10000, "merge_dims": False, "precondition_1d": False, "normalize_grads": False,
             "data_format": "channels_first", "correct_bias": True},
}  # fmt: skip
OPTIMI = {"optimi-adamw": "AdamW", "optimi-stableadamw": "StableAdamW", "optimi-lion": "Lion", "optimi-radam": "RAdam",
          "optimi-ranger": "Ranger", "optimi-adan": "Adan", "optimi-adam": "Adam", "optimi-sgd": "SGD"}  # fmt: skip
# torchao's low-bit AdamW/Adam: the moments are kept quantised (8-bit, 4-bit or fp8 blocks) for tensors of 4096 values
# or more; smaller ones keep plain moments, as in bitsandbytes.
TORCHAO = {"ao-adamw8bit": "AdamW8bit", "ao-adamw4bit": "AdamW4bit", "ao-adamfp8": "AdamFp8",
           "ao-adamwfp8": "AdamWFp8"}  # fmt: skip
TORCHAO_FP8 = ("ao-adamfp8", "ao-adamwfp8")


# --------------------------------------------------------------------------------------------------------------------
# AdamW for bf16 parameters.


def saved_param_states(optimizer: torch.optim.Optimizer, state_dict: dict) -> Iterator[tuple[torch.Tensor, dict]]:
    """(live parameter, its saved state) for each parameter state in `state_dict`.

    Saved parameter ids are matched to the optimizer's parameters in group order, as torch's `load_state_dict` matches
    them; for `load_state_dict` overrides that put saved state back in the dtypes they need.
    """
    saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups)
    by_id = dict(zip(saved_ids, params))
    for param_id, saved in state_dict["state"].items():
        p = by_id.get(param_id)
        if p is not None:
            yield p, saved


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype AdamWBF16 keeps `p`'s moments and shift in: the parameter's (bf16 as SimpleTuner), fp32 for fp16."""
    return torch.float32 if p.dtype == torch.float16 else p.dtype


class AdamWBF16(torch.optim.Optimizer):
    """SimpleTuner's adamw_bf16 (helpers/training/optimizers/adamw_bfloat16), step for step.

    Per parameter it keeps, in the parameter's dtype: the moments m and v and `shift`, the part of past updates the
    weight could not hold yet (the true weight is p + shift). With g the gradient and t the step, each step does:

        m <- g + (1 - b1) * (b1 * m)                      (see below)
        v <- b2 * v + (1 - b2) * g^2                      (bf16 arithmetic, round to nearest)
        shift <- shift - lr * sqrt(1 - b2^t) * m / (sqrt(v) + eps)
        p <- p + shift;  shift <- shift + (p_old - p_new)  (compensated summation)
        weight decay: lr * weight_decay accumulates per parameter (from a random start in [0, 5e-3)); once above
        5e-3 it is applied in one go, shift <- shift - decay * p, and the accumulator drops by it.

    Each "<-" of m, shift and p is summed in fp32 and rounded to bf16 stochastically (16 random low bits from the
    device's global torch generator, SimpleTuner's `copy_stochastic_`; a resume restores the generator), or to nearest
    with `stochastic_rounding=False` (st's option). As in SimpleTuner there is no bias correction of m and eps is added
    to sqrt(v), not to sqrt(v / (1 - b2^t)). The m line is what SimpleTuner computes: its `exp_avg.mul_(b1)` is
    followed by `add_stochastic_(exp_avg, grad, alpha=1 - b1)`, whose helper scales the tensor being updated, not
    the one added, so m is g plus a short-memory term rather than the exponential average its comment names.

    SimpleTuner converts the trained weights to bf16 for this optimizer; st keeps fp32/fp64 weights as they are and
    runs the same steps in their dtype. DEVIATION: fp16 weights keep their moments and shift in fp32 (fp16's range
    underflows squared gradients) and are rounded to nearest.
    """

    decay_threshold = 5e-3  # SimpleTuner's: accumulated weight decay is applied once it exceeds this

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = DEFAULT_BETAS,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        stochastic_rounding: bool = True,
    ):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}; each must be in [0, 1)")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        stochastic_rounding=stochastic_rounding)  # fmt: skip
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state, its moments and shift in `_state_dtype` (torch would cast them to an fp16 parameter's dtype).

        A state saved by st's earlier AdamW arithmetic (fp32 moments, no shift or accumulated decay) loads with its
        moments rounded to the parameter's dtype, nothing pending in shift and no accumulated decay.
        """
        super().load_state_dict(state_dict)
        for p, saved in saved_param_states(self, state_dict):
            state, dtype = self.state[p], _state_dtype(p)
            for key in ("exp_avg", "exp_avg_sq", "shift"):
                if isinstance(saved.get(key), torch.Tensor):
                    state[key] = saved[key].to(device=p.device, dtype=dtype)
            if "exp_avg" in state:
                state.setdefault("shift", torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format))
                state.setdefault("accumulated_decay", 0.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            stochastic = bool(group["stochastic_rounding"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWBF16 does not support sparse gradients")
                state = self.state[p]
                if not state:
                    dtype = _state_dtype(p)
                    state["step"] = 0
                    for key in ("exp_avg", "exp_avg_sq", "shift"):
                        state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    # Each weight starts its decay accumulator at its own point, so they do not all decay at once.
                    state["accumulated_decay"] = float(torch.rand([]) * self.decay_threshold)
                state["step"] += 1
                state["accumulated_decay"] += weight_decay * lr
                accumulated = state["accumulated_decay"]
                decay = (accumulated > self.decay_threshold) * accumulated
                state["accumulated_decay"] -= decay
                _adamw_bf16_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["shift"], step=state["step"],
                                 lr=lr, beta1=beta1, beta2=beta2, eps=eps, decay=decay,
                                 stochastic=stochastic)  # fmt: skip
        return loss


def _adamw_bf16_step(p, grad, exp_avg, exp_avg_sq, shift, *, step, lr, beta1, beta2, eps, decay, stochastic) -> None:
    """SimpleTuner's `_make_step` (its RamTorch device shuffling aside), op for op; see `AdamWBF16`."""
    exp_avg.mul_(beta1)
    _add_rounded_(exp_avg, grad, alpha=1 - beta1, stochastic=stochastic)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
    denom_correction = (1 - beta2**step) ** 0.5
    result = shift.to(_sum_dtype(shift), copy=True)
    result.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps, alpha=1), value=-lr * denom_correction)
    _store_rounded_(shift, result, stochastic)
    buffer = p.clone()
    _add_rounded_(p, shift, alpha=1.0, stochastic=stochastic)
    _add_rounded_(shift, buffer.sub_(p), alpha=1.0, stochastic=stochastic)
    if decay > 0:
        shift.add_(p, alpha=-decay)  # plain arithmetic, as SimpleTuner (it found a stochastic one unstable)


def _sum_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16 tensors (SimpleTuner's helpers sum in fp32), else the tensor's own dtype."""
    return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype


def _add_rounded_(target: torch.Tensor, other: torch.Tensor, *, alpha: float, stochastic: bool) -> None:
    """SimpleTuner's `add_stochastic_`: target <- round(other + alpha * target), summed in fp32; alpha scales target."""
    result = other.to(_sum_dtype(target), copy=True)
    result.add_(target, alpha=alpha)
    _store_rounded_(target, result, stochastic)


def _store_rounded_(target: torch.Tensor, source: torch.Tensor, stochastic: bool) -> None:
    if stochastic and target.dtype == torch.bfloat16 and source.dtype == torch.float32:
        copy_stochastic_(target, source)
    else:
        target.copy_(source)


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy fp32 `source` into bf16 `target`, rounding each value up or down at random in proportion to its distance.

    Adds uniform noise to the 16 low bits that bf16 drops, then truncates them; the expected result equals `source`.
    The noise is drawn as SimpleTuner's `copy_stochastic_` draws it, from the global torch generator of the device.
    """
    rounded = torch.randint_like(source, dtype=torch.int32, low=0, high=1 << 16)
    rounded.add_(source.view(dtype=torch.int32))
    rounded.bitwise_and_(-65536)  # 0xFFFF0000: keep sign, exponent and bf16's 7 mantissa bits
    target.copy_(rounded.view(dtype=torch.float32))


# --------------------------------------------------------------------------------------------------------------------
# Building optimizers.


def _missing(package: str, optimizer: str) -> NotSupportedError:
    return NotSupportedError(f"optimizer '{optimizer}' needs the {package} package, which is not installed: "
                             f"pip install {package} (or choose optimizer=adamw_bf16)")  # fmt: skip


def optimizer_class(name: str, *, device_type: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for `optimizer` value `name` on `device_type` ("cuda", "cpu", "mps")."""
    device_type = str(device_type).split(":")[0]
    if name == "adamw_bf16":
        return AdamWBF16
    if name in OPTIMI:
        try:
            import optimi
        except ImportError:
            raise _missing("torch-optimi", name) from None
        return getattr(optimi, OPTIMI[name])
    if name == "prodigy":
        return _prodigy_plus()
    if name in TORCHAO:
        return _torchao_adam(TORCHAO[name])
    if name == "soap":
        from .soap import SOAP

        return SOAP
    if name in SCHEDULE_FREE:
        try:
            from schedulefree import AdamWScheduleFree
        except ImportError:
            raise _missing("schedulefree", name) from None
        return AdamWScheduleFree
    if name == "bnb-adamw8bit":
        require(device_type == "cuda", _bnb_needs_cuda(device_type))
        try:
            import bitsandbytes
        except ImportError:
            raise _missing("bitsandbytes", name) from None
        return bitsandbytes.optim.AdamW8bit
    raise ConfigError(f"unknown optimizer '{name}'")


def _bnb_needs_cuda(device_type: str) -> str:
    return (f"optimizer bnb-adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit AdamW); this machine trains on "
            f"'{device_type}': choose adamw_bf16, or ao-adamw8bit for 8-bit moments without CUDA")  # fmt: skip


@functools.cache
def _prodigy_plus() -> type[torch.optim.Optimizer]:
    """ProdigyPlusScheduleFree whose loaded state keeps the dtypes it was saved with (see `load_state_dict`)."""
    try:
        from prodigyplus.prodigy_plus_schedulefree import ProdigyPlusScheduleFree
    except ImportError:
        raise _missing("prodigy-plus-schedule-free", "prodigy") from None

    class ProdigyPlus(ProdigyPlusScheduleFree):
        """SimpleTuner's `prodigy`, resumable exactly.

        torch's `load_state_dict` casts every state tensor to its parameter's dtype; Prodigy-Plus keeps p0 and s in
        bf16 and the factored second moments in fp32 whatever the parameter's dtype, so that cast would change the
        arithmetic of every step after a resume (and round fp32 moments of bf16 weights). The saved tensors are put
        back as they were saved.
        """

        def load_state_dict(self, state_dict: dict) -> None:
            super().load_state_dict(state_dict)
            for p, saved in saved_param_states(self, state_dict):
                for key, value in saved.items():
                    if isinstance(value, torch.Tensor) and self.state[p][key].dtype != value.dtype:
                        self.state[p][key] = value.to(device=self.state[p][key].device)

    ProdigyPlus.__name__ = ProdigyPlus.__qualname__ = "ProdigyPlusScheduleFree"
    return ProdigyPlus


_AO_STATE = "__torchao_optim_state__"


def _pack_torchao_state(value: Any) -> Any:
    """A torchao quantised moment (OptimState8bit / 4bit / Fp8) as a dict of plain tensors and JSON values."""
    if not isinstance(value, torch.Tensor) or type(value) is torch.Tensor or not hasattr(value, "tensor_attrs"):
        return value
    names, attributes = value.__tensor_flatten__()
    packed = []
    for attribute in attributes:
        if isinstance(attribute, torch.dtype):
            packed.append({"dtype": str(attribute).removeprefix("torch.")})
        elif isinstance(attribute, (tuple, torch.Size)):
            packed.append(tuple(int(n) for n in attribute))
        else:
            packed.append(attribute)
    return {_AO_STATE: type(value).__name__, "tensors": {n: getattr(value, n) for n in names}, "attributes": packed}


def _unpack_torchao_state(value: dict, device: torch.device) -> torch.Tensor:
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    classes = {c.__name__: c for c in (OptimState8bit, OptimState4bit, OptimStateFp8)}
    cls = classes.get(value[_AO_STATE])
    if cls is None:
        raise ValueError(f"unknown torchao optimizer state {value[_AO_STATE]!r}")
    attributes = [getattr(torch, a["dtype"]) if isinstance(a, dict) else a for a in value["attributes"]]
    tensors = {name: tensor.to(device) for name, tensor in value["tensors"].items()}
    return cls.__tensor_unflatten__(tensors, attributes, None, None)


@functools.cache
def _torchao_adam(class_name: str) -> type[torch.optim.Optimizer]:
    """torchao's `torchao.optim.<class_name>`, resumable through st's safetensors + JSON checkpoints."""
    try:
        import torchao.optim as ao
    except ImportError:
        raise _missing("torchao", f"ao-{class_name.lower()}") from None
    base = getattr(ao, class_name)

    class TorchaoAdam(base):
        """torchao's low-bit Adam(W), as SimpleTuner's ao-* optimizers, with two changes that keep its arithmetic:

        - each group's lr stays a Python float (the LR scheduler, metrics and checkpoints see a number) and becomes
          the fp32 tensor torchao's compiled step takes for the duration of `step` (torchao converts it once and
          has schedulers fill it in place: the same fp32 value);
        - `state_dict` stores each quantised moment as its codes, scales and quantisation map (plain tensors), and
          `load_state_dict` rebuilds the same quantised tensor, so a resumed run continues bit for bit.
        """

        def add_param_group(self, param_group: dict) -> None:
            torch.optim.Optimizer.add_param_group(self, param_group)

        @torch.no_grad()
        def step(self, closure: Callable[[], Any] | None = None) -> Any:
            rates = [group["lr"] for group in self.param_groups]
            for group in self.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
            try:
                return super().step(closure)
            finally:
                for group, rate in zip(self.param_groups, rates):
                    group["lr"] = rate

        def state_dict(self) -> dict:
            saved = super().state_dict()
            saved["state"] = {param_id: {key: _pack_torchao_state(value) for key, value in state.items()}
                              for param_id, state in saved["state"].items()}  # fmt: skip
            return saved

        def load_state_dict(self, state_dict: dict) -> None:
            plain = {param_id: {k: v for k, v in state.items() if not (isinstance(v, dict) and _AO_STATE in v)}
                     for param_id, state in state_dict["state"].items()}  # fmt: skip
            super().load_state_dict({**state_dict, "state": plain})
            for p, state in saved_param_states(self, state_dict):
                for key, value in state.items():
                    if isinstance(value, dict) and _AO_STATE in value:
                        self.state[p][key] = _unpack_torchao_state(value, p.device)
            for group in self.param_groups:  # a state saved by torchao's own class holds tensor lrs
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"] = float(group["lr"])

    TorchaoAdam.__name__ = TorchaoAdam.__qualname__ = class_name
    return TorchaoAdam


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are outside brackets and quotes, so that `betas=(0.9,0.99)` stays one item."""
    items, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    items.append("".join(current))
    return items


_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_optimizer_config(text: str | None) -> dict[str, Any]:
    """Parse `optimizer_config` ("key=value,key=value"); values are Python literals where they parse, else strings."""
    out: dict[str, Any] = {}
    if not text or not text.strip():
        return out
    for item in _split_top_level(text):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"optimizer_config expects key=value items separated by commas, got {item!r}")
        key, raw = (part.strip() for part in item.split("=", 1))
        key = key.lstrip("-").replace("-", "_")
        if not key.isidentifier():
            raise ConfigError(f"optimizer_config has an invalid argument name {key!r} (in {item!r})")
        if raw.lower() in _WORDS:
            out[key] = _WORDS[raw.lower()]
            continue
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            out[key] = raw
    return out


def _accepted_arguments(cls: type) -> tuple[set[str], bool]:
    """Keyword arguments `cls(params, ...)` takes, and whether it takes any (**kwargs)."""
    names, any_kwargs = set(), False
    for param in inspect.signature(cls).parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            any_kwargs = True
        elif param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(param.name)
    names.discard("params")
    names.discard("self")
    return names, any_kwargs


def _check_accepted(extra: dict[str, Any], cls: type, name: str) -> None:
    accepted, any_kwargs = _accepted_arguments(cls)
    unknown = sorted(k for k in extra if not any_kwargs and k not in accepted)
    if unknown:
        raise ConfigError(
            f"optimizer_config has {', '.join(repr(k) for k in unknown)}, which optimizer '{name}' does "
            f"not accept; it accepts: {', '.join(sorted(accepted))}"
        )


def prodigy_kwargs(options: OptimizerOptions, cls: type) -> dict[str, Any]:
    """SimpleTuner's ProdigyPlusScheduleFree arguments: `PRODIGY_DEFAULTS`, then `optimizer_config`, then the betas
    when optimizer_beta1 and optimizer_beta2 are both set, then `prodigy_steps` when it is > 0."""
    extra = parse_optimizer_config(options.optimizer_config)
    _check_accepted(extra, cls, options.optimizer)  # DEVIATION: SimpleTuner drops unknown keys with a warning
    kwargs = {**PRODIGY_DEFAULTS, **extra}
    if options.optimizer_beta1 is not None and options.optimizer_beta2 is not None:
        kwargs["betas"] = (float(options.optimizer_beta1), float(options.optimizer_beta2))
    elif options.optimizer_beta1 is not None or options.optimizer_beta2 is not None:
        log.warning("optimizer=prodigy takes optimizer_beta1 and optimizer_beta2 only together (as SimpleTuner); "
                    "using betas %s", kwargs["betas"])  # fmt: skip
    if options.prodigy_steps:
        kwargs["prodigy_steps"] = int(options.prodigy_steps)
    return kwargs


def simpletuner_kwargs(options: OptimizerOptions, cls: type) -> dict[str, Any]:
    """SimpleTuner's arguments for a `SIMPLETUNER_DEFAULTS` optimizer: lr (`learning_rate`, with `lr_scale`), its
    default settings (less those `cls` does not take), `optimizer_config`, then the betas when optimizer_beta1 and
    optimizer_beta2 are both set; the schedule-free ones get `warmup_steps` = `lr_warmup_steps` last (SimpleTuner's
    `can_warmup`)."""
    name = options.optimizer
    extra = parse_optimizer_config(options.optimizer_config)
    _check_accepted(extra, cls, name)  # DEVIATION: SimpleTuner drops unknown keys with a warning
    accepted, any_kwargs = _accepted_arguments(cls)
    defaults = {k: v for k, v in copy.deepcopy(SIMPLETUNER_DEFAULTS[name]).items() if any_kwargs or k in accepted}
    kwargs = {"lr": effective_learning_rate(options), **defaults, **extra}
    beta1, beta2 = options.optimizer_beta1, options.optimizer_beta2
    if beta1 is not None and beta2 is not None:
        if "betas" not in kwargs:
            log.warning("optimizer=%s takes no betas; optimizer_beta1 and optimizer_beta2 have no effect (SimpleTuner "
                        "drops them too)", name)  # fmt: skip
        elif len(tuple(kwargs["betas"])) != 2:
            raise ConfigError(
                f"optimizer={name} takes {len(tuple(kwargs['betas']))} betas {tuple(kwargs['betas'])}, and "
                "optimizer_beta1 / optimizer_beta2 set two: remove them and set all of them with "
                f"optimizer_config=\"betas=(...)\""
            )
        else:
            kwargs["betas"] = (float(beta1), float(beta2))
    elif beta1 is not None or beta2 is not None:
        log.warning("optimizer=%s takes optimizer_beta1 and optimizer_beta2 only together (as SimpleTuner); using "
                    "betas %s", name, kwargs.get("betas"))  # fmt: skip
    if name in SCHEDULE_FREE:
        kwargs["warmup_steps"] = int(options.lr_warmup_steps)  # schedule-free optimizers warm up by themselves
    return kwargs


def optimizer_kwargs(options: OptimizerOptions, cls: type) -> dict[str, Any]:
    """The keyword arguments for `cls`, SimpleTuner's: `prodigy_kwargs` for prodigy, else `simpletuner_kwargs`;
    `gradient_release=True` for an optimi optimizer with `optimizer_release_gradients` (SimpleTuner's
    `optimizer_parameters`)."""
    if options.optimizer == "prodigy":
        return prodigy_kwargs(options, cls)
    if options.optimizer not in SIMPLETUNER_DEFAULTS:
        raise ConfigError(f"unknown optimizer '{options.optimizer}'")
    kwargs = simpletuner_kwargs(options, cls)
    if options.optimizer_release_gradients and options.optimizer in OPTIMI:
        kwargs["gradient_release"] = True
        if kwargs.get("foreach"):
            kwargs["foreach"] = False  # optimi turns foreach off under gradient release (with a warning): same step
    return kwargs


def build_optimizer(params: Iterable, options: OptimizerOptions, *, device_type: str) -> torch.optim.Optimizer:
    """Build `options.optimizer` over `params` (tensors or param-group dicts).

    Schedule-free optimizers are returned in train mode (see `optimizer_train_mode`).
    """
    name = options.optimizer
    cls = optimizer_class(name, device_type=device_type)
    kwargs = optimizer_kwargs(options, cls)
    if name == "prodigy":
        if options.prodigy_steps:
            log.info("prodigy adapts its step size for %d steps, then keeps it", kwargs["prodigy_steps"])
        if not math.isclose(effective_learning_rate(options), float(kwargs["lr"])):
            log.warning(
                "optimizer=prodigy multiplies its own step-size estimate by lr=%g (SimpleTuner's setting); "
                "learning_rate=%g is not used: set optimizer_config=\"lr=...\" to change it", kwargs["lr"],
                effective_learning_rate(options),
            )  # fmt: skip
    elif options.prodigy_steps:
        log.warning("prodigy_steps=%d has no effect with optimizer=%s (as in SimpleTuner)", options.prodigy_steps, name)
    if _adam_options_set(options):
        log.warning("optimizer=%s uses SimpleTuner's settings (weight_decay=%s, eps=%s): adam_weight_decay and "
                    "adam_epsilon are not used (SimpleTuner reads them only under DeepSpeed, which st does not run); "
                    "set them with optimizer_config=\"weight_decay=...,eps=...\"", name, kwargs.get("weight_decay"),
                    kwargs.get("eps", "none"))  # fmt: skip
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):  # Prodigy-Plus prints its notes
            optimizer = cls(params, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"optimizer '{name}' rejected its settings {kwargs}: {exc}") from None
    if stdout.getvalue().strip():
        log.debug("%s: %s", name, stdout.getvalue().strip())
    optimizer_train_mode(optimizer)
    log.debug("optimizer %s (%s) with %s", name, cls.__name__, kwargs)
    return optimizer


def _adam_options_set(options: OptimizerOptions) -> bool:
    from ..config import OPTION_FIELDS

    return any(getattr(options, key) != OPTION_FIELDS[key].default for key in ("adam_weight_decay", "adam_epsilon"))


def check(config: Any) -> None:
    """Refuse, before any work, an optimizer whose package is missing, whose settings its class rejects
    (`optimizer_config` keys, three betas set with two), or that this machine cannot run (exit 2 naming why;
    through `require`, so that `st check --any-machine` lists it as a machine need): bnb-adamw8bit needs CUDA.

    torchao's fp8 moments (ao-adamfp8, ao-adamwfp8) compile to fp8 kernels that CUDA GPUs run from compute capability
    8.9; on the CPU (where st trains without a GPU) torchao's low-bit optimizers all run.
    """
    options = OptimizerOptions.from_config(config)
    name = options.optimizer
    cuda = torch.cuda.is_available()  # st train's accelerator trains on CUDA when there is one, else on the CPU
    if name in TORCHAO_FP8 and cuda:
        capability = torch.cuda.get_device_capability()
        require(capability >= (8, 9),
                f"optimizer {name} keeps its moments in fp8, which torchao's compiled step runs only on CUDA compute "
                f"capability 8.9 or newer (this GPU: {capability[0]}.{capability[1]}): choose ao-adamw8bit or "
                "ao-adamw4bit")  # fmt: skip
    if name == "bnb-adamw8bit" and not cuda and importlib.util.find_spec("bitsandbytes") is None:
        # No GPU and no bitsandbytes here: the need is raised, or listed by `st check --any-machine`; the package and
        # the settings are checked on the GPU machine.
        require(False, _bnb_needs_cuda("cpu"))
        return
    check_gradient_release(config)
    cls = optimizer_class(name, device_type="cuda" if cuda else "cpu")
    quiet, log.disabled = log.disabled, True  # its warnings are given when the optimizer is built
    try:
        optimizer_kwargs(options, cls)
    finally:
        log.disabled = quiet


# --------------------------------------------------------------------------------------------------------------------
# Gradient release (optimizer_release_gradients): optimi's fused optimizer step during the backward pass.


def check_gradient_release(config: Any) -> None:
    """Refuse `optimizer_release_gradients` where its fused per-parameter step cannot give the step it replaces.

    Each parameter is stepped by optimi's post-accumulate-grad hook as soon as its gradient is ready, and the gradient
    is freed, so nothing can act on the whole gradient afterwards. SimpleTuner sets it for optimi-* optimizers only
    (and then skips `optimizer.step()` for any optimizer, so another one would never step); with it, its clipping
    sees no gradients and does nothing, and its gradient accumulation becomes optimi's optimizer accumulation, an
    approximation of accumulated gradients. st refuses those combinations instead (DEVIATION: SimpleTuner runs them).
    """
    if not config.optimizer_release_gradients:
        return
    name = config.optimizer
    fix = "or set optimizer_release_gradients=false"
    if name not in OPTIMI:
        raise ConfigError(f"optimizer_release_gradients needs an optimi optimizer ({', '.join(OPTIMI)}); "
                          f"optimizer={name} has no per-parameter step: choose one of those, {fix}")  # fmt: skip
    if config.gradient_accumulation_steps > 1:
        raise ConfigError(f"optimizer_release_gradients steps every parameter during each backward pass, so "
                          f"gradient_accumulation_steps={config.gradient_accumulation_steps} cannot accumulate "
                          f"gradients: set gradient_accumulation_steps=1, {fix}")  # fmt: skip
    if config.max_grad_norm > 0 and name not in UNCLIPPED:
        raise ConfigError(f"optimizer_release_gradients frees each gradient as soon as its parameter is stepped, so "
                          f"max_grad_norm={config.max_grad_norm} ({config.grad_clip_method} clipping) cannot be "
                          f"applied (SimpleTuner silently skips it): set max_grad_norm=0, {fix}")  # fmt: skip
    if config.num_processes > 1:
        raise ConfigError(f"optimizer_release_gradients steps each parameter on its local gradient, before data "
                          f"parallelism averages it over the {config.num_processes} processes: set num_processes=1, "
                          f"{fix}")  # fmt: skip
    if config.mixed_precision == "fp16":
        raise ConfigError("optimizer_release_gradients steps on the loss-scaled gradients of mixed_precision fp16 "
                          f"(they are unscaled only in optimizer.step()): set mixed_precision bf16 or no, {fix}")


def prepare_gradient_release(optimizer: torch.optim.Optimizer) -> list[Any]:
    """Step and free each parameter of `optimizer` (built with `gradient_release=True`) from its post-accumulate-grad
    hook, as optimi's `prepare_for_gradient_release` does for one module's parameters; returns the hook handles.

    Every parameter group is hooked (the denoiser's, a trained text encoder's, CREPA's projector), so none is left
    waiting for an `optimizer.step()` that no longer runs. The optimizer's state keeps each parameter's group (optimi
    reads its lr there); its state_dict leaves that link out and loading restores it, so checkpoints hold tensors and
    numbers only and a resumed run steps with the live (scheduled) learning rate.
    """
    from optimi.optimizer import OptimiOptimizer

    if not isinstance(optimizer, OptimiOptimizer) or not optimizer.defaults.get("gradient_release"):
        raise TypeError("gradient release needs an optimi optimizer built with gradient_release=True")

    def release(param: torch.Tensor) -> None:
        optimizer.step(param=param)
        optimizer.zero_grad(param=param)

    def without_group_links(_optimizer: Any, state_dict: dict) -> dict:
        state = {key: {k: v for k, v in value.items() if k != "group"} for key, value in state_dict["state"].items()}
        return {**state_dict, "state": state}

    def relink_groups(_optimizer: Any) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                optimizer.state[param]["group"] = group

    optimizer.register_state_dict_post_hook(without_group_links)
    optimizer.register_load_state_dict_post_hook(relink_groups)
    return [param.register_post_accumulate_grad_hook(release)
            for group in optimizer.param_groups for param in group["params"] if param.requires_grad]  # fmt: skip


def optimizer_train_mode(optimizer: torch.optim.Optimizer) -> None:
    """Put a schedule-free optimizer's parameters in their training point (call before training steps); else no-op."""
    train = getattr(optimizer, "train", None)
    if callable(train):
        train()


def optimizer_eval_mode(optimizer: torch.optim.Optimizer) -> None:
    """Put a schedule-free optimizer's parameters at their averaged point (before validation or export); else no-op."""
    evaluate = getattr(optimizer, "eval", None)
    if callable(evaluate):
        evaluate()


@contextlib.contextmanager
def averaged_weights(optimizer: torch.optim.Optimizer):
    """The parameters at a schedule-free optimizer's averaged point inside the block (SimpleTuner's eval() around
    validation, evaluation and checkpoint saves), and back in the mode they were in after it."""
    groups = getattr(optimizer, "param_groups", None) or [{}]
    training = bool(groups[0].get("train_mode", True))
    optimizer_eval_mode(optimizer)
    try:
        yield
    finally:
        if training:
            optimizer_train_mode(optimizer)


def optimizer_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Prodigy's step-size estimate d and d x lr (SimpleTuner's prodigy_d, prodigy_effective_lr); else nothing."""
    groups = getattr(optimizer, "param_groups", None) or [{}]
    if "d" not in groups[0] or "d0" not in groups[0]:
        return {}
    d = float(groups[0]["d"])
    return {"prodigy_d": d, "prodigy_effective_lr": d * float(groups[0].get("lr", 1.0))}


# --------------------------------------------------------------------------------------------------------------------
# Learning rate.


def effective_learning_rate(options: OptimizerOptions) -> float:
    """`learning_rate`, scaled as SimpleTuner does.

    With `lr_scale` it is multiplied by the global batch (train_batch_size x num_processes x
    gradient_accumulation_steps), or by its square root when `lr_scale_sqrt` is also set (`lr_scale_sqrt` alone
    changes nothing, as in SimpleTuner). The trainer has checked num_processes against the processes launched.
    """
    lr = float(options.learning_rate)
    if not options.lr_scale:
        if options.lr_scale_sqrt:
            log.warning("lr_scale_sqrt has no effect without lr_scale (as in SimpleTuner); set lr_scale=true too")
        return lr
    factor = global_batch(options.train_batch_size, options.num_processes, options.gradient_accumulation_steps)
    return lr * (math.sqrt(factor) if options.lr_scale_sqrt else factor)


def _constant_lambda(warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return step / warmup if step < warmup else 1.0

    return factor


# SimpleTuner's own waves (`custom_schedule.Cosine` / `Sine`): lr = lr_end + (lr - lr_end) * wave(step / period).
_WAVES: dict[str, Callable[[float], float]] = {
    "cosine": lambda phase: 0.5 * (1.0 + math.cos(math.pi * phase)),
    "sine": lambda phase: 0.5 * (1.0 + math.sin(math.pi * phase)),
    "cosine_with_restarts": lambda phase: 0.5 * (1.0 + math.cos(math.pi * (phase % 1.0))),
}
COSINE_DEFAULT_PERIOD = 1000  # SimpleTuner's Cosine falls back to this when lr_warmup_steps is 0


def _wave_lambda(wave: Callable[[float], float], period: int, floor: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return floor + (1.0 - floor) * wave(step / period)

    return factor


def _wave_period(name: str, warmup: int) -> int:
    """The half-period of SimpleTuner's cosine / sine / cosine_with_restarts schedules: `lr_warmup_steps`.

    SimpleTuner passes `lr_warmup_steps * num_processes` and accelerate steps the schedule once per process each
    optimizer step, so in optimizer steps the half-period is `lr_warmup_steps`; these schedules have no warmup.
    """
    if warmup > 0:
        return warmup
    if name == "cosine":
        log.warning("lr_scheduler=cosine takes lr_warmup_steps as its half-period; it is 0, so %d steps are used "
                    "(as in SimpleTuner)", COSINE_DEFAULT_PERIOD)  # fmt: skip
        return COSINE_DEFAULT_PERIOD
    raise ConfigError(f"lr_scheduler={name} takes lr_warmup_steps as its half-period (as in SimpleTuner); "
                      "set lr_warmup_steps > 0")  # fmt: skip


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, options: OptimizerOptions, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule `options.lr_scheduler` over `total_steps` optimizer steps; call `.step()` after each.

    - constant: the learning rate, after a linear warmup over `lr_warmup_steps` when that is > 0.
    - constant_with_warmup, linear: diffusers' schedules.
    - polynomial: diffusers' decay from the learning rate to `lr_end` with exponent `lr_power`.
    - cosine, sine: SimpleTuner's SGDR-style waves with half-period P = `lr_warmup_steps` (no warmup; P = 1000 when
      it is 0 for cosine, required for sine), running for the whole run between the learning rate and the floor
      `lr_end`: cosine lr_end + (lr - lr_end)(1 + cos(pi t / P)) / 2 starts at the learning rate; sine
      lr_end + (lr - lr_end)(1 + sin(pi t / P)) / 2 starts half-way and peaks at t = P / 2.
    - cosine_with_restarts: the SGDR schedule SimpleTuner's `CosineAnnealingHardRestarts` defines, with cycle
      T = `lr_warmup_steps`: lr_end + (lr - lr_end)(1 + cos(pi (t mod T) / T)) / 2, back to the learning rate at each
      restart. (SimpleTuner's launcher never advances that class's cycle, so there the rate stays constant, with a
      warning that it misbehaves; st runs the schedule the class describes.)
    SimpleTuner also truncates each learning rate to 9 decimals; st does not. `lr_num_cycles` is used by none.

    `SCHEDULE_FREE` optimizers carry their own warmup and need no decay, so they always get a flat schedule;
    prodigy keeps the schedule (over its lr of 1.0), as in SimpleTuner.
    """
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    name = options.lr_scheduler
    warmup = int(options.lr_warmup_steps)
    total_steps = int(total_steps)
    if warmup < 0:
        raise ConfigError(f"lr_warmup_steps must be >= 0, got {warmup}")
    if options.optimizer in SCHEDULE_FREE:
        if name != "constant" or warmup:
            log.info("%s schedules its own learning rate (warmup %d steps); ignoring lr_scheduler=%s",
                     options.optimizer, warmup, name)  # fmt: skip
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant_lambda(warmup))
    if name == "constant_with_warmup":
        return get_scheduler(name, optimizer, num_warmup_steps=warmup)
    if name in _WAVES:
        period = _wave_period(name, warmup)
        lambdas = []
        for group in optimizer.param_groups:
            peak = float(group.get("initial_lr", group["lr"]))
            floor = float(options.lr_end) / peak if peak > 0 else 0.0
            lambdas.append(_wave_lambda(_WAVES[name], period, floor))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    if total_steps < 1:
        raise ConfigError(f"lr_scheduler={name} needs the number of training steps, got {total_steps}")
    if name == "polynomial":
        try:
            return get_polynomial_decay_schedule_with_warmup(
                optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, lr_end=float(options.lr_end),
                power=float(options.lr_power),
            )  # fmt: skip
        except ValueError as exc:
            raise ConfigError(f"lr_scheduler=polynomial: {exc} (lower lr_end or raise learning_rate)") from None
    if name == "linear":
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    raise ConfigError(f"unknown lr_scheduler '{name}'")


# --------------------------------------------------------------------------------------------------------------------
# Gradient clipping.


def clip_gradients(params: Iterable[torch.Tensor], options: OptimizerOptions) -> float:
    """Clip gradients by `grad_clip_method` ("value": each element to ±max_grad_norm; "norm": the global L2 norm).

    Returns the global L2 norm of the gradients measured before clipping; `max_grad_norm <= 0` disables clipping,
    and `UNCLIPPED` optimizers are never clipped (as in SimpleTuner).
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    limit = 0.0 if options.optimizer in UNCLIPPED else float(options.max_grad_norm)
    method = options.grad_clip_method
    if method not in ("value", "norm"):
        raise ConfigError(f"grad_clip_method must be 'value' or 'norm', got {method!r}")
    if method == "norm" and limit > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, limit))
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if limit > 0:
        torch.nn.utils.clip_grad_value_(params, limit)
    return float(total)
