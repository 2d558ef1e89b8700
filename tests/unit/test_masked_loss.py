"""Masked loss (mask / segmentation conditioning datasets): the mask weights the elementwise loss as SimpleTuner's
does, on the unpacked latent grid, and `masked_loss_probability` is drawn from the run's seeded generator."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.config import Config
from pipeline.train.objectives import LossMask, Objective
from tests.helpers.trainers import build_trainer, first_batch

SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": 1000}  # fmt: skip


def ddpm(**options) -> Objective:
    return Objective(Config(**options), kind="epsilon", scheduler_config=SD_SCHEDULER)


def halves(batch: int, height: int, width: int, left: float, right: float) -> torch.Tensor:
    """Mask pixels B x 3 x H x W in [-1, 1]: `left` on the left half of the image, `right` on the right half."""
    pixels = torch.full((batch, 3, height, width), right)
    pixels[..., : width // 2] = left
    return pixels


def test_mask_weights_are_the_first_channel_area_downsampled_and_rescaled():
    loss = torch.zeros(1, 4, 2, 2)
    pixels = torch.full((1, 3, 16, 16), 1.0)
    pixels[:, 0, :8, :8] = -1.0  # top-left latent cell black
    pixels[:, 0, :8, 8:] = -0.5  # top-right grey
    pixels[:, 0, 8:, :4] = -1.0  # bottom-left half black, half white
    pixels[:, 1:] = -1.0  # the other channels are not read
    weights = LossMask(pixels, "mask").weights(loss)
    assert weights.shape == (1, 1, 2, 2)
    assert weights[0, 0].tolist() == [[0.0, 0.25], [0.5, 1.0]]


def test_segmentation_binarises_the_channel_mean():
    loss = torch.zeros(1, 4, 2, 2)
    pixels = torch.full((1, 3, 16, 16), 1.0)
    pixels[..., :8, :8] = -1.0  # all black: ignored
    pixels[..., :8, 8:] = -0.9  # dark grey: kept at full weight
    pixels[..., 8:, :7] = -1.0  # black but for one pixel column: kept ...
    pixels[:, 0, 8:, 7] = -1.0  # ... even where only the green and blue channels are white
    weights = LossMask(pixels, "segmentation").weights(loss)
    assert weights[0, 0].tolist() == [[0.0, 1.0], [1.0, 1.0]]
    # the "mask" kind reads the same pixels as graded weights
    graded = LossMask(pixels, "mask").weights(loss)[0, 0]
    assert graded[0, 1].item() == pytest.approx(0.05, abs=1e-6) and graded[1, 0].item() == 0.0


def test_masked_loss_is_the_mean_over_all_elements_with_min_snr_and_huber():
    """The mask multiplies the elementwise loss before everything else the loss does (Huber, min-SNR weights):
    an all-white mask changes nothing, a half mask is the mean over all elements with the masked ones zero."""
    objective = ddpm(loss_type="huber", huber_schedule="snr", snr_gamma=5.0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 6, 6, generator=generator)
    noised = objective.draw(latents, generator, step=0)
    prediction = torch.randn(latents.shape, generator=generator)
    plain = objective.loss(prediction, noised, 0)
    white = objective.loss(prediction, noised, 0, LossMask(torch.ones(2, 3, 48, 48), "mask"))
    assert torch.equal(plain, white)
    half = objective.loss(prediction, noised, 0, LossMask(halves(2, 48, 48, -1.0, 1.0), "mask"))
    right_only = prediction.clone()
    right_only[..., :3] = noised.target[..., :3]  # a perfect prediction on the left: the same loss as masking it
    assert half.item() == pytest.approx(objective.loss(right_only, noised, 0).item(), rel=1e-6)
    assert half < plain


def test_masked_loss_probability_is_drawn_from_the_run_generator():
    pixels = halves(1, 16, 16, -1.0, 1.0)
    never, always, half = (ddpm(masked_loss_probability=p) for p in (0.0, 1.0, 0.5))
    generator = torch.Generator().manual_seed(7)
    assert all(never.choose_mask(pixels, "segmentation", generator) is None for _ in range(50))
    assert all(always.choose_mask(pixels, "mask", generator) is not None for _ in range(50))
    draws = [half.choose_mask(pixels, "mask", torch.Generator().manual_seed(s)) is not None for s in range(40)]
    assert 5 < sum(draws) < 35
    again = [half.choose_mask(pixels, "mask", torch.Generator().manual_seed(s)) is not None for s in range(40)]
    assert draws == again  # seeded: a resumed run replays the same choices
    before = generator.get_state()
    assert half.choose_mask(None, None, generator) is None  # a batch without a mask draws nothing
    assert torch.equal(generator.get_state(), before)
    with pytest.raises(ValueError, match="mask kind"):
        half.choose_mask(pixels, "controlnet", generator)


@pytest.fixture(scope="module")
def trainers(cached, tmp_path_factory):
    """Per family, a LoRA trainer on the family's cached sample data with masked_loss_probability 0."""
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = build_trainer(cached(family), tmp_path_factory.mktemp(f"masked-{family}"),
                                          "masked_loss_probability=0.0")  # fmt: skip
        return built[family]

    return get


@pytest.mark.parametrize("family", ["sd1x", "flux"])
def test_left_half_of_the_mask_gives_no_gradient(trainers, family):
    """The prediction of a real tiny denoiser (flux: unpacked from its tokens) under a mask that is black on the
    left half of the image: the loss's gradient is exactly zero there and nonzero on the right."""
    trainer = trainers(family)
    batch = first_batch(trainer)
    latents = batch.latents
    height, width = latents.shape[-2:]
    noised = trainer.objective.draw(latents, torch.Generator().manual_seed(0), step=0)
    guidance = trainer.objective.guidance(1, torch.Generator().manual_seed(0))
    prediction = trainer.family.denoiser_forward(trainer.model, noised.noisy, noised.timesteps,
                                                 trainer._text(batch.texts, 0), batch.meta, guidance=guidance)
    assert prediction.shape == latents.shape  # the loss is computed on the latent grid, as the mask is
    prediction.retain_grad()
    mask = LossMask(halves(1, height * 8, width * 8, -1.0, 1.0), "mask")
    trainer.objective.loss(prediction, noised, 0, mask).backward()
    grad = prediction.grad
    assert torch.count_nonzero(grad[..., : width // 2]) == 0
    assert torch.count_nonzero(grad[..., width // 2 :]) == grad[..., width // 2 :].numel()
    trainer.optimizer.zero_grad(set_to_none=True)


def test_probability_zero_trains_exactly_as_without_a_mask(trainers):
    trainer = trainers("sd1x")
    batch = first_batch(trainer)
    height, width = batch.latents.shape[-2:]
    masked = replace(batch, mask_pixels=halves(1, height * 8, width * 8, -1.0, 1.0), mask_kind="segmentation")
    state = trainer.generator.get_state()
    with torch.no_grad():
        plain = trainer._forward_loss(batch, 0)
        trainer.generator.set_state(state)
        with_mask = trainer._forward_loss(masked, 0)
    assert torch.equal(plain, with_mask)
