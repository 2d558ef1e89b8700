"""SimpleTuner's AnimeGen stage flavours over a tiny Wan 2.2 T2V A14B folder, the stage files read from an offline hub
cache: the low stage trains a LoRA on AnimeGen's low-noise file (validation with its high-noise file beside it) and
publishes a LoRA that loads into WanPipeline's transformer_2 and changes its video; the high stage trains the base
folder's own expert when pretrained_transformer_model_name_or_path names it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.manifest import read_manifest
from pipeline.publish.stage import run_publish
from tests.helpers.training import train
from tests.helpers.wan import FRAMES, SETS, animegen_cache, render_lora, shifted, trained_run


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model):
    """The tiny T2V A14B folder and a hub cache holding AnimeGen's two stage files (its experts, moved), read with
    HF_HUB_OFFLINE=1 for the whole module: (model, high expert, low expert)."""
    import huggingface_hub.constants
    from diffusers import WanTransformer3DModel

    model = tiny_model("wan", flavour="t2v-2.2")
    high = shifted(WanTransformer3DModel.from_pretrained(str(model), subfolder="transformer"), 0.01)
    low = shifted(WanTransformer3DModel.from_pretrained(str(model), subfolder="transformer_2"), -0.01)
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_OFFLINE", "1")
    hub_cache = animegen_cache(tmp_path_factory.mktemp("wan22-t2v-hub") / "hub", high, low)
    patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    yield model, high, low
    patch.undo()


@pytest.fixture(scope="module")
def low_chain(tmp_path_factory, hub):
    """Two generated clips cached for the tiny model, and a 2-step LoRA run of animegen-t2v-low validating at step 2
    with the high-noise file beside it (root, config, run folder); the high stage's test trains on the same cache."""
    root = tmp_path_factory.mktemp("wan22-t2v-low")
    config, run = trained_run(root, hub[0], "animegen-t2v-low", *SETS, "wan_validation_load_other_stage=true")
    return root, config, run


def _render(model: Path, transformers: dict, lora: Path | None = None, into_transformer_2: bool = False) -> np.ndarray:
    return render_lora(model, lora, components=transformers, into_transformer_2=into_transformer_2, steps=4)


def test_the_low_stage_trains_animegens_file_and_its_lora_loads_into_transformer_2(low_chain, hub, tmp_path):
    _, config, run = low_chain
    manifest = read_manifest(run)
    assert manifest["config"]["wan_stage"] == "low"
    assert Path(manifest["model"]["denoiser"]["source"]).name == "low_noise.safetensors"
    assert manifest["metrics"]["steps"] == 2 and np.isfinite(manifest["metrics"]["final_loss"])
    assert (run / "validation" / "step-2" / "validation-32x32-0.mp4").is_file()
    out = tmp_path / "published"
    run_publish(load_config(config), run, out)
    card = (out / "README.md").read_text()
    assert "AnimeGen (Wan 2.2 T2V A14B)'s low-noise expert" in card and "load_into_transformer_2=True" in card
    model, high, low = hub
    animegen = {"transformer": high, "transformer_2": low}
    lora = out / "pytorch_lora_weights.safetensors"
    base = _render(model, animegen)
    with_lora = _render(model, animegen, lora, into_transformer_2=True)
    assert base.shape == with_lora.shape == (1, FRAMES, 32, 32, 3)
    assert np.abs(with_lora - base).max() > 1e-4


def test_the_high_stage_trains_the_folders_own_expert_when_named(tmp_path, hub, low_chain):
    """animegen-t2v-high with pretrained_transformer_model_name_or_path = the folder (subfolder transformer): the
    run trains the base's high-noise expert, not AnimeGen's file; its LoRA changes WanPipeline's video (trained on
    the low stage's cache: the stages share the text encoder and VAE)."""
    model = hub[0]
    root, config, _ = low_chain
    run = tmp_path / "run"
    train(config, root / "cache", run, *SETS, 'model_flavour="animegen-t2v-high"',
          f'pretrained_transformer_model_name_or_path="{model}"', 'pretrained_transformer_subfolder="transformer"')
    manifest = read_manifest(run)
    denoiser = manifest["model"]["denoiser"]
    assert (denoiser["source"], denoiser["subfolder"], manifest["config"]["wan_stage"]) == (str(model), "transformer",
                                                                                            "high")  # fmt: skip
    assert manifest["metrics"]["steps"] == 2 and np.isfinite(manifest["metrics"]["final_loss"])
    lora = run / "final" / "pytorch_lora_weights.safetensors"
    base = _render(model, {})
    assert np.abs(_render(model, {}, lora) - base).max() > 1e-4
