"""`st train` on tiny models of every family: LoRA and full, exact resume, learning, validation and tracking."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError, LineageError
from pipeline.families import FAMILIES, get_family
from pipeline.manifest import read_manifest
from pipeline.train.stage import run_train
from tests.helpers.training import QUICK, train



@pytest.mark.parametrize("model_type", ["lora", "full"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains(cached, tmp_path, family, model_type):
    root, config = cached(family)
    result = train(config, root / "cache", tmp_path / "out", f'model_type="{model_type}"')
    manifest = read_manifest(tmp_path / "out")
    assert manifest["metrics"]["steps"] == 2 and manifest["family"] == family
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in lines if "loss" in line]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(set(line) >= {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_s"} for line in lines)
    assert all(line["loss"] == line["loss"] and line["loss"] > 0 for line in lines)
    if model_type == "lora":
        from safetensors.torch import load_file

        weights = load_file(str(tmp_path / "out" / "final" / "pytorch_lora_weights.safetensors"))
        assert weights and all(k.startswith(("unet.", "transformer.")) and "lora" in k for k in weights)
    else:
        folder = tmp_path / "out" / "final" / get_family(family).denoiser.subfolder
        assert (folder / "config.json").is_file()
        assert list(folder.glob("*.safetensors"))
    assert result.manifest["final"]["format"] == ("lora" if model_type == "lora" else "diffusers")


def test_resume_is_exact(cached, tmp_path):
    """3 steps, then a resume to 6 in a process of its own (same thread count: OMP_NUM_THREADS is inherited),
    equal an uninterrupted 6-step run."""
    root, config = cached("sd1x")
    sets = ["checkpoint_step_interval=3", "lora_dropout=0.1", "caption_dropout_probability=0.3"]
    straight = tmp_path / "straight"
    train(config, root / "cache", straight, *sets, "max_train_steps=6")
    resumed = tmp_path / "resumed"
    train(config, root / "cache", resumed, *sets, "max_train_steps=3")
    options = [*QUICK, *sets, "max_train_steps=6", 'resume_from_checkpoint="latest"']
    proc = subprocess.run([str(Path(sys.executable).with_name("st")), "train", "-c", str(config), "-i",
                           str(root / "cache"), "-o", str(resumed), *[a for o in options for a in ("--set", o)]],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stderr and "checkpoint-3 at step 3" in proc.stderr

    def losses(folder):
        records = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    assert {s: v for s, v in losses(resumed).items() if s > 3} == {s: v for s, v in losses(straight).items() if s > 3}
    a = (straight / "final" / "pytorch_lora_weights.safetensors").read_bytes()
    b = (resumed / "final" / "pytorch_lora_weights.safetensors").read_bytes()
    assert a == b


def test_missing_checkpoint_is_an_error_not_a_fresh_start(cached, tmp_path):
    root, config = cached("sd1x")
    with pytest.raises(InputError, match="no checkpoint at .*nowhere"):
        train(config, root / "cache", tmp_path / "out", 'resume_from_checkpoint="nowhere"')
    run = train(config, root / "cache", tmp_path / "out2", "checkpoint_step_interval=1")
    damaged = tmp_path / "out2" / "checkpoints" / "checkpoint-1" / "weights.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"\0" * 8)
    from pipeline.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="checkpoint-1 is damaged: weights.safetensors"):
        train(config, root / "cache", tmp_path / "out2", "max_train_steps=3",
              f'resume_from_checkpoint="{damaged.parent}"')  # fmt: skip
    assert run.manifest is not None


def test_eval_loss_drops_when_fitting_eight_images(cached, tmp_path):
    root, config = cached("sd1x")
    result = run_train(
        load_config(config, ["validation_disable=true", "disable_benchmark=true", 'report_to="none"',
                             'model_type="full"', "learning_rate=1e-3", "max_train_steps=20", "train_batch_size=2",
                             "eval_steps_interval=10", "num_eval_images=8", 'optimizer="optimi-adamw"']),
        root / "cache", tmp_path / "out",
    )  # fmt: skip
    metrics = result.manifest["metrics"]
    assert metrics["final_eval_loss"] <= 0.7 * metrics["first_eval_loss"], metrics


def test_validation_images_and_tensorboard_events(cached, tmp_path):
    root, config = cached("sd1x")
    sets = ["validation_disable=false", "disable_benchmark=false", 'report_to="tensorboard"',
            'validation_resolution="64,96x64"', "validation_num_inference_steps=2", "validation_step_interval=1"]
    run_train(load_config(config, [*QUICK, *sets]), root / "cache", tmp_path / "out")
    validation = tmp_path / "out" / "validation"
    assert sorted(p.name for p in validation.iterdir()) == ["base", "step-1", "step-2"]
    names = sorted(p.name for p in (validation / "step-2").iterdir())
    assert names == ["grid.png", "validation-64x64-0.png", "validation-96x64-0.png"]
    from PIL import Image

    with Image.open(validation / "step-2" / "validation-96x64-0.png") as img:
        assert img.size == (96, 64)
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))


def test_up_to_date_and_lineage(cached, tmp_path):
    root, config = cached("sd1x")
    first = train(config, root / "cache", tmp_path / "out")
    again = train(config, root / "cache", tmp_path / "out")
    assert again.up_to_date and again.manifest["digest"] == first.manifest["digest"]
    other = tmp_path / "other-model"
    get_family("sd1x").tiny(other, 1)
    with pytest.raises(LineageError, match="VAE .* differs from the model given"):
        train(config, root / "cache", tmp_path / "out3", f'pretrained_model_name_or_path="{other}"')
    with pytest.raises(LineageError, match="cached for model_family 'sd1x'"):
        train(config, root / "cache", tmp_path / "out4", 'model_family="sd2x"')


def test_bad_batch_size_and_prompt_errors(cached, tmp_path):
    root, config = cached("sd1x")
    with pytest.raises(InputError, match=r"train_batch_size 64 .* larger than every bucket \(shapes/"):
        train(config, root / "cache", tmp_path / "out", "train_batch_size=64")
    with pytest.raises(ConfigError, match="validation prompt 'a prompt never cached' has no embeddings"):
        train(config, root / "cache", tmp_path / "out", "validation_disable=false",
              'validation_prompt="a prompt never cached"')  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# pixart_sigma: a transformer family whose forward reads the model's config (through the DDP wrapper's view).
@pytest.mark.parametrize("family", ["sd1x", "pixart_sigma"])
def test_two_processes_train_disjoint_data_and_end_identical(cached, tmp_path, family):
    root, config = cached(family)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    proc = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "pipeline.cli", "train", "-c",
         str(config), "-i", str(root / "cache"), "-o", str(tmp_path / "out"), *sum((["--set", s] for s in QUICK), []),
         "--set", "max_train_steps=3", "--set", "num_processes=2"],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = {r: [json.loads(x) for x in (tmp_path / "out" / "logs" / f"data-rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}  # fmt: skip
    for step in (1, 2, 3):
        keys = [set(next(x for x in logs[r] if x.get("step") == step and "keys" in x)["keys"]) for r in (0, 1)]
        assert keys[0] and keys[1] and not keys[0] & keys[1]
    digests = [next(x["weights_sha256"] for x in logs[r] if "weights_sha256" in x) for r in (0, 1)]
    assert digests[0] == digests[1]
    assert read_manifest(tmp_path / "out")["provenance"]["processes"] == 2
