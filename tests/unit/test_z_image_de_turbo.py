"""Z-Image flavour ostris-de-turbo: Z-Image-Turbo's pipeline around ostris' de-distilled transformer, read from
ostris/Z-Image-De-Turbo (`transformer/`) when pretrained_transformer_model_name_or_path is unset, as SimpleTuner's
TRANSFORMER_PATH_OVERRIDES does. The hub repository is a hub-cache layout built here (HF_HUB_OFFLINE=1): a tiny
transformer with weights other than the base folder's. Two LoRA steps train it, and the published LoRA loads onto the
pipeline with that transformer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.families import get_family, z_image
from pipeline.families.identity import DenoiserSource, component_identity, denoiser_source
from tests.helpers.training import QUICK, WEIGHTS

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
FAMILY = get_family("z_image")
DE_TURBO = ['model_flavour="ostris-de-turbo"']
LORA = ["learning_rate=1e-2", "lora_dropout=0", "caption_dropout_probability=0", 'mixed_precision="no"', "lora_rank=4"]


@pytest.fixture(scope="module")
def de_turbo_hub(tmp_path_factory, tiny_model) -> Path:
    """A hub cache holding ostris/Z-Image-De-Turbo's `transformer/`: the tiny model's transformer, every weight moved
    by 0.01 (another model of the same architecture)."""
    from diffusers import ZImageTransformer2DModel

    root = tmp_path_factory.mktemp("de-turbo-hub")
    repo = root / ("models--" + z_image.DE_TURBO_TRANSFORMER.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    transformer = ZImageTransformer2DModel.from_pretrained(str(tiny_model("z_image")), subfolder="transformer")
    with torch.no_grad():
        for param in transformer.parameters():
            param.add_(0.01)
    transformer.save_pretrained(str(repo / "snapshots" / SNAPSHOT / "transformer"))
    return root


@pytest.fixture
def offline_hub(monkeypatch, de_turbo_hub):
    """This process reads the hub only from `de_turbo_hub` (HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(de_turbo_hub))
    return de_turbo_hub


def test_de_turbo_reads_its_transformer_from_ostris_unless_the_option_names_one(cached, tiny_model, tmp_path):
    root, config = cached("z_image")
    assert FAMILY.flavour_hub_id("ostris-de-turbo") == "TONGYI-MAI/Z-Image-Turbo"  # the rest of the pipeline
    variant = FAMILY.for_run("ostris-de-turbo", "TONGYI-MAI/Z-Image-Turbo")
    assert variant.default_denoiser == "ostris/Z-Image-De-Turbo" and FAMILY.for_run("base", "x") is FAMILY

    def source(*sets: str):
        loaded = load_config(config, list(sets))
        return denoiser_source(loaded.config, FAMILY, str(tiny_model("z_image")), loaded.base_dir)

    assert source(*DE_TURBO) == DenoiserSource("ostris/Z-Image-De-Turbo", "transformer")
    assert source(*DE_TURBO, 'pretrained_transformer_subfolder="none"') == DenoiserSource("ostris/Z-Image-De-Turbo",
                                                                                            None)  # fmt: skip
    mine = tmp_path / "mine"
    mine.mkdir()
    assert source(*DE_TURBO, f'pretrained_transformer_model_name_or_path="{mine}"') == DenoiserSource(str(mine),
                                                                                                       "transformer")
    assert source() is None  # flavour base: the model's own transformer


def test_a_de_turbo_transformer_missing_from_the_hub_cache_is_a_clear_error(cached, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from pipeline.train.stage import run_train

    root, config = cached("z_image")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(InputError, match="ostris/Z-Image-De-Turbo") as error:
        run_train(load_config(config, [*QUICK, *LORA, *DE_TURBO]), root / "cache", tmp_path / "train")
    assert error.value.exit_code == 2


def test_two_lora_steps_train_the_de_turbo_transformer_and_the_lora_loads_onto_it(cached, tiny_model, offline_hub,
                                                                                   tmp_path):  # fmt: skip
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    from pipeline.publish.stage import run_publish
    from pipeline.train.stage import run_train

    root, config = cached("z_image")
    out = tmp_path / "train"
    run_train(load_config(config, [*QUICK, *LORA, *DE_TURBO]), root / "cache", out)
    manifest = json.loads((out / "manifest.json").read_text())
    denoiser = manifest["model"]["denoiser"]
    assert (denoiser["source"], denoiser["subfolder"]) == ("ostris/Z-Image-De-Turbo", "transformer")
    assert manifest["metrics"]["steps"] == 2 and (out / WEIGHTS).is_file()
    assert "assistant_lora" not in manifest["config"]  # no assistant LoRA under de-turbo (SimpleTuner's too)
    # the transformer trained is the hub cache's, not the base folder's
    model = tiny_model("z_image")
    base = ZImageTransformer2DModel.from_pretrained(str(model), subfolder="transformer")
    snapshot = offline_hub / "models--ostris--Z-Image-De-Turbo" / "snapshots" / SNAPSHOT
    de_turbo = ZImageTransformer2DModel.from_pretrained(str(snapshot), subfolder="transformer")
    assert not any(torch.equal(a, b) for a, b in zip(base.state_dict().values(), de_turbo.state_dict().values()))
    assert denoiser["weights_sha256"] == component_identity(snapshot, "transformer")["weights_sha256"]
    assert denoiser["weights_sha256"] != component_identity(model, "transformer")["weights_sha256"]
    publish = tmp_path / "publish"
    run_publish(load_config(config), out, publish)
    card = (publish / "README.md").read_text()
    assert "ZImageTransformer2DModel.from_pretrained('ostris/Z-Image-De-Turbo', subfolder='transformer')" in card
    pipe = ZImagePipeline.from_pretrained(str(model), transformer=de_turbo)
    text = FAMILY.collate_text(FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], ["a red circle"]))
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def predict():
        with torch.no_grad():
            return FAMILY.denoiser_forward(pipe.transformer, latents, torch.tensor([500.0]), text)

    before = predict()
    pipe.load_lora_weights(str(publish / "pytorch_lora_weights.safetensors"))
    assert (predict() - before).abs().max() > 1e-6  # the trained LoRA changes the de-turbo transformer's prediction
