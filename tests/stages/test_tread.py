"""`st train` with TREAD token routing (`tread_config`) on the tiny Flux: the manifest records the routes, the run
differs from one without routing, a run stopped after step 1 and resumed by another `st train` process ends with
the same losses and bytes as the uninterrupted one (the router's generator is in the checkpoint), and a route
past the model's last block stops with exit 2."""

from __future__ import annotations

import math
import subprocess

import pytest

from pipeline.manifest import read_manifest
from tests.helpers.training import QUICK, WEIGHTS, losses, st_train_args, train

TREAD = "tread_config={routes=[{selection_ratio=0.5,start_layer_idx=2,end_layer_idx=-2}]}"
SETS = ("learning_rate=0.01", "lora_dropout=0", "caption_dropout_probability=0", 'mixed_precision="no"',
        "checkpoint_step_interval=1", "max_train_steps=2", "seed=7")  # fmt: skip


@pytest.fixture(scope="module")
def flux_run(cached, tmp_path_factory):
    """2 steps of a Flux LoRA with one route over blocks 2..-2, a checkpoint after each."""
    root, config = cached("flux")
    out = tmp_path_factory.mktemp("tread") / "straight"
    train(config, root / "cache", out, *SETS, TREAD)
    return root, config, out


def test_the_manifest_records_the_routes_and_routing_changes_training(flux_run, tmp_path):
    root, config, out = flux_run
    stats = read_manifest(out / "manifest.json")["stats"]
    assert stats["tread"] == {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": 20}],
                              "blocks": 22, "seed": 7}  # fmt: skip
    plain = tmp_path / "plain"
    train(config, root / "cache", plain, *SETS, "max_train_steps=1")
    assert read_manifest(plain / "manifest.json")["stats"]["tread"] is None
    assert losses(plain)[1] != losses(out)[1]


def test_resume_in_another_process_is_exact(flux_run, tmp_path):
    root, config, out = flux_run
    resumed = tmp_path / "resumed"
    train(config, root / "cache", resumed, *SETS, TREAD, "max_train_steps=1")
    # The same thread count as this process (OMP_NUM_THREADS is inherited): CPU results are bitwise equal only so.
    proc = subprocess.run(st_train_args((root, config), resumed, *QUICK, *SETS, TREAD,
                                        'resume_from_checkpoint="latest"'),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert losses(resumed) == losses(out)
    assert (resumed / WEIGHTS).read_bytes() == (out / WEIGHTS).read_bytes()


def test_a_route_past_the_last_block_stops_with_exit_2(flux_run, cli, tmp_path):
    root, config, _ = flux_run
    sets = [item for s in (*QUICK, TREAD.replace("-2", "30")) for item in ("--set", s)]
    result = cli("train", "-c", config, "-i", root / "cache", "-o", tmp_path / "far", *sets)
    assert result.exit_code == 2
    assert "tread_config routes[0] (2..30) is outside the model's 22 transformer blocks" in result.output
    assert not (tmp_path / "far" / "manifest.json").exists()


def test_flux2_trains_with_the_examples_route(cached, tmp_path):
    """SimpleTuner's flux2.peft-lora+TREAD example routes blocks 2..-2 at 0.5; the tiny FLUX.2 [klein] has 1 double
    + 2 single blocks, so the route here is 1..-1 (its kept tokens cross into the single blocks), against a run
    without it."""
    root, config = cached("flux2")
    sets = ("learning_rate=0.01", "lora_dropout=0", "caption_dropout_probability=0", 'mixed_precision="no"',
            "max_train_steps=1", "seed=7")  # fmt: skip
    routed, plain = tmp_path / "routed", tmp_path / "plain"
    train(config, root / "cache", routed, *sets,
          "tread_config={routes=[{selection_ratio=0.5,start_layer_idx=1,end_layer_idx=-1}]}")
    train(config, root / "cache", plain, *sets)
    assert read_manifest(routed / "manifest.json")["stats"]["tread"] == {
        "routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 2}], "blocks": 3, "seed": 7}
    assert losses(routed)[1] != losses(plain)[1]


@pytest.mark.parametrize(("family", "blocks"), [("chroma", 3), ("auraflow", 2), ("qwen_image", 2), ("z_image", 1)])
def test_one_step_routes_through_the_familys_own_prediction(cached, tmp_path, family, blocks):
    """One step with a route over the last block(s) (every one but the first, where there are several), through the
    family's real denoiser call (Chroma's text mask, AuraFlow's register tokens, Qwen-Image's complex rotary tables,
    Z-Image's image + caption sequence): the manifest records it, the loss is finite."""
    root, config = cached(family)
    out = tmp_path / family
    start = min(1, blocks - 1)
    train(config, root / "cache", out, 'mixed_precision="no"', "max_train_steps=1", "seed=7",
          f"tread_config={{routes=[{{selection_ratio=0.5,start_layer_idx={start},end_layer_idx=-1}}]}}")
    assert read_manifest(out / "manifest.json")["stats"]["tread"]["blocks"] == blocks
    assert math.isfinite(losses(out)[1])
