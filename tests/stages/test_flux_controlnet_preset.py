"""flux_lora_target "controlnet" (SimpleTuner's flux.peft-controlnet-lora example): with controlnet true and model_type
lora it names the layers of the FluxControlNetModel that the LoRA trains, as SimpleTuner overrides any flux_lora_target
to it in a ControlNet run; without a ControlNet (and for Chroma) it is refused with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# SimpleTuner's flux.peft-controlnet-lora example and its dataset list (tests/unit/test_simpletuner_image_examples.py).
DATA = json.loads((Path(__file__).resolve().parents[1] / "data" / "simpletuner_image_examples.json").read_text())
EXAMPLE = DATA["configs"]["config/examples/flux.peft-controlnet-lora/config.json"]
DATASETS = DATA["lists"][EXAMPLE["data_backend_config"]]
# SimpleTuner's `controlnet` preset (flux/model.py get_lora_target_layers).
SIMPLETUNER_PRESET = ["controlnet_x_embedder", *(f"controlnet_blocks.{i}" for i in range(4)),
                      *(f"controlnet_single_blocks.{i}" for i in range(10))]  # fmt: skip
SETS = ["learning_rate=1e-2", "caption_dropout_probability=0", 'mixed_precision="no"', "controlnet=true",
        'model_type="lora"', "lora_rank=4", "lora_dropout=0"]  # fmt: skip


def write_example(root: Path, config: dict) -> Path:
    folder = root / "config" / "examples"
    (folder / "flux.peft-controlnet-lora").mkdir(parents=True)
    (folder / "multidatabackend-controlnet-128px.json").write_text(json.dumps(DATASETS))
    path = folder / "flux.peft-controlnet-lora" / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(("changes", "message"), [
    ({"controlnet": False}, "exist only with controlnet true"),
    ({"controlnet": False, "flux_lora_target": "all+ffs+embedder+controlnet"}, "flux_lora_target mmdit names"),
    ({"model_family": "chroma"}, "not one of Chroma's LoRA targets"),
])  # fmt: skip
def test_without_a_controlnet_the_preset_is_refused_with_the_fix(tmp_path, monkeypatch, changes, message):
    from pipeline.check import run_check

    monkeypatch.chdir(tmp_path)
    report = run_check(write_example(tmp_path, {**EXAMPLE, **changes}))
    assert len(report.problems) == 1 and message in report.problems[0], report.problems
    assert "flux.peft-controlnet-lora/config.json" in report.problems[0]  # names the file


@pytest.mark.parametrize("changes", [{"lora_type": "lycoris"}, {"model_type": "full"},
                                     {"peft_lora_target_modules": ["to_q"]}])  # fmt: skip
def test_where_the_preset_is_unused_it_is_accepted_as_simpletuner_ignores_it(changes):
    from pipeline.config import Config, check_config_ranges

    check_config_ranges(Config(model_family="flux", flux_lora_target="controlnet", **changes))


def test_the_examples_lora_sits_on_simpletuners_controlnet_layers_and_trains(tmp_path, monkeypatch, tiny_model):
    """The example's adapter, built as `st train` builds it on a ControlNet from the (tiny) base: a rank-64 LoRA on
    exactly the preset's layers of the FluxControlNetModel; a backward reaches it and no other weight."""
    import torch

    from pipeline.config import load_config
    from pipeline.families import get_family, load_components
    from pipeline.families.controlnet import spec_for
    from pipeline.train.controlnet import ControlNetTraining

    monkeypatch.chdir(tmp_path)
    model = str(tiny_model("flux"))
    config = load_config(write_example(tmp_path, EXAMPLE), [f'pretrained_model_name_or_path="{model}"']).config
    family = get_family("flux")
    denoiser = load_components(family, model, which=("denoiser",))["denoiser"].float().eval().requires_grad_(False)
    training = ControlNetTraining(config, family, base_dir=None, seed=config.seed, vae_scale=8)
    training.build(denoiser)
    controlnet = training.controlnet.float()
    trainable = {n for n, p in controlnet.named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[0] for n in trainable} == set(SIMPLETUNER_PRESET)
    assert all(p.shape[0] == 64 for n, p in controlnet.named_parameters() if n.endswith("lora_A.default.weight"))
    for name, p in controlnet.named_parameters():
        if name.endswith("lora_B.default.weight"):
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))  # past the zero init
    torch.manual_seed(0)
    text = {"prompt_embeds": torch.randn(1, 8, denoiser.config.joint_attention_dim),
            "pooled_prompt_embeds": torch.randn(1, denoiser.config.pooled_projection_dim)}
    latents, control = torch.randn(2, 1, 16, 8, 8)
    out = spec_for(family).predict(denoiser, controlnet, latents, torch.tensor([500]), text, None, None, control)
    out.square().mean().backward()
    grads = {n for n, p in controlnet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # the tiny transformer (1 + 1 blocks) adds the first output block of each kind; the others reach nothing
    used = {f"{layer}.lora_{ab}.default.weight" for ab in "AB"
            for layer in ("controlnet_x_embedder", "controlnet_blocks.0", "controlnet_single_blocks.0")}  # fmt: skip
    assert used <= grads <= trainable
    assert all(p.grad is None for p in denoiser.parameters())
