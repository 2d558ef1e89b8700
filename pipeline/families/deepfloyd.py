"""DeepFloyd IF: a pixel-space UNet (no VAE) conditioned on T5-XXL over 77 tokens, epsilon prediction with learned
variance.

There is no autoencoder (`pixel_space.PIXEL_SPACE`): `st cache` stores each image itself, normalised to [-1, 1] in
the cache dtype, at its bucket size (SimpleTuner trains stage I at the dataset's resolution too). `IFPipeline`
lower-cases and strips prompts, encodes them with the attention mask over 77 tokens and passes the whole 77-token
sequence to the UNet (padded positions included, with no mask), so the cache stores all 77 positions. The UNet
outputs 6 channels (noise and variance); training uses the first 3, as SimpleTuner and the pipeline do.

Stage II (super-resolution, `IFSuperResolutionPipeline`; flavours ii-*, or a folder whose model_index.json names that
pipeline) trains as the `STAGE_II` variant. Its UNet takes 6 channels, the noisy image and the upscaled, noised
low-resolution image, and the low-resolution image's noise level as `class_labels`. SimpleTuner trains it without
a low-resolution image (models/deepfloyd/model.py `_model_predict_single`): the noisy input is concatenated with
itself, and the class labels are the training timesteps (cast to the weight dtype). st does the same, so a
stage II run is SimpleTuner's: no downsampling, no image_noising_scheduler, the dataset's resolution. Validation
renders through IFSuperResolutionPipeline (its default noise_level 250) from the first cached training images,
resized to a 64-pixel short edge as SimpleTuner's stage II dataset validation does.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputError
from pipeline.families import pixart_sigma, sd1x, text, tiny_parts
from pipeline.families.pixel_space import PIXEL_SPACE
from pipeline.families.spec import Component, Family, Flavour
from pipeline.families.tokenizers import t5_tokenizer
from pipeline.log import get_logger

log = get_logger("families")

T5_LENGTH = 77  # IFPipeline.encode_prompt's fixed length: "the text encoder was trained with a max length of 77"
STAGE_II_PIPELINE = "IFSuperResolutionPipeline"
STAGE_II_FLAVOURS = ("ii-medium-450m", "ii-large-1.2b")
# SimpleTuner's `validation_image_input_edge_length` for stage II: the low-resolution input's short edge.
VALIDATION_INPUT_EDGE = 64

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
        raise InputError(f"this DeepFloyd UNet takes {unet.config.in_channels} channels, not {pixels.shape[1]}: a "
                         "stage II (super-resolution) UNet trains with model_flavour "
                         f"{' or '.join(STAGE_II_FLAVOURS)}, or from its {STAGE_II_PIPELINE} folder")  # fmt: skip
    out = unet(pixels, timesteps, encoder_hidden_states=text["prompt_embeds"], return_dict=False)[0]
    return out[:, : pixels.shape[1]]


def stage_ii_call(unet: Any, pixels: Any, upscaled: Any, timesteps: Any, noise_level: Any, text: dict[str, Any]) -> Any:
    """`IFSuperResolutionPipeline`'s UNet call (no guidance): the noisy image followed by the upscaled noised
    low-resolution image along the channels, `noise_level` as `class_labels`; the noise half of the output."""
    import torch

    out = unet(torch.cat([pixels, upscaled], dim=1), timesteps, encoder_hidden_states=text["prompt_embeds"],
               class_labels=noise_level, return_dict=False)[0]  # fmt: skip
    noise, _variance = out.split(pixels.shape[1], dim=1)
    return noise


def predict_stage_ii(unet: Any, pixels: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
                     guidance: Any = None) -> Any:  # fmt: skip
    """A stage II training prediction as SimpleTuner makes it: the noisy image stands in for the upscaled
    low-resolution image (concatenated with itself) and the timesteps, cast to the UNet's dtype, are the class labels
    (SimpleTuner casts them to the base weight dtype: in bf16, 999 becomes 1000)."""
    if unet.config.in_channels != 2 * pixels.shape[1]:
        raise InputError(f"this DeepFloyd UNet takes {unet.config.in_channels} channels: a stage II model takes "
                         f"{2 * pixels.shape[1]}; a stage I model trains with model_flavour i-medium-400m, "
                         "i-large-900m or i-xlarge-4.3b")  # fmt: skip
    return stage_ii_call(unet, pixels, pixels, timesteps, timesteps.to(pixels.dtype), text)


def low_resolution_image(image: Any) -> Any:
    """A stage II validation input: `image` (PIL) resized so its short edge is 64 pixels (SimpleTuner's
    `resize_validation_images` for stage II), the long edge in proportion, a multiple of 8."""
    from PIL import Image

    width, height = image.size
    scale = VALIDATION_INPUT_EDGE / min(width, height)
    size = tuple(VALIDATION_INPUT_EDGE if side == min(width, height) else max(8, round(side * scale / 8) * 8)
                 for side in (width, height))  # fmt: skip
    return image.resize(size, Image.Resampling.BICUBIC)  # PIL's resize default, as SimpleTuner calls it


def load_image_noising_scheduler(source: str, revision: str | None = None) -> Any:
    """The stage II model's `image_noising_scheduler/` (it noises the upscaled image in the pipeline)."""
    from diffusers import DDPMScheduler

    try:
        return DDPMScheduler.from_pretrained(source, subfolder="image_noising_scheduler", revision=revision)
    except (OSError, ValueError) as error:
        raise InputError(f"the DeepFloyd stage II model {source} has no readable image_noising_scheduler/ "
                         f"({error}); {STAGE_II_PIPELINE} needs it to render validation images") from error


def noising_scheduler(family: Any, source: str, trained: Any, load_other_stage: bool, device: Any) -> dict[str, Any]:
    """`Family.validation_components` of stage II: the pipeline noises the upscaled low-resolution image."""
    return {"image_noising_scheduler": load_image_noising_scheduler(source)}


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


def tiny(out_dir: Path, seed: int, stage_ii: bool = False) -> None:
    """Write a tiny DeepFloyd IF stage I diffusers folder (DDPM with learned-range variance, as IF-I ships), or with
    `stage_ii` a stage II `IFSuperResolutionPipeline` folder: a 6-channel UNet with a timestep class embedding for
    the noise level, and the `image_noising_scheduler` (as IF-II ships them; diffusers' IF tests' layout)."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline

    tokenizer = t5_tokenizer(max_length=T5_LENGTH)
    tiny_parts.seed_everything(seed)
    text_encoder = tiny_parts.t5_encoder(tokenizer)
    tiny_parts.seed_everything(seed + 1)
    unet = tiny_unet(in_channels=6, class_embed_type="timestep") if stage_ii else tiny_unet()
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
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler, safety_checker=None,
                 feature_extractor=None, watermarker=None, requires_safety_checker=False)  # fmt: skip
    if stage_ii:
        noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                                beta_end=0.02)  # fmt: skip
        pipe = IFSuperResolutionPipeline(**parts, image_noising_scheduler=noising)
    else:
        pipe = IFPipeline(**parts)
    tiny_parts.save(pipe, out_dir)


def is_stage_ii(flavour: str | None, source: str) -> bool:
    """Whether a run of `model_flavour` `flavour` on the model at `source` trains stage II: an ii-* flavour, or a
    diffusers folder (local, or in the hub cache) whose model_index.json names IFSuperResolutionPipeline. An ii-*
    flavour with a stage I folder is refused."""
    from pipeline.families.hub import model_index_of

    index = model_index_of(source) or {}
    named = index.get("_class_name")
    if flavour in STAGE_II_FLAVOURS and named not in (None, STAGE_II_PIPELINE):
        raise ConfigError(f"model_flavour {flavour} is DeepFloyd IF stage II ({STAGE_II_PIPELINE}), but the model at "
                          f"{source} is a {named}: point pretrained_model_name_or_path at a stage II model, or choose "
                          "a stage I flavour (i-medium-400m, i-large-900m, i-xlarge-4.3b)")  # fmt: skip
    return flavour in STAGE_II_FLAVOURS or named == STAGE_II_PIPELINE


def _variant(flavour: str | None, source: str) -> Family:
    return STAGE_II if is_stage_ii(flavour, source) else FAMILY


# SimpleTuner's DeepFloyd flavours (models/deepfloyd/model.py HUGGINGFACE_PATHS). SimpleTuner has no default: it
# requires model_flavour.
FLAVOURS = (
    Flavour("i-medium-400m", "DeepFloyd/IF-I-M-v1.0"),
    Flavour("i-large-900m", "DeepFloyd/IF-I-L-v1.0"),
    Flavour("i-xlarge-4.3b", "DeepFloyd/IF-I-XL-v1.0"),
    Flavour("ii-medium-450m", "DeepFloyd/IF-II-M-v1.0"),  # trains as STAGE_II (see `_variant`)
    Flavour("ii-large-1.2b", "DeepFloyd/IF-II-L-v1.0"),
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
    variant=_variant,
)

# Stage II: stage I's text, cache, schedule and LoRA targets with the super-resolution pipeline, its UNet call and
# tiny model (Flux Kontext's pattern; `deepfloyd` picks it for the ii-* flavours and IFSuperResolutionPipeline folders).
STAGE_II: Family = replace(FAMILY, pipeline_class=STAGE_II_PIPELINE, predict=predict_stage_ii,
                           tiny=functools.partial(tiny, stage_ii=True), variant=None,
                           validation_components=noising_scheduler, validation_input=low_resolution_image)  # fmt: skip
