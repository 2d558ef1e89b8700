"""SingLoRA adapters (`peft_lora_mode singlora`): peft-singlora's layers, stepped as SimpleTuner steps them.

SimpleTuner builds `SingLoRAConfig(ramp_up_steps=singlora_ramp_up_steps or 100)` and, after each optimizer step,
sets every layer's step buffer to the global step counted before it (`update_singlora_global_step`). peft-singlora
0.2.0 never hands the config's `ramp_up_steps` to its layers (they ramp over 1000 steps whatever it says); st sets the
value on every layer, so the option means what SimpleTuner documents. SimpleTuner's global `setup_singlora()` (which
patches every `LoraConfig` in the process) is not used: the config class carries the layer mapping itself.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..singlora_format import SINGLORA_WEIGHT_NAME, STEP_SUFFIX, ramp_up_steps, step_after
from ..tensorfile import normalise_file

_TRACKER_ATTR = "_st_singlora_steps"


def check(options) -> None:
    """Refuse what SingLoRA layers cannot do (they only implement default initialisation, and have no DoRA)."""
    if options.use_dora:
        raise ConfigError("peft_lora_mode singlora cannot be combined with use_dora: a SingLoRA layer has no "
                          "magnitude vector; set one of them")  # fmt: skip
    if options.lora_init_type != "default":
        raise ConfigError(f"peft_lora_mode singlora supports lora_init_type default only (peft-singlora's Kaiming "
                          f"initialisation), not {options.lora_init_type!r}")  # fmt: skip
    if options.init_lora:
        raise ConfigError("init_lora with peft_lora_mode singlora is not implemented: start SingLoRA from scratch "
                          "(remove init_lora) or use peft_lora_mode standard")  # fmt: skip


def lora_config(settings: dict[str, Any], option: int | None):
    """peft-singlora's `SingLoRAConfig` (LoraConfig's `settings`): Linear targets get SingLoRA layers."""
    from peft_singlora import SingLoRAConfig

    return SingLoRAConfig(**settings, ramp_up_steps=ramp_up_steps(option))


def layers(denoiser) -> list[Any]:
    from peft_singlora import SingLoRALayer

    return [m for m in denoiser.modules() if isinstance(m, SingLoRALayer)]


def prepare(denoiser, option: int | None) -> None:
    """After injection: the ramp length on every layer, and the step buffers following the optimizer's steps."""
    found = layers(denoiser)
    if not found:
        raise ConfigError("peft_lora_mode singlora: no Linear layer among the LoRA targets (SingLoRA adapts Linear "
                          "layers only); check peft_lora_target_modules / flux_lora_target")  # fmt: skip
    steps = ramp_up_steps(option)
    for layer in found:
        layer.ramp_up_steps = steps
    object.__setattr__(denoiser, _TRACKER_ATTR, _StepTracker(found))


def step_buffers(denoiser) -> dict[str, Any]:
    """The layers' step buffers by name (a checkpoint keeps them beside the weights)."""
    return {n: b.detach() for n, b in denoiser.named_buffers() if n.endswith(STEP_SUFFIX)}


def restored(denoiser) -> None:
    """After a checkpoint's weights and step buffers were loaded: count on from the step they belong to."""
    tracker = getattr(denoiser, _TRACKER_ATTR, None)
    if tracker is not None:
        tracker.resume_from_buffer()


def module_shapes(denoiser) -> dict[str, tuple[int, int]]:
    """(out, in) features of each SingLoRA layer, by module name."""
    from peft_singlora import SingLoRALayer

    return {n: (m.base_layer.out_features, m.base_layer.in_features) for n, m in denoiser.named_modules()
            if isinstance(m, SingLoRALayer)}  # fmt: skip


class _StepTracker:
    """Sets the layers' step buffers after every step of the optimizer that trains them, as SimpleTuner does after
    each optimizer step (a global optimizer hook: the trainer needs no SingLoRA code). The hook holds it weakly and
    does nothing once the model is gone (removing it then could mutate torch's hook table while torch iterates it)."""

    def __init__(self, found: list[Any]) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.layers = found
        self.param_ids = {id(p) for layer in found for p in layer.lora_A.values()}
        self.completed = 0
        ref = weakref.ref(self)

        def after_step(optimizer, args, kwargs) -> None:  # noqa: ARG001
            tracker = ref()
            if tracker is not None and any(id(p) in tracker.param_ids for group in optimizer.param_groups for p in group["params"]):
                tracker.completed += 1
                tracker.set_buffers(step_after(tracker.completed))

        register_optimizer_step_post_hook(after_step)

    def set_buffers(self, value: int) -> None:
        for layer in self.layers:
            layer.update_global_step(value)

    def resume_from_buffer(self) -> None:
        # A checkpoint is written after step n >= 1, when the buffers hold n - 1.
        self.completed = int(self.layers[0].training_step_default.item()) + 1


def save_simpletuner_layout(family, out_dir: Path, state: dict[str, Any], config) -> Path:
    """`SINGLORA_WEIGHT_NAME`: the SingLoRA layers' peft state dict under the denoiser's prefix, with the config
    (dropout 0, and `ramp_up_steps`) as the adapter metadata: the file SimpleTuner saves for a SingLoRA run."""
    import tempfile

    metadata = config.to_dict() | {"lora_dropout": 0.0, "ramp_up_steps": config.ramp_up_steps}
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        written = family.save_lora(scratch, state, config=metadata)
        target = out_dir / SINGLORA_WEIGHT_NAME
        os.replace(written, target)
    normalise_file(target)
    return target
