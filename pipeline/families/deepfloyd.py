"""DeepFloyd IF: a pixel-space UNet (no VAE) conditioned on T5-XXL over 77 tokens, epsilon prediction with learned
variance.

There is no autoencoder (`pixel_space.PIXEL_SPACE`): `st cache` stores each image itself, normalised to [-1, 1] in
the cache dtype, at its bucket size (SimpleTuner trains stage I at the dataset's resolution too). `IFPipeline`
lower-cases and strips prompts, encodes them with the attention mask over 77 tokens and passes the whole 77-token
sequence to the UNet (padded positions included, with no mask), so the cache stores all 77 positions. The UNet
outputs 6 channels (noise and variance); training uses the first 3, as SimpleTuner and the pipeline do.

Stage II (super-resolution: the UNet takes the noised low-resolution image as 3 extra channels and its noise level
as `class_labels`) is refused: its flavours name the missing feature, and a stage II model given by path stops in
`predict` with the same message.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.families import pixart_sigma, sd1x, text, tiny_parts
from pipeline.families.pixel_space import PIXEL_SPACE
from pipeline.families.spec import Component, Family, Flavour
from pipeline.families.tokenizers import t5_tokenizer
from pipeline.log import get_logger

log = get_logger("families")

T5_LENGTH = 77  # IFPipeline.encode_prompt's fixed length: "the text encoder was trained with a max length of 77"
STAGE_II = ("stage II super-resolution training (the noised low-resolution image as extra UNet channels and its "
            "noise level as class labels)")  # fmt: skip

# PixArt's T5 layout (text_encoder/ and tokenizer/, T5Tokenizer) over 77 tokens
TEXT_ENCODERS = (replace(pixart_sigma.TEXT_ENCODERS[0], max_length=T5_LENGTH),)


def encode_prompts(
    text_encoders: Any,
    tokenizers: Any,
    prompts: list[str],
    *,
    max_length: int | None = None,
    t5_padding: str = "unmodified",
    device: Any = "cpu",
) -> list[dict[str, Any]]:
    """`prompt_embeds` (77 x T5 dim) of each prompt, as `IFPipeline.encode_prompt` without caption cleaning: the
    mask goes to the encoder, every position to the UNet. `max_length` (tokenizer_max_length) other than 77 is
    replaced by 77 with a warning, as SimpleTuner does; `t5_padding` changes nothing (the pipeline keeps padding)."""
    import torch

    text.check_t5_padding(t5_padding)
    if max_length is not None and int(max_length) != T5_LENGTH:
        log.warning("tokenizer_max_length %s: DeepFloyd IF encodes 77 tokens (as IFPipeline and SimpleTuner); "
                    "using 77", max_length)  # fmt: skip
    prompts = [p.lower().strip() for p in text.check_prompts(prompts)]
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    ids, mask = text.tokenize(tokenizer, prompts, T5_LENGTH, device)
    with torch.no_grad():
        embeds = encoder(ids, attention_mask=mask)[0]
    return text.split({"prompt_embeds": embeds})


def predict(unet: Any, pixels: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None) -> Any:
    """`IFPipeline`'s UNet call on noisy pixels, keeping the noise half of its output (the rest is the learned
    variance)."""
    if unet.config.in_channels != pixels.shape[1]:
        raise InputError(f"this DeepFloyd UNet takes {unet.config.in_channels} channels (a stage II model): "
                         f"{STAGE_II} is not supported yet; train a stage I model (model_flavour i-...)")  # fmt: skip
    out = unet(pixels, timesteps, encoder_hidden_states=text["prompt_embeds"], return_dict=False)[0]
    return out[:, : pixels.shape[1]]


def tiny_unet(**extra: Any) -> Any:
    """A tiny IF-style `UNet2DConditionModel`: added-KV cross-attention blocks, T5 states projected in
    (`encoder_hid_dim`), the pooled text added to the time embedding, 6 output channels (noise and variance).
    Attention only at the lowest of 3 levels: pixel-space attention at full size would dominate a test's time."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=32,
        in_channels=3,
        out_channels=6,
        layers_per_block=1,
        block_out_channels=(16, 16, 32),
        norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=32,
        encoder_hid_dim=32,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    )
    return UNet2DConditionModel(**{**config, **extra}).eval()


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny DeepFloyd IF stage I diffusers folder (DDPM with learned-range variance, as IF-I ships)."""
    from diffusers import DDPMScheduler, IFPipeline

    tokenizer = t5_tokenizer(max_length=T5_LENGTH)
    tiny_parts.seed_everything(seed)
    text_encoder = tiny_parts.t5_encoder(tokenizer)
    tiny_parts.seed_everything(seed + 1)
    unet = tiny_unet()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        beta_start=0.0001,
        beta_end=0.02,
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
    )
    pipe = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, watermarker=None,
                      requires_safety_checker=False)  # fmt: skip
    tiny_parts.save(pipe, out_dir)


# SimpleTuner's DeepFloyd flavours (models/deepfloyd/model.py HUGGINGFACE_PATHS). SimpleTuner has no default: it
# requires model_flavour.
FLAVOURS = (
    Flavour("i-medium-400m", "DeepFloyd/IF-I-M-v1.0"),
    Flavour("i-large-900m", "DeepFloyd/IF-I-L-v1.0"),
    Flavour("i-xlarge-4.3b", "DeepFloyd/IF-I-XL-v1.0"),
    Flavour("ii-medium-450m", "DeepFloyd/IF-II-M-v1.0", needs=STAGE_II),
    Flavour("ii-large-1.2b", "DeepFloyd/IF-II-L-v1.0", needs=STAGE_II),
)

FAMILY = Family(
    name="deepfloyd",
    pipeline_class="IFPipeline",
    denoiser=Component("unet", "UNet2DConditionModel", "diffusers"),
    vae=PIXEL_SPACE,
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "DDPMScheduler", "diffusers"),
    latent_channels=3,
    bucket_alignment=32,  # SimpleTuner overrides aspect_bucket_alignment to 32 for DeepFloyd
    prediction_type="epsilon",
    lora_targets=sd1x.UNET_LORA_TARGETS,  # SimpleTuner's DEFAULT_LORA_TARGET
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=predict,
    single_file=False,
    flavours=FLAVOURS,
    default_flavour=None,
    refused_precisions=("fp8-quanto",),  # SimpleTuner: "DeepFloyd does not support fp8-quanto"
)
