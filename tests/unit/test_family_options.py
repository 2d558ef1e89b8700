"""SimpleTuner's family options: Flux attention-masked training, the fast schedule, SD3's caption-dropout
embeddings (tiny real models, no training run; tests/stages/test_family_options_runs.py trains with them)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import Config
from pipeline.errors import ConfigError, InputError
from pipeline.families import flux, get_family, sd3
from pipeline.families.loading import load_components
from pipeline.train.family_options import FamilyText, LoadBalancingLoss
from pipeline.train.objectives import FAST_SCHEDULE_SIGMAS, Objective

PROMPTS = ["a red circle", "a much longer prompt about a blue square on a white background"]


@pytest.fixture(scope="module")
def flux_parts(tiny_model):
    return load_components(get_family("flux"), tiny_model("flux"), which=("text_encoders", "denoiser"))


def flux_text(parts, prompts=PROMPTS, **kw):
    return flux.encode_prompts(parts["text_encoders"], parts["tokenizers"], prompts, max_length=96, **kw)


# --- flux_attention_masked_training ----------------------------------------------------------------------------


def test_flux_stores_the_t5_token_mask_only_when_asked(flux_parts):
    plain, masked = flux_text(flux_parts), flux_text(flux_parts, attention_mask=True)
    assert set(plain[0]) == {"prompt_embeds", "pooled_prompt_embeds"}
    tokens = flux_parts["tokenizers"][1](PROMPTS, padding="max_length", max_length=96, truncation=True,
                                         return_tensors="pt").attention_mask  # fmt: skip
    assert torch.equal(torch.stack([m["attention_mask"] for m in masked]), tokens)
    assert 0 < int(tokens[0].sum()) < int(tokens[1].sum()) < 96  # real tokens, then padding
    assert torch.equal(masked[0]["prompt_embeds"], plain[0]["prompt_embeds"])
    # st cache asks for it for Flux (and the variants built on it)
    assert get_family("flux").text_options(None) == {"attention_mask": True}


def test_joint_mask_is_the_text_mask_then_ones_added_to_the_scores():
    text_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    mask = flux.joint_attention_mask(text_mask, 3, torch.float32)
    assert mask.shape == (2, 1, 1, 7) and mask.dtype == torch.float32
    assert mask[0, 0, 0].tolist() == [1, 1, 0, 0, 1, 1, 1]


def texts_for(config: Config, family: str = "flux") -> FamilyText:
    return FamilyText.for_run(config, get_family(family))


def predict(parts, text, latents):
    transformer = parts["denoiser"]
    with torch.no_grad():
        return get_family("flux").denoiser_forward(transformer, latents, torch.tensor([500.0, 500.0]), text)


def test_masked_prediction_differs_and_a_mask_of_ones_changes_nothing(flux_parts):
    """SimpleTuner adds the 0/1 mask to the attention scores: padded keys lose weight, and an all-ones mask shifts
    every score equally, which softmax cancels."""
    items = flux_text(flux_parts, attention_mask=True)
    unmasked_batch = get_family("flux").collate_text(items)
    assert "attention_mask" not in unmasked_batch  # what FluxPipeline hands its transformer
    collated = texts_for(Config(flux_attention_masked_training=True)).denoiser_text(items, unmasked_batch)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    unmasked = predict(flux_parts, unmasked_batch, latents)
    masked = predict(flux_parts, collated, latents)
    ones = predict(flux_parts, {**collated, "attention_mask": torch.ones_like(collated["attention_mask"])}, latents)
    assert not torch.allclose(masked, unmasked, atol=1e-5)
    torch.testing.assert_close(ones, unmasked, atol=1e-5, rtol=1e-4)
    # with the mask, a padded position's embedding still counts (it is not excluded), as in SimpleTuner
    assert int(collated["attention_mask"][0].sum()) < collated["attention_mask"].shape[1]


def test_the_batch_gets_the_mask_only_with_masked_training():
    items = [{"prompt_embeds": torch.zeros(4, 8), "pooled_prompt_embeds": torch.zeros(8),
              "attention_mask": torch.tensor([1, 1, 0, 0])}]  # fmt: skip
    collated = get_family("flux").collate_text(items)
    assert set(collated) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert texts_for(Config()).denoiser_text(items, collated) is collated
    masked = texts_for(Config(flux_attention_masked_training=True)).denoiser_text(items, collated)
    assert masked["attention_mask"].tolist() == [[1, 1, 0, 0]]
    # other families keep their own masks whatever the option says (and it changes nothing there)
    chroma = {"prompt_embeds": torch.zeros(1, 4, 8), "attention_mask": torch.ones(1, 4)}
    assert texts_for(Config(flux_attention_masked_training=True), "chroma").denoiser_text([], chroma) is chroma
    with pytest.raises(InputError, match="re-run `st cache`"):
        texts_for(Config(flux_attention_masked_training=True)).denoiser_text(
            [{k: v for k, v in items[0].items() if k != "attention_mask"}], collated)
    with pytest.raises(ConfigError, match="controlnet"):
        texts_for(Config(flux_attention_masked_training=True, controlnet=True))


# --- flux_fast_schedule ----------------------------------------------------------------------------------------


def flow(**options) -> Objective:
    return Objective(Config(**options), kind="flow_matching", scheduler_config=None, default_shift=3.0)


def test_fast_schedule_draws_schnells_sigmas_unshifted():
    objective = flow(flux_fast_schedule=True)
    sigmas = objective.sample_sigmas(20_000, torch.Generator().manual_seed(0), objective.shift)
    assert set(sigmas.unique().tolist()) == set(FAST_SCHEDULE_SIGMAS)
    assert abs(float((sigmas == 1.0).float().mean()) - 0.7) < 0.02
    noised = objective.draw(torch.randn(4, 16, 8, 8), torch.Generator().manual_seed(1), step=0)
    assert set((noised.timesteps / 1000).tolist()) <= set(FAST_SCHEDULE_SIGMAS)
    plain = flow().sample_sigmas(1000, torch.Generator().manual_seed(0), 3.0)
    assert len(plain.unique()) == 1000


def test_uniform_and_beta_schedules_win_over_the_fast_schedule(st_log):
    records = st_log()
    objective = flow(flux_fast_schedule=True, flow_use_uniform_schedule=True)
    assert len(objective.sample_sigmas(100, torch.Generator().manual_seed(0), 1.0).unique()) == 100
    assert any("flux_fast_schedule is ignored" in r.getMessage() for r in records)


# --- sd3_clip_uncond_behaviour / sd3_t5_uncond_behaviour -------------------------------------------------------


def sd3_item(t5_tokens: int = 5) -> dict[str, torch.Tensor]:
    return {"prompt_embeds": torch.ones(sd3.CLIP_LENGTH + t5_tokens, 8), "pooled_prompt_embeds": torch.ones(6)}


@pytest.mark.parametrize(
    ("clip", "t5", "clip_zero", "t5_zero"),
    [("empty_string", None, False, False), ("zero", None, True, True), ("zero", "empty_string", True, False),
     ("empty_string", "zero", False, True)],
)  # fmt: skip
def test_sd3_caption_dropout_zeroes_the_parts_asked_for(clip, t5, clip_zero, t5_zero):
    settings = texts_for(Config(sd3_clip_uncond_behaviour=clip, sd3_t5_uncond_behaviour=t5), "sd3")
    kept, dropped = settings.training_texts([sd3_item(), sd3_item()], [False, True])
    assert torch.equal(kept["prompt_embeds"], sd3_item()["prompt_embeds"])  # only dropped captions change
    clip_part, t5_part = dropped["prompt_embeds"][: sd3.CLIP_LENGTH], dropped["prompt_embeds"][sd3.CLIP_LENGTH :]
    assert bool((clip_part == 0).all()) == clip_zero and bool((clip_part == 1).all()) != clip_zero
    assert bool((dropped["pooled_prompt_embeds"] == 0).all()) == clip_zero
    assert bool((t5_part == 0).all()) == t5_zero and bool((t5_part == 1).all()) != t5_zero


def test_sd3_joint_sequence_starts_with_77_clip_tokens(tiny_model):
    parts = load_components(get_family("sd3"), tiny_model("sd3"), which=("text_encoders",))
    (item,) = sd3.encode_prompts(parts["text_encoders"], parts["tokenizers"], ["a cat"], max_length=20)
    assert item["prompt_embeds"].shape[0] == sd3.CLIP_LENGTH + 20


def test_uncond_behaviour_is_ignored_outside_sd3():
    settings = texts_for(Config(sd3_clip_uncond_behaviour="zero"), "flux")
    item = {"prompt_embeds": torch.ones(3, 2), "pooled_prompt_embeds": torch.ones(2)}
    assert settings.training_texts([item], [True]) == [item]


# --- refiner_training ------------------------------------------------------------------------------------------


def ddpm(**options) -> Objective:
    scheduler = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                 "num_train_timesteps": 1000}  # fmt: skip
    return Objective(Config(**options), kind="epsilon", scheduler_config=scheduler)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize(
    ("options", "low", "high"),
    [({}, 0, 999), ({"refiner_training": True}, 0, 199), ({"refiner_training": True, "refiner_training_strength": 0.5}, 0, 499),
     ({"refiner_training": True, "refiner_training_invert_schedule": True}, 200, 999)],
)  # fmt: skip
def test_refiner_training_draws_only_the_refiners_timesteps(options, low, high, batch):
    objective = ddpm(**options)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.stack([objective.sample_timesteps(batch, generator) for _ in range(2000)])
    margin = (high - low) // 50
    assert low <= int(drawn.min()) <= low + margin and high - margin <= int(drawn.max()) <= high
    if batch > 1:  # segmented: sample i from the i-th quarter of the range, counted down from its top
        size = (high - low + 1) // batch
        assert int(drawn[:, 0].min()) >= high - size and int(drawn[:, -1].max()) <= low + size


def test_refiner_strength_outside_0_1_is_refused():
    with pytest.raises(ConfigError, match="refiner_training_strength"):
        ddpm(refiner_training=True, refiner_training_strength=1.0)


# --- hidream_use_load_balancing_loss ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hidream(tiny_model):
    family = get_family("hidream")
    loaded = load_components(family, tiny_model("hidream"), which=("denoiser", "text_encoders"))
    text = family.collate_text(family.encode_prompts(loaded["text_encoders"], loaded["tokenizers"], ["a dog"]))
    return family, loaded["denoiser"], text


def gate_losses(hidream, weight: float) -> torch.Tensor:
    """What LoadBalancingLoss adds after one training-mode forward with weight `weight`."""
    family, transformer, text = hidream
    config = Config(model_family="hidream", hidream_use_load_balancing_loss=True,
                    hidream_load_balancing_loss_weight=weight)  # fmt: skip
    balance = LoadBalancingLoss.attach(config, family, transformer)
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    transformer.train()
    try:
        family.denoiser_forward(transformer, latents, torch.tensor([500.0]), text)
    finally:
        transformer.eval()
        for gate in (m for m in transformer.modules() if type(m).__name__ == "MoEGate"):
            gate._forward_hooks.clear()
    return balance.take()


def test_load_balancing_loss_is_the_weighted_sum_of_the_gates_losses_without_gradient(hidream):
    """SimpleTuner sets each gate's coefficient to the weight and adds weight x their detached sum: so the added
    value grows with the weight squared, and carries no gradient."""
    small, large = gate_losses(hidream, 1e-2), gate_losses(hidream, 1e-1)
    assert float(small) > 0 and not small.requires_grad
    torch.testing.assert_close(large, small * 100, rtol=1e-4, atol=0)
    gates = [m for m in hidream[1].modules() if type(m).__name__ == "MoEGate"]
    assert gates and all(g.alpha == 1e-1 for g in gates)


def test_load_balancing_loss_needs_a_weight_and_hidream(hidream):
    family, transformer, _ = hidream
    assert LoadBalancingLoss.attach(Config(model_family="hidream"), family, transformer) is None
    with pytest.raises(ConfigError, match="hidream_load_balancing_loss_weight"):
        LoadBalancingLoss.attach(Config(hidream_use_load_balancing_loss=True), family, transformer)
    with pytest.raises(ConfigError, match="model_family hidream"):
        LoadBalancingLoss.attach(Config(hidream_use_load_balancing_loss=True, hidream_load_balancing_loss_weight=1e-5),
                                 get_family("sd3"), transformer)  # fmt: skip
