"""Loading a family's components (VAE, text encoders and tokenizers, denoiser, scheduler) from a diffusers folder,
a hub id or a single-file checkpoint, with the VAE and the T5 encoder optionally taken from other sources."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputError, NotSupportedError
from pipeline.families.hub import hub_errors, hub_offline, hub_problem, looks_like_path
from pipeline.families.pixel_space import is_pixel_space
from pipeline.families.sources import component_origin, fallback_source, unreachable_fallback
from pipeline.families.sources import has_component as _has_component
from pipeline.families.spec import Component, Family, TextEncoderSpec

COMPONENT_KINDS = ("vae", "text_encoders", "denoiser", "scheduler")


def load_components(
    family: Family,
    source: str | Path,
    *,
    vae_source: str | Path | None = None,
    t5_source: str | Path | None = None,
    revision: str | None = None,
    variant: str | None = None,
    dtype: Any = None,
    which: Sequence[str] = ("vae", "text_encoders"),
    config: str | Path | None = None,
    quantization_config: Any = None,
) -> dict[str, Any]:
    """Load the parts of a model named in `which` ("vae", "text_encoders", "denoiser", "scheduler").

    `source` is a local diffusers folder, a hub id (`org/name`, needs the network or the local cache), or a single
    `.safetensors` checkpoint (through the pipeline's `from_single_file`, with `config` a local diffusers folder
    that gives the component configs). `vae_source` and `t5_source` replace the VAE and the T5 encoder (and its
    tokenizer where the folder has one). `quantization_config` (a diffusers one) quantises the denoiser while it
    loads. Returns a dict with the keys "vae", "denoiser", "scheduler" (one object
    each) and "text_encoders" and "tokenizers" (tuples in the family's order), for the kinds asked for.
    """
    which = tuple(which)
    unknown = [w for w in which if w not in COMPONENT_KINDS]
    if unknown:
        raise ConfigError(f"unknown component kind(s) {unknown}; choose from {', '.join(COMPONENT_KINDS)}")
    if t5_source is not None and _t5_spec(family) is None:
        raise NotSupportedError(f"t5_source is set but {family.name} has no T5 text encoder")
    source_text = str(source)
    path = Path(source_text).expanduser()
    opts = {"revision": revision, "variant": variant, "dtype": dtype, "local_files_only": False,
            "quantization_config": quantization_config}  # fmt: skip

    if path.is_file():
        if quantization_config is not None:
            raise NotSupportedError(f"quantising while loading (quantize_via pipeline, nf4-bnb, int4-torchao, "
                                    f"quantization_config) needs a diffusers folder, not the single file {path.name}")  # fmt: skip
        loaded = _load_single_file(family, path, config=config, dtype=dtype, which=which)
    elif path.is_dir():
        missing = []
        for name in _required_subfolders(family, which):
            component = _component_by_subfolder(family, name)
            if vae_source is not None and component == family.vae:
                continue
            if t5_source is not None and _is_t5_part(family, component):
                continue
            if fallback_source(family, component) is not None:
                continue  # read from the family's source when absent (`_load_text_part`)
            if not _has_component(path / name, component):
                missing.append(name)
        if missing:
            raise InputError(
                f"the {family.name} folder {source_text!r} lacks the component subfolder(s) {', '.join(missing)} "
                f"(each needs its config and weights, as written by {family.pipeline_class}.save_pretrained)"
            )
        loaded = _load_from(family, str(path), which, opts, vae_source is not None, t5_source is not None)
    elif looks_like_path(source_text):
        raise InputError(f"the model path {source_text!r} does not exist")
    else:
        opts["local_files_only"] = hub_offline()
        try:
            loaded = _load_from(family, source_text, which, opts, vae_source is not None, t5_source is not None)
        except hub_errors() as error:
            raise _hub_error(family, source_text, "the model", error) from error

    if vae_source is not None and "vae" in which:
        loaded["vae"] = _load_override(family, family.vae, vae_source, "vae_source", opts)
    if t5_source is not None and "text_encoders" in which:
        loaded = _apply_t5_source(family, loaded, source_text, t5_source, opts)
    return loaded


def vae_factors(vae: Any) -> tuple[float, float | None]:
    """`(scaling_factor, shift_factor or None)` from the VAE's config: latents = (encode(x) - shift) * scale.
    A VAE normalised per channel (`latent_normalisation`) has none: (1.0, None), as SimpleTuner's Qwen-Image."""
    scaling = vae.config.get("scaling_factor")
    if scaling is None and (latent_normalisation(vae) is not None or patch_batch_norm(vae) is not None):
        return 1.0, None
    if scaling is None:
        raise InputError(f"the VAE config ({type(vae).__name__}) has no scaling_factor")
    shift = vae.config.get("shift_factor")
    return float(scaling), (None if shift is None else float(shift))


def latent_normalisation(vae: Any) -> tuple[list[float], list[float]] | None:
    """Per-channel `(latents_mean, latents_std)` of a VAE whose pipeline normalises each latent channel (Qwen-Image's
    3-D VAE): latents = (encode(x) - mean[c]) / std[c]. None for VAEs with a scalar scaling factor."""
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is None or std is None:
        return None
    return [float(v) for v in mean], [float(v) for v in std]


def patch_batch_norm(vae: Any) -> tuple[Any, Any] | None:
    """`(mean, std)` (1 x 4C x 1 x 1) of a VAE whose pipeline normalises 2x2 patches of its latents by a BatchNorm's
    running statistics (FLUX.2's AutoencoderKLFlux2); None for other VAEs. Its pipeline and SimpleTuner encode with
    the latent distribution's mode, and so does `st cache`."""
    bn = getattr(vae, "bn", None)
    if bn is None or "batch_norm_eps" not in vae.config:
        return None
    import torch

    mean = bn.running_mean.detach().float().view(1, -1, 1, 1)
    return mean, torch.sqrt(bn.running_var.detach().float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)


def _buffer_normalisation(vae: Any) -> tuple[Any, Any] | None:
    """Per-channel `(latents_mean, latents_std)` a video VAE keeps as buffers rather than config (LTX-Video's)."""
    mean, std = getattr(vae, "latents_mean", None), getattr(vae, "latents_std", None)
    if mean is None or std is None or not hasattr(mean, "detach"):
        return None
    return mean.detach().float(), std.detach().float()


def is_video_vae(vae: Any) -> bool:
    """Whether `vae` is a 3-D (video) VAE taking B x C x T x H x W (Qwen-Image's): st feeds it images as one frame
    and caches its latents without the time axis, B x C x h x w like every other family's."""
    return "temperal_downsample" in vae.config


def vae_input(vae: Any, pixels: Any, video: bool = False) -> Any:
    """B x 3 x H x W images as `vae.encode` takes them (a 3-D VAE, or any VAE of a `video` family: one frame,
    B x 3 x 1 x H x W); clips (B x 3 x F x H x W) pass as they are."""
    return pixels.unsqueeze(2) if (video or is_video_vae(vae)) and pixels.ndim == 4 else pixels


def scaled_latents(vae: Any, sample: Any, video: bool = False) -> Any:
    """A latent sample of `vae` as st caches it, normalised per channel or shifted and scaled, as the family's
    pipeline undoes it before decoding. Image families: B x C x h x w (a 3-D VAE's time axis of one frame dropped);
    a `video` family keeps the time axis, B x C x f x h x w (an image is one frame)."""
    if sample.ndim == 5 and not video:
        sample = sample.squeeze(2)
    channel_shape = (1, -1, *([1] * (sample.ndim - 2)))
    stats = latent_normalisation(vae)
    if stats is not None:
        import torch

        mean, std = (torch.tensor(v, dtype=sample.dtype, device=sample.device).view(channel_shape) for v in stats)
        return (sample - mean) / std
    buffers = _buffer_normalisation(vae) if video else None
    if buffers is not None:  # LTX-Video: (z - mean) * scaling_factor / std, its pipeline's `_normalize_latents`
        mean, std = (v.to(sample.device, sample.dtype).view(channel_shape) for v in buffers)
        return (sample - mean) * float(vae.config.get("scaling_factor") or 1.0) / std
    patch_stats = patch_batch_norm(vae)
    if patch_stats is not None:  # normalised as 2x2 patches, cached in the VAE's own layout (see families/flux2.py)
        from pipeline.families.flux2 import patchify, unpatchify

        mean, std = (v.to(sample.device, sample.dtype) for v in patch_stats)
        return unpatchify((patchify(sample) - mean) / std)
    scale, shift = vae_factors(vae)
    return (sample if shift is None else sample - shift) * scale


def _load_from(
    family: Family, source: str, which: Sequence[str], opts: dict[str, Any], skip_vae: bool, skip_t5: bool
) -> dict[str, Any]:
    loaded: dict[str, Any] = {}
    try:
        if "vae" in which and not skip_vae:
            loaded["vae"] = _load(family.vae, source, family.vae.subfolder, opts)
        if "denoiser" in which:
            loaded["denoiser"] = _load(family.denoiser, source, family.denoiser.subfolder, opts)
        if "scheduler" in which:
            loaded["scheduler"] = _load(family.scheduler, source, family.scheduler.subfolder, opts)
        if "text_encoders" in which:
            encoders, tokenizers = [], []
            for spec in family.text_encoders:
                if skip_t5 and spec.kind == "t5":
                    encoders.append(None)
                    tokenizers.append(None)
                    continue
                encoders.append(_load_text_part(family, spec.model, source, opts))
                tokenizers.append(_load_text_part(family, spec.tokenizer, source, opts))
            loaded["text_encoders"], loaded["tokenizers"] = tuple(encoders), tuple(tokenizers)
    except hub_errors() as error:
        if Path(source).is_dir():
            raise InputError(f"could not load {family.name} components from {source!r}: {error}") from error
        raise
    return loaded


def _load_text_part(family: Family, component: Component, source: str, opts: dict[str, Any]) -> Any:
    """A text encoder or tokenizer from the model, or from the family's source for it when the model lacks it."""
    origin = component_origin(family, source, component, opts.get("revision"))
    if not origin.fallback:
        return _load(component, source, component.subfolder, opts)
    fallback_opts = {**opts, "revision": None, "variant": None, "local_files_only": hub_offline()}
    try:
        return _load(component, origin.source, origin.subfolder, fallback_opts)
    except hub_errors() as error:
        raise unreachable_fallback(family, source, origin, error) from error


def load_denoiser(family: Family, source: str, subfolder: str | None, *, revision: str | None = None,
                  variant: str | None = None, dtype: Any = None, quantization_config: Any = None) -> Any:  # fmt: skip
    """The family's denoiser class loaded from `source` / `subfolder` (None: `source` itself), a folder or hub id:
    the denoiser of SimpleTuner's `pretrained_unet_*` / `pretrained_transformer_*` options (`identity.denoiser_source`)."""
    path = Path(source).expanduser()
    local = path.is_dir()
    if not local and looks_like_path(source):
        raise InputError(f"the denoiser path {source!r} does not exist")
    folder = path / subfolder if subfolder else path
    if local and not _has_component(folder, family.denoiser):
        raise InputError(f"{folder} holds no {family.denoiser.class_name} (its config.json and weights); check the "
                         "denoiser path and its subfolder option (\"none\": the folder itself)")  # fmt: skip
    opts = {"revision": revision, "variant": variant, "dtype": dtype, "quantization_config": quantization_config,
            "local_files_only": False if local else hub_offline()}  # fmt: skip
    try:
        return _load(family.denoiser, source, subfolder, opts)
    except hub_errors() as error:
        raise _hub_error(family, source, "the denoiser", error) from error


def _load_single_file(
    family: Family, path: Path, *, config: str | Path | None, dtype: Any, which: Sequence[str]
) -> dict[str, Any]:
    if not family.single_file:
        raise NotSupportedError(
            f"{family.name} cannot be loaded from a single-file checkpoint ({path.name}); convert it to a diffusers "
            "folder and set pretrained_model_name_or_path to that folder"
        )
    if path.suffix != ".safetensors":
        raise InputError(f"single-file checkpoints must be .safetensors files, got {path.name}")
    cls = family.load_pipeline_class()
    kwargs: dict[str, Any] = {}
    if config is not None:
        if not Path(config).is_dir():
            raise InputError(f"the single-file config {str(config)!r} is not a local diffusers folder")
        kwargs["config"] = str(config)
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if hub_offline():
        kwargs["local_files_only"] = True
    try:
        from diffusers.loaders.single_file_utils import SingleFileComponentError
    except ImportError:  # pragma: no cover - older diffusers
        SingleFileComponentError = ValueError
    try:
        pipe = cls.from_single_file(str(path), **kwargs)
    except (*hub_errors(), SingleFileComponentError, ValueError, KeyError) as error:
        raise InputError(
            f"could not load the single-file checkpoint {str(path)!r} as {family.pipeline_class}: {str(error).strip()}. Pass a "
            "local diffusers folder of the same model as its config, or convert the checkpoint to a diffusers folder"
        ) from error
    loaded: dict[str, Any] = {}
    if "vae" in which:
        loaded["vae"] = getattr(pipe, family.vae.subfolder)
    if "denoiser" in which:
        loaded["denoiser"] = getattr(pipe, family.denoiser.subfolder)
    if "scheduler" in which:
        loaded["scheduler"] = getattr(pipe, family.scheduler.subfolder)
    if "text_encoders" in which:
        loaded["text_encoders"] = tuple(getattr(pipe, s.model.subfolder) for s in family.text_encoders)
        loaded["tokenizers"] = tuple(getattr(pipe, s.tokenizer.subfolder) for s in family.text_encoders)
    return loaded


def _load_override(family: Family, component: Component, source: str | Path, label: str, opts: dict) -> Any:
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        if not hasattr(component.load_class(), "from_single_file"):
            raise NotSupportedError(f"{label}: {component.class_name} cannot load a single-file checkpoint")
        try:
            kwargs = {"torch_dtype": opts["dtype"]} if opts.get("dtype") is not None else {}
            return component.load_class().from_single_file(text, **kwargs)
        except hub_errors() as error:
            raise InputError(f"could not load {label} {text!r}: {error}") from error
    if path.is_dir():
        subfolder = _override_layout(path, component, label)
        try:
            return _load(component, str(path), subfolder, {**opts, "local_files_only": False})
        except hub_errors() as error:
            raise InputError(f"could not load {label} {text!r}: {error}") from error
    if looks_like_path(text):
        raise InputError(f"{label} {text!r} does not exist")
    hub_opts = {**opts, "local_files_only": hub_offline()}
    try:  # a hub repository: the component at its root, else in the family's subfolder
        try:
            return _load(component, text, None, hub_opts)
        except hub_errors():
            return _load(component, text, component.subfolder, hub_opts)
    except hub_errors() as error:
        raise _hub_error(family, text, label, error) from error


def _apply_t5_source(
    family: Family, loaded: dict[str, Any], source: str, t5_source: str | Path, opts: dict
) -> dict[str, Any]:
    """Swap in the T5 encoder of `t5_source`, with its tokenizer, or else the model's own T5 tokenizer."""
    spec = _t5_spec(family)
    assert spec is not None
    index = family.text_encoders.index(spec)
    encoders, tokenizers = list(loaded["text_encoders"]), list(loaded["tokenizers"])
    encoders[index] = _load_override(family, spec.model, t5_source, "t5_source", opts)
    path = Path(str(t5_source)).expanduser()
    has_tokenizer = not path.exists() or (
        path.is_dir()
        and any(
            _has_component(folder, spec.tokenizer) and _config_matches(folder, spec.tokenizer)
            for folder in [path, *(p for p in path.iterdir() if p.is_dir())]
        )
    )
    if has_tokenizer:
        tokenizers[index] = _load_override(family, spec.tokenizer, t5_source, "t5_source", opts)
    elif Path(source).is_dir() and _has_component(Path(source) / spec.tokenizer.subfolder, spec.tokenizer):
        tokenizers[index] = _load(spec.tokenizer, source, spec.tokenizer.subfolder, opts)
    else:
        raise InputError(
            f"t5_source {str(t5_source)!r} has no tokenizer files and {source!r} has no {spec.tokenizer.subfolder}/"
        )
    loaded["text_encoders"], loaded["tokenizers"] = tuple(encoders), tuple(tokenizers)
    return loaded


def _load(component: Component, source: str, subfolder: str | None, kwargs: dict[str, Any]) -> Any:
    cls = component.load_class()
    args: dict[str, Any] = {}
    if subfolder:
        args["subfolder"] = subfolder
    if kwargs.get("revision") is not None:
        args["revision"] = kwargs["revision"]
    if kwargs.get("local_files_only"):
        args["local_files_only"] = True
    is_model = not (component.class_name.endswith(("Tokenizer", "TokenizerFast", "Scheduler")))
    if is_model and kwargs.get("variant") is not None:
        args["variant"] = kwargs["variant"]
    if is_model and kwargs.get("dtype") is not None:
        args["dtype" if component.library == "transformers" else "torch_dtype"] = kwargs["dtype"]
    if kwargs.get("quantization_config") is not None and component.subfolder in ("unet", "transformer"):
        args["quantization_config"] = kwargs["quantization_config"]
    if component.class_name.endswith("Scheduler"):
        # Folders may carry another scheduler than the family's usual one: load the class the config names.
        import diffusers

        config = cls.load_config(source, **args)
        cls = getattr(diffusers, config.get("_class_name", component.class_name), cls)
        return cls.from_config(config)
    return cls.from_pretrained(source, **args)


def _hub_error(family: Family, source: str, what: str, error: BaseException) -> InputError:
    layout = ", ".join(_required_subfolders(family, COMPONENT_KINDS))
    return InputError(
        f"could not load {what} of {family.name} from the Hugging Face hub id {source!r}: {hub_problem(error)}. "
        "Download the model where there is network and set pretrained_model_name_or_path to that local diffusers "
        f"folder (with model_index.json and the subfolders {layout})."
    )


def _required_subfolders(family: Family, which: Sequence[str]) -> list[str]:
    names: list[str] = []
    if "vae" in which and not is_pixel_space(family):  # a pixel-space family's "VAE" has no folder
        names.append(family.vae.subfolder)
    if "denoiser" in which:
        names.append(family.denoiser.subfolder)
    if "text_encoders" in which:
        for spec in family.text_encoders:
            names += [spec.model.subfolder, spec.tokenizer.subfolder]
    if "scheduler" in which:
        names.append(family.scheduler.subfolder)
    return names


def _component_by_subfolder(family: Family, subfolder: str) -> Component:
    parts = [family.vae, family.denoiser, family.scheduler]
    for spec in family.text_encoders:
        parts += [spec.model, spec.tokenizer]
    return next(c for c in parts if c.subfolder == subfolder)


def _t5_spec(family: Family) -> TextEncoderSpec | None:
    return next((spec for spec in family.text_encoders if spec.kind == "t5"), None)


def _is_t5_part(family: Family, component: Component) -> bool:
    spec = _t5_spec(family)
    return spec is not None and component in (spec.model, spec.tokenizer)


def _config_matches(folder: Path, component: Component) -> bool:
    """Whether the config in `folder` is for `component`'s kind of model (a T5 and a CLIP both have config.json)."""
    name = component.class_name
    try:
        if name.endswith(("Tokenizer", "TokenizerFast")):
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            stem = name.removesuffix("Fast").removesuffix("Tokenizer")
            return str(config.get("tokenizer_class") or stem).startswith(stem)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _has_component(folder, component)
    if component.library == "diffusers":
        return config.get("_class_name", name) == name
    if name in (config.get("architectures") or []):
        return True
    model_type = str(config.get("model_type", "")).replace("_", "")
    return bool(model_type) and name.lower().startswith(model_type)


def _override_layout(path: Path, component: Component, label: str) -> str | None:
    """The subfolder of an override source (`vae_source`, `t5_source`) that holds `component`: the folder itself,
    the family's subfolder, or any subfolder (a diffusers folder of another family)."""
    candidates = [None, component.subfolder]
    candidates += sorted(p.name for p in path.iterdir() if p.is_dir() and p.name != component.subfolder)
    for sub in candidates:
        folder = path / sub if sub else path
        if _has_component(folder, component) and _config_matches(folder, component):
            return sub
    raise InputError(
        f"{label} {str(path)!r} holds no {component.class_name}: expected its files at the top of the folder or "
        f"in a subfolder such as {component.subfolder}/"
    )
