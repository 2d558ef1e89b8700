"""The typed run configuration.

One dataclass holds every option under its SimpleTuner name. Each field declares which stages read it; a stage's
manifest key hashes only the keys that stage reads and that can change its outputs, so changing `learning_rate` never
invalidates `st prepare` or `st cache`.

Config files are JSON (trailing commas allowed), TOML or SimpleTuner's shell-style `config.env`; a leading `--` on keys
is tolerated (SimpleTuner's config.json style), strings such as "true" or "1024" are coerced to the field's type, and
`--set key=value` overrides are parsed as TOML literals. Relative paths follow `LoadedConfig.resolve_path`.
Every numeric option is checked against its range (`OPTION_RANGES`: finite, bounded, positive sizes) when the config
is loaded, so a bad value stops every stage before it reads or writes anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
import shlex
import string
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .log import get_logger
from .simpletuner import OPTION_STATES, Accepted, Alias, Refused

log = get_logger("config")

PREPARE = "prepare"
CACHE = "cache"
TRAIN = "train"
PUBLISH = "publish"


def opt(default: Any, *stages: str, choices: tuple | None = None, help: str = "",
        key: bool | tuple[str, ...] = True) -> Any:  # fmt: skip
    """Declare an option: its default, the stages that read it, allowed choices, and whether it enters stage keys.

    `key=False` marks options that a stage reads but that never change what it writes (worker counts, checkpoint
    intervals), or whose effect the stage hashes another way (model paths: the stage hashes the model's identity, so
    moving a model folder re-runs nothing). `key=(CACHE,)` keeps the option in the key of those stages only.
    """
    meta = {"stages": frozenset(stages), "choices": choices, "help": help, "key": key}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


RESOLUTION_TYPES = ("pixel", "area", "pixel_area")
# Kept in sync with pipeline.families.FAMILIES (a test checks); listed here so that config loading stays import-light.
MODEL_FAMILIES = ("sd1x", "sd2x", "sdxl", "sd3", "flux", "pixart_sigma", "auraflow", "lumina2", "sana", "qwen_image",
                  "kolors", "chroma", "z_image", "hidream", "cosmos2image", "flux2",
                  "deepfloyd", "wan", "ltxvideo", "omnigen")
CROP_STYLES = ("center", "centre", "random", "corner")
CROP_ASPECTS = ("square", "preserve", "closest", "random")
# SimpleTuner's default `sana_complex_human_instruction`: the lines Sana's pipeline prepends to every caption.
SANA_COMPLEX_HUMAN_INSTRUCTION = (
    ("Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
     "image generation. Evaluate the level of detail in the user prompt:"),
    ("- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
     "relationships to create vivid and concrete scenes."),
    "- Do not add detail that is not in the original prompt! Do not mention colors if the User Prompt does not!",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    ("- If the prompt contains explicit material, do not remove this information from the output, which would "
     "damage the performance of downstream classifiers."),
    "Here are examples of how to transform or refine prompts:",
    ("- User Prompt: A cat sleeping -> Enhanced: A cat sleeping peacefully, showcasing the joy of pet ownership. "
     "Cute floof kitty cat gatto."),
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene featuring a crowd of people.",
    ("Please generate only the enhanced description for the prompt below and avoid including any additional "
     "commentary or evaluations:"),
    "User Prompt: ",
)  # fmt: skip
# SimpleTuner's quantisation presets (base_model_precision, text_encoder_N_precision).
QUANTISATION_PRESETS = ("no_change", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "fp8uz-quanto",
                        "int8-torchao", "int4-torchao", "fp8-torchao", "nf4-bnb")


@dataclass
class Config:
    """Every option st knows, under SimpleTuner's names, with st's defaults."""

    # Datasets and buckets (defaults for each dataset of data_backend_config).
    data_backend_config: str | None = opt(None, PREPARE, key=False,  # its datasets' files are hashed instead
                                          help="Dataset list (SimpleTuner multidatabackend.json).")
    resolution: float = opt(1024.0, PREPARE, help="Edge in px (pixel, pixel_area) or megapixels (area).")
    resolution_type: str = opt("pixel_area", PREPARE, choices=RESOLUTION_TYPES)
    minimum_image_size: float | None = opt(None, PREPARE, help="Smaller images are skipped (units of resolution_type).")
    maximum_image_size: float | None = opt(None, PREPARE, help="Larger images are first downsampled.")
    target_downsample_size: float | None = opt(None, PREPARE, help="Size that maximum_image_size downsamples to.")
    minimum_aspect_ratio: float | None = opt(None, PREPARE)
    maximum_aspect_ratio: float | None = opt(None, PREPARE)
    crop: bool = opt(False, PREPARE)
    crop_style: str = opt("random", PREPARE, choices=CROP_STYLES)
    crop_aspect: str = opt("square", PREPARE, choices=CROP_ASPECTS)
    crop_aspect_buckets: list | None = opt(None, PREPARE, help="Aspect ratios for crop_aspect closest/random.")
    max_upscale_threshold: float | None = opt(None, PREPARE, help="Skip images needing more upscaling than this.")
    aspect_bucket_rounding: int = opt(2, PREPARE)
    aspect_bucket_alignment: int = opt(64, PREPARE)
    caption_strategy: str = opt("filename", PREPARE, choices=("filename", "textfile", "parquet", "instanceprompt"))
    # SimpleTuner's fallbacks for a dataset's `parquet` block that does not name these columns.
    parquet_caption_column: str | None = opt(None, PREPARE, help="Caption column of parquet caption tables whose "
                                             "`parquet` block sets no caption_column.")  # fmt: skip
    parquet_filename_column: str | None = opt(None, PREPARE, help="File-name column of parquet caption tables whose "
                                              "`parquet` block sets no filename_column.")  # fmt: skip
    instance_prompt: str | None = opt(None, PREPARE)
    prepend_instance_prompt: bool = opt(False, PREPARE)
    only_instance_prompt: bool = opt(False, PREPARE)
    repeats: int = opt(0, PREPARE, help="Extra passes over a dataset per epoch (0: seen once).")
    probability: float = opt(1.0, PREPARE, help="Relative sampling weight of a dataset.")
    disable_bucket_pruning: bool = opt(False, PREPARE)
    allow_dataset_oversubscription: bool = opt(False, PREPARE)
    ignore_missing_files: bool = opt(False, PREPARE, CACHE, key=(PREPARE,))
    delete_problematic_images: bool = opt(False, PREPARE)
    delete_unwanted_images: bool = opt(False, PREPARE)
    train_batch_size: int = opt(4, PREPARE, TRAIN)
    gradient_accumulation_steps: int = opt(1, PREPARE, TRAIN)
    num_processes: int = opt(1, PREPARE, TRAIN, help="Training processes (accelerate's num_processes).")
    context_parallel_size: int = opt(1, TRAIN, help="Processes that share one sample's token sequence (context "
                                     "parallelism, diffusers' _cp_plan; Wan); must divide num_processes.")
    context_parallel_comm_strategy: str = opt("allgather", TRAIN, key=False, choices=("allgather", "alltoall"),
                                              help="alltoall: Ulysses attention. allgather (ring attention) runs "
                                                   "as Ulysses too (the same attention).")  # fmt: skip
    seed: int | None = opt(None, PREPARE, CACHE, TRAIN)
    seed_for_each_device: bool = opt(True, TRAIN, help="Each data-parallel process draws its own noise and "
                                     "timesteps (false: all draw the same).")  # fmt: skip
    max_workers: int | None = opt(None, PREPARE, CACHE, key=False, help="Worker processes for scans/decoding.")

    # Model and caches.
    model_family: str | None = opt(None, CACHE, TRAIN, choices=MODEL_FAMILIES)
    model_flavour: str | None = opt(None, CACHE, TRAIN, key=False, help="A named base model of model_family "
                                    "(SimpleTuner's flavours); used when pretrained_model_name_or_path is not set.")  # fmt: skip
    # Model paths stay out of stage keys: stages hash the identity of the model's files instead.
    pretrained_model_name_or_path: str | None = opt(
        None, CACHE, TRAIN, key=False, help="Local diffusers folder, single-file checkpoint, or hub id."
    )
    pretrained_vae_model_name_or_path: str | None = opt(None, CACHE, TRAIN, key=False)
    pretrained_t5_model_name_or_path: str | None = opt(None, CACHE, TRAIN, key=False)
    revision: str | None = opt(None, CACHE, TRAIN)
    variant: str | None = opt(None, CACHE, TRAIN)
    vae_dtype: str = opt("bf16", CACHE, choices=("default", "fp32", "fp16", "bf16"),
                         help="default: bf16 on CUDA, fp32 elsewhere; the default bf16 becomes fp32 on a device "
                              "without bf16.")  # fmt: skip
    vae_batch_size: int = opt(4, CACHE, help="Sets the shape of each VAE call, so the last bits of latents.")
    tokenizer_max_length: int | None = opt(None, CACHE, TRAIN)
    t5_padding: str = opt("unmodified", CACHE, TRAIN, choices=("unmodified", "zero"))
    sana_complex_human_instruction: str | list | None = opt(
        "\n".join(SANA_COMPLEX_HUMAN_INSTRUCTION), CACHE, key=(CACHE,),
        help="Sana: instruction lines prepended to every caption (text, a JSON list, or a text file's path; None: "
             "none).")  # fmt: skip
    offload_during_startup: bool = opt(False, CACHE, key=False, help="Keep idle encoders on the CPU.")
    cache_dtype: str = opt("bf16", CACHE, choices=("bf16", "fp16", "fp32"), help="dtype of cached tensors.")
    cache_compression_level: int = opt(3, CACHE, help="zstd level of cached tensors (1-22).")
    cache_shard_samples: int = opt(256, CACHE, help="Most samples in one shard.")
    validation_prompt: str | None = opt(None, CACHE, TRAIN)
    validation_negative_prompt: str | None = opt("blurry, cropped, ugly", CACHE, TRAIN)

    # Training: what is trained and how (SimpleTuner's names and meanings).
    model_type: str = opt("lora", TRAIN, choices=("lora", "full"))
    layer_freeze_strategy: str = opt("none", TRAIN, choices=("none", "bitfit"),
                                     help="bitfit: model_type full trains only the denoiser's parameters named "
                                     "*bias* (SimpleTuner's BitFit); LoRA runs train as without it (a warning, as "
                                     "SimpleTuner ignores it there); refused with controlnet.")  # fmt: skip
    lora_rank: int = opt(16, TRAIN)
    lora_alpha: float | None = opt(None, TRAIN, help="Defaults to lora_rank (scale 1).")
    lora_dropout: float = opt(0.1, TRAIN)
    lora_init_type: str = opt("default", TRAIN, choices=("default", "gaussian", "pissa", "olora"))
    peft_lora_mode: str = opt("standard", TRAIN, choices=("standard", "singlora"),
                              help="singlora: one matrix A per Linear layer (peft-singlora), update A A^T.")
    singlora_ramp_up_steps: int = opt(0, TRAIN, help="SingLoRA's update ramps in over this many steps (0: 100).")
    peft_lora_target_modules: list | None = opt(None, TRAIN, help="Module names; default: the family's attention.")
    flux_lora_target: str = opt("all", TRAIN, choices=("mmdit", "context", "context+ffs", "all", "all+ffs",
                                                       "all+ffs+embedder", "ai-toolkit", "tiny", "nano", "controlnet",
                                                       "all+ffs+embedder+controlnet"),
                                help="Flux's (and Chroma's) LoRA layers; controlnet, all+ffs+embedder+controlnet: "
                                "the ControlNet's (controlnet true).")  # fmt: skip
    slider_lora_target: bool = opt(False, TRAIN, help="SimpleTuner's slider targets (self-attention, projections, "
                                   "convolutions in and out, time embedding) instead of the family's default.")
    use_dora: bool = opt(False, TRAIN)
    init_lora: str | None = opt(None, TRAIN, help="LoRA weights (safetensors) to start from.")
    # ControlNet training (pipeline/train/controlnet.py): the base model frozen, a ControlNet trained beside it.
    controlnet: bool = opt(False, TRAIN, help="Train a ControlNet (model_type full) on conditioning_data pairs.")
    controlnet_model_name_or_path: str | None = opt(None, TRAIN, help="A diffusers ControlNet (folder or hub id) to "
                                                    "start from; default: built from the base denoiser.")  # fmt: skip
    controlnet_custom_config: Any = opt(None, TRAIN, help="Keywords of ControlNetModel.from_unet / FluxControlNetModel"
                                        ".from_transformer (e.g. num_layers): JSON text, a dict or a JSON file.")  # fmt: skip
    control: bool = opt(False, TRAIN, help="Channel-wise control (Flux, LoRA): the control image's latents enter the "
                        "widened input layer, as FluxControlPipeline runs it (pipeline/train/control.py).")  # fmt: skip
    ramtorch_controlnet: bool = opt(False, TRAIN, key=False, help="With ramtorch, stream the ControlNet's Linear "
                                    "layers too (CUDA).")  # fmt: skip
    # Text-encoder training (sd1x, sdxl): st cache also stores token ids, so it enters the cache key only when true.
    train_text_encoder: bool = opt(False, CACHE, TRAIN, key=(TRAIN,),
                                   help="Also train the CLIP text encoder(s): a LoRA on them in LoRA runs.")
    text_encoder_lr: float | None = opt(None, TRAIN, help="Learning rate of the text encoders (default: "
                                        "learning_rate).")  # fmt: skip
    text_encoder_limit: int = opt(100, TRAIN, help="Steps after which the text encoders stop training.")
    # LyCORIS adapters (lora_type lycoris), built by the lycoris-lora library from lycoris_config.
    lora_type: str = opt("standard", TRAIN, choices=("standard", "lycoris"))
    lycoris_config: str | None = opt(None, TRAIN, help="LyCORIS JSON (algo, linear_dim, apply_preset, ...).")
    init_lokr_norm: float | None = opt(None, TRAIN, help="LoKr: w1 = 1, w2 perturbed normal at this scale.")
    validation_lycoris_strength: float = opt(1.0, TRAIN, help="LyCORIS multiplier while validating.")
    # An extra LoRA loaded beside the trained one while validating (pipeline.train.validation_adapters).
    validation_adapter_path: str | None = opt(None, TRAIN, help="A LoRA (local .safetensors, a folder, or hub "
                                              "org/repo[:file.safetensors]) loaded only while validating.")
    validation_adapter_name: str | None = opt(None, TRAIN, help="The validation adapter's name (its files' suffix).")
    validation_adapter_strength: float = opt(1.0, TRAIN, help="The validation adapter's strength (> 0).")
    validation_adapter_mode: str = opt("adapter_only", TRAIN, choices=("adapter_only", "comparison", "none"),
                                       help="adapter_only: render with the adapter; comparison: without, then with "
                                       "it; none: load nothing.")  # fmt: skip
    validation_adapter_config: list | dict | str | None = opt(None, TRAIN, help="Several validation adapter runs "
                                                              "(JSON list, {\"runs\": [...]}, or a JSON file).")
    prediction_type: str | None = opt(None, TRAIN, choices=(None, "epsilon", "v_prediction", "flow_matching"))
    rescale_betas_zero_snr: bool = opt(False, TRAIN)
    training_scheduler_timestep_spacing: str = opt("trailing", TRAIN, choices=("leading", "linspace", "trailing"))
    timestep_bias_strategy: str = opt("none", TRAIN, choices=("none", "earlier", "later", "range"))
    timestep_bias_begin: int = opt(0, TRAIN)
    timestep_bias_end: int = opt(1000, TRAIN)
    timestep_bias_multiplier: float = opt(1.0, TRAIN)
    timestep_bias_portion: float = opt(0.25, TRAIN)
    disable_segmented_timestep_sampling: bool = opt(False, TRAIN)
    refiner_training: bool = opt(False, TRAIN, help="DDPM timesteps only from the refiner's range: [0, T * "
                                 "refiner_training_strength) (inverted: the rest).")  # fmt: skip
    refiner_training_strength: float = opt(0.2, TRAIN, help="The share of the schedule refiner_training keeps.")
    refiner_training_invert_schedule: bool = opt(False, TRAIN, help="refiner_training keeps the noisy end instead.")
    data_aesthetic_score: float = opt(7.0, TRAIN, help="The aesthetic score in an SDXL refiner's time ids (training "
                                      "and validation); other models ignore it.")  # fmt: skip
    flow_sigmoid_scale: float = opt(1.0, TRAIN)
    flow_use_uniform_schedule: bool = opt(False, TRAIN)
    flow_use_beta_schedule: bool = opt(False, TRAIN)
    flow_beta_schedule_alpha: float = opt(2.0, TRAIN)
    flow_beta_schedule_beta: float = opt(2.0, TRAIN)
    flow_schedule_shift: float | None = opt(
        None, TRAIN, help="Timestep shift (0: none); default: the family's (SD3 and Flux 3.0, others 1.0).")
    flow_schedule_auto_shift: bool = opt(False, TRAIN)
    flux_guidance_mode: str = opt("constant", TRAIN, choices=("constant", "random-range"))
    flux_guidance_value: float = opt(1.0, TRAIN)
    flux_guidance_min: float = opt(1.0, TRAIN)
    flux_guidance_max: float = opt(4.0, TRAIN)
    flux_fast_schedule: bool = opt(False, TRAIN, help="Flow sigmas drawn from 1.0 (7 in 10), 0.75, 0.5, 0.25, "
                                   "unshifted (Schnell's; SimpleTuner: below the uniform and beta schedules).")
    # SimpleTuner's assistant LoRA (flux schnell, z_image turbo flavours; pipeline.train.assistant).
    assistant_lora_path: str | None = opt(None, TRAIN, help="The frozen assistant LoRA a LoRA of flux schnell / "
                                          "z_image turbo trains over (hub id, folder or file; unset: ostris' adapter).")
    assistant_lora_weight_name: str | None = opt(None, TRAIN, help="The assistant LoRA's file in its repository or "
                                                 "folder (unset: the flavour's).")  # fmt: skip
    disable_assistant_lora: bool = opt(False, TRAIN, help="Train flux schnell / z_image turbo without the assistant "
                                       "LoRA.")  # fmt: skip
    assistant_lora_strength: float = opt(1.0, TRAIN, help="The assistant LoRA's weight while training.")
    assistant_lora_inference_strength: float = opt(0.0, TRAIN, help="The assistant LoRA's weight in validation "
                                                   "renders (0: off, as in SimpleTuner).")  # fmt: skip
    flux_attention_masked_training: bool = opt(False, TRAIN, help="Flux: the T5 token mask enters every joint "
                                               "attention (added to the scores, as in SimpleTuner).")  # fmt: skip
    hidream_use_load_balancing_loss: bool = opt(False, TRAIN, help="HiDream: add the expert gates' auxiliary loss "
                                                "(detached, as in SimpleTuner: it changes the logged loss only).")
    hidream_load_balancing_loss_weight: float | None = opt(None, TRAIN, help="Its weight (and the gates' coefficient).")
    ltx_train_mode: str = opt("i2v", TRAIN, choices=("t2v", "i2v"), help="LTX-Video: i2v trains first-frame "
                              "conditioning on video datasets with video.is_i2v; t2v on none.")  # fmt: skip
    ltx_i2v_prob: float = opt(0.1, TRAIN, help="LTX-Video i2v: chance per batch that the first latent frame gets "
                              "less noise (ltx_partial_noise_fraction), unless ltx_protect_first_frame.")  # fmt: skip
    ltx_partial_noise_fraction: float = opt(0.05, TRAIN, help="LTX-Video i2v: the largest share by which that "
                                            "frame's noise and timestep shrink.")  # fmt: skip
    ltx_protect_first_frame: bool = opt(False, TRAIN, help="LTX-Video i2v: the first latent frame stays clean "
                                        "(timestep 0) and is left out of the loss.")  # fmt: skip
    framerate: float | None = opt(None, PREPARE, TRAIN, key=(TRAIN,), help="Video frames per second: unset, "
                                  "the family's (LTX-Video 25, Wan 15); LTX-Video's RoPE time scale (8 / framerate), "
                                  "validation MP4s' rate, and video.num_frames' default (framerate * 5, 30 fps for "
                                  "other families).")  # fmt: skip
    # CREPA (video families): see pipeline.train.crepa.
    crepa_enabled: bool = opt(False, TRAIN, help="Video families: align a transformer block's hidden states with a "
                              "frozen vision encoder's features of each frame and its neighbours (CREPA).")
    crepa_block_index: int | None = opt(None, TRAIN, help="The transformer block whose output CREPA aligns "
                                        "(required with crepa_enabled).")
    crepa_lambda: float = opt(0.5, TRAIN, help="Weight of the CREPA loss added to the training loss.")
    crepa_adjacent_distance: int = opt(1, TRAIN, help="Neighbour distance d: frames f-d and f+d (0: the frame only).")
    crepa_adjacent_tau: float = opt(1.0, TRAIN, help="Neighbour weight exp(-distance / tau).")
    crepa_cumulative_neighbors: bool = opt(False, TRAIN, help="Every distance 1..d instead of d only.")
    crepa_normalize_by_frames: bool = opt(True, TRAIN, help="Divide each video's summed similarity by its frames.")
    crepa_spatial_align: bool = opt(True, TRAIN, help="Interpolate token counts to match (false: mean-pool both).")
    crepa_model: str = opt("dinov2_vitg14", TRAIN, help="The frozen encoder: dinov2_vits14 / vitb14 / vitl14 / "
                           "vitg14 (transformers' facebook/dinov2-*), or a Dinov2Model folder or hub id.")
    crepa_use_backbone_features: bool = opt(False, TRAIN, help="Align to another block of the denoiser "
                                            "(crepa_teacher_block_index) instead of the encoder.")
    crepa_teacher_block_index: int | None = opt(None, TRAIN, help="The teacher block with backbone features "
                                                "(default: crepa_block_index).")
    crepa_encoder_image_size: int = opt(518, TRAIN, help="The side frames are resized to for the encoder.")
    # LayerSync (flux, sd3, pixart_sigma, sana, wan, ltxvideo): see pipeline.train.layersync.
    layersync_enabled: bool = opt(False, TRAIN, help="flux, sd3, pixart_sigma, sana, wan, ltxvideo: pull a transformer "
                                  "block's hidden states towards another block's (detached) in the same model; the "
                                  "loss adds -layersync_lambda x their mean cosine similarity "
                                  "(LayerSync).")  # fmt: skip
    layersync_student_block: int | None = opt(None, TRAIN, help="The student block, LayerSync's 1-based depth "
                                              "(d is block d - 1; 0 is block 0); required with layersync_enabled.")
    layersync_teacher_block: int | None = opt(None, TRAIN, help="The teacher block, the same way (default: the "
                                              "student block).")  # fmt: skip
    layersync_lambda: float = opt(0.2, TRAIN, help="Weight of the LayerSync loss (above 0).")
    # TREAD token routing: see pipeline.tread_settings and pipeline.train.tread.
    tread_config: dict | str | None = opt(None, TRAIN, help="TREAD token routing (flux incl. kontext, flux2, chroma, "
                                          "auraflow, qwen_image incl. edit, z_image, sd3, pixart_sigma, wan incl. "
                                          "2.1/2.2 i2v and 2.2 TI2V, sana, hidream, ltxvideo): "
                                          "{\"routes\": [{\"selection_ratio\": 0.5, \"start_layer_idx\": 2, "
                                          "\"end_layer_idx\": -2}]}; a seeded share of the image / video tokens "
                                          "skips blocks start..end while training.")  # fmt: skip
    sd3_clip_uncond_behaviour: str = opt("empty_string", TRAIN, choices=("empty_string", "zero"),
                                         help="SD3 caption dropout: the empty caption's CLIP embeddings, or zeros.")
    sd3_t5_uncond_behaviour: str | None = opt(None, TRAIN, choices=(None, "empty_string", "zero"),
                                              help="As sd3_clip_uncond_behaviour for T5 (unset: follows it).")
    loss_type: str = opt("l2", TRAIN, choices=("l2", "huber", "smooth_l1"))
    huber_schedule: str = opt("snr", TRAIN, choices=("snr", "exponential", "constant"))
    huber_c: float = opt(0.1, TRAIN)
    snr_gamma: float | None = opt(None, TRAIN)
    snr_weight: float = opt(1.0, TRAIN, help="Multiplies the l2 loss of a DDPM model (epsilon or v-prediction) "
                            "without snr_gamma, as SimpleTuner; no effect elsewhere.")  # fmt: skip
    use_soft_min_snr: bool = opt(False, TRAIN)
    soft_min_snr_sigma_data: float | None = opt(None, TRAIN)
    diff2flow_enabled: bool = opt(False, TRAIN, help="The Diffusion-to-Flow bridge of an epsilon / v-prediction "
                                  "model; it changes training only with diff2flow_loss.")  # fmt: skip
    diff2flow_loss: bool = opt(False, TRAIN, help="With diff2flow_enabled: the l2 loss of the prediction converted "
                               "to a flow velocity against noise - latents (epsilon / v-prediction models).")  # fmt: skip
    masked_loss_probability: float = opt(1.0, TRAIN, help="Chance per batch that a mask / segmentation dataset's mask "
                                         "weights the loss (st: both kinds, so 0 turns masks off; SimpleTuner: "
                                         "segmentation only, masks always).")  # fmt: skip
    noise_offset: float = opt(0.1, TRAIN, help="Used only with offset_noise (as in SimpleTuner).")
    noise_offset_probability: float = opt(0.25, TRAIN)
    offset_noise: bool = opt(False, TRAIN)
    input_perturbation: float = opt(0.0, TRAIN)
    input_perturbation_steps: int = opt(0, TRAIN)
    caption_dropout_probability: float = opt(0.1, TRAIN)
    data_backend_sampling: str = opt("auto-weighting", TRAIN, choices=("uniform", "auto-weighting"))
    conditioning_multidataset_sampling: str = opt(
        "random", TRAIN, choices=("random", "combined"),
        help="With several conditioning datasets on one image dataset: random picks one per sample (seeded); "
             "combined uses them all at once (SimpleTuner's multi-reference Kontext; refused: diffusers' "
             "FluxKontextPipeline takes one reference image).")  # fmt: skip
    dataloader_prefetch: bool = opt(True, TRAIN, key=False)
    dataloader_prefetch_qlen: int = opt(4, TRAIN, key=False)

    # Optimisation.
    optimizer: str = opt("adamw_bf16", TRAIN, choices=("adamw_bf16", "optimi-adamw", "optimi-stableadamw",
                                                       "optimi-lion", "prodigy", "adamw_schedulefree",
                                                       "bnb-adamw8bit", "optimi-radam", "optimi-ranger", "optimi-adan",
                                                       "optimi-adam", "optimi-sgd", "ao-adamw8bit", "ao-adamw4bit",
                                                       "ao-adamfp8", "ao-adamwfp8", "adamw_schedulefree+aggressive",
                                                       "adamw_schedulefree+no_kahan", "soap"),
                         help="Each takes learning_rate and SimpleTuner's default settings (betas, weight_decay, "
                              "eps, ...; not adam_weight_decay / adam_epsilon), then optimizer_config, then "
                              "optimizer_beta1 + optimizer_beta2 when both are set. prodigy is SimpleTuner's: "
                              "Prodigy-Plus-Schedule-Free with SimpleTuner's settings (lr 1.0, not learning_rate; no "
                              "weight decay; no gradient clipping; the lr_scheduler applies). ao-* keep torchao "
                              "low-bit moments (fp8 ones need CUDA compute capability 8.9 on a GPU, run on the CPU); "
                              "bnb-adamw8bit needs a CUDA GPU; st's schedule-free AdamW has no Kahan summation; soap "
                              "is st's own SOAP.")  # fmt: skip
    optimizer_config: str | None = opt(None, TRAIN, help="Extra optimizer arguments: 'key=value,key=value'.")
    optimizer_beta1: float | None = opt(None, TRAIN)
    optimizer_beta2: float | None = opt(None, TRAIN)
    # Loaded (SimpleTuner's examples set them) and read by no optimizer: SimpleTuner reads them only under DeepSpeed;
    # st train warns when one is set (pipeline.simpletuner.UNUSED_FIELDS gives their state in `st options`).
    adam_weight_decay: float = opt(1e-2, TRAIN, key=False, help="Not used (SimpleTuner reads it only under DeepSpeed, "
                                                                 "which st does not run): set optimizer_config="
                                                                 "\"weight_decay=...\"; st train warns when it is set.")
    adam_epsilon: float = opt(1e-8, TRAIN, key=False, help="Not used (SimpleTuner reads it only under DeepSpeed, which "
                                                           "st does not run): set optimizer_config=\"eps=...\"; "
                                                           "st train warns when it is set.")
    prodigy_steps: int | None = opt(None, TRAIN, help="optimizer=prodigy: freeze its step-size estimate d after this "
                                                      "many steps (unset or 0: never); no effect with other optimizers.")
    max_grad_norm: float = opt(2.0, TRAIN)
    grad_clip_method: str = opt("value", TRAIN, choices=("value", "norm"))
    optimizer_release_gradients: bool = opt(False, TRAIN, help="optimi-* optimizers: step each parameter during the "
                                             "backward pass as its gradient is ready, then free the gradient "
                                             "(optimi's gradient release); no accumulation, clipping or fp16.")
    learning_rate: float = opt(4e-7, TRAIN, help="SimpleTuner's default 4e-7 suits full tuning; LoRA runs usually "
                                                 "want 1e-5 to 1e-3.")
    lr_scheduler: str = opt("constant_with_warmup", TRAIN, choices=(
        "constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "polynomial", "linear", "sine"))
    lr_warmup_steps: int = opt(0, TRAIN)
    lr_num_cycles: int = opt(1, TRAIN)
    lr_power: float = opt(0.8, TRAIN)
    lr_end: float = opt(4e-7, TRAIN)
    lr_scale: bool = opt(False, TRAIN)
    lr_scale_sqrt: bool = opt(False, TRAIN)
    num_train_epochs: int = opt(1, TRAIN)
    max_train_steps: int | None = opt(None, TRAIN)
    ignore_final_epochs: bool = opt(False, TRAIN)
    mixed_precision: str = opt("bf16", TRAIN, choices=("no", "fp16", "bf16"),
                                 help="The default bf16 becomes no (fp32) on a device without bf16.")
    # The frozen base model's precision (pipeline.quantise): quantised weights, and their dtype.
    base_model_precision: str = opt("no_change", TRAIN, choices=(
        "no_change", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "fp8uz-quanto", "int8-torchao",
        "int4-torchao", "fp8-torchao", "nf4-bnb"),
        help="Quantise the frozen denoiser (optimum-quanto, torchao; nf4-bnb and int4-torchao while loading).")
    base_model_default_dtype: str = opt("bf16", TRAIN, choices=("bf16", "fp32"),
                                        help="The dtype of a quantised base's unquantised weights.")
    quantize_via: str = opt("cpu", TRAIN, choices=("cpu", "accelerator", "pipeline"),
                            help="Quantise after loading on the cpu or accelerator, or while loading (pipeline: "
                                 "diffusers' quantization_config).")  # fmt: skip
    quantization_config: Any = opt(None, TRAIN, help="diffusers quantization settings per component (unet, "
                                   "transformer, default): a JSON object, JSON text or a JSON file path.")  # fmt: skip
    quantize_activations: bool = opt(False, TRAIN, help="Quantise activations too (8-bit optimum-quanto presets).")
    pretrained_transformer_model_name_or_path: str | None = opt(None, TRAIN, key=False,  # its files are hashed instead
        help="Train this transformer: a diffusers folder or hub id (read from pretrained_transformer_subfolder), or "
             "a .gguf file (flux, sd3), loaded quantised by diffusers' GGUF loader, or a .safetensors stage file "
             "(wan animegen-t2v-* flavours, in place of AnimeGen's).")  # fmt: skip
    pretrained_transformer_subfolder: str | None = opt("transformer", TRAIN, help="The subfolder of "
                                                       "pretrained_transformer_model_name_or_path (none: itself).")
    # In the train key by value (a changed override never resumes another run's checkpoints).
    pretrained_unet_model_name_or_path: str | None = opt(None, TRAIN, help="Train this UNet (folder or hub id) "
                                                         "instead of the model's own.")  # fmt: skip
    pretrained_unet_subfolder: str | None = opt("unet", TRAIN, help="The subfolder of "
                                                "pretrained_unet_model_name_or_path (none: itself).")  # fmt: skip
    # The text encoders that compute st cache's embeddings (pipeline.quantise_modules): N is the family's Nth encoder.
    text_encoder_1_precision: str = opt("no_change", CACHE, choices=QUANTISATION_PRESETS,
                                        help="Quantise text encoder 1 in st cache (CLIP-L; pixart_sigma: T5).")
    text_encoder_2_precision: str = opt("no_change", CACHE, choices=QUANTISATION_PRESETS,
                                        help="Quantise text encoder 2 in st cache (flux: T5; sdxl, sd3: CLIP-bigG).")
    text_encoder_3_precision: str = opt("no_change", CACHE, choices=QUANTISATION_PRESETS,
                                        help="Quantise text encoder 3 in st cache (sd3: T5).")
    text_encoder_4_precision: str = opt("no_change", CACHE, choices=QUANTISATION_PRESETS,
                                        help="Quantise text encoder 4 in st cache (no family st trains has four).")
    gradient_checkpointing: bool = opt(True, TRAIN)
    set_grads_to_none: bool = opt(True, TRAIN, key=False)

    # EMA.
    use_ema: bool = opt(False, TRAIN)
    ema_decay: float = opt(0.995, TRAIN)
    ema_device: str = opt("cpu", TRAIN, choices=("cpu", "accelerator"), key=False)
    ema_cpu_only: bool = opt(False, TRAIN, key=False)
    ema_update_interval: int = opt(1, TRAIN)
    ema_foreach_disable: bool = opt(False, TRAIN, key=False)
    ema_validation: str = opt("comparison", TRAIN, choices=("none", "ema_only", "comparison"))

    # Checkpoints.
    checkpoint_step_interval: int | None = opt(500, TRAIN, key=False)
    checkpoint_epoch_interval: int | None = opt(None, TRAIN, key=False)
    checkpoints_total_limit: int | None = opt(5, TRAIN, key=False)
    checkpointing_rolling_steps: int | None = opt(None, TRAIN, key=False)
    checkpoints_rolling_total_limit: int | None = opt(None, TRAIN, key=False)
    resume_from_checkpoint: str | None = opt("latest", TRAIN, key=False,
                                              help="A checkpoint folder, 'latest' (this run's newest) or none.")

    # Validation, evaluation, tracking.
    user_prompt_library: str | None = opt(None, CACHE, TRAIN, help="JSON file of {shortname: prompt}.")
    num_validation_images: int = opt(1, TRAIN)
    validation_step_interval: int | None = opt(100, TRAIN, key=False)
    validation_epoch_interval: int | None = opt(None, TRAIN, key=False)
    validation_resolution: str = opt("256", TRAIN, help="WxH or an edge, several separated by commas.")
    validation_num_inference_steps: int = opt(30, TRAIN)
    validation_guidance: float = opt(7.5, TRAIN)
    validation_guidance_rescale: float = opt(0.0, TRAIN)
    validation_guidance_real: float = opt(1.0, TRAIN, help="Flux: true classifier-free guidance scale with the "
                                          "negative prompt while validating (> 1 turns it on).")  # fmt: skip
    validation_no_cfg_until_timestep: int = opt(2, TRAIN, help="Flux with validation_guidance_real: the first "
                                                "validation steps that skip true CFG.")  # fmt: skip
    validation_guidance_skip_layers: list | None = opt(None, TRAIN, help="SD3: transformer layers (a JSON list) "
                                                       "skipped for skip-layer guidance while validating.")  # fmt: skip
    validation_guidance_skip_layers_start: float = opt(0.01, TRAIN, help="SD3 skip-layer guidance: the fraction of "
                                                       "the validation steps where it starts.")  # fmt: skip
    validation_guidance_skip_layers_stop: float = opt(0.2, TRAIN, help="SD3 skip-layer guidance: the fraction of "
                                                      "the validation steps where it stops.")  # fmt: skip
    validation_guidance_skip_scale: float = opt(2.8, TRAIN, help="SD3 skip-layer guidance scale.")
    validation_seed: int | None = opt(None, TRAIN)
    validation_randomize: bool = opt(False, TRAIN, help="A new seed for each validation, drawn from `seed` and "
                                     "the validation's label (logged; validation_seed is then unused).")  # fmt: skip
    validation_seed_source: str = opt("cpu", TRAIN, choices=("cpu", "gpu"), help="The validation generator's "
                                      "device: gpu is the training device (the CPU without one).")  # fmt: skip
    validation_on_startup: bool = opt(False, TRAIN, key=False, help="A validation before the first step of every "
                                      "run: step-0, or step-N-startup for a run resumed at step N.")  # fmt: skip
    validation_num_video_frames: int | None = opt(None, TRAIN, help="Frames of each validation video (video "
                                                  "families; unset: the family's default, Wan 81).")  # fmt: skip
    validation_noise_scheduler: str | None = opt(None, TRAIN, choices=(None, "ddim", "ddpm", "euler", "euler-a",
                                                                       "unipc", "dpm++"))  # fmt: skip
    inference_scheduler_timestep_spacing: str = opt("trailing", TRAIN, choices=("leading", "linspace", "trailing"),
                                                    help="The validation scheduler's timestep spacing (DDPM-type "
                                                    "schedulers; flow-matching ones have none).")  # fmt: skip
    unet_attention_slice: bool = opt(False, TRAIN, key=False, help="Sliced attention while validating (memory; "
                                     "UNet families: sd1x, sd2x, sdxl, kolors, deepfloyd).")  # fmt: skip
    wan_validation_load_other_stage: bool = opt(False, TRAIN, help="Wan 2.2 A14B stage flavours (i2v-14b-2.2-*, "
                                                "flf2v-14b-2.2-*, animegen-t2v-*): validation renders with the "
                                                "frozen other expert beside the trained one, switching at the "
                                                "boundary (false: the trained expert alone).")  # fmt: skip
    validation_disable: bool = opt(False, TRAIN, key=False)
    validation_using_datasets: bool = opt(False, TRAIN, help="Validate img2img (strength 0.2) from the first "
                                          "num_eval_images images of each image dataset (not disable_validation; "
                                          "eval_dataset_id: those named) with their captions, instead of the "
                                          "validation prompts (sd1x, sd2x, sdxl, sd3).")  # fmt: skip
    disable_benchmark: bool = opt(False, TRAIN, key=False)
    eval_steps_interval: int | None = opt(None, TRAIN, key=False)
    num_eval_images: int = opt(4, TRAIN, help="Samples the evaluation loss reads: of each eval dataset (of all "
                               "together when pooled), else the first cached samples.")  # fmt: skip
    eval_epoch_interval: float | None = opt(None, TRAIN, key=False, help="Evaluate every N epochs (0.5: twice an "
                                            "epoch); with eval_steps_interval both schedules run.")  # fmt: skip
    eval_dataset_id: str | list | None = opt(None, TRAIN, help="The eval dataset(s) (dataset_type eval) the "
                                             "evaluation loss uses; default: all of them.")  # fmt: skip
    eval_dataset_pooling: bool = opt(False, TRAIN, help="One eval_loss over all eval datasets instead of "
                                     "eval_loss/<id> per dataset.")  # fmt: skip
    eval_timesteps: int = opt(28, TRAIN, help="Points of the noise schedule the evaluation loss reads each "
                              "sample at: the midpoints of that many equal parts.")  # fmt: skip
    evaluation_type: str = opt("none", TRAIN, key=False, choices=("none", "clip"),
                               help="clip: log the CLIP score of each validation (clip/min, max, mean, std).")
    pretrained_evaluation_model_name_or_path: str = opt("openai/clip-vit-large-patch14-336", TRAIN, key=False,
                                                        help="The CLIP model evaluation_type clip scores with.")
    report_to: str = opt("none", TRAIN, choices=("tensorboard", "wandb", "none"), key=False)
    logging_dir: str | None = opt(None, TRAIN, key=False)
    tracker_project_name: str = opt("st", TRAIN, key=False)
    tracker_run_name: str | None = opt(None, TRAIN, key=False)

    # Speed and memory (chosen from measurements; see BENCHMARKS.md).
    attention_mechanism: str = opt("diffusers", CACHE, TRAIN, key=False,
                                   help="diffusers (PyTorch SDPA, auto), native-flash, native-efficient, native-math, "
                                        "cudnn, xformers, flash-attn*, flex, native*, sageattention*.")  # fmt: skip
    sageattention_usage: str = opt("inference", TRAIN, key=False,
                                   choices=("training", "inference", "training+inference"),
                                   help="Where a sageattention attention_mechanism runs: validation, training, both.")
    dynamo_backend: str | None = opt(None, CACHE, TRAIN, key=False,
                                     help="torch.compile backend (inductor, ...); env TRAINING_DYNAMO_BACKEND.")
    dynamo_mode: str | None = opt(None, CACHE, TRAIN, key=False)
    dynamo_fullgraph: bool = opt(False, CACHE, TRAIN, key=False)
    dynamo_dynamic: bool = opt(False, CACHE, TRAIN, key=False)
    dynamo_use_regional_compilation: bool = opt(True, TRAIN, key=False)
    fuse_qkv_projections: bool = opt(False, TRAIN, key=False)
    gradient_checkpointing_interval: int | None = opt(None, TRAIN, key=False)
    disable_tf32: bool = opt(False, CACHE, TRAIN, key=False)
    vae_enable_slicing: bool = opt(False, CACHE, TRAIN, key=(CACHE,))
    vae_enable_tiling: bool = opt(False, CACHE, TRAIN, help="Changes latents of images larger than a VAE tile.")
    keep_vae_loaded: bool = opt(False, TRAIN, key=False)
    accelerator_cache_clear_interval: int | None = opt(None, TRAIN, key=False)
    # Where the frozen denoiser waits between uses (pipeline.train.offload, block_swap): memory only, never results.
    enable_group_offload: bool = opt(False, TRAIN, key=False,
                                     help="diffusers group offloading of the denoiser (training and validation).")
    group_offload_type: str = opt("block_level", TRAIN, key=False, choices=("block_level", "leaf_level"))
    group_offload_blocks_per_group: int = opt(1, TRAIN, key=False, help="Blocks per group (block_level).")
    group_offload_use_stream: bool = opt(False, TRAIN, key=False, help="Overlap transfers on a CUDA stream (CUDA).")
    group_offload_to_disk_path: str | None = opt(None, TRAIN, key=False,
                                                 help="Spill groups to a temporary subfolder of this folder.")
    musubi_blocks_to_swap: int = opt(0, TRAIN, key=False,
                                     help="Keep the last N transformer blocks on musubi_block_swap_device.")
    musubi_block_swap_device: str = opt("cpu", TRAIN, key=False)
    offload_during_save: bool = opt(False, TRAIN, key=False, help="Move the denoiser to the CPU while saving.")
    enable_model_cpu_offload: bool = opt(False, TRAIN, key=False,
                                         help="diffusers model CPU offload while validating (CUDA; a no-op on CPU).")
    ramtorch: bool = opt(False, CACHE, TRAIN, key=False,
                         help="Keep the denoiser's frozen Linear weights in host memory, streamed per layer (CUDA).")
    ramtorch_target_modules: str | None = opt(None, CACHE, TRAIN, key=False,
                                              help="Comma-separated globs of the Linear layers ramtorch streams.")
    ramtorch_text_encoder: bool = opt(False, CACHE, TRAIN, key=False,
                                      help="With ramtorch, stream the text encoders' Linear layers too (CUDA).")
    ramtorch_vae: bool = opt(False, CACHE, TRAIN, key=False,
                             help="With ramtorch, stream the VAE mid blocks' Linear layers too (CUDA).")
    ramtorch_transformer_percent: float = opt(100.0, TRAIN, key=False,
                                              help="With ramtorch, stream only this share (0-100) of the denoiser's "
                                                   "selected Linear layers, the first ones in module order.")

    # Publishing.
    lora_format: str = opt("diffusers", PUBLISH, choices=("diffusers", "comfyui"))
    publishing_config: Any = opt(None, PUBLISH, key=False,
                                 help="Upload targets: JSON text, a dict, or a JSON file path (provider s3, ...).")
    push_to_hub: bool = opt(False, PUBLISH, TRAIN, key=False)
    push_checkpoints_to_hub: bool = opt(False, TRAIN, key=False)
    push_to_hub_background: bool = opt(False, PUBLISH, TRAIN, key=False)
    hub_model_id: str | None = opt(None, PUBLISH, TRAIN)
    model_card_note: str | None = opt(None, PUBLISH)
    model_card_safe_for_work: bool = opt(False, PUBLISH)
    model_card_private: bool = opt(True, PUBLISH)
    license: str = opt("other", PUBLISH, help="License id for the model card (the base model's terms apply).")

    # Notifications and hooks.
    webhook_config: Any = opt(None, PREPARE, CACHE, TRAIN, PUBLISH, key=False,
                              help="Webhook targets: JSON text, a list/dict, or a JSON file path.")
    webhook_reporting_interval: float = opt(60.0, TRAIN, key=False)
    post_checkpoint_script: str | None = opt(None, TRAIN, key=False,
                                             help="Runs in the background after each checkpoint; killed after "
                                                  "hook_timeout seconds.")  # fmt: skip
    post_upload_script: str | None = opt(None, TRAIN, PUBLISH, key=False)
    validation_method: str = opt("simpletuner-local", TRAIN, key=False,
                                 choices=("simpletuner-local", "external-script"))
    validation_external_script: str | None = opt(None, TRAIN, key=False)
    validation_external_background: bool = opt(False, TRAIN, key=False)
    hook_timeout: float = opt(3600.0, TRAIN, key=False,
                              help="Seconds post_checkpoint_script or validation_external_script may run before it "
                                   "and its child processes are killed.")  # fmt: skip

    def stage_keys(self, stage: str, *, key_only: bool = True) -> dict[str, Any]:
        """The options `stage` reads (by default only those that enter its key, see `opt`), resolved."""
        keys = {}
        for f in dataclasses.fields(self):
            if stage not in f.metadata["stages"]:
                continue
            in_key = f.metadata["key"]
            if not key_only or in_key is True or (isinstance(in_key, tuple) and stage in in_key):
                keys[f.name] = getattr(self, f.name)
        return keys


OPTION_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}


class OptionGroup:
    """A typed group of options, the part of `Config` one component reads (optimizer, LoRA, validation, ...).

    Subclasses are frozen dataclasses whose field names are option names; `from_config` copies those options, so a
    component receives only what it reads and a test can check that every field names a real option.
    """

    @classmethod
    def from_config(cls, config: "Config"):
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def known_option_names() -> list[str]:
    return sorted(OPTION_FIELDS)


def suggest(name: str, candidates: typing.Iterable[str]) -> str:
    """`; did you mean 'x'?` or an empty string."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{matches[0]}'?" if matches else ""


def _allowed_types(annotation: Any) -> tuple[list[type], bool]:
    """The concrete types an annotation allows, and whether None is allowed."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"list": list, "dict": dict})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return [typing.get_origin(a) or a for a in args if a is not type(None)], type(None) in args
    return [origin or annotation], False


def coerce(key: str, value: Any, annotation: Any, choices: tuple | None = None, where: str = "") -> Any:
    """Check `value` against the option's type and choices, converting strings as SimpleTuner's files need."""
    allowed, nullable = _allowed_types(annotation)
    place = f" in {where}" if where else ""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and nullable):
        if nullable:
            return None
        raise ConfigError(f"option '{key}'{place} must not be null")
    result: Any = _NO_MATCH
    for kind in allowed:
        result = _convert(value, kind)
        if result is not _NO_MATCH:
            break
    if result is _NO_MATCH:
        names = " or ".join(k.__name__ for k in allowed) + (" or null" if nullable else "")
        raise ConfigError(f"option '{key}'{place} must be {names}, got {value!r}")
    if choices is not None and result not in choices:
        raise _choice_error(key, result, choices, where)
    return result


def _choice_error(key: str, value: Any, choices: tuple, where: str) -> Exception:
    """A value outside the choices: a refusal naming the feature when it is a SimpleTuner value st lacks, SimpleTuner's
    own name for it when SimpleTuner spells it differently, else the list of choices."""
    from .errors import NotSupportedError
    from .simpletuner import choice_problem

    known = choice_problem(key, value, where)
    if known is not None:
        refused, message = known
        return NotSupportedError(message) if refused else ConfigError(message)
    place = f" in {where}" if where else ""
    listed = ", ".join(map(str, choices))
    return ConfigError(f"option '{key}'{place} has value {value!r}, which is not one of: {listed}")


_NO_MATCH = object()
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _convert(value: Any, kind: type) -> Any:
    if kind is Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        return _NO_MATCH
    if kind in (int, float):
        if isinstance(value, str):
            try:
                return kind(value.strip())
            except ValueError:
                return _NO_MATCH
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _NO_MATCH
        if kind is int and isinstance(value, float):
            return int(value) if value.is_integer() else _NO_MATCH
        return kind(value)
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return _NO_MATCH
    if kind is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                return [part.strip() for part in value.split(",") if part.strip()]
            return parsed if isinstance(parsed, list) else _NO_MATCH
        return _NO_MATCH
    if kind is dict:
        if isinstance(value, dict):
            return value
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                return _NO_MATCH
            return parsed if isinstance(parsed, dict) else _NO_MATCH
        return _NO_MATCH
    return value if isinstance(value, kind) else _NO_MATCH


def normalise_key(key: str) -> str:
    """`--resolution` and `resolution` name the same option; SimpleTuner's CLI also allows dashes."""
    return key.strip().removeprefix("--").replace("-", "_")


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one `--set key=value`; the value is a TOML literal, or a plain string when it is not one."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return normalise_key(key), value


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a JSON, TOML or SimpleTuner `config.env` file into a plain dict (no validation yet)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a JSON, TOML or config.env file")
    text = path.read_text()
    if path.suffix.lower() == ".env":
        return read_env_config(text, path)
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = json.loads(strip_trailing_commas(text))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold an object of option names to values, not {type(data).__name__}")
    return data


_CLOSING = re.compile(r"\s*[}\]]")


def strip_trailing_commas(text: str) -> str:
    """Drop each comma that directly precedes `}` or `]` outside strings (SimpleTuner's example configs have them)."""
    out: list[str] = []
    in_string = escaped = False
    for index, char in enumerate(text):
        if in_string:
            in_string = escaped or char != '"'
            escaped = char == "\\" and not escaped
            out.append(char)
            continue
        if char == '"':
            in_string = True
        elif char == "," and _CLOSING.match(text, index + 1):
            continue
        out.append(char)
    return "".join(out)


# SimpleTuner's launcher variables (simpletuner/helpers/configuration/env_file.py) -> the option each one sets;
# TRAINER_EXTRA_ARGS holds further `--option=value` arguments, which win over these.
ENV_VARIABLE_OPTIONS = {
    "RESUME_CHECKPOINT": "resume_from_checkpoint", "DATALOADER_CONFIG": "data_backend_config",
    "ASPECT_BUCKET_ROUNDING": "aspect_bucket_rounding", "TRAINING_SEED": "seed", "USE_EMA": "use_ema",
    "MINIMUM_RESOLUTION": "minimum_image_size", "OUTPUT_DIR": "output_dir", "USE_DORA": "use_dora",
    "LORA_TYPE": "lora_type", "LYCORIS_CONFIG": "lycoris_config", "PUSH_TO_HUB": "push_to_hub",
    "PUSH_TO_HUB_BACKGROUND": "push_to_hub_background", "PUSH_CHECKPOINTS": "push_checkpoints_to_hub",
    "PUBLISHING_CONFIG": "publishing_config", "MAX_NUM_STEPS": "max_train_steps", "NUM_EPOCHS": "num_train_epochs",
    "CHECKPOINTING_STEPS": "checkpoint_step_interval", "CHECKPOINT_STEP_INTERVAL": "checkpoint_step_interval",
    "CHECKPOINT_EPOCH_INTERVAL": "checkpoint_epoch_interval", "CHECKPOINTING_LIMIT": "checkpoints_total_limit",
    "HUB_MODEL_NAME": "hub_model_id", "MODEL_CARD_SAFE_FOR_WORK": "model_card_safe_for_work",
    "TRACKER_PROJECT_NAME": "tracker_project_name", "TRACKER_RUN_NAME": "tracker_run_name",
    "MODEL_TYPE": "model_type", "MODEL_NAME": "pretrained_model_name_or_path", "MODEL_FAMILY": "model_family",
    "TRAIN_BATCH_SIZE": "train_batch_size", "USE_GRADIENT_CHECKPOINTING": "gradient_checkpointing",
    "CAPTION_DROPOUT_PROBABILITY": "caption_dropout_probability", "RESOLUTION_TYPE": "resolution_type",
    "RESOLUTION": "resolution", "VALIDATION_SEED": "validation_seed", "VALIDATION_STEPS": "validation_step_interval",
    "VALIDATION_STEP_INTERVAL": "validation_step_interval", "VALIDATION_EPOCH_INTERVAL": "validation_epoch_interval",
    "VALIDATION_RESOLUTION": "validation_resolution", "VALIDATION_GUIDANCE": "validation_guidance",
    "VALIDATION_METHOD": "validation_method", "VALIDATION_EXTERNAL_SCRIPT": "validation_external_script",
    "VALIDATION_EXTERNAL_BACKGROUND": "validation_external_background",
    "POST_CHECKPOINT_SCRIPT": "post_checkpoint_script", "POST_UPLOAD_SCRIPT": "post_upload_script",
    "VALIDATION_GUIDANCE_RESCALE": "validation_guidance_rescale",
    "VALIDATION_GUIDANCE_REAL": "validation_guidance_real",
    "VALIDATION_NO_CFG_UNTIL_TIMESTEP": "validation_no_cfg_until_timestep",
    "VALIDATION_NUM_INFERENCE_STEPS": "validation_num_inference_steps", "VALIDATION_PROMPT": "validation_prompt",
    "ALLOW_TF32": "allow_tf32", "MIXED_PRECISION": "mixed_precision", "OPTIMIZER": "optimizer",
    "LEARNING_RATE": "learning_rate", "LR_SCHEDULE": "lr_scheduler", "LR_WARMUP_STEPS": "lr_warmup_steps",
    "BASE_MODEL_PRECISION": "base_model_precision", "TRAINING_NUM_PROCESSES": "num_processes",
    "TRAINING_SCHEDULER_TIMESTEP_SPACING": "training_scheduler_timestep_spacing",
    "INFERENCE_SCHEDULER_TIMESTEP_SPACING": "inference_scheduler_timestep_spacing",
    "GRADIENT_ACCUMULATION_STEPS": "gradient_accumulation_steps", "LR_END": "lr_end",
    "FLUX_GUIDANCE_VALUE": "flux_guidance_value", "FLUX_LORA_TARGET": "flux_lora_target",
    "VALIDATION_NEGATIVE_PROMPT": "validation_negative_prompt", "DISABLE_BENCHMARK": "disable_benchmark",
}  # fmt: skip
EXTRA_ARGS_VARIABLE = "TRAINER_EXTRA_ARGS"
# Launcher variables that set an option to a fixed value when "true" (SimpleTuner maps USE_BITFIT to
# `--layer_freeze_strategy=bitfit`).
ENV_FLAG_OPTIONS = {"USE_BITFIT": ("layer_freeze_strategy", "bitfit")}


def read_env_config(text: str, path: Path) -> dict[str, Any]:
    """Options of a SimpleTuner `config.env`: shell-style `KEY=value` lines, read as its launcher reads them.

    Known variables (ENV_VARIABLE_OPTIONS) set their option; "false" leaves the default, as SimpleTuner passes no
    flag then. `TRAINER_EXTRA_ARGS` holds `--option=value`, `--option value` or `--flag` arguments, which win.
    `$NAME` / `${NAME}` expand from earlier lines and the environment. Other variables are not options."""
    variables = _env_assignments(text, path)
    options: dict[str, Any] = {}
    for name, value in variables.items():
        option = ENV_VARIABLE_OPTIONS.get(name)
        if name in ENV_FLAG_OPTIONS:
            if value.lower() not in ("true", "false", ""):
                raise ConfigError(f"{path}: {name} must be true or false, got {value!r}")
            if value.lower() == "true":
                flag_option, flag_value = ENV_FLAG_OPTIONS[name]
                options[flag_option] = flag_value
        elif option is None:
            if name != EXTRA_ARGS_VARIABLE:
                log.info("%s: ignoring variable %s: it sets no option", path, name)
        elif value.lower() != "false" and value != "":
            options[option] = True if value.lower() == "true" else value
    options.update(_extra_args(variables.get(EXTRA_ARGS_VARIABLE, ""), path))
    return options


def _env_assignments(text: str, path: Path) -> dict[str, str]:
    variables: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        append = line.split("=", 1)[0].endswith("+")
        name, sep, raw = line.partition("+=" if append else "=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ConfigError(f"{path} line {number}: expected a shell assignment NAME=value, got {line!r}")
        try:
            words = shlex.split(raw, comments=True)
        except ValueError as exc:
            raise ConfigError(f"{path} line {number}: {exc} in {line!r}") from None
        value = string.Template(" ".join(words)).safe_substitute({**os.environ, **variables})
        variables[name] = f"{variables.get(name, '')} {value}".strip() if append else value
    return variables


def _extra_args(text: str, path: Path) -> dict[str, Any]:
    """`--option=value --flag --option value` -> {option: value}; a bare `--flag` is true."""
    options: dict[str, Any] = {}
    words = shlex.split(text)
    index = 0
    while index < len(words):
        word = words[index]
        if not word.startswith("--"):
            raise ConfigError(f"{path}: {EXTRA_ARGS_VARIABLE} holds {word!r}, which is not an --option")
        name, sep, value = word.partition("=")
        if not sep:
            has_value = index + 1 < len(words) and not words[index + 1].startswith("--")
            value = words[index + 1] if has_value else True
            index += has_value
        options[normalise_key(name)] = value
        index += 1
    return options


CONFIG_NAMES = ("config.json", "config.toml", "config.env")


def simpletuner_config_path(environ: typing.Mapping[str, str], cwd: Path) -> Path:
    """The config SimpleTuner's launcher picks without --config: `config/<ENV>/` (or `config/` when ENV is unset or
    "default"), `config.<CONFIG_BACKEND>` when that is set, else the first of config.json, .toml, .env that exists."""
    env = environ.get("SIMPLETUNER_ENVIRONMENT") or environ.get("SIMPLETUNER_ENV") or environ.get("ENV") or "default"
    folder = cwd / "config" if env == "default" else cwd / "config" / env
    backend = environ.get("SIMPLETUNER_CONFIG_BACKEND") or environ.get("CONFIG_BACKEND") or environ.get("CONFIG_TYPE")
    if backend:
        name = f"config.{backend.lower()}"
        if name not in CONFIG_NAMES:
            raise ConfigError(f"CONFIG_BACKEND {backend!r} is not one of json, toml, env")
        return folder / name
    found = [folder / name for name in CONFIG_NAMES if (folder / name).is_file()]
    if not found:
        raise ConfigError(f"no config.json, config.toml or config.env in {folder}; pass --config")
    return found[0]


@dataclass
class LoadedConfig:
    """A validated config, where it came from, and which SimpleTuner-only keys it carried."""

    config: Config
    path: Path | None
    ignored: dict[str, Any] = field(default_factory=dict)
    explicit: frozenset[str] = frozenset()

    @property
    def base_dir(self) -> Path:
        """The config file's folder: where a relative path that is not in the working folder is looked up."""
        return self.path.parent if self.path else Path.cwd()

    def resolve_path(self, value: str, base: Path | None = None) -> Path:
        """`resolve_relative_path` from the config file's folder (unless `base` is given: a dataset list passes its
        own)."""
        return resolve_relative_path(value, base or self.base_dir)


def resolve_relative_path(value: str, base: Path) -> Path:
    """A relative path as SimpleTuner reads it, from the working folder, when it exists there; otherwise from `base`.
    Exit 2 when it exists in both and they differ, since the two tools would read different files."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return candidate
    from_cwd, from_base = Path.cwd() / candidate, base / candidate
    if not from_cwd.exists():
        return from_base
    if from_base.exists() and not from_cwd.samefile(from_base):
        raise ConfigError(f"relative path {value!r} names two different things: {from_cwd} (from the working "
                          f"folder, which SimpleTuner reads) and {from_base} (beside the config); make it "
                          f"absolute or remove one")  # fmt: skip
    return from_cwd


# ---------------------------------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric option: `low`/`high` bounds (None: unbounded), each inclusive unless `*_open`;
    `multiple_of` for sizes that must align. Every float option must also be finite (no nan or inf)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    multiple_of: int | None = None
    note: str = ""

    def contains(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return self.multiple_of is None or value % self.multiple_of == 0

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
        text = " and ".join(parts) or "a finite number"
        if self.multiple_of is not None:
            text += f", a multiple of {self.multiple_of}"
        return text + (f" ({self.note})" if self.note else "")


# The largest bucket st plans, in pixels: PIL's decompression-bomb limit. `resolution` is bounded by it: its square
# root as an edge (pixel, pixel_area), in megapixels for resolution_type area.
MAX_BUCKET_PIXELS = 89_478_485
MAX_EDGE = math.isqrt(MAX_BUCKET_PIXELS)
MAX_SEED = 2**32 - 1
_COUNT = Range(1, 2**31 - 1)
_NON_NEGATIVE = Range(0)
_POSITIVE = Range(0, low_open=True)
_FRACTION = Range(0, 1)
_OFF_OR_EVERY = Range(0, note="0 turns it off")
_SEED = Range(0, MAX_SEED)

OPTION_RANGES: dict[str, Range] = {
    # prepare
    "resolution": Range(0, MAX_EDGE, low_open=True, note="pixels; for resolution_type area megapixels"),
    "minimum_image_size": Range(0, MAX_EDGE),
    "maximum_image_size": Range(0, MAX_EDGE, low_open=True),
    "target_downsample_size": Range(0, MAX_EDGE, low_open=True),
    "minimum_aspect_ratio": _POSITIVE,
    "maximum_aspect_ratio": _POSITIVE,
    "max_upscale_threshold": _NON_NEGATIVE,
    "aspect_bucket_rounding": Range(1, 8, note="decimal places"),
    "aspect_bucket_alignment": Range(8, 256, multiple_of=8, note="pixels"),
    "repeats": Range(0, 100_000),
    "probability": _NON_NEGATIVE,
    "train_batch_size": Range(1, 65_536),
    "gradient_accumulation_steps": Range(1, 65_536),
    "num_processes": Range(1, 65_536),
    "context_parallel_size": Range(1, 65_536),
    "seed": _SEED,
    "max_workers": Range(0, 1024, note="0: one per CPU core"),
    # cache
    "vae_batch_size": Range(1, 65_536),
    "tokenizer_max_length": Range(1, 65_536),
    "cache_compression_level": Range(1, 22),
    "cache_shard_samples": Range(1, 10_000_000),
    # train
    "lora_rank": Range(1, 65_536),
    "lora_alpha": _POSITIVE,
    "text_encoder_lr": _POSITIVE,
    "text_encoder_limit": Range(0),
    "lora_dropout": Range(0, 1, high_open=True),
    "init_lokr_norm": _POSITIVE,
    "validation_lycoris_strength": Range(),
    "validation_adapter_strength": Range(0, low_open=True),
    "layersync_lambda": Range(0),  # 0 loads (LayerSync off); with it on, _check_relations asks for > 0
    "assistant_lora_strength": Range(),  # LoRA multipliers: any finite weight, as validation_lycoris_strength
    "assistant_lora_inference_strength": Range(),
    "singlora_ramp_up_steps": _NON_NEGATIVE,
    "timestep_bias_begin": Range(0, 1000),
    "timestep_bias_end": Range(0, 1000),
    "timestep_bias_multiplier": _POSITIVE,
    "timestep_bias_portion": Range(0, 1, low_open=True),
    "flow_sigmoid_scale": _POSITIVE,
    "flow_beta_schedule_alpha": _POSITIVE,
    "flow_beta_schedule_beta": _POSITIVE,
    "flow_schedule_shift": _NON_NEGATIVE,  # 0: no shift (SimpleTuner's meaning)
    "flux_guidance_value": _NON_NEGATIVE,
    "flux_guidance_min": _NON_NEGATIVE,
    "flux_guidance_max": _NON_NEGATIVE,
    "huber_c": _POSITIVE,
    "snr_gamma": Range(0, note="0 turns it off"),
    "snr_weight": _NON_NEGATIVE,
    "soft_min_snr_sigma_data": _POSITIVE,
    "noise_offset": _NON_NEGATIVE,
    "noise_offset_probability": _FRACTION,
    "input_perturbation": _NON_NEGATIVE,
    "input_perturbation_steps": _NON_NEGATIVE,
    "caption_dropout_probability": _FRACTION,
    "data_aesthetic_score": _NON_NEGATIVE,
    "refiner_training_strength": Range(0, 1, low_open=True, high_open=True),
    "hidream_load_balancing_loss_weight": _POSITIVE,
    "ltx_i2v_prob": _FRACTION,
    "ltx_partial_noise_fraction": _FRACTION,
    "framerate": _POSITIVE,
    "crepa_block_index": Range(0, 65_536),
    "crepa_teacher_block_index": Range(0, 65_536),
    "crepa_lambda": _NON_NEGATIVE,
    "crepa_adjacent_distance": Range(0, 65_536, note="frames"),
    "crepa_adjacent_tau": _POSITIVE,
    "crepa_encoder_image_size": Range(14, MAX_EDGE, note="pixels"),
    "layersync_student_block": Range(0, 65_536),
    "layersync_teacher_block": Range(0, 65_536),
    "dataloader_prefetch_qlen": Range(1, 1024),
    "optimizer_beta1": Range(0, 1, high_open=True),
    "optimizer_beta2": Range(0, 1, high_open=True),
    "adam_weight_decay": _NON_NEGATIVE,
    "adam_epsilon": _NON_NEGATIVE,
    "prodigy_steps": _NON_NEGATIVE,
    "max_grad_norm": Range(0, note="0 turns clipping off"),
    "learning_rate": _NON_NEGATIVE,
    "lr_warmup_steps": _NON_NEGATIVE,
    "lr_num_cycles": _COUNT,
    "lr_power": _POSITIVE,
    "lr_end": _NON_NEGATIVE,
    "num_train_epochs": _NON_NEGATIVE,
    "max_train_steps": _NON_NEGATIVE,
    "ema_decay": _FRACTION,
    "ema_update_interval": _COUNT,
    "checkpoint_step_interval": _OFF_OR_EVERY,
    "checkpoint_epoch_interval": _OFF_OR_EVERY,
    "checkpoints_total_limit": Range(0, note="0: keep all"),
    "checkpointing_rolling_steps": _OFF_OR_EVERY,
    "checkpoints_rolling_total_limit": Range(0, note="0: keep all"),
    "num_validation_images": _COUNT,
    "validation_step_interval": _OFF_OR_EVERY,
    "validation_epoch_interval": _OFF_OR_EVERY,
    "validation_num_inference_steps": _COUNT,
    "validation_guidance": _NON_NEGATIVE,
    "validation_guidance_rescale": _FRACTION,
    "validation_guidance_real": _NON_NEGATIVE,
    "validation_no_cfg_until_timestep": Range(0),
    "validation_guidance_skip_layers_start": _NON_NEGATIVE,
    "validation_guidance_skip_layers_stop": _NON_NEGATIVE,
    "validation_guidance_skip_scale": _NON_NEGATIVE,
    "validation_seed": _SEED,
    "validation_num_video_frames": _COUNT,
    "eval_steps_interval": _OFF_OR_EVERY,
    "num_eval_images": _COUNT,
    "eval_timesteps": _COUNT,
    "eval_epoch_interval": Range(0, note="0 or unset: off"),
    "masked_loss_probability": _FRACTION,
    "gradient_checkpointing_interval": _COUNT,
    "accelerator_cache_clear_interval": _COUNT,
    "group_offload_blocks_per_group": _COUNT,
    "musubi_blocks_to_swap": _NON_NEGATIVE,
    "ramtorch_transformer_percent": Range(0, 100, note="percent of the selected Linear layers"),
    # notifications
    "webhook_reporting_interval": Range(0, note="seconds"),
    "hook_timeout": Range(0, low_open=True, note="seconds"),
}


def _number(value: float) -> str:
    """1e+12, nan, 0.25, 4294967295: floats in short form, whole bounds without an exponent."""
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    return f"{value:g}"


SET_ORIGIN = "--set"


def _place(where: str) -> str:
    if where == SET_ORIGIN:
        return f" (from {SET_ORIGIN})"
    return f" (in {where})" if where else ""


def check_option_range(key: str, value: Any, where: str = "") -> None:
    """Refuse a numeric option outside its range, or a float that is nan or infinite, naming the option."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    allowed = OPTION_RANGES.get(key, Range())
    shown = f"{value:g}" if isinstance(value, float) else str(value)  # the user's value as written
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"option '{key}' is {shown}, not a finite number; it must be {allowed.describe()}"
                          f"{_place(where)}")  # fmt: skip
    if not allowed.contains(value):
        raise ConfigError(f"option '{key}' is {shown}, outside its range: it must be {allowed.describe()}"
                          f"{_place(where)}")  # fmt: skip


def check_resolution(resolution: float, resolution_type: str, where: str = "") -> None:
    """In `area` mode `resolution` is megapixels: at most MAX_BUCKET_PIXELS."""
    limit = MAX_BUCKET_PIXELS / 1_000_000
    if resolution_type == "area" and resolution > limit:
        raise ConfigError(f"option 'resolution' is {resolution:g} megapixels (resolution_type area), more than the "
                          f"largest bucket of {limit:g} megapixels; did you mean resolution_type \"pixel_area\"?"
                          f"{_place(where)}")  # fmt: skip


def _check_relations(config: Config, where: str) -> None:
    check_resolution(config.resolution, config.resolution_type, where)
    if config.train_text_encoder:
        _check_text_encoder_training(config, where)
    if config.layer_freeze_strategy == "bitfit" and config.controlnet:
        raise ConfigError("layer_freeze_strategy bitfit with controlnet: SimpleTuner applies BitFit to the base model "
                          "(unfreezing its biases), not to the ControlNet it trains, which st does not implement; "
                          f"set layer_freeze_strategy none{_place(where)}")  # fmt: skip
    if config.tread_config is not None:
        from .tread_settings import parse_routes

        parse_routes(config.tread_config)  # its routes' structure and ranges; the blocks when the model loads
    if config.validation_guidance_skip_layers is not None or any(
            getattr(config, key) != OPTION_FIELDS[key].default for key in SKIP_LAYER_OPTIONS[1:]):
        _check_skip_layer_guidance(config, where)
    if config.flux_lora_target != OPTION_FIELDS["flux_lora_target"].default:
        from .families.flux import check_lora_target

        check_lora_target(config, _place(where))
    if config.crepa_enabled and config.crepa_block_index is None:
        raise ConfigError("crepa_enabled is true but crepa_block_index is not set: name the transformer block whose "
                          f"hidden states CREPA aligns (SimpleTuner's example: 8){_place(where)}")  # fmt: skip
    if config.layersync_enabled and config.layersync_student_block is None:  # (pipeline.train.layersync)
        raise ConfigError("layersync_enabled is true but layersync_student_block is not set: name the transformer "
                          "block (LayerSync's 1-based depth) whose hidden states align to the teacher "
                          f"block's{_place(where)}")  # fmt: skip
    if config.layersync_enabled and not config.layersync_lambda > 0:  # DEVIATION: SimpleTuner turns 0 into 0.2
        raise ConfigError(f"layersync_lambda is {config.layersync_lambda:g}, but LayerSync needs a weight above 0 "
                          f"(SimpleTuner's default: 0.2); set it above 0 or layersync_enabled false{_place(where)}")
    pairs = [("minimum_aspect_ratio", "maximum_aspect_ratio"), ("flux_guidance_min", "flux_guidance_max")]
    for low_key, high_key in pairs:
        low, high = getattr(config, low_key), getattr(config, high_key)
        if low is not None and high is not None and low > high:
            raise ConfigError(f"option '{low_key}' ({low:g}) is larger than '{high_key}' ({high:g}){_place(where)}")


SKIP_LAYER_OPTIONS = ("validation_guidance_skip_layers", "validation_guidance_skip_layers_start",
                      "validation_guidance_skip_layers_stop", "validation_guidance_skip_scale")


def _check_skip_layer_guidance(config: Config, where: str) -> None:
    """Skip-layer guidance renders through StableDiffusion3Pipeline's `skip_guidance_layers`: SD3 only, a list of
    layer indices. DEVIATION: SimpleTuner also accepts wan, wan_s2v and zlab_i1 (its own pipelines); st's Wan renders
    through diffusers' WanPipeline, which has no skip-layer guidance, so it refuses them."""
    if config.model_family is not None and config.model_family != "sd3":
        raise ConfigError(f"validation_guidance_skip_layers (and its _start/_stop/_scale options: skip-layer "
                          f"guidance in validation) is implemented for model_family sd3 only, not "
                          f"{config.model_family}: remove them{_place(where)}")  # fmt: skip
    layers = config.validation_guidance_skip_layers
    if layers is not None and not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in layers):
        raise ConfigError(f"option 'validation_guidance_skip_layers' must be a JSON list of transformer layer "
                          f"indices (integers >= 0), e.g. [7, 8, 9]; got {layers!r}{_place(where)}")  # fmt: skip


def _check_text_encoder_training(config: Config, where: str) -> None:
    """train_text_encoder: the families and adapters SimpleTuner trains text encoders with."""
    if config.model_family is not None and config.model_family not in ("sd1x", "sdxl"):
        raise ConfigError(f"train_text_encoder is true, but st trains the text encoders of model_family sd1x and "
                          f"sdxl only (as SimpleTuner), not {config.model_family!r}; set train_text_encoder false"
                          f"{_place(where)}")  # fmt: skip
    if config.lora_type == "lycoris":
        raise ConfigError("train_text_encoder is true with lora_type lycoris, which SimpleTuner refuses (a LyCORIS "
                          "network is not combined with text-encoder training); set one of them to its default"
                          f"{_place(where)}")  # fmt: skip


def check_config_ranges(config: Config, where: str = "", overridden: typing.Collection[str] = ()) -> None:
    """Every numeric option in its range (see OPTION_RANGES), before any stage reads or writes anything. Options
    named in `overridden` came from `--set`, and the message says so."""
    for name in OPTION_FIELDS:
        check_option_range(name, getattr(config, name), SET_ORIGIN if name in overridden else where)
    _check_relations(config, where)


def build_config(
    raw: dict[str, Any], where: str = "", overridden: typing.Collection[str] = ()
) -> tuple[Config, dict[str, Any]]:
    """Validate a dict of options into a `Config`; returns it and the SimpleTuner-only keys it set aside.

    A key is a Config field or a SimpleTuner option of `OPTION_STATES`: an alias sets its target (exit 2 when both
    are set to different values), an accepted option is set aside, a refused one stops here unless at its default.
    """
    given = {normalise_key(str(k)): v for k, v in raw.items()}
    values: dict[str, Any] = {}
    ignored: dict[str, Any] = {}
    for key, value in given.items():
        state = OPTION_STATES.get(key)
        if key in OPTION_FIELDS:
            values[key] = _coerce_option(key, value, where)
        elif isinstance(state, Refused) and not state.is_default(value):
            raise ConfigError(state.message(key, value) + _place(where))
        elif state is not None and not isinstance(state, Alias):
            ignored[key] = value
        elif state is None:
            raise ConfigError(f"unknown option '{key}'{suggest(key, OPTION_FIELDS)}{_place(where)}")
    for alias, (target, value) in _alias_values(given, where).items():
        if target in overridden and alias not in overridden:
            continue  # `--set target=...` wins over the file's alias
        if target in values and values[target] != value and (alias in overridden) == (target in overridden):
            raise ConfigError(f"options '{alias}' (SimpleTuner's older name for '{target}') and '{target}' are both "
                              f"set, to different values: {given[alias]!r} and {values[target]!r}; keep one"
                              f"{_place(where)}")  # fmt: skip
        values[target] = value
    config = Config(**values)
    check_config_ranges(config, where, overridden)
    return config, ignored


@functools.cache
def _option_types() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def _coerce_option(key: str, value: Any, where: str) -> Any:
    return coerce(key, value, _option_types()[key], OPTION_FIELDS[key].metadata["choices"], where)


def _alias_values(given: dict[str, Any], where: str = "") -> dict[str, tuple[str, Any]]:
    """alias -> (target option, the value it gives the target), for each alias in `given` that sets something."""
    found = {}
    for alias, value in given.items():
        state = OPTION_STATES.get(alias)
        if not isinstance(state, Alias):
            continue
        try:
            target_value = state.target_value(value)
        except ValueError as exc:
            raise ConfigError(f"option '{alias}'{_place(where)}: {exc}") from None
        if target_value is not None or state.values is None:
            found[alias] = (state.target, _coerce_option(state.target, target_value, where))
    return found


# Options read only when another option has a value: set without it, they change nothing (one warning says so).
READ_ONLY_WITH = {
    "validation_lycoris_strength": ("lora_type", "lycoris"),
    "singlora_ramp_up_steps": ("peft_lora_mode", "singlora"),
    "ramtorch_text_encoder": ("ramtorch", True),
    "ramtorch_vae": ("ramtorch", True),
    "ramtorch_controlnet": ("ramtorch", True),
    "ramtorch_transformer_percent": ("ramtorch", True),
    **{f"crepa_{name}": ("crepa_enabled", True) for name in (
        "block_index", "lambda", "adjacent_distance", "adjacent_tau", "cumulative_neighbors", "normalize_by_frames",
        "spatial_align", "model", "use_backbone_features", "teacher_block_index", "encoder_image_size")},
    **{f"layersync_{name}": ("layersync_enabled", True) for name in ("student_block", "teacher_block", "lambda")},
}


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> LoadedConfig:
    """Read `path` (JSON/TOML), apply `--set` overrides, validate, and log the SimpleTuner keys st ignores.

    An error caused by a `--set` item names that item (`--set key=value: ...`), not the config file."""
    try:
        return _load_config(path, overrides)
    except ConfigError as exc:
        if SET_ORIGIN in str(exc):  # already names --set (a value out of range)
            raise
        for item in overrides:
            problem = set_problem(item)
            if problem is not None:
                raise ConfigError(problem) from None
        raise


def set_problem(item: str) -> str | None:
    """Why one `--set key=value` fails on its own, naming `--set`; None when it passes."""
    key, value = parse_set(item)  # its errors already name --set
    try:
        build_config({key: value})
    except ConfigError as exc:
        return f"{SET_ORIGIN} {item}: {exc}"
    return None


def _load_config(path: str | Path | None, overrides: typing.Sequence[str]) -> LoadedConfig:
    raw: dict[str, Any] = {}
    file_path = Path(path).resolve() if path else None
    if file_path is not None:
        raw = {normalise_key(str(k)): v for k, v in read_config_file(file_path).items()}
    overridden = set()
    for item in overrides:
        key, value = parse_set(item)
        raw[key] = value
        overridden.add(key)
    config, ignored = build_config(raw, where=str(file_path) if file_path else "", overridden=overridden)
    for key in sorted(ignored):
        state = OPTION_STATES[key]
        if isinstance(state, Accepted):
            log.info("ignoring option '%s': %s", key, state.reason)
    for key, (switch, value) in READ_ONLY_WITH.items():
        if getattr(config, key) != OPTION_FIELDS[key].default and getattr(config, switch) != value:
            log.warning("ignoring option '%s': SimpleTuner reads it only with %s %s", key, switch, value)
    explicit = frozenset(k for k in raw if k in OPTION_FIELDS) | {t for t, _ in _alias_values(raw).values()}
    return LoadedConfig(config=config, path=file_path, ignored=ignored, explicit=explicit)
