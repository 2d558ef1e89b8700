"""Regularisation datasets (`is_regularisation_data`): the frozen base model's prediction is the target.

SimpleTuner's parent-teacher regularisation (prior preservation): for a batch of a regularisation dataset the
denoiser first runs with its adapters switched off (peft LoRA layers disabled, a LyCORIS network at multiplier 0),
without gradients, on the same noisy latents, text and timesteps; that prediction replaces the target, and the loss
(Huber, min-SNR weights, a mask) is then computed as for any batch, with the adapters on. SimpleTuner has no option
that weights these batches differently: their share of the training follows from the datasets' `probability` and
`repeats`, as for any dataset. A full fine-tune has no adapter to switch off: SimpleTuner then trains on those images
like any others, st refuses the run (`check`) rather than quietly drop the regularisation the dataset asks for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ..errors import ConfigError
from . import lycoris


def regularisation_datasets(datasets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The ids of the datasets marked `is_regularisation_data` (a cache manifest's `datasets` entries by id)."""
    return sorted(i for i, d in datasets.items() if d.get("is_regularisation_data"))


def check(datasets: Mapping[str, Mapping[str, Any]], model_type: str, controlnet: bool = False) -> None:
    """Refuse regularisation datasets in a run that has no adapter of the denoiser to switch off (model_type full,
    or a ControlNet run)."""
    marked = regularisation_datasets(datasets)
    if not marked:
        return
    if controlnet:
        problem = "a ControlNet run trains no adapter of the denoiser (not implemented for ControlNets)"
    elif model_type != "lora":
        problem = f"a model_type {model_type} run has no adapter"
    else:
        return
    raise ConfigError(
        f"dataset '{marked[0]}' has is_regularisation_data, which needs a LoRA / LyCORIS adapter on the denoiser: its "
        f"target is the base model's prediction with the adapters switched off, and {problem}; train an adapter, or "
        "remove is_regularisation_data to train on those images as usual"
    )


@contextmanager
def adapters_disabled(denoiser) -> Iterator[None]:
    """The denoiser as the base model: its peft LoRA layers disabled, or its LyCORIS network at multiplier 0;
    restored afterwards (also when the forward pass fails)."""
    network = lycoris.network_of(denoiser)
    if network is not None:
        multiplier = network.multiplier
        network.set_multiplier(0.0)
        try:
            yield
        finally:
            network.set_multiplier(multiplier)
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    if not layers:
        raise RuntimeError("regularisation needs adapters to switch off, and the denoiser has none")
    # Peft's switch also turns requires_grad off and back on; only enabled layers are switched (and restored).
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def base_prediction(predict, denoiser):
    """`predict()` run as the base model without gradients, detached: a regularisation batch's target."""
    import torch

    with torch.no_grad(), adapters_disabled(denoiser):
        return predict().detach()
