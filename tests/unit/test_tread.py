"""TREAD token routing (`tread_config`) on tiny real Wan (2.1, 2.2 I2V experts), Flux, FLUX.2, Chroma,
AuraFlow, Qwen-Image, SD3 and PixArt transformers: routing nothing changes nothing, routing half changes the loss while
every block's LoRA still learns, evaluation sees every token, gradient checkpointing recomputes the same routing,
single-stream blocks route only their image tokens, masked tokens are kept, and bad routes or families stop with exit
2 (Sana, HiDream, LTX-Video, Wan 2.2 TI2V and Qwen-Image Edit 2511: test_tread_families.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.train import tread
from pipeline.tread_settings import parse_routes, resolve

FAMILIES = ("wan", "flux", "sd3", "pixart_sigma", "flux2", "chroma", "auraflow", "qwen_image", "z_image")
# The LoRA targets that reach every block (FLUX.2's single blocks fuse q, k, v and the MLP input in one projection).
LORA_TARGETS = {"wan": ["attn1.to_q", "attn1.to_k", "attn1.to_v"], "pixart_sigma": ["attn1.to_q", "attn1.to_k",
                "attn1.to_v"], "flux2": ["to_q", "to_k", "to_v", "to_qkv_mlp_proj"]}  # fmt: skip


def _model(family: str, text_padding: bool = True):
    """A tiny transformer of `family` (Wan: 4 blocks; Flux, FLUX.2, Chroma, AuraFlow: 2 double (joint) + 3 single
    blocks, so that a route 1..-2 spans the boundary) and a call on fixed inputs."""
    torch.manual_seed(0)
    if family == "flux2":
        from diffusers import Flux2Transformer2DModel

        from pipeline.families.flux2 import position_ids, text_ids

        model = Flux2Transformer2DModel(patch_size=1, in_channels=32, num_layers=2, num_single_layers=3,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
                                        guidance_embeds=False)  # fmt: skip
        inputs = dict(hidden_states=torch.randn(2, 16, 32), encoder_hidden_states=torch.randn(2, 5, 32),
                      timestep=torch.tensor([0.5, 0.3]), img_ids=position_ids(4, 4, "cpu").expand(2, -1, -1),
                      txt_ids=text_ids(5, "cpu").expand(2, -1, -1))  # fmt: skip
    if family == "chroma":
        from diffusers import ChromaTransformer2DModel

        from pipeline.families.flux import image_ids

        model = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=3,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
                                         approximator_hidden_dim=32, approximator_layers=1)  # fmt: skip
        mask = torch.ones(2, 5 + 16, dtype=torch.bool)
        mask[1, 3:5] = not text_padding  # the second caption is 3 tokens long, padded to 5
        inputs = dict(hidden_states=torch.randn(2, 16, 64), encoder_hidden_states=torch.randn(2, 5, 32),
                      timestep=torch.tensor([0.5, 0.3]), txt_ids=torch.zeros(5, 3),
                      img_ids=image_ids(4, 4, "cpu", torch.float32), attention_mask=mask)  # fmt: skip
    if family == "qwen_image":
        from diffusers import QwenImageTransformer2DModel

        model = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=4,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                            axes_dims_rope=(4, 6, 6))  # fmt: skip
        mask = torch.ones(2, 5, dtype=torch.bool)
        mask[1, 3:] = False  # the second caption is 3 tokens long, padded to 5
        inputs = dict(hidden_states=torch.randn(2, 16, 64), encoder_hidden_states=torch.randn(2, 5, 32),
                      encoder_hidden_states_mask=mask, timestep=torch.tensor([0.5, 0.3]),
                      img_shapes=[[(1, 4, 4)]] * 2)  # fmt: skip
    if family == "z_image":
        from diffusers import ZImageTransformer2DModel

        model = ZImageTransformer2DModel(in_channels=16, dim=32, n_layers=4, n_refiner_layers=1, n_heads=2,
                                         n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6],
                                         axes_lens=[1024, 64, 64])  # fmt: skip
        # 4 x 4 image tokens padded to 32; captions of 5 and 40 tokens padded to 32 and 64: a masked batch
        inputs = dict(x=list(torch.randn(2, 16, 1, 8, 8).unbind(0)), t=torch.tensor([0.5, 0.3]),
                      cap_feats=[torch.randn(5, 32), torch.randn(40, 32)])  # fmt: skip
        return model.train(), lambda: torch.stack(model(**inputs, return_dict=False)[0])
    if family == "auraflow":
        from diffusers import AuraFlowTransformer2DModel

        model = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
                                           num_single_dit_layers=3, attention_head_dim=8, num_attention_heads=4,
                                           joint_attention_dim=32, caption_projection_dim=32, out_channels=4,
                                           pos_embed_max_size=64)  # fmt: skip
        inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 32),
                      timestep=torch.tensor([0.5, 0.3]))
    if family == "wan":
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                      in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                      num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      rope_max_seq_len=32)  # fmt: skip
        x, e = torch.randn(2, 16, 3, 8, 8), torch.randn(2, 7, 32)
        inputs = dict(hidden_states=x, timestep=torch.tensor([500.0, 300.0]), encoder_hidden_states=e)
    if family == "flux":
        from diffusers import FluxTransformer2DModel

        from pipeline.families.flux import image_ids

        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=3,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        inputs = dict(hidden_states=torch.randn(2, 16, 64), timestep=torch.tensor([0.5, 0.3]),
                      guidance=torch.tensor([1.0, 1.0]), pooled_projections=torch.randn(2, 32),
                      encoder_hidden_states=torch.randn(2, 5, 32), txt_ids=torch.zeros(5, 3),
                      img_ids=image_ids(4, 4, "cpu", torch.float32))  # fmt: skip
    if family == "sd3":
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                                      num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                      pooled_projection_dim=32, out_channels=16, pos_embed_max_size=32)  # fmt: skip
        inputs = dict(hidden_states=torch.randn(2, 16, 8, 8), timestep=torch.tensor([500.0, 300.0]),
                      encoder_hidden_states=torch.randn(2, 5, 32), pooled_projections=torch.randn(2, 32))
    if family == "pixart_sigma":
        from diffusers import PixArtTransformer2DModel

        model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                         num_layers=3, cross_attention_dim=32, sample_size=32, patch_size=2,
                                         caption_channels=32, norm_type="ada_norm_single",
                                         use_additional_conditions=False, interpolation_scale=1)  # fmt: skip
        inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 32),
                      encoder_attention_mask=torch.ones(2, 5), timestep=torch.tensor([500, 300]),
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model.train(), lambda: model(**inputs, return_dict=False)[0]


def _config(*routes, seed=1, **extra):
    routes = [dict(selection_ratio=r, start_layer_idx=s, end_layer_idx=e) for r, s, e in routes]
    return SimpleNamespace(tread_config={"routes": routes}, seed=seed, controlnet=False, crepa_enabled=False,
                           dynamo_backend=None, **extra)  # fmt: skip


def _grad_error(grads, other) -> float:
    """The largest gradient difference, relative to the gradient's scale where that is above 1 (Z-Image's pad tokens
    sum gradients of ~100 over many positions, in an order routing changes)."""
    return max(((grads[n] - other[n]).abs().max() / max(1.0, grads[n].abs().max().item())).item() for n in grads)


def _loss_and_grads(model, run):
    model.zero_grad(set_to_none=True)
    loss = run().square().mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_no_tokens_trains_exactly_as_without_tread(family):
    """selection_ratio 0 still shuffles every token through the routed blocks (with their rotary positions):
    attention does not care about order, so loss and gradients are those of a run without TREAD."""
    model, run = _model(family)
    loss, grads = _loss_and_grads(model, run)
    routed = tread.attach(_config((0.0, 0, -1)), family, model, "cpu")
    loss_0, grads_0 = _loss_and_grads(model, run)
    routed.remove()
    assert loss_0 == pytest.approx(loss, abs=1e-6)
    assert grads_0.keys() == grads.keys()
    assert _grad_error(grads, grads_0) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_half_the_tokens_changes_the_loss_and_every_blocks_lora_learns(family):
    from peft import LoraConfig, inject_adapter_in_model

    model, run = _model(family)
    model.requires_grad_(False)
    targets = LORA_TARGETS.get(family, ["to_q", "to_k", "to_v"])
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights="gaussian"), model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    plain, _ = _loss_and_grads(model, run)
    tread.attach(_config((0.5, 1, -2)), family, model, "cpu")
    routed, grads = _loss_and_grads(model, run)
    assert abs(routed - plain) > 1e-5  # routing nothing moves it by < 1e-6
    blocks = tread.transformer_blocks_of(model)
    for i, block in enumerate(blocks):  # blocks before, inside and after the route
        names = [n for n, p in block.named_parameters() if "lora_" in n]
        assert names and all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in block.named_parameters()
                                 if "lora_" in n), f"block {i}"  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluation_and_no_grad_forwards_see_every_token(family):
    model, run = _model(family)
    with torch.no_grad():
        expected = run()
    tread.attach(_config((0.7, 0, -1)), family, model, "cpu")
    with torch.no_grad():
        assert torch.equal(run(), expected)
    model.eval()
    assert torch.equal(run().detach(), expected)
    model.train()
    assert not torch.allclose(run().detach(), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_recomputes_the_same_routing(family):
    results = []
    for checkpointing in (False, True):
        # diffusers' Chroma passes no attention mask to its single blocks under gradient checkpointing, with or
        # without TREAD: captions without padding compare the routing alone
        model, run = _model(family, text_padding=False)
        if checkpointing:
            model.enable_gradient_checkpointing()
        tread.attach(_config((0.5, 1, -1)), family, model, "cpu")
        results.append(_loss_and_grads(model, run))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert loss_ckpt == loss
    assert max((grads[n] - grads_ckpt[n]).abs().max().item() for n in grads) < 1e-6


def test_the_router_draws_from_its_own_seeded_generator_and_keeps_forced_tokens():
    x = torch.randn(2, 10, 4)
    a, b = tread.Router(42, "cpu"), tread.Router(42, "cpu")
    first = a.get_mask(x, 0.5)
    assert first.keep == 5 and torch.equal(first.ids_shuffle, b.get_mask(x, 0.5).ids_shuffle)
    assert not torch.equal(a.get_mask(x, 0.5).ids_shuffle, first.ids_shuffle)  # the stream moves on
    # SimpleTuner's draw: uniform noise per token from the generator, argsort, keep S - round(S * ratio)
    noise = torch.rand((2, 10), generator=torch.Generator().manual_seed(42))
    assert torch.equal(first.ids_shuffle, torch.argsort(noise, dim=1))
    forced = torch.zeros(2, 10, dtype=torch.bool)
    forced[0, :7] = True
    info = tread.Router(0, "cpu").get_mask(x, 0.5, force_keep=forced)
    assert info.keep == 7  # the budget grows to the most forced tokens of a sample
    assert set(info.ids_shuffle[0, :7].tolist()) == set(range(7))
    routed = tread.Router.start_route(x, info)
    assert torch.equal(tread.Router.end_route(routed, info, x), x)


def test_masked_tokens_follow_simpletuners_token_grid():
    state = tread.Tread([], 1, 1, tread.LAYOUTS["wan"], tread.Router(1, "cpu"))
    pixels = -torch.ones(1, 3, 32, 32)
    pixels[..., :, :16] = 1.0  # the left half is under the mask
    state.keep_masked(pixels, "mask", torch.zeros(1, 16, 2, 8, 8), SimpleNamespace(patch_size=(1, 2, 2)))
    grid = state.pending_force_keep.reshape(2, 4, 4)
    assert grid[:, :, :2].all() and not grid[:, :, 2:].any()
    state.keep_masked(pixels, "mask", torch.zeros(1, 16, 8, 8), None)  # Flux: 2 x 2 packed tokens
    assert state.pending_force_keep.reshape(4, 4)[:, :2].all() and state.pending_force_keep.sum() == 8
    state.keep_masked(None, None, torch.zeros(1, 16, 8, 8), None)
    assert state.pending_force_keep is None
    # SimpleTuner's SD3 and PixArt model_predict pass no force-keep mask: their masked tokens route like the rest
    sd3 = tread.Tread([], 1, 1, tread.LAYOUTS["sd3"], tread.Router(1, "cpu"))
    sd3.keep_masked(pixels, "mask", torch.zeros(1, 16, 8, 8), None)
    assert sd3.pending_force_keep is None


def test_a_masked_batch_routes_only_unmasked_tokens():
    model, run = _model("flux")
    routed = tread.attach(_config((0.9, 0, -1)), "flux", model, "cpu")
    pixels = -torch.ones(2, 3, 32, 32)
    pixels[..., :16, :] = 1.0  # the top half: 8 of the 16 tokens
    routed.keep_masked(pixels, "segmentation", torch.zeros(2, 16, 8, 8), None)
    run().sum().backward()
    info = routed.current.draws[0].info
    assert info.keep == 8 and all(set(info.ids_shuffle[b, :8].tolist()) == set(range(8)) for b in range(2))


def test_kontexts_reference_tokens_are_routed_freely_beside_a_masked_target():
    """Kontext appends the reference image's tokens after the target's; the mask covers the target only."""
    from pipeline.families.flux import image_ids

    model, _ = _model("flux")
    routed = tread.attach(_config((0.75, 0, -1)), "flux_kontext", model, "cpu")
    pixels = -torch.ones(1, 3, 32, 32)
    pixels[..., :, :16] = 1.0  # the left half of the 4 x 4 target tokens
    routed.keep_masked(pixels, "mask", torch.zeros(1, 16, 8, 8), None)
    ids = torch.cat([image_ids(4, 4, "cpu", torch.float32), image_ids(4, 4, "cpu", torch.float32) + 1])
    model(hidden_states=torch.randn(1, 32, 64), timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
          pooled_projections=torch.randn(1, 32), encoder_hidden_states=torch.randn(1, 5, 32),
          txt_ids=torch.zeros(5, 3), img_ids=ids, return_dict=False)[0].sum().backward()  # fmt: skip
    info = routed.current.draws[0].info
    target_left = {row * 4 + col for row in range(4) for col in range(2)}
    assert info.keep == 8 and set(info.ids_shuffle[0, :8].tolist()) == target_left


@pytest.mark.parametrize(("value", "words"), [
    ({"routes": [{"selection_ratio": 1.0, "start_layer_idx": 0, "end_layer_idx": 1}]}, "[0, 1)"),
    ({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0}]}, "missing end_layer_idx"),
    ({"routes": []}, "non-empty list"),
    ({"route": []}, "unknown key(s) route"),
    ('{"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": "x"}]}', "integer block index"),
    ("[1, 2]", "must be a dict"),
])  # fmt: skip
def test_bad_routes_are_refused_naming_tread_config(value, words):
    with pytest.raises(ConfigError, match="tread_config") as caught:
        parse_routes(value)
    assert words in str(caught.value)


def test_route_indices_count_from_the_end_and_must_fit_the_model():
    routes = parse_routes("{'routes': [{'selection_ratio': 0.5, 'start_layer_idx': 2, 'end_layer_idx': -2}]}")
    assert [r.as_dict() for r in resolve(routes, 30)] == [
        {"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": 28}]  # fmt: skip
    for bad, words in (((0.5, 2, 40), "outside the model's 30"), ((0.5, 5, 3), "starts after it ends")):
        with pytest.raises(ConfigError, match="tread_config") as caught:
            resolve(parse_routes({"routes": [dict(zip(("selection_ratio", "start_layer_idx", "end_layer_idx"),
                                                     bad))]}), 30)  # fmt: skip
        assert words in str(caught.value)
    overlapping = parse_routes({"routes": [dict(selection_ratio=0.1, start_layer_idx=0, end_layer_idx=4),
                                           dict(selection_ratio=0.1, start_layer_idx=4, end_layer_idx=6)]})
    with pytest.raises(ConfigError, match="starts before the previous route ends"):
        resolve(overlapping, 30)


def test_st_check_refuses_bad_routes_and_unsupported_families(cli, tmp_path):
    config = tmp_path / "config.json"
    good = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": -1}]}
    supported = ("supported for model_family auraflow, chroma, flux, flux2, hidream, ltxvideo, pixart_sigma, "
                 "qwen_image, sana, sd3, wan, z_image in st")
    for family, flavour, value, words in (
            ("sdxl", None, good, supported), ("cosmos2image", None, good, "model_family cosmos2image is not routed"),
            ("flux", None, {"routes": [{"selection_ratio": 2}]}, "tread_config routes[0]")):  # fmt: skip
        config.write_text(json.dumps({"model_family": family, "model_flavour": flavour, "model_type": "lora",
                                      "tread_config": value}))  # fmt: skip
        result = cli("check", "-c", str(config))
        assert result.exit_code == 2, result.output
        assert words in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("family", ["flux2", "chroma", "auraflow"])
def test_a_route_inside_the_single_blocks_routes_only_the_image_tokens(family):
    """Single-stream blocks take the text tokens, then the image tokens, in one sequence: a route that starts there
    draws over the 16 image tokens only and leaves the 5 text tokens (13 with AuraFlow's 8 registers) in front."""
    model, run = _model(family)
    loss, grads = _loss_and_grads(model, run)
    routed = tread.attach(_config((0.0, 2, 3)), family, model, "cpu")  # the first two single blocks
    loss_0, grads_0 = _loss_and_grads(model, run)
    assert routed.current.draws[0].info.ids_shuffle.shape == (2, 16)
    assert routed.current.text_len == (13 if family == "auraflow" else 5)
    assert loss_0 == pytest.approx(loss, abs=1e-6)
    assert _grad_error(grads, grads_0) < 1e-5
    routed.remove()
    tread.attach(_config((0.5, 2, 3)), family, model, "cpu")
    assert abs(_loss_and_grads(model, run)[0] - loss) > 1e-5


def test_flux2_and_chroma_keep_masked_tokens_and_auraflow_routes_them():
    """As SimpleTuner's model_predict: FLUX.2 and Chroma pass the mask's token grid (2 x 2 latent patches) as
    force-keep, AuraFlow passes none."""
    pixels = -torch.ones(1, 3, 32, 32)
    pixels[..., :, :16] = 1.0
    for family, kept in (("flux2", 8), ("chroma", 8), ("auraflow", None)):
        state = tread.Tread([], 1, 1, tread.LAYOUTS[family], tread.Router(1, "cpu"))
        state.keep_masked(pixels, "mask", torch.zeros(1, 16, 8, 8), None)
        assert (None if state.pending_force_keep is None else int(state.pending_force_keep.sum())) == kept, family


@pytest.fixture(scope="module")
def wan22_i2v(tiny_model):
    """The folder `st tiny-model wan DIR --flavour i2v-2.2` writes: the two Wan 2.2 I2V A14B experts."""
    return tiny_model("wan", flavour="i2v-2.2")


@pytest.mark.parametrize("expert", ["transformer", "transformer_2"])  # the high- and low-noise stages
def test_wan_22_i2v_experts_are_routed(wan22_i2v, expert):
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig, inject_adapter_in_model

    def load(checkpointing=False):
        model = WanTransformer3DModel.from_pretrained(wan22_i2v, subfolder=expert).train()
        model.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["attn1.to_q", "attn1.to_v"],
                                           init_lora_weights="gaussian"), model)  # fmt: skip
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        if checkpointing:
            model.enable_gradient_checkpointing()
        return model

    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 36, 3, 8, 8), timestep=torch.tensor([950.0, 300.0]),
                  encoder_hidden_states=torch.randn(2, 7, load().config.text_dim))  # fmt: skip
    model = load()
    run = lambda: model(**inputs, return_dict=False)[0]  # noqa: E731
    plain, grads = _loss_and_grads(model, run)
    routed = tread.attach(_config((0.0, 0, -1)), "wan_i2v", model, "cpu")
    loss_0, grads_0 = _loss_and_grads(model, run)
    assert loss_0 == pytest.approx(plain, abs=1e-6)
    assert _grad_error(grads, grads_0) < 1e-5
    routed.remove()
    results = []
    for checkpointing in (False, True):
        model = load(checkpointing)
        tread.attach(_config((0.5, 1, -1)), "wan_i2v", model, "cpu")
        results.append(_loss_and_grads(model, lambda: model(**inputs, return_dict=False)[0]))
    (half, grads), (half_ckpt, grads_ckpt) = results
    assert abs(half - plain) > 1e-5 and half_ckpt == half
    assert max((grads[n] - grads_ckpt[n]).abs().max().item() for n in grads) < 1e-6
    assert all(grads[n].abs().sum() > 0 for n in grads)  # both blocks' LoRAs learn


def test_z_image_drops_a_share_of_the_image_tokens_and_keeps_every_caption_token():
    """Z-Image routes one image + caption sequence per sample: the caption (and padding) is force-kept, and the ratio
    drops that share of the 32 image tokens (16 real, 16 padding to a multiple of 32), not of the whole sequence."""
    model, run = _model("z_image")
    routed = tread.attach(_config((0.5, 1, 2)), "z_image", model, "cpu")
    _loss_and_grads(model, run)
    info = routed.current.draws[0].info
    assert info.ids_shuffle.shape == (2, 96) and info.keep == 96 - 16
    assert all(set(info.ids_shuffle[b, info.keep:].tolist()) < set(range(32)) for b in range(2))
