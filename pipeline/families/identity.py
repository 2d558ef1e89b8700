"""Which model a run uses, and the identity of its parts: what `st cache` records and `st train` checks against.

A model is named by `pretrained_model_name_or_path` (or the family's `model_flavour`) with optional VAE and T5
overrides; a text encoder the model lacks is identified where it is loaded from (`sources.component_origin`). Relative paths resolve as `LoadedConfig.resolve_path` says; anything that is not a path on disk (a hub id)
is kept as written. The identity of each component comes from its configs and weight headers; nothing is loaded.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import MODEL_FAMILIES
from pipeline.errors import ConfigError, InputError
from pipeline.families.hub import hub_errors, hub_offline, hub_problem, looks_like_path
from pipeline.families.pixel_space import identity as pixel_identity
from pipeline.families.pixel_space import is_pixel_space
from pipeline.families.sources import component_origin, unreachable_fallback
from pipeline.families.spec import Family
from pipeline.hashing import sha256_bytes, sha256_file, sha256_json
from pipeline.log import get_logger

# Config keys that say which library version or path wrote a config, not what the model is.
_VOLATILE_CONFIG_KEYS = ("_diffusers_version", "transformers_version", "_name_or_path", "_commit_hash")
_CONFIG_FILES = ("config.json", "scheduler_config.json", "tokenizer_config.json", "preprocessor_config.json")
# Files of a component folder that say what it computes (.jinja: chat templates, which shape the prompt tokens).
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".json", ".txt", ".model", ".jinja")
_SAMPLE_WINDOWS = 64
_SAMPLE_BYTES = 1 << 16
_FULL_HASH_LIMIT = 16 << 20


@dataclass(frozen=True)
class ModelSources:
    """Where the model's parts come from, resolved against the config's folder."""

    model: str
    vae: str | None
    t5: str | None
    revision: str | None
    flavour: str | None = None  # `model_flavour`: with the model, it picks the family variant (`Family.for_run`)


def _resolve(loaded, value: str | None) -> str | None:
    if value is None:
        return None
    candidate = loaded.resolve_path(value)
    return str(candidate.resolve()) if candidate.exists() else value


def model_sources(loaded) -> ModelSources:
    """The run's model sources. The model is `pretrained_model_name_or_path` when set, else the hub id of
    `model_flavour` (the family's default flavour when unset), as SimpleTuner picks it. ConfigError when model_family
    is not set, or for a flavour the family lacks or st cannot train yet (checked even beside a path: SimpleTuner's
    flavour also changes how it trains)."""
    from pipeline.families import get_family  # the registry imports this module

    config = loaded.config
    if not config.model_family:
        raise ConfigError(f"option 'model_family' is not set; choose one of {', '.join(MODEL_FAMILIES)}")
    family = get_family(config.model_family)
    model = _resolve(loaded, config.pretrained_model_name_or_path)
    if config.model_flavour is not None or (model is None and family.flavours):
        flavour_model = family.flavour_hub_id(config.model_flavour)  # also refuses a flavour beside a path
        model = model or flavour_model
    if model is None:
        raise ConfigError(
            "option 'pretrained_model_name_or_path' is not set; point it at a diffusers folder, a "
            ".safetensors checkpoint or a hub id (`st tiny-model FAMILY DIR` writes a small test model)"
        )
    vae = _resolve(loaded, config.pretrained_vae_model_name_or_path)
    if vae is not None and is_pixel_space(family):  # nothing to replace; SimpleTuner clears the option too
        get_logger("families").warning("pretrained_vae_model_name_or_path is ignored: %s denoises pixels and has no "
                                       "VAE", family.name)  # fmt: skip
        vae = None
    return ModelSources(model, vae, _resolve(loaded, config.pretrained_t5_model_name_or_path),
                        config.revision, config.model_flavour)  # fmt: skip


@dataclass(frozen=True)
class DenoiserSource:
    """Where the denoiser is read from: `source` (a folder or hub id) and `subfolder` (None: `source` itself)."""

    source: str
    subfolder: str | None
    single_file_config: tuple[str, str] | None = None  # a single file's architecture: (folder, subfolder) (AnimeGen)


# SimpleTuner's options naming another denoiser, per denoiser subfolder: (model option, subfolder option).
DENOISER_OPTIONS = {"unet": ("pretrained_unet_model_name_or_path", "pretrained_unet_subfolder"),
                    "transformer": ("pretrained_transformer_model_name_or_path", "pretrained_transformer_subfolder")}


def denoiser_source(config: Any, family: Family, model: str, base_dir: Path) -> DenoiserSource | None:
    """The denoiser SimpleTuner loads instead of `model`'s own: `pretrained_unet_model_name_or_path` (UNet families)
    or `pretrained_transformer_model_name_or_path` (transformer families; a `.gguf` file is the GGUF loader's),
    read from its `pretrained_unet_subfolder` / `pretrained_transformer_subfolder` ("none": the folder itself).
    None when the run uses `model`'s own denoiser. Relative paths resolve as SimpleTuner reads them."""
    from pipeline.config import resolve_relative_path

    for kind, (path_option, _) in DENOISER_OPTIONS.items():
        value = getattr(config, path_option)
        if value not in (None, "") and kind != family.denoiser.subfolder:
            raise ConfigError(f"{path_option} names a {kind}, and {family.name}'s denoiser is a "
                              f"{family.denoiser.subfolder}: remove it")  # fmt: skip
    path_option, subfolder_option = DENOISER_OPTIONS.get(family.denoiser.subfolder, (None, None))
    value = getattr(config, path_option) if path_option else None
    # Wan 2.2's low-noise stage trains `transformer_2` (its pipeline slot and LoRA prefix stay the denoiser's).
    run_family = family.for_run(getattr(config, "model_flavour", None), model)
    if value in (None, "") and run_family.default_denoiser is not None:  # a flavour's transformer (Z-Image de-turbo)
        value = run_family.default_denoiser
    stage_weights = None if run_family.denoiser_subfolder is None else run_family.denoiser_subfolder(run_family)
    own_file = value not in (None, "") and str(value).lower().endswith(".safetensors")
    if (value in (None, "") or own_file) and run_family.denoiser_file is not None:
        # an AnimeGen stage: its hub file, or the option's file in its place
        file = str(resolve_relative_path(str(value), base_dir)) if own_file else None
        stage = run_family.denoiser_file(run_family, file)
        if stage is not None:
            return DenoiserSource(stage[0], None, single_file_config=(model, stage[1]))
    if stage_weights is not None and value in (None, ""):
        return DenoiserSource(model, stage_weights)
    if value in (None, "") or str(value).endswith(".gguf"):
        return None
    subfolder = getattr(config, subfolder_option) if stage_weights is None else stage_weights
    subfolder = None if subfolder in (None, "") or str(subfolder).lower() == "none" else str(subfolder)
    candidate = resolve_relative_path(str(value), base_dir)
    source = str(candidate.resolve()) if candidate.exists() else str(value)
    if run_family.check_denoiser_source is not None:  # a T2V A14B stage trains its own slot of the base
        run_family.check_denoiser_source(run_family, model, source, subfolder)
    return DenoiserSource(source, subfolder)


def denoiser_identity(family: Family, model: str, override: DenoiserSource | None, revision: str | None) -> dict:
    """`component_identity` of the denoiser a run trains: `model`'s own, or the override's (`denoiser_source`)."""
    if override is None:
        return component_identity(model, family.denoiser.subfolder, revision)
    return component_identity(override.source, override.subfolder, revision)


def model_identity(family: Family, sources: ModelSources) -> dict[str, Any]:
    """Identities of the VAE, text encoders and tokenizers, from configs and weight headers (nothing is loaded), of
    the family variant the sources train (the SDXL refiner has one text encoder)."""
    source, revision = sources.model, sources.revision
    family = family.for_run(sources.flavour, source)

    def identify(component, override: str | None) -> dict[str, Any]:
        if override is None:  # the model's own, or the family's source for a part the model lacks
            origin = component_origin(family, source, component, revision)
            if not origin.fallback:
                return component_identity(source, component.subfolder, revision)
            try:
                return _hub_component_identity(origin)
            except hub_errors() as error:
                raise unreachable_fallback(family, source, origin, error) from error
        path = Path(override)
        if path.is_dir() and (path / component.subfolder).is_dir():
            return component_identity(override, component.subfolder, revision)
        return component_identity(override, None, revision)

    if Path(source).is_file():
        whole = component_identity(source, None, revision)
        return {"vae": whole, "text_encoders": [whole], "tokenizers": [whole]}
    t5_source = sources.t5
    is_t5 = [spec.kind == "t5" for spec in family.text_encoders]
    # Wan 2.1 i2v / FLF2V: `st cache` stores each clip's CLIP image embeddings, made by these two parts.
    clip = {"image_encoder": [identify(part, None) for part in family.image_encoder]} if family.image_encoder else {}
    return {
        "vae": pixel_identity(source, revision) if is_pixel_space(family) else identify(family.vae, sources.vae),
        "text_encoders": [identify(s.model, t5_source if t5 else None) for s, t5 in zip(family.text_encoders, is_t5)],
        "tokenizers": [identify(s.tokenizer, t5_source if t5 and t5_source and Path(t5_source, s.tokenizer.subfolder)
                                .is_dir() else None) for s, t5 in zip(family.text_encoders, is_t5)],
        **clip,
    }  # fmt: skip


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
            if looks_like_path(text):
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


def without_source(identity: dict[str, Any]) -> dict[str, Any]:
    """An identity minus where the component was read from: what two copies of the same model share."""
    return {k: v for k, v in identity.items() if k != "source"}


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
        parts.append(sha256_bytes(handle.read() if data <= _FULL_HASH_LIMIT else _windows(handle, start, data)))
    return sha256_bytes("\n".join(parts).encode())


def _file_digest(path: Path) -> str:
    """A weight or tokenizer file's digest: a safetensors digest, the sha256 up to 16 MiB, else size and windows."""
    if path.suffix == ".safetensors":
        return _safetensors_digest(path)
    if path.stat().st_size <= _FULL_HASH_LIMIT:
        return sha256_file(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        return sha256_bytes(str(size).encode() + b"\n" + _windows(handle, 0, size))


def _windows(handle: Any, start: int, length: int) -> bytes:
    """64 evenly spaced 64 KiB windows of the `length` bytes from `start`: a large file's sample."""
    step = (length - _SAMPLE_BYTES) / (_SAMPLE_WINDOWS - 1)
    samples = []
    for i in range(_SAMPLE_WINDOWS):
        handle.seek(start + int(i * step))
        samples.append(handle.read(_SAMPLE_BYTES))
    return b"".join(samples)


def _config_digest(path: Path) -> str:
    """The sha256 of a component config's canonical JSON, without the keys that name the library that wrote it."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the config {path}: {error}") from error
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return sha256_json(config)


def _hub_component_identity(origin) -> dict[str, Any]:
    """`component_identity` of a component in a hub repository; the hub's own error when it cannot be had."""
    from huggingface_hub import snapshot_download

    root = snapshot_download(origin.source, allow_patterns=[f"{origin.subfolder}/*"], local_files_only=hub_offline())
    if not (Path(root) / origin.subfolder).is_dir():
        raise FileNotFoundError(f"{origin.source} has no {origin.subfolder}/")
    identity = component_identity(root, origin.subfolder, None)
    return {**identity, "source": origin.source}


def _resolve_hub_folder(source: str, subfolder: str | None, revision: str | None) -> Path:
    """The local snapshot of a hub model's component files (downloaded unless offline)."""
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/*"] if subfolder else ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        root = snapshot_download(source, revision=revision, allow_patterns=patterns, local_files_only=hub_offline())
    except hub_errors() as error:
        raise InputError(
            f"could not identify {source!r} on the Hugging Face hub: {hub_problem(error)}. Set "
            "pretrained_model_name_or_path to a local diffusers folder"
        ) from error
    return Path(root)
