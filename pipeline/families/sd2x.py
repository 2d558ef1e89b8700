"""Stable Diffusion 2.x: the SD 1.x layout with an OpenCLIP ViT-H text encoder and v-prediction (768 models).

SD 2's "penultimate layer" is baked into its checkpoints: the converted text encoder keeps 23 of OpenCLIP's 24
layers and `StableDiffusionPipeline` takes its last hidden state after the final layer norm, so encoding is the
SD 1.x code path. Its tokenizer pads with "!" (id 0) rather than `<|endoftext|>`, and it uses GELU, not quick GELU.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.families import sd1x, text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour
from pipeline.families.tokenizers import clip_tokenizer


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny SD 2.x diffusers folder (DDIM scheduler with v_prediction, linear-projection UNet)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = clip_tokenizer(pad_token="!", max_length=sd1x.CLIP_LENGTH)
    tiny_parts.seed_everything(seed)
    text_encoder = tiny_parts.clip_text(tokenizer, hidden_act="gelu")
    tiny_parts.seed_everything(seed + 1)
    denoiser = sd1x.unet(cross_attention_dim=32, use_linear_projection=True)
    tiny_parts.seed_everything(seed + 2)
    vae = tiny_parts.vae(4, 0.18215)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=denoiser,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tiny_parts.save(pipe, out_dir, clip_tokenizers=("tokenizer",))


# SimpleTuner's SD 2.x flavours (models/sd1x/model.py, StableDiffusion2.HUGGINGFACE_PATHS); its default is
# "pseudoflex-v2".
FLAVOURS = (
    Flavour("digitaldiffusion", "Junglerally/Digital-Diffusion"),
    Flavour("pseudoflex-v2", "bghira/pseudo-flex-v2"),
    Flavour("pseudojourney", "bghira/pseudo-journey-v2"),
    Flavour("2.1", "stabilityai/stable-diffusion-2-1"),
    Flavour("2.0", "stabilityai/stable-diffusion-2-0"),
)

FAMILY = Family(
    name="sd2x",
    pipeline_class="StableDiffusionPipeline",
    denoiser=Component("unet", "UNet2DConditionModel", "diffusers"),
    vae=Component("vae", "AutoencoderKL", "diffusers"),
    text_encoders=sd1x.TEXT_ENCODERS,
    scheduler=Component("scheduler", "DDIMScheduler", "diffusers"),
    latent_channels=4,
    bucket_alignment=64,
    prediction_type="v_prediction",
    lora_targets=sd1x.UNET_LORA_TARGETS,
    tiny=tiny,
    encode_prompts=sd1x.encode_clip_last,
    collate_text=text.collate,
    predict=sd1x.predict_unet,
    flavours=FLAVOURS,
    default_flavour="pseudoflex-v2",
    control_input="pixels",
)
