"""Cosmos (T2I) specifics: the denoiser call equals the pipeline's loop bit for bit, SimpleTuner's EDM loss is the
flow velocity loss times t^2 + (1 - t)^2, the pipeline runs without NVIDIA's guardrail package, and a real-layout
transformer without torchvision is refused with the fix."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from pipeline.errors import InputError
from pipeline.families import get_family

FAMILY = get_family("cosmos2image")
PROMPTS = ["a red circle", "a photo of a small dog sitting in the snow next to a tall tree"]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    loaded = FAMILY.load_pipeline_class().from_pretrained(tiny_model("cosmos2image"))
    loaded.set_progress_bar_config(disable=True)
    return loaded


def test_predict_is_the_pipelines_denoiser_call(pipe):
    """Every transformer call of a 3-step render (c_in-scaled EDM latents, t = s / (s + 1)) is reproduced exactly by
    `denoiser_forward` from the flow latents and the training timestep t * 1000."""
    transformer, calls = pipe.transformer, []
    forward = transformer.forward

    def record(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append((kwargs, out[0]))
        return out

    transformer.forward = record
    try:
        pipe(PROMPTS[1], height=32, width=48, num_inference_steps=3, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))  # fmt: skip
    finally:
        del transformer.forward
    batch = FAMILY.collate_text(FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS[1:]))
    assert len(calls) == 3
    for kwargs, out in calls:
        assert torch.equal(batch["prompt_embeds"], kwargs["encoder_hidden_states"])
        ours = FAMILY.denoiser_forward(transformer, kwargs["hidden_states"].squeeze(2), kwargs["timestep"] * 1000,
                                       batch)  # fmt: skip
        assert torch.equal(ours, out.squeeze(2))


def test_simpletuners_edm_loss_is_the_weighted_velocity_loss(pipe):
    """SimpleTuner's Cosmos loss ((s^2 + 1) / s^2 * |x0_pred - x0|^2, x0_pred = c_skip * x_s + c_out * r) on the
    EDM latent x_s = x + s * noise equals |r - (noise - x)|^2 * (t^2 + (1 - t)^2) on st's flow latent."""
    generator = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 16, 4, 6, generator=generator), torch.randn(2, 16, 4, 6, generator=generator)
    sigmas = torch.exp(torch.randn(2, generator=generator))  # SimpleTuner's draw: log s ~ N(0, 1)
    t = sigmas / (sigmas + 1)
    s4, t4 = sigmas.view(-1, 1, 1, 1), t.view(-1, 1, 1, 1)
    batch = FAMILY.collate_text(FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS))
    with torch.no_grad():
        r = FAMILY.denoiser_forward(pipe.transformer, (1 - t4) * x + t4 * noise, t * 1000, batch).float()
    x_s = x + s4 * noise
    x0_pred = x_s / (s4 + 1) - s4 / (s4 + 1) * r
    simpletuner = ((s4**2 + 1) / s4**2 * (x0_pred - x) ** 2).mean()
    velocity = ((r - (noise - x)) ** 2 * (t4**2 + (1 - t4) ** 2)).mean()
    torch.testing.assert_close(simpletuner, velocity, rtol=1e-5, atol=0)
    # st's objective for this family computes exactly that loss from the same prediction.
    objective = _objective()
    noised = objective.fixed(x, t, noise)
    torch.testing.assert_close(objective.loss(r, noised, 0), simpletuner, rtol=1e-5, atol=0)


def _objective(**options):
    from pipeline.config import Config
    from pipeline.train.objectives import Objective
    from pipeline.train.options import ObjectiveOptions

    return Objective(ObjectiveOptions.from_config(Config(**options)), kind=FAMILY.prediction_type,
                     scheduler_config=None, default_shift=FAMILY.default_flow_shift, flow_sigmas=FAMILY.flow_sigmas,
                     flow_loss_weight=FAMILY.flow_loss_weight)  # fmt: skip


def test_training_sigmas_follow_simpletuners_edm_draw_whatever_the_shift_options_say(caplog):
    """SimpleTuner draws Cosmos' sigmas as exp(N(0, 1)) clamped to [0.002, 80] and reads no shift option: st draws
    t = s / (1 + s) = sigmoid(N(0, 1)) from the same normals and ignores the shift options, saying so."""
    plain = _objective().sample_sigmas(4096, torch.Generator().manual_seed(0))
    shifted = _objective(flow_schedule_auto_shift=True, flow_schedule_shift=3.0)
    assert "flow_schedule_shift, flow_schedule_auto_shift ignored" in caplog.text
    latents = torch.zeros(1, 16, 64, 64)
    drawn = shifted.sample_sigmas(4096, torch.Generator().manual_seed(0), shifted.shift_for(latents))
    assert torch.equal(plain, drawn)
    normal = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    edm = torch.exp(normal).clamp(0.002, 80.0)
    torch.testing.assert_close(plain, (edm / (1 + edm)).float())


def test_real_layout_without_torchvision_is_refused():
    """The real models concatenate a padding mask that diffusers resizes with torchvision: without it, `predict`
    says what to install instead of failing inside the transformer with a NameError."""
    from types import SimpleNamespace

    import diffusers.utils

    if diffusers.utils.is_torchvision_available():
        pytest.skip("torchvision is installed")
    real_layout = SimpleNamespace(config=SimpleNamespace(concat_padding_mask=True))  # only its config is read
    with pytest.raises(InputError, match="install the torchvision build"):
        FAMILY.predict(real_layout, torch.zeros(1, 16, 4, 4), torch.tensor([500.0]),
                       {"prompt_embeds": torch.zeros(1, 4, 32)})  # fmt: skip


def test_fp8_quanto_is_refused_as_simpletuner_refuses_it():
    from pipeline.config import Config
    from pipeline.errors import ConfigError
    from pipeline.quantise import check

    with pytest.raises(ConfigError, match="base_model_precision fp8-quanto does not work with model_family cosmos2image"):
        check(Config(model_family="cosmos2image", base_model_precision="fp8-quanto"), cuda=False)
