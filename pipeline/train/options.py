"""The option groups `st train`'s components read: each a frozen copy of the `Config` fields one component uses.

A component takes its group (the optimizer its `OptimizerOptions`, the adapters their `AdapterOptions`, ...) rather
than the whole config, so what it depends on is written in one place. Field names are option names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import OptionGroup


@dataclass(frozen=True)
class OptimizerOptions(OptionGroup):
    """The optimizer, its learning rate (with `lr_scale`), the learning-rate schedule and gradient clipping."""

    optimizer: str
    optimizer_config: str | None
    optimizer_beta1: float | None
    optimizer_beta2: float | None
    adam_weight_decay: float
    adam_epsilon: float
    prodigy_steps: int | None
    learning_rate: float
    lr_scale: bool
    lr_scale_sqrt: bool
    train_batch_size: int
    gradient_accumulation_steps: int
    num_processes: int  # the run's world size: the trainer refuses a run launched with another number of processes
    lr_scheduler: str
    lr_warmup_steps: int
    lr_end: float
    lr_power: float
    lr_num_cycles: int
    max_grad_norm: float
    grad_clip_method: str
    optimizer_release_gradients: bool


@dataclass(frozen=True)
class AdapterOptions(OptionGroup):
    """What is trained: LoRA adapters (their shape, targets and starting weights) or the whole denoiser."""

    model_type: str
    lora_rank: int
    lora_alpha: float | None
    lora_dropout: float
    lora_init_type: str
    peft_lora_mode: str
    singlora_ramp_up_steps: int
    use_dora: bool
    init_lora: str | None
    peft_lora_target_modules: list | None
    flux_lora_target: str
    slider_lora_target: bool
    lora_type: str
    lycoris_config: str | None
    init_lokr_norm: float | None
    layer_freeze_strategy: str = "none"


@dataclass(frozen=True)
class ObjectiveOptions(OptionGroup):
    """Noising, timestep/sigma sampling, loss and guidance (see `pipeline.train.objectives`)."""

    prediction_type: str | None
    rescale_betas_zero_snr: bool
    training_scheduler_timestep_spacing: str
    timestep_bias_strategy: str
    timestep_bias_multiplier: float
    timestep_bias_portion: float
    timestep_bias_begin: int
    timestep_bias_end: int
    disable_segmented_timestep_sampling: bool
    refiner_training: bool
    refiner_training_strength: float
    refiner_training_invert_schedule: bool
    flow_use_uniform_schedule: bool
    flow_use_beta_schedule: bool
    flow_beta_schedule_alpha: float
    flow_beta_schedule_beta: float
    flow_sigmoid_scale: float
    flow_schedule_auto_shift: bool
    flow_schedule_shift: float | None
    flux_fast_schedule: bool
    flux_guidance_mode: str
    flux_guidance_min: float
    flux_guidance_max: float
    flux_guidance_value: float
    snr_gamma: float | None
    snr_weight: float
    use_soft_min_snr: bool
    soft_min_snr_sigma_data: float | None
    diff2flow_enabled: bool
    diff2flow_loss: bool
    noise_offset: float
    noise_offset_probability: float
    offset_noise: bool
    input_perturbation: float
    input_perturbation_steps: int
    loss_type: str
    huber_c: float
    huber_schedule: str
    masked_loss_probability: float


@dataclass(frozen=True)
class ValidationOptions(OptionGroup):
    """How validation images are rendered, and when."""

    validation_method: str
    validation_step_interval: int | None
    validation_epoch_interval: int | None
    disable_benchmark: bool
    ema_validation: str
    validation_resolution: str
    validation_negative_prompt: str | None
    validation_seed: int | None
    seed: int | None
    validation_randomize: bool  # a seed per validation (validation.render_seed)
    validation_seed_source: str
    validation_on_startup: bool
    validation_num_video_frames: int | None
    framerate: float | None
    num_validation_images: int
    validation_num_inference_steps: int
    validation_guidance: float
    validation_guidance_rescale: float
    validation_guidance_real: float
    validation_no_cfg_until_timestep: int
    validation_guidance_skip_layers: list | None  # SD3 skip-layer guidance (validation.skip_layer_guidance)
    validation_guidance_skip_layers_start: float
    validation_guidance_skip_layers_stop: float
    validation_guidance_skip_scale: float
    model_flavour: str | None  # Flux's fluxbooru / libreflux validate with true CFG (validation.real_cfg)
    validation_noise_scheduler: str | None
    inference_scheduler_timestep_spacing: str
    unet_attention_slice: bool
    keep_vae_loaded: bool
    validation_lycoris_strength: float
    wan_validation_load_other_stage: bool
    validation_adapter_path: str | None  # an extra LoRA while validating (validation_adapters)
    validation_adapter_name: str | None
    validation_adapter_strength: float
    validation_adapter_mode: str
    validation_adapter_config: list | dict | str | None

    def due(self, step: int, epoch_done: bool, epoch: int) -> bool:
        """Whether a validation falls on optimizer step `step` (`epoch_done`: epoch `epoch` ended with it)."""
        at_epoch = epoch_done and _every(epoch + 1, self.validation_epoch_interval)
        return _every(step, self.validation_step_interval) or at_epoch


@dataclass(frozen=True)
class EvaluationOptions(OptionGroup):
    """The evaluation loss: on which samples (eval datasets, else the first training samples), and when."""

    eval_steps_interval: int | None
    eval_epoch_interval: float | None
    num_eval_images: int
    eval_dataset_id: str | list | None
    eval_dataset_pooling: bool
    eval_timesteps: int  # the schedule points each sample is evaluated at (evaluation.eval_fractions)

    @property
    def enabled(self) -> bool:
        return bool(self.eval_steps_interval or self.eval_epoch_interval)

    def due(self, step: int, steps_per_epoch: int) -> bool:
        """Whether an evaluation falls on optimizer step `step`: every eval_steps_interval steps, and each time the
        epoch progress step / steps_per_epoch passes a multiple of eval_epoch_interval (0.5: twice an epoch)."""
        if _every(step, self.eval_steps_interval):
            return True
        if not self.eval_epoch_interval or step <= 0:
            return False
        per_interval = self.eval_epoch_interval * steps_per_epoch
        return math.floor(step / per_interval + 1e-9) > math.floor((step - 1) / per_interval + 1e-9)

    def dataset_ids(self) -> list[str]:
        """The ids eval_dataset_id names (it may be one id or a list), in order; empty when unset."""
        chosen = self.eval_dataset_id
        if chosen is None or chosen == "":
            return []
        return [str(chosen)] if isinstance(chosen, str) else [str(c) for c in chosen]


@dataclass(frozen=True)
class CheckpointOptions(OptionGroup):
    """When checkpoints are saved, how many are kept, and whether they are pushed to the hub."""

    checkpoint_step_interval: int | None
    checkpoint_epoch_interval: int | None
    checkpointing_rolling_steps: int | None
    checkpoints_total_limit: int | None
    checkpoints_rolling_total_limit: int | None
    push_checkpoints_to_hub: bool

    def due(self, step: int, epoch_done: bool, epoch: int) -> str | None:
        """The kind of checkpoint ("checkpoint" or "rolling") that falls on optimizer step `step`, or None."""
        at_epoch = epoch_done and _every(epoch + 1, self.checkpoint_epoch_interval)
        if _every(step, self.checkpoint_step_interval) or at_epoch:
            return "checkpoint"
        if _every(step, self.checkpointing_rolling_steps):
            return "rolling"
        return None

    def limit(self, kind: str) -> int | None:
        """How many checkpoints of `kind` are kept (None or 0: all)."""
        return self.checkpoints_total_limit if kind == "checkpoint" else self.checkpoints_rolling_total_limit


def _every(count: int, interval: int | None) -> bool:
    """Whether `count` is a multiple of `interval` (never when the interval is unset or 0)."""
    return bool(interval) and count % interval == 0
