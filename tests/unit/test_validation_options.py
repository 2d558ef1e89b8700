"""SimpleTuner's small validation, loss and seeding options: `validation_randomize` (a seed per validation),
`validation_seed_source`, `inference_scheduler_timestep_spacing` and `unet_attention_slice` on the renders of a tiny
SD 1.x run; `snr_weight` on the loss."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError
from pipeline.families import get_family
from pipeline.prompts import ValidationPrompt
from pipeline.train.objectives import Objective
from pipeline.train.options import ValidationOptions
from pipeline.train.validation import Validator, attention_sliced_modules, render_seed, timestep_spacing
from tests.helpers.trainers import build_trainer, randomise_lora

TEXT = "a red circle on a white background"


def options(**values) -> ValidationOptions:
    return dataclasses.replace(ValidationOptions.from_config(load_config(None).config), **values)


def test_render_seed_is_fixed_or_drawn_per_validation_from_the_run_seed():
    assert render_seed(options(seed=3), "step-1") == render_seed(options(seed=3), "step-2") == 3
    assert render_seed(options(seed=3, validation_seed=9), "step-1") == 9
    assert render_seed(options(), "base") == 0
    drawn = [render_seed(options(seed=3, validation_randomize=True), f"step-{n}") for n in range(20)]
    assert len(set(drawn)) == 20 and all(0 <= s < 2**32 for s in drawn)  # a new seed for each validation
    again = [render_seed(options(seed=3, validation_randomize=True, validation_seed=9), f"step-{n}")
             for n in range(20)]  # fmt: skip
    assert again == drawn  # reproducible under the run's seed; validation_seed is not read
    other = [render_seed(options(seed=4, validation_randomize=True), f"step-{n}") for n in range(20)]
    assert not set(other) & set(drawn)
    randomized = options(seed=3, validation_randomize=True)
    assert render_seed(randomized, "step-5-ema") == render_seed(randomized, "step-5")  # the EMA twin's noise


def test_timestep_spacing_reaches_ddpm_schedulers_and_is_refused_for_flow_matching():
    from diffusers import FlowMatchEulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler

    sd1x, flux = get_family("sd1x"), get_family("flux")
    leading = PNDMScheduler(skip_prk_steps=True, timestep_spacing="leading")
    trailing = timestep_spacing(leading, "trailing", sd1x)
    assert trailing.config.timestep_spacing == "trailing" and leading.config.timestep_spacing == "leading"
    trailing.set_timesteps(4)
    leading.set_timesteps(4)
    assert trailing.timesteps.tolist()[0] == 999 and leading.timesteps.tolist()[0] == 750
    assert timestep_spacing(leading, "leading", sd1x) is leading
    flow = FlowMatchEulerDiscreteScheduler()
    assert timestep_spacing(flow, "trailing", flux) is flow  # the default: SimpleTuner ignores it there
    with pytest.raises(ConfigError, match="inference_scheduler_timestep_spacing 'leading': model_family flux .* "
                                          "FlowMatchEulerDiscreteScheduler"):
        timestep_spacing(flow, "leading", flux)
    with pytest.raises(ConfigError, match="UniPCMultistepScheduler"):  # Wan's: sigmas from the flow schedule
        timestep_spacing(UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"),
                         "linspace", get_family("wan"))  # fmt: skip


def test_attention_slicing_is_refused_for_a_transformer():
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                                         pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))  # fmt: skip
    with pytest.raises(ConfigError, match="unet_attention_slice: model_family flux's FluxTransformer2DModel has no "
                                          "sliced attention"):
        attention_sliced_modules(transformer, None, get_family("flux"))


@pytest.fixture(scope="module")
def sd1x_run(cached, tmp_path_factory):
    """An SD 1.x trainer with a random (non-zero) LoRA, and its cached prompt embeddings."""
    from pipeline.cache_reader import CacheReader

    root, config = cached("sd1x")
    trainer = build_trainer((root, config), tmp_path_factory.mktemp("out"), "validation_num_inference_steps=3",
                            'validation_resolution="64"', "validation_guidance=1.0", "seed=7")  # fmt: skip
    randomise_lora(trainer)
    return trainer, {TEXT: CacheReader(root / "cache").prompt(TEXT)}


def render(sd1x_run, out, label: str = "step-1", **values) -> np.ndarray:
    trainer, embeds = sd1x_run
    validator = Validator(trainer.family, dataclasses.replace(trainer.validation_options, **values),
                          source=trainer.source, vae_source=None, denoiser=trainer.unwrapped,
                          prompts=[ValidationPrompt("p", TEXT)], embeds=embeds, out_dir=out, device="cpu")  # fmt: skip
    with Image.open(validator.render(1, label)[0]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_randomized_validations_draw_new_reproducible_seeds(sd1x_run, tmp_path):
    fixed = render(sd1x_run, tmp_path / "a")
    assert np.array_equal(render(sd1x_run, tmp_path / "b", "step-2"), fixed)  # a fixed seed: the same noise
    first = render(sd1x_run, tmp_path / "c", validation_randomize=True)
    second = render(sd1x_run, tmp_path / "d", "step-2", validation_randomize=True)
    assert not np.array_equal(first, second) and not np.array_equal(first, fixed)  # the same weights, new noise
    assert np.array_equal(render(sd1x_run, tmp_path / "e", validation_randomize=True), first)  # reproducible
    # On a machine without an accelerator, validation_seed_source gpu draws on the training device: the CPU.
    assert np.array_equal(render(sd1x_run, tmp_path / "f", validation_seed_source="gpu"), fixed)


def test_timestep_spacing_changes_the_validation_schedule(sd1x_run, tmp_path):
    trailing = render(sd1x_run, tmp_path / "a")  # the default, as SimpleTuner's
    assert not np.array_equal(render(sd1x_run, tmp_path / "b", inference_scheduler_timestep_spacing="leading"),
                              trailing)  # fmt: skip


def test_attention_slicing_renders_the_same_image_and_leaves_training_attention(sd1x_run, tmp_path):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    trainer, _ = sd1x_run
    unet = trainer.unwrapped
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    seen = set()
    attention = next(m for m in unet.modules() if hasattr(m, "processor"))
    hook = attention.register_forward_pre_hook(lambda module, args: seen.add(type(module.processor)))
    try:
        sliced = render(sd1x_run, tmp_path / "a", unet_attention_slice=True)
    finally:
        hook.remove()
    assert seen == {SlicedAttnProcessor}
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before
    plain = render(sd1x_run, tmp_path / "b")
    assert np.abs(sliced - plain).max() <= 2  # the same attention, computed in slices


SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "beta_end": 0.012, "num_train_timesteps": 1000, "skip_prk_steps": True}  # fmt: skip


def test_snr_weight_multiplies_the_ddpm_l2_loss_only(st_log):
    g = torch.Generator().manual_seed(0)
    x, noise, prediction = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([10, 300, 700, 990])

    def loss(kind: str = "epsilon", **options) -> torch.Tensor:
        objective = Objective(Config(**options), kind=kind, scheduler_config=None if kind == "flow_matching" else
                              SD_SCHEDULER)  # fmt: skip
        times = t / 1000 if kind == "flow_matching" else t
        return objective.loss(prediction, objective.fixed(x, times, noise), step=0)

    for kind in ("epsilon", "v_prediction"):  # SimpleTuner: loss = snr_weight * mse(pred, target)
        torch.testing.assert_close(loss(kind, snr_weight=2.5), 2.5 * loss(kind), rtol=1e-6, atol=0)
    records = st_log("train")
    for kind, options in (("epsilon", {"snr_gamma": 5.0}), ("epsilon", {"loss_type": "huber"}),
                          ("flow_matching", {})):  # fmt: skip
        assert torch.equal(loss(kind, snr_weight=2.5, **options), loss(kind, **options))
    assert [r.getMessage().split(" (")[0] for r in records if "snr_weight" in r.getMessage()] == [
        "snr_weight 2.5 has no effect with snr_gamma 5.0", "snr_weight 2.5 has no effect with loss_type huber",
        "snr_weight 2.5 has no effect with flow matching"]  # fmt: skip


def test_eval_timesteps_sets_the_points_each_sample_is_evaluated_at(sd1x_run):
    from pipeline.train import evaluation

    assert evaluation.eval_fractions(5) == pytest.approx((0.1, 0.3, 0.5, 0.7, 0.9))
    assert evaluation.eval_fractions(1) == (0.5,) and len(evaluation.eval_fractions(28)) == 28
    assert load_config(None).config.eval_timesteps == 28  # SimpleTuner's default
    trainer, _ = sd1x_run
    calls = []
    hook = trainer.unwrapped.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        values = {}
        for count in (1, 3):
            trainer.evaluation = dataclasses.replace(trainer.evaluation, eval_timesteps=count)
            calls.clear()
            values[count] = trainer.evaluate()["eval_loss"]
            assert len(calls) == count * len(trainer.eval_sets["eval_loss"])  # one forward per sample and point
    finally:
        hook.remove()
    assert values[1] != values[3]


def test_seed_for_each_device_gives_each_rank_its_own_training_stream(sd1x_run):
    from pipeline.train.seeding import training_seed

    assert [training_seed(7, rank) for rank in range(3)] == [7000, 7001, 7002]  # the default: one per rank
    assert [training_seed(7, rank, seed_for_each_device=False) for rank in range(3)] == [7000, 7000, 7000]
    trainer, _ = sd1x_run  # seed 7, one process: rank 0's stream
    assert trainer.generator.initial_seed() == 7000 and load_config(None).config.seed_for_each_device is True
