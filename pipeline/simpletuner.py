"""SimpleTuner options that st accepts but does not use, each with the reason given in the log.

A SimpleTuner user's config.json and multidatabackend.json must load unchanged: their keys are either st options
(pipeline.config.Config) or listed here. Only keys that neither tool knows are errors. When st starts honouring one of
these options it becomes a Config field, which takes precedence over this table.
"""

from __future__ import annotations

_CACHE_PATHS = "st keeps every cache inside the output folder of `st cache`, so SimpleTuner's cache paths are not used"
_LATER = "this SimpleTuner option is not implemented by st yet"
_RUNTIME = "st decides this itself"

_NOT_YET = """
model_flavour pretrained_transformer_model_name_or_path pretrained_transformer_subfolder
pretrained_unet_model_name_or_path pretrained_unet_subfolder snr_weight inference_scheduler_timestep_spacing
refiner_training refiner_training_invert_schedule refiner_training_strength output_dir seed_for_each_device
train_text_encoder checkpointing_steps text_encoder_lr non_ema_revision optimizer_release_gradient adam_beta1
adam_beta2 prodigy_steps validation_on_startup validation_seed_source validation_torch_compile
validation_torch_compile_mode allow_tf32 validation_using_datasets tracker_image_layout validation_prompt_library
validation_steps eval_timesteps eval_dataset_id validation_disable_unconditional validation_guidance_real
validation_no_cfg_until_timestep validation_randomize validation_multigpu validation_lycoris_strength
validation_adapter_path enable_watermark gradient_precision quantize_via base_model_precision quantize_activations
base_model_default_dtype text_encoder_1_precision text_encoder_2_precision text_encoder_3_precision
text_encoder_4_precision sageattention_usage enable_xformers_memory_efficient_attention fully_unload_text_encoder
freeze_encoder freeze_encoder_before freeze_encoder_after freeze_encoder_strategy layer_freeze_strategy
unet_attention_slice save_text_encoder text_encoder_limit data_aesthetic_score sd3_clip_uncond_behaviour
sd3_t5_uncond_behaviour lora_type lycoris_config init_lokr_norm flux_attention_masked_training flux_fast_schedule
controlnet controlnet_model_name_or_path controlnet_custom_config tread_config masked_loss_probability
vae_enable_patch_conv distillation_method distillation_config evaluation_type
pretrained_evaluation_model_name_or_path trust_remote_code sana_complex_human_instruction compress_disk_cache
vae_cache_ondemand use_8bit_adam use_adafactor_optimizer adafactor_relative_step offload_param_path
validation_guidance_skip_layers validation_guidance_skip_layers_start validation_guidance_skip_layers_stop
validation_guidance_skip_scale
"""

_CACHE = "cache_dir cache_dir_text cache_dir_vae cache_clear_validation_prompts vae_cache_scan_behaviour"
_RUN = """
write_batch_size read_batch_size image_processing_batch_size enable_multiprocessing aws_max_pool_connections
torch_num_threads aspect_bucket_worker_count aspect_bucket_disable_rebuild preserve_data_backend_cache
skip_file_discovery override_dataset_config local_rank print_filenames print_sampler_statistics
metadata_update_interval debug_aspect_buckets debug_dataset_loader i_know_what_i_am_doing vae_cache_disable
"""
_DATASET_RUN = """
default text_embeds image_embeds vae_cache_clear_each_epoch skip_file_discovery preserve_data_backend_cache
metadata_backend write_batch_size hash_filenames scan_for_errors cache_file_suffix is_regularisation_data
caption_filter_list disable_validation
"""

SIMPLETUNER_ONLY_OPTIONS: dict[str, str] = {}
SIMPLETUNER_ONLY_OPTIONS.update({k: _LATER for k in _NOT_YET.split()})
SIMPLETUNER_ONLY_OPTIONS.update({k: _CACHE_PATHS for k in _CACHE.split()})
SIMPLETUNER_ONLY_OPTIONS.update({k: _RUNTIME for k in _RUN.split()})

# Keys of a multidatabackend.json entry that st accepts and ignores.
SIMPLETUNER_ONLY_DATASET_KEYS: dict[str, str] = {k: _RUNTIME for k in _DATASET_RUN.split()}
SIMPLETUNER_ONLY_DATASET_KEYS.update({k: _CACHE_PATHS for k in ("cache_dir", "cache_dir_vae", "cache_dir_text")})
