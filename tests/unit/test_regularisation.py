"""Regularisation datasets (`is_regularisation_data`): a batch's target is the frozen base model's prediction,
computed with the adapters switched off, and the adapters are on again for the prediction that trains."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.families import get_family, load_components
from pipeline.train import lycoris, regularisation
from tests.helpers.trainers import build_trainer, first_batch, randomise_lora


def test_full_training_and_controlnet_runs_refuse_regularisation_datasets():
    datasets = {"subject": {"id": "subject"}, "men": {"id": "men", "is_regularisation_data": True}}
    regularisation.check(datasets, "lora")
    regularisation.check({"subject": {"id": "subject"}}, "full")
    with pytest.raises(ConfigError, match=r"dataset 'men' has is_regularisation_data.*model_type full"):
        regularisation.check(datasets, "full")
    with pytest.raises(ConfigError, match=r"dataset 'men'.*ControlNet"):
        regularisation.check(datasets, "lora", controlnet=True)


@pytest.fixture(scope="module")
def lora_trainer(cached, tmp_path_factory):
    """An sd1x LoRA trainer whose adapters change the output (random B matrices)."""
    trainer = build_trainer(cached("sd1x"), tmp_path_factory.mktemp("regularisation"))
    randomise_lora(trainer)
    return trainer


def test_regularisation_target_is_the_base_models_prediction(lora_trainer, tiny_model):
    trainer = lora_trainer
    batch = first_batch(trainer)
    noised = trainer.objective.draw(batch.latents, torch.Generator().manual_seed(0), step=0)
    text = trainer._text(batch.texts, 0)

    def predict(model):
        return trainer.family.denoiser_forward(model, noised.noisy, noised.timesteps, text, batch.meta).float()

    base_unet = load_components(trainer.family, tiny_model("sd1x"), which=("denoiser",))["denoiser"]
    with torch.no_grad():
        base, adapted = predict(base_unet), predict(trainer.model)
    assert (adapted - base).abs().max() > 1e-3  # the adapters change the output

    loss = trainer.forward_loss(noised, batch.texts, batch.meta, None, 0, batch=replace(batch, regularisation=True))
    torch.testing.assert_close(loss, (adapted - base).square().mean(), rtol=1e-5, atol=0)
    assert loss.item() != pytest.approx(trainer.forward_loss(noised, batch.texts, batch.meta, None, 0, batch=batch).item())

    # The loss trains the adapters, which are on again afterwards.
    loss.backward()
    lora = [p for n, p in trainer.unwrapped.named_parameters() if "lora_" in n]
    assert all(p.requires_grad for p in lora) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch.testing.assert_close(predict(trainer.model), adapted, rtol=0, atol=0)


def test_lycoris_network_runs_at_multiplier_zero_and_is_restored(tiny_model):
    unet = load_components(get_family("sd1x"), tiny_model("sd1x"), which=("denoiser",))["denoiser"]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 5, unet.config.cross_attention_dim, generator=generator)

    def predict():
        with torch.no_grad():
            return unet(sample, torch.tensor([500]), encoder_hidden_states=context).sample

    base = predict()
    settings = {"algo": "locon", "linear_dim": 4, "linear_alpha": 4, "apply_preset": {"target_module": ["Attention"]}}
    network = lycoris.build(unet, settings, source="test")
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    adapted = predict()
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(regularisation.base_prediction(predict, unet), base, rtol=1e-5, atol=1e-6)
    assert network.multiplier == 1
    torch.testing.assert_close(predict(), adapted, rtol=0, atol=0)
