"""The Wan 2.1 first/last-frame-to-video chain (model_flavour flf2v-14b-2.1 on a tiny FLF2V folder): prepare -> cache
(each clip's first and last frames and their condition latents stored beside the clip) -> train a LoRA 2 steps
(validation rendered from the first training clip's first and last frames, both saved beside the video) -> publish
-> the LoRA loads into WanImageToVideoPipeline and changes the video it renders with `last_image`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.families import wan_i2v
from pipeline.manifest import read_manifest
from pipeline.publish.stage import run_publish
from tests.helpers.wan import FRAMES, SETS, cached_samples, render_lora, run_losses, trained_run, video_frames

# The Wan chain's exact-resume test (1 step + resume == 2 steps, byte for byte), collected here on this module's
# FLF2V `chain`.
from tests.stages.test_wan import test_lora_resumes_exactly  # noqa: F401


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("wan", flavour="flf2v")


@pytest.fixture(scope="module")
def chain(tmp_path_factory, model):
    """Two generated clips prepared and cached for the tiny FLF2V model, and a 2-step LoRA run over them that
    validates at step 2 (root, config, run folder)."""
    root = tmp_path_factory.mktemp("wan-flf2v-chain")
    config, run = trained_run(root, model, wan_i2v.FLF2V_FLAVOUR, *SETS)
    return root, config, run


def _samples(root: Path):
    return cached_samples(root / "cache")


def _image(pixels):
    from PIL import Image

    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def test_cache_stores_each_clips_first_and_last_frames_and_their_condition_latents(chain, wan_pipeline):
    """Beside each clip's latents: its first and last frames (uint8, the bucket's size), the condition latents and
    the CLIP tokens of both frames, equal to what WanImageToVideoPipeline builds from them as `image` and
    `last_image` (`prepare_latents`, `encode_image([image, last_image])`)."""
    root, _, _ = chain
    pipe = wan_pipeline("flf2v", "WanImageToVideoPipeline")
    samples = _samples(root)
    assert len(samples) == 2
    for sample in samples:
        (partner,) = sample.meta["conditioning"]
        assert partner["dataset_id"] == "clips_flf2v_frames" and partner["kind"] == "reference_strict"
        stored = sample.conditioning
        assert sorted(stored) == ["0.image_embeds", "0.last_pixels", "0.latent", "0.pixels"]
        first, last, condition = stored["0.pixels"], stored["0.last_pixels"], stored["0.latent"]
        width, height = sample.meta["target_size"]
        assert last.dtype == torch.uint8 and tuple(last.shape) == (3, height, width)
        assert not torch.equal(first, last)  # the square has moved
        frames = 1 + 4 * (sample.latent.shape[1] - 1)
        pixels = [pipe.video_processor.preprocess(_image(p), height=height, width=width).float() for p in (first, last)]
        _, expected = pipe.prepare_latents(pixels[0], 1, 16, height, width, frames, torch.float32, torch.device("cpu"),
                                           None, None, pixels[1])  # fmt: skip
        assert condition.shape == sample.latent.shape and condition.dtype == sample.latent.dtype
        torch.testing.assert_close(condition, expected[0, 4:].to(condition.dtype), rtol=1e-2, atol=1e-2)
        with torch.no_grad():
            tokens = pipe.encode_image([_image(first), _image(last)], torch.device("cpu"))  # 2 x T x dim
        assert stored["0.image_embeds"].shape == (34, 16) and stored["0.image_embeds"].dtype == condition.dtype
        assert torch.equal(stored["0.image_embeds"], tokens.reshape(34, 16).to(condition.dtype))


def test_shard_checks_accept_the_last_frame_and_refuse_a_wrong_one(chain):
    """The reader's structure checks take `0.last_pixels` (uint8 at the bucket's size, of a listed partner), and
    refuse one of another shape or of no listed conditioning image."""
    from pipeline.errors import InputError
    from pipeline.shardformat.checks import CacheChecks
    from pipeline.tensorfile import TensorSpec

    root, _, _ = chain
    checks = CacheChecks(read_manifest(root / "cache"))
    sample = _samples(root)[0]
    specs = {name: TensorSpec({torch.uint8: "U8"}.get(t.dtype, "F32" if t.dtype == torch.float32 else "BF16"),
                              tuple(t.shape)) for name, t in sample.conditioning.items()}  # fmt: skip
    partners, bucket = sample.meta["conditioning"], sample.meta["bucket"]
    checks._check_cond(specs, partners, bucket, 1, "shard")
    for bad in ({"0.last_pixels": TensorSpec("U8", (3, 16, 16))}, {"1.last_pixels": specs["0.last_pixels"]}):
        with pytest.raises(InputError, match="last_pixels"):
            checks._check_cond({**specs, **bad}, partners, bucket, 1, "shard")


def test_training_ran_with_finite_losses(chain):
    _, _, run = chain
    losses = run_losses(run)
    assert len(losses) >= 2 and all(np.isfinite(losses))


def test_validation_renders_from_the_first_clips_first_and_last_frames(chain):
    """The video and, saved beside it, the first frame (`image`) and the last frame (`last_image`) it was rendered
    from: those of the first cached clip."""
    from PIL import Image

    root, _, run = chain
    folder = run / "validation" / "step-2"
    first = _samples(root)[0].conditioning
    for name, key in (("control", "0.pixels"), ("last_image", "0.last_pixels")):
        saved = np.asarray(Image.open(folder / f"validation-32x32-{name}.png").convert("RGB"))
        assert saved.shape == (32, 32, 3)
        expected = np.asarray(_image(first[key]).resize((32, 32)))
        assert np.array_equal(saved, expected)
    frames = video_frames(folder / "validation-32x32-0.mp4")
    assert len(frames) == FRAMES and frames[0].shape == (32, 32, 3)


def _render(model: Path, image, last_image, lora: Path | None = None) -> np.ndarray:
    return render_lora(model, lora, cls="WanImageToVideoPipeline", image=image, last_image=last_image)


def test_published_lora_changes_the_flf2v_pipelines_video(chain, model, tmp_path):
    from PIL import Image

    _, config, run = chain
    out = tmp_path / "published"
    run_publish(load_config(config), run, out)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "image=condition, last_image=last_frame," in (out / "README.md").read_text()  # the card's snippet
    folder = run / "validation" / "step-2"
    image, last = (Image.open(folder / f"validation-32x32-{n}.png").convert("RGB") for n in ("control", "last_image"))
    base = _render(model, image, last)
    with_lora = _render(model, image, last, out / "pytorch_lora_weights.safetensors")
    assert base.shape == with_lora.shape == (1, FRAMES, 32, 32, 3)
    assert np.abs(with_lora - base).max() > 1e-4
