"""The dtype of text encoders trained with `train_text_encoder`: SimpleTuner's `weight_dtype` (bf16 under
mixed_precision bf16, fp32 under `no`) for their frozen weights, their LoRA and (model_type full) all their weights,
in memory, in checkpoints and in the published LoRA file; a bf16 run resumes exactly."""

from __future__ import annotations

import subprocess

import pytest

from pipeline.config import load_config
from pipeline.publish.lora import load_tensors
from pipeline.train.text_encoders import TextEncoderOptions, TextEncoders, encoder_dtypes
from tests.helpers.training import QUICK, WEIGHTS, cached_dataset, st_train_args, train

TE_OPTIONS = {"--train_text_encoder": True, "--learning_rate": 0.05, "--lora_rank": 4, "--lora_dropout": 0,
              "--caption_dropout_probability": 0, "--cache_dtype": "fp32", "--seed": 7}  # fmt: skip


@pytest.fixture(scope="module")
def te_cached(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("te-dtype")
    return root, cached_dataset(root, "sd1x", tiny_model("sd1x"), images=2, **TE_OPTIONS)


def test_encoder_dtypes_follow_simpletuners_weight_dtype():
    assert encoder_dtypes("bf16", full=False) == ("bfloat16", "bfloat16")
    assert encoder_dtypes("bf16", full=True) == ("bfloat16", "bfloat16")
    assert encoder_dtypes("no", full=False) == ("float32", "float32")
    assert encoder_dtypes("no", full=True) == ("float32", "float32")
    # DEVIATION (as the denoiser's adapters): fp16 trains fp32 weights; a LoRA's frozen base stays fp16.
    assert encoder_dtypes("fp16", full=False) == ("float16", "float32")
    assert encoder_dtypes("fp16", full=True) == ("float32", "float32")


@pytest.mark.parametrize("precision, model_type, dtype", [("bf16", "lora", "bfloat16"), ("no", "lora", "float32"),
                                                          ("bf16", "full", "bfloat16"), ("no", "full", "float32")])
def test_the_encoders_are_held_in_the_training_dtype(te_cached, tiny_model, precision, model_type, dtype):
    import torch

    from pipeline.families import get_family

    _, config = te_cached
    loaded = load_config(config, [f'mixed_precision="{precision}"', f'model_type="{model_type}"'])
    encoders = TextEncoders(get_family("sd1x"), str(tiny_model("sd1x")), TextEncoderOptions.from_config(loaded.config),
                            "cpu")  # fmt: skip
    (encoder,) = encoders.encoders
    floats = {n: p.dtype for n, p in encoder.named_parameters() if p.is_floating_point()}
    assert set(floats.values()) == {getattr(torch, dtype)}
    trained = encoders.parameters()
    assert trained and all(p.dtype == getattr(torch, dtype) for p in trained)
    if model_type == "lora":
        assert all("lora_" in n for n, p in encoder.named_parameters() if p.requires_grad)


def _encoder_tensors(path):
    return {k: v for k, v in load_tensors(path).items() if k.startswith("text_encoder.")}


def test_a_bf16_run_trains_bf16_encoders_and_resumes_exactly(te_cached, tmp_path):
    """2 bf16 steps (adamw_bf16: stochastic rounding of the bf16 LoRA) equal 1 step plus a resume to 2 in an `st`
    process of its own, byte for byte; the encoders' LoRA is bf16 in the checkpoint and the LoRA file, and moved."""
    import torch

    root, config = te_cached
    sets = ['mixed_precision="bf16"', "checkpoint_step_interval=1"]
    straight = tmp_path / "straight"
    train(config, root / "cache", straight, *sets)
    final = _encoder_tensors(straight / WEIGHTS)
    assert final and {v.dtype for v in final.values()} == {torch.bfloat16}
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in final.items())  # it trained
    checkpoint = load_tensors(straight / "checkpoints" / "checkpoint-1" / "weights.safetensors")
    assert {v.dtype for k, v in checkpoint.items() if k.startswith("text_encoder.")} == {torch.bfloat16}
    resumed = tmp_path / "resumed"
    train(config, root / "cache", resumed, *sets, "max_train_steps=1")
    args = st_train_args((root, config), resumed, *QUICK, *sets, 'resume_from_checkpoint="latest"')
    proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint-1 at step 1" in proc.stderr
    assert (straight / WEIGHTS).read_bytes() == (resumed / WEIGHTS).read_bytes()


def test_a_run_without_mixed_precision_keeps_fp32_encoders(te_cached, tmp_path):
    import torch

    root, config = te_cached
    train(config, root / "cache", tmp_path / "out", 'mixed_precision="no"')
    final = _encoder_tensors(tmp_path / "out" / WEIGHTS)
    assert final and {v.dtype for v in final.values()} == {torch.float32}
