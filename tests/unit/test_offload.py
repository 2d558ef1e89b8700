"""Block swap's streaming order on a small transformer-shaped model, and the memory options' refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.train import offload
from pipeline.train.block_swap import BlockSwap


class Block(nn.Module):
    """A frozen linear and RMSNorm (whose weight backward reads directly) plus a trainable low-rank branch."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width).requires_grad_(False)
        self.norm = nn.RMSNorm(width).requires_grad_(False)
        self.down = nn.Linear(width, 2, bias=False)
        self.up = nn.Linear(2, width, bias=False)

    def forward(self, x):
        return x + self.norm(self.linear(x)) + self.up(self.down(x))


class Tiny(nn.Module):
    def __init__(self, depth: int = 5, width: int = 8, checkpointing: bool = False) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.checkpointing = checkpointing

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for block in self.transformer_blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return x


def grads(model: Tiny, x) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_swapped_block_is_resident_only_while_it_computes(checkpointing):
    torch.manual_seed(0)
    model = Tiny(checkpointing=checkpointing)
    x = torch.randn(3, 8)
    expected = grads(model, x)
    swap = BlockSwap.build(model, "flux", 3, "cpu", "cpu")
    swap.install(model)
    resident_while_running = []
    for index, block in enumerate(model.transformer_blocks):
        block.register_forward_hook(
            lambda m, a, o, i=index: resident_while_running.append(i in swap.resident or i < swap.first), prepend=True
        )  # runs before the swap's own hook sends it back
    for _ in range(2):  # two steps: the second starts from what the first left
        assert grads(model, x).keys() == expected.keys()
        assert all(torch.equal(grads(model, x)[n], g) for n, g in expected.items())
        assert swap.resident == set()  # between steps every swapped block waits on the swap device
    assert swap.first == 2 and all(resident_while_running)


def test_block_swap_keeps_the_first_block_and_refuses_what_it_cannot_swap(caplog):
    model = Tiny(depth=3)
    assert BlockSwap.build(model, "flux", 9, "cpu", "cpu").record() == {"blocks": 2, "of": 3, "device": "cpu"}
    with pytest.raises(ConfigError, match="'meta' holds no data"):
        BlockSwap.build(model, "flux", 1, "meta", "cpu")
    with pytest.raises(ConfigError, match="has none"):
        BlockSwap.build(nn.Linear(2, 2), "sd3", 1, "cpu", "cpu")


def options(**changes) -> offload.MemoryOptions:
    return dataclasses.replace(offload.MemoryOptions.from_config(Config(model_family="flux")), **changes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"musubi_blocks_to_swap": 2, "model_family": "sdxl"}, "UNet2DConditionModel is a UNet"),
    ({"enable_group_offload": True, "model_family": "sd1x"}, "is a UNet; turn enable_group_offload off"),
    ({"enable_group_offload": True, "gradient_checkpointing_interval": 2}, "on every block"),
    ({"musubi_blocks_to_swap": 2, "num_processes": 2}, "several processes"),
    ({"enable_group_offload": True, "group_offload_use_stream": True}, "needs a CUDA device"),
])  # fmt: skip
def test_memory_options_this_run_cannot_honour_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        offload.check(options(**changes), torch.device("cpu"))


def test_the_defaults_hold_the_whole_model_and_pass_the_checks():
    offload.check(options(), torch.device("cpu"))
    memory = offload.hold(Tiny(), options(), "flux", torch.device("cpu"))
    assert memory.record() == {"group_offload": None, "block_swap": None, "offload_during_save": False,
                               "model_cpu_offload": False, "ramtorch": None}  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_swapped_blocks_wait_on_the_cpu_between_steps_on_a_gpu():
    torch.manual_seed(0)
    model = Tiny().cuda()
    x = torch.randn(3, 8, device="cuda")
    expected = grads(model, x)
    swap = BlockSwap.build(model, "flux", 3, "cpu", "cuda")
    swap.install(model)
    got = grads(model, x)
    assert all(torch.allclose(got[n], g) for n, g in expected.items())
    for index, block in enumerate(model.transformer_blocks):
        frozen = {p.device.type for p in block.linear.parameters()}
        assert frozen == ({"cpu"} if index >= swap.first else {"cuda"})
        assert {p.device.type for p in block.up.parameters()} == {"cuda"}
