"""validation_adapter_path / _config (pipeline.train.validation_adapters): an extra LoRA loaded into the validation
pipeline beside the trained one changes the validation images and nothing of training (same losses, same weights);
the denoiser gets its modules, parameters and requires_grad flags back; a hub id reads the hub cache; a missing file
stops `st check` and `st train` with exit 2 naming the option."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ConfigError
from tests.helpers.training import QUICK, WEIGHTS, losses, train

VALIDATE = ["validation_disable=false", "validation_step_interval=1", "validation_num_inference_steps=2",
            "validation_resolution=64", "max_train_steps=2", "seed=3"]  # fmt: skip


def unet_lora(model: Path, rank: int = 2, scale: float = 0.5) -> dict:
    """A random LoRA (diffusers keys, `unet.` prefix) on the tiny unet's attention projections."""
    import torch
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(11)
    state = {}
    with safe_open(str(model / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as weights:
        for key in weights.keys():
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
                out_features, in_features = weights.get_slice(key).get_shape()
                state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * scale
                state[f"unet.{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * scale
    assert state
    return state


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("validation-adapter")
    save_file(unet_lora(tiny_model("sd1x")), folder / "style.safetensors")
    return folder / "style.safetensors"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_the_adapter_changes_validation_images_and_not_training(cached, adapter, tmp_path):
    from safetensors.torch import load_file

    root, config = cached("sd1x")
    plain, compared = tmp_path / "plain", tmp_path / "compared"
    train(config, root / "cache", plain, *VALIDATE)
    train(config, root / "cache", compared, *VALIDATE, f'validation_adapter_path="{adapter}"',
          'validation_adapter_mode="comparison"', "validation_adapter_strength=1.5")  # fmt: skip
    # Training is unchanged: the step-2 loss follows a validation with the adapter loaded (and removed) at step 1.
    assert losses(compared) == losses(plain) and len(losses(plain)) == 2
    a, b = load_file(plain / WEIGHTS), load_file(compared / WEIGHTS)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    for step in ("step-1", "step-2"):
        base = sorted(p.name for p in (plain / "validation" / step).glob("*.png") if p.name != "grid.png")
        assert base, step
        for name in base:  # comparison: the base run is the plain run's image, the adapter run another
            stem, rest = name.split("-", 1)
            reference = _pixels(plain / "validation" / step / name)
            assert np.array_equal(_pixels(compared / "validation" / step / name), reference)
            with_adapter = _pixels(compared / "validation" / step / f"{stem}__style-{rest}")
            assert np.abs(with_adapter - reference).mean() > 1.0


def test_the_denoiser_gets_its_modules_and_flags_back(tiny_model, adapter):
    """With a trained peft LoRA (st's `adapters.attach`) and on a fully trained denoiser (no peft layers at all)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from pipeline.families import get_family
    from pipeline.train import adapters, validation_adapters
    from pipeline.train.options import AdapterOptions
    from pipeline.config import Config

    family = get_family("sd1x")
    run = validation_adapters.build_runs(Config(validation_adapter_path=str(adapter)))
    assert [r.slug for r in run] == ["style"]
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for model_type in ("lora", "full"):
        unet = UNet2DConditionModel.from_pretrained(tiny_model("sd1x") / "unet")
        adapters.attach(unet, AdapterOptions.from_config(Config(model_type=model_type, lora_rank=2)), family)
        text = torch.randn(1, 4, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        before = {n: (p.detach().clone(), p.requires_grad) for n, p in unet.named_parameters()}
        modules = [(n, type(m)) for n, m in unet.named_modules()]
        with torch.no_grad():
            reference = unet(sample, 500, text).sample
        pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        with validation_adapters.attached(pipe, unet, run[0]), torch.no_grad():
            changed = unet(sample, 500, text).sample
        with torch.no_grad():
            after = unet(sample, 500, text).sample
        assert not torch.equal(changed, reference), model_type
        assert torch.equal(after, reference), model_type
        assert [(n, type(m)) for n, m in unet.named_modules()] == modules, model_type
        now = dict(unet.named_parameters())
        assert now.keys() == before.keys(), model_type
        assert all(now[n].requires_grad == g and torch.equal(now[n], v) for n, (v, g) in before.items()), model_type
        assert "style" not in getattr(unet, "peft_config", {})


def test_runs_and_modes_as_simpletuner_builds_them(adapter, tmp_path):
    from pipeline.config import Config
    from pipeline.train.validation_adapters import BASE, build_runs

    path = str(adapter)
    assert [r.slug for r in build_runs(Config(validation_adapter_path=path))] == ["style"]
    assert build_runs(Config(validation_adapter_path=path, validation_adapter_mode="comparison"))[0] is BASE
    assert build_runs(Config(validation_adapter_path=path, validation_adapter_mode="none")) == [BASE]
    assert build_runs(Config()) == [BASE]
    runs = build_runs(Config(validation_adapter_config=json.dumps(
        {"runs": [{"label": "Soft", "path": path, "strength": 0.5}, {"paths": [path, path]}]})))  # fmt: skip
    assert [r.slug for r in runs] == ["", "soft", "style"]
    assert runs[1].adapters[0].strength == 0.5 and len(runs[2].adapters) == 2
    hub = build_runs(Config(validation_adapter_path="org/repo:weights.safetensors"))[0].adapters[0]
    assert (hub.is_local, hub.location, hub.weight_name) == (False, "org/repo", "weights.safetensors")
    with pytest.raises(ConfigError, match="not both"):
        build_runs(Config(validation_adapter_path=path, validation_adapter_config=[path]))
    with pytest.raises(ConfigError, match="target_stage"):
        build_runs(Config(validation_adapter_config=[{"path": path, "target_stage": "high"}]))
    with pytest.raises(ConfigError, match="validation_adapter_path .*no such file"):
        build_runs(Config(validation_adapter_path=str(tmp_path / "missing.safetensors")))


def test_a_hub_adapter_is_read_from_the_hub_cache(adapter, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from pipeline.config import Config
    from pipeline.train.validation_adapters import build_runs, fetch
    from tests.stages.test_assistant_lora import hub_cache

    from safetensors.torch import load_file

    cache = hub_cache(tmp_path / "hub", "someone/style-lora", {"style.safetensors": load_file(adapter)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    runs = build_runs(Config(validation_adapter_path="someone/style-lora:style.safetensors"))
    assert load_file(fetch(runs)[runs[0].adapters[0]]).keys() == load_file(adapter).keys()


def test_text_encoder_weights_are_refused(adapter, tmp_path):
    """st's validation pipeline has no text encoder (cached prompt embeddings) to apply them to."""
    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.config import Config
    from pipeline.errors import InputError
    from pipeline.train.validation_adapters import build_runs, fetch

    state = load_file(adapter) | {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                                  torch.zeros(2, 32)}  # fmt: skip
    save_file(state, tmp_path / "both.safetensors")
    with pytest.raises(InputError, match="validation_adapter_path .*text-encoder LoRA weights"):
        fetch(build_runs(Config(validation_adapter_path=str(tmp_path / "both.safetensors"))))


def test_a_missing_adapter_stops_check_and_train(cli, cached, tmp_path):
    root, config = cached("sd1x")
    missing = f'validation_adapter_path="{tmp_path / "nope.safetensors"}"'
    result = cli("check", "--config", str(config), "--set", missing)
    assert result.exit_code == 2 and "validation_adapter_path" in result.output, result.output
    out = tmp_path / "out"
    result = cli("train", "-c", str(config), "-i", str(root / "cache"), "-o", str(out),
                 *[a for s in [*QUICK, missing] for a in ("--set", s)])  # fmt: skip
    assert result.exit_code == 2 and "validation_adapter_path" in result.output and "no such file" in result.output
    assert not (out / "metrics.jsonl").exists()
