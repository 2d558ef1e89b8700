"""`controlnet: true`: a ControlNet trained beside the frozen base denoiser (SimpleTuner's ControlNet training).

The ControlNet is built from the base denoiser's weights (`ControlNetModel.from_unet`, `FluxControlNetModel.
from_transformer`, shaped by `controlnet_custom_config`) or loaded from `controlnet_model_name_or_path`, before the
base is quantised. The trainer then holds base + ControlNet as one module (`wrap`) as its model: only the
ControlNet's parameters train, checkpoints hold only them, and `final/controlnet/` is a diffusers ControlNet folder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from ..cache_reader import COND
from ..datasets import MASK_TYPES
from ..errors import ConfigError, InputError
from ..families import Family
from ..families.controlnet import ControlNetSpec, spec_for
from ..log import get_logger
from ..tensorfile import normalise_file
from . import controlnet_adapter
from .data import image_paired_datasets
from .seeding import isolated_rng

log = get_logger("train")

FOLDER = "controlnet"  # final/controlnet/: config.json + diffusion_pytorch_model.safetensors


def check(config, family: Family, cache_manifest: dict[str, Any]) -> None:
    """Refuse, before any model loads, what a ControlNet run cannot do: another family, a LoRA on the ControlNet,
    options that train something else, and a cache without conditioning images."""
    spec_for(family)
    if config.model_type == "lora":
        controlnet_adapter.check(config)
    if config.train_text_encoder:
        raise ConfigError("train_text_encoder cannot be combined with controlnet: true (the base model stays "
                          "frozen); set one of them to false")  # fmt: skip
    if config.control:
        raise ConfigError("controlnet and control are two kinds of conditioning training; set one of them")
    paired, unpaired = image_paired_datasets(cache_manifest)
    if paired and unpaired:
        raise InputError(f"controlnet: true needs a conditioning image for every training sample, and dataset(s) "
                         f"{', '.join(unpaired)} have none (only masks, or no conditioning_data): pair them with a "
                         "`\"dataset_type\": \"conditioning\"` dataset, mark them `\"dataset_type\": \"eval\"`, or "
                         "remove them from the dataset list; then re-run `st prepare` and `st cache`")  # fmt: skip
    if not paired:
        raise InputError("controlnet: true needs conditioning images, and this cache has none: add "
                         "`\"conditioning_data\": \"<id>\"` to the image dataset of the dataset list, with a "
                         "`\"dataset_type\": \"conditioning\"` dataset of that id (or a `conditioning` generator such "
                         "as canny), then re-run `st prepare` and `st cache`")  # fmt: skip


def _custom_config(config, base_dir: Path | None) -> dict[str, Any] | None:
    """`controlnet_custom_config`: a JSON object, JSON text, or a JSON file path (relative to the working folder, then
    the config's)."""
    value = config.controlnet_custom_config
    if value is None or value == "" or isinstance(value, dict):
        return value or None
    text = str(value).strip()
    if not text.startswith("{"):
        candidates = [Path(text)] + ([base_dir / text] if base_dir is not None else [])
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ConfigError(f"controlnet_custom_config {text!r} is neither a JSON object nor a JSON file")
        text = found.read_text(encoding="utf-8")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"controlnet_custom_config is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ConfigError("controlnet_custom_config must be a JSON object of the ControlNet builder's keywords")
    return parsed


def load_controlnet(spec: ControlNetSpec, name_or_path: str, base_dir: Path | None) -> Any:
    """A ControlNet from a local diffusers folder (working folder, then the config's) or a hub id."""
    from ..families.hub import hub_errors, hub_problem, looks_like_path

    path = Path(name_or_path).expanduser()
    if not path.exists() and not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if not path.exists() and looks_like_path(name_or_path):
        raise InputError(f"controlnet_model_name_or_path {name_or_path!r}: no such folder")
    source = str(path) if path.exists() else name_or_path
    try:
        controlnet = spec.load_class().from_pretrained(source)
    except hub_errors() as exc:
        raise InputError(f"controlnet_model_name_or_path {name_or_path!r}: could not load a {spec.model_class}: "
                         f"{hub_problem(exc) if not path.exists() else exc}") from None  # fmt: skip
    log.info("controlnet: starting from %s", source)
    return controlnet


@functools.cache
def _module_class():
    """The `torch.nn.Module` holding the frozen base (`denoiser`) and the ControlNet (`controlnet`); its forward is the
    family's ControlNet + denoiser call. (Built on first use so that importing this module does not import torch.)"""
    import torch

    class _Controlled(torch.nn.Module):
        def __init__(self, denoiser, controlnet, spec: ControlNetSpec) -> None:
            super().__init__()
            self.denoiser = denoiser  # registered first: its dtype is the model's compute dtype
            self.controlnet = controlnet
            self.spec = spec

        @property
        def config(self):
            return self.denoiser.config

        def forward(self, latents, timesteps, text, meta, guidance, control):
            return self.spec.predict(self.denoiser, self.controlnet, latents, timesteps, text, meta, guidance, control)

    return _Controlled


def start(config, family: Family, denoiser, *, source: str, vae_source: str | None, base_dir: Path | None,
          seed: int) -> "ControlNetTraining":
    """The run's ControlNet, built from (or beside) `denoiser` while its weights are still unquantised."""
    from ..families.limits import vae_scale_factor

    training = ControlNetTraining(config, family, vae_scale=vae_scale_factor(family, source, vae_source),
                                  base_dir=base_dir, seed=seed)  # fmt: skip
    if training.spec.pipeline_latents is not None:
        training.vae_factors = _vae_factors(family, source, vae_source)
    training.build(denoiser)
    return training


@dataclasses.dataclass
class ValidationControl:
    """What validation renders with: the family's ControlNet pipeline class, the live base and ControlNet, the
    pipeline's keyword for the conditioning image, and the conditioning images (prompt i uses image i modulo their
    number). `extra`: more images by pipeline keyword, paired with `images` (Wan FLF2V's `last_image`)."""

    pipeline_class: str
    denoiser: Any
    controlnet: Any
    argument: str
    images: list[Any]
    extra: dict[str, list[Any]] = dataclasses.field(default_factory=dict)

    def image_for(self, i: int) -> Any:
        return self.images[i % len(self.images)]


class ControlNetTraining:
    """The ControlNet of one run: built before the base is quantised, then wrapped with it (`wrap`)."""

    def __init__(self, config, family: Family, *, vae_scale: int, base_dir: Path | None, seed: int) -> None:
        self.config, self.family = config, family
        self.spec = spec_for(family)
        self.vae_scale, self.base_dir, self.seed = vae_scale, base_dir, seed
        self.vae_factors = (0.0, 1.0)  # (shift, scale): see ControlNetSpec.pipeline_latents
        self.controlnet = None

    def build(self, denoiser) -> None:
        """Create (seeded: the conditioning embedding's first layers start random) or load the ControlNet."""
        config = self.config
        if config.controlnet_model_name_or_path:
            if config.controlnet_custom_config:
                log.warning("controlnet_custom_config shapes a new ControlNet; controlnet_model_name_or_path's "
                            "config is used as it is")  # fmt: skip
            self.controlnet = load_controlnet(self.spec, config.controlnet_model_name_or_path, self.base_dir)
        else:
            with isolated_rng(seed=self.seed):
                self.controlnet = self.spec.build(denoiser, self.vae_scale, _custom_config(config, self.base_dir))
        if config.model_type == "lora":  # an adapter on the ControlNet (pipeline.train.controlnet_adapter)
            controlnet_adapter.attach(self.controlnet, self.spec, config, self.seed)
        else:
            self.controlnet.requires_grad_(True)
        denoiser.requires_grad_(False)
        log.info("controlnet: %s with %.1fM trainable parameters%s", type(self.controlnet).__name__,
                 sum(p.numel() for p in self.controlnet.parameters() if p.requires_grad) / 1e6,
                 f" ({self.spec.adapter})" if config.model_type == "lora" else "")  # fmt: skip

    def wrap(self, denoiser, device, dtype: str = "float32") -> tuple[Any, list[Any]]:
        """The trainer's model (base + ControlNet on `device`) and the trainable parameters, held in `dtype` (the
        torch dtype name of `quantise.adapter_dtype`: bf16 under mixed_precision bf16, as SimpleTuner moves the
        ControlNet to its weight_dtype). Its frozen weights follow, so the ControlNet computes in one dtype."""
        import torch

        controlnet = self.controlnet
        if self.config.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        params = [p for p in controlnet.parameters() if p.requires_grad]
        controlnet.to(getattr(torch, dtype))
        _stream_controlnet(controlnet, self.config, device)
        controlnet.to(device)
        controlnet.train()
        return _module_class()(denoiser, controlnet, self.spec), params

    # ---------------------------------------------------------------------------------------------- steps

    def control_input(self, batch) -> Any:
        """The batch's conditioning as the ControlNet takes it (image pixels in [0, 1], or VAE latents)."""
        pixels_kind = self.family.control_input == "pixels"
        value = None if batch is None else (batch.control_pixels if pixels_kind else batch.control_latents)
        if value is None:
            raise InputError(f"a training batch (dataset {getattr(batch, 'dataset_id', '?')!r}) has no conditioning "
                             f"{self.family.control_input}: every dataset a ControlNet trains on needs "
                             "conditioning_data; re-run `st prepare` and `st cache` after linking one")  # fmt: skip
        if pixels_kind:
            return (value.float() + 1) / 2
        adjust = self.spec.pipeline_latents
        return value.float() if adjust is None else adjust(value.float(), self.controlnet, *self.vae_factors)

    def predict(self, model, noisy, timesteps, text: dict[str, Any], meta, guidance, batch) -> Any:
        """The base's prediction with the ControlNet's residuals, through the family's checks and casts
        (`Family.denoiser_forward`), calling `model` itself (so a data-parallel wrapper sees the call)."""
        control = self.control_input(batch).to(noisy.device)

        def call(wrapped, latents, timesteps, text, meta, guidance):
            return wrapped(latents, timesteps, text, meta, guidance, control)

        family = dataclasses.replace(self.family, predict=call)
        return family.denoiser_forward(model, noisy, timesteps, text, meta, guidance=guidance)

    # ------------------------------------------------------------------------------------------ validation

    def for_validation(self, model, index, count: int) -> ValidationControl:
        """The validation set-up for the trainer's (unwrapped) model and `count` prompts."""
        return ValidationControl(self.spec.pipeline_class, model.denoiser, model.controlnet, self.spec.control_argument,
                                 self.validation_images(index, max(1, count)))  # fmt: skip

    def validation_images(self, index, count: int) -> list[Any]:
        """The conditioning images (PIL) of the first `count` cached samples that have one, in key order: validation
        prompt i renders with image i modulo their number."""
        from PIL import Image

        from .data import SampleReader

        reader = SampleReader()
        images = []
        try:
            for key in sorted(index.samples):
                ref = index.samples[key]
                if COND not in ref.members:
                    continue
                pixels, _ = read_conditioning(reader, ref)
                array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
                images.append(Image.fromarray(array))
                if len(images) >= count:
                    break
        finally:
            reader.close()
        if not images:
            raise InputError("controlnet validation needs a cached conditioning image and the cache has none; re-run "
                             "`st cache` after linking conditioning_data")  # fmt: skip
        return images


def _vae_factors(family: Family, source: str, vae_source: str | None) -> tuple[float, float]:
    """(shift, scale) of the VAE from its config (read without loading weights)."""
    folder = Path(vae_source) if vae_source else Path(source) / family.vae.subfolder
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
    else:
        args = {} if vae_source else {"subfolder": family.vae.subfolder}
        config = family.vae.load_class().load_config(vae_source or source, **args)
    return float(config.get("shift_factor") or 0.0), float(config.get("scaling_factor") or 1.0)


def read_conditioning(reader, ref) -> tuple[Any, Any]:
    """A sample's first non-mask conditioning: pixels (3 x H x W float in [-1, 1]) and latents (or None), from its
    `cond.safetensors.zst` member."""
    if COND not in ref.members:
        raise InputError(f"cached sample {ref.key} has no conditioning image; re-run `st cache` after linking "
                         "conditioning_data")  # fmt: skip
    tensors = reader.tensors(ref, COND)
    kinds = [c.get("kind", "controlnet") for c in ref.meta.get("conditioning") or [{}]]
    i = next((n for n, kind in enumerate(kinds) if kind not in MASK_TYPES), None)
    if i is None or f"{i}.pixels" not in tensors:
        raise InputError(f"cached sample {ref.key} has only mask conditioning; a ControlNet needs an image")
    pixels = tensors[f"{i}.pixels"].float() / 127.5 - 1
    latent = tensors.get(f"{i}.latent")
    return pixels, None if latent is None else latent.float()


def _stream_controlnet(controlnet, config, device) -> None:
    """ramtorch_controlnet (read only with ramtorch, as in SimpleTuner): the ControlNet's Linear layers streamed from
    host memory, trainable ones included (`ramtorch_layers.stream_controlnet`). The one call site."""
    if not (config.ramtorch and config.ramtorch_controlnet):
        return
    from ..ramtorch_layers import parse_targets, stream_controlnet

    stream_controlnet(controlnet, parse_targets(config.ramtorch_target_modules), device)


def trainable_state(model) -> dict[str, Any]:
    """What a checkpoint stores: the ControlNet's weights (or its adapter's), under the trainer model's parameter
    names."""
    if controlnet_adapter.has_adapter(model.controlnet):
        return controlnet_adapter.trainable_state(model.controlnet)
    return {f"controlnet.{k}": v for k, v in model.controlnet.state_dict().items()}


def save_final(model, out_dir: Path) -> list[Path]:
    """final/controlnet/: the trained ControlNet as a diffusers folder (`<Class>.from_pretrained` loads it); with an
    adapter, the ControlNet with the adapter merged, and the adapter alone beside the folder."""
    target = out_dir / FOLDER
    extra = []
    controlnet = model.controlnet
    if controlnet_adapter.has_adapter(controlnet):
        extra.append(controlnet_adapter.save_adapter(controlnet, out_dir))
        controlnet = controlnet_adapter.merged(controlnet)
    controlnet.save_pretrained(target, safe_serialization=True)
    for weights in target.rglob("*.safetensors"):
        normalise_file(weights)
    return sorted(p for p in target.rglob("*") if p.is_file()) + extra
