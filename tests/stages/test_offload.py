"""Memory options on a tiny Flux (CPU): group offloading and block swap train the same LoRA as a run that holds the
whole denoiser; offload_during_save writes the same checkpoint; the manifest says how the denoiser was held; options
a CPU cannot honour, and combinations that cannot work, stop with exit 2 naming them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers.training import WEIGHTS, losses, train

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
                                         "model_cpu_offload": False}  # fmt: skip


def test_group_offload_trains_the_same_lora(flux, held_whole, tmp_path):
    root, config = flux
    out = tmp_path / "train"
    train(config, root / "cache", out, *SETS, "enable_group_offload=true", "group_offload_blocks_per_group=2")
    assert_same_training(out, held_whole)
    assert memory_record(out)["group_offload"] == {"type": "block_level", "groups": 13, "blocks_per_group": 2,
                                                   "use_stream": False, "to_disk": False}  # fmt: skip


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
