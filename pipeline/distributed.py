"""Process rank, world size, a barrier and the global batch for runs started by `accelerate launch` or `torchrun`.

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. On machines without GPUs accelerate
does not set up a process group for such runs, so the group is created here (gloo on CPU, nccl on CUDA).

`num_processes` is an option because `st prepare` runs before any launch and sizes buckets for the global batch;
`st train` then checks it against the number of processes actually launched (`check_world_size`), so that every
stage computes the global batch from the same number of processes.
"""

from __future__ import annotations

import os

from .errors import ConfigError


def rank_and_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    """Wait for every process of the run; a no-op in a single process."""
    rank, world = rank_and_world()
    if world == 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[local_rank()])
    else:
        dist.barrier()


def global_batch(per_process: int, processes: int, accumulation: int = 1) -> int:
    """Samples in one batch across all processes: per micro-step (`accumulation` 1), or per optimizer step with
    `gradient_accumulation_steps` micro-steps."""
    return int(per_process) * int(processes) * int(accumulation)


def check_world_size(num_processes: int, world: int) -> None:
    """Refuse a run whose `num_processes` differs from the number of processes launched (`world`): the buckets
    `st prepare` kept and the `lr_scale` factor were sized for `num_processes`."""
    if num_processes != world:
        raise ConfigError(
            f"num_processes is {num_processes}, but {world} process(es) were launched; set num_processes = {world} "
            "(the number of processes launched) and re-run `st prepare` (it keeps only buckets that fill a batch of "
            "train_batch_size x num_processes x gradient_accumulation_steps)"
        )


SHARDED_LAUNCHERS = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed", "MEGATRON_LM": "Megatron-LM"}


def check_launcher(distributed_type: object) -> None:
    """Refuse accelerate launches that shard the model (FSDP, DeepSpeed): st saves checkpoints and final weights from
    whole parameters and resumes exactly only from those, which it has not verified for sharded parameters. Plain
    data-parallel launches (one or many machines) are what st runs. The launcher's environment counts too: without
    GPUs accelerate quietly runs an FSDP launch as plain data parallel, which is not what was asked for."""
    name = getattr(distributed_type, "name", str(distributed_type))
    for env_name, launcher in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(env_name, "").lower() in ("1", "true", "yes"):
            name = launcher
    if name in SHARDED_LAUNCHERS:
        raise ConfigError(
            f"accelerate was launched with {SHARDED_LAUNCHERS[name]}, which st train does not support yet: its "
            "checkpoints, final weights and exact resume are written from whole (unsharded) parameters. Launch "
            "without --use_fsdp / --use_deepspeed (plain data parallel: `accelerate launch --multi_gpu`, on one or "
            "many machines) and fit a large model with st's memory options instead (base_model_precision, "
            "gradient_checkpointing, layer offload / block swap; README: 'Big models on small GPUs')"
        )


class WrappedDenoiser:
    """A denoiser wrapped for data parallelism (DDP), as the family forward functions see it: calls go through the
    wrapper, so that its gradient synchronisation runs; attribute reads (`config`, `dtype`, blocks) go to the model
    inside, which the wrapper does not expose (`'DistributedDataParallel' object has no attribute 'config'`)."""

    __slots__ = ("wrapper", "inner")

    def __init__(self, wrapper: object, inner: object) -> None:
        self.wrapper, self.inner = wrapper, inner

    def __call__(self, *args, **kwargs):
        return self.wrapper(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def forward_view(model: object) -> object:
    """`model` as the family forward functions take it: the model itself, or a `WrappedDenoiser` when a data-parallel
    wrapper (an object with `.module`, as DistributedDataParallel) holds it."""
    inner = getattr(model, "module", None)
    return model if inner is None else WrappedDenoiser(model, inner)
