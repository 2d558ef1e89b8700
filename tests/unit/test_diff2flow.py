"""Diff2Flow (`diff2flow_enabled` + `diff2flow_loss`): an epsilon / v-prediction model's prediction converted to a
flow velocity and scored against noise - latents, as SimpleTuner's DiffusionToFlowBridge and ModelFoundation.loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.train import diff2flow
from pipeline.train.objectives import Objective
from tests.helpers.trainers import build_trainer, first_batch

SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": 1000}  # fmt: skip
ON = {"diff2flow_enabled": True, "diff2flow_loss": True}
T = torch.tensor([0, 250, 600, 999])


def objective(kind: str = "epsilon", **options) -> Objective:
    return Objective(Config(**options), kind=kind,
                     scheduler_config=None if kind == "flow_matching" else SD_SCHEDULER)  # fmt: skip


def tensors(seed: int = 0, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 4, 8, 8, generator=g) for _ in range(3))


def simpletuner_flow(prediction, noisy, timesteps, prediction_type, alphas_cumprod):
    """SimpleTuner's DiffusionToFlowBridge.prediction_to_flow, written out (float32 tables)."""
    a = alphas_cumprod.to(torch.float32)
    sqrt_alpha, sqrt_one_minus = torch.sqrt(a)[timesteps], torch.sqrt(1.0 - a)[timesteps]
    recip, recipm1 = torch.sqrt(1.0 / a)[timesteps], torch.sqrt(1.0 / a - 1.0)[timesteps]
    sqrt_alpha, sqrt_one_minus, recip, recipm1 = (c.view(-1, 1, 1, 1) for c in (sqrt_alpha, sqrt_one_minus, recip,
                                                                                  recipm1))  # fmt: skip
    if prediction_type == "v_prediction":
        z_pred = sqrt_alpha * noisy - sqrt_one_minus * prediction
        eps_pred = sqrt_alpha * prediction + sqrt_one_minus * noisy
        return eps_pred - z_pred
    z_pred = recip * noisy - recipm1 * prediction
    return prediction - z_pred


def simpletuner_loss(prediction, noisy, latents, noise, timesteps, prediction_type, alphas_cumprod):
    """ModelFoundation.loss with diff2flow_loss: mse against noise - latents, mean per sample, mean."""
    flow = simpletuner_flow(prediction, noisy, timesteps, prediction_type, alphas_cumprod)
    loss = F.mse_loss(flow.float(), (noise - latents).float(), reduction="none")
    return loss.mean(dim=list(range(1, loss.ndim))).mean()


@pytest.mark.parametrize("prediction_type,zero_snr", [("epsilon", False), ("v_prediction", False),
                                                      ("v_prediction", True)])  # fmt: skip
def test_loss_replays_simpletuners_bridge(prediction_type, zero_snr):
    from diffusers import DDPMScheduler

    x, noise, prediction = tensors()
    run = objective(prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr, **ON)
    noised = run.fixed(x, T, noise)
    scheduler = DDPMScheduler(**SD_SCHEDULER, rescale_betas_zero_snr=zero_snr, prediction_type=prediction_type)
    noisy = scheduler.add_noise(x, noise, T)  # SimpleTuner's noisy latents
    torch.testing.assert_close(noised.noisy, noisy)
    abar = scheduler.alphas_cumprod
    flow = run.diff2flow.prediction_to_flow(prediction, noised.noisy, noised.timesteps, prediction_type)
    torch.testing.assert_close(flow, simpletuner_flow(prediction, noisy, T, prediction_type, abar))
    expected = simpletuner_loss(prediction, noisy, x, noise, T, prediction_type, abar)
    loss = run.loss(prediction, noised, step=0)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)
    # not the native loss: the same prediction scores differently
    native = objective(prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    assert abs(float(native.loss(prediction, native.fixed(x, T, noise), step=0)) - float(loss)) > 1e-3


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_exact_native_target_is_the_exact_flow(prediction_type):
    """A model that predicts its native target perfectly predicts the velocity noise - latents (loss ~ 0)."""
    x, noise, _ = tensors(1)
    run = objective(prediction_type=prediction_type, **ON)
    noised = run.fixed(x, torch.tensor([10, 400, 800, 990]), noise)
    torch.testing.assert_close(noised.flow_target, noise - x)
    assert float(run.loss(noised.target, noised, step=0)) < 1e-8


def test_loss_options_simpletuner_skips_are_skipped_with_a_warning(st_log):
    x, noise, prediction = tensors(2)
    plain = objective(**ON)
    records = st_log("train")
    other = objective(loss_type="huber", snr_gamma=5.0, snr_weight=2.0, **ON)
    assert torch.equal(other.loss(prediction, other.fixed(x, T, noise), 0),
                       plain.loss(prediction, plain.fixed(x, T, noise), 0))  # fmt: skip
    assert any("loss_type huber, snr_gamma 5.0, snr_weight 2 has no effect" in r.getMessage() for r in records)


def test_the_mask_still_weights_the_flow_loss():
    from pipeline.train.objectives import LossMask

    x, noise, prediction = tensors(3, batch=1)
    run = objective(**ON)
    noised = run.fixed(x, torch.tensor([500]), noise)
    pixels = torch.ones(1, 3, 64, 64)
    pixels[..., :32] = -1.0  # left half black: no loss there
    masked = run.loss(prediction, noised, 0, LossMask(pixels, "mask"))
    flow = run.diff2flow.prediction_to_flow(prediction, noised.noisy, noised.timesteps, "epsilon")
    right = (flow - (noise - x))[..., 4:].square()
    torch.testing.assert_close(masked, right.sum() / flow.numel())


def test_cases_where_simpletuner_changes_nothing(st_log):
    x, noise, prediction = tensors(4)
    native = objective()
    expected = native.loss(prediction, native.fixed(x, T, noise), 0)
    records = st_log("train")
    for options in ({"diff2flow_enabled": True}, {"diff2flow_loss": True}):  # the bridge alone / the loss alone
        run = objective(**options)
        assert torch.equal(run.loss(prediction, run.fixed(x, T, noise), 0), expected)
    flow = objective("flow_matching", **ON)  # flow-matching models get no bridge
    assert flow.diff2flow is None
    assert torch.equal(flow.loss(prediction, flow.fixed(x, T / 1000, noise), 0),
                       objective("flow_matching").loss(prediction, flow.fixed(x, T / 1000, noise), 0))  # fmt: skip
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("diff2flow_loss has no effect without diff2flow_enabled") for m in messages)
    assert any(m.startswith("diff2flow_enabled has no effect on a flow-matching model") for m in messages)


def test_epsilon_at_zero_terminal_snr_is_refused():
    with pytest.raises(ConfigError, match="diff2flow_loss with epsilon prediction and rescale_betas_zero_snr"):
        objective(rescale_betas_zero_snr=True, **ON)
    objective(rescale_betas_zero_snr=True, diff2flow_enabled=True)  # the bridge alone trains as before
    objective(rescale_betas_zero_snr=True, refiner_training=True, **ON)  # no timestep reaches abar = 0


def test_regularisation_datasets_are_refused_under_diff2flow_loss():
    datasets = {"subject": {"id": "subject"}, "men": {"id": "men", "is_regularisation_data": True}}
    with pytest.raises(ConfigError, match="dataset 'men' has is_regularisation_data, which diff2flow_loss"):
        diff2flow.check(datasets, True, True, "epsilon")
    diff2flow.check(datasets, True, False, "epsilon")
    diff2flow.check(datasets, True, True, "flow_matching")


def test_tiny_sd1x_prediction_converts_as_simpletuner(cached, tmp_path):
    """The real tiny SD 1.x UNet's prediction, through the trainer's forward pass: the loss equals SimpleTuner's
    formula replayed on the same prediction."""
    trainer = build_trainer(cached("sd1x"), tmp_path / "train", "diff2flow_enabled=true", "diff2flow_loss=true")
    batch = first_batch(trainer)
    noised = trainer.objective.draw(batch.latents, torch.Generator().manual_seed(0), step=0)
    with torch.no_grad():
        prediction = trainer.family.denoiser_forward(trainer.model, noised.noisy, noised.timesteps,
                                                     trainer._text(batch.texts, 0), batch.meta).float()
        loss = trainer.forward_loss(noised, batch.texts, batch.meta, None, 0, batch=batch)
    abar = trainer.objective.scheduler.alphas_cumprod
    expected = simpletuner_loss(prediction, noised.noisy, batch.latents.float(), noised.noise, noised.timesteps,
                                "epsilon", abar)  # fmt: skip
    torch.testing.assert_close(loss, expected)
    assert abs(float(loss) - float(F.mse_loss(prediction, noised.noise))) > 1e-3
