"""SimpleTuner's assistant LoRA (pipeline.train.assistant): Flux `schnell` and Z-Image's turbo flavours train a LoRA
over ostris' frozen training adapter, read from the hub cache (HF_HUB_OFFLINE=1, a cache built here) or a local file;
validation renders without it; the published file holds the trained LoRA only; without it anywhere, exit 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, InputError
from tests.helpers.trainers import build_trainer

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
FLUX_REPO, FLUX_FILE = "ostris/FLUX.1-schnell-training-adapter", "pytorch_lora_weights.safetensors"
ZIMAGE_REPO = "ostris/zimage_turbo_training_adapter"
SCHNELL = ['model_flavour="schnell"', "flux_fast_schedule=true"]


def adapter_weights(model: Path, suffixes: tuple[str, ...], rank: int = 2, prefix: str = "transformer.") -> dict:
    """A random LoRA (diffusers keys) on the modules of `model`'s transformer whose names end with `suffixes`."""
    import torch
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(7)
    state = {}
    with safe_open(str(model / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as weights:
        for key in weights.keys():
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and name.endswith(suffixes):
                out_features, in_features = weights.get_slice(key).get_shape()
                state[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
                state[f"{prefix}{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
    assert state
    return state


def hub_cache(root: Path, repo: str, files: dict[str, dict]) -> Path:
    """A hub cache holding `repo` as one snapshot with the safetensors `files` (name -> tensors)."""
    from safetensors.torch import save_file

    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(SNAPSHOT)
    (folder / "snapshots" / SNAPSHOT).mkdir(parents=True)
    for name, tensors in files.items():
        save_file(tensors, folder / "snapshots" / SNAPSHOT / name)
    return root


@pytest.fixture(scope="module")
def flux_hub(tmp_path_factory, tiny_model) -> tuple[Path, dict]:
    state = adapter_weights(tiny_model("flux"), ("attn.to_q", "attn.to_k"))
    return hub_cache(tmp_path_factory.mktemp("assistant-hub"), FLUX_REPO, {FLUX_FILE: state}), state


@pytest.fixture
def offline_hub(monkeypatch):
    """`use(cache)`: this process reads the hub only from the hub cache `cache`."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def use(cache: Path) -> None:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    return use


def test_schnell_trains_a_lora_over_the_frozen_assistant(cached, flux_hub, offline_hub, tmp_path):
    import torch
    from safetensors.torch import load_file

    from pipeline.train import adapters
    from pipeline.train.tracking import Tracker

    cache, state = flux_hub
    offline_hub(cache)
    trainer = build_trainer(cached("flux"), tmp_path / "train", *SCHNELL)
    helper = trainer.assistant
    assert helper is not None and len(helper.modules) == len(state) // 2
    before = {k: v.clone() for k, v in helper.tensors.items()}
    for name, value in before.items():  # the file's weights, in the adapters' dtype (fp32 here)
        assert torch.equal(value, state[f"transformer.{name}.weight"])
    # Its term is in the denoiser's modules: base + B(A(x)) (no alphas: scale 1), and validation renders without it.
    name = next(iter(helper.modules))
    layer = dict(trainer.unwrapped.named_modules())[name]
    base = layer.base_layer if hasattr(layer, "base_layer") else layer
    x = torch.randn(3, base.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        on = base(x)
        with helper.for_validation():
            off = base(x)
        a, b = state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"]
        torch.testing.assert_close(on - off, x @ a.T @ b.T, rtol=1e-4, atol=1e-5)
        assert torch.equal(off, torch.nn.functional.linear(x, base.weight, base.bias))
    seen = []
    trainer._render = lambda tracker, label: seen.append(helper.weight)  # what _validate renders with
    trainer._validate(None, "probe")
    assert seen == [0.0] and helper.weight == 1.0
    # The trained parameters are the user's LoRA only; two steps change it and leave the assistant as it was.
    assert trainer.trainable_names and all("lora_" in n for n in trainer.trainable_names)
    lora_before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if "lora_B" in n}
    del trainer._render
    (tmp_path / "train").mkdir(exist_ok=True)
    trainer.run(Tracker(tmp_path / "train", report_to="none", logging_dir=tmp_path / "logs", project="p",
                        run_name="r", config={}, resume_step=-1))  # fmt: skip
    assert all(torch.equal(helper.tensors[k], v) for k, v in before.items())
    changed = [n for n, p in trainer.unwrapped.named_parameters() if n in lora_before and
               not torch.equal(p.detach(), lora_before[n])]  # fmt: skip
    assert changed
    # The published file: the user's LoRA keys only (diffusers names), none of the assistant's tensors.
    written = adapters.save_final(trainer.unwrapped, trainer.adapter_options, trainer.family, tmp_path / "final")
    published = load_file(str(written[0]))
    user_keys = {"transformer." + n.replace(".default", "") for n, p in trainer.unwrapped.named_parameters()
                 if "lora_" in n}  # fmt: skip
    assert set(published) == user_keys
    flat = {tuple(v.flatten()[:8].tolist()) for v in published.values()}
    assert not flat & {tuple(v.flatten()[:8].tolist()) for v in before.values()}


def test_schnell_without_the_adapter_offline_exits_2_naming_the_file(cli, cached, offline_hub, tmp_path):
    (tmp_path / "empty").mkdir()
    offline_hub(tmp_path / "empty")
    root, config = cached("flux")
    result = cli("train", "-c", str(config), "-i", str(root / "cache"), "-o", str(tmp_path / "train"),
                 *[a for s in SCHNELL for a in ("--set", s)])  # fmt: skip
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"assistant LoRA {FLUX_FILE} of {FLUX_REPO}" in text
    assert "assistant_lora_path" in text and "disable_assistant_lora=true" in text and "hf download" in text
    assert not (tmp_path / "train" / "final").exists()


def test_schnell_needs_the_fast_schedule(cli, cached, tmp_path):
    root, config = cached("flux")
    result = cli("train", "-c", str(config), "-i", str(root / "cache"), "-o", str(tmp_path / "train"),
                 "--set", 'model_flavour="schnell"')  # fmt: skip
    assert result.exit_code == 2
    assert "flux_fast_schedule=true" in " ".join(result.output.split())


def test_z_images_default_flavour_reads_the_v2_adapter_and_says_where(tmp_path, offline_hub, tiny_model):
    from pipeline.config import load_config
    from pipeline.train import assistant

    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"--model_family": "z_image", "--model_type": "lora"}))
    config = load_config(config_path).config
    (tmp_path / "empty").mkdir()
    offline_hub(tmp_path / "empty")
    with pytest.raises(InputError, match="zimage_turbo_training_adapter_v2.safetensors of " + ZIMAGE_REPO):
        assistant.resolve(config, "z_image")
    # In the hub cache: v2 for the default flavour, v1 for turbo; ai-toolkit's keys become the transformer's modules.
    state = adapter_weights(tiny_model("z_image"), ("attention.to_q",), prefix="diffusion_model.")
    names = ("zimage_turbo_training_adapter_v1.safetensors", "zimage_turbo_training_adapter_v2.safetensors")
    offline_hub(hub_cache(tmp_path / "hub", ZIMAGE_REPO, {n: state for n in names}))
    found = assistant.resolve(config, "z_image")
    assert found.file.name == names[1] and found.strength == 1.0 and found.inference_strength == 0.0
    from pipeline.families import get_family

    modules = assistant._read(found, get_family("z_image"))
    assert sorted(modules) == sorted(k.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
                                     for k in state if k.endswith("lora_A.weight"))  # fmt: skip
    v2_key = assistant.key_content(config, "z_image")["assistant_lora"]  # the train key holds the file's digest
    config.model_flavour = "turbo"
    assert assistant.resolve(config, "z_image").file.name == names[0]
    assert v2_key["sha256"] == assistant.key_content(config, "z_image")["assistant_lora"]["sha256"]  # same bytes
    assert v2_key["sha256"] == hashlib.sha256(found.file.read_bytes()).hexdigest()
    config.fuse_qkv_projections = True  # the fused projection would bypass the assistant's q/k/v terms
    with pytest.raises(ConfigError, match="fuse_qkv_projections cannot be used with the assistant LoRA"):
        assistant.resolve(config, "z_image")
    config.disable_assistant_lora = True
    assert assistant.resolve(config, "z_image") is None
    config.model_flavour, config.disable_assistant_lora = "base", False  # a model that takes none: named, refused
    config.assistant_lora_path = str(tmp_path / "hub")
    with pytest.raises(ConfigError, match="assistant_lora_path is set, but an assistant LoRA is loaded only for"):
        assistant.resolve(config, "z_image")


def test_schnell_caches_256_t5_tokens_whatever_was_set(tmp_path):
    """SimpleTuner encodes Schnell's captions to 256 T5 tokens (models/flux/model.py), over any tokenizer_max_length."""
    from pipeline.cache.options import CacheOptions
    from pipeline.config import load_config

    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"--model_family": "flux", "--tokenizer_max_length": 512}))
    config = load_config(config_path).config
    assert CacheOptions.from_config(config).tokenizer_max_length == 512
    config.model_flavour = "schnell"
    assert CacheOptions.from_config(config).tokenizer_max_length == 256
