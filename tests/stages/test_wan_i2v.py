"""The Wan 2.1 image-to-video chain on generated video: `st sample-data --video` -> prepare -> cache (each clip's first
frame and its condition latents stored beside the clip) -> train a LoRA (exact resume, validation rendered from the
first training clip's first frame) -> publish -> the LoRA loads into WanImageToVideoPipeline and changes its video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.manifest import read_manifest
from pipeline.publish.stage import run_publish
from tests.helpers.training import train
from tests.helpers.wan import FRAMES, SETS, cached_samples, render_lora, trained_run, video_frames

# The Wan chain's exact-resume test (1 step + resume == 2 steps, byte for byte), collected here on this module's i2v
# `chain`.
from tests.stages.test_wan import test_lora_resumes_exactly  # noqa: F401


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("wan", flavour="i2v")


@pytest.fixture(scope="module")
def chain(tmp_path_factory, model):
    """Two generated clips prepared and cached for the tiny Wan i2v model, and a 2-step LoRA run over them that
    validates at step 2 (root, config, run folder)."""
    root = tmp_path_factory.mktemp("wan-i2v-chain")
    config, run = trained_run(root, model, None, *SETS, run="straight")
    return root, config, run


def test_cache_stores_each_clips_first_frame_and_condition_latents(chain, wan_pipeline):
    """Beside each clip's latents: its first frame (uint8, the bucket's size) and the condition latents, equal to
    what WanImageToVideoPipeline.prepare_latents builds from that frame as its `image`."""
    from pipeline.families import wan_i2v

    root, _, _ = chain
    pipe = wan_pipeline("i2v", "WanImageToVideoPipeline")
    samples = cached_samples(root / "cache")
    assert len(samples) == 2
    for sample in samples:
        (partner,) = sample.meta["conditioning"]
        assert partner["kind"] == "reference_strict" and partner["path"] == sample.meta["path"]
        latent, first, condition = sample.latent, sample.conditioning["0.pixels"], sample.conditioning["0.latent"]
        width, height = sample.meta["target_size"]
        assert first.dtype == torch.uint8 and tuple(first.shape) == (3, height, width)
        assert condition.shape == latent.shape and latent.shape[1] == 2
        image = wan_i2v.first_frame_image(first.float().unsqueeze(1) / 127.5 - 1)
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).float()
        _, expected = pipe.prepare_latents(pixels, 1, 16, height, width, 1 + 4 * (latent.shape[1] - 1), torch.float32,
                                           torch.device("cpu"))  # fmt: skip
        assert condition.dtype == latent.dtype  # the cache_dtype
        torch.testing.assert_close(condition, expected[0, 4:].to(condition.dtype), rtol=1e-2, atol=1e-2)
        with torch.no_grad():  # the CLIP embeddings, cached as SimpleTuner caches them
            tokens = pipe.encode_image(image, torch.device("cpu"))[0]
        assert torch.equal(sample.conditioning["0.image_embeds"], tokens.to(condition.dtype))


def test_cached_clip_embeddings_are_keyed_by_the_image_encoder(chain, model, tmp_path):
    """The cache records the CLIP encoder and processor that made its embeddings; a run whose model has another CLIP
    encoder is refused before training, naming it (another CLIP would make other embeddings)."""
    import shutil

    from transformers import CLIPVisionModel

    from pipeline.errors import LineageError

    root, config, _ = chain
    recorded = read_manifest(root / "cache")["model"]["image_encoder"]
    assert [i["subfolder"] for i in recorded] == ["image_encoder", "image_processor"]
    other = tmp_path / "other-clip"
    shutil.copytree(model, other)
    encoder = CLIPVisionModel.from_pretrained(str(other), subfolder="image_encoder")
    with torch.no_grad():
        next(p for n, p in encoder.named_parameters() if n.endswith("post_layernorm.weight")).add_(1.0)
    encoder.save_pretrained(str(other / "image_encoder"))
    with pytest.raises(LineageError, match="CLIP image_encoder of .* differs from the model given"):
        train(config, root / "cache", tmp_path / "run", *SETS, f'pretrained_model_name_or_path="{other}"')


def test_validation_renders_from_the_first_training_clips_first_frame(chain):
    _, _, run = chain
    folder = run / "validation" / "step-2"
    assert (folder / "validation-32x32-control.png").is_file()
    frames = video_frames(folder / "validation-32x32-0.mp4")
    assert len(frames) == FRAMES and frames[0].shape == (32, 32, 3)


def _render(model: Path, image, lora: Path | None = None) -> np.ndarray:
    return render_lora(model, lora, cls="WanImageToVideoPipeline", image=image)


def test_published_lora_changes_the_i2v_pipelines_video(chain, model, tmp_path):
    from PIL import Image

    _, config, run = chain
    out = tmp_path / "published"
    run_publish(load_config(config), run, out)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    image = Image.open(run / "validation" / "step-2" / "validation-32x32-control.png").convert("RGB")
    base = _render(model, image)
    with_lora = _render(model, image, out / "pytorch_lora_weights.safetensors")
    assert base.shape == with_lora.shape == (1, FRAMES, 32, 32, 3)
    assert np.abs(with_lora - base).max() > 1e-4
