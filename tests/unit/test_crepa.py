"""CREPA: SimpleTuner's neighbour-weighted alignment on hand-checkable cases, and its gradient through a forward hook
on a tiny Wan transformer with a peft LoRA (real diffusers, peft and transformers classes, random weights)."""

from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.config import build_config  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.families import get_family  # noqa: E402
from pipeline.train import crepa  # noqa: E402
from pipeline.train.crepa_encoder import FrameEncoder, LatentDecoder, encoder_source, write_tiny_dinov2  # noqa: E402

ON = {"crepa_enabled": True, "crepa_block_index": 0}


def options(**changes) -> crepa.CrepaOptions:
    config, _ = build_config({**ON, **changes})
    return crepa.CrepaOptions.from_config(config)


def frames(*vectors) -> torch.Tensor:
    """One video, one token per frame: B=1 x T x 1 x D."""
    return torch.tensor(vectors, dtype=torch.float32).view(1, len(vectors), 1, -1)


# Every frame's projection is (1, 0); the teacher's frames are (1, 0), (0.6, 0.8), (0, 1): sim(f, k) = y_k[0].
PROJECTED = frames([1.0, 0.0], [1.0, 0.0], [1.0, 0.0])
FEATURES = frames([1.0, 0.0], [0.6, 0.8], [0.0, 1.0])


def test_adjacent_neighbours_weighted_as_simpletuner():
    """d = 1, tau = 1: frame f gains exp(-1) * sim(f, f +- 1); S = (1 + .6w) + (.6 + w(0 + 1)) + (0 + .6w)."""
    w = math.exp(-1)
    loss, metrics = crepa.alignment(PROJECTED, FEATURES, options())
    assert float(loss) == pytest.approx(-(1.6 + 2.2 * w) / 3)
    assert metrics["crepa_similarity_self"] == pytest.approx(1.6 / 3)
    loss, _ = crepa.alignment(PROJECTED, FEATURES, options(crepa_normalize_by_frames=False))
    assert float(loss) == pytest.approx(-(1.6 + 2.2 * w))


def test_exact_distance_and_cumulative_neighbours():
    """d = 2 adjacent: only frames 0 <-> 2 (weight exp(-2 / tau)); cumulative adds the distance-1 pairs too."""
    loss, _ = crepa.alignment(PROJECTED, FEATURES, options(crepa_adjacent_distance=2, crepa_adjacent_tau=2.0))
    assert float(loss) == pytest.approx(-(1.6 + math.exp(-1) * (0 + 1)) / 3)
    loss, _ = crepa.alignment(PROJECTED, FEATURES, options(crepa_adjacent_distance=2, crepa_adjacent_tau=2.0,
                                                           crepa_cumulative_neighbors=True))  # fmt: skip
    assert float(loss) == pytest.approx(-(1.6 + math.exp(-0.5) * 2.2 + math.exp(-1) * 1) / 3)
    # a distance beyond the clip is clipped to frames - 1; distance 0 is self-similarity only
    far, _ = crepa.alignment(PROJECTED, FEATURES, options(crepa_adjacent_distance=9, crepa_adjacent_tau=2.0))
    assert float(far) == pytest.approx(-(1.6 + math.exp(-1)) / 3)
    alone, _ = crepa.alignment(PROJECTED, FEATURES, options(crepa_adjacent_distance=0))
    assert float(alone) == pytest.approx(-1.6 / 3)


def test_frames_and_tokens_aligned_as_simpletuner():
    """Decoded frames are subsampled at linspace(0, T-1, t); a 4x4 token grid meets one encoder token by bilinear
    interpolation (the grid's centre), or with crepa_spatial_align false by mean-pooling."""
    features = torch.arange(9.0).view(1, 9, 1, 1)
    _, picked = crepa.align_frames(torch.zeros(1, 3, 1, 1), features)
    assert picked.flatten().tolist() == [0.0, 4.0, 8.0]
    grid = torch.arange(16.0).view(1, 1, 16, 1)  # row-major 4 x 4
    centre, _ = crepa.align_tokens(grid, torch.zeros(1, 1, 1, 1), spatial_align=True)
    assert centre.flatten().tolist() == [pytest.approx((5 + 6 + 9 + 10) / 4)]
    pooled, _ = crepa.align_tokens(grid, torch.zeros(1, 1, 1, 1), spatial_align=False)
    assert pooled.flatten().tolist() == [pytest.approx(7.5)]


def test_options_checked_with_the_key_named():
    with pytest.raises(ConfigError, match="crepa_block_index is not set"):
        build_config({"crepa_enabled": True})
    with pytest.raises(ConfigError, match="crepa_adjacent_tau"):
        build_config({**ON, "crepa_adjacent_tau": 0})
    config, _ = build_config({**ON, "model_family": "flux"})
    with pytest.raises(ConfigError, match="model_family flux trains images.*set crepa_enabled false"):
        crepa.options_for(config, get_family("flux"))
    assert crepa.options_for(build_config({})[0], get_family("flux")) is None


def test_encoder_names_map_to_transformers_dinov2(tmp_path):
    assert encoder_source("dinov2_vitg14") == "facebook/dinov2-giant"
    assert encoder_source("dinov2_s") == "facebook/dinov2-small"
    assert encoder_source("dinov2-vitb14") == "facebook/dinov2-base"
    (tmp_path / "dino").mkdir()
    assert encoder_source("dino", base_dir=tmp_path) == str(tmp_path / "dino")
    assert encoder_source("org/encoder") == "org/encoder"


# ------------------------------------------------------------------------------------ on a tiny Wan transformer


@pytest.fixture(scope="module")
def wan_parts(tmp_path_factory):
    """A tiny WanTransformer3DModel (3 blocks) with a LoRA, a tiny Wan VAE (4x temporal, 8x spatial), a tiny DINOv2."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    denoiser = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                     in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                     num_layers=3, cross_attn_norm=True, rope_max_seq_len=32)  # fmt: skip
    denoiser.requires_grad_(False)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()  # fmt: skip
    dino = write_tiny_dinov2(tmp_path_factory.mktemp("crepa") / "dino")
    return denoiser, vae, FrameEncoder.load(str(dino), 16, "cpu")


def forward(denoiser, latents):
    text = torch.randn(latents.shape[0], 5, 16, generator=torch.Generator().manual_seed(1))
    return denoiser(hidden_states=latents, timestep=torch.tensor([500.0] * latents.shape[0]),
                    encoder_hidden_states=text, return_dict=False)[0]  # fmt: skip


def lora_grads(denoiser) -> dict[str, float]:
    return {n: float(p.grad.abs().sum()) for n, p in denoiser.named_parameters() if "lora_B" in n and p.grad is not None}


def test_loss_gradient_reaches_the_lora_up_to_the_hooked_block(wan_parts):
    denoiser, vae, encoder = wan_parts
    regulariser = crepa.Crepa(options(crepa_block_index=1), denoiser,
                              crepa.build_projector(16, encoder.dim, seed=0, device="cpu"), encoder,
                              LatentDecoder(vae))  # fmt: skip
    latents = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # 3 latent frames: 9 decoded
    denoiser.zero_grad()
    forward(denoiser, latents)
    loss = regulariser.loss(latents)
    assert loss.requires_grad and float(loss.detach()) != 0
    loss.backward()
    grads = lora_grads(denoiser)
    assert any(v > 0 for n, v in grads.items() if n.startswith(("blocks.0.", "blocks.1.")))
    assert all(v == 0 for n, v in grads.items() if n.startswith("blocks.2."))  # after the hooked block: none
    assert all(float(p.grad.abs().sum()) > 0 for p in regulariser.parameters())
    metrics = regulariser.metrics()
    assert metrics["crepa_loss"] == pytest.approx(float(loss)) and regulariser.metrics() == {}


def test_backbone_teacher_and_lambda_zero(wan_parts):
    """crepa_use_backbone_features: block 2's output (detached) teaches block 0's, no encoder; crepa_lambda 0 adds
    an exact zero without gradient, and evaluation passes (no gradient) capture nothing."""
    denoiser, _, _ = wan_parts
    chosen = options(crepa_use_backbone_features=True, crepa_teacher_block_index=2)
    regulariser = crepa.Crepa(chosen, denoiser, crepa.build_projector(16, 16, seed=0, device="cpu"), None, None)
    latents = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    denoiser.zero_grad()
    forward(denoiser, latents)
    regulariser.loss(latents).backward()
    grads = lora_grads(denoiser)
    assert any(v > 0 for n, v in grads.items() if n.startswith("blocks.0."))
    assert all(v == 0 for n, v in grads.items() if n.startswith(("blocks.1.", "blocks.2.")))

    off = crepa.Crepa(options(crepa_lambda=0.0), denoiser, crepa.build_projector(16, 16, seed=0, device="cpu"),
                      None, None)  # fmt: skip
    forward(denoiser, latents)
    zero = off.loss(latents)
    assert float(zero) == 0 and not zero.requires_grad
    with torch.no_grad():
        forward(denoiser, latents)
    assert regulariser.captured == {}


def test_block_index_outside_the_model_names_the_key(wan_parts):
    denoiser, _, _ = wan_parts
    with pytest.raises(ConfigError, match="crepa_block_index is 3, but this WanTransformer3DModel has 3 blocks"):
        crepa.Crepa(options(crepa_block_index=3), denoiser, torch.nn.Identity(), None, None)


def test_ltx_latents_decoded_as_the_pipeline_does():
    """LTX-Video: de-normalised by LTXPipeline's own function, decoded at timestep 0 (a timestep-conditioned VAE)."""
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                                layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
                                decoder_inject_noise=(False,) * 5, patch_size=4, patch_size_t=1,
                                timestep_conditioning=True).eval()  # fmt: skip
    vae.latents_mean.normal_()
    vae.latents_std.uniform_(0.5, 2.0)
    latents = torch.randn(1, 8, 2, 2, 2)
    frames = LatentDecoder(vae)(latents)
    with torch.no_grad():
        raw = LTXPipeline._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        expected = vae.decode(raw, torch.zeros(1)).sample
    assert frames.shape == (1, 9, 3, 64, 64)  # 1 + (2 - 1) * 8 frames, 32x spatial
    assert torch.equal(frames, ((expected.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4))
