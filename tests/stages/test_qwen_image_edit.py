"""Qwen-Image-Edit and Qwen-Image-Edit-Plus (`qwen_image` with an edit model folder: model_flavour edit-v1, or edit-v2
/ edit-v3) on their tiny models, from a paired dataset (pictures and their edge images as references): `st cache`
stores each caption encoded with its sample's reference image and re-encodes only the sample whose reference changed;
two LoRA steps with validation through the edit pipeline (each render beside its reference); the published LoRA loads
into that pipeline and changes what it renders.

The edit pipelines resize every reference to a 1024x1024 area before their VAE sees it (about 200 s for the tiny VAE
on one CPU core); the renders here run with every reference area at 64x64 (`small_reference_area`), the only change to
the pipelines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.families import load_components, qwen_image_edit
from pipeline.publish.stage import run_publish
from tests.helpers.training import WEIGHTS, cached_dataset
from tests.stages.reference_runs import VALIDATION, train_lora


@pytest.fixture(scope="module")
def small_reference_area():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    with pytest.MonkeyPatch.context() as patch:
        for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus):
            real = module.calculate_dimensions
            patch.setattr(module, "calculate_dimensions", lambda area, ratio, real=real: real(64 * 64, ratio))
        yield


PIPELINES = {"QwenImageEditPipeline": qwen_image_edit.tiny, "QwenImageEditPlusPipeline": qwen_image_edit.tiny_plus}


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def setup(request, tmp_path_factory) -> tuple[Path, Path]:
    """(root, config): a tiny edit model in root/model (no model_flavour: its model_index.json names the pipeline), an
    8-picture dataset paired with edge images, prepared and cached."""
    root = tmp_path_factory.mktemp("qwen-edit")
    PIPELINES[request.param](root / "model", 0)
    return root, cached_dataset(root, "qwen_image", root / "model", conditioning=("controlnet",))


def family_of(root: Path):
    return qwen_image_edit.variant(None, str(root / "model"))


@pytest.fixture(scope="module")
def straight(setup, small_reference_area, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen-edit-train") / "train"
    train_lora(setup, out, "eval_steps_interval=2", "num_eval_images=1", *VALIDATION)
    return out


def test_each_caption_is_cached_encoded_with_its_reference_image(setup):
    from PIL import Image

    from pipeline.cache_reader import CacheReader

    root, _ = setup
    family = family_of(root)
    parts = load_components(family, str(root / "model"), which=("text_encoders",))
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    samples = list(CacheReader(root / "cache"))
    assert len(samples) == 8 and manifest["stats"]["samples"] == 8
    for sample in samples[:2]:
        assert sample.meta["text"] == [f"sample:{i}" for i in range(len(sample.meta["captions"]))]
        reference = Image.fromarray(sample.conditioning["0.pixels"].permute(1, 2, 0).numpy())
        expected = family.encode_prompts(parts["text_encoders"], parts["tokenizers"], sample.meta["captions"][:1],
                                         images=[reference])[0]["prompt_embeds"]  # fmt: skip
        stored = sample.texts[0]["prompt_embeds"]
        assert torch.equal(stored, expected.to(stored.dtype))
        assert "0.latent" in sample.conditioning  # the reference latents training appends


def test_a_changed_reference_re_encodes_only_its_sample(setup, tmp_path):
    from PIL import Image

    from pipeline.cache.stage import run_cache
    from pipeline.prepare.stage import run_prepare

    root, config = setup
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    edge = sorted((copy / "data" / "edges").glob("*.png"))[0]
    Image.open(edge).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(edge)
    loaded = load_config(copy / config.relative_to(root))
    run_prepare(loaded, copy / "prepare")
    result = run_cache(loaded, copy / "prepare", copy / "cache")
    assert (result.encoded, result.reused) == (1, 7)


def test_a_dataset_without_reference_images_is_refused_by_st_cache(tmp_path):
    model = tmp_path / "model"
    qwen_image_edit.tiny(model, 0)
    with pytest.raises(InputError, match="has no reference image.*conditioning_data") as error:
        cached_dataset(tmp_path, "qwen_image", model, images=2)
    assert error.value.exit_code == 2


def test_two_lora_steps_validate_through_the_edit_pipeline_beside_their_reference(setup, straight):
    manifest = json.loads((straight / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 and (straight / WEIGHTS).is_file()
    assert manifest["config"]["pipeline"] == family_of(setup[0]).pipeline_class
    # the evaluation loss reads each sample's reference latents and its image-aware caption from the cache
    assert manifest["metrics"]["final_eval_loss"] != manifest["metrics"]["first_eval_loss"]
    names = {p.name for p in (straight / "validation" / "step-2").glob("*.png")}
    assert {"validation-64x64-0.png", "validation-64x64-control.png"} <= names


def test_published_lora_loads_into_the_edit_pipeline_and_changes_its_edit(setup, straight, small_reference_area,
                                                                           tmp_path):  # fmt: skip
    import diffusers
    from PIL import Image

    root, config = setup
    family = family_of(root)
    out = tmp_path / "publish"
    run_publish(load_config(config), straight, out)
    assert f"from diffusers import {family.pipeline_class}" in (out / "README.md").read_text()
    processor = load_components(family, str(root / "model"), which=("text_encoders",))["tokenizers"][0]
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(str(root / "model"), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    references = [Image.open(path).convert("RGB") for path in sorted((root / "data" / "edges").glob("*.png"))[:2]]

    def render(reference) -> np.ndarray:
        return pipe(image=reference, prompt="a red circle on a white background", num_inference_steps=2, height=64,
                    width=64, true_cfg_scale=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip

    base = render(references[0])
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    edited = render(references[0])
    assert np.isfinite(edited).all() and np.abs(base - edited).max() > 1e-4
    # the render depends on its reference image (weakly: the tiny transformer has two blocks)
    assert np.abs(render(references[1]) - edited).max() > 1e-6
