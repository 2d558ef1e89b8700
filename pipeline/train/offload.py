"""Where the frozen denoiser waits while it is not computing: diffusers group offloading, block swap, the CPU while a
checkpoint is saved. None of it changes a result (the same ops run on the same values), so none of these options
enters the train key; `Memory.record()` is what the train manifest states.

Group offloading (`enable_group_offload`) is diffusers' `apply_group_offloading` on the denoiser, for training and
validation alike. diffusers restores a group from a copy taken when offloading was applied (with
`group_offload_use_stream`, or `group_offload_to_disk_path`), which would undo every optimizer step of the adapter
weights inside it; so the trainable parameters are kept out of the groups: they stay on the compute device, live.
With `group_offload_type` leaf_level every frozen layer is a group of its own and the adapters' layers get none: the
least memory, the most transfers. Spilled groups go to a temporary subfolder st creates inside
`group_offload_to_disk_path` and deletes when the run ends; nothing else in that folder is touched.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import OptionGroup
from ..errors import ConfigError
from ..log import get_logger

log = get_logger("train")


@dataclass(frozen=True)
class MemoryOptions(OptionGroup):
    """How the frozen denoiser is held in memory while training and validating."""

    enable_group_offload: bool
    group_offload_type: str
    group_offload_blocks_per_group: int
    group_offload_use_stream: bool
    group_offload_to_disk_path: str | None
    musubi_blocks_to_swap: int
    musubi_block_swap_device: str
    offload_during_save: bool
    enable_model_cpu_offload: bool
    ramtorch: bool
    ramtorch_target_modules: str | None
    ramtorch_text_encoder: bool
    ramtorch_vae: bool
    ramtorch_controlnet: bool
    ramtorch_transformer_percent: float
    controlnet: bool
    base_model_precision: str
    gradient_checkpointing: bool
    gradient_checkpointing_interval: int | None
    model_type: str
    model_family: str
    num_processes: int


def check(options: MemoryOptions, device) -> None:
    """Refuse combinations that cannot work, before any model is loaded (exit 2 naming the options)."""
    swap = options.musubi_blocks_to_swap > 0
    offload = options.enable_group_offload
    on_cuda = str(getattr(device, "type", device)) == "cuda"  # ROCm builds of torch name their GPUs cuda too
    if offload and swap:
        raise ConfigError("enable_group_offload and musubi_blocks_to_swap both move the denoiser's blocks; choose "
                          "one (as SimpleTuner, st refuses both together)")  # fmt: skip
    if options.group_offload_use_stream and not on_cuda:
        raise ConfigError(f"group_offload_use_stream needs a CUDA device (this run trains on {device}); set it "
                          "to false")  # fmt: skip
    if options.ramtorch:
        _check_ramtorch(options, device, on_cuda)
    elif offload or swap:
        _check_blocks(options)
    else:
        return
    name = "ramtorch" if options.ramtorch else "enable_group_offload" if offload else "musubi_blocks_to_swap"
    if options.model_type == "full" and not (options.ramtorch and options.controlnet):  # a ControlNet run: frozen base
        raise ConfigError(f"{name} moves frozen weights, and with model_type full every weight trains; use it with "
                          "a LoRA or LyCORIS run")  # fmt: skip
    if options.num_processes > 1:
        raise ConfigError(f"{name} is not supported with several processes (num_processes "
                          f"{options.num_processes}) yet; train on one GPU or turn it off")  # fmt: skip


def check_config(config) -> None:
    """`check` for the device `st train` will train on (accelerate's choice: the GPU when there is one), run by the
    stage before anything is read or loaded."""
    import torch

    check(MemoryOptions.from_config(config), torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _check_blocks(options: MemoryOptions) -> None:
    """Group offloading and block swap."""
    offload = options.enable_group_offload
    name = "enable_group_offload" if offload else "musubi_blocks_to_swap"
    if options.enable_model_cpu_offload:
        raise ConfigError(f"enable_model_cpu_offload and {name} are two offloading strategies for the same "
                          "denoiser; choose one")  # fmt: skip
    from ..families import get_family

    denoiser = get_family(options.model_family).denoiser
    if denoiser.subfolder == "unet":  # SimpleTuner offloads and swaps transformers only
        raise ConfigError(f"{name} moves transformer blocks, and model_family {options.model_family}'s "
                          f"{denoiser.class_name} is a UNet; turn {name} off")  # fmt: skip
    if offload and (not options.gradient_checkpointing or (options.gradient_checkpointing_interval or 1) > 1):
        # Backward reads weights that some ops saved in the forward; once offloaded they are gone. A checkpointed
        # block recomputes its forward (onloading again) right before its backward.
        raise ConfigError("enable_group_offload needs gradient_checkpointing true on every block "
                          "(gradient_checkpointing_interval unset or 1): backward must recompute each block with "
                          "its weights onloaded")  # fmt: skip


def _check_ramtorch(options: MemoryOptions, device, on_cuda: bool) -> None:
    from ..ramtorch_layers import cuda_refusal, parse_targets

    if not on_cuda:
        parts = ("ramtorch_text_encoder", "ramtorch_vae") + (("ramtorch_controlnet",) if options.controlnet else ())
        raise cuda_refusal(["ramtorch"] + [name for name in parts if getattr(options, name)], "trains", device)
    for other in ("enable_group_offload", "musubi_blocks_to_swap", "enable_model_cpu_offload"):
        if getattr(options, other):
            raise ConfigError(f"ramtorch and {other} are two offloading strategies for the same denoiser weights; "
                              "choose one")  # fmt: skip
    if options.base_model_precision != "no_change":
        raise ConfigError(f"ramtorch streams plain Linear weights, and base_model_precision "
                          f"{options.base_model_precision} quantises them; use one or the other")  # fmt: skip
    if options.ramtorch_target_modules is not None and parse_targets(options.ramtorch_target_modules) is None:
        raise ConfigError(f"ramtorch_target_modules {options.ramtorch_target_modules!r} names no pattern; give "
                          "comma-separated globs such as \"transformer_blocks.*\", or leave it unset for every "
                          "Linear")  # fmt: skip


class Memory:
    """The memory arrangement of one run's denoiser (see `hold`)."""

    def __init__(self, options: MemoryOptions, device) -> None:
        self.options, self.device = options, device
        self.block_swap = None
        self.group_offload: dict[str, Any] | None = None
        self.ramtorch: dict[str, Any] | None = None  # with the text encoders' and the VAE's parts once streamed

    def record(self) -> dict[str, Any]:
        """What the train manifest states: how the denoiser was held."""
        return {"group_offload": self.group_offload,
                "block_swap": self.block_swap.record() if self.block_swap else None,
                "offload_during_save": self.options.offload_during_save,
                "model_cpu_offload": self.options.enable_model_cpu_offload, "ramtorch": self.ramtorch}  # fmt: skip

    @contextlib.contextmanager
    def saving(self, denoiser):
        """`offload_during_save`: every weight of the denoiser on the CPU while a checkpoint is written, then back."""
        if not self.options.offload_during_save or str(self.device) == "cpu":
            yield
            return
        moved = _move_all(denoiser, "cpu")
        try:
            yield
        finally:
            _restore(moved)


_STREAMED = "_st_ramtorch"  # set on a denoiser whose layers `place` already handed to ramtorch: what it streamed
_MEMORY = "_st_memory"  # set on the denoiser by `hold`: its Memory, which the validation VAE reports to


def place(denoiser, options: MemoryOptions, device) -> None:
    """Move `denoiser` (adapters attached) to `device`; with `ramtorch`, its selected frozen layers go to host memory
    first, so that a model larger than the GPU never lands on it whole."""
    if options.ramtorch and not hasattr(denoiser, _STREAMED):
        from ..ramtorch_layers import parse_targets, stream

        setattr(denoiser, _STREAMED, stream(denoiser, parse_targets(options.ramtorch_target_modules), device,
                                            percent=options.ramtorch_transformer_percent))
    denoiser.to(device)  # ramtorch's layers ignore device moves: their weights stay in host memory


def hold(denoiser, options: MemoryOptions, family: str, device) -> Memory:
    """Apply RamTorch, group offloading or block swap to `denoiser`, which is on `device` with its adapters."""
    from .text_encoders import of as text_encoders_of

    memory = Memory(options, device)
    setattr(denoiser, _MEMORY, memory)
    if options.ramtorch:
        place(denoiser, options, device)
        memory.ramtorch = getattr(denoiser, _STREAMED)
        encoders = text_encoders_of(denoiser)
        if encoders is not None and encoders.ramtorch is not None:
            memory.ramtorch["text_encoders"] = encoders.ramtorch
    if options.enable_group_offload:
        _group_offload(memory, denoiser, options, device)
    elif options.musubi_blocks_to_swap > 0:
        from .block_swap import BlockSwap

        memory.block_swap = BlockSwap.build(denoiser, family, options.musubi_blocks_to_swap,
                                            options.musubi_block_swap_device, device)  # fmt: skip
        memory.block_swap.install(denoiser)
    return memory


def stream_vae(vae, denoiser, device) -> None:
    """`ramtorch_vae` for the validation VAE of a run whose denoiser `hold` arranged (call before moving the VAE);
    the manifest then records it under `stats.memory.ramtorch.vae`."""
    memory = next((getattr(m, _MEMORY) for m in denoiser.modules() if hasattr(m, _MEMORY)), None)
    if memory is None or not (memory.options.ramtorch and memory.options.ramtorch_vae):
        return
    from ..ramtorch_layers import parse_targets
    from ..ramtorch_layers import stream_vae as stream_mid_blocks

    memory.ramtorch["vae"] = stream_mid_blocks(vae, parse_targets(memory.options.ramtorch_target_modules), device)


def _group_offload(memory: Memory, denoiser, options: MemoryOptions, device) -> None:
    import torch
    from diffusers.hooks import apply_group_offloading

    spill = None
    if options.group_offload_to_disk_path:
        parent = Path(options.group_offload_to_disk_path).expanduser()
        try:
            parent.mkdir(parents=True, exist_ok=True)
            spill = Path(tempfile.mkdtemp(prefix="st-offload-", dir=parent))
        except OSError as error:
            raise ConfigError(f"group_offload_to_disk_path {str(parent)!r} cannot be written ({error}); choose a "
                              "writable folder") from error  # fmt: skip
        weakref.finalize(memory, shutil.rmtree, spill, True)
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    live = [(p, p.data) for p in trainable]
    kwargs = {"num_blocks_per_group": options.group_offload_blocks_per_group} \
        if options.group_offload_type == "block_level" else {}  # fmt: skip
    apply_group_offloading(denoiser, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                           offload_type=options.group_offload_type, use_stream=options.group_offload_use_stream,
                           offload_to_disk_path=str(spill) if spill else None, **kwargs)  # fmt: skip
    _release_trainable_layers(denoiser)
    for param, data in live:  # applying offloaded (or, to disk, emptied) every group once
        param.data = data
    groups = _groups(denoiser)
    for group in groups:
        _keep_trainable_live(group)
    memory.group_offload = {"type": options.group_offload_type, "groups": len(groups),
                            "blocks_per_group": kwargs.get("num_blocks_per_group"),
                            "use_stream": options.group_offload_use_stream, "to_disk": spill is not None}  # fmt: skip
    log.info("group offloading: %d %s group(s) of the denoiser wait on %s between uses", len(groups),
             options.group_offload_type, f"disk ({spill})" if spill else "the CPU")  # fmt: skip


def _release_trainable_layers(denoiser) -> None:
    """leaf_level makes a group of every Linear, the adapters' lora_A / lora_B included: take the hooks off layers
    whose weights all train, so that they stay on the compute device and are never copied or moved."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        params = list(module.parameters(recurse=False))
        if registry is not None and params and all(p.requires_grad for p in params):
            registry.remove_hook(_GROUP_OFFLOADING, recurse=False)


def _groups(denoiser) -> list:
    """diffusers' module groups of a group-offloaded model, each once."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    found: dict[int, Any] = {}
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None
        if hook is not None:
            found.setdefault(id(hook.group), hook.group)
    return list(found.values())


def _keep_trainable_live(group) -> None:
    """Wrap a group's onload/offload so that its trainable parameters (and their gradients) keep their current
    values on the compute device, whatever copy diffusers would restore or move."""
    params = [p for m in group.modules for p in m.parameters()] + list(group.parameters)
    trainable = list({id(p): p for p in params if p.requires_grad}.values())
    if not trainable:
        return

    def keeping(move):
        def run():
            kept = [(p, p.data, p.grad, None if p.grad is None else p.grad.data) for p in trainable]
            move()
            for param, data, grad, grad_data in kept:
                param.data = data
                if grad is not None:
                    grad.data = grad_data
                    param.grad = grad

        return run

    group.onload_ = keeping(group.onload_)
    group.offload_ = keeping(group.offload_)


def _move_all(module, device) -> list:
    """Move every parameter and buffer of `module` to `device` in place (as nn.Module.to does, which keeps the
    Parameter objects the optimizer holds and handles quantised tensors); returns what `_restore` puts back."""
    import torch

    target = torch.device(device)
    moved = []
    with torch.no_grad():
        for child in module.modules():
            tensors = [t for t in (*child._parameters.values(), *child._buffers.values()) if t is not None]
            devices = {t.device for t in tensors} - {target}
            if not devices:
                continue
            if len({t.device for t in tensors}) == 1:
                moved.append((child, devices.pop()))
                child._apply(lambda t: t.to(target), recurse=False)
                continue
            for tensor in tensors:  # a module whose own tensors sit on several devices: one by one
                if tensor.device != target:
                    moved.append((tensor, tensor.device))
                    tensor.data = tensor.data.to(target)
    return moved


def _restore(moved: list) -> None:
    import torch

    with torch.no_grad():
        for item, device in moved:
            if isinstance(item, torch.nn.Module):
                item._apply(lambda t, d=device: t.to(d), recurse=False)
            else:
                item.data = item.data.to(device)


@contextlib.contextmanager
def model_cpu_offload(pipe, device, enabled: bool):
    """`enable_model_cpu_offload` while a validation renders: diffusers moves each model of the pipeline to the GPU
    only while it runs. Afterwards the hooks go and every model returns where it was (the denoiser keeps training)."""
    if not enabled or str(getattr(device, "type", device)) != "cuda":
        yield
        return
    import torch

    places = {name: next(iter(m.parameters())).device for name, m in pipe.components.items()
              if isinstance(m, torch.nn.Module) and any(True for _ in m.parameters())}  # fmt: skip
    pipe.enable_model_cpu_offload(device=device)
    try:
        yield
    finally:
        pipe.remove_all_hooks()
        for name, place in places.items():
            pipe.components[name].to(place)


def note_model_cpu_offload(device, enabled: bool) -> None:
    if enabled and str(getattr(device, "type", device)) != "cuda":
        log.info("enable_model_cpu_offload: validation runs on %s, where every model already sits in host memory; "
                 "nothing to offload", device)  # fmt: skip
