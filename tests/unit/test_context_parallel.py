"""What context_parallel_size refuses, by name, before any model loads (`st check` and `st train`), and SimpleTuner's
Wan 2.1 context-parallel examples under `st check`. The two-process training run that matches a single process is
tests/stages/test_context_parallel.py."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.config import Config
from pipeline.errors import ConfigError, InputError
from pipeline.train import context_parallel
from pipeline.train.context_parallel import Layout, check, check_batch, check_denoiser
from tests.helpers.files import VIDEO_EXAMPLES, write_video_examples

DATA = VIDEO_EXAMPLES
CP = Config(model_family="wan", model_type="lora", num_processes=4, context_parallel_size=2,
            context_parallel_comm_strategy="alltoall")  # fmt: skip


def test_wan_passes_with_either_strategy_and_size_one_checks_nothing():
    check(CP, "wan", "WanTransformer3DModel", world=4)
    check(replace(CP, context_parallel_comm_strategy="allgather"), "wan", "WanTransformer3DModel", world=4)
    check(replace(CP, context_parallel_size=1, model_family="sd1x"), "sd1x", "UNet2DConditionModel", world=3)


@pytest.mark.parametrize(("change", "family", "denoiser", "words"), [
    ({}, "sd1x", "UNet2DConditionModel",
     "not supported for model_family sd1x: its transformer (UNet2DConditionModel) has no context-parallel plan"),
    ({}, "hidream", None, "model_family hidream: st has not verified its context-parallel training"),
    ({"flux_attention_masked_training": True}, "flux", "FluxTransformer2DModel",
     "context_parallel_size 2 with flux_attention_masked_training is not supported"),
    ({"model_flavour": "kontext"}, "flux", "FluxTransformer2DModel",
     "not supported for model_flavour kontext: st has not verified the reference-image tokens"),
    ({"control": True}, "flux", "FluxTransformer2DModel", "context_parallel_size 2 with control"),
    ({"tokenizer_max_length": 77}, "flux", "FluxTransformer2DModel",
     "context_parallel_size 2 with tokenizer_max_length 77: flux's text sequence (77 tokens) must split evenly"),
    ({"model_flavour": "edit-v2"}, "qwen_image", "QwenImageTransformer2DModel",
     "not supported for model_flavour edit-v2"),
    ({"context_parallel_comm_strategy": "ring"}, "wan", "WanTransformer3DModel",
     "context_parallel_comm_strategy 'ring' is not one of allgather, alltoall"),
    ({"model_flavour": "vace-14b-2.1"}, "wan", "WanTransformer3DModel",
     "model_family wan: its transformer (WanVACETransformer3DModel) has no context-parallel plan"),
    ({"tread_config": {"routes": []}}, "wan", "WanTransformer3DModel", "context_parallel_size 2 with tread_config"),
    ({"crepa_enabled": True}, "wan", "WanTransformer3DModel", "context_parallel_size 2 with crepa_enabled"),
    ({"controlnet": True}, "wan", "WanTransformer3DModel", "context_parallel_size 2 with controlnet"),
    ({"dynamo_backend": "inductor"}, "wan", "WanTransformer3DModel",
     "context_parallel_size 2 with dynamo_backend inductor is not supported yet"),
])  # fmt: skip
def test_what_st_cannot_split_is_refused_by_name(change, family, denoiser, words):
    with pytest.raises(ConfigError) as raised:
        check(replace(CP, model_family=family, **change), family, denoiser, world=4)
    assert words in str(raised.value)


def test_flux_qwen_image_flux2_and_ltxvideo_pass_and_reference_image_training_is_refused():
    for family, denoiser in (("flux", "FluxTransformer2DModel"), ("qwen_image", "QwenImageTransformer2DModel"),
                             ("flux2", "Flux2Transformer2DModel"), ("ltxvideo", "LTXVideoTransformer3DModel")):
        check(replace(CP, model_family=family), family, denoiser, world=4)
    for mode in ("t2v", "i2v"):
        check(replace(CP, model_family="ltxvideo", ltx_train_mode=mode), "ltxvideo", "LTXVideoTransformer3DModel",
              world=4)  # fmt: skip
    with pytest.raises(ConfigError, match="model_family flux2 trained on reference images"):
        check(replace(CP, model_family="flux2"), "flux2", "Flux2Transformer2DModel", world=4, takes_reference=True)


def test_what_the_plan_splits_must_split_evenly_and_qwen_image_text_is_padded_exactly():
    """Flux's T5 tokens split across the group: an odd count stops with the input named. Qwen-Image's text is
    padded to a multiple of the group under a mask: the prediction is the unpadded one."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    layout = Layout(size=2, strategy="alltoall", world=2)
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                                  axes_dims_rope=(4, 6, 6)).eval()  # fmt: skip
    context_parallel._guard_splits(flux, layout)
    with pytest.raises(InputError, match="the transformer's encoder_hidden_states has 3 tokens per sample"):
        flux(hidden_states=torch.randn(1, 4, 8), encoder_hidden_states=torch.randn(1, 3, 8),
             pooled_projections=torch.randn(1, 8), timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3),
             txt_ids=torch.zeros(3, 3), return_dict=False)  # fmt: skip

    qwen = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=8,
                                       axes_dims_rope=(4, 6, 6)).eval()  # fmt: skip
    inputs = {"hidden_states": torch.randn(1, 4, 16), "encoder_hidden_states": torch.randn(1, 3, 8),
              "timestep": torch.tensor([0.5]), "img_shapes": [[(1, 2, 2)]], "return_dict": False}  # fmt: skip
    with torch.no_grad():
        alone = qwen(**inputs)[0]
        context_parallel._pad_text(qwen, layout)
        padded = qwen(**inputs)[0]
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-6)


def test_ltxvideo_splits_its_video_tokens_and_per_token_timesteps_and_keeps_the_text_and_cross_attention_whole():
    """st's LTX-Video plan replaces diffusers' (which splits the text): the cross-attention processors lose the
    parallel config `enable_parallelism` gives every processor, a processor shared with a self-attention is copied
    first, and an odd video token count stops with the input named."""
    from diffusers.models._modeling_parallel import ContextParallelInput

    from pipeline.families.ltxvideo import tiny_transformer

    denoiser = tiny_transformer(8)
    local = context_parallel._own_plan(denoiser)
    plan = denoiser._cp_plan
    assert set(plan[""]) == {"hidden_states", "timestep"} and type(denoiser)._cp_plan[""].keys() >= {
        "encoder_hidden_states", "encoder_attention_mask"}  # the class's plan is left as diffusers has it
    assert plan[""]["timestep"] == ContextParallelInput(split_dim=1, expected_dims=2, split_output=False)
    shared = denoiser.transformer_blocks[0].attn1.processor
    denoiser.transformer_blocks[1].attn2.set_processor(shared)
    marker = object()
    for block in denoiser.transformer_blocks:
        for attn in (block.attn1, block.attn2):
            attn.processor._parallel_config = marker  # what enable_parallelism does
    context_parallel._keep_local(denoiser, local)
    for block in denoiser.transformer_blocks:
        assert block.attn1.processor._parallel_config is marker and block.attn2.processor._parallel_config is None
    assert denoiser.transformer_blocks[1].attn2.processor is not shared

    context_parallel._guard_splits(denoiser, Layout(size=2, strategy="alltoall", world=2))
    with pytest.raises(InputError, match="the transformer's hidden_states has 3 tokens per sample"):
        denoiser(hidden_states=torch.randn(1, 3, 128), encoder_hidden_states=torch.randn(1, 4, 8),
                 timestep=torch.tensor([500]), encoder_attention_mask=torch.ones(1, 4), num_frames=3, height=1,
                 width=1, return_dict=False)  # fmt: skip


def test_the_launched_world_must_be_a_multiple_of_the_group():
    with pytest.raises(ConfigError, match=r"context_parallel_size 2 must divide the 3 process\(es\)"):
        check(CP, "wan", "WanTransformer3DModel", world=3)
    # `st check` runs before the launch: num_processes counts once it is set above 1
    check(replace(CP, num_processes=1), "wan", "WanTransformer3DModel")
    with pytest.raises(ConfigError, match="must divide the 5 process"):
        check(replace(CP, num_processes=5), "wan", "WanTransformer3DModel")


def test_groups_are_consecutive_ranks_sharing_one_replicas_data():
    layouts = [Layout(size=2, strategy="alltoall", rank=r, world=4) for r in range(4)]
    assert [lay.data_rank for lay in layouts] == [0, 0, 1, 1]
    assert {lay.data_parallel for lay in layouts} == {2} and layouts[0].loss_scale == 2.0
    assert not Layout().enabled and Layout().data_parallel == 1


def test_the_heads_and_the_token_sequence_must_split_evenly():
    from pipeline.families.wan import tiny_transformer

    denoiser = tiny_transformer(32)  # 2 attention heads, patch (1, 2, 2)
    check_denoiser(denoiser, Layout(size=2, strategy="alltoall", world=2))
    with pytest.raises(ConfigError, match="must divide the transformer's 2 attention heads"):
        check_denoiser(denoiser, Layout(size=4, strategy="alltoall", world=4))
    layout = Layout(size=2, strategy="alltoall", world=2)
    check_batch(torch.zeros(1, 16, 2, 6, 6), denoiser.config, layout, "dataset clips")  # 2 x 3 x 3 tokens
    with pytest.raises(InputError, match="dataset clips: its 9 tokens per sample do not split evenly"):
        check_batch(torch.zeros(1, 16, 1, 6, 6), denoiser.config, layout, "dataset clips")


def test_a_denoiser_without_a_plan_is_refused():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=8,
                                cross_attention_dim=8, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))  # fmt: skip
    with pytest.raises(ConfigError, match="UNet2DConditionModel has no context-parallel plan"):
        check_denoiser(unet, Layout(size=2, strategy="alltoall", world=2))


@pytest.fixture
def examples_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_video_examples(tmp_path, "context_parallel_configs")


def _problems(output: str) -> list[str]:
    return [line.strip()[2:] for line in output.splitlines() if line.strip().startswith("- ")]


def test_simpletuners_t2v_cp_example_fails_st_check_only_on_what_needs_cuda(examples_root, cli):
    """The +cp-fa3 examples' context parallelism passes `st check` (tests/unit/test_simpletuner_video_examples.py); the
    t2v one has context_parallel_size 2 too, its base_model_precision fp8-torchao needs a CUDA GPU, and its
    attention_mechanism flash-attn-3-hub the kernels package and a CUDA GPU."""
    (name,) = DATA["context_parallel_configs"]
    assert name.split("/")[2] == "wan2.1-t2v-14b-480p-8xh100.peft-lora+cp-fa3"
    assert {DATA["context_parallel_configs"][name][k] for k in ("context_parallel_size",
                                                                "context_parallel_comm_strategy")} == {2, "alltoall"}
    result = cli("check", "--config", name)
    kernels = importlib.util.find_spec("kernels") is not None
    if torch.cuda.is_available() and kernels:
        assert result.exit_code == 0, result.output
        return
    problems = _problems(result.output)
    assert result.exit_code == 2 and len(problems) == 1 + (not torch.cuda.is_available()), result.output
    assert problems[-1].startswith("attention_mechanism flash-attn-3-hub") and "kernels" in problems[-1]
    if not torch.cuda.is_available():
        assert problems[0].startswith("base_model_precision fp8-torchao") and "needs a CUDA GPU and none is present" in (
            problems[0])


def test_context_parallel_options_are_implemented_config_fields():
    from pipeline.simpletuner import OPTION_STATES

    assert "context_parallel_size" not in OPTION_STATES and "context_parallel_comm_strategy" not in OPTION_STATES
    assert Config().context_parallel_size == 1 and Config().context_parallel_comm_strategy == "allgather"
    assert context_parallel.VERIFIED_FAMILIES == ("wan", "flux", "qwen_image", "flux2", "ltxvideo")
