"""The dataset list (`data_backend_config`, SimpleTuner's multidatabackend.json) as typed specs.

Each entry's options default to the global options of the same name; relative folders resolve as
`LoadedConfig.resolve_path` says (the working folder first, then the list's folder). An entry's `dataset_type` and
storage `type` are checked before its other keys. Entries SimpleTuner needs but st does not
(`dataset_type: text_embeds` / `image_embeds`, cache paths, ...) are accepted with one log line saying why they are
ignored; keys of features st lacks are refused unless at their default (`pipeline.simpletuner`); keys neither tool
knows are errors.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (
    OPTION_FIELDS,
    Config,
    LoadedConfig,
    check_option_range,
    check_resolution,
    coerce,
    normalise_key,
    strip_trailing_commas,
    suggest,
)
from .errors import ConfigError, InputError, NotSupportedError
from .log import get_logger
from .simpletuner import DATASET_KEY_STATES, Refused

log = get_logger("datasets")

# Options an entry may set for itself; the global option of the same name is the default.
PER_DATASET_OPTIONS = (
    "caption_strategy", "instance_prompt", "prepend_instance_prompt", "only_instance_prompt", "resolution",
    "resolution_type", "minimum_image_size", "maximum_image_size", "target_downsample_size", "minimum_aspect_ratio",
    "maximum_aspect_ratio", "crop", "crop_style", "crop_aspect", "crop_aspect_buckets", "max_upscale_threshold",
    "repeats", "probability",
)  # fmt: skip
ENTRY_KEYS = ("id", "type", "dataset_type", "disabled", "instance_data_dir", "parquet", *PER_DATASET_OPTIONS)
PARQUET_KEYS = (
    "path", "filename_column", "caption_column", "fallback_caption_column", "width_column", "height_column",
    "identifier_includes_extension",
)  # fmt: skip
IGNORED_DATASET_TYPES = {
    "text_embeds": "st stores text embeddings in the output of `st cache`",
    "image_embeds": "st stores latents in the output of `st cache`",
}


@dataclass(frozen=True)
class ParquetCaptions:
    """Where a `caption_strategy: parquet` dataset finds its captions."""

    path: Path
    filename_column: str = "filename"
    caption_column: str = "caption"
    fallback_caption_column: str | None = None
    width_column: str | None = None
    height_column: str | None = None
    identifier_includes_extension: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """One image dataset, with every option resolved (entry value, else the global option)."""

    id: str
    root: Path
    caption_strategy: str
    instance_prompt: str | None
    prepend_instance_prompt: bool
    only_instance_prompt: bool
    resolution: float
    resolution_type: str
    minimum_image_size: float | None
    maximum_image_size: float | None
    target_downsample_size: float | None
    minimum_aspect_ratio: float | None
    maximum_aspect_ratio: float | None
    crop: bool
    crop_style: str
    crop_aspect: str
    crop_aspect_buckets: tuple | None
    max_upscale_threshold: float | None
    repeats: int
    probability: float
    repeats_explicit: bool = False
    parquet: ParquetCaptions | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready form, as recorded in manifests and stage keys."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("parquet",)}
        out["root"] = str(self.root)
        out["crop_aspect_buckets"] = list(self.crop_aspect_buckets) if self.crop_aspect_buckets else None
        if self.parquet is not None:
            out["parquet"] = {**dataclasses.asdict(self.parquet), "path": str(self.parquet.path)}
        return out


def read_dataset_list(path: Path) -> list[Any]:
    if not path.is_file():
        raise ConfigError(f"data_backend_config {path} does not exist; point it at your multidatabackend.json")
    try:
        data = json.loads(strip_trailing_commas(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise ConfigError(f"{path} must hold a list of dataset objects")
    return data


def _parquet_spec(raw: Any, loaded: LoadedConfig, base: Path, where: str) -> ParquetCaptions:
    if not isinstance(raw, dict) or "path" not in raw:
        raise ConfigError(f"{where}: 'parquet' must be an object with at least a 'path' (the .parquet file)")
    unknown = [k for k in raw if k not in PARQUET_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown parquet key '{unknown[0]}'{suggest(unknown[0], PARQUET_KEYS)}")
    path = loaded.resolve_path(str(raw["path"]), base=base)
    kwargs = {k: raw[k] for k in PARQUET_KEYS if k in raw and k != "path"}
    if "identifier_includes_extension" in kwargs:
        kwargs["identifier_includes_extension"] = coerce(
            "parquet.identifier_includes_extension", kwargs["identifier_includes_extension"], bool, where=where
        )
    for key, value in kwargs.items():
        if key != "identifier_includes_extension" and not (value is None or isinstance(value, str)):
            raise ConfigError(f"{where}: parquet.{key} must be a column name, got {value!r}")
    return ParquetCaptions(path=path, **kwargs)


def _normalise_aspect_buckets(value: Any, where: str) -> tuple | None:
    """crop_aspect_buckets: a list of aspect ratios, or of {"aspect_bucket": r, "weight": w} objects."""
    if value is None:
        return None
    items = []
    for item in value:
        if isinstance(item, dict):
            if "aspect_bucket" not in item:
                raise ConfigError(f"{where}: each crop_aspect_buckets object needs 'aspect_bucket' (and 'weight')")
            aspect, weight = item["aspect_bucket"], item.get("weight", 1.0)
        else:
            aspect, weight = item, 1.0
        try:
            aspect, weight = float(aspect), float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: crop_aspect_buckets entry {item!r} is not a number") from None
        if aspect <= 0 or weight <= 0:
            raise ConfigError(f"{where}: crop_aspect_buckets entry {item!r} must be positive")
        items.append((aspect, weight))
    if not items:
        raise ConfigError(f"{where}: crop_aspect_buckets is empty")
    return tuple(items)


def _check_entry_keys(entry: dict[str, Any], ident: str, where: str) -> None:
    """Every key is st's, or a SimpleTuner dataset key that is accepted, or refused but at its default."""
    for key, value in entry.items():
        if key in ENTRY_KEYS:
            continue
        state = DATASET_KEY_STATES.get(key)
        if isinstance(state, Refused):
            if not state.is_default(value):
                raise ConfigError(f"{where}: {state.message(key, value, kind='dataset key')}")
            continue
        if state is not None:
            log.info("dataset '%s': ignoring '%s': %s", ident, key, state.reason)
            continue
        raise ConfigError(f"{where}: unknown dataset key '{key}'{suggest(key, ENTRY_KEYS)}")


def embed_ids(entries: list[Any]) -> dict[str, str]:
    """The ids other entries name as their `text_embeds` / `image_embeds` cache -> that dataset type: SimpleTuner
    treats such an entry as that cache even without a `dataset_type`."""
    named = {}
    for entry in entries:
        for dataset_type in IGNORED_DATASET_TYPES:
            if isinstance(entry, dict) and isinstance(entry.get(dataset_type), str):
                named[entry[dataset_type]] = dataset_type
    return named


def parse_entry(entry: dict[str, Any], loaded: LoadedConfig, list_path: Path, index: int,
                embeds: dict[str, str] | None = None) -> DatasetSpec | None:  # fmt: skip
    """Turn one multidatabackend entry into a DatasetSpec; None for entries st ignores. `embeds`: `embed_ids` of the
    whole list."""
    config: Config = loaded.config
    entry = {normalise_key(str(k)): v for k, v in entry.items()}
    if "disable" in entry and "disabled" not in entry:  # SimpleTuner reads either spelling
        entry["disabled"] = entry.pop("disable")
    ident = entry.get("id")
    where = f"{list_path} entry {index}" + (f" (id '{ident}')" if ident else "")
    dataset_type = entry.get("dataset_type", (embeds or {}).get(ident, "image"))
    if dataset_type in IGNORED_DATASET_TYPES:  # before the id checks: SimpleTuner's embed ids may hold dots
        log.info("ignoring dataset '%s' (dataset_type %s): %s", ident, dataset_type,
                 IGNORED_DATASET_TYPES[dataset_type])  # fmt: skip
        return None
    if dataset_type != "image":
        raise NotSupportedError(f"{where}: dataset_type '{dataset_type}' is not supported yet (st reads 'image')")
    if coerce("disabled", entry.get("disabled", False), bool, where=where):
        log.info("dataset '%s' is disabled; skipping it", ident)
        return None
    storage = entry.get("type", "local")
    if storage != "local":  # before the other keys: each storage type has keys of its own
        raise NotSupportedError(f"{where}: storage type '{storage}' is not supported yet; st reads type 'local'")
    if not isinstance(ident, str) or not ident:
        raise ConfigError(f"{where}: every dataset needs a non-empty string 'id'")
    if "." in ident or "/" in ident:
        raise ConfigError(f"{where}: dataset id {ident!r} may not contain '.' or '/'")
    _check_entry_keys(entry, ident, where)
    if "instance_data_dir" not in entry:
        raise ConfigError(f"{where}: 'instance_data_dir' (the image folder) is required")

    hints = typing.get_type_hints(Config)
    values: dict[str, Any] = {}
    for key in PER_DATASET_OPTIONS:
        if key in entry:
            values[key] = coerce(key, entry[key], hints[key], OPTION_FIELDS[key].metadata["choices"], where)
        else:
            values[key] = getattr(config, key)
    values["crop_aspect_buckets"] = _normalise_aspect_buckets(values["crop_aspect_buckets"], where)
    root = loaded.resolve_path(str(entry["instance_data_dir"]), base=list_path.parent).resolve()
    parquet = _parquet_spec(entry["parquet"], loaded, list_path.parent, where) if "parquet" in entry else None
    if values["caption_strategy"] == "parquet" and parquet is None:
        raise ConfigError(f"{where}: caption_strategy 'parquet' needs a 'parquet' object with the file's 'path'")
    instance_prompted = values["prepend_instance_prompt"] or values["only_instance_prompt"]
    if (values["caption_strategy"] == "instanceprompt" or instance_prompted) and not values["instance_prompt"]:
        raise ConfigError(
            f"{where}: caption_strategy '{values['caption_strategy']}' with instance prompts needs 'instance_prompt'"
        )
    if values["crop_aspect"] in ("closest", "random") and values["crop"] and not values["crop_aspect_buckets"]:
        raise ConfigError(f"{where}: crop_aspect '{values['crop_aspect']}' needs 'crop_aspect_buckets'")
    _check_ranges(values, where)
    explicit = "repeats" in entry or "repeats" in loaded.explicit
    return DatasetSpec(id=ident, root=root, parquet=parquet, repeats_explicit=explicit, **values)


def _check_ranges(values: dict[str, Any], where: str) -> None:
    """The global options' ranges apply to an entry's own values too (see config.OPTION_RANGES)."""
    for key in PER_DATASET_OPTIONS:
        check_option_range(key, values[key], where)
    check_resolution(values["resolution"], values["resolution_type"], where)
    lo, hi = values["minimum_aspect_ratio"], values["maximum_aspect_ratio"]
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"{where}: minimum_aspect_ratio {lo} is larger than maximum_aspect_ratio {hi}")


def load_datasets(loaded: LoadedConfig) -> list[DatasetSpec]:
    """Read `data_backend_config` into the enabled image datasets, in file order."""
    if not loaded.config.data_backend_config:
        raise ConfigError("option 'data_backend_config' is not set; point it at a multidatabackend.json dataset list")
    list_path = loaded.resolve_path(loaded.config.data_backend_config).resolve()
    specs: list[DatasetSpec] = []
    seen: set[str] = set()
    entries = read_dataset_list(list_path)
    for index, entry in enumerate(entries):
        spec = parse_entry(entry, loaded, list_path, index, embed_ids(entries))
        if spec is None:
            continue
        if spec.id in seen:
            raise ConfigError(f"{list_path}: dataset id '{spec.id}' is used twice; ids must be unique")
        seen.add(spec.id)
        specs.append(spec)
    if not specs:
        raise ConfigError(f"{list_path} has no enabled image dataset")
    for spec in specs:
        if not spec.root.is_dir():
            raise InputError(f"dataset '{spec.id}': instance_data_dir {spec.root} does not exist or is not a folder")
    return specs
