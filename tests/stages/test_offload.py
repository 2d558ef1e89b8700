"""Memory options on a tiny Flux (CPU): group offloading and block swap train the same LoRA as a run that holds the
whole denoiser; offload_during_save writes the same checkpoint; the manifest says how the denoiser was held; options
a CPU cannot honour, and combinations that cannot work, stop with exit 2 naming them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers.training import WEIGHTS, losses, run_st_train, train

# Every option the runs rely on, stated (fp32: bf16 is emulated on this CPU and is not what these tests are about).
# Gradient checkpointing on: group offloading needs it, and block swap streams blocks in again for its recompute.
SETS = ["train_batch_size=1", "learning_rate=0.01", "lora_dropout=0", "caption_dropout_probability=0",
        'lr_scheduler="constant"', "lr_warmup_steps=0", 'mixed_precision="no"', "lora_rank=4",
        "gradient_checkpointing=true"]  # fmt: skip


@pytest.fixture(scope="module")
def flux(cached):
    return cached("flux")


@pytest.fixture(scope="module")
def held_whole(flux, tmp_path_factory):
    """The reference run: the whole denoiser on the compute device."""
    root, config = flux
    out = tmp_path_factory.mktemp("whole") / "train"
    train(config, root / "cache", out, *SETS)
    return out


def assert_same_training(out: Path, reference: Path) -> None:
    ours, theirs = losses(out), losses(reference)
    assert sorted(ours) == sorted(theirs) == [1, 2]
    for step in ours:
        assert math.isclose(ours[step], theirs[step], rel_tol=1e-5, abs_tol=1e-7), (step, ours, theirs)
    trained, expected = load_file(out / WEIGHTS), load_file(reference / WEIGHTS)
    assert trained.keys() == expected.keys()
    # Within 1% of one optimizer step (learning_rate 0.01): Adam divides each gradient by its own running size, so
    # an entry whose gradient is ~1e-9 turns last-bit differences of the offloaded arithmetic into ~1e-5 of weight.
    # A wrong run is far outside: an onload that restored stale LoRA weights would undo whole steps (~1e-2).
    for key in expected:
        assert (trained[key] - expected[key]).abs().max() <= 1e-4, key


def memory_record(out: Path) -> dict:
    import json

    return json.loads((out / "manifest.json").read_text())["stats"]["memory"]


def test_the_reference_run_trains_the_lora(held_whole, flux, tiny_model):
    """The LoRA the comparisons below match has moved away from its initialisation (lora_B starts at zero)."""
    weights = load_file(held_whole / WEIGHTS)
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k or "lora_up" in k)
    assert memory_record(held_whole) == {"group_offload": None, "block_swap": None, "offload_during_save": False,
                                         "model_cpu_offload": False, "ramtorch": None}  # fmt: skip


def test_group_offload_trains_the_same_lora(flux, held_whole, tmp_path):
    root, config = flux
    out = tmp_path / "train"
    train(config, root / "cache", out, *SETS, "enable_group_offload=true", "group_offload_blocks_per_group=2")
    assert_same_training(out, held_whole)
    assert memory_record(out)["group_offload"] == {"type": "block_level", "groups": 13, "blocks_per_group": 2,
                                                   "use_stream": False, "to_disk": False}  # fmt: skip


def test_leaf_level_group_offload_trains_the_same_lora(flux, held_whole, tmp_path):
    root, config = flux
    out = tmp_path / "train"
    train(config, root / "cache", out, *SETS, "enable_group_offload=true", 'group_offload_type="leaf_level"')
    assert_same_training(out, held_whole)
    record = memory_record(out)["group_offload"]
    assert record["type"] == "leaf_level" and record["groups"] > 100, record


def test_block_swap_trains_the_same_lora(flux, held_whole, tmp_path):
    """The last 20 of the tiny Flux's 22 blocks swapped, without gradient checkpointing (the backward hooks stream
    each block in again; tests/unit/test_offload.py checks the order with checkpointing)."""
    root, config = flux
    out = tmp_path / "train"
    train(config, root / "cache", out, *SETS, "musubi_blocks_to_swap=20", "gradient_checkpointing=false")
    assert_same_training(out, held_whole)
    assert memory_record(out)["block_swap"] == {"blocks": 20, "of": 22, "device": "cpu"}


def test_offload_to_disk_trains_the_same_lora_and_leaves_the_users_folder(flux, held_whole, tmp_path):
    """Groups spill into a temporary subfolder st creates and deletes when the run is over (the user's
    files stay); offload_during_save writes the same checkpoints (on the CPU it has nothing to move)."""
    import gc

    root, config = flux
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / "notes.txt").write_text("mine")
    out = tmp_path / "train"
    train(
        config,
        root / "cache",
        out,
        *SETS,
        "enable_group_offload=true",
        f'group_offload_to_disk_path="{spill}"',
        "offload_during_save=true",
        "checkpoint_step_interval=1",
    )
    gc.collect()
    assert_same_training(out, held_whole)
    record = memory_record(out)
    assert record["group_offload"]["to_disk"] is True
    assert record["offload_during_save"] is True
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in spill.iterdir()) == ["notes.txt"]
    assert (spill / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(("sets", "message"), [
    (("enable_group_offload=true", "musubi_blocks_to_swap=2"), "enable_group_offload and musubi_blocks_to_swap"),
    (("enable_group_offload=true", "gradient_checkpointing=false"), "enable_group_offload needs gradient_checkpointing"),
    (("enable_model_cpu_offload=true", "musubi_blocks_to_swap=2"), "enable_model_cpu_offload and musubi_blocks_to_swap"),
    (("musubi_blocks_to_swap=2", 'model_type="full"'), "with model_type full every weight trains"),
    (("enable_group_offload=true", "group_offload_use_stream=true"), "group_offload_use_stream needs a CUDA device"),
], ids=["offload-and-swap", "offload-without-checkpointing", "two-strategies", "full", "stream-on-cpu"])  # fmt: skip
def test_combinations_that_cannot_work_are_refused(flux, tmp_path, sets, message):
    """Refused before the model loads (a ConfigError: exit 2 with the message, no traceback)."""
    from pipeline.errors import ConfigError

    root, config = flux
    with pytest.raises(ConfigError, match=message):
        train(config, root / "cache", tmp_path / "train", *SETS, *sets)
    assert not (tmp_path / "train" / "manifest.json").exists()


@pytest.mark.parametrize(("sets", "message"), [
    (("enable_group_offload=true", "musubi_blocks_to_swap=2"), "enable_group_offload and musubi_blocks_to_swap"),
    (("ramtorch=true",), "ramtorch needs a CUDA or ROCm GPU"),
], ids=["offload-and-swap", "ramtorch-on-cpu"])  # fmt: skip
def test_st_train_refuses_them_before_loading_the_model(flux, tmp_path, sets, message):
    """`st train` exits 2 with the message before it looks at the model (a model path that does not exist would
    be the error otherwise) or writes anything."""
    missing = tmp_path / "no-such-model"
    done = run_st_train(flux, tmp_path / "train", *SETS, *sets, f'pretrained_model_name_or_path="{missing}"')
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "train").exists() or not any((tmp_path / "train").iterdir())


def test_leaf_level_hooks_every_frozen_layer_and_leaves_the_adapters_alone(tiny_model):
    """What the loss comparison above relies on: each frozen Linear / norm is its own offloaded group, while the
    LoRA layers have no hook, so their weights (the tensors the optimizer steps) are never copied or replaced."""
    import dataclasses

    import torch
    from diffusers import FluxTransformer2DModel
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    from pipeline.config import Config
    from pipeline.families import get_family
    from pipeline.train import adapters, offload
    from pipeline.train.options import AdapterOptions

    config = Config(model_family="flux", lora_rank=4, lora_dropout=0.0, gradient_checkpointing=True)
    denoiser = FluxTransformer2DModel.from_pretrained(tiny_model("flux") / "transformer")
    adapters.attach(denoiser, AdapterOptions.from_config(config), get_family("flux"))
    lora = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    storage = {n: p.data_ptr() for n, p in lora.items()}
    options = dataclasses.replace(offload.MemoryOptions.from_config(config), enable_group_offload=True,
                                  group_offload_type="leaf_level")  # fmt: skip
    memory = offload.hold(denoiser, options, "flux", torch.device("cpu"))

    def hooked(module) -> bool:
        registry = getattr(module, "_diffusers_hook", None)
        return registry is not None and registry.get_hook(_GROUP_OFFLOADING) is not None

    modules = dict(denoiser.named_modules())
    bases = [n for n in modules if n.endswith(".base_layer")]
    adapter_layers = [n for n in modules if n.rsplit(".", 1)[-1] == "default" and ".lora_" in n]
    assert bases and adapter_layers
    assert all(hooked(modules[n]) for n in bases)
    assert not any(hooked(modules[n]) for n in adapter_layers)
    assert memory.record()["group_offload"]["groups"] == sum(hooked(m) for m in modules.values())
    assert {n: p.data_ptr() for n, p in lora.items()} == storage
