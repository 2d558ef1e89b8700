"""TREAD token routing (`tread_config`) on tiny real Sana, HiDream (non-square: padded image tokens with their mask),
LTX-Video (per-token timesteps), Wan 2.2 TI2V (per-token timesteps) and Qwen-Image Edit 2511 (per-token modulation
index) transformers: routing nothing trains exactly as without TREAD (which holds only if each kept token's rotary
position, time embedding and modulation index go with it), routing half changes the loss while every block's LoRA
learns, the skipped tokens come back unchanged, Sana's Mix-FFN convolves each kept token at its own grid place,
gradient checkpointing recomputes the same routing, and a 2-step `st train` routes each family."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.train import tread

# name: (the family TREAD routes it as, the LoRA targets that reach every block)
CASES = {"sana": ("sana", ["to_q", "to_k", "to_v"]), "hidream": ("hidream", ["to_q", "to_k", "to_v"]),
         "ltxvideo": ("ltxvideo", ["to_q", "to_k", "to_v"]),
         "wan_ti2v": ("wan", ["attn1.to_q", "attn1.to_k", "attn1.to_v"]),
         "qwen_edit_v3": ("qwen_image", ["to_q", "to_k", "to_v"])}  # fmt: skip


def _model(case: str):
    """A tiny transformer of `case` (3 or 4 blocks; HiDream: 2 double + 2 single) and a call on fixed inputs."""
    torch.manual_seed(0)
    if case == "sana":
        from diffusers import SanaTransformer2DModel

        model = SanaTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                       num_layers=3, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                       cross_attention_dim=32, caption_channels=32, sample_size=8,
                                       patch_size=1)  # fmt: skip
        inputs = dict(hidden_states=torch.randn(2, 8, 4, 6), encoder_hidden_states=torch.randn(2, 5, 32),
                      timestep=torch.tensor([500, 300]))  # a 4 x 6 token grid
    if case == "hidream":
        from diffusers import HiDreamImageTransformer2DModel

        model = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                               num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                               caption_channels=[16, 24], text_emb_dim=32, num_routed_experts=4,
                                               num_activated_experts=2, axes_dims_rope=(8, 4, 4),
                                               max_resolution=(16, 16), llama_layers=[0, 1, 2, 3])  # fmt: skip
        # 8 x 12 latents: 4 x 6 image tokens padded to 64, with their mask
        inputs = dict(hidden_states=torch.randn(2, 4, 8, 12), timesteps=torch.tensor([500, 300]),
                      encoder_hidden_states_t5=torch.randn(2, 5, 16),
                      encoder_hidden_states_llama3=torch.randn(4, 2, 3, 24), pooled_embeds=torch.randn(2, 32))
    if case == "ltxvideo":
        from diffusers import LTXVideoTransformer3DModel

        model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                           cross_attention_dim=16, num_layers=3, caption_channels=16)  # fmt: skip
        timestep = torch.tensor([500.0, 300.0])[:, None].repeat(1, 2 * 4 * 4)
        timestep[:, :16] = 0.0  # the first frame is the clean condition (frame_timestep_scale)
        inputs = dict(hidden_states=torch.randn(2, 32, 8), encoder_hidden_states=torch.randn(2, 5, 16),
                      timestep=timestep, encoder_attention_mask=torch.ones(2, 5), num_frames=2, height=4, width=4,
                      rope_interpolation_scale=(1.0, 1.0, 1.0))  # fmt: skip
    if case == "wan_ti2v":
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                      in_channels=8, out_channels=8, text_dim=32, freq_dim=32, ffn_dim=32,
                                      num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      rope_max_seq_len=32)  # fmt: skip
        timestep = torch.tensor([700.0, 300.0])[:, None].repeat(1, 2 * 4 * 4)
        timestep[:, :16] = 0.0  # TI2V image-to-video: the first frame's tokens at timestep 0
        inputs = dict(hidden_states=torch.randn(2, 8, 2, 8, 8), timestep=timestep,
                      encoder_hidden_states=torch.randn(2, 7, 32))
    if case == "qwen_edit_v3":
        from diffusers import QwenImageTransformer2DModel

        model = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=4,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                            axes_dims_rope=(4, 6, 6), zero_cond_t=True)  # fmt: skip
        inputs = dict(hidden_states=torch.randn(2, 32, 64), encoder_hidden_states=torch.randn(2, 5, 32),
                      timestep=torch.tensor([0.5, 0.3]), img_shapes=[[(1, 4, 4), (1, 4, 4)]] * 2)  # target + reference
    return model.train(), lambda: model(**inputs, return_dict=False)[0]


def _config(*routes, seed=1):
    routes = [dict(selection_ratio=r, start_layer_idx=s, end_layer_idx=e) for r, s, e in routes]
    return SimpleNamespace(tread_config={"routes": routes}, seed=seed, controlnet=False, crepa_enabled=False,
                           dynamo_backend=None)  # fmt: skip


def _loss_and_grads(model, run):
    model.zero_grad(set_to_none=True)
    loss = run().square().mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", CASES)
def test_routing_no_tokens_trains_exactly_as_without_tread(case):
    """selection_ratio 0 still shuffles every token through every block: the loss and gradients are those of a run
    without TREAD only if each token's rotary position, per-token time embedding (LTX-Video, TI2V), modulation index
    (Edit 2511), padding mask (HiDream) and grid place (Sana's convolution) are shuffled with it."""
    model, run = _model(case)
    loss, grads = _loss_and_grads(model, run)
    routed = tread.attach(_config((0.0, 0, -1)), CASES[case][0], model, "cpu")
    loss_0, grads_0 = _loss_and_grads(model, run)
    assert routed.current.draws  # the route ran
    assert loss_0 == pytest.approx(loss, abs=1e-6)
    assert grads_0.keys() == grads.keys()
    assert max((grads[n] - grads_0[n]).abs().max().item() for n in grads) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_routing_half_the_tokens_changes_the_loss_and_every_blocks_lora_learns(case):
    from peft import LoraConfig, inject_adapter_in_model

    model, run = _model(case)
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=CASES[case][1],
                                       init_lora_weights="gaussian"), model)  # fmt: skip
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    plain, _ = _loss_and_grads(model, run)
    routing = tread.attach(_config((0.5, 1, -1)), CASES[case][0], model, "cpu")
    routed, _ = _loss_and_grads(model, run)
    assert abs(routed - plain) > 1e-5
    for i, block in enumerate(tread.transformer_blocks_of(model)):  # before and inside the route
        lora = [p for n, p in block.named_parameters() if "lora_" in n]
        assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora), f"block {i}"
    # a few steps of plain SGD on the LoRA, each routing the same tokens, lower the routed loss
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.SGD(params, lr=0.05)
    losses = []
    for _ in range(4):
        routing.router.generator.manual_seed(1)
        optimizer.zero_grad()
        loss = run().square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("case", ["sana", "hidream", "ltxvideo"])
def test_each_block_of_a_route_draws_its_own_tokens_and_returns_the_skipped_ones_unchanged(case):
    """As SimpleTuner's Sana / HiDream / LTX-Video transformers route: every block of the route draws anew; the
    tokens a block skips leave it exactly as they entered (HiDream: the image rows of its sequences)."""
    model, run = _model(case)
    blocks = tread.transformer_blocks_of(model)
    seen = {}

    def keep_input(i):
        def hook(block, args, kwargs):
            seen[i] = [kwargs.get("hidden_states", args[0] if args else None).detach().clone()]

        return hook

    def keep_output(i):
        def hook(block, args, output):
            seen[i].append((output[0] if isinstance(output, tuple) else output).detach().clone())

        return hook

    for i, block in enumerate(blocks):  # before TREAD's hooks: the full input
        block.register_forward_pre_hook(keep_input(i), with_kwargs=True)
    routed = tread.attach(_config((0.5, 1, -1)), case, model, "cpu")
    for i, block in enumerate(blocks):  # after TREAD's: the full output
        block.register_forward_hook(keep_output(i))
    output = run()
    assert len(routed.spans) == len(blocks) - 1 and len(routed.current.draws) == len(blocks) - 1
    firsts = []
    for k, draw in enumerate(routed.current.draws):
        info = draw.info
        tokens = info.ids_shuffle.shape[1]
        assert info.keep == tokens - round(tokens * 0.5)
        hidden, out = seen[k + 1]
        skipped = info.ids_shuffle[:, info.keep :]
        for b in range(2):
            assert torch.equal(out[b, skipped[b]], draw.original[b, skipped[b]])
            kept = info.ids_shuffle[b, : info.keep]
            assert not torch.equal(out[b, kept], draw.original[b, kept])
        assert out.shape == hidden.shape and torch.equal(hidden[:, :tokens], draw.original)
        firsts.append(info.ids_shuffle)
    assert not torch.equal(firsts[0], firsts[1])  # a new draw per block
    if case == "hidream":  # 24 real image tokens padded to 64 are routed (with their mask rows)
        assert routed.current.image_len == 64 and routed.current.draws[-1].info.ids_shuffle.shape == (2, 64)
    with torch.no_grad():
        assert run().shape == output.shape


def test_sanas_mix_ffn_convolves_the_kept_tokens_at_their_own_grid_places():
    """With the left half of the 4 x 6 grid kept (force-kept), the routed Mix-FFN's output at each kept token is
    that of the Mix-FFN run on the 4 x 3 left half alone: the dropped places act as the zero-padded border."""
    model, _ = _model("sana")
    routed = tread.attach(_config((0.5, 0, 0)), "sana", model, "cpu")
    ff = model.transformer_blocks[0].ff
    x = torch.randn(2, 32, 4, 6)
    forced = torch.zeros(2, 4, 6, dtype=torch.bool)
    forced[:, :, :3] = True
    info = routed.router.get_mask(torch.zeros(2, 24, 1), 0.5, force_keep=forced.flatten(1))
    assert info.keep == 12
    kept = tread.Router.start_route(x.flatten(2).transpose(1, 2), info)  # B x keep x C, shuffled
    routed.current = tread._Forward([], grid=(info, 4, 6))
    with torch.no_grad():
        out = ff(kept.transpose(1, 2).unsqueeze(-1))  # as the routed block calls it: B x C x keep x 1
        routed.current = None
        expected = ff(x[..., :3].contiguous()).flatten(2)  # the left half as an image of its own
        whole = ff(x).flatten(2)
    assert out.shape == (2, 32, 12, 1)
    places = info.ids_shuffle[:, :12]  # flat indices in the 4 x 6 grid; left half: column < 3
    for b in range(2):
        rows, cols = places[b] // 6, places[b] % 6
        assert (cols < 3).all()
        torch.testing.assert_close(out[b, :, :, 0], expected[b][:, rows * 3 + cols], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out[b, :, :, 0], whole[b][:, places[b]], atol=1e-4)  # the right half is not seen


@pytest.mark.parametrize("case", ["sana", "hidream"])
def test_gradient_checkpointing_recomputes_the_same_routing(case):
    results = []
    for checkpointing in (False, True):
        model, run = _model(case)
        if checkpointing:
            model.enable_gradient_checkpointing()
        tread.attach(_config((0.5, 1, -1)), case, model, "cpu")
        results.append(_loss_and_grads(model, run))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert loss_ckpt == loss
    assert max((grads[n] - grads_ckpt[n]).abs().max().item() for n in grads) < 1e-6


@pytest.mark.parametrize("case", ["sana", "hidream", "wan_ti2v"])
def test_evaluation_forwards_see_every_token(case):
    model, run = _model(case)
    with torch.no_grad():
        expected = run()
    expected_eval = run().detach() if model.eval() else None  # HiDream's experts run another way in eval mode
    model.train()
    tread.attach(_config((0.7, 0, -1)), CASES[case][0], model, "cpu")
    with torch.no_grad():
        assert torch.equal(run(), expected)
    model.eval()
    assert torch.equal(run().detach(), expected_eval)


ROUTE = "tread_config={routes=[{selection_ratio=0.5,start_layer_idx=-1,end_layer_idx=-1}]}"
SETS = ('mixed_precision="no"', "max_train_steps=2", "seed=7", "learning_rate=0.01")


def _st_train_routes(config, cache, out, blocks: int, *sets: str) -> None:
    from pipeline.manifest import read_manifest
    from tests.helpers.training import losses, train

    train(config, cache, out, *SETS, ROUTE, *sets)
    assert read_manifest(out / "manifest.json")["stats"]["tread"] == {
        "routes": [{"selection_ratio": 0.5, "start_layer_idx": blocks - 1, "end_layer_idx": blocks - 1}],
        "blocks": blocks, "seed": 7}  # fmt: skip
    assert len(losses(out)) == 2 and all(math.isfinite(v) for v in losses(out).values())


@pytest.mark.parametrize(("family", "blocks", "sets"), [
    ("sana", 1, ()),
    ("hidream", 2, ("hidream_use_load_balancing_loss=true", "hidream_load_balancing_loss_weight=0.00001"))])
def test_two_steps_of_st_train_route_the_family(cached, tmp_path, family, blocks, sets):
    """2 LoRA steps through the family's own prediction (Sana: its one block; HiDream: its single block, with the
    expert gates' load-balancing loss over the kept tokens) with a route over the last block: the manifest records
    it, the losses are finite."""
    root, config = cached(family)
    _st_train_routes(config, root / "cache", tmp_path / "routed", blocks, *sets)


def test_two_steps_of_st_train_route_ltx_video(tmp_path, tiny_model):
    """LTX-Video from two clips, its first frame a clean condition (per-token timesteps)."""
    from tests.helpers.videos import cached_video_dataset

    config = cached_video_dataset(tmp_path, "ltxvideo", tiny_model("ltxvideo"), videos=2)
    _st_train_routes(config, tmp_path / "cache", tmp_path / "routed", 2)


def test_two_steps_of_st_train_route_wan_22_ti2v(tmp_path):
    """Wan 2.2 TI2V 5B (per-token timesteps) from two clips."""
    from pipeline.families import wan22
    from tests.helpers.videos import cached_video_dataset

    wan22.tiny_ti2v(tmp_path / "model", 0)
    config = cached_video_dataset(tmp_path, "wan", tmp_path / "model", videos=2, **{"--model_flavour": "ti2v-5b-2.2"})
    _st_train_routes(config, tmp_path / "cache", tmp_path / "routed", 2)


def test_two_steps_of_st_train_route_qwen_image_edit_with_zero_cond_t(tmp_path):
    """Qwen-Image-Edit-Plus trained as edit-v2+ (zero_cond_t: the per-token modulation index of Edit 2511) from
    pictures paired with their edge images."""
    from pipeline.families import qwen_image_edit
    from tests.helpers.training import cached_dataset

    qwen_image_edit.tiny_plus(tmp_path / "model", 0)
    config = cached_dataset(tmp_path, "qwen_image", tmp_path / "model", conditioning=("controlnet",),
                            **{"--model_flavour": "edit-v2+"})  # fmt: skip
    _st_train_routes(config, tmp_path / "cache", tmp_path / "routed", 2)
