"""The state of every SimpleTuner option that is not a `Config` field: accepted, refused, or an alias.

A SimpleTuner config.json must load unchanged and keep its meaning, so each option of SimpleTuner's reference is in
exactly one state:
- implemented: a `pipeline.config.Config` field with SimpleTuner's meaning (not listed here);
- an `Alias` of an implemented option (SimpleTuner's older or shorter name);
- `Accepted`: it cannot change the trained weights or any output (cache folders, worker counts, debug printing, or an
  option read only when another, refused, option is on); the reason is logged;
- `Refused`: a feature st lacks. At its default (or absent) it loads silently; any other value stops every stage with
  exit 2, so nothing that changes what is trained is ever ignored.
Dataset-list keys (`DATASET_KEY_STATES`) follow the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Accepted:
    reason: str


@dataclass(frozen=True)
class Refused:
    feature: str
    default: Any = None

    def is_default(self, value: Any) -> bool:
        """Unset (null, ""; also false where the default is None) or the stated default, as a file spells them."""
        value = _plain(value)
        if value is None or value == "" or (value is False and self.default is None):
            return True
        return isinstance(value, bool) == isinstance(self.default, bool) and value == self.default

    def message(self, name: str, value: Any, kind: str = "option") -> str:
        return (f"st does not implement `{name}` (a SimpleTuner {kind}) yet: {self.feature}; it is set to {value!r}: "
                f"remove it or set it to its default {self.default!r}")  # fmt: skip


@dataclass(frozen=True)
class Alias:
    """Another name for `target`. `values` maps the alias's value to the target's (a flag such as use_8bit_adam that
    selects a choice); a value mapped to None sets nothing."""

    target: str
    values: dict[Any, Any] | None = field(default=None, hash=False)

    def target_value(self, value: Any) -> Any:
        if self.values is None:
            return value
        plain = _plain(value)
        if plain not in self.values:
            raise ValueError(f"expected one of {', '.join(map(repr, self.values))}, got {value!r}")
        return self.values[plain]


OptionState = Accepted | Refused | Alias


def _plain(value: Any) -> Any:
    """A file's spelling of a value as Python: "true" -> True, "null" -> None, "0.5" -> 0.5."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _accepted(reason: str, names: str) -> dict[str, Accepted]:
    return {name: Accepted(reason) for name in names.split()}


def _refused(feature: str, names: str, default: Any = None) -> dict[str, Refused]:
    return {name: Refused(feature, default) for name in names.split()}


def _only_with(switch: str, names: str) -> dict[str, Accepted]:
    """Options read only when `switch` is on, which st refuses: they cannot change anything while it is off."""
    return _accepted(f"read only with `{switch}`, which st does not implement yet", names)


def _only_for(families: str, names: str) -> dict[str, Accepted]:
    return _accepted(f"read only for model_family {families}, which st does not train", names)


_CACHE = "st keeps every cache inside the output folder of `st cache` and checks it itself"
_WORKERS = "sets how work is spread over workers or batches, not what it computes"
_DEBUG = "debug printing only"
_SPEED = "speed only; st chooses its own kernels (see attention_mechanism and the dynamo options)"

_VALIDATION = "this validation setting (it changes the validation images)"

# fmt: off
OPTION_STATES: dict[str, OptionState] = {
    # Aliases: SimpleTuner's older names for options st implements.
    "checkpointing_steps": Alias("checkpoint_step_interval"),
    "validation_steps": Alias("validation_step_interval"),
    "adam_beta1": Alias("optimizer_beta1"),
    "adam_beta2": Alias("optimizer_beta2"),
    "use_8bit_adam": Alias("optimizer", {True: "bnb-adamw8bit", False: None}),
    "allow_tf32": Alias("disable_tf32", {True: False, False: True}),
    "fused_qkv_projections": Alias("fuse_qkv_projections"),
    "optimizer_release_gradient": Alias("optimizer_release_gradients"),
    # Accepted: cannot change the trained weights or any output.
    **_accepted(_CACHE, "cache_dir cache_dir_text cache_dir_vae cache_clear_validation_prompts vae_cache_scan_behaviour "
                        "compress_disk_cache preserve_data_backend_cache override_dataset_config skip_file_discovery "
                        "aspect_bucket_disable_rebuild metadata_update_interval"),
    **_accepted(_WORKERS, "write_batch_size read_batch_size image_processing_batch_size enable_multiprocessing "
                          "aws_max_pool_connections torch_num_threads aspect_bucket_worker_count local_rank "
                          "validation_multigpu"),
    **_accepted(_DEBUG, "print_filenames print_sampler_statistics debug_aspect_buckets debug_dataset_loader"),
    # Memory (group offload, block swap, offload_during_save, enable_model_cpu_offload are Config fields).
    "fully_unload_text_encoder": Accepted("st train loads no text encoder (st cache encodes every prompt), so there is "
                                          "none to unload"),
    "offload_param_path": Accepted("a DeepSpeed parameter-offload folder; st does not run DeepSpeed"),
    "vae_enable_patch_conv": Accepted("read only for HunyuanVideo's VAE, which st does not train"),
    "optimizer_cpu_offload_method": Accepted("its only choice is none"),
    # SimpleTuner passes these two only to torchao's CPUOffloadOptimizer, which it builds only when
    # optimizer_cpu_offload_method is torchao (cpu_offload_optimizer); that method is not a choice here.
    **_accepted("read only with optimizer_cpu_offload_method torchao, which is not among its choices (none)",
                "optimizer_offload_gradients fuse_optimizer"),
    # ramtorch, ramtorch_target_modules, ramtorch_text_encoder, ramtorch_vae, ramtorch_controlnet and
    # ramtorch_transformer_percent are Config fields.
    "ramtorch_disable_sync_hooks": Accepted("st always waits for the GPU after each streamed layer (SimpleTuner's "
                                            "sync hooks); true only skips that wait, for speed, at the risk of "
                                            "ramtorch's transfer buffers being overwritten while in use"),
    "ramtorch_disable_extensions": Refused("RamTorch streaming of the denoiser's Embedding, Conv and norm layers "
                                           "(st streams Linear layers only, what true asks for)", True),
    # context_parallel_size and context_parallel_comm_strategy are Config fields (pipeline.train.context_parallel).
    **_accepted(_SPEED, "enable_xformers_memory_efficient_attention validation_torch_compile "
                        "validation_torch_compile_mode"),
    # sageattention_usage is a Config field (pipeline.speed).
    "sla_config": Accepted("read only with attention_mechanism sla, which st refuses"),
    "output_dir": Accepted("st writes each stage's outputs where its `-o/--output` points"),
    "checkpointing_use_tempdir": Accepted("st always writes checkpoints under a temporary name and renames them"),
    "delete_model_after_load": Accepted("st never deletes model files (a local model folder, or a hub cache that other runs share); it only frees disk space"),
    "i_know_what_i_am_doing": Accepted("st's checks cannot be switched off; this only silences SimpleTuner's"),
    "tracker_image_layout": Accepted("how the tracker's page lays out the same validation images"),
    # Text-encoder training (train_text_encoder, text_encoder_lr and text_encoder_limit are Config fields).
    **_accepted("SimpleTuner no longer reads it", "freeze_encoder"),
    **_accepted("SimpleTuner's code never reads it (only its example configs set it)", "strict_epoch_limit"),
    "save_text_encoder": Accepted("adds the base text encoders to a full run's saved pipeline; st's published model "
                                  "folder always holds them, and a LoRA file holds the trained text-encoder weights"),
    # Read only by model_freeze.freeze_text_encoder, which SimpleTuner never calls: its text encoders train whole.
    **_accepted("SimpleTuner defines it but never applies it (its text-encoder layer freezing is never called; "
                "trained text encoders train whole, in both tools)",
                "freeze_encoder_before freeze_encoder_after freeze_encoder_strategy"),
    "validation_stitch_input_location": Accepted("where SimpleTuner stitches the conditioning image into a validation "
                                                 "image; st saves it as its own file beside each render "
                                                 "(`<name>-control.png`), the same pixels either way"),
    **_only_with("distillation_method", "distillation_config"),
    **_only_with("use_adafactor_optimizer", "adafactor_relative_step"),
    **_only_with("validation_preview", "validation_preview_steps"),
    **_only_with("scheduled_sampling_max_step_offset",
                 "scheduled_sampling_strategy scheduled_sampling_probability scheduled_sampling_prob_start "
                 "scheduled_sampling_prob_end scheduled_sampling_ramp_steps scheduled_sampling_start_step "
                 "scheduled_sampling_ramp_shape scheduled_sampling_sampler scheduled_sampling_order "
                 "scheduled_sampling_reflexflow scheduled_sampling_reflexflow_alpha "
                 "scheduled_sampling_reflexflow_beta1 scheduled_sampling_reflexflow_beta2"),
    # Refused: a feature st lacks; loads only at its default.
    # SimpleTuner overwrites it from the optimizer (fp32 only for an optimizer declaring fp32 gradients, and none of
    # its optimizers does), so fp32 never reaches its trainer's gradient cast.
    "gradient_precision": Accepted("SimpleTuner resets it to unmodified for every optimizer it offers (none declares "
                                   "fp32 gradients), so it never changes the gradients"),
    **_refused("distillation", "distillation_method"),
    "sdxl_refiner_uses_full_range": Accepted("SimpleTuner defines it but never reads it (refiner_training's range "
                                             "applies whatever it says)"),
    **_refused("on-demand VAE encoding (st always caches latents with `st cache`)",
               "vae_cache_ondemand vae_cache_disable"),
    "use_adafactor_optimizer": Refused("the Adafactor optimizer"),
    "trust_remote_code": Refused("model code from the hub"),
    "non_ema_revision": Refused("a separate non-EMA model revision"),
    "scheduled_sampling_max_step_offset": Refused("scheduled sampling", 0),
    "enable_watermark": Accepted("SimpleTuner declares it but never reads it: its validation pipelines are built "
                                 "with add_watermarker=False, so validation images carry no watermark in either tool"),
    # st's validation never renders an extra unconditional image: it always does what `true` asks for.
    "validation_disable_unconditional": Accepted("st renders no unconditional validation image either way"),
    "validation_prompt_library": Refused(_VALIDATION + ": SimpleTuner's built-in prompt library"),
    "validation_preview": Refused(_VALIDATION + ": step-by-step previews"),
    # Newer than the option reference st implements: SDNQ's settings, read only with an SDNQ precision preset, which
    # st refuses (SDNQ_PRESETS below).
    **_accepted("read only with an SDNQ precision preset (base_model_precision or text_encoder_*_precision "
                "int8-sdnq, ...), which st does not implement yet",
                 "sdnq_weights_dtype sdnq_quantized_matmul_dtype sdnq_group_size sdnq_use_quantized_matmul "
                 "sdnq_compile_mode sdnq_use_static_quantization sdnq_use_stochastic_rounding sdnq_dequantize_fp32 "
                 "sdnq_use_svd sdnq_svd_rank sdnq_svd_steps sdnq_use_hadamard sdnq_hadamard_group_size "
                 "sdnq_modules_to_not_convert sdnq_modules_to_not_use_matmul sdnq_modules_dtype_dict "
                 "sdnq_modules_quant_config"),
}
# fmt: on

# Config fields that load (SimpleTuner's own examples set them) but that nothing reads, since SimpleTuner reads them
# only on a path st does not run; st train warns when one is set away from its default. `st options` lists them as
# accepted (ignored), not implemented.
_DEEPSPEED_ONLY = ("SimpleTuner reads it only under DeepSpeed, which st does not run; every optimizer takes "
                   "SimpleTuner's default settings, changed with optimizer_config (st train warns when it is set)")
UNUSED_FIELDS: dict[str, Accepted] = {"adam_weight_decay": Accepted(_DEEPSPEED_ONLY),
                                      "adam_epsilon": Accepted(_DEEPSPEED_ONLY)}

_DATASET_RUNTIME = "sets how SimpleTuner reads or caches the dataset, not what st trains on"

# Keys of a multidatabackend.json entry that are not st's own dataset keys. (disable_multiline_split, caption_shuffle
# and max_num_samples are st's, `pipeline.datasets.CAPTION_KEYS`; start_epoch, start_step, end_epoch and end_step too,
# `pipeline.datasets.SCHEDULE_KEYS`; timestep_sampling_offset and train_batch_size too,
# `pipeline.datasets.TRAINING_KEYS`; caption_filter_list is read on text_embeds entries.)
# fmt: off
DATASET_KEY_STATES: dict[str, Accepted | Refused] = {
    **_accepted(_DATASET_RUNTIME, "default text_embeds image_embeds vae_cache_clear_each_epoch skip_file_discovery "
                                  "preserve_data_backend_cache metadata_backend write_batch_size hash_filenames "
                                  "scan_for_errors cache_file_suffix"),
    **_accepted(_CACHE, "cache_dir cache_dir_vae cache_dir_text"),
    "disable_validation": Accepted("read only by `validation_using_datasets` (st train skips the dataset's images "
                                   "there); it changes no trained weights"),
    "ignore_epochs": Accepted("SimpleTuner no longer reads it (deprecated, it does nothing)"),
    **_accepted(_WORKERS, "text_encoder_batch_size"),
    **_accepted("st never deletes dataset files; it skips such images and `st prepare` reports them",
                "delete_unwanted_images delete_problematic_images"),
    "delete_nsfw_images": Refused("NSFW filtering"),
    "grounding": Refused("spatial grounding (bounding boxes and masks)"),
    "audio": Refused("audio datasets and audio taken from videos (the `audio` block)"),
    "slider_strength": Refused("slider LoRA training"),
    "conditioning_image_embeds": Refused("cached conditioning image embeddings (CLIP vision features for "
                                         "image-to-video models)"),
    **_refused("a conditioning setting of a `dataset_type: conditioning` entry (st reads it there)",
               "conditioning_type source_dataset_id"),
    **_refused("on-demand text encoding (st always caches embeddings with `st cache`)",
               "text_cache_ondemand text_cache_disable"),
    **_refused("on-demand VAE encoding (st always caches latents with `st cache`)",
               "vae_cache_ondemand vae_cache_disable"),
}
# fmt: on

# SimpleTuner's SDNQ presets (SD.Next's quantisation engine, the `sdnq` package), newer than the option reference st
# implements: st has no SDNQ backend (its quantised layers, their LoRA wrapping and hadamard / SVD options).
SDNQ_PRESETS = ("int8-sdnq", "uint8-sdnq", "int16-sdnq", "uint16-sdnq", "fp16-sdnq", "fp8-sdnq", "int6-sdnq",
                "int5-sdnq", "uint5-sdnq", "uint4-sdnq", "uint3-sdnq", "uint2-sdnq")  # fmt: skip
_SDNQ = ("SDNQ quantisation (SD.Next's quantisation engine, the sdnq package), which st has no backend for; "
         "int8-quanto and int8-torchao give an 8-bit base")  # fmt: skip

# Values of an implemented option that SimpleTuner offers and st does not implement yet: option -> value -> feature.
REFUSED_CHOICES: dict[str, dict[str, str]] = {
    **{key: dict.fromkeys(SDNQ_PRESETS, _SDNQ)
       for key in ("base_model_precision", *(f"text_encoder_{i}_precision" for i in range(1, 5)))},
    "model_family": {"ltxvideo2": "the LTX-2 family (LTX2Pipeline: an audio-video transformer with a Gemma text "
                                  "encoder, a different model from LTX-Video); model_family ltxvideo trains LTX-Video "
                                  "0.9.x",
                     "wan_s2v": "Wan 2.2 speech-to-video (WanS2V: an audio-driven transformer with a wav2vec audio "
                                "encoder, which diffusers does not ship); model_family wan trains Wan 2.1 / 2.2 text- "
                                "and image-to-video"},
    "lora_init_type": {"loftq": "LoftQ initialisation (peft replaces the base weights by its own quantised copy, so "
                                "the LoRA would fit that quantised base model, not the base it is published for; "
                                "quantise with base_model_precision and keep lora_init_type default)"},
}

# Values SimpleTuner does not accept either, and the name SimpleTuner uses: option -> value -> SimpleTuner's value.
RENAMED_CHOICES: dict[str, dict[str, str]] = {
    # the Z-Image quickstart writes "z-image", SimpleTuner's Cosmos (T2I) example "cosmos"
    "model_family": {"pixart": "pixart_sigma", "z-image": "z_image", "cosmos": "cosmos2image"},
}


def choice_problem(key: str, value: Any, where: str = "") -> tuple[bool, str] | None:
    """For a value outside an option's choices that SimpleTuner knows: (whether it is a refusal, the message);
    None for a value neither tool knows."""
    place = f" in {where}" if where else ""
    feature = REFUSED_CHOICES.get(key, {}).get(value)
    if feature is not None:
        return True, (f"st does not implement {key} {value!r} (a SimpleTuner preset) yet: {feature}{place}; "
                      "choose another value or remove the option")  # fmt: skip
    renamed = RENAMED_CHOICES.get(key, {}).get(value)
    if renamed is not None:
        return False, (f"option '{key}'{place} has value {value!r}, which SimpleTuner does not accept either: "
                       f"SimpleTuner names that family {renamed!r}; set {key} to {renamed!r}")  # fmt: skip
    return None
