"""What a model family is: its diffusers layout, the conventions training must follow and the functions that differ.

A family is a frozen dataclass of data and builder functions, filled in by one module per family (`sd1x.py`,
`flux.py`, ...). Loading its parts is `loading.py`, identifying them `identity.py`, its LoRA files `lora.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputError
from pipeline.families import lora

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_matching")


@dataclass(frozen=True)
class Component:
    """One `from_pretrained` loadable part of a diffusers folder."""

    subfolder: str
    class_name: str
    library: str  # "diffusers" or "transformers"

    def load_class(self) -> type:
        """The class named by this component (imports its library)."""
        return getattr(importlib.import_module(self.library), self.class_name)


@dataclass(frozen=True)
class TextEncoderSpec:
    """A text encoder, its tokenizer and the token length the family's pipeline pads to by default.

    `source`: the hub repository that holds the encoder and its tokenizer (in the same subfolders) for models that
    do not ship them (HiDream's Llama); used only when the model folder or repository lacks a subfolder."""

    model: Component
    tokenizer: Component
    max_length: int
    kind: str  # "clip", "t5", "gemma", "chatglm", "qwen2_5_vl", "qwen3" (code branches on "t5" only)
    source: str | None = None


@dataclass(frozen=True)
class Flavour:
    """A named base model of a family (SimpleTuner's `model_flavour`): its hub id, and `needs`, the feature st lacks
    to train it as SimpleTuner does (None when st trains it)."""

    name: str
    hub_id: str
    needs: str | None = None


@dataclass(frozen=True)
class Family:
    """A text-to-image model family: its diffusers layout and the conventions training must follow.

    `bucket_alignment` is in pixels. `tiny(out_dir, seed)` writes a small random-weight model folder for tests.
    `encode_prompts` and `collate_text` turn prompts into cached embeddings and cached embeddings into a batch;
    `predict` is the denoiser call of the family's pipeline (see `denoiser_forward`). `trims_text` says whether
    `encode_prompts` stores prompt embeddings trimmed to the real token count (lossless only because the denoiser
    masks padded positions; `collate_text` pads them back with zeros and mask 0). `single_file` says whether the
    pipeline class can load single-file checkpoints; `lora_loader` whether it can load LoRA weights itself.
    `flavours` and `default_flavour` are SimpleTuner's flavour table and default for the family (None: the
    family has none, and a run without a model path must name its flavour).
    `latent_side_limit(denoiser_config)` gives `(latent pixels, why)`, the largest latent side the denoiser accepts
    (None: any size); see `limits.py`.
    """

    name: str
    pipeline_class: str
    denoiser: Component
    vae: Component
    text_encoders: tuple[TextEncoderSpec, ...]
    scheduler: Component
    latent_channels: int
    bucket_alignment: int
    prediction_type: str
    lora_targets: tuple[str, ...]
    tiny: Callable[[Path, int], None]
    encode_prompts: Callable[..., list[dict[str, Any]]]
    collate_text: Callable[[list[dict[str, Any]]], dict[str, Any]]
    predict: Callable[..., Any]
    single_file: bool = True
    trims_text: bool = False
    lora_presets: tuple[tuple[str, tuple[str, ...]], ...] = ()
    default_flow_shift: float | None = None
    lora_loader: bool = True
    flavours: tuple[Flavour, ...] = ()
    default_flavour: str | None = None
    # Bends the training sigmas after shifting (Chroma's schedule in SimpleTuner); None: unchanged.
    sigma_curve: Callable[[Any], Any] | None = None
    # The family's own training sigma draw from standard normals, replacing st's flow schedule options (Cosmos' EDM
    # draw); and a per-sample loss weight from the sigmas (EDM's weighting written for a velocity loss). None: st's.
    flow_sigmas: Callable[[Any], Any] | None = None
    flow_loss_weight: Callable[[Any], Any] | None = None
    # base_model_precision presets SimpleTuner refuses for this family (Cosmos: fp8-quanto), refused here too.
    refused_precisions: tuple[str, ...] = ()
    # The family's own cache options as `encode_prompts` keywords (Sana's instruction); None: there are none.
    text_options: Callable[[Any], dict[str, Any]] | None = None
    # The pipeline takes prompt embeddings as a list, one prompt's real tokens per item (ZImagePipeline).
    list_prompt_embeds: bool = False
    # The pipeline takes the prompt as text and tokenizes it itself (OmniGen: its denoiser embeds the token ids, so
    # there are no embeddings to hand it): validation passes the prompt and the family's tokenizer.
    prompt_text: bool = False
    latent_side_limit: Callable[[Any], tuple[int, str] | None] | None = None
    # What a control/conditioning image enters the model as: "pixels" (the UNet ControlNets of SD 1.x/2.x/SDXL take
    # the image itself) or "latents" (DiT ControlNets and edit models take its VAE latents). `st cache` stores the
    # conditioning image's pixels always and its latents only for "latents".
    control_input: str = "latents"
    # The denoiser also takes a reference image (edit models): `predict` then gets its VAE latents as `reference=`
    # (B x C x h x w, scaled like the latents), and a run needs a non-mask conditioning dataset to draw them from.
    takes_reference: bool = False
    # The prompt embeddings depend on the reference image too (Qwen-Image-Edit: Qwen2.5-VL sees its image tokens):
    # `encode_prompts` then takes `images=` (one PIL image or None per prompt), `st cache` encodes each paired
    # sample's captions with its reference, and validation lets the pipeline encode prompt and reference itself.
    text_with_reference: bool = False
    # `variant(model_flavour, source)`: the family a run trains when a flavour or model changes the pipeline (Flux's
    # Kontext flavour and Kontext checkpoints train as Flux Kontext); None: always this family.
    variant: Callable[[str | None, str], Family] | None = None
    # `pipeline_setup(pipeline_class)`: what the pipeline class needs before it can be built here (Cosmos: rendering
    # without NVIDIA's guardrail package); None: nothing.
    pipeline_setup: Callable[[type], None] | None = None
    # A video family (Wan, LTX-Video): its VAE keeps the time axis, so cached latents are C x f x h x w per sample
    # (an image is one frame), `predict` takes B x C x f x h x w, and validation renders videos. A clip of F frames
    # encodes to f = 1 + (F - 1) / temporal_compression latent frames, so F must be 1 + k * temporal_compression.
    video: bool = False
    temporal_compression: int = 1
    # Parts beside the text encoders whose outputs `st cache` stores (Wan 2.1 i2v / FLF2V: the CLIP vision encoder and
    # its processor): the model identity records them as `image_encoder`.
    image_encoder: tuple[Component, ...] = ()
    # The family's own steps in shared code; None: it has none. Hooks that take `family` get the run's family, so one
    # function serves a family and the variants made from it.
    # `check_config(config, family)`: refuse option values the family trains otherwise in SimpleTuner (FLUX.2 [dev]).
    check_config: Callable[[Any, Family], None] | None = None
    # `train_key_entries(family)`: what train's key and manifest config record beside the options, so that publish can
    # tell what the run trained when its pipeline class does not (a Wan 2.2 T2V A14B stage, Wan 2.1 FLF2V).
    train_key_entries: Callable[[Family], dict[str, str]] | None = None
    # A trained denoiser that is not the model folder's `denoiser.subfolder` (the Wan 2.2 A14B stages):
    # `denoiser_subfolder(family)` the model folder's subfolder it is read from (None: the family's own);
    # `denoiser_file(family, file)` (local single file, the model folder's subfolder whose config it takes) of a stage
    # trained from one file (`file`: the user's file in its place; None: not such a run); `load_denoiser_file(family,
    # path, config_folder, config_subfolder, dtype=, quantization_config=)` loads that file; `check_denoiser_source(
    # family, model, source, subfolder)` refuses a pretrained_transformer_* override that names the wrong expert.
    denoiser_subfolder: Callable[[Family], str | None] | None = None
    denoiser_file: Callable[[Family, str | None], tuple[str, str] | None] | None = None
    load_denoiser_file: Callable[..., Any] | None = None
    check_denoiser_source: Callable[[Family, str, str, str | None], None] | None = None
    # The denoiser a run reads when pretrained_transformer_model_name_or_path is unset (a hub id or folder, read from
    # pretrained_transformer_subfolder): SimpleTuner's TRANSFORMER_PATH_OVERRIDES (Z-Image ostris-de-turbo); None: the
    # model's own.
    default_denoiser: str | None = None
    # `validation_components(family, source, trained_denoiser, load_other_stage, device)`: what the validation pipeline
    # needs beside the usual components (Wan 2.1 i2v's CLIP, a Wan 2.2 stage's expert slots, DeepFloyd II's noising
    # scheduler).
    validation_components: Callable[..., dict[str, Any]] | None = None
    # `validation_input(image)`: validation renders from the cached training images (a pixel-space cache), each made
    # into the pipeline's input image by this (DeepFloyd II's low-resolution image).
    validation_input: Callable[[Any], Any] | None = None
    # `validation_extras(family, tensors, key)`: the pipeline inputs beside the reference image, from a cached sample's
    # conditioning tensors (`key`: the sample's, for the message when they lack one): {keyword: PIL image} (Wan FLF2V).
    validation_extras: Callable[[Family, dict[str, Any], str], dict[str, Any]] | None = None
    # Publish, from the train manifest (`train`) of a run of this family: `trained_slot(train)` the pipeline component
    # the trained denoiser replaces (None: `denoiser.subfolder`); `lora_load_arguments(train)` extra arguments of the
    # snippet's `load_lora_weights`; `card_note(family, train, denoiser_config)` a sentence for the model card
    # (`denoiser_config()`: the base denoiser's config.json, or None); `snippet_images(train)` the snippet's extra input
    # images, (keyword, variable, comment) each (Wan FLF2V's last frame).
    trained_slot: Callable[[dict[str, Any]], str | None] | None = None
    lora_load_arguments: Callable[[dict[str, Any]], str] | None = None
    card_note: Callable[[Family, dict[str, Any], Callable[[], Any]], str | None] | None = None
    snippet_images: Callable[[dict[str, Any]], list[tuple[str, str, str]]] | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"{self.name}: unknown prediction_type {self.prediction_type!r}")
        if self.control_input not in ("pixels", "latents"):
            raise ValueError(f"{self.name}: control_input must be 'pixels' or 'latents'")
        if self.bucket_alignment < 16:
            raise ValueError(f"{self.name}: bucket_alignment must be at least 16")
        if self.temporal_compression < 1 or (self.temporal_compression > 1 and not self.video):
            raise ValueError(f"{self.name}: temporal_compression > 1 is for video families only")
        if self.default_flavour is not None and not any(f.name == self.default_flavour for f in self.flavours):
            raise ValueError(f"{self.name}: default_flavour {self.default_flavour!r} is not one of its flavours")

    def flavour_hub_id(self, name: str | None) -> str:
        """The hub id of flavour `name` (None: the default flavour); ConfigError for an unknown flavour or one that
        needs a feature st does not have."""
        if name is None and self.default_flavour is None and self.flavours:
            raise ConfigError(f"{self.name} has no default flavour (SimpleTuner requires model_flavour): set "
                              f"model_flavour to one of {', '.join(f.name for f in self.flavours if not f.needs)}, or "
                              "pretrained_model_name_or_path")  # fmt: skip
        name = self.default_flavour if name is None else name
        flavour = next((f for f in self.flavours if f.name == name), None)
        if flavour is None:
            known = ", ".join(f.name for f in self.flavours) or "none"
            raise ConfigError(f"unknown model_flavour {name!r} for model_family {self.name}; its flavours: {known} "
                              "(or set pretrained_model_name_or_path)")  # fmt: skip
        if flavour.needs:
            # SimpleTuner's default may be a flavour st cannot train yet: refused too, never swapped for another model.
            hint = "" if name != self.default_flavour else (
                f"; it is {self.name}'s default flavour (as in SimpleTuner): set model_flavour to one of "
                f"{', '.join(f.name for f in self.flavours if not f.needs)}, or pretrained_model_name_or_path")
            raise ConfigError(f"{self.name} flavour {name!r} ({flavour.hub_id}) needs {flavour.needs}, not supported "
                              f"yet{hint}")  # fmt: skip
        return flavour.hub_id

    def for_run(self, flavour: str | None, source: str) -> Family:
        """The family that trains `model_flavour` `flavour` of the model at `source` (see `variant`)."""
        return self if self.variant is None else self.variant(flavour, source)

    def load_pipeline_class(self) -> type:
        """The diffusers pipeline class of this family."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        if self.pipeline_setup is not None:
            self.pipeline_setup(cls)
        return cls

    def denoiser_forward(
        self,
        denoiser: Any,
        noisy_latents: Any,
        timesteps: Any,
        text: dict[str, Any],
        meta: Sequence[dict[str, Any]] | None = None,
        guidance: Any = None,
        reference: Any = None,
    ) -> Any:
        """The denoiser's prediction (B x C x h x w, in the denoiser's dtype) for one conditional batch, called as
        the family's diffusers pipeline calls it in its denoising loop (no classifier-free guidance).

        `noisy_latents` are scaled latents (B x C x h x w); `timesteps` are on the 0..1000 training scale (one
        value or one per sample; flow families: sigma * 1000); `text` is `collate_text`'s batch; `meta` the cached
        per-sample metadata (SDXL reads its sizes and crop); `guidance` the Flux guidance value(s); `reference` the
        reference image latents of a family that `takes_reference`. Latents, reference and text embeddings are cast
        to the denoiser's dtype and device.
        """
        import torch

        if noisy_latents.ndim != (5 if self.video else 4) or noisy_latents.shape[1] != self.latent_channels:
            frames = " x f" if self.video else ""
            raise InputError(f"{self.name} needs latents shaped B x {self.latent_channels}{frames} x h x w, got "
                             f"{tuple(noisy_latents.shape)}")  # fmt: skip
        dtype, device = _module_dtype(denoiser), noisy_latents.device
        batch = noisy_latents.shape[0]
        timesteps = torch.as_tensor(timesteps, device=device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise InputError(f"timesteps must be one value or {batch}, got shape {tuple(timesteps.shape)}")
        text = {
            key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
            for key, value in text.items()
        }
        if meta is not None and len(meta) != batch:
            raise InputError(f"meta has {len(meta)} entries for a batch of {batch}")
        if reference is None:
            if self.takes_reference:
                raise InputError(f"{self.name} ({self.pipeline_class}) needs reference image latents")
            return self.predict(denoiser, noisy_latents.to(dtype), timesteps, text, meta, guidance)
        if not self.takes_reference:
            raise InputError(f"{self.name} ({self.pipeline_class}) takes no reference image")
        reference = reference.to(device=device, dtype=dtype)
        return self.predict(denoiser, noisy_latents.to(dtype), timesteps, text, meta, guidance, reference=reference)

    def lora_target_modules(self, preset: str | None = None, denoiser: Any = None) -> tuple[str, ...]:
        """Module names for `LoraConfig(target_modules=...)`: the family default, or a named preset where the family
        has presets (Flux's `flux_lora_target`; other families ignore `preset`, as SimpleTuner does). With
        `denoiser`, every name must match one of its modules (peft's rule: the name or a `.`-suffix of it)."""
        presets = dict(self.lora_presets)
        if preset is None or not presets:
            targets = self.lora_targets
        elif preset in presets:
            targets = presets[preset]
        else:
            raise ConfigError(f"unknown {self.name} LoRA target preset {preset!r}; choose from {', '.join(presets)}")
        if denoiser is not None:
            names = [name for name, _ in denoiser.named_modules()]
            missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
            if missing:
                raise ConfigError(
                    f"LoRA target module(s) {', '.join(missing)} match no module of the {type(denoiser).__name__}"
                )
        return tuple(targets)

    def add_lora(self, denoiser: Any, config: Any, adapter_name: str = "default") -> Any:
        """Add a peft LoRA adapter to `denoiser` in place; see `lora.add_adapter`."""
        return lora.add_adapter(denoiser, config, adapter_name)

    def save_lora(self, out_dir: str | Path, state_dict: dict[str, Any], config: Any = None) -> Path:
        """Write this family's LoRA file in `out_dir`; see `lora.save_weights`."""
        return lora.save_weights(self, out_dir, state_dict, config)

    def load_lora_into_pipeline(self, pipe: Any, path: str | Path, adapter_name: str | None = None) -> None:
        """Load a LoRA written by `save_lora` into `pipe`'s denoiser; see `lora.load_weights`."""
        lora.load_weights(self, pipe, path, adapter_name)


def _module_dtype(module: Any) -> Any:
    """A model's compute dtype: its first floating parameter's. (diffusers' `.dtype` walks every submodule, which costs
    milliseconds per training step on large models.)"""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return getattr(module, "dtype", None)
