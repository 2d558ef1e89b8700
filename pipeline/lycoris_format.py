"""The LyCORIS weight layout, shared by `st train` (which writes it) and `st publish` (which copies or renames it).

The lycoris-lora library names each adapted module `lycoris_<module path with dots as underscores>` (the layout
ComfyUI's LoRA loader reads for UNets and Flux); SimpleTuner stores the JSON settings in the `lycoris_config` header
entry. st's checkpoints hold the same tensors under the denoiser submodule that carries the network.
"""

from __future__ import annotations

from typing import Iterable

KEY_PREFIX = "lycoris_"
NETWORK_ATTR = "lycoris_network"  # the denoiser's submodule holding the network while training
CHECKPOINT_PREFIX = NETWORK_ATTR + "."
HEADER_KEY = "lycoris_config"


def is_lycoris_keys(keys: Iterable[str]) -> bool:
    """Whether safetensors keys are a LyCORIS network's."""
    keys = list(keys)
    return bool(keys) and all(k.startswith(KEY_PREFIX) for k in keys)
