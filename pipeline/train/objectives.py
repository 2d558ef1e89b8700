"""Training objectives: noising, targets, timestep/sigma sampling, loss weighting and Flux guidance.

One `Objective` per run turns clean latents into what the denoiser sees (`Noised`) and scores its prediction. Options
keep SimpleTuner's names and meanings; where SimpleTuner left a choice open, the choice is written down here.

DDPM families (epsilon / v_prediction)
    noisy = sqrt(abar_t) * x + sqrt(1 - abar_t) * noise; target = noise (epsilon) or
    sqrt(abar_t) * noise - sqrt(1 - abar_t) * x (v_prediction). `abar` comes from diffusers' `DDPMScheduler` built
    from the model's scheduler config, with `rescale_betas_zero_snr` (diffusers' `rescale_zero_terminal_snr`: the
    last abar is exactly 0). `training_scheduler_timestep_spacing` is recorded on that scheduler; it only shapes an
    inference schedule and never the training draws.
    Timesteps are integers in [0, T) drawn from SimpleTuner's `generate_timestep_weights` distribution
    (`timestep_bias_*`: "earlier"/"later" multiply the first/last `portion * T` weights, "range" multiplies
    [begin, end); timesteps outside stay possible, only `multiplier`-times less likely).
    Segmented sampling (on unless `disable_segmented_timestep_sampling`, batches of B > 1) is SimpleTuner's
    `segmented_timestep_selection`: equal-width segments of s = T // B timesteps counted down from T - 1, sample i
    drawn from [T - 1 - (i + 1)s, T - 1 - is] (the last one reaches down to 0) by the bias weights inside it. A
    bias therefore only reshapes each segment.
    `refiner_training` narrows every draw to the refiner's range (`refiner_span`): segments then divide that range,
    and unsegmented draws follow the bias weights inside it (SimpleTuner narrows only segmented draws, so its
    refiner range does nothing at train_batch_size 1; st applies it to every draw). Adjacent segments share their boundary timestep, and SimpleTuner
    normalises each segment's weights in place, so the lower segment sees the shared one at its already normalised
    weight; st reproduces that too (weights are normalised to sum 1 first when a bias is set, as there).

Flow matching families
    noisy = (1 - sigma) * x + sigma * noise; target = noise - x; the denoiser gets sigma * T (T = 1000).
    sigma ~ sigmoid(flow_sigmoid_scale * N(0, 1)) by default, U[0, 1) with `flow_use_uniform_schedule`, or
    Beta(flow_beta_schedule_alpha, flow_beta_schedule_beta) with `flow_use_beta_schedule`; then shifted:
    sigma' = s * sigma / (1 + (s - 1) * sigma) with s = `flow_schedule_shift` (else the family's default, else 1;
    0 means no shift, as in SimpleTuner). `flux_fast_schedule` (Schnell's, any flow family, as in SimpleTuner) draws
    sigma uniformly from [1.0] * 7 + [0.75, 0.5, 0.25], unshifted; the uniform and beta schedules win over it, as
    there (a warning says so). `flow_schedule_auto_shift` takes s = exp(mu), mu linear in `image_seq_len`
    (256 -> 0.5, 4096 -> 1.15, Flux's `calculate_shift`); it wins over `flow_schedule_shift`. Timestep bias and
    segmentation apply to DDPM only. A dataset's `timestep_sampling_offset` o moves the default schedule for its
    batches: sigma ~ sigmoid(flow_sigmoid_scale * (N(0, 1) + o)), before the shift (SimpleTuner's; the uniform,
    beta and fast schedules, families drawing their own sigmas and DDPM ignore it, with a warning, as there).

Noise
    Offset noise (SimpleTuner's `offset_noise`, DDPM only): with `offset_noise` true and `noise_offset` > 0, one
    coin per batch with probability `noise_offset_probability` decides whether noise += noise_offset * N(0, 1) of
    shape (B, C, 1, 1) (one constant per sample and channel). The target sees the offset noise. Without
    `offset_noise`, `noise_offset` does nothing; flow matching never uses it (both as in SimpleTuner).
    input_perturbation: the noisy input uses noise + p * N(0, 1) with p = input_perturbation, decayed linearly to 0
    over `input_perturbation_steps` when > 0; the target keeps the unperturbed noise.

Loss (float32, mean over each sample, times the sample's weight, mean over the batch)
    d = pred - target. l2: d^2. SimpleTuner's pseudo-Huber forms (`conditional_loss`): huber: 2c(sqrt(d^2 + c^2) - c);
    smooth_l1: 2(sqrt(d^2 + c^2) - c).
    c per sample (SimpleTuner's `compute_scheduled_huber_c`): constant: c = huber_c; exponential:
    c = huber_c ** (t / T) (1 at t = 0, huber_c at t = T; flow uses t = sigma * T); snr: c = (1 - huber_c) / (1 + r)^2
    + huber_c, with r = sqrt((1 - abar) / abar) for DDPM (computed in closed form, so zero-terminal SNR stays finite:
    c = huber_c there) and r = sqrt((1 - sigma) / (sigma + 1e-4)) for flow matching (c grows with sigma).
    min-SNR (`snr_gamma`, DDPM): w = min(SNR, gamma) / SNR (epsilon; 1 at SNR 0), min(SNR, gamma) / (SNR + 1) (v).
    soft min-SNR (`use_soft_min_snr`, needs `soft_min_snr_sigma_data` = sd): the hard minimum in the x0-space weight
    becomes the soft minimum 1 / (1 / SNR_d + 1 / gamma) with SNR_d = sd^2 * SNR (the data's SNR), normalised so the
    epsilon weight is 1 at SNR 0: w = gamma / (sd^2 * SNR + gamma) (epsilon), that times SNR / (SNR + 1) (v).
    gamma = snr_gamma, or 1 when unset, where it equals k-diffusion's / HDiT's "soft-min-snr" weighting.
    `snr_weight` multiplies the l2 loss of a DDPM model without snr_gamma (SimpleTuner's `snr_weight * mse`); with
    flow matching, another loss_type or snr_gamma it does nothing (as in SimpleTuner), with a warning.
    Flow matching uses no SNR weighting (as in SimpleTuner); the options are then ignored with a warning.

Diff2Flow (`diff2flow_enabled` + `diff2flow_loss`, DDPM only; pipeline.train.diff2flow)
    Noising and timesteps stay DDPM's; the prediction is converted to a flow velocity with SimpleTuner's bridge and
    the loss is l2 against noise - x, without loss_type, min-SNR / soft min-SNR weights or snr_weight (as in
    SimpleTuner; warnings say so), the mask still applied. Refused where SimpleTuner's formula breaks: epsilon with
    a timestep of abar = 0 (rescale_betas_zero_snr), whose x0 = x_t / sqrt(abar) is infinite.

Masked loss (a batch of a dataset paired with a `conditioning_type` mask or segmentation dataset)
    The elementwise loss (before the per-sample mean and weights) is multiplied by a weight image at the loss's
    spatial size (the unpacked latent: packing families unpack their prediction first), made from the mask's pixels
    p in [-1, 1] as SimpleTuner's `loss` does: mask: w = area-downsampled p[:, 0] / 2 + 0.5 (black 0, white 1, grey
    between); segmentation: w = 1 where the area-downsampled channel mean / 2 + 0.5 is > 0, else 0 (a latent cell
    is ignored only where every pixel under it is black). The mean then runs over all elements, masked ones included,
    as there. One coin per batch from the run's generator, drawn after every other draw of the step, applies the
    mask with probability `masked_loss_probability` for both kinds (SimpleTuner reads it for segmentation only and
    always applies a mask; equal at its default 1.0, and 0 then means "no mask" for both).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import OPTION_FIELDS
from ..errors import ConfigError
from ..log import get_logger
from .options import ObjectiveOptions

log = get_logger("train")
NOISE_OFFSET_DEFAULT = OPTION_FIELDS["noise_offset"].default

KINDS = ("epsilon", "v_prediction", "flow_matching")
DDPM_KINDS = ("epsilon", "v_prediction")

# SimpleTuner's `flux_fast_schedule` sigmas, drawn with equal chance (so 1.0 in 7 of 10 draws), never shifted.
FAST_SCHEDULE_SIGMAS = (1.0,) * 7 + (0.75, 0.5, 0.25)

# Flux's dynamic-shift line: mu = 0.5 at 256 image tokens, 1.15 at 4096.
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15

_TINY = 1e-20


MASK_KINDS = ("mask", "segmentation")


@dataclass(frozen=True)
class LossMask:
    """A batch's mask images (SimpleTuner's conditioning pixels of a mask or segmentation dataset) and their kind."""

    pixels: Tensor  # B x 3 x H x W, float in [-1, 1]
    kind: str  # "mask" or "segmentation"

    def weights(self, loss: Tensor) -> Tensor:
        """Loss weights (B x 1 x ... x h x w, broadcasting against `loss`) at the loss's spatial size h x w."""
        import torch.nn.functional as F

        pixels = self.pixels.to(device=loss.device, dtype=torch.float32)
        image = pixels[:, :1] if self.kind == "mask" else pixels.sum(dim=1, keepdim=True) / 3
        weights = F.interpolate(image, size=tuple(loss.shape[-2:]), mode="area") / 2 + 0.5
        if self.kind == "segmentation":
            weights = (weights > 0).to(torch.float32)
        return weights.reshape(weights.shape[0], 1, *([1] * (loss.ndim - 4)), *weights.shape[-2:])


@dataclass
class Noised:
    """A noised batch: what the denoiser receives, what it should predict, and the per-sample schedule values.

    `noisy = alphas * latents + sigmas * noise_in` for both families: DDPM `alphas = sqrt(abar)`,
    `sigmas = sqrt(1 - abar)`; flow `alphas = 1 - sigma`, `sigmas = sigma`. All float32 except DDPM timesteps.
    """

    noisy: Tensor
    target: Tensor
    timesteps: Tensor  # int64 for DDPM, sigma * T (float32) for flow matching
    noise: Tensor  # the target's noise (offset included, perturbation not)
    alphas: Tensor  # (B,) signal scale
    sigmas: Tensor  # (B,) noise scale
    flow_target: Tensor | None = None  # noise - latents, the loss's target under diff2flow_loss

    @property
    def snr(self) -> Tensor:
        """Per-sample signal-to-noise ratio (alphas / sigmas)^2; 0 at zero-terminal SNR."""
        return self.alphas.square() / self.sigmas.square().clamp_min(_TINY)


def image_seq_len(latents: Tensor) -> int:
    """Image tokens of (..., H, W) latents in 2x2 patches: H * W // 4 (Flux's packing)."""
    if latents.ndim < 3:
        raise ValueError(f"latents need (..., H, W) dimensions, got shape {tuple(latents.shape)}")
    return int(latents.shape[-2]) * int(latents.shape[-1]) // 4


def auto_shift(seq_len: int) -> float:
    """Flux's resolution-dependent shift exp(mu), mu linear in the image sequence length."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    mu = BASE_SHIFT + slope * (seq_len - BASE_SEQ_LEN)
    return math.exp(mu)


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma); shift > 1 moves sigmas towards 1 (more noise)."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def timestep_weights(options: ObjectiveOptions, num_train_timesteps: int) -> Tensor:
    """Relative weight of each DDPM timestep under `timestep_bias_*` (diffusers' `generate_timestep_weights`)."""
    t_count = num_train_timesteps
    weights = torch.ones(t_count, dtype=torch.float64)
    strategy = options.timestep_bias_strategy
    if strategy == "none":
        return weights
    multiplier = options.timestep_bias_multiplier
    if not multiplier > 0:
        raise ConfigError(f"timestep_bias_multiplier must be > 0, got {multiplier}")
    if strategy in ("earlier", "later"):
        portion = options.timestep_bias_portion
        if not 0.0 < portion <= 1.0:
            raise ConfigError(f"timestep_bias_portion must be in (0, 1], got {portion}")
        count = int(portion * t_count)
        if count == 0:
            log.warning("timestep_bias_portion %s covers no timestep of %d; no bias applied", portion, t_count)
            return weights
        biased = slice(0, count) if strategy == "earlier" else slice(t_count - count, t_count)
    elif strategy == "range":
        begin, end = options.timestep_bias_begin, options.timestep_bias_end
        if not 0 <= begin < end <= t_count:
            raise ConfigError(
                f"timestep_bias_begin/end must satisfy 0 <= begin < end <= {t_count}, got begin={begin}, end={end}"
            )
        biased = slice(begin, end)
    else:  # guarded by Config's choices
        raise ConfigError(f"unknown timestep_bias_strategy {strategy!r}")
    weights[biased] *= multiplier
    return weights


def refiner_span(options: ObjectiveOptions, num_train_timesteps: int) -> tuple[int, int]:
    """The lowest and highest DDPM timestep a run trains on: all of them, or with `refiner_training` SimpleTuner's
    refiner range, [0, int(T * strength) - 1], or [int(T * strength), T - 1] with `refiner_training_invert_schedule`
    (`strength` = `refiner_training_strength`)."""
    last = num_train_timesteps - 1
    if not options.refiner_training:
        return 0, last
    strength = options.refiner_training_strength
    if not 0.0 < strength < 1.0:
        raise ConfigError(f"refiner_training_strength must be between 0 and 1 (exclusive), got {strength}")
    edge = int(num_train_timesteps * strength)
    span = (edge, last) if options.refiner_training_invert_schedule else (0, edge - 1)
    if span[1] < span[0]:
        raise ConfigError(f"refiner_training_strength {strength} leaves no timestep of {num_train_timesteps}")
    return span


def segment_distributions(weights: Tensor, batch_size: int, biased: bool,
                          span: tuple[int, int] | None = None) -> list[tuple[int, Tensor]]:  # fmt: skip
    """SimpleTuner's segments for a batch: (lowest timestep, probabilities of it and the ones above) per sample.

    `biased`: the weights carry a timestep bias, which SimpleTuner normalises to sum 1 before segmenting (that
    changes how much weight the shared boundary timesteps keep; see the module docstring). `span`: the lowest and
    highest timestep the segments cover (`refiner_training`'s range; default all of them).
    """
    low, high = span or (0, weights.numel() - 1)
    working = weights.to(torch.float64).clone()
    if biased:
        working /= working.sum()
    size = max((high - low + 1) // batch_size, 1)
    segments = []
    for i in range(batch_size):
        top = max(high - i * size, low)
        bottom = low if i == batch_size - 1 else max(top - size, low)
        segment = working[bottom : top + 1]
        segment /= segment.sum()  # in place, as SimpleTuner does: the next segment sees this boundary weight
        segments.append((bottom, segment.clone()))
    return segments


def _sample_gamma(shape: float, count: int, generator: torch.Generator) -> Tensor:
    """Gamma(shape, 1) draws from `generator` (Marsaglia-Tsang; shape < 1 via the U^(1/shape) boost)."""
    boost = shape < 1.0
    k = shape + 1.0 if boost else shape
    d = k - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(count, dtype=torch.float64)
    pending = torch.arange(count)
    while pending.numel():
        m = pending.numel()
        x = torch.randn(m, generator=generator, dtype=torch.float64)
        u = torch.rand(m, generator=generator, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        accept = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(_TINY)))
        out[pending[accept]] = d * v[accept]
        pending = pending[~accept]
    if boost:
        out *= torch.rand(count, generator=generator, dtype=torch.float64) ** (1.0 / shape)
    return out


def sample_beta(alpha: float, beta: float, count: int, generator: torch.Generator) -> Tensor:
    """Beta(alpha, beta) draws from `generator` as X / (X + Y) of two Gamma draws (float64)."""
    x = _sample_gamma(alpha, count, generator)
    y = _sample_gamma(beta, count, generator)
    return x / (x + y).clamp_min(_TINY)


def _view(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against `like`."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


class Objective:
    """Noising, targets, timesteps and loss of one training run."""

    def __init__(
        self,
        options: ObjectiveOptions,
        *,
        kind: str,
        scheduler_config: dict[str, Any] | None,
        num_train_timesteps: int = 1000,
        default_shift: float | None = None,
        sigma_curve: Callable[[Tensor], Tensor] | None = None,
        flow_sigmas: Callable[[Tensor], Tensor] | None = None,
        flow_loss_weight: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """`kind` is the family's default prediction type; `scheduler_config` the model's scheduler_config.json;
        `sigma_curve` a family's reshaping of the default (logit-normal) flow sigmas after the shift (Chroma's);
        `flow_sigmas` a family's own sigma draw from standard normals (its schedule options are then ignored, as
        SimpleTuner ignores them for it); `flow_loss_weight` a family's per-sample loss weight from the sigmas.

        A DDPM scheduler config's own `prediction_type` (epsilon / v_prediction) beats `kind`, and
        `options.prediction_type` beats both; switching between flow matching and DDPM is a ConfigError.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.options = options
        sched = dict(scheduler_config or {})
        self.num_train_timesteps = int(sched.get("num_train_timesteps") or num_train_timesteps)
        self.prediction_type = self._resolve_prediction_type(options, kind, sched)
        self.is_flow = self.prediction_type == "flow_matching"
        self.alphas_cumprod: Tensor | None = None
        self.weights: Tensor | None = None
        self.shift = 1.0
        self.sigma_curve = sigma_curve
        self.flow_sigmas, self.flow_loss_weight = flow_sigmas, flow_loss_weight
        if self.is_flow:
            self._init_flow(options, default_shift)
        else:
            self._init_ddpm(options, sched)
        self._init_noise(options)
        self._init_loss(options)
        self._init_diff2flow(options)
        log.info(
            "objective: %s, %d train timesteps, loss %s%s",
            self.prediction_type,
            self.num_train_timesteps,
            options.loss_type,
            f", shift {'auto' if self.auto_shift else self.shift}" if self.is_flow else "",
        )

    # --- set-up -----------------------------------------------------------------------------------------------

    @staticmethod
    def _resolve_prediction_type(options: ObjectiveOptions, kind: str, sched: dict[str, Any]) -> str:
        resolved = kind
        if kind in DDPM_KINDS and sched.get("prediction_type") in DDPM_KINDS:
            resolved = sched["prediction_type"]
        asked = options.prediction_type
        if asked is None:
            return resolved
        if (asked == "flow_matching") != (kind == "flow_matching"):
            family = "flow-matching" if kind == "flow_matching" else f"DDPM ({resolved})"
            allowed = "flow_matching" if kind == "flow_matching" else "epsilon or v_prediction"
            raise ConfigError(
                f"prediction_type '{asked}' does not fit this model family, which is trained as {family}; "
                f"set prediction_type to {allowed} or leave it unset"
            )
        if asked != resolved:
            log.info("prediction_type %s overrides the model's %s", asked, resolved)
        return asked

    def _init_ddpm(self, options: ObjectiveOptions, sched: dict[str, Any]) -> None:
        from diffusers import DDPMScheduler

        accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
        kwargs = {k: v for k, v in sched.items() if k in accepted}
        kwargs.update(
            num_train_timesteps=self.num_train_timesteps,
            prediction_type=self.prediction_type,
            rescale_betas_zero_snr=options.rescale_betas_zero_snr,
            timestep_spacing=options.training_scheduler_timestep_spacing,
        )
        self.scheduler = DDPMScheduler(**kwargs)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.detach().to(torch.float32).cpu()
        if options.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            log.warning("rescale_betas_zero_snr with epsilon prediction: the last timestep is pure noise, where "
                        "epsilon is trivial; v_prediction is the usual pairing")  # fmt: skip
        self.weights = timestep_weights(options, self.num_train_timesteps)
        self.timestep_span = refiner_span(options, self.num_train_timesteps)
        low, high = self.timestep_span
        self.cdf = torch.cumsum(self.weights[low : high + 1], 0) / self.weights[low : high + 1].sum()
        self.segmented = not options.disable_segmented_timestep_sampling
        self._segments: dict[int, list[tuple[int, Tensor]]] = {}
        self.auto_shift = False
        self.fast_schedule = False
        if options.flux_fast_schedule:
            log.warning("flux_fast_schedule samples flow-matching sigmas; this %s model ignores it (as SimpleTuner "
                        "does)", self.prediction_type)  # fmt: skip

    def _init_flow(self, options: ObjectiveOptions, default_shift: float | None) -> None:
        if options.flow_use_uniform_schedule and options.flow_use_beta_schedule:
            raise ConfigError("flow_use_uniform_schedule and flow_use_beta_schedule exclude each other; set one")
        if options.flow_use_beta_schedule and not (
            options.flow_beta_schedule_alpha > 0 and options.flow_beta_schedule_beta > 0
        ):
            raise ConfigError(
                "flow_beta_schedule_alpha and flow_beta_schedule_beta must be > 0, got "
                f"{options.flow_beta_schedule_alpha} and {options.flow_beta_schedule_beta}"
            )
        if not options.flow_sigmoid_scale > 0:
            raise ConfigError(f"flow_sigmoid_scale must be > 0, got {options.flow_sigmoid_scale}")
        if self.flow_sigmas is not None:
            ignored = [name for name, active in (
                ("flow_schedule_shift", options.flow_schedule_shift not in (None, 0, 1)),
                ("flow_schedule_auto_shift", options.flow_schedule_auto_shift),
                ("flow_use_uniform_schedule", options.flow_use_uniform_schedule),
                ("flow_use_beta_schedule", options.flow_use_beta_schedule),
                ("flow_sigmoid_scale", options.flow_sigmoid_scale != 1.0),
                ("flux_fast_schedule", options.flux_fast_schedule)) if active]  # fmt: skip
            if ignored:
                log.warning("this model family draws its own training sigmas (as in SimpleTuner); %s ignored",
                            ", ".join(ignored))  # fmt: skip
        self.fast_schedule = self._fast_schedule(options)
        self.auto_shift = options.flow_schedule_auto_shift and self.flow_sigmas is None
        shift = options.flow_schedule_shift if self.flow_sigmas is None else 1.0
        if self.auto_shift and shift is not None:
            log.warning("flow_schedule_auto_shift is set: flow_schedule_shift=%s is ignored", shift)
        if shift is None:
            shift = default_shift if default_shift is not None else 1.0
        if shift < 0:
            raise ConfigError(f"flow_schedule_shift must be >= 0 (0: no shift), got {shift}")
        self.shift = float(shift) if shift > 0 else 1.0
        if options.flux_guidance_mode == "random-range" and options.flux_guidance_min > options.flux_guidance_max:
            raise ConfigError(
                f"flux_guidance_min ({options.flux_guidance_min}) must not exceed "
                f"flux_guidance_max ({options.flux_guidance_max})"
            )
        ignored = [
            name
            for name, active in (
                ("rescale_betas_zero_snr", options.rescale_betas_zero_snr),
                ("timestep_bias_strategy", options.timestep_bias_strategy != "none"),
                ("snr_gamma", bool(options.snr_gamma)),
                ("use_soft_min_snr", options.use_soft_min_snr),
                ("offset_noise", options.offset_noise),
                ("refiner_training", options.refiner_training),
            )
            if active
        ]
        if ignored:
            log.warning("flow matching ignores %s (DDPM-only options)", ", ".join(ignored))
        self.segmented = False

    def _fast_schedule(self, options: ObjectiveOptions) -> bool:
        """Whether sigmas come from the fast schedule: asked for, and no schedule SimpleTuner prefers is set."""
        if not options.flux_fast_schedule or self.flow_sigmas is not None:
            return False
        winner = ("flow_use_uniform_schedule" if options.flow_use_uniform_schedule else
                  "flow_use_beta_schedule" if options.flow_use_beta_schedule else None)  # fmt: skip
        if winner:
            log.warning("flux_fast_schedule is ignored: %s wins over it (as in SimpleTuner)", winner)
            return False
        return True

    def _init_noise(self, options: ObjectiveOptions) -> None:
        if not 0.0 <= options.noise_offset_probability <= 1.0:
            raise ConfigError(f"noise_offset_probability must be in [0, 1], got {options.noise_offset_probability}")
        if options.noise_offset < 0:
            raise ConfigError(f"noise_offset must be >= 0, got {options.noise_offset}")
        if options.noise_offset not in (0.0, NOISE_OFFSET_DEFAULT) and not options.offset_noise and not self.is_flow:
            # SimpleTuner reads noise_offset only with offset_noise on; say so rather than train without it silently
            # (its default 0.1, set in nearly every config, is left unremarked).
            log.warning("noise_offset %g has no effect without offset_noise = true (as in SimpleTuner); set "
                        "offset_noise = true to train with offset noise", options.noise_offset)  # fmt: skip
        if options.input_perturbation < 0:
            raise ConfigError(f"input_perturbation must be >= 0, got {options.input_perturbation}")
        if options.input_perturbation_steps < 0:
            raise ConfigError(f"input_perturbation_steps must be >= 0, got {options.input_perturbation_steps}")

    def _init_loss(self, options: ObjectiveOptions) -> None:
        if not 0.0 <= options.masked_loss_probability <= 1.0:
            raise ConfigError(f"masked_loss_probability must be in [0, 1], got {options.masked_loss_probability}")
        if options.loss_type != "l2" and not options.huber_c > 0:
            raise ConfigError(f"huber_c must be > 0 for loss_type {options.loss_type}, got {options.huber_c}")
        if options.snr_gamma is not None and options.snr_gamma < 0:
            raise ConfigError(f"snr_gamma must be >= 0 (0 or unset: off), got {options.snr_gamma}")
        if options.use_soft_min_snr and not self.is_flow:
            sigma_data = options.soft_min_snr_sigma_data
            if sigma_data is None or not sigma_data > 0:
                raise ConfigError(
                    "use_soft_min_snr needs soft_min_snr_sigma_data (the latents' standard deviation, > 0), "
                    f"got {sigma_data}"
                )
        # snr_weight multiplies the loss where SimpleTuner multiplies it: the l2 loss of a DDPM model without
        # snr_gamma (ModelFoundation.loss); elsewhere SimpleTuner ignores it, and st says so.
        weight = float(options.snr_weight)
        applies = not self.is_flow and options.loss_type == "l2" and not options.snr_gamma
        if weight != 1.0 and not applies:
            reason = ("flow matching" if self.is_flow else f"snr_gamma {options.snr_gamma}" if options.snr_gamma
                      else f"loss_type {options.loss_type}")  # fmt: skip
            log.warning("snr_weight %g has no effect with %s (as in SimpleTuner, it multiplies only the l2 loss of a "
                        "DDPM model without snr_gamma)", weight, reason)  # fmt: skip
        self.snr_weight = weight if applies else 1.0

    def _init_diff2flow(self, options: ObjectiveOptions) -> None:
        """SimpleTuner's Diff2Flow bridge (`self.diff2flow`, or None) and whether the loss uses it."""
        self.diff2flow = None
        self.diff2flow_loss = False
        if options.diff2flow_loss and not options.diff2flow_enabled:
            log.warning("diff2flow_loss has no effect without diff2flow_enabled = true (as in SimpleTuner)")
        if not options.diff2flow_enabled:
            return
        if self.is_flow:
            log.warning("diff2flow_enabled has no effect on a flow-matching model: the bridge converts epsilon or "
                        "v_prediction models (as in SimpleTuner)")  # fmt: skip
            return
        from .diff2flow import DiffusionToFlow

        assert self.alphas_cumprod is not None
        self.diff2flow = DiffusionToFlow(self.alphas_cumprod)
        if not options.diff2flow_loss:
            log.info("diff2flow_enabled without diff2flow_loss leaves the training loss %s (as in SimpleTuner, the "
                     "bridge then serves only TwinFlow / PeRFlow, which st does not have)", self.prediction_type)
            return
        low, high = self.timestep_span
        if self.prediction_type == "epsilon" and float(self.alphas_cumprod[low : high + 1].min()) <= 0.0:
            raise ConfigError(
                "diff2flow_loss with epsilon prediction and rescale_betas_zero_snr: the last timestep has "
                "alphas_cumprod 0, where the bridge's x0 = x_t / sqrt(alphas_cumprod) is infinite (SimpleTuner's loss "
                "turns NaN there); set prediction_type = \"v_prediction\", turn rescale_betas_zero_snr off, or "
                "turn diff2flow_loss off"
            )
        self.diff2flow_loss = True
        ignored = [name for name, active in (
            (f"loss_type {options.loss_type}", options.loss_type != "l2"),
            (f"snr_gamma {options.snr_gamma}", bool(options.snr_gamma)),
            ("use_soft_min_snr", options.use_soft_min_snr),
            (f"snr_weight {options.snr_weight:g}", float(options.snr_weight) != 1.0)) if active]  # fmt: skip
        if ignored:
            log.warning("diff2flow_loss is a plain l2 loss on the flow velocity: %s has no effect (as in SimpleTuner)",
                        ", ".join(ignored))  # fmt: skip
        self.snr_weight = 1.0
        log.info("diff2flow_loss: the %s prediction is trained as a flow velocity against noise - latents",
                 self.prediction_type)  # fmt: skip

    # --- sampling ---------------------------------------------------------------------------------------------

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """DDPM timesteps (int64, CPU) from the bias distribution, stratified when segmented sampling is on."""
        if self.is_flow:
            raise RuntimeError("sample_timesteps is for DDPM objectives; flow matching samples sigmas")
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        low, high = self.timestep_span
        if not (self.segmented and batch_size > 1):
            index = torch.searchsorted(self.cdf, u, right=True)
            return (index.clamp_(0, high - low) + low).to(torch.int64)
        if batch_size not in self._segments:
            biased = self.options.timestep_bias_strategy != "none"
            self._segments[batch_size] = segment_distributions(self.weights, batch_size, biased, self.timestep_span)
        drawn = []
        for (bottom, probabilities), value in zip(self._segments[batch_size], u.tolist()):
            cdf = torch.cumsum(probabilities, 0)
            offset = int(torch.searchsorted(cdf, value * float(cdf[-1]), right=True).clamp(max=cdf.numel() - 1))
            drawn.append(bottom + offset)
        return torch.tensor(drawn, dtype=torch.int64)

    def shift_for(self, latents: Tensor) -> float:
        """The flow shift used for `latents` (auto-shift depends on their size)."""
        return auto_shift(image_seq_len(latents)) if self.auto_shift else self.shift

    def sample_sigmas(self, batch_size: int, generator: torch.Generator, shift: float = 1.0,
                      offset: float = 0.0) -> Tensor:  # fmt: skip
        """Flow-matching sigmas in [0, 1] (float32, CPU) from the configured schedule, then shifted. `offset`: the
        batch's dataset's `timestep_sampling_offset`, added to the standard normal draw of the logit-normal schedule
        before the sigmoid and the shift, sigma = sigmoid(flow_sigmoid_scale * (n + offset)) (SimpleTuner's
        `sample_flow_sigmas`; the other schedules ignore it, as there)."""
        options = self.options
        if self.flow_sigmas is not None:
            normal = torch.randn(batch_size, generator=generator, dtype=torch.float64)
            return self.flow_sigmas(normal).to(torch.float32)
        if self.fast_schedule:
            choice = torch.randint(len(FAST_SCHEDULE_SIGMAS), (batch_size,), generator=generator)
            return torch.tensor(FAST_SCHEDULE_SIGMAS, dtype=torch.float32)[choice]
        if options.flow_use_uniform_schedule:
            sigmas = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        elif options.flow_use_beta_schedule:
            sigmas = sample_beta(options.flow_beta_schedule_alpha, options.flow_beta_schedule_beta, batch_size,
                                 generator)  # fmt: skip
        else:
            normal = torch.randn(batch_size, generator=generator, dtype=torch.float64)
            if offset:
                normal = normal + offset
            sigmas = torch.sigmoid(options.flow_sigmoid_scale * normal)
            if self.sigma_curve is not None:
                sigmas = self.sigma_curve(shift_sigmas(sigmas, shift).clamp_(0.0, 1.0))
                return sigmas.to(torch.float32)
        return shift_sigmas(sigmas, shift).clamp_(0.0, 1.0).to(torch.float32)

    def _check_offset(self) -> None:
        """Warn once when the run's schedule does not read a dataset's timestep_sampling_offset (as in SimpleTuner,
        which applies it to the logit-normal flow schedule only)."""
        if getattr(self, "_offset_checked", False):
            return
        self._offset_checked = True
        options = self.options
        schedule = ("DDPM timesteps" if not self.is_flow else
                    "this model family's own flow sigmas" if self.flow_sigmas is not None else
                    "the flux_fast_schedule sigmas" if self.fast_schedule else
                    "the uniform flow schedule" if options.flow_use_uniform_schedule else
                    "the beta flow schedule" if options.flow_use_beta_schedule else None)  # fmt: skip
        if schedule is not None:
            log.warning("timestep_sampling_offset is set on a dataset, but this run samples %s: the offset shifts "
                        "the default logit-normal flow schedule only and is ignored (as in SimpleTuner)", schedule)

    def perturbation_scale(self, step: int) -> float:
        """input_perturbation at `step`, decayed linearly to 0 over input_perturbation_steps when > 0."""
        scale = float(self.options.input_perturbation)
        steps = self.options.input_perturbation_steps
        if scale == 0.0:
            return 0.0
        if steps > 0:
            scale *= max(0.0, 1.0 - step / steps)
        return scale

    def draw(self, latents: Tensor, generator: torch.Generator, step: int, offset: float = 0.0) -> Noised:
        """Noise a training batch; every random number comes from `generator` (CPU), results on latents.device.
        `offset`: the batch's dataset's `timestep_sampling_offset` (`sample_sigmas`); the draws are the same with
        or without it, only the sigmas move."""
        if offset:
            self._check_offset()
        device = latents.device
        x = latents.detach().to(torch.float32)
        batch = x.shape[0]
        # Optional draws come last, so turning noise_offset / input_perturbation on leaves noise and schedule alone.
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        if self.is_flow:
            schedule = self.sample_sigmas(batch, generator, self.shift_for(x), offset)
        else:
            schedule = self.sample_timesteps(batch, generator)
        options = self.options
        if options.offset_noise and options.noise_offset > 0 and not self.is_flow:
            coin = float(torch.rand(1, generator=generator, dtype=torch.float64))
            if options.noise_offset_probability == 1.0 or coin < options.noise_offset_probability:
                offsets = torch.randn((batch, x.shape[1], *([1] * (x.ndim - 2))), generator=generator)
                noise = noise + options.noise_offset * offsets
        noise_in = noise
        scale = self.perturbation_scale(step)
        if scale > 0:
            noise_in = noise + scale * torch.randn(x.shape, generator=generator, dtype=torch.float32)
        return self._build(x, schedule.to(device), noise.to(device), noise_in.to(device))

    def fixed(self, latents: Tensor, timesteps_or_sigmas: Tensor, noise: Tensor) -> Noised:
        """Noise with given noise at given points of the schedule, for an evaluation loss.

        Flow: sigmas in [0, 1] (unshifted). DDPM: an integer tensor holds timesteps; a floating one holds fractions
        f in [0, 1] of the schedule, timestep round(f * (T - 1)), so callers can pass the same values to both.
        A single value is used for the whole batch.
        """
        x = latents.detach().to(torch.float32)
        noise = noise.to(device=x.device, dtype=torch.float32)
        schedule = timesteps_or_sigmas.to(x.device).reshape(-1)
        if schedule.numel() == 1 and x.shape[0] > 1:
            schedule = schedule.expand(x.shape[0])
        if schedule.is_floating_point() or self.is_flow:
            schedule = schedule.to(torch.float32)
            if schedule.numel() and (schedule.min() < 0 or schedule.max() > 1):
                raise ValueError("flow sigmas and DDPM schedule fractions must lie in [0, 1]")
        if not self.is_flow:
            if schedule.is_floating_point():
                schedule = torch.round(schedule.to(torch.float64) * (self.num_train_timesteps - 1))
            schedule = schedule.to(torch.int64)
            if schedule.numel() and (schedule.min() < 0 or schedule.max() >= self.num_train_timesteps):
                raise ValueError(f"DDPM timesteps must lie in [0, {self.num_train_timesteps})")
        return self._build(x, schedule, noise, noise)

    def _build(self, x: Tensor, schedule: Tensor, noise: Tensor, noise_in: Tensor) -> Noised:
        if self.is_flow:
            sigmas = schedule.to(torch.float32)
            alphas = 1.0 - sigmas
            noisy = _view(alphas, x) * x + _view(sigmas, x) * noise_in
            target = noise - x
            timesteps = sigmas * float(self.num_train_timesteps)
        else:
            assert self.alphas_cumprod is not None
            abar = self.alphas_cumprod.to(x.device)[schedule]
            alphas, sigmas = abar.sqrt(), (1.0 - abar).clamp_min(0.0).sqrt()
            noisy = _view(alphas, x) * x + _view(sigmas, x) * noise_in
            if self.prediction_type == "epsilon":
                target = noise
            else:
                target = _view(alphas, x) * noise - _view(sigmas, x) * x
            timesteps = schedule
        flow_target = self.diff2flow.flow_target(x, noise) if self.diff2flow_loss else None
        return Noised(noisy=noisy, target=target, timesteps=timesteps, noise=noise, alphas=alphas, sigmas=sigmas,
                      flow_target=flow_target)  # fmt: skip

    def guidance(
        self, batch_size: int, generator: torch.Generator, device: torch.device | str | None = None
    ) -> Tensor | None:
        """Flux guidance per sample: flux_guidance_value, or uniform in [min, max] ("random-range"); None for DDPM.

        Only denoisers with guidance embeddings (Flux dev) take it; the caller decides whether to pass it.
        """
        if not self.is_flow:
            return None
        options = self.options
        if options.flux_guidance_mode == "random-range":
            low, high = options.flux_guidance_min, options.flux_guidance_max
            values = low + (high - low) * torch.rand(batch_size, generator=generator, dtype=torch.float32)
        else:
            values = torch.full((batch_size,), float(options.flux_guidance_value), dtype=torch.float32)
        return values if device is None else values.to(device)

    # --- loss -------------------------------------------------------------------------------------------------

    def huber_c(self, noised: Noised) -> Tensor:
        """Per-sample Huber threshold under `huber_schedule` (see the module docstring)."""
        options = self.options
        base = float(options.huber_c)
        alphas, sigmas = noised.alphas.to(torch.float32), noised.sigmas.to(torch.float32)
        if options.huber_schedule == "constant":
            return torch.full_like(alphas, base)
        if options.huber_schedule == "exponential":
            t = noised.timesteps.to(device=alphas.device, dtype=torch.float32)
            return torch.exp(math.log(base) * t / self.num_train_timesteps)
        if self.is_flow:
            ratio = ((1.0 - sigmas) / (sigmas + 1e-4)).sqrt()
            return (1.0 - base) / (1.0 + ratio).square() + base
        # DDPM: 1 / (1 + sigma/alpha) = alpha / (alpha + sigma), finite at alpha = 0.
        share = alphas / (alphas + sigmas).clamp_min(_TINY)
        return (1.0 - base) * share.square() + base

    def loss_weights(self, noised: Noised) -> Tensor | None:
        """Per-sample min-SNR / soft min-SNR weights (DDPM), a family's flow loss weight, or None when the loss is
        unweighted."""
        options = self.options
        if self.is_flow and self.flow_loss_weight is not None:
            return self.flow_loss_weight(noised.sigmas.to(torch.float32))
        if self.is_flow or not (options.snr_gamma or options.use_soft_min_snr):
            return None
        snr = noised.snr.to(torch.float32)
        if options.use_soft_min_snr:
            gamma = float(options.snr_gamma) if options.snr_gamma else 1.0
            sigma_data = float(options.soft_min_snr_sigma_data or 1.0)
            weights = gamma / (sigma_data**2 * snr + gamma)
        else:
            gamma = float(options.snr_gamma)
            weights = torch.where(snr > 0, torch.clamp(gamma / snr.clamp_min(_TINY), max=1.0), torch.ones_like(snr))
        if self.prediction_type == "v_prediction":
            weights = weights * snr / (snr + 1.0)
        return weights

    def choose_mask(self, pixels: Tensor | None, kind: str | None, generator: torch.Generator) -> LossMask | None:
        """The mask a training batch's loss uses: its mask images with probability `masked_loss_probability`, drawn
        from `generator` (one draw, only for a batch that has mask images), else None."""
        if pixels is None:
            return None
        if kind not in MASK_KINDS:
            raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
        coin = float(torch.rand(1, generator=generator, dtype=torch.float64))
        return LossMask(pixels, kind) if coin < self.options.masked_loss_probability else None

    def loss(self, prediction: Tensor, noised: Noised, step: int, mask: LossMask | None = None) -> Tensor:
        """Scalar float32 loss: elementwise loss (times the mask's weights), mean per sample, times its weight, mean
        over the batch.

        `step` is the optimisation step (kept for schedules that depend on it; none of the current ones do).
        """
        del step
        pred = prediction.to(torch.float32)
        if self.diff2flow_loss:
            return self._diff2flow_loss(pred, noised, mask)
        target = noised.target.to(device=pred.device, dtype=torch.float32)
        diff = pred - target
        loss_type = self.options.loss_type
        if loss_type == "l2":
            elementwise = diff.square()
        else:
            c = _view(self.huber_c(noised).to(pred.device), diff)
            pseudo_huber = 2.0 * ((diff.square() + c.square()).sqrt() - c)
            elementwise = c * pseudo_huber if loss_type == "huber" else pseudo_huber
        if mask is not None:
            elementwise = elementwise * mask.weights(elementwise)
        per_sample = elementwise.reshape(elementwise.shape[0], -1).mean(dim=1)
        weights = self.loss_weights(noised)
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample.device)
        if self.snr_weight != 1.0:
            per_sample = per_sample * self.snr_weight
        return per_sample.mean()

    def _diff2flow_loss(self, pred: Tensor, noised: Noised, mask: LossMask | None) -> Tensor:
        """SimpleTuner's diff2flow loss: l2 between the prediction converted to a flow velocity and noise - latents,
        times the mask's weights, mean per sample, mean over the batch (no loss weights)."""
        assert self.diff2flow is not None and noised.flow_target is not None
        noisy = noised.noisy.to(device=pred.device, dtype=torch.float32)
        flow = self.diff2flow.prediction_to_flow(pred, noisy, noised.timesteps.to(pred.device), self.prediction_type)
        elementwise = (flow - noised.flow_target.to(device=pred.device, dtype=torch.float32)).square()
        if mask is not None:
            elementwise = elementwise * mask.weights(elementwise)
        return elementwise.reshape(elementwise.shape[0], -1).mean(dim=1).mean()
