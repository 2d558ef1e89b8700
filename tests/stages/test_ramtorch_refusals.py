"""`ramtorch_text_encoder` and `ramtorch_vae` on a machine without CUDA: a real `st cache` and a real `st train` stop
with exit 2 and a message naming the option, before any model loads or anything is written."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.helpers.training import ST, run_st_train, st_env

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")


@pytest.fixture(scope="module")
def flux(cached):
    return cached("flux")


def test_st_cache_refuses_ramtorch_text_encoder_without_a_gpu(flux, tmp_path):
    root, config = flux
    out = tmp_path / "cache"
    done = subprocess.run([ST, "cache", "-c", str(config), "-i", str(root / "prepare"), "-o", str(out),
                           "--set", "ramtorch=true", "--set", "ramtorch_text_encoder=true"],
                          env=st_env(), capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "ramtorch_text_encoder needs a CUDA or ROCm GPU" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() or not any(out.iterdir())


def test_st_train_refuses_ramtorch_vae_before_loading_the_model(flux, tmp_path):
    """A model path that does not exist would be the error if the model were looked at first."""
    out = tmp_path / "train"
    missing = tmp_path / "no-such-model"
    done = run_st_train(flux, out, "ramtorch=true", "ramtorch_vae=true", 'mixed_precision="no"',
                        f'pretrained_model_name_or_path="{missing}"')  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "ramtorch and ramtorch_vae need a CUDA or ROCm GPU" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() or not any(out.iterdir())
