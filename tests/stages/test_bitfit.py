"""layer_freeze_strategy bitfit (SimpleTuner's BitFit): a full run trains the denoiser's biases only."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.helpers.training import train


def _weights(folder) -> dict:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def test_bitfit_full_run_changes_only_biases(cached, tiny_model, tmp_path, st_log):
    root, config = cached("sd1x")
    records = st_log("train")
    train(config, root / "cache", tmp_path / "out", 'model_type="full"', "layer_freeze_strategy=bitfit",
          "max_train_steps=1", "learning_rate=1e-2")  # fmt: skip
    base = _weights(tiny_model("sd1x") / "unet")
    trained = _weights(tmp_path / "out" / "final" / "unet")
    assert trained.keys() == base.keys()
    # The run holds its weights in bf16 (mixed_precision's default): compare the base rounded to the saved dtype.
    changed = {k for k in base if not base[k].to(trained[k].dtype).equal(trained[k])}
    biases = {k for k in base if "bias" in k}
    assert changed and changed <= biases  # only biases moved ...
    assert len(changed) > len(biases) // 2  # ... and most of them did
    message = next(r.getMessage() for r in records if r.getMessage().startswith("layer_freeze_strategy bitfit"))
    count = sum(base[k].numel() for k in biases)
    assert f"training {count} bias parameters of {sum(v.numel() for v in base.values())}" in message


def test_bitfit_is_refused_with_controlnet_and_ignored_by_lora(cached, tmp_path, st_log):
    import torch
    from diffusers import UNet2DConditionModel

    from pipeline.families import get_family
    from pipeline.train import adapters
    from pipeline.train.options import AdapterOptions

    _, config = cached("sd1x")
    with pytest.raises(ConfigError, match="layer_freeze_strategy bitfit with controlnet"):
        load_config(config, ['model_type="full"', "controlnet=true", "layer_freeze_strategy=bitfit"])

    # LoRA: SimpleTuner's apply_bitfit_freezing returns a LoRA run unchanged; st warns and trains the LoRA as usual.
    records = st_log("train")
    loaded = load_config(config, ["layer_freeze_strategy=bitfit"])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)  # fmt: skip
    params = adapters.attach(unet, AdapterOptions.from_config(loaded.config), get_family("sd1x"))
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert params and trainable and all("lora_" in n for n in trainable)
    assert any("applies to model_type full only" in r.getMessage() for r in records)
