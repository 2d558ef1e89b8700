"""Diff2Flow: an epsilon / v-prediction model trained against a flow-matching target (SimpleTuner's
`diff2flow_enabled` + `diff2flow_loss`, its `simpletuner.diff2flow.DiffusionToFlowBridge`).

The model and its noising are unchanged (x_t = sqrt(abar_t) x + sqrt(1 - abar_t) noise at integer timesteps); only the
loss differs. The prediction at timestep t becomes a velocity with the bridge's formulas, abar = the training
scheduler's alphas_cumprod:
    epsilon:      x0 = sqrt(1 / abar) x_t - sqrt(1 / abar - 1) eps;  flow = eps - x0
    v_prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v;  eps = sqrt(abar) v + sqrt(1 - abar) x_t;  flow = eps - x0
and the loss is the plain l2 distance to the flow target noise - latents (the target's noise: offset noise in,
input perturbation out, as SimpleTuner's `flow_target`). SimpleTuner's diff2flow loss skips loss_type, snr_gamma,
use_soft_min_snr and snr_weight; the conditioning mask still applies.

`diff2flow_enabled` alone builds the bridge and changes nothing in training (SimpleTuner reads it further only for
TwinFlow and PeRFlow distillation, which st does not have); flow-matching models never get the bridge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")


class DiffusionToFlow:
    """The bridge's per-timestep tables, from the training scheduler's alphas_cumprod (computed in float32).

    DEVIATION: SimpleTuner moves the tables to `weight_dtype`, so under bf16 mixed precision its coefficients are
    rounded to bf16 (up to 0.4% relative, e.g. sqrt(1 / abar) ~ 14.6 at SD's last timestep); st keeps them float32,
    as the rest of its objective. The two agree exactly when SimpleTuner's weight dtype is float32.
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        import torch

        abar = alphas_cumprod.detach().to(dtype=torch.float32)
        self.num_timesteps = int(abar.shape[0])
        self.sqrt_alphas_cumprod = torch.sqrt(abar)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - abar)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / abar)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / abar - 1.0)

    @staticmethod
    def _at(table: Tensor, timesteps: Tensor, like: Tensor) -> Tensor:
        values = table.to(device=timesteps.device)[timesteps.long()]
        return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))

    def flow_target(self, latents: Tensor, noise: Tensor) -> Tensor:
        """The flow-matching velocity noise - latents."""
        return noise - latents

    def prediction_to_flow(self, prediction: Tensor, noisy: Tensor, timesteps: Tensor, prediction_type: str) -> Tensor:
        """The velocity (noise - x0 as the model sees it) of an epsilon or v prediction at integer `timesteps`."""
        if prediction_type == "v_prediction":
            sqrt_alpha = self._at(self.sqrt_alphas_cumprod, timesteps, noisy)
            sqrt_one_minus = self._at(self.sqrt_one_minus_alphas_cumprod, timesteps, noisy)
            x0 = sqrt_alpha * noisy - sqrt_one_minus * prediction
            eps = sqrt_alpha * prediction + sqrt_one_minus * noisy
            return eps - x0
        if prediction_type == "epsilon":
            recip = self._at(self.sqrt_recip_alphas_cumprod, timesteps, noisy)
            recipm1 = self._at(self.sqrt_recipm1_alphas_cumprod, timesteps, noisy)
            x0 = recip * noisy - recipm1 * prediction
            return prediction - x0
        raise ValueError(f"Diff2Flow converts epsilon or v_prediction predictions, not {prediction_type!r}")


def check(datasets: dict[str, dict], diff2flow_enabled: bool, diff2flow_loss: bool, prediction_type: str) -> None:
    """Refuse regularisation datasets under diff2flow_loss (before the model loads): SimpleTuner's diff2flow loss
    takes its target from noise - latents even for a regularisation batch, so the frozen base model's prediction
    that such a batch is trained towards would be silently dropped."""
    from ..errors import ConfigError
    from .regularisation import regularisation_datasets

    if not (diff2flow_enabled and diff2flow_loss) or prediction_type not in PREDICTION_TYPES:
        return
    marked = regularisation_datasets(datasets)
    if marked:
        raise ConfigError(
            f"dataset '{marked[0]}' has is_regularisation_data, which diff2flow_loss cannot serve: its loss is taken "
            "against noise - latents, never against the base model's prediction (SimpleTuner drops that target "
            "silently); turn diff2flow_loss off, or remove is_regularisation_data"
        )
