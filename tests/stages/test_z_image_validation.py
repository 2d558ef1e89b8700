"""Z-Image validation images: ZImagePipeline takes a list of per-prompt embeddings, and the image st renders from its
cached embeddings (classifier-free guidance on, the empty negative prompt) is the one the pipeline renders from text."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.families import get_family
from tests.helpers.training import train

# disable_benchmark false: the base model's images are rendered before the first step
SETS = ["validation_disable=false", "disable_benchmark=false", "validation_num_inference_steps=2",
        'validation_resolution="64"', "validation_guidance=3.0", "validation_seed=5", "validation_step_interval=100",
        "max_train_steps=1", "learning_rate=1e-4", "lora_dropout=0", "caption_dropout_probability=0",
        'mixed_precision="no"']  # fmt: skip


def test_base_validation_image_is_the_pipelines_image_from_text(cached, tiny_model, tmp_path):
    root, config = cached("z_image")
    train(config, root / "cache", tmp_path / "out", *SETS)
    (rendered,) = (tmp_path / "out" / "validation" / "base").glob("validation-64x64-0.png")
    pipe = get_family("z_image").load_pipeline_class().from_pretrained(str(tiny_model("z_image")))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle on a white background", negative_prompt="", num_inference_steps=2, height=64,
                    width=64, guidance_scale=3.0, generator=torch.Generator().manual_seed(5)).images[0]  # fmt: skip
    with Image.open(rendered) as image:
        ours = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert np.abs(ours - np.asarray(expected, dtype=np.int16)).max() <= 1
