"""LTX-Video specifics: the transformer call of LTXPipeline's loop (packed tokens, RoPE scale, per-frame timesteps),
latents normalised as the pipeline expects, the first-frame conditioning of the ltx_* options, a LoRA that changes
LTXPipeline's videos, the ComfyUI key names, and the options and family names SimpleTuner uses."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.errors import ConfigError, InputError, NotSupportedError  # noqa: E402
from pipeline.families import get_family, ltxvideo  # noqa: E402
from pipeline.train.family_options import FirstFrame  # noqa: E402
from pipeline.train.objectives import Objective, ObjectiveOptions  # noqa: E402

FAMILY = get_family("ltxvideo")
PROMPTS = ["a red square slides to the left", "a small blue ball"]
VIDEO = {"id": "clips", "dataset_type": "video", "video": {"is_i2v": True}}


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import LTXPipeline

    loaded = LTXPipeline.from_pretrained(tiny_model("ltxvideo"))
    loaded.set_progress_bar_config(disable=True)
    return loaded


def text_batch(pipe, prompts):
    return FAMILY.collate_text(FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], prompts))


def render(pipe, seed=0, **call):
    return pipe(prompt=PROMPTS[0], height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=1.0,
                output_type="np", generator=torch.Generator().manual_seed(seed), **call).frames  # fmt: skip


def first_call(pipe, **call):
    """The keyword arguments and the output of the transformer's first call in a pipeline render."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen.setdefault("kwargs", kwargs)
        seen.setdefault("output", output[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        render(pipe, **call)
    finally:
        handle.remove()
    return seen["kwargs"], seen["output"]


def test_predict_is_the_pipelines_transformer_call(pipe):
    kwargs, output = first_call(pipe)
    assert kwargs["rope_interpolation_scale"] == ltxvideo.rope_scale(ltxvideo.DEFAULT_FRAME_RATE) == (0.32, 32, 32)
    grid = (kwargs["num_frames"], kwargs["height"], kwargs["width"])
    assert grid == (2, 2, 2)  # 9 frames at 64 x 64: 1 + 8 frames -> 2 latent frames, 64 / 32 = 2
    latents = ltxvideo.unpack(kwargs["hidden_states"], *grid)
    assert torch.equal(ltxvideo.pack(latents), kwargs["hidden_states"])
    with torch.no_grad():
        ours = FAMILY.denoiser_forward(pipe.transformer, latents, kwargs["timestep"], text_batch(pipe, PROMPTS[:1]))
    assert ours.shape == latents.shape == (1, 128, 2, 2, 2)
    assert torch.equal(ours, ltxvideo.unpack(output, *grid))


def test_a_frame_timestep_scale_gives_each_frames_tokens_their_timestep(pipe):
    latents = torch.randn(2, 128, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([700.0, 300.0])
    text = text_batch(pipe, PROMPTS)
    scale = torch.tensor([[0.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    per_token = torch.tensor([[0.0] * 4 + [700.0] * 8, [150.0] * 4 + [300.0] * 8])
    with torch.no_grad():
        scaled = FAMILY.denoiser_forward(pipe.transformer, latents, timesteps,
                                         {**text, ltxvideo.FRAME_SCALE_KEY: scale})  # fmt: skip
        ones = FAMILY.denoiser_forward(pipe.transformer, latents, timesteps,
                                       {**text, ltxvideo.FRAME_SCALE_KEY: torch.ones(2, 3)})  # fmt: skip
        plain = FAMILY.denoiser_forward(pipe.transformer, latents, timesteps, text)
        direct = pipe.transformer(hidden_states=ltxvideo.pack(latents), encoder_hidden_states=text["prompt_embeds"],
                                  timestep=per_token, encoder_attention_mask=text["attention_mask"], num_frames=3,
                                  height=2, width=2, rope_interpolation_scale=(0.32, 32, 32), return_dict=False)[0]
    torch.testing.assert_close(ones, plain)  # per token instead of per sample: the same values
    assert not torch.allclose(scaled, plain, atol=1e-3)
    assert torch.equal(scaled, ltxvideo.unpack(direct, 3, 2, 2))


def test_tokenizer_max_length_is_ignored_as_simpletuner_ignores_it(pipe, st_log):
    records = st_log("families")
    default = FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS)
    longer = FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS, max_length=226)
    assert default[0]["attention_mask"].shape == (ltxvideo.MAX_LENGTH,) == (128,)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(default, longer) for k in a)
    assert any("tokenizer_max_length 226" in r.getMessage() for r in records)


def test_latents_are_normalised_as_the_pipeline_expects(pipe):
    from pipeline.families.loading import scaled_latents

    vae = pipe.vae
    sample = torch.randn(1, 128, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    ours = scaled_latents(vae, sample, video=True)
    theirs = pipe._normalize_latents(sample, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, sample)  # the tiny VAE's mean and std are not 0 and 1


# ---------------------------------------------------------------------------------------- first-frame conditioning


def conditioning(**options) -> FirstFrame | None:
    return FirstFrame.for_run(Config(model_family="ltxvideo", **options), FAMILY)


def noised_clip(frames=3, seed=0):
    objective = Objective(ObjectiveOptions.from_config(Config(model_family="ltxvideo")), kind="flow_matching",
                          scheduler_config={}, default_shift=FAMILY.default_flow_shift)  # fmt: skip
    latents = torch.randn(2, 128, frames, 2, 2, generator=torch.Generator().manual_seed(seed))
    return objective, latents, objective.draw(latents, torch.Generator().manual_seed(seed + 1), step=0)


def test_protect_first_frame_keeps_it_clean_at_timestep_zero_and_out_of_the_loss():
    first_frame = conditioning(ltx_protect_first_frame=True)
    objective, latents, noised = noised_clip()
    assert first_frame.applies(VIDEO, latents)
    changed, extra, mask = first_frame.apply(noised, latents, torch.Generator().manual_seed(0))
    assert torch.equal(changed.noisy[:, :, 0], latents[:, :, 0])  # no noise on the first latent frame
    assert torch.equal(changed.noisy[:, :, 1:], noised.noisy[:, :, 1:])
    assert torch.equal(extra[ltxvideo.FRAME_SCALE_KEY], torch.tensor([[0.0, 1.0, 1.0]] * 2))
    prediction = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    other_first = prediction.clone()
    other_first[:, :, 0] += 10.0
    loss = objective.loss(prediction, changed, 0, mask)
    assert loss == objective.loss(other_first, changed, 0, mask)  # the first frame adds no loss
    assert loss != objective.loss(prediction, changed, 0, None)


def test_partial_noise_shrinks_the_first_frames_sigma_and_noise():
    first_frame = conditioning(ltx_i2v_prob=1.0, ltx_partial_noise_fraction=0.5)
    _, latents, noised = noised_clip()
    generator = torch.Generator().manual_seed(4)
    changed, extra, mask = first_frame.apply(noised, latents, generator)
    draws = torch.Generator().manual_seed(4)
    torch.rand(1, generator=draws, dtype=torch.float64)  # the coin
    a = 1.0 - float(torch.rand(1, generator=draws, dtype=torch.float64)) * 0.5
    s = noised.sigmas.view(2, 1, 1, 1)
    x0, n0 = latents[:, :, 0], noised.noise[:, :, 0]
    torch.testing.assert_close(changed.noisy[:, :, 0], (1 - a * s) * x0 + a * s * (a * n0))
    torch.testing.assert_close(changed.target[:, :, 0], a * n0 - x0)
    assert torch.equal(changed.target[:, :, 1:], noised.target[:, :, 1:])
    torch.testing.assert_close(extra[ltxvideo.FRAME_SCALE_KEY][:, 0], torch.full((2,), a))
    assert mask is None and 0.5 <= a < 1.0


def test_without_the_coin_or_outside_i2v_video_batches_nothing_changes():
    _, latents, noised = noised_clip()
    unchanged, extra, mask = conditioning(ltx_i2v_prob=0.0).apply(noised, latents, torch.Generator())
    assert unchanged is noised and extra == {} and mask is None
    first_frame = conditioning()
    assert not first_frame.applies({**VIDEO, "video": {"is_i2v": False}}, latents)
    assert not first_frame.applies({"id": "pictures"}, latents[:, :, :1])  # images are single frames
    assert not first_frame.applies(VIDEO, latents[:, :, :1])
    with pytest.raises(InputError, match="re-run `st cache`"):
        first_frame.applies({"id": "clips", "dataset_type": "video"}, latents)
    assert conditioning(ltx_train_mode="t2v") is None
    assert FirstFrame.for_run(Config(model_family="wan", ltx_protect_first_frame=True), get_family("wan")) is None


def test_ltx_options_have_simpletuners_defaults_and_ranges(tmp_path):
    config = Config()
    assert (config.ltx_train_mode, config.ltx_i2v_prob, config.ltx_partial_noise_fraction,
            config.ltx_protect_first_frame) == ("i2v", 0.1, 0.05, False)  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"--model_family": "ltxvideo", "--ltx_i2v_prob": 1.5}))
    with pytest.raises(ConfigError, match="ltx_i2v_prob"):
        load_config(path)


def test_ltxvideo2_is_refused_by_name(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"--model_family": "ltxvideo2", "--data_backend_config": "datasets.json"}))
    with pytest.raises(NotSupportedError, match="model_family 'ltxvideo2'.*LTX-2") as error:
        load_config(path)
    assert error.value.exit_code == 2


# ----------------------------------------------------------------------------------------------------- LoRA files


def test_a_saved_lora_loads_into_ltxpipeline_and_changes_its_videos(pipe, tiny_model, tmp_path):
    from diffusers import LTXPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    denoiser = LTXPipeline.from_pretrained(tiny_model("ltxvideo")).transformer
    config = LoraConfig(r=4, lora_alpha=4, target_modules=list(FAMILY.lora_targets), init_lora_weights="gaussian")
    FAMILY.add_lora(denoiser, config)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    FAMILY.save_lora(tmp_path, get_peft_model_state_dict(denoiser), config)
    base = render(pipe)
    fresh = LTXPipeline.from_pretrained(tiny_model("ltxvideo"))
    fresh.set_progress_bar_config(disable=True)
    FAMILY.load_lora_into_pipeline(fresh, tmp_path)
    adapted = render(fresh)
    assert adapted.shape == base.shape == (1, 9, 64, 64, 3)
    assert abs(adapted - base).max() > 1e-3


def test_comfyui_keys_are_ltxvs_module_names(pipe):
    """ComfyUI's LTXV model names its blocks as diffusers does (comfy/ldm/lightricks/model.py); its input projection
    is `patchify_proj` and its timestep embedding `adaln_single`."""
    from pipeline.publish import comfyui
    from pipeline.publish.lora import LoraModule

    weights = pipe.transformer.state_dict()
    names = [n for n, _ in pipe.transformer.named_modules() if n.endswith(FAMILY.lora_targets)] + ["proj_in",
                                                                                                    "time_embed.linear"]
    mods = [LoraModule(name, torch.ones(2, weights[f"{name}.weight"].shape[1]),
                       torch.ones(weights[f"{name}.weight"].shape[0], 2), 4.0, 2.0) for name in names]  # fmt: skip
    out = comfyui.convert("ltxvideo", mods, dict(pipe.transformer.config))
    native = [n for n in names if n.startswith("transformer_blocks.")] + ["patchify_proj", "adaln_single.linear"]
    assert set(out) == {f"diffusion_model.{n}.{part}" for n in native for part in ("lora_A.weight", "lora_B.weight",
                                                                                    "alpha")}  # fmt: skip
    assert len(native) == 2 * 2 * 4 + 2  # 2 blocks x 2 attentions x 4 targets, and the two top-level layers


def test_block_swap_streams_ltxs_transformer_blocks(tiny_model, pipe):
    from diffusers import LTXVideoTransformer3DModel
    from peft import LoraConfig

    from pipeline.train.block_swap import BlockSwap

    denoiser = LTXVideoTransformer3DModel.from_pretrained(tiny_model("ltxvideo"), subfolder="transformer")
    FAMILY.add_lora(denoiser, LoraConfig(r=2, lora_alpha=2, target_modules=list(FAMILY.lora_targets),
                                         init_lora_weights="gaussian"))  # fmt: skip
    latents = torch.randn(1, 128, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    text = text_batch(pipe, PROMPTS[:1])

    def grads():
        denoiser.zero_grad(set_to_none=True)
        FAMILY.denoiser_forward(denoiser, latents, torch.tensor([500.0]), text).square().mean().backward()
        return {n: p.grad.clone() for n, p in denoiser.named_parameters() if p.requires_grad}

    expected = grads()
    swap = BlockSwap.build(denoiser, "ltxvideo", 1, "cpu", "cpu")
    swap.install(denoiser)
    got = grads()
    assert swap.blocks == list(denoiser.transformer_blocks) and swap.first == 1 and swap.resident == set()
    assert got.keys() == expected.keys() and all(torch.equal(got[n], g) for n, g in expected.items())


def test_framerate_sets_the_rope_time_scale_of_ltxpipelines_call(pipe):
    """`framerate` 24: the text batch carries it, and the prediction is the transformer call LTXPipeline makes with
    frame_rate=24 (RoPE time scale 8/24); at the default 25 the prediction differs."""
    from pipeline.train.family_options import FamilyText

    kwargs, output = first_call(pipe, frame_rate=24)
    assert kwargs["rope_interpolation_scale"] == ltxvideo.rope_scale(24) == (8 / 24, 32, 32)
    grid = (kwargs["num_frames"], kwargs["height"], kwargs["width"])
    latents = ltxvideo.unpack(kwargs["hidden_states"], *grid)
    texts = FAMILY.encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS[:1])
    predictions = {}
    for rate in (24, None):
        family_text = FamilyText.for_run(Config(model_family="ltxvideo", framerate=rate), FAMILY)
        assert family_text.frame_rate == (24 if rate else 25)  # unset: 25, as SimpleTuner sets it for LTX-Video
        text = family_text.denoiser_text(texts, FAMILY.collate_text(texts))
        with torch.no_grad():
            predictions[rate] = FAMILY.denoiser_forward(pipe.transformer, latents, kwargs["timestep"], text)
    assert torch.equal(predictions[24], ltxvideo.unpack(output, *grid))
    assert not torch.allclose(predictions[24], predictions[None], atol=1e-4)


def test_a_fractional_frame_rate_survives_the_bf16_text_batch():
    """23.976 travels as an integer ratio, so a bf16 batch keeps the exact double LTXPipeline divides by."""
    batch = ltxvideo.frame_rate_batch(23.976, 2)
    assert batch.dtype == torch.int64 and batch.shape == (2, 2)
    assert ltxvideo.frame_rate_of({ltxvideo.FRAME_RATE_KEY: batch}) == 23.976
    assert ltxvideo.rope_scale(ltxvideo.frame_rate_of({ltxvideo.FRAME_RATE_KEY: batch}))[0] == 8 / 23.976
    assert ltxvideo.frame_rate_of({}) == ltxvideo.DEFAULT_FRAME_RATE == 25


def test_framerate_is_an_implemented_option_with_a_range(tmp_path):
    from pipeline.simpletuner import OPTION_STATES

    assert "framerate" not in OPTION_STATES and Config().framerate is None
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"--model_family": "ltxvideo", "--framerate": 24}))
    assert load_config(path).config.framerate == 24
    path.write_text(json.dumps({"--model_family": "ltxvideo", "--framerate": 0}))
    with pytest.raises(ConfigError, match="framerate"):
        load_config(path)
