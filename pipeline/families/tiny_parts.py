"""Builders of tiny, randomly initialised components for the families' `tiny()` test models.

Sizes are the smallest that still exercise each architecture: CLIP hidden 32 with 2 layers, T5 d_model 32 with 2
layers, VAEs with (32, 64) channels (a latent factor of 2) unless a family needs its real factor of 8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.families.tokenizers import EOS, write_clip_vocab


def seed_everything(seed: int) -> None:
    """Seed torch's CPU generator before building one component."""
    import torch

    torch.manual_seed(seed)


def clip_text(tokenizer: Any, *, projection: bool = False, hidden_act: str = "quick_gelu", hidden: int = 32) -> Any:
    """A tiny `CLIPTextModel` (or `CLIPTextModelWithProjection`) whose ids match `tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model.eval()


def t5_encoder(tokenizer: Any, d_model: int = 32, umt5: bool = False) -> Any:
    """A tiny `T5EncoderModel` in the T5 v1.1 style (gated GELU), as the T5-XXL encoders of SD3, Flux and PixArt;
    `umt5`: a `UMT5EncoderModel` (Wan's UMT5-XXL: a relative attention bias in every layer) of the same sizes."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config = (UMT5Config if umt5 else T5Config)(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=d_model * 2,
        num_layers=2,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return (UMT5EncoderModel if umt5 else T5EncoderModel)(config).eval()


def vae(
    latent_channels: int,
    scaling_factor: float,
    shift_factor: float | None = None,
    *,
    block_out_channels: tuple[int, ...] = (32, 64),
    quant_conv: bool = True,
    mid_attention: bool = True,
) -> Any:
    """A tiny `AutoencoderKL` carrying the real family's scaling and shift factors in its config. `mid_attention`
    False leaves out the mid-block attention (for pipelines that always decode large latents: HiDream's)."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(32, min(block_out_channels)),
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
        mid_block_add_attention=mid_attention,
    ).eval()


def save(pipe: Any, out_dir: Path, clip_tokenizers: tuple[str, ...] = ()) -> None:
    """Save a tiny pipeline as safetensors, and the vocab.json + merges.txt of its CLIP tokenizers beside their
    tokenizer.json (for loaders that want the classic files)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    for subfolder in clip_tokenizers:
        write_clip_vocab(out_dir / subfolder)
