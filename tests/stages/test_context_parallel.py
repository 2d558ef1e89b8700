"""Context parallelism (context_parallel_size 2): two `accelerate launch` CPU processes (gloo) share each sample's
video tokens and train the tiny Wan model to the LoRA a single process trains on the same data - the same batches,
noise and timesteps, the same losses and weights up to float rounding. The run asks for allgather, as SimpleTuner's
Wan i2v examples do, which st runs as Ulysses all-to-all attention, exactly what alltoall runs. Flux, Qwen-Image and
FLUX.2 are checked the same way on two images, LTX-Video (st's own plan) on two clips, text-to-video and
image-to-video."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from tests.helpers.training import QUICK, WEIGHTS, cached_dataset, train

SETS = ("max_train_steps=3", "learning_rate=0.01", "lora_dropout=0.0", "caption_dropout_probability=0.0",
        'mixed_precision="no"')  # fmt: skip
VALIDATION = ("validation_disable=false", "validation_num_video_frames=5", 'validation_resolution="32"',
              "validation_num_inference_steps=2")
CP = ("num_processes=2", "context_parallel_size=2", 'context_parallel_comm_strategy="allgather"')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def wan(tmp_path_factory, tiny_model):
    """Two generated clips prepared and cached for the tiny Wan model (2 heads, so 1 per process under Ulysses)."""
    from pipeline.cache.stage import run_cache
    from pipeline.prepare.stage import run_prepare
    from pipeline.sampledata import write_sample_dataset

    root = tmp_path_factory.mktemp("wan-cp")
    config = write_sample_dataset(root / "data", family="wan", model=tiny_model("wan"), videos=2)
    loaded = load_config(config)
    run_prepare(loaded, root / "prepare")
    run_cache(loaded, root / "prepare", root / "cache")
    return root, config


def _launch(root: Path, config: Path, out: Path, *sets: str) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    options = [item for s in (*QUICK, *SETS, *sets) for item in ("--set", s)]
    return subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "pipeline.cli", "train", "-c",
         str(config), "-i", str(root / "cache"), "-o", str(out), *options],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_two_processes_sharing_each_sample_train_the_single_process_lora(wan, tmp_path):
    root, config = wan
    single = tmp_path / "single"
    train(config, root / "cache", single, *SETS)
    split = tmp_path / "cp"
    # gradient checkpointing on: each block's recomputed forward repeats its all-to-alls in the backward
    # Gradient checkpointing on: each block's recomputed forward repeats its all-to-alls in the backward. The
    # validation at the end renders on the main process alone, with the CP hooks lifted.
    proc = _launch(root, config, split, *CP, "gradient_checkpointing=true", *VALIDATION)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (split / "validation" / "step-3" / "validation-32x32-0.mp4").is_file()
    assert "context_parallel_comm_strategy allgather: st runs Ulysses all-to-all attention" in proc.stdout + proc.stderr

    # One replica: both processes trained on the single run's batches, in its order.
    ranks = {r: [json.loads(x) for x in (split / "logs" / f"data-rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)}  # fmt: skip
    alone = [json.loads(x) for x in (single / "logs" / "data-rank0.jsonl").read_text().splitlines()]
    keys = {r: [x["keys"] for x in ranks[r] if "keys" in x] for r in (0, 1)}
    assert keys[0] == keys[1] == [x["keys"] for x in alone if "keys" in x]
    digests = [next(x["weights_sha256"] for x in ranks[r] if "weights_sha256" in x) for r in (0, 1)]
    assert digests[0] == digests[1], "the processes of one context-parallel group ended with different weights"

    # Measured: losses and gradient norms agree to ~2e-7 relative (the gradient norm would halve if DDP's mean over
    # both processes were not compensated); the LoRA weights to 2.3e-5 absolute (of values up to 0.22), the largest
    # in the cross-attention keys, whose tiny gradients AdamW's normalisation turns into full-size steps.
    expected, got = _metrics(single), _metrics(split)
    assert sorted(got) == [1, 2, 3]
    for step, (loss, norm) in expected.items():
        assert got[step][0] == pytest.approx(loss, rel=1e-5), step
        assert got[step][1] == pytest.approx(norm, rel=1e-5), step
    a, b = load_file(single / WEIGHTS), load_file(split / WEIGHTS)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_model):
    """`cached(family)`: two generated images (96 px) prepared and cached for that family's tiny model."""
    built: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in built:
            built[family] = cached_dataset(tmp_path_factory.mktemp(f"{family}-cp"), family, tiny_model(family),
                                           images=2)  # fmt: skip
        return built[family]

    return build


FAMILIES = ("flux", "qwen_image", "flux2")


@pytest.mark.parametrize("family", FAMILIES)
def test_other_families_split_text_and_image_tokens_and_train_the_single_process_lora(family, cached, tmp_path):
    """The plans split the image tokens and the text tokens with what goes with them (Flux: both position ids, 2-D;
    FLUX.2 [klein]: both, 3-D; Qwen-Image: the text mask and the RoPE tables, st pads the text - of odd length here - to
    a multiple of the group); pooled text, guidance and timesteps stay whole. Two steps with context_parallel_size 2
    match one process (no gradient checkpointing, no validation: the Wan test covers those)."""
    config = cached(family)
    root = config.parent.parent
    sets = ("max_train_steps=2", "learning_rate=0.01", "lora_dropout=0.0", "caption_dropout_probability=0.0",
            'mixed_precision="no"')  # fmt: skip
    single = tmp_path / "single"
    train(config, root / "cache", single, *sets)
    split = tmp_path / "cp"
    proc = _launch(root, config, split, *sets, "num_processes=2", "context_parallel_size=2",
                   'context_parallel_comm_strategy="alltoall"')  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    expected, got = _metrics(single), _metrics(split)
    assert sorted(got) == [1, 2]
    for step, (loss, norm) in expected.items():
        assert got[step][0] == pytest.approx(loss, rel=1e-5), step
        assert got[step][1] == pytest.approx(norm, rel=1e-5), step
    a, b = load_file(single / WEIGHTS), load_file(split / WEIGHTS)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)


@pytest.fixture(scope="module")
def ltx(tmp_path_factory, tiny_model):
    """Two generated 9-frame clips (two latent frames; video.is_i2v, st prepare's default for ltxvideo) prepared and
    cached for the tiny LTX-Video model."""
    from pipeline.cache.stage import run_cache
    from pipeline.prepare.stage import run_prepare
    from pipeline.sampledata import write_sample_dataset

    root = tmp_path_factory.mktemp("ltxvideo-cp")
    config = write_sample_dataset(root / "data", family="ltxvideo", model=tiny_model("ltxvideo"), videos=2)
    datasets = json.loads((root / "data" / "multidatabackend.json").read_text())
    datasets[0]["video"] = {"num_frames": 9, "min_frames": 9}
    (root / "data" / "multidatabackend.json").write_text(json.dumps(datasets))
    loaded = load_config(config)
    run_prepare(loaded, root / "prepare")
    run_cache(loaded, root / "prepare", root / "cache")
    return root, config


I2V = ('ltx_train_mode="i2v"', "ltx_i2v_prob=1.0", "ltx_partial_noise_fraction=0.5")


@pytest.mark.parametrize("mode", [('ltx_train_mode="t2v"',),
                                  (*I2V, "gradient_checkpointing=true", "validation_disable=false",
                                   "validation_num_video_frames=9", 'validation_resolution="32"',
                                   "validation_num_inference_steps=2")],
                         ids=("t2v", "i2v"))  # fmt: skip
def test_ltxvideo_splits_the_video_tokens_keeps_the_text_whole_and_trains_the_single_process_lora(mode, ltx,
                                                                                                     tmp_path):
    """LTX-Video trains with st's plan: the video tokens, their RoPE tables and (i2v: the first latent frame gets
    less noise and its own timestep) the per-token timesteps split; the T5 text and its mask stay whole, and each
    process's cross-attention attends its query shard to all of it. Two steps match one process (i2v: with gradient
    checkpointing, and a validation video rendered on the main process alone at the end).
    Measured: losses and gradient norms equal to 7e-8 relative, the LoRA weights to 9e-7 absolute (of values up to
    0.26); diffusers' own LTX plan, or the cross-attention left to Ulysses, stops at its first step (the text mask
    does not broadcast), and per-token timesteps left whole do not match the split tokens."""
    root, config = ltx
    sets = ("max_train_steps=2", "learning_rate=0.01", "lora_dropout=0.0", "caption_dropout_probability=0.0",
            'mixed_precision="no"', *mode)  # fmt: skip
    single = tmp_path / "single"
    train(config, root / "cache", single, *sets)
    split = tmp_path / "cp"
    proc = _launch(root, config, split, *sets, "num_processes=2", "context_parallel_size=2",
                   'context_parallel_comm_strategy="alltoall"')  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    if "validation_disable=false" in mode:
        assert (split / "validation" / "step-2" / "validation-32x32-0.mp4").is_file()
    expected, got = _metrics(single), _metrics(split)
    assert sorted(got) == [1, 2]
    for step, (loss, norm) in expected.items():
        assert got[step][0] == pytest.approx(loss, rel=1e-5), step
        assert got[step][1] == pytest.approx(norm, rel=1e-5), step
    a, b = load_file(single / WEIGHTS), load_file(split / WEIGHTS)
    assert a.keys() == b.keys() and any(".attn2." in name for name in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)


def _metrics(out: Path) -> dict[int, tuple[float, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records if r.get("loss") is not None}


def test_a_world_that_context_parallel_size_does_not_divide_is_refused(cli, wan, tmp_path):
    root, config = wan
    result = cli("check", "--config", str(config), "--set", "num_processes=3", "--set", "context_parallel_size=2",
                 "--set", 'context_parallel_comm_strategy="alltoall"')  # fmt: skip
    assert result.exit_code != 0
    assert "context_parallel_size 2 must divide the 3 process(es)" in result.output
