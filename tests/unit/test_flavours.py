"""`model_flavour`: SimpleTuner's flavour table per family picks the model when `pretrained_model_name_or_path` is
not set; unknown flavours and flavours st cannot train yet stop with exit 2; the flavour stays out of stage keys."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.check import run_check
from pipeline.config import CACHE, TRAIN, load_config
from pipeline.errors import ConfigError, InputError
from pipeline.families import FAMILIES, get_family
from pipeline.families.identity import model_identity, model_sources
from pipeline.sampledata import write_sample_dataset

# SimpleTuner's DEFAULT_MODEL_FLAVOUR and its hub id per family (simpletuner/helpers/models/<family>/model.py).
DEFAULTS = {
    "flux": ("krea", "black-forest-labs/flux.1-krea-dev"),
    "sd3": ("medium", "stabilityai/stable-diffusion-3.5-medium"),
    "sdxl": ("base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
    "sd1x": ("dreamshaper", "Lykon/dreamshaper-8"),
    "sd2x": ("pseudoflex-v2", "bghira/pseudo-flex-v2"),
    "pixart_sigma": ("900M-1024-v0.6", "terminusresearch/pixart-900m-1024-ft-v0.6"),
    "auraflow": ("v0.3", "terminusresearch/auraflow-v0.3"),
    "lumina2": ("2.0", "Alpha-VLLM/Lumina-Image-2.0"),
    "qwen_image": ("v2.0", "Qwen/Qwen-Image-2512"),
    "sana": ("sana1.5-4.8b-1024", "Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers"),
    "kolors": ("1.0", "terminusresearch/kwai-kolors-1.0"),
    # SimpleTuner's default "turbo-ostris-v2": a LoRA trains over its assistant LoRA (pipeline.train.assistant).
    "z_image": ("turbo-ostris-v2", "TONGYI-MAI/Z-Image-Turbo"),
    "chroma": ("base", "lodestones/Chroma1-Base"),
    "hidream": ("full", "HiDream-ai/HiDream-I1-Full"),
    "cosmos2image": ("2b", "nvidia/Cosmos-Predict2-2B-Text2Image"),
    # SimpleTuner has no DeepFloyd default: it requires model_flavour (st: or a model path).
    "deepfloyd": (None, None),
    "flux2": ("klein-9b", "black-forest-labs/FLUX.2-klein-base-9B"),
    "ltxvideo": ("0.9.5", "Lightricks/LTX-Video-0.9.5"),
    "wan": ("t2v-480p-1.3b-2.1", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    "omnigen": ("v1", "Shitao/OmniGen-v1-diffusers"),
}
# Flavours SimpleTuner trains with features st lacks: (family, flavour, the feature named in the error).
NOT_YET = [
    ("sd1x", "realvis", "model_family sdxl"),
    ("pixart_sigma", "900M-1024-v0.7-stage1", "refiner_training"),
]


def load(tmp_path, **options):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({f"--{k}": v for k, v in options.items()}))
    return load_config(path)


def test_every_family_has_simpletuners_default_flavour():
    assert set(DEFAULTS) == set(FAMILIES)
    for name, (flavour, hub_id) in DEFAULTS.items():
        family = get_family(name)
        assert family.default_flavour == flavour
        if hub_id is None:
            with pytest.raises(ConfigError, match="default flavour .* set model_flavour to one of"):
                family.flavour_hub_id(None)
        else:
            assert family.flavour_hub_id(None) == hub_id


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_without_a_path_the_default_flavour_names_the_model(tmp_path, name):
    loaded = load(tmp_path, model_family=name)
    if DEFAULTS[name][1] is None:  # a default st cannot train yet stops the run (exit 2), naming what to set
        with pytest.raises(ConfigError, match="model_flavour"):
            model_sources(loaded)
    else:
        assert model_sources(loaded).model == DEFAULTS[name][1]


@pytest.mark.parametrize(
    ("family", "flavour", "hub_id"),
    [
        ("flux", "dev", "black-forest-labs/flux.1-dev"),
        ("sd3", "large", "stabilityai/stable-diffusion-3.5-large"),
        ("sdxl", "base-0.9", "stabilityai/stable-diffusion-xl-base-0.9"),
        ("sd1x", "1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("sd2x", "2.1", "stabilityai/stable-diffusion-2-1"),
        ("pixart_sigma", "600M-512", "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"),
        ("hidream", "fast", "HiDream-ai/HiDream-I1-Fast"),
        ("flux2", "klein-4b", "black-forest-labs/FLUX.2-klein-base-4B"),
        ("flux2", "dev", "black-forest-labs/FLUX.2-dev"),
        ("flux", "fluxbooru", "terminusresearch/fluxbooru-v0.3"),
        ("flux", "libreflux", "jimmycarter/LibreFlux-SimpleTuner"),
    ],
)
def test_a_flavour_names_its_hub_id(tmp_path, family, flavour, hub_id):
    assert model_sources(load(tmp_path, model_family=family, model_flavour=flavour)).model == hub_id


def test_a_path_wins_over_the_flavour(tmp_path, tiny_model):
    model = tiny_model("sd1x")
    sources = model_sources(load(tmp_path, model_family="sd1x", model_flavour="1.5",
                                 pretrained_model_name_or_path=str(model)))  # fmt: skip
    assert sources.model == str(model.resolve())


def test_an_unknown_flavour_lists_the_familys_flavours(tmp_path):
    loaded = load(tmp_path, model_family="sd3", model_flavour="huge")
    with pytest.raises(ConfigError, match=r"unknown model_flavour 'huge' for model_family sd3; its flavours: medium, "
                                          r"large"):  # fmt: skip
        model_sources(loaded)


@pytest.mark.parametrize(("family", "flavour", "feature"), NOT_YET)
def test_a_flavour_st_cannot_train_yet_is_refused(tmp_path, family, flavour, feature):
    loaded = load(tmp_path, model_family=family, model_flavour=flavour)
    pattern = f"{family} flavour '{re.escape(flavour)}' .* needs .*not supported yet"
    with pytest.raises(ConfigError, match=pattern) as error:
        model_sources(loaded)
    assert feature in str(error.value)


def test_a_refused_flavour_is_refused_beside_a_path_too(tmp_path, tiny_model):
    """SimpleTuner's stage-1 PixArt flavour changes how it trains whatever model the path names."""
    loaded = load(tmp_path, model_family="pixart_sigma", model_flavour="900M-1024-v0.7-stage1",
                  pretrained_model_name_or_path=str(tiny_model("sd1x")))  # fmt: skip
    with pytest.raises(ConfigError, match="refiner_training"):
        model_sources(loaded)


def test_the_flavour_stays_out_of_stage_keys(tmp_path):
    """The stages hash the model's files, so naming the same model by flavour or by hub id keys the same."""
    config = load(tmp_path, model_family="flux", model_flavour="dev").config
    assert config.model_flavour == "dev"
    for stage in (CACHE, TRAIN):
        assert "model_flavour" in config.stage_keys(stage, key_only=False)
        assert "model_flavour" not in config.stage_keys(stage)


def test_offline_the_identity_error_names_the_flavours_hub_id(tmp_path, monkeypatch):
    """What `st cache` and `st train` do first with the model: identify it (here offline, with an empty hub cache)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load(tmp_path, model_family="sd3", model_flavour="large")
    with pytest.raises(InputError, match="could not identify 'stabilityai/stable-diffusion-3.5-large' on the Hugging"):
        model_identity(get_family("sd3"), model_sources(loaded))


def test_check_names_the_flavours_hub_id(tmp_path):
    config = write_sample_dataset(tmp_path, images=2, family="flux")
    report = run_check(config, ["model_flavour=dev"])
    assert report.ok, report.problems
    assert any(line.startswith("model black-forest-labs/flux.1-dev (flux; a hub id") for line in report.checked)


def test_check_reports_a_refused_flavour(tmp_path):
    config = write_sample_dataset(tmp_path, images=2, family="pixart_sigma")
    report = run_check(config, ["model_flavour=900M-1024-v0.7-stage1"])
    assert [p for p in report.problems if "flavour '900M-1024-v0.7-stage1'" in p and "not supported yet" in p]


@pytest.mark.parametrize(("flavour", "hub_id", "needs"), [
    ("fluxbooru", "terminusresearch/fluxbooru-v0.3", "flux_guidance_value=3.5"),
    ("libreflux", "jimmycarter/LibreFlux-SimpleTuner", "flux_attention_masked_training=true"),
])  # fmt: skip
def test_check_resolves_the_true_cfg_flavours(tmp_path, flavour, hub_id, needs):
    """fluxbooru and libreflux validate with true CFG (validation_guidance_real), which st implements for Flux; what
    SimpleTuner overrides for them to train, st asks for (exit 2 naming the setting)."""
    config = write_sample_dataset(tmp_path, images=2, family="flux")
    report = run_check(config, [f"model_flavour={flavour}"])
    assert [p for p in report.problems if f"model_flavour {flavour}" in p and f"set {needs}" in p]
    report = run_check(config, [f"model_flavour={flavour}", needs])
    assert report.ok, report.problems
    assert any(line.startswith(f"model {hub_id} (flux; a hub id") for line in report.checked)


def test_cache_stops_offline_naming_the_hub_id(cli, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = write_sample_dataset(tmp_path / "data", images=4, family="sd1x")
    prepared = cli("prepare", "-c", config, "-o", tmp_path / "prepare")
    assert prepared.exit_code == 0, prepared.output
    result = cli("cache", "-c", config, "-i", tmp_path / "prepare", "-o", tmp_path / "cache",
                 "--set", "model_flavour=1.4")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "'CompVis/stable-diffusion-v1-4'" in result.output
