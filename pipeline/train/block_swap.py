"""Block swap (`musubi_blocks_to_swap`): the last N transformer blocks' frozen weights wait on a swap device (the CPU
by default) and come to the compute device one block at a time, for its forward and again for its backward.

Forward: a block's pre-hook brings it in, its post-hook sends it back. Backward: a hook on each block's output
tensors fires when the gradient reaches that block; it brings the block in (its ops may read its weights again, and a
gradient-checkpointed block recomputes its forward) and sends back every swapped block whose backward is done. The
trainable adapter weights never move: they stay on the compute device with their gradients and optimizer state.
As in SimpleTuner, at least the first block stays resident (N is capped at depth - 1).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..log import get_logger

log = get_logger("train")

# The block lists of the transformer denoisers, in execution order (Flux runs its double blocks, then its single ones;
# Wan's transformer calls its list `blocks`).
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


def transformer_blocks(denoiser, family: str) -> list:
    """The denoiser's transformer blocks in execution order; a denoiser without any (a UNet) is refused."""
    blocks = [block for name in BLOCK_LISTS for block in getattr(denoiser, name, None) or ()]
    if not blocks:
        raise ConfigError(f"musubi_blocks_to_swap needs a transformer block list, and model_family {family}'s "
                          f"{type(denoiser).__name__} has none; use enable_group_offload, or set "
                          "musubi_blocks_to_swap 0")  # fmt: skip
    return blocks


def move_frozen(module, device) -> None:
    """Move `module`'s frozen parameters and buffers to `device` in place (the Parameter objects stay the same);
    trainable parameters stay where they are."""
    import torch

    with torch.no_grad():
        for child in module.modules():
            own = [p for p in child._parameters.values() if p is not None]
            if not any(p.requires_grad for p in own):
                # Covers tensor subclasses (quantised weights) the way nn.Module.to does.
                child._apply(lambda t: t.to(device), recurse=False)
                continue
            for param in own:
                if not param.requires_grad and param.device != device:
                    param.data = param.data.to(device)
            for name, buffer in child._buffers.items():
                if buffer is not None and buffer.device != device:
                    child._buffers[name] = buffer.to(device)


def _output_tensors(output) -> list:
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _output_tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _output_tensors(item)]
    return [t for t in (getattr(output, "sample", None),) if isinstance(t, torch.Tensor)]


@dataclass
class BlockSwap:
    """Streams `blocks[first:]` between `swap_device` and `compute_device`; `install` adds the hooks."""

    blocks: list
    first: int
    swap_device: Any
    compute_device: Any

    def __post_init__(self) -> None:
        self.resident: set[int] = set()
        self.in_backward = False
        self.handles: list = []

    @classmethod
    def build(cls, denoiser, family: str, count: int, swap_device: str, compute_device) -> BlockSwap:
        import torch

        blocks = transformer_blocks(denoiser, family)
        try:
            device = torch.device(swap_device)
        except (RuntimeError, ValueError) as error:
            raise ConfigError(f"musubi_block_swap_device {swap_device!r} is not a device ({error}); use cpu, or "
                              "cuda:N") from error  # fmt: skip
        if device.type == "meta":
            raise ConfigError("musubi_block_swap_device 'meta' holds no data; use cpu")
        most = len(blocks) - 1
        if count > most:
            log.warning("musubi_blocks_to_swap %d: the denoiser has %d blocks and the first stays resident; swapping "
                        "the last %d", count, len(blocks), most)  # fmt: skip
            count = most
        return cls(blocks, len(blocks) - count, device, torch.device(compute_device))

    @property
    def count(self) -> int:
        return len(self.blocks) - self.first

    def record(self) -> dict[str, Any]:
        return {"blocks": self.count, "of": len(self.blocks), "device": str(self.swap_device)}

    def install(self, denoiser) -> None:
        self.handles.append(denoiser.register_forward_pre_hook(self._begin))
        for index, block in enumerate(self.blocks):
            if index >= self.first:
                self.handles.append(block.register_forward_pre_hook(functools.partial(self._enter, index)))
            self.handles.append(block.register_forward_hook(functools.partial(self._leave, index)))
        for index in range(self.first, len(self.blocks)):
            move_frozen(self.blocks[index], self.swap_device)
        log.info("block swap: the last %d of %d transformer blocks wait on %s", self.count, len(self.blocks),
                 self.swap_device)  # fmt: skip

    def _stream_in(self, index: int) -> None:
        if index not in self.resident:
            move_frozen(self.blocks[index], self.compute_device)
            self.resident.add(index)

    def _stream_out(self, index: int) -> None:
        if index in self.resident:
            move_frozen(self.blocks[index], self.swap_device)
            self.resident.discard(index)

    def _begin(self, module, args) -> None:
        """A new forward of the whole denoiser: a backward that stopped early leaves no block resident."""
        self.in_backward = False
        for index in sorted(self.resident):
            self._stream_out(index)

    def _enter(self, index: int, module, args) -> None:
        self._stream_in(index)

    def _leave(self, index: int, module, args, output) -> None:
        import torch

        if index >= self.first and not self.in_backward:  # a checkpointed recompute keeps it for its backward
            self._stream_out(index)
        if torch.is_grad_enabled():
            for tensor in _output_tensors(output):
                if tensor.requires_grad:
                    tensor.register_hook(functools.partial(self._gradient_reached, index))

    def _gradient_reached(self, index: int, grad) -> None:
        """Backward reached block `index`: blocks after it are done; it needs its weights."""
        self.in_backward = True
        for later in sorted(i for i in self.resident if i > index):
            self._stream_out(later)
        if index >= self.first:
            self._stream_in(index)
