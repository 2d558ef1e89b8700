"""SingLoRA weights (`peft_lora_mode singlora`), shared by `st train` (which writes them) and `st publish`.

A SingLoRA layer (the peft-singlora package SimpleTuner uses) holds one matrix A of shape (max(in, out), rank) and a
step buffer t; its update is `u(t) * alpha/rank * A[:out] @ A[:in].T` with the ramp `u(t) = min(t / T, 1)`. The
same update is an ordinary LoRA with `lora_B = A[:out]` and `lora_A = u(t) * A[:in].T` at the same rank and alpha, so
the file diffusers and ComfyUI load is written in that form; `SINGLORA_WEIGHT_NAME` keeps the layout SimpleTuner
saves (peft's state dict of the SingLoRA layers: `<module>.lora_A` and `<module>.training_step_default`).
"""

from __future__ import annotations

from typing import Any

SINGLORA_WEIGHT_NAME = "singlora_weights.safetensors"
DEFAULT_RAMP_UP_STEPS = 100  # SimpleTuner passes `singlora_ramp_up_steps or 100`
STEP_SUFFIX = ".training_step_default"  # the layer's step buffer for peft's default adapter
_A_SUFFIXES = (".lora_A.default", ".lora_A")  # a SingLoRA matrix as a parameter name / as peft's state-dict key


def ramp_up_steps(option: int | None) -> int:
    """T for `singlora_ramp_up_steps` as SimpleTuner reads it (0 or unset: 100)."""
    return option or DEFAULT_RAMP_UP_STEPS


def ramp_factor(step: Any, ramp_steps: int) -> float:
    """u(t) = min(t / T, 1), computed as the package computes it (a float32 division)."""
    import torch

    t = torch.as_tensor(step, dtype=torch.float32)
    return torch.min(t / ramp_steps, torch.tensor(1.0)).item()


def step_after(completed_steps: int) -> int:
    """The step buffer after `completed_steps` optimizer steps: SimpleTuner sets it after each step to the global
    step counted before that step, so optimizer step n (from 1) trains at t = max(n - 2, 0)."""
    return max(completed_steps - 1, 0)


def is_singlora_state(state: dict[str, Any]) -> bool:
    return any(key.endswith(STEP_SUFFIX) for key in state)


def to_plain_lora(state: dict[str, Any], shapes: dict[str, tuple[int, int]], ramp_steps: int) -> dict[str, Any]:
    """A SingLoRA state dict (parameter names or peft's keys) as the equal plain LoRA in peft's state-dict keys
    (`<module>.lora_A.weight` / `.lora_B.weight`). `shapes`: each module's (out, in) features. Weights of ordinary
    LoRA layers (targets that are not Linear) keep their peft names without the adapter name."""
    plain: dict[str, Any] = {}
    for key, value in state.items():
        if key.endswith(STEP_SUFFIX):
            continue
        module = next((key[: -len(s)] for s in _A_SUFFIXES if key.endswith(s)), None)
        if module is None:
            plain[key.replace(".default", "")] = value
            continue
        out_features, in_features = shapes[module]
        u = ramp_factor(state[module + STEP_SUFFIX], ramp_steps)
        plain[f"{module}.lora_B.weight"] = value[:out_features].contiguous()
        plain[f"{module}.lora_A.weight"] = (u * value[:in_features].T).contiguous()
    return plain
