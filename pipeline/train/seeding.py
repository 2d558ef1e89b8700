"""Where `seed` reaches the random sources of training that draw from global generators.

Noise, timesteps and guidance use the trainer's own generator; data order and caption dropout use `random.Random`
instances seeded from (seed, epoch, batch, sample). What remains draws from the global generators: the adapter
initialisation (peft's LoRA A matrices), dropout, and the stochastic rounding of bf16 weights. Those are seeded here.

The global generators get the same seed on every process: stochastic rounding happens after the gradients are
averaged, so equal random streams keep the replicas' weights equal. Validation and evaluation run inside
`isolated_rng`, so turning them on, off, or to other intervals never changes the training trajectory.
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
