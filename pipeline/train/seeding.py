"""Where `seed` reaches the random sources of training that draw from global generators.

Noise, timesteps and guidance use the trainer's own generator; data order and caption dropout use `random.Random`
instances seeded from (seed, epoch, batch, sample). What remains draws from the global generators: the adapter
initialisation (peft's LoRA A matrices), dropout, and the stochastic rounding of bf16 weights. Those are seeded here.

The global generators get the same seed on every process: stochastic rounding happens after the gradients are
averaged, so equal random streams keep the replicas' weights equal. The trainer's own generator (`training_seed`) is
where `seed_for_each_device` acts: by default each data-parallel rank draws its own noise and timesteps.
Validation and evaluation run inside `isolated_rng`, so turning them on, off, or to other intervals never changes
the training trajectory.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator


def seed_global(seed: int) -> None:
    """Seed Python's `random`, numpy's legacy global generator and torch's CPU and CUDA generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def training_seed(seed: int, data_rank: int, seed_for_each_device: bool = True) -> int:
    """The seed of a process's training generator (noise, timesteps, guidance): with seed_for_each_device
    (SimpleTuner's default) each data-parallel rank gets its own, seed * 1000 + rank; without it every process gets
    rank 0's, so all draw the same noise and timesteps (for their different samples). Processes that share one
    sample (context parallelism) share a data rank, hence a stream.

    DEVIATION: SimpleTuner's seed_for_each_device seeds the global generators with seed + rank (accelerate's
    set_seed(device_specific=True)); st keeps those equal on every process (see the module docstring) and seeds
    the trainer's generator per rank instead."""
    return seed * 1000 + (data_rank if seed_for_each_device else 0)


def _fork_devices(device: Any) -> list[int]:
    """The CUDA device indices whose generators `fork_rng` must save and restore (none off CUDA)."""
    import torch

    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return []
    index = torch.device(device).index
    return [torch.cuda.current_device() if index is None else index]


@contextmanager
def isolated_rng(device: Any = None, seed: int | None = None) -> Iterator[None]:
    """Run a block without moving the global generators' state (torch seeded with `seed` inside, when given)."""
    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=_fork_devices(device)):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
