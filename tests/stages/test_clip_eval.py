"""`evaluation_type: clip`: each validation logs the CLIP score of its renders against their prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.families.tokenizers import clip_tokenizer
from pipeline.train.stage import run_train
from tests.helpers.training import QUICK

PROMPT = "a red circle on a white background"  # the cached validation_prompt (tests.helpers.training)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random-weight `CLIPModel` with its tokenizer and (PIL) image processor, saved as a hub folder would be."""
    import torch
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _reference_score(folder: Path, image_path: Path, prompt: str) -> float:
    """CLIP score from the model's own forward: logits_per_image / exp(logit_scale) is the cosine."""
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(folder).eval()
    tokens = CLIPTokenizer.from_pretrained(folder)([prompt], return_tensors="pt")
    with Image.open(image_path) as image:
        pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=[image.convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=pixels["pixel_values"])  # fmt: skip
        cosine = float(out.logits_per_image[0, 0] / model.logit_scale.exp())
    return max(100 * cosine, 0.0)


def test_clip_scores_logged_after_each_validation(cached, tmp_path, tiny_clip):
    root, config = cached("sd1x")
    sets = ["validation_disable=false", "disable_benchmark=false", 'validation_resolution="64"',
            "validation_num_inference_steps=2", "validation_step_interval=1", 'evaluation_type="clip"',
            f'pretrained_evaluation_model_name_or_path="{tiny_clip}"']  # fmt: skip
    run_train(load_config(config, [*QUICK, *sets]), root / "cache", tmp_path / "out")
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    clip = {r["step"]: r for r in records if "clip/mean" in r}
    assert sorted(clip) == [0, 1, 2]  # base, step-1, step-2
    expected = _reference_score(tiny_clip, tmp_path / "out" / "validation" / "step-2" / "validation-64x64-0.png",
                                PROMPT)  # fmt: skip
    assert expected > 0  # the tiny model's seed gives a positive cosine, so the clamp at 0 hides nothing
    assert clip[2]["clip/mean"] == pytest.approx(expected, abs=1e-4)
    assert clip[2]["clip/min"] == clip[2]["clip/max"] == clip[2]["clip/mean"] and clip[2]["clip/std"] == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["metrics"]["final_clip_score"] == clip[2]["clip/mean"]


def test_missing_evaluation_model_names_the_option(cached, tmp_path):
    root, config = cached("sd1x")
    sets = ["validation_disable=false", "disable_benchmark=true", "validation_num_inference_steps=1",
            'evaluation_type="clip"', f'pretrained_evaluation_model_name_or_path="{tmp_path / "no-such-clip"}"']
    with pytest.raises(ConfigError, match="pretrained_evaluation_model_name_or_path .*no-such-clip"):
        run_train(load_config(config, [*QUICK, *sets]), root / "cache", tmp_path / "out")
