"""LyCORIS on an int8-torchao base (SimpleTuner's flux2-klein-9b-i2i.lycoris-lokr example): in LyCORIS's bypass mode
the int8 layers run as they are and the LoKr path is added to their output, so gradients reach the LoKr weights and
the quantised base stays frozen and quantised. Without bypass_mode LyCORIS adds its weight difference to the int8
weight tensor, which torchao does not implement: refused, naming the file and the fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers.training import losses, train

# SimpleTuner's flux2-klein-9b-i2i.lycoris-lokr example, its LyCORIS file and its dataset list
# (tests/unit/test_simpletuner_image_examples.py checks it unchanged).
DATA = json.loads((Path(__file__).resolve().parents[1] / "data" / "simpletuner_image_examples.json").read_text())
EXAMPLE = DATA["configs"]["config/examples/flux2-klein-9b-i2i.lycoris-lokr/config.json"]
LYCORIS = DATA["files"][EXAMPLE["lycoris_config"]]
DATASETS = DATA["lists"][EXAMPLE["data_backend_config"]]
NAME = "flux2-klein-9b-i2i.lycoris-lokr"


def write_example(root: Path, lycoris: dict = LYCORIS) -> Path:
    folder = root / "config" / "examples"
    (folder / NAME).mkdir(parents=True)
    (folder / "multidatabackend-controlnet-512px.json").write_text(json.dumps(DATASETS))
    (folder / NAME / "lycoris_config.json").write_text(json.dumps(lycoris))
    (folder / NAME / "config.json").write_text(json.dumps(EXAMPLE))
    return folder / NAME / "config.json"


@pytest.mark.parametrize("lycoris", [
    {k: v for k, v in LYCORIS.items() if k != "bypass_mode"},
    {**LYCORIS, "apply_preset": {**LYCORIS["apply_preset"],
                                 "module_algo_map": {"Flux2Attention": {"bypass_mode": False}}}},
], ids=["unset", "off-for-a-module"])  # fmt: skip
def test_without_bypass_mode_it_is_refused_naming_the_file(tmp_path, monkeypatch, lycoris):
    from pipeline.check import run_check

    monkeypatch.chdir(tmp_path)
    report = run_check(write_example(tmp_path, lycoris))
    assert len(report.problems) == 1, report.problems
    assert 'needs "bypass_mode": true in lycoris_config' in report.problems[0]
    assert f"{NAME}/lycoris_config.json" in report.problems[0]


def test_lokr_trains_on_the_int8_base_which_stays_frozen(tmp_path, monkeypatch, tiny_model):
    """The example's LoKr on a tiny FLUX.2 quantised as `st train` quantises it: it starts as the base, each wrapped
    layer computes int8 layer + LoKr difference, the gradients reach every LoKr weight and no base weight, and an
    optimiser step leaves the int8 weights as they were."""
    import torch
    from torchao.prototype.quantized_training.int8 import Int8QuantizedTrainingLinearWeight

    from pipeline.config import load_config
    from pipeline.families import flux2, get_family, load_components
    from pipeline.quantise import BasePrecision, quantise
    from pipeline.train import adapters
    from pipeline.train.options import AdapterOptions

    monkeypatch.chdir(tmp_path)
    loaded = load_config(write_example(tmp_path))
    family = get_family("flux2")
    denoiser = load_components(family, str(tiny_model("flux2")), which=("denoiser",))["denoiser"].float().eval()
    quantise(denoiser, BasePrecision("int8-torchao", "float32"), "flux2", "cpu")
    linears = {n: m for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(isinstance(m.weight, Int8QuantizedTrainingLinearWeight) for m in linears.values())
    frozen = {n: (m.weight.int_data.clone(), m.weight.scale.clone()) for n, m in linears.items()}
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 32, 4, 4, generator=generator)
    text = {"prompt_embeds": torch.randn(2, 5, 48, generator=generator)}

    def predict():
        return flux2.predict(denoiser, latents, torch.tensor([300.0, 700.0]), text)

    with torch.no_grad():
        base = predict()
    torch.manual_seed(0)  # LyCORIS initialises from the global generator: not from whatever ran before in this worker
    params = adapters.attach(denoiser, AdapterOptions.from_config(loaded.config), family, base_dir=loaded.base_dir)
    network = denoiser.lycoris_network
    assert len(network.loras) == 16 and all(l.bypass_mode for l in network.loras)
    with torch.no_grad():
        assert torch.equal(predict(), base)  # LoKr's w2 starts at zero
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        lokr = network.loras[0]
        layer = lokr.org_module[0]
        x = torch.randn(3, layer.in_features, generator=generator)
        weight = layer.weight.dequantize() + lokr.get_diff_weight(multiplier=1.0)[0]
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, weight, layer.bias), atol=1e-5)
    optimiser = torch.optim.AdamW(params, lr=1e-2)
    first = torch.nn.functional.mse_loss(predict(), base)
    first.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for n, p in denoiser.named_parameters() if not n.startswith("lycoris_network."))
    optimiser.step()
    optimiser.zero_grad()
    assert torch.nn.functional.mse_loss(predict(), base) < first
    for name, layer in linears.items():
        assert isinstance(layer.weight, Int8QuantizedTrainingLinearWeight) and not layer.weight.requires_grad
        assert torch.equal(layer.weight.int_data, frozen[name][0]) and torch.equal(layer.weight.scale, frozen[name][1])


def test_st_train_runs_the_lokr_on_an_int8_torchao_base(cached, tmp_path):
    root, config = cached("flux2")
    lycoris = tmp_path / "lycoris_config.json"
    lycoris.write_text(json.dumps(LYCORIS))
    out = tmp_path / "train"
    manifest = train(config, root / "cache", out, 'lora_type="lycoris"', f'lycoris_config="{lycoris}"',
                     'base_model_precision="int8-torchao"', 'mixed_precision="no"', "learning_rate=1e-2",
                     "caption_dropout_probability=0").manifest  # fmt: skip
    record = manifest["stats"]["denoiser"]
    assert (record["base_model_precision"], record["backend"]) == ("int8-torchao", "torchao")
    assert len(losses(out)) == 2 and all(math.isfinite(v) for v in losses(out).values())
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
