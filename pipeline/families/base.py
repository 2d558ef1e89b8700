"""What a model family is (its components and conventions) and the generic helpers that load and identify them."""

from __future__ import annotations

import importlib
import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputError, NotSupportedError
from pipeline.hashing import sha256_bytes, sha256_file, sha256_json
from pipeline.log import get_logger

log = get_logger("families")

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_matching")
COMPONENT_KINDS = ("vae", "text_encoders", "denoiser", "scheduler")

# Config keys that say which library version or path wrote a config, not what the model is.
_VOLATILE_CONFIG_KEYS = ("_diffusers_version", "transformers_version", "_name_or_path", "_commit_hash")
_CONFIG_FILES = ("config.json", "scheduler_config.json", "tokenizer_config.json", "preprocessor_config.json")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".json", ".txt", ".model")
_SAMPLE_WINDOWS = 64
_SAMPLE_BYTES = 1 << 16
_FULL_HASH_LIMIT = 16 << 20


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
    """A text encoder, its tokenizer and the token length the family's pipeline pads to by default."""

    model: Component
    tokenizer: Component
    max_length: int
    kind: str  # "clip" or "t5"


@dataclass(frozen=True)
class Family:
    """A text-to-image model family: its diffusers layout and the conventions training must follow.

    `bucket_alignment` is in pixels. `trims_text` says whether `encode_prompts` stores prompt embeddings trimmed to
    the real token count (lossless only because the denoiser masks padded positions; `collate_text` pads them back
    with zeros and mask 0). `single_file` says whether the pipeline class can load single-file checkpoints.
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
    single_file: bool = True
    trims_text: bool = False
    predict: Callable[..., Any] | None = None
    lora_presets: tuple[tuple[str, tuple[str, ...]], ...] = ()
    default_flow_shift: float | None = None
    lora_loader: bool = True

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"{self.name}: unknown prediction_type {self.prediction_type!r}")
        if self.bucket_alignment < 16:
            raise ValueError(f"{self.name}: bucket_alignment must be at least 16")

    def load_pipeline_class(self) -> type:
        """The diffusers pipeline class of this family."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    # ------------------------------------------------------------------------------------------------ training

    def denoiser_forward(
        self,
        denoiser: Any,
        noisy_latents: Any,
        timesteps: Any,
        text: dict[str, Any],
        meta: Sequence[dict[str, Any]] | None = None,
        guidance: Any = None,
    ) -> Any:
        """The denoiser's prediction (B x C x h x w, in the denoiser's dtype) for one conditional batch, called as
        the family's diffusers pipeline calls it in its denoising loop (no classifier-free guidance).

        `noisy_latents` are scaled latents (B x C x h x w); `timesteps` are on the 0..1000 training scale (one
        value or one per sample; flow families: sigma * 1000); `text` is `collate_text`'s batch; `meta` the cached
        per-sample metadata (SDXL reads its sizes and crop); `guidance` the Flux guidance value(s). Latents and text
        embeddings are cast to the denoiser's dtype and device.
        """
        import torch

        if self.predict is None:
            raise NotSupportedError(f"{self.name} has no denoiser forward")
        if noisy_latents.ndim != 4 or noisy_latents.shape[1] != self.latent_channels:
            raise InputError(
                f"{self.name} needs latents shaped B x {self.latent_channels} x h x w, got {tuple(noisy_latents.shape)}"
            )
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
        return self.predict(denoiser, noisy_latents.to(dtype), timesteps, text, meta, guidance)

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
        """Add a peft LoRA adapter to `denoiser` in place (its `add_adapter`, else peft's `inject_adapter_in_model`
        for models without diffusers' PEFT mixin, such as PixArt's transformer); base weights are frozen."""
        if hasattr(denoiser, "add_adapter"):
            denoiser.add_adapter(config, adapter_name=adapter_name)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
        return denoiser

    def save_lora(self, out_dir: str | Path, state_dict: dict[str, Any], config: Any = None) -> Path:
        """Write `pytorch_lora_weights.safetensors` in `out_dir` from `peft.get_peft_model_state_dict(denoiser)`,
        keys prefixed with the denoiser's subfolder (`unet.` / `transformer.`) as diffusers' loaders read them (peft
        `lora_A` / `lora_B` names). Families with a LoRA loader save through the pipeline's `save_lora_weights`; others
        write the same layout directly. `config` (the `LoraConfig`, or its dict) is stored as the adapter metadata,
        so loaders rebuild rank, alpha and targets exactly. Returns the file's path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        prefix = self.denoiser.subfolder
        metadata = _lora_metadata(config)
        tensors = {key: value.detach().contiguous() for key, value in state_dict.items()}
        if not tensors:
            raise InputError(f"{self.name}: the LoRA state dict is empty")
        if self.lora_loader:
            self.load_pipeline_class().save_lora_weights(
                str(out),
                **{f"{prefix}_lora_layers": tensors, f"{prefix}_lora_adapter_metadata": metadata},
                safe_serialization=True,
            )
        else:
            from safetensors.torch import save_file

            header = {"format": "pt"}
            if metadata:
                packed = {f"{prefix}.{key}": value for key, value in metadata.items()}
                header[LORA_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
            save_file({f"{prefix}.{k}": v for k, v in tensors.items()}, str(out / LORA_WEIGHT_NAME), metadata=header)
        return out / LORA_WEIGHT_NAME

    def load_lora_into_pipeline(self, pipe: Any, path: str | Path, adapter_name: str | None = None) -> None:
        """Load a LoRA written by `save_lora` (its folder or file) into `pipe`'s denoiser: `pipe.load_lora_weights`
        where the pipeline has it, else peft's `inject_adapter_in_model` + `set_peft_model_state_dict`."""
        path = Path(path)
        if self.lora_loader:
            kwargs = {} if adapter_name is None else {"adapter_name": adapter_name}
            if path.is_file():
                kwargs["weight_name"] = path.name
                path = path.parent
            pipe.load_lora_weights(str(path), **kwargs)
            return
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors import safe_open

        file = path / LORA_WEIGHT_NAME if path.is_dir() else path
        prefix = self.denoiser.subfolder + "."
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
            state = {k.removeprefix(prefix): handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}
        if not state:
            raise InputError(f"{file} holds no {prefix}* LoRA weights")
        packed = json.loads(header[LORA_METADATA_KEY]) if header.get(LORA_METADATA_KEY) else {}
        options = {k.removeprefix(prefix): v for k, v in packed.items() if k.startswith(prefix)}
        config = LoraConfig(**options) if options else _infer_lora_config(state)
        name = adapter_name or "default"
        model = getattr(pipe, self.denoiser.subfolder)
        inject_adapter_in_model(config, model, adapter_name=name)
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
        if unexpected:
            raise InputError(f"{file}: LoRA weights match no module: {', '.join(unexpected[:5])}")


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the LoraConfig in the safetensors header


def _module_dtype(module: Any) -> Any:
    """A model's compute dtype: its first floating parameter's. (diffusers' `.dtype` walks every submodule, which costs
    milliseconds per training step on large models.)"""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return getattr(module, "dtype", None)


def _lora_metadata(config: Any) -> dict[str, Any] | None:
    """A `LoraConfig` (or its dict) as JSON-ready adapter metadata, as diffusers' training scripts store it."""
    if config is None:
        return None
    options = dict(config) if isinstance(config, dict) else config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in options.items()}


def _infer_lora_config(state: dict[str, Any]) -> Any:
    """A `LoraConfig` for a peft LoRA state dict without metadata: its modules by full name, each module's rank
    from its `lora_A`, alpha equal to the rank (scale 1)."""
    from peft import LoraConfig

    ranks = {k.split(".lora_A")[0]: int(v.shape[0]) for k, v in state.items() if ".lora_A" in k}
    if not ranks:
        raise InputError("the LoRA state dict has no lora_A weights")
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {f"^{name}": rank for name, rank in ranks.items() if rank != r}  # as diffusers anchors them
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_dora=any("lora_magnitude_vector" in k for k in state),
    )


# --------------------------------------------------------------------------------------------------------- sources


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(source: str) -> bool:
    """Whether a string that does not exist was meant as a path (not an `org/name` hub id)."""
    text = source.replace("\\", "/")
    return (
        text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or (len(text) > 1 and text[1] == ":")
        or text.endswith((".safetensors", ".ckpt", ".bin", ".pt"))
    )


def _hub_problem(error: BaseException) -> str:
    """Why a hub load failed, in words: unreachable (offline, no network) or something else."""
    text = str(error)
    unreachable = _hub_offline() or isinstance(error, (ConnectionError, TimeoutError)) or any(
        word in text.lower() for word in ("connect", "outgoing traffic", "offline", "resolve host", "timed out")
    )
    if unreachable:
        return f"the hub could not be reached (no network or HF_HUB_OFFLINE=1) and it is not cached ({text})"
    return f"the hub did not provide it ({text})"


def _hub_error(family: Family, source: str, what: str, error: BaseException) -> InputError:
    layout = ", ".join(_required_subfolders(family, COMPONENT_KINDS))
    return InputError(
        f"could not load {what} of {family.name} from the Hugging Face hub id {source!r}: {_hub_problem(error)}. "
        "Download the model where there is network and set pretrained_model_name_or_path to that local diffusers "
        f"folder (with model_index.json and the subfolders {layout})."
    )


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub import errors as hub_errors

        for name in ("HfHubHTTPError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "RepositoryNotFoundError"):
            if hasattr(hub_errors, name):
                errors.append(getattr(hub_errors, name))
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers
        pass
    return tuple(errors)


def _required_subfolders(family: Family, which: Sequence[str]) -> list[str]:
    names: list[str] = []
    if "vae" in which:
        names.append(family.vae.subfolder)
    if "denoiser" in which:
        names.append(family.denoiser.subfolder)
    if "text_encoders" in which:
        for spec in family.text_encoders:
            names += [spec.model.subfolder, spec.tokenizer.subfolder]
    if "scheduler" in which:
        names.append(family.scheduler.subfolder)
    return names


def _has_component(folder: Path, component: Component) -> bool:
    """Whether `folder` (the component's own folder) holds what `component` needs to load."""
    if component.class_name.endswith("Tokenizer") or component.class_name.endswith("TokenizerFast"):
        return any((folder / name).is_file() for name in _TOKENIZER_FILES)
    if component.class_name.endswith("Scheduler"):
        return (folder / "scheduler_config.json").is_file()
    return (folder / "config.json").is_file()


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
    if component.class_name.endswith("Scheduler"):
        # Folders may carry another scheduler than the family's usual one: load the class the config names.
        import diffusers

        config = cls.load_config(source, **args)
        cls = getattr(diffusers, config.get("_class_name", component.class_name), cls)
        return cls.from_config(config)
    return cls.from_pretrained(source, **args)


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
) -> dict[str, Any]:
    """Load the parts of a model named in `which` ("vae", "text_encoders", "denoiser", "scheduler").

    `source` is a local diffusers folder, a hub id (`org/name`, needs the network or the local cache), or a single
    `.safetensors` checkpoint (through the pipeline's `from_single_file`, with `config` a local diffusers folder
    that gives the component configs). `vae_source` and `t5_source` replace the VAE and the T5 encoder (and its
    tokenizer where the folder has one). Returns a dict with the keys "vae", "denoiser", "scheduler" (one object
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
    opts = {"revision": revision, "variant": variant, "dtype": dtype, "local_files_only": False}

    if path.is_file():
        loaded = _load_single_file(family, path, config=config, dtype=dtype, which=which)
    elif path.is_dir():
        missing = []
        for name in _required_subfolders(family, which):
            component = _component_by_subfolder(family, name)
            if vae_source is not None and component == family.vae:
                continue
            if t5_source is not None and _is_t5_part(family, component):
                continue
            if not _has_component(path / name, component):
                missing.append(name)
        if missing:
            raise InputError(
                f"the {family.name} folder {source_text!r} lacks the component subfolder(s) {', '.join(missing)} "
                f"(each needs its config and weights, as written by {family.pipeline_class}.save_pretrained)"
            )
        loaded = _load_from(family, str(path), which, opts, vae_source is not None, t5_source is not None)
    elif _looks_like_path(source_text):
        raise InputError(f"the model path {source_text!r} does not exist")
    else:
        opts["local_files_only"] = _hub_offline()
        try:
            loaded = _load_from(family, source_text, which, opts, vae_source is not None, t5_source is not None)
        except _hub_errors() as error:
            raise _hub_error(family, source_text, "the model", error) from error

    if vae_source is not None and "vae" in which:
        loaded["vae"] = _load_override(family, family.vae, vae_source, "vae_source", opts)
    if t5_source is not None and "text_encoders" in which:
        loaded = _apply_t5_source(family, loaded, source_text, t5_source, opts)
    return loaded


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
                encoders.append(_load(spec.model, source, spec.model.subfolder, opts))
                tokenizers.append(_load(spec.tokenizer, source, spec.tokenizer.subfolder, opts))
            loaded["text_encoders"], loaded["tokenizers"] = tuple(encoders), tuple(tokenizers)
    except _hub_errors() as error:
        if Path(source).is_dir():
            raise InputError(f"could not load {family.name} components from {source!r}: {error}") from error
        raise
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
        except _hub_errors() as error:
            raise InputError(f"could not load {label} {text!r}: {error}") from error
    if path.is_dir():
        subfolder = _override_layout(path, component, label)
        try:
            return _load(component, str(path), subfolder, {**opts, "local_files_only": False})
        except _hub_errors() as error:
            raise InputError(f"could not load {label} {text!r}: {error}") from error
    if _looks_like_path(text):
        raise InputError(f"{label} {text!r} does not exist")
    hub_opts = {**opts, "local_files_only": _hub_offline()}
    try:  # a hub repository: the component at its root, else in the family's subfolder
        try:
            return _load(component, text, None, hub_opts)
        except _hub_errors():
            return _load(component, text, component.subfolder, hub_opts)
    except _hub_errors() as error:
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
    if _hub_offline():
        kwargs["local_files_only"] = True
    try:
        from diffusers.loaders.single_file_utils import SingleFileComponentError
    except ImportError:  # pragma: no cover - older diffusers
        SingleFileComponentError = ValueError  # noqa: N806
    try:
        pipe = cls.from_single_file(str(path), **kwargs)
    except (*_hub_errors(), SingleFileComponentError, ValueError, KeyError) as error:
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


# ------------------------------------------------------------------------------------------------- vae and identity


def vae_factors(vae: Any) -> tuple[float, float | None]:
    """`(scaling_factor, shift_factor or None)` from the VAE's config: latents = (encode(x) - shift) * scale."""
    config = vae.config
    get = config.get if hasattr(config, "get") else lambda key, default=None: getattr(config, key, default)
    scaling = get("scaling_factor", None)
    if scaling is None:
        raise InputError(f"the VAE config ({type(vae).__name__}) has no scaling_factor")
    shift = get("shift_factor", None)
    return float(scaling), (None if shift is None else float(shift))


def _safetensors_digest(path: Path) -> str:
    """Digest of a safetensors file: its header (names, dtypes, shapes, offsets, metadata), its size and its data,
    whole up to 16 MiB, else 64 evenly spaced 64 KiB windows (4 MiB read). A header alone is the same for every
    fine-tune of one architecture; the windows catch fine-tunes, which change most weights, without reading
    gigabytes. A change confined to a few values of a large file can go unseen."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise InputError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise InputError(f"{path} is not a safetensors file (header length {length} exceeds the file)")
        header = handle.read(length)
        start = 8 + length
        data = size - start
        parts = [sha256_bytes(header), str(size)]
        if data <= _FULL_HASH_LIMIT:
            parts.append(sha256_bytes(handle.read()))
        else:
            step = (data - _SAMPLE_BYTES) / (_SAMPLE_WINDOWS - 1)
            samples = []
            for i in range(_SAMPLE_WINDOWS):
                handle.seek(start + int(i * step))
                samples.append(handle.read(_SAMPLE_BYTES))
            parts.append(sha256_bytes(b"".join(samples)))
    return sha256_bytes("\n".join(parts).encode())


def _file_digest(path: Path) -> str:
    if path.suffix == ".safetensors":
        return _safetensors_digest(path)
    if path.stat().st_size <= _FULL_HASH_LIMIT:
        return sha256_file(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        samples = []
        for i in range(_SAMPLE_WINDOWS):
            handle.seek(int(i * (size - _SAMPLE_BYTES) / (_SAMPLE_WINDOWS - 1)))
            samples.append(handle.read(_SAMPLE_BYTES))
    return sha256_bytes(str(size).encode() + b"\n" + b"".join(samples))


def _config_digest(path: Path) -> str:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the config {path}: {error}") from error
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return sha256_json(config)


def _resolve_hub_folder(source: str, subfolder: str | None, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/*"] if subfolder else ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        root = snapshot_download(
            source, revision=revision, allow_patterns=patterns, local_files_only=_hub_offline()
        )
    except _hub_errors() as error:
        raise InputError(
            f"could not identify {source!r} on the Hugging Face hub: {_hub_problem(error)}. Set "
            "pretrained_model_name_or_path to a local diffusers folder"
        ) from error
    return Path(root)


def without_source(identity: dict[str, Any]) -> dict[str, Any]:
    """An identity minus where the component was read from: what two copies of the same model share."""
    return {k: v for k, v in identity.items() if k != "source"}


def component_identity(source: str | Path, subfolder: str | None, revision: str | None = None) -> dict[str, Any]:
    """What identifies one component: source, revision, subfolder, the sha256 of its config (canonical JSON without
    library-version keys) and a digest per weight or tokenizer file (see `_safetensors_digest`). Works on local
    folders, single `.safetensors` files and hub ids (through the local hub cache when offline)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        folder, files = path.parent, [path]
    else:
        if not path.is_dir():
            if _looks_like_path(text):
                raise InputError(f"the model path {text!r} does not exist")
            path = _resolve_hub_folder(text, subfolder, revision)
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise InputError(f"{text!r} has no component subfolder {subfolder!r}")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _IDENTITY_SUFFIXES)
    config = next((folder / name for name in _CONFIG_FILES if (folder / name) in files), None)
    if path.is_file():
        config = None
    weights = {p.name: _file_digest(p) for p in files if p != config}
    return {
        "source": text,
        "revision": revision,
        "subfolder": subfolder,
        "config_sha256": None if config is None else _config_digest(config),
        "files": weights,
        "weights_sha256": sha256_json(weights),
    }
