"""Denoisers with a fixed grid of positional embeddings (SD3, AuraFlow, Lumina 2's RoPE tables) take images up to a
size: st refuses a larger bucket or validation size when training starts, naming the size and the limit, instead
of failing (SD3) or silently reading the wrong embeddings (AuraFlow) in the middle of training."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.families import get_family
from pipeline.families.limits import check_image_sizes, max_image_side, vae_scale_factor
from tests.helpers.training import run_st_train

# The denoiser configs of the real models (their transformer/config.json), as far as the limit goes.
SD3_MEDIUM = {"pos_embed_max_size": 192, "patch_size": 2}
AURAFLOW_V01 = {"pos_embed_max_size": 4096, "patch_size": 2}
LUMINA2 = {"axes_lens": [300, 512, 512], "patch_size": 2}


@pytest.mark.parametrize(("family", "config", "pixels"), [
    ("sd3", SD3_MEDIUM, 3072), ("auraflow", AURAFLOW_V01, 1024), ("lumina2", LUMINA2, 8192),
])  # fmt: skip
def test_real_models_limits(family, config, pixels):
    side, why = max_image_side(get_family(family), config, 8)
    assert side == pixels and str(config["patch_size"]) in why
    check_image_sizes(get_family(family), config, 8, [f"{pixels}x{pixels // 2}"])
    with pytest.raises(ConfigError) as info:
        check_image_sizes(get_family(family), config, 8, ["1024x1024", f"{pixels // 2}x{pixels + 16}"])
    message = str(info.value)
    assert f"bucket {pixels // 2}x{pixels + 16}" in message and f"at most {pixels} px" in message
    assert "resolution" in message and "st prepare" in message


def test_validation_size_is_checked_and_unlimited_families_take_any_size():
    with pytest.raises(ConfigError, match=r"validation_resolution 3088x1024 .* at most 3072 px"):
        check_image_sizes(get_family("sd3"), SD3_MEDIUM, 8, ["1024x1024"], [(3088, 1024)])
    check_image_sizes(get_family("flux"), {"patch_size": 1}, 8, ["8192x8192"], [(8192, 8192)])


def test_tiny_models_fit_the_demo_and_read_their_vae_factor(tiny_model):
    family = get_family("sd3")
    folder = tiny_model("sd3")
    assert vae_scale_factor(family, folder) == 2
    config = family.denoiser.load_class().load_config(folder, subfolder="transformer")
    side, _ = max_image_side(family, config, 2)
    assert side >= 256  # `make demo`'s buckets reach 192 px a side


def test_st_train_refuses_a_validation_size_beyond_the_model(cached, tmp_path):
    """The tiny SD3 takes at most 384 px a side: a larger validation_resolution stops `st train` before step 1."""
    done = run_st_train(cached("sd3"), tmp_path / "train", 'validation_resolution="512x256"')
    assert done.returncode == 2, done.stderr
    assert "validation_resolution 512x256" in done.stderr and "at most 384 px" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "train" / "metrics.jsonl").exists()
