"""Context parallelism (`context_parallel_size`, `context_parallel_comm_strategy`): one sample's token sequence split
across the processes of a context-parallel (CP) group, as SimpleTuner's standalone CP does it
(helpers/training/context_parallel.py, helpers/data_backend/runtime/context_parallel_sync.py).

The launched processes form `world / context_parallel_size` data-parallel replicas of `context_parallel_size`
consecutive ranks each (ranks 0-1, 2-3, ... for size 2). The sharding itself is diffusers': `enable_parallelism` with a
`ContextParallelConfig` on a device mesh ("dp_replicate", "ring", "ulysses"), which hooks the transformer's `_cp_plan`
(split the image / video tokens and rotary embeddings before the first block, gather the output of `proj_out`) and
routes its self-attention through diffusers' context-parallel attention. st adds what a training run needs around it:

- data: every rank of a CP group trains on its replica's batch (the data plan is split by replica, `data_rank`), and
  draws the same noise, timesteps and guidance (the run's generator is seeded by replica, not by rank);
- gradients: each rank's gradients are the part of the replica's gradient that flows through its own tokens (the
  gather's backward keeps the local slice), so the replica's gradient is their sum; DDP averages over all `world`
  ranks, so the loss is scaled by `context_parallel_size` before the backward (SimpleTuner's
  `scale_standalone_context_parallel_loss`), which makes the averaged gradient the mean over replicas of each replica's
  full-batch gradient - the gradient a run with one process per replica computes;
- validation renders on the main process alone, with the CP hooks lifted for its duration (`suspended`);
- inputs: what the plan splits must split evenly (`_guard_splits`, a clear InputError instead of diffusers'
  assertion); Flux, FLUX.2 and Qwen-Image split their text tokens with their image tokens (joint attention: Ulysses
  gathers each process's text and image tokens, and a key mask of the local length, alike), and Qwen-Image's text
  (any caption length) is padded under its mask to a multiple of the group (`_pad_text`); LTX-Video, whose text
  enters through cross-attention, trains with st's own plan (`_ltx_plan`): the text stays whole on every process and
  the cross-attention runs locally, each process's query shard over all of it (`_keep_local`).

`context_parallel_comm_strategy`: alltoall is Ulysses attention (an all-to-all trades the sequence split for a head
split; every rank attends over the whole sequence with its share of the heads). allgather asks for ring attention
(SimpleTuner's default), but diffusers 0.42's ring attention needs an attention kernel that returns its log-sum-exp,
and the default `attention_mechanism` runs PyTorch SDPA through diffusers' native backend, whose ring path cannot
(it raises) - so st runs Ulysses for it too, with a warning, whatever the backend
(`speed.check_context_parallel_attention` refuses the dispatcher backends without context-parallel support, and
xformers). DEVIATION: SimpleTuner rotates keys and values around
the ring (its own override of diffusers' ring attention); both compute exact attention over the whole sequence, so
the trained weights are the same up to float rounding. Ulysses needs the heads to divide evenly across the group,
which ring attention does not (`check_denoiser` refuses otherwise), and holds less: diffusers' "allgather" ring
gathers every rank's keys and values of all heads at once, Ulysses only those of its share of the heads.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from ..context_parallel_settings import OPTION, STRATEGY, VERIFIED_FAMILIES, check, strategy_of
from ..errors import ConfigError, InputError
from ..log import get_logger

log = get_logger("train")

__all__ = ["OPTION", "STRATEGY", "VERIFIED_FAMILIES", "Layout", "apply", "check", "check_batch", "check_denoiser",
           "layout_for", "suspended"]


@dataclass(frozen=True)
class Layout:
    """This process's place in a run of `world` processes with CP groups of `size` consecutive ranks."""

    size: int = 1
    strategy: str = "allgather"
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def data_parallel(self) -> int:
        """Data-parallel replicas: each trains on its own share of the data plan."""
        return self.world // self.size

    @property
    def data_rank(self) -> int:
        """This process's replica (its share of the data plan, its noise stream)."""
        return self.rank // self.size

    @property
    def loss_scale(self) -> float:
        """What the loss is multiplied by before the backward: DDP's mean over `world` ranks of partial gradients
        becomes the mean over replicas of full ones."""
        return float(self.size)


def layout_for(config: Any, rank: int, world: int) -> Layout:
    return Layout(size=int(config.context_parallel_size or 1), strategy=strategy_of(config), rank=rank, world=world)


# ------------------------------------------------------------------------------------------------------- checks


def check_denoiser(denoiser: Any, layout: Layout) -> None:
    """The loaded transformer can be split: it has a `_cp_plan`, and Ulysses can share its heads out evenly."""
    if not layout.enabled:
        return
    name = type(denoiser).__name__
    if getattr(denoiser, "_cp_plan", None) is None or not hasattr(denoiser, "enable_parallelism"):
        raise ConfigError(f"{OPTION} {layout.size}: {name} has no context-parallel plan (`_cp_plan`); set {OPTION} "
                          "to 1")  # fmt: skip
    heads = getattr(denoiser.config, "num_attention_heads", None)
    if heads is not None and heads % layout.size:
        raise ConfigError(f"{OPTION} {layout.size} must divide the transformer's {heads} attention heads (st's "
                          "Ulysses attention gives each process an equal share of them, whichever "
                          f"{STRATEGY}); choose a divisor of {heads}")  # fmt: skip


def check_batch(latents: Any, denoiser_config: Any, layout: Layout, where: str) -> None:
    """The batch's token sequence splits evenly across the CP group (diffusers splits it into equal parts)."""
    if not layout.enabled:
        return
    patch = getattr(denoiser_config, "patch_size", None) or (1, 1, 1)
    dims = latents.shape[2:]
    if not isinstance(patch, (tuple, list)) or len(patch) < len(dims):
        return  # packed by the family before the transformer (Flux): `_guard_splits` checks what the plan splits
    tokens = 1
    for size, step in zip(dims, patch[-len(dims):]):
        tokens *= int(size) // int(step)
    if tokens % layout.size:
        raise InputError(f"{where}: its {tokens} tokens per sample do not split evenly across {OPTION} "
                         f"{layout.size} processes; use a resolution / frame count whose token count is a multiple "
                         f"of {layout.size}, or set {OPTION} to 1")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- applying


def apply(denoiser: Any, layout: Layout, device: Any) -> Any:
    """Hook `denoiser` for context parallelism with diffusers' `enable_parallelism`; returns its parallel config (None
    without CP). Call it after the adapters are attached (a LoRA layer on a hooked module must see the gathered
    output) and before accelerate wraps the model."""
    if not layout.enabled:
        return None
    import torch.distributed as dist
    from diffusers.models._modeling_parallel import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ConfigError(f"{OPTION} {layout.size} needs a multi-process launch (accelerate launch / torchrun)")
    if layout.strategy != "alltoall":
        log.warning("%s %s: st runs Ulysses all-to-all attention (the same attention: PyTorch SDPA cannot do "
                    "diffusers' ring attention); set it to alltoall to silence this", STRATEGY, layout.strategy)
    # The mesh SimpleTuner builds: replicas outermost, so CP groups are runs of consecutive ranks.
    mesh = init_device_mesh(device.type, (layout.data_parallel, 1, layout.size),
                            mesh_dim_names=("dp_replicate", "ring", "ulysses"))  # fmt: skip
    config = ContextParallelConfig(ring_degree=1, ulysses_degree=layout.size, rotate_method="allgather", mesh=mesh,
                                   ulysses_anything=False)  # fmt: skip
    local = _own_plan(denoiser)
    _guard_splits(denoiser, layout)
    _pad_text(denoiser, layout)
    with _cpu_device_count(device):
        denoiser.enable_parallelism(config=config)
    _keep_local(denoiser, local)
    log.info("context parallelism: %d processes per sample (Ulysses all-to-all), %d data-parallel replica(s)",
             layout.size, layout.data_parallel)
    return denoiser._parallel_config


def _ltx_plan() -> dict[str, Any]:
    """LTX-Video's plan without its text: diffusers' `LTXVideoTransformer3DModel._cp_plan` splits the T5 sequence and
    its mask with the video tokens, and its cross-attention (video queries, text keys) through Ulysses then attends
    each query shard to a text shard only, which diffusers' Ulysses backward cannot take either (it assumes as many
    key as query tokens). Here the video tokens, their rotary tables (computed on the whole grid inside the model,
    split after) and per-token timesteps (first-frame conditioning: B x tokens; a per-sample timestep, 1-D, is left
    whole) are split; the text stays whole on every process and the cross-attention runs locally (`_keep_local`)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return {
        "": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
            "timestep": ContextParallelInput(split_dim=1, expected_dims=2, split_output=False),
        },
        "rope": {
            0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True),
            1: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


# Transformers whose `_cp_plan` st replaces with its own, and their attention modules that run on each process alone.
_OWN_PLANS = {"LTXVideoTransformer3DModel": (_ltx_plan, "transformer_blocks.*.attn2")}


def _own_plan(denoiser: Any) -> str | None:
    """Set st's plan on `denoiser` (an instance attribute over the class's) where it has one; returns the name of the
    attention modules to keep local (`_keep_local`), None otherwise."""
    own = _OWN_PLANS.get(type(denoiser).__name__)
    if own is None:
        return None
    plan, local = own
    denoiser._cp_plan = plan()
    return local


def _keep_local(denoiser: Any, name: str | None) -> None:
    """The cross-attention modules `name` attend with their own query shard to the whole text, which every process
    holds: no exchange, so plain attention (`_parallel_config` None; `enable_parallelism` set it on every processor).
    Each query's attention is complete, and the gradients of the text projections are each process's share, summed
    like every other gradient (see the module docstring). A processor shared with a split attention is copied first."""
    if name is None:
        return
    import copy

    from diffusers.hooks.context_parallel import _get_submodule_by_name

    modules = _get_submodule_by_name(denoiser, name)
    modules = modules if isinstance(modules, list) else [modules]
    chosen = {id(m) for m in modules}
    split = {id(m.processor) for m in denoiser.modules()
             if id(m) not in chosen and hasattr(getattr(m, "processor", None), "_parallel_config")}  # fmt: skip
    for module in modules:
        if id(module.processor) in split:
            module.set_processor(copy.copy(module.processor))
        module.processor._parallel_config = None


def _guard_splits(denoiser: Any, layout: Layout) -> None:
    """Before each module whose named inputs the `_cp_plan` splits (image and text tokens, position ids, masks), check
    that they split evenly: diffusers would stop with a bare assertion. Registered before diffusers' own hooks, so it
    sees the inputs whole."""
    import inspect

    from diffusers.hooks.context_parallel import _get_submodule_by_name
    from diffusers.models._modeling_parallel import ContextParallelInput

    for name, entry in denoiser._cp_plan.items():
        if not isinstance(entry, dict):
            continue
        splits = {key: value for key, value in entry.items()
                  if isinstance(key, str) and isinstance(value, ContextParallelInput) and not value.split_output}
        if not splits:
            continue
        modules = _get_submodule_by_name(denoiser, name)
        for module in modules if isinstance(modules, list) else [modules]:
            parameters = list(inspect.signature(type(module).forward).parameters)[1:]

            def check(_module, args, kwargs, splits=splits, parameters=parameters):
                if getattr(denoiser, "_st_cp_suspended", False):
                    return
                given = {**dict(zip(parameters, args)), **kwargs}
                for key, spec in splits.items():
                    value = given.get(key)
                    if value is None or not hasattr(value, "shape") or value.dim() != spec.expected_dims:
                        continue
                    length = int(value.shape[spec.split_dim])
                    if length % layout.size:
                        raise InputError(f"{OPTION} {layout.size}: the transformer's {key} has {length} tokens per "
                                         f"sample, which do not split evenly across {layout.size} processes; use a "
                                         f"resolution (or text length) whose token count is a multiple of "
                                         f"{layout.size}, or set {OPTION} to 1")  # fmt: skip

            module.register_forward_pre_hook(check, with_kwargs=True)


def _pad_text(denoiser: Any, layout: Layout) -> None:
    """A transformer whose plan splits its text mask with its text (Qwen-Image) gets its text padded to a multiple of
    the group size, the padding masked out: captions have any token count. The prediction is the unpadded one up to
    float rounding (no key attends to the padding; the text's positions come first in its RoPE table, so padding
    after them moves none; only image tokens leave the transformer). Registered before diffusers' hooks.
    DEVIATION: SimpleTuner hands the text over unpadded, so an odd caption length stops at diffusers' assertion."""
    splits = {key for entry in denoiser._cp_plan.values() if isinstance(entry, dict) for key in entry}
    if "encoder_hidden_states_mask" not in splits:
        return
    import torch

    def pad(_module, args, kwargs):
        embeds = kwargs.get("encoder_hidden_states")
        if getattr(denoiser, "_st_cp_suspended", False) or embeds is None or embeds.shape[1] % layout.size == 0:
            return None
        b, length = embeds.shape[:2]
        extra = layout.size - length % layout.size
        mask = kwargs.get("encoder_hidden_states_mask")
        mask = torch.ones(b, length, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        kwargs = {**kwargs, "encoder_hidden_states": torch.cat([embeds, embeds.new_zeros(b, extra, *embeds.shape[2:])],
                                                               dim=1),
                  "encoder_hidden_states_mask": torch.cat([mask, mask.new_zeros(b, extra)], dim=1)}  # fmt: skip
        return args, kwargs

    denoiser.register_forward_pre_hook(pad, with_kwargs=True)


@contextmanager
def _cpu_device_count(device: Any) -> Iterator[None]:
    """diffusers' `_resolve_parallel_config` picks the rank's device as `rank % torch.accelerator.device_count()`,
    which is 0 on a machine without accelerators; there it counts the CPU as the one device."""
    import torch

    if device.type != "cpu" or torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def _processors(denoiser: Any) -> list[Any]:
    return [m.processor for m in denoiser.modules()
            if hasattr(getattr(m, "processor", None), "_parallel_config")]  # fmt: skip


@contextmanager
def suspended(denoiser: Any) -> Iterator[None]:
    """The denoiser without its CP hooks (a forward on one process alone: validation renders on the main process);
    they are put back on exit."""
    config = getattr(denoiser, "_parallel_config", None)
    if config is None or config.context_parallel_config is None:
        yield
        return
    from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel

    plan = denoiser._cp_plan
    processors = [p for p in _processors(denoiser) if p._parallel_config is config]
    remove_context_parallel(denoiser, plan)
    for processor in processors:
        processor._parallel_config = None
    denoiser._st_cp_suspended = True  # `_guard_splits` stands aside
    try:
        yield
    finally:
        denoiser._st_cp_suspended = False
        for processor in processors:
            processor._parallel_config = config
        apply_context_parallel(denoiser, config.context_parallel_config, plan)
