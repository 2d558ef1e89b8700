"""A Wan model trained on a cache built for the other kind of Wan model, through `st train` in its own process (the
tiny text-to-video and image-to-video folders share their VAE and UMT5, as the real Wan 2.1 T2V and I2V models do,
so the cache's lineage holds): the text-to-video model trains on an image-to-video cache with one warning that the
cached first frames go unused; the image-to-video model on a text-to-video cache exits 2 before its first step,
naming the missing first-frame conditioning and `st cache` with the image-to-video model."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers.training import ST, st_env

SETS = ("train_batch_size=1", 'mixed_precision="no"', "validation_disable=true", "max_train_steps=1",
        'report_to="none"', "disable_benchmark=true", "eval_steps_interval=null")  # fmt: skip


def _train(config, cache, out, model) -> subprocess.CompletedProcess:
    sets = [item for s in (*SETS, f'pretrained_model_name_or_path="{model}"') for item in ("--set", s)]
    return subprocess.run([ST, "train", "-c", str(config), "-i", str(cache), "-o", str(out), *sets], env=st_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def i2v_clips(tmp_path_factory, tiny_model):
    """(root, config) of the sample clips prepared and cached for the tiny Wan 2.1 image-to-video folder."""
    from tests.helpers.wan import sample_clips

    root = tmp_path_factory.mktemp("wan-i2v-clips")
    return root, sample_clips(root, tiny_model("wan", flavour="i2v"))


def test_a_text_to_video_model_trains_on_an_image_to_video_cache_with_a_warning(i2v_clips, tiny_model, tmp_path):
    root, config = i2v_clips
    t2v = tiny_model("wan")
    for part in ("vae", "text_encoder"):  # what the cache's lineage compares: the same weights in both folders
        assert sorted(p.read_bytes() for p in (t2v / part).iterdir()) == \
            sorted(p.read_bytes() for p in (tiny_model("wan", flavour="i2v") / part).iterdir())  # fmt: skip
    done = _train(config, root / "cache", tmp_path / "run", t2v)
    assert done.returncode == 0, done.stderr[-3000:]
    message = " ".join(done.stderr.split())
    assert ("dataset(s) clips were cached for a Wan image-to-video model (WanImageToVideoPipeline" in message and
            "this run trains WanPipeline (text-to-video), which takes no image: the cached first frames are unused"
            in message), message[-3000:]  # fmt: skip
    assert message.count("cached first frames are unused") == 1
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file(), manifest


def test_an_image_to_video_model_on_a_text_to_video_cache_exits_2_naming_the_fix(wan_clips, tiny_model, tmp_path):
    root, config = wan_clips  # cached for the tiny text-to-video folder
    done = _train(config, root / "cache", tmp_path / "run", tiny_model("wan", flavour="i2v"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert ("video dataset(s) clips of this cache have no first-frame conditioning" in message and
            "which WanImageToVideoPipeline trains on: the cache was built for a text-to-video model; re-run `st "
            "cache` with this run's image-to-video model" in message), message[-3000:]  # fmt: skip
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
