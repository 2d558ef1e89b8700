"""Training objectives: noising formulas, timestep/sigma sampling, loss weighting and determinism (pure torch)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.train.objectives import Objective, auto_shift, image_seq_len, segment_distributions, timestep_weights

SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
}


def ddpm(kind: str = "epsilon", scheduler: dict | None = None, **options) -> Objective:
    return Objective(Config(**options), kind=kind, scheduler_config=scheduler or SD_SCHEDULER)


def flow(default_shift: float | None = None, **options) -> Objective:
    return Objective(Config(**options), kind="flow_matching", scheduler_config=None, default_shift=default_shift)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def latents(batch: int = 4, channels: int = 4, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=gen(seed))


def many_timesteps(objective: Objective, batch: int = 8, rounds: int = 500) -> torch.Tensor:
    g = gen(3)
    return torch.stack([objective.sample_timesteps(batch, g) for _ in range(rounds)])


# --- DDPM noising and targets ---------------------------------------------------------------------------------


def test_epsilon_noisy_and_target_follow_the_ddpm_formulas():
    objective = ddpm()
    x = latents()
    noised = objective.draw(x, gen(), step=0)
    abar = objective.alphas_cumprod[noised.timesteps].view(-1, 1, 1, 1)
    assert noised.timesteps.dtype == torch.int64
    assert torch.equal(noised.target, noised.noise)
    torch.testing.assert_close(noised.noisy, abar.sqrt() * x + (1 - abar).sqrt() * noised.noise)


def test_v_prediction_target_matches_formula_and_diffusers():
    objective = ddpm(prediction_type="v_prediction")
    assert objective.prediction_type == "v_prediction"
    x, noise = latents(), latents(seed=2)
    t = torch.tensor([0, 250, 500, 999])
    noised = objective.fixed(x, t, noise)
    abar = objective.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noised.target, abar.sqrt() * noise - (1 - abar).sqrt() * x)
    torch.testing.assert_close(noised.target, objective.scheduler.get_velocity(x, noise, t))


def test_ddpm_fixed_takes_timesteps_or_schedule_fractions():
    objective = ddpm()
    x, noise = latents(), latents(seed=2)
    by_fraction = objective.fixed(x, torch.tensor([0.0, 0.5, 0.9, 1.0]), noise)
    assert torch.equal(by_fraction.timesteps, torch.tensor([0, 500, 899, 999]))
    by_step = objective.fixed(x, torch.tensor([0, 500, 899, 999]), noise)
    assert torch.equal(by_fraction.noisy, by_step.noisy)
    assert torch.equal(objective.fixed(x, torch.tensor([0.5]), noise).timesteps, torch.full((4,), 500))
    with pytest.raises(ValueError):
        objective.fixed(x, torch.tensor([1000]), noise)


def test_scheduler_config_prediction_type_is_the_default_and_config_overrides_it():
    assert ddpm(scheduler={**SD_SCHEDULER, "prediction_type": "v_prediction"}).prediction_type == "v_prediction"
    objective = ddpm(scheduler={**SD_SCHEDULER, "prediction_type": "v_prediction"}, prediction_type="epsilon")
    assert objective.prediction_type == "epsilon"


def test_flow_prediction_type_on_a_ddpm_family_is_a_config_error():
    with pytest.raises(ConfigError, match="prediction_type 'flow_matching'"):
        ddpm(prediction_type="flow_matching")
    with pytest.raises(ConfigError, match="prediction_type 'epsilon'"):
        flow(prediction_type="epsilon")


# --- Flow matching --------------------------------------------------------------------------------------------


def test_flow_noisy_target_and_timesteps_follow_the_formulas():
    objective = flow()
    x = latents()
    noised = objective.draw(x, gen(), step=0)
    sigma = noised.sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(noised.noisy, (1 - sigma) * x + sigma * noised.noise)
    torch.testing.assert_close(noised.target, noised.noise - x)
    torch.testing.assert_close(noised.timesteps, noised.sigmas * 1000)
    assert noised.timesteps.dtype == torch.float32


def test_flow_fixed_uses_the_given_sigmas_unshifted():
    objective = flow(flow_schedule_shift=3.0)
    x, noise = latents(), latents(seed=2)
    noised = objective.fixed(x, torch.tensor([0.0, 0.25, 0.5, 1.0]), noise)
    torch.testing.assert_close(noised.timesteps, torch.tensor([0.0, 250.0, 500.0, 1000.0]))
    torch.testing.assert_close(noised.noisy[3], noise[3])
    torch.testing.assert_close(noised.noisy[0], x[0])


def test_shift_moves_sigmas_up():
    plain = flow().sample_sigmas(4000, gen(), shift=1.0)
    shifted_objective = flow(flow_schedule_shift=3.0)
    shifted = shifted_objective.sample_sigmas(4000, gen(), shift=shifted_objective.shift_for(latents()))
    assert shifted.mean() > plain.mean() + 0.1
    # Same draws, monotone map: every sigma moves up.
    assert torch.all(shifted >= plain)


def test_family_default_shift_applies_when_unset_and_config_wins():
    assert flow(default_shift=3.0).shift == 3.0
    assert flow(default_shift=3.0, flow_schedule_shift=1.5).shift == 1.5
    assert flow().shift == 1.0


def test_flux_and_sd3_default_to_simpletuners_shift_3():
    # SimpleTuner's flow_schedule_shift defaults to 3.0 for every flow family it shares with st.
    from pipeline.families import flux, sd3

    assert flux.FAMILY.default_flow_shift == 3.0 and sd3.FAMILY.default_flow_shift == 3.0


def test_auto_shift_follows_flux_line():
    assert auto_shift(256) == pytest.approx(math.exp(0.5))
    assert auto_shift(4096) == pytest.approx(math.exp(1.15))
    assert image_seq_len(torch.zeros(1, 16, 128, 128)) == 4096
    objective = flow(flow_schedule_auto_shift=True)
    assert objective.shift_for(torch.zeros(1, 16, 128, 128)) == pytest.approx(math.exp(1.15))
    assert objective.shift_for(torch.zeros(1, 16, 32, 32)) == pytest.approx(math.exp(0.5))


def test_uniform_and_beta_sigma_schedules():
    uniform = flow(flow_use_uniform_schedule=True).sample_sigmas(4000, gen())
    assert uniform.min() >= 0 and uniform.max() < 1 and uniform.mean() == pytest.approx(0.5, abs=0.02)
    beta = flow(flow_use_beta_schedule=True, flow_beta_schedule_alpha=2.0, flow_beta_schedule_beta=5.0)
    sigmas = beta.sample_sigmas(4000, gen())
    assert sigmas.min() > 0 and sigmas.max() < 1
    assert sigmas.mean() == pytest.approx(2 / 7, abs=0.02)
    small = flow(flow_use_beta_schedule=True, flow_beta_schedule_alpha=0.5, flow_beta_schedule_beta=0.5)
    assert small.sample_sigmas(4000, gen()).mean() == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ConfigError, match="exclude each other"):
        flow(flow_use_uniform_schedule=True, flow_use_beta_schedule=True)


def test_flux_guidance_constant_and_random_range():
    assert torch.equal(flow(flux_guidance_value=3.5).guidance(3, gen()), torch.full((3,), 3.5))
    values = flow(flux_guidance_mode="random-range", flux_guidance_min=1.0, flux_guidance_max=4.0).guidance(500, gen())
    assert values.min() >= 1.0 and values.max() <= 4.0 and values.std() > 0.5
    assert ddpm().guidance(3, gen()) is None


# --- Timestep sampling ----------------------------------------------------------------------------------------


def test_later_bias_draws_larger_timesteps_and_earlier_smaller():
    options = {"disable_segmented_timestep_sampling": True, "timestep_bias_multiplier": 3.0}
    none = many_timesteps(ddpm(**options)).float().mean()
    later = many_timesteps(ddpm(timestep_bias_strategy="later", **options)).float().mean()
    earlier = many_timesteps(ddpm(timestep_bias_strategy="earlier", **options)).float().mean()
    assert later > none + 50 and earlier < none - 50
    # Segmented (batch 2: segments [499, 999] and [0, 499]), the bias acts inside the segment it overlaps.
    segmented = {"timestep_bias_multiplier": 3.0}
    none = many_timesteps(ddpm(**segmented), batch=2).float()
    later = many_timesteps(ddpm(timestep_bias_strategy="later", **segmented), batch=2).float()
    earlier = many_timesteps(ddpm(timestep_bias_strategy="earlier", **segmented), batch=2).float()
    assert later[:, 0].mean() > none[:, 0].mean() + 50 and later[:, 1].mean() == pytest.approx(none[:, 1].mean(), abs=25)
    assert earlier[:, 1].mean() < none[:, 1].mean() - 50


def test_range_bias_weights_the_range_by_the_multiplier():
    options = {"timestep_bias_strategy": "range", "timestep_bias_begin": 200, "timestep_bias_end": 300}
    weights = timestep_weights(Config(**options, timestep_bias_multiplier=9.0), 1000)
    assert torch.all(weights[200:300] == 9.0) and torch.all(weights[:200] == 1.0) and torch.all(weights[300:] == 1.0)
    # Unsegmented: segments (SimpleTuner's) each keep their share of draws, whatever the bias outside them.
    options["disable_segmented_timestep_sampling"] = True
    drawn = many_timesteps(ddpm(**options, timestep_bias_multiplier=9.0))
    inside = ((drawn >= 200) & (drawn < 300)).float().mean()
    assert inside == pytest.approx(900 / 1800, abs=0.03)  # 100 steps x 9 against 900 steps x 1
    assert drawn.min() >= 0 and drawn.max() < 1000
    # A very large multiplier keeps practically every draw inside [begin, end).
    focused = many_timesteps(ddpm(**options, timestep_bias_multiplier=1e9))
    assert focused.min() >= 200 and focused.max() < 300


def test_bad_bias_options_are_config_errors():
    with pytest.raises(ConfigError, match="timestep_bias_begin/end"):
        ddpm(timestep_bias_strategy="range", timestep_bias_begin=500, timestep_bias_end=1200)
    with pytest.raises(ConfigError, match="timestep_bias_multiplier"):
        ddpm(timestep_bias_strategy="later", timestep_bias_multiplier=0.0)


def test_segmented_sampling_puts_one_timestep_in_each_segment():
    # SimpleTuner's segmented_timestep_selection: segments of 1000 // 8 = 125 counted down from 999, sample i in
    # [874 - 125 i, 999 - 125 i] (the last down to 0); neighbours share their boundary timestep.
    drawn = many_timesteps(ddpm(), batch=8)
    tops = 999 - 125 * torch.arange(8)
    bottoms = (tops - 125).clamp_min(0)
    bottoms[-1] = 0
    assert torch.all((drawn >= bottoms) & (drawn <= tops))
    assert torch.equal(drawn.min(dim=0).values, bottoms)  # every timestep of a segment is reachable
    unsegmented = many_timesteps(ddpm(disable_segmented_timestep_sampling=True), batch=8)
    assert not torch.all((unsegmented >= bottoms) & (unsegmented <= tops))
    assert unsegmented.min() >= 0 and unsegmented.max() < 1000


def test_segment_distributions_follow_simpletuner_by_hand():
    # SimpleTuner custom_schedule.segmented_timestep_selection with T = 8, batch 2: segment size 4, segments [3, 7]
    # and [0, 3]; each segment's weights are normalised in place, so timestep 3 enters the second segment with the
    # weight the first gave it. Unbiased weights are ones: 3 keeps 1/5, giving [1, 1, 1, 0.2] / 3.2.
    unbiased = segment_distributions(torch.ones(8), 2, biased=False)
    assert [bottom for bottom, _ in unbiased] == [3, 0]
    torch.testing.assert_close(unbiased[0][1], torch.full((5,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(unbiased[1][1], torch.tensor([0.3125, 0.3125, 0.3125, 0.0625], dtype=torch.float64))
    # "later", portion 0.5, x2: weights [1, 1, 1, 1, 2, 2, 2, 2] / 12 (normalised first when biased). First segment
    # [1, 2, 2, 2, 2] / 9; timestep 3 keeps 1/9, so the second is [1/12, 1/12, 1/12, 1/9] / (13/36) = [3, 3, 3, 4] / 13.
    weights = timestep_weights(Config(timestep_bias_strategy="later", timestep_bias_portion=0.5,
                                      timestep_bias_multiplier=2.0), 8)  # fmt: skip
    later = segment_distributions(weights, 2, biased=True)
    torch.testing.assert_close(later[0][1], torch.tensor([1, 2, 2, 2, 2], dtype=torch.float64) / 9)
    torch.testing.assert_close(later[1][1], torch.tensor([3, 3, 3, 4], dtype=torch.float64) / 13)


def test_segmented_later_bias_keeps_a_quarter_above_750_at_batch_4():
    # Issue 12's check: later x2 (portion 0.25), batch 4. Segment 0 is [749, 999]: all but 749 are biased, so
    # P(t >= 750) = 1/4 * 500/501 (st's former quantile stratification gave 0.40).
    drawn = many_timesteps(ddpm(timestep_bias_strategy="later", timestep_bias_multiplier=2.0), batch=4, rounds=2000)
    assert (drawn >= 750).float().mean() == pytest.approx(0.25 * 500 / 501, abs=0.005)


# --- Zero terminal SNR ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_rescale_betas_zero_snr_makes_last_alpha_cumprod_zero_and_training_finite(prediction_type):
    plain = ddpm(prediction_type=prediction_type)
    assert plain.alphas_cumprod[-1] > 0
    objective = ddpm(prediction_type=prediction_type, rescale_betas_zero_snr=True, snr_gamma=5.0,
                     loss_type="huber", huber_schedule="snr")  # fmt: skip
    assert objective.alphas_cumprod[-1] == 0
    x, noise = latents(), latents(seed=2)
    noised = objective.fixed(x, torch.tensor([999, 999, 500, 0]), noise)
    torch.testing.assert_close(noised.noisy[0], noise[0])
    assert torch.isfinite(noised.snr).all() and noised.snr[0] == 0
    loss = objective.loss(torch.zeros_like(x), noised, step=0)
    assert torch.isfinite(loss)
    assert torch.isfinite(objective.huber_c(noised)).all()


# --- Loss weighting -------------------------------------------------------------------------------------------


def test_min_snr_weights_equal_the_formula():
    t = torch.tensor([10, 300, 700, 990])
    x, noise = latents(), latents(seed=2)
    for prediction_type, divisor in (("epsilon", 0.0), ("v_prediction", 1.0)):
        objective = ddpm(prediction_type=prediction_type, snr_gamma=5.0)
        abar = objective.alphas_cumprod[t]
        snr = abar / (1 - abar)
        expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + divisor)
        noised = objective.fixed(x, t, noise)
        torch.testing.assert_close(objective.loss_weights(noised), expected)
        prediction = torch.zeros_like(x)
        per_sample = (prediction - noised.target).square().mean(dim=(1, 2, 3))
        torch.testing.assert_close(objective.loss(prediction, noised, step=0), (per_sample * expected).mean())


def test_soft_min_snr_is_applied_and_differs_from_hard():
    t = torch.tensor([10, 300, 700, 990])
    x, noise = latents(), latents(seed=2)
    hard = ddpm(snr_gamma=5.0)
    soft = ddpm(snr_gamma=5.0, use_soft_min_snr=True, soft_min_snr_sigma_data=0.5)
    noised = soft.fixed(x, t, noise)
    snr = noised.snr
    expected = 5.0 / (0.25 * snr + 5.0)
    torch.testing.assert_close(soft.loss_weights(noised), expected)
    assert not torch.allclose(soft.loss_weights(noised), hard.loss_weights(noised))
    prediction = torch.zeros_like(x)
    unweighted = ddpm().loss(prediction, noised, step=0)
    assert not torch.isclose(soft.loss(prediction, noised, step=0), unweighted)
    v_soft = ddpm(prediction_type="v_prediction", snr_gamma=5.0, use_soft_min_snr=True, soft_min_snr_sigma_data=0.5)
    v_noised = v_soft.fixed(x, t, noise)
    torch.testing.assert_close(v_soft.loss_weights(v_noised), expected * snr / (snr + 1))


def test_soft_min_snr_needs_sigma_data():
    with pytest.raises(ConfigError, match="soft_min_snr_sigma_data"):
        ddpm(use_soft_min_snr=True)


def test_flow_loss_is_plain_mse():
    objective = flow(snr_gamma=5.0)
    x = latents()
    noised = objective.draw(x, gen(), step=0)
    prediction = torch.randn(x.shape, generator=gen(9))
    assert objective.loss_weights(noised) is None
    torch.testing.assert_close(objective.loss(prediction, noised, step=0), F.mse_loss(prediction, noised.target))


@pytest.mark.parametrize(("loss_type", "expected"), [
    # SimpleTuner models/common.py conditional_loss (pseudo-Huber), c = 0.3, |d| = 0.4 and 0: sqrt(0.16 + 0.09) = 0.5.
    ("huber", [2 * 0.3 * (0.5 - 0.3), 0.0]),  # 2c(sqrt(d^2 + c^2) - c) = 0.12
    ("smooth_l1", [2 * (0.5 - 0.3), 0.0]),  # 2(sqrt(d^2 + c^2) - c) = 0.4
])  # fmt: skip
def test_huber_and_smooth_l1_are_simpletuners_pseudo_huber(loss_type, expected):
    objective = ddpm(loss_type=loss_type, huber_schedule="constant", huber_c=0.3)
    x = latents(batch=2)
    noised = objective.draw(x, gen(), step=0)
    offset = torch.tensor([0.4, 0.0]).view(2, 1, 1, 1)
    prediction = noised.target + offset.expand_as(x)
    torch.testing.assert_close(objective.loss(prediction, noised, step=0), torch.tensor(sum(expected) / 2))
    # Elementwise over a random residual: plain torch, mean over all elements.
    diff = torch.randn(x.shape, generator=gen(9))
    pseudo = 2 * (torch.sqrt(diff**2 + 0.09) - 0.3)
    reference = (0.3 * pseudo if loss_type == "huber" else pseudo).mean()
    torch.testing.assert_close(objective.loss(noised.target + diff, noised, step=0), reference)


def test_huber_schedules():
    x, noise = latents(), latents(seed=2)
    t = torch.tensor([0, 500, 999, 999])
    exponential = ddpm(loss_type="huber", huber_schedule="exponential", huber_c=0.1)
    c = exponential.huber_c(exponential.fixed(x, t, noise))
    torch.testing.assert_close(c, 0.1 ** (t.float() / 1000))
    snr = ddpm(loss_type="huber", huber_schedule="snr", huber_c=0.1, rescale_betas_zero_snr=True)
    noised = snr.fixed(x, t, noise)
    c = snr.huber_c(noised)
    ratio = ((1 - snr.alphas_cumprod[t]) / snr.alphas_cumprod[t].clamp_min(1e-30)).sqrt()
    torch.testing.assert_close(c[:2], 0.9 / (1 + ratio[:2]) ** 2 + 0.1)
    assert c[2] == pytest.approx(0.1)  # zero SNR: the smallest threshold
    assert c[0] > c[1] > c[2]


def test_flow_huber_snr_schedule_is_simpletuners():
    # SimpleTuner models/common.py compute_scheduled_huber_c, flow matching: r = sqrt((1 - s) / (s + 1e-4)),
    # c = (1 - c0) / (1 + r)^2 + c0. By hand for c0 = 0.1: s = 0.5: r = sqrt(0.5 / 0.5001) = 0.99990, c = 0.9 / 3.99960
    # + 0.1 = 0.325022; s = 1: r = 0, c = 1; s = 0: r = 100, c = 0.9 / 10201 + 0.1 = 0.100088 (grows with sigma).
    objective = flow(loss_type="huber", huber_schedule="snr", huber_c=0.1)
    x, noise = latents(batch=3), latents(batch=3, seed=2)
    c = objective.huber_c(objective.fixed(x, torch.tensor([0.5, 1.0, 0.0]), noise))
    torch.testing.assert_close(c, torch.tensor([0.325022, 1.0, 0.100088]), atol=2e-6, rtol=0)


def test_loss_is_a_float32_scalar_for_bf16_inputs():
    objective = ddpm()
    noised = objective.draw(latents().to(torch.bfloat16), gen(), step=0)
    loss = objective.loss(torch.zeros(noised.target.shape, dtype=torch.bfloat16), noised, step=0)
    assert loss.dtype == torch.float32 and loss.ndim == 0


# --- Noise options and determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: ddpm(offset_noise=True, noise_offset=0.1, noise_offset_probability=0.0),
    lambda: ddpm(offset_noise=False, noise_offset=0.1, noise_offset_probability=1.0),  # SimpleTuner needs offset_noise
])  # fmt: skip
def test_noise_offset_off_changes_nothing(make):
    x = latents()
    base = ddpm().draw(x, gen(), step=0)
    offset = make().draw(x, gen(), step=0)
    for field in ("noisy", "target", "timesteps", "noise"):
        assert torch.equal(getattr(base, field), getattr(offset, field))


def test_noise_offset_without_offset_noise_is_a_warning(caplog):
    ddpm(offset_noise=False, noise_offset=0.05)
    assert "noise_offset 0.05 has no effect without offset_noise = true" in caplog.text


def test_simpletuners_default_noise_offset_without_offset_noise_is_not_remarked(caplog):
    ddpm(offset_noise=False, noise_offset=0.1)  # SimpleTuner's default, in nearly every config it ships
    assert "noise_offset" not in caplog.text


def test_flow_matching_never_uses_offset_noise(caplog):
    x = latents()
    objective = flow(offset_noise=True, noise_offset=0.1, noise_offset_probability=1.0)
    assert "offset_noise" in caplog.text  # ignored with a warning, as for the other DDPM-only options
    assert torch.equal(objective.draw(x, gen(), step=0).noise, flow().draw(x, gen(), step=0).noise)


def test_noise_offset_is_one_coin_per_batch():
    # SimpleTuner models/common.py: one random() < noise_offset_probability per batch, not per sample.
    objective = ddpm(offset_noise=True, noise_offset=0.1, noise_offset_probability=0.5)
    x = latents()
    offsets_seen = []
    for seed in range(40):
        delta = objective.draw(x, gen(seed), step=0).noise - ddpm().draw(x, gen(seed), step=0).noise
        moved = delta.flatten(1).abs().amax(dim=1) > 0
        assert bool(moved.all()) or not bool(moved.any())  # every sample or none
        offsets_seen.append(bool(moved.any()))
    assert 5 < sum(offsets_seen) < 35


def test_noise_offset_probability_one_adds_a_per_channel_constant():
    x = latents()
    base = ddpm().draw(x, gen(), step=0)
    offset = ddpm(offset_noise=True, noise_offset=0.1, noise_offset_probability=1.0).draw(x, gen(), step=0)
    assert torch.equal(base.timesteps, offset.timesteps)
    delta = offset.noise - base.noise
    per_channel = delta.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(delta, per_channel.expand_as(delta), atol=1e-6, rtol=0)
    assert per_channel.abs().min() > 0
    assert per_channel.std() < 0.3  # scaled by noise_offset = 0.1


def test_input_perturbation_changes_the_input_not_the_target():
    x = latents()
    base = ddpm().draw(x, gen(), step=0)
    perturbed = ddpm(input_perturbation=0.1).draw(x, gen(), step=0)
    assert torch.equal(base.target, perturbed.target) and torch.equal(base.timesteps, perturbed.timesteps)
    assert not torch.allclose(base.noisy, perturbed.noisy)
    flow_base = flow().draw(x, gen(), step=0)
    flow_perturbed = flow(input_perturbation=0.1).draw(x, gen(), step=0)
    assert torch.equal(flow_base.target, flow_perturbed.target)
    assert not torch.allclose(flow_base.noisy, flow_perturbed.noisy)


def test_input_perturbation_decays_to_zero_over_its_steps():
    objective = ddpm(input_perturbation=0.2, input_perturbation_steps=100)
    assert objective.perturbation_scale(0) == pytest.approx(0.2)
    assert objective.perturbation_scale(50) == pytest.approx(0.1)
    assert objective.perturbation_scale(100) == 0.0
    x = latents()
    late = objective.draw(x, gen(), step=150)
    assert torch.equal(late.noisy, ddpm().draw(x, gen(), step=150).noisy)


@pytest.mark.parametrize("make", [lambda: ddpm(offset_noise=True, noise_offset=0.1, input_perturbation=0.1), lambda: flow(
    flow_use_beta_schedule=True, flow_schedule_auto_shift=True, noise_offset=0.1)])
def test_same_seed_gives_identical_draws(make):
    x = latents()
    first, second = make().draw(x, gen(7), step=3), make().draw(x, gen(7), step=3)
    for field in ("noisy", "target", "timesteps", "noise", "alphas", "sigmas"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert not torch.equal(first.noise, make().draw(x, gen(8), step=3).noise)
