"""The Wan 2.1 image-to-video chain on generated video: `st sample-data --video` -> prepare -> cache (each clip's first
frame and its condition latents stored beside the clip) -> train a LoRA (exact resume, validation rendered from the
first training clip's first frame) -> publish -> the LoRA loads into WanImageToVideoPipeline and changes its video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.families import get_family
from pipeline.manifest import read_manifest
from pipeline.publish.stage import run_publish
from pipeline.train.data import CacheIndex, SampleReader
from tests.helpers.training import train
from tests.helpers.videos import cached_video_dataset

# The Wan chain's options (5 frames, 32 px, 2 steps), and its exact-resume test (1 step + resume == 2 steps, byte for
# byte), collected here on this module's i2v `chain`.
from tests.stages.test_wan import FRAMES, SETS, test_lora_resumes_exactly  # noqa: F401


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from pipeline.families import wan_i2v

    out = tmp_path_factory.mktemp("wan-i2v-model") / "model"
    wan_i2v.tiny(out, 0)
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory, model):
    """Two generated clips prepared and cached for the tiny Wan i2v model, and a 2-step LoRA run over them that
    validates at step 2 (root, config, run folder)."""
    root = tmp_path_factory.mktemp("wan-i2v-chain")
    config = cached_video_dataset(root, "wan", model, videos=2)
    run = root / "straight"
    train(config, root / "cache", run, *SETS, "validation_disable=false", "validation_step_interval=2")
    return root, config, run


def test_cache_stores_each_clips_first_frame_and_condition_latents(chain, model):
    """Beside each clip's latents: its first frame (uint8, the bucket's size) and the condition latents, equal to
    what WanImageToVideoPipeline.prepare_latents builds from that frame as its `image`."""
    from diffusers import WanImageToVideoPipeline

    from pipeline.families import wan_i2v

    root, _, _ = chain
    pipe = WanImageToVideoPipeline.from_pretrained(str(model))
    index = CacheIndex(root / "cache", read_manifest(root / "cache"))
    reader = SampleReader()
    try:
        samples = [reader.sample(ref) for ref in index.samples.values()]
    finally:
        reader.close()
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
    import av

    _, _, run = chain
    folder = run / "validation" / "step-2"
    assert (folder / "validation-32x32-control.png").is_file()
    with av.open(str(folder / "validation-32x32-0.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (32, 32, 3)


def _render(model: Path, image, lora: Path | None = None) -> np.ndarray:
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    family = get_family("wan")
    text = family.collate_text(family.encode_prompts([pipe.text_encoder], [pipe.tokenizer], ["a red circle"]))
    out = pipe(image=image, prompt_embeds=text["prompt_embeds"], height=32, width=32, num_frames=FRAMES, num_inference_steps=2,
               guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0))  # fmt: skip
    return out.frames


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
