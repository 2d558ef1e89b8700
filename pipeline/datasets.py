"""The dataset list (`data_backend_config`, SimpleTuner's multidatabackend.json) as typed specs.

Each entry's options default to the global options of the same name; relative folders resolve as
`LoadedConfig.resolve_path` says (the working folder first, then the list's folder). An entry's `dataset_type` and
storage `type` are checked before its other keys. Entries SimpleTuner needs but st does not
(`dataset_type: text_embeds` / `image_embeds`, cache paths, ...) are accepted with one log line saying why they are
ignored; keys of features st lacks are refused unless at their default (`pipeline.simpletuner`); keys neither tool
knows are errors.

Paired data: an `image` (or `eval`) entry names its conditioning datasets in `conditioning_data` (an id or a list);
each is an entry with `dataset_type: conditioning` and a `conditioning_type`, parsed into a `ConditioningSpec`.
`conditioning: [{"type": "canny", ...}]` on an image entry makes `st prepare` generate such a dataset
(`<id>_conditioning_<type>`, inside its output folder) and links it.

Remote image datasets (`type: aws`, `huggingface`, `csv`) carry a `source` (`pipeline.sources`) instead of a folder;
`st prepare` downloads them and sets their `root`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
import unicodedata
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
from .sources import REMOTE_TYPES, parse_source, uses_caption_column

log = get_logger("datasets")

# Options an entry may set for itself; the global option of the same name is the default.
PER_DATASET_OPTIONS = (
    "caption_strategy", "instance_prompt", "prepend_instance_prompt", "only_instance_prompt", "resolution",
    "resolution_type", "minimum_image_size", "maximum_image_size", "target_downsample_size", "minimum_aspect_ratio",
    "maximum_aspect_ratio", "crop", "crop_style", "crop_aspect", "crop_aspect_buckets", "max_upscale_threshold",
    "repeats", "probability",
)  # fmt: skip
# Caption and sample-count keys of an entry (no global option of that name): `st prepare` applies them.
CAPTION_KEYS = ("disable_multiline_split", "caption_shuffle", "max_num_samples")
# When a dataset joins and leaves the training mix (`DatasetSchedule`); st train's data plan applies them.
SCHEDULE_KEYS = ("start_epoch", "start_step", "end_epoch", "end_step")
# How st train draws the dataset's batches (`DatasetSpec.timestep_sampling_offset`, `DatasetSpec.train_batch_size`).
TRAINING_KEYS = ("timestep_sampling_offset", "train_batch_size")
ENTRY_KEYS = ("id", "type", "dataset_type", "disabled", "instance_data_dir", "parquet", "conditioning_data",
              "conditioning", "is_regularisation_data", "video", *PER_DATASET_OPTIONS, *CAPTION_KEYS,
              *SCHEDULE_KEYS, *TRAINING_KEYS)  # fmt: skip
CAPTION_SHUFFLE_KEYS = ("enable", "count", "seed", "split_on", "position_start", "include_original")
SHUFFLE_SPLITS = ("comma", "space", "period")
# A conditioning entry's own keys; its resize and crop follow its target image, so the image options it may carry
# (SimpleTuner's examples repeat the target's) are read by nothing.
CONDITIONING_KEYS = ("id", "type", "dataset_type", "disabled", "instance_data_dir", "conditioning_type",
                     "source_dataset_id")  # fmt: skip
CONDITIONING_TYPES = ("controlnet", "mask", "segmentation", "reference_strict", "reference_loose")
MASK_TYPES = ("mask", "segmentation")
PRIMARY_DATASET_TYPES = ("image", "eval", "video")
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
class CaptionShuffle:
    """An entry's enabled `caption_shuffle` block (SimpleTuner's CaptionShuffler): `count` reordered copies of each
    caption's tags, the first `position_start` tags kept in place, seeded by `seed` and the caption's text."""

    count: int = 1
    seed: int | None = None  # the block's seed, else the global seed
    split_on: str = "comma"
    position_start: int = 0
    include_original: bool = True


@dataclass(frozen=True)
class DatasetSchedule:
    """When a dataset is sampled (SimpleTuner's `runtime/schedule.py`): from epoch `start_epoch` (1-based) and
    optimizer step `start_step` on, through epoch `end_epoch` and step `end_step` (None: no end). Values are
    normalised as SimpleTuner normalises them: start_epoch below 1 is 1, start_step below 0 is 0, an end of 0 or less
    is no end."""

    start_epoch: int = 1
    start_step: int = 0
    end_epoch: int | None = None
    end_step: int | None = None

    @classmethod
    def from_entry(cls, entry: dict[str, Any], where: str) -> DatasetSchedule:
        """The entry's schedule keys, each an integer (DEVIATION: SimpleTuner reads a value that is not a number as
        the key's default; st refuses it, naming the key)."""
        values: dict[str, int | None] = {}
        for key in SCHEDULE_KEYS:
            raw = entry.get(key)
            if raw is None or (raw == "" and key.startswith("end_")):
                continue
            try:
                if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                    raise ValueError
                number = int(raw)
            except (TypeError, ValueError):
                unit = "an epoch" if "epoch" in key else "an optimizer step"
                raise ConfigError(f"{where}: '{key}' must be a whole number ({unit}), got {raw!r}") from None
            values[key] = number
        return cls(start_epoch=max(values.get("start_epoch", 1), 1), start_step=max(values.get("start_step", 0), 0),
                   end_epoch=values["end_epoch"] if values.get("end_epoch", 0) >= 1 else None,
                   end_step=values["end_step"] if values.get("end_step", 0) >= 1 else None)  # fmt: skip

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> DatasetSchedule:
        """The schedule a manifest's dataset entry records (`describe`'s keys; absent ones at their defaults)."""
        return cls(**{k: entry[k] for k in SCHEDULE_KEYS if k in entry})

    def describe(self) -> dict[str, int]:
        """The keys away from their defaults (so that manifests and stage keys of unscheduled datasets stay as
        they were)."""
        default = DatasetSchedule()
        return {k: getattr(self, k) for k in SCHEDULE_KEYS if getattr(self, k) != getattr(default, k)}

    def starts_at_start(self) -> bool:
        """Active at the first step of the run, as SimpleTuner decides it (start_epoch <= 1 and start_step <= 1)."""
        return self.start_epoch <= 1 and self.start_step <= 1

    def active(self, epoch: int, step: int) -> bool:
        """Whether the dataset is sampled in `epoch` (1-based) for the batch of optimizer step `step` (1-based)."""
        return (epoch >= self.start_epoch and step >= self.start_step
                and (self.end_epoch is None or epoch <= self.end_epoch)
                and (self.end_step is None or step <= self.end_step))  # fmt: skip


# The caption table `st prepare` writes for a remote source's caption column (its path is set there).
SOURCE_CAPTIONS = ParquetCaptions(path=Path("captions.parquet"), identifier_includes_extension=True)


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
    dataset_type: str = "image"  # "eval": used only for the evaluation loss
    conditioning_data: tuple[str, ...] = ()  # ids of its conditioning datasets (generated ones included), in order
    conditioning: tuple[Any, ...] = ()  # conditioning generators (`pipeline.prepare.generators.GeneratorSpec`)
    is_regularisation_data: bool = False
    # Remote storage (`pipeline.sources`: type aws / huggingface / csv); `root` is then the download view that
    # `st prepare` fills in, and `parquet` (for a caption column) the caption table it writes there.
    source: Any = None
    # `dataset_type: video`: its `video` block (`pipeline.video_settings.VideoSettings`).
    video: Any = None
    # Caption keys (`pipeline.prepare.captions`): a multi-line caption file read as one caption, tag-shuffled
    # copies, and the filters of the text_embeds entry the dataset uses (`caption_filter_list`: its items, in order).
    disable_multiline_split: bool = False
    caption_shuffle: CaptionShuffle | None = None
    caption_filters: tuple[str, ...] = ()
    # At most this many image files, a subset fixed by the dataset id (`pipeline.prepare.select.cap_samples`).
    max_num_samples: int | None = None
    # start_epoch / start_step / end_epoch / end_step: when st train samples the dataset.
    schedule: DatasetSchedule = DatasetSchedule()
    # Added to the standard normal draw of the logit-normal flow schedule for this dataset's batches (SimpleTuner's
    # per-dataset `timestep_sampling_offset`; 0: the global schedule unchanged).
    timestep_sampling_offset: float = 0.0
    # This dataset's batch size per process (SimpleTuner's per-dataset `train_batch_size`); None: the global one.
    train_batch_size: int | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready form, as recorded in manifests and stage keys."""
        skip = ("parquet", "dataset_type", "conditioning_data", "conditioning", "is_regularisation_data", "source",
                "video", "disable_multiline_split", "caption_shuffle", "caption_filters", "max_num_samples",
                "schedule", *TRAINING_KEYS)
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        # Paired-data fields only when set, so that the stage keys of plain datasets stay as they were.
        if self.dataset_type != "image":
            out["dataset_type"] = self.dataset_type
        if self.conditioning_data:
            out["conditioning_data"] = list(self.conditioning_data)
        if self.conditioning:
            out["conditioning"] = [g.describe() for g in self.conditioning]
        if self.is_regularisation_data:
            out["is_regularisation_data"] = True
        if self.source is not None:
            out["source"] = self.source.describe()
        if self.video is not None:
            out["video"] = self.video.describe()
        # Caption keys only when set, likewise; the filters' text (not their file's path) enters the key.
        if self.disable_multiline_split:
            out["disable_multiline_split"] = True
        if self.caption_shuffle is not None:
            out["caption_shuffle"] = dataclasses.asdict(self.caption_shuffle)
        if self.caption_filters:
            out["caption_filters"] = list(self.caption_filters)
        if self.max_num_samples is not None:
            out["max_num_samples"] = self.max_num_samples
        out.update(self.schedule.describe())  # schedule keys only when set, likewise
        out.update(self.training_keys())  # likewise
        out["root"] = str(self.root)
        out["crop_aspect_buckets"] = list(self.crop_aspect_buckets) if self.crop_aspect_buckets else None
        if self.parquet is not None:
            out["parquet"] = {**dataclasses.asdict(self.parquet), "path": str(self.parquet.path)}
        return out

    def training_keys(self) -> dict[str, Any]:
        """timestep_sampling_offset and train_batch_size, only those set (as recorded in manifests)."""
        out: dict[str, Any] = {}
        if self.timestep_sampling_offset:
            out["timestep_sampling_offset"] = self.timestep_sampling_offset
        if self.train_batch_size is not None:
            out["train_batch_size"] = self.train_batch_size
        return out


@dataclass(frozen=True)
class ConditioningSpec:
    """A conditioning dataset: images paired by relative path with the samples of the image datasets naming it.
    `generator`: set for a dataset `st prepare` generates from its source dataset (`root` is then filled in by
    prepare, inside its output folder)."""

    id: str
    root: Path | None
    conditioning_type: str
    source_dataset_id: str | None = None
    generator: Any = None

    @property
    def is_mask(self) -> bool:
        return self.conditioning_type in MASK_TYPES

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "root": str(self.root) if self.root is not None else None,
                "conditioning_type": self.conditioning_type, "source_dataset_id": self.source_dataset_id,
                "generator": self.generator.describe() if self.generator is not None else None}  # fmt: skip


@dataclass(frozen=True)
class DatasetList:
    """The enabled datasets of a dataset list: image and eval datasets (in file order) and conditioning datasets."""

    images: list[DatasetSpec]
    conditioning: list[ConditioningSpec]

    def conditioning_by_id(self) -> dict[str, ConditioningSpec]:
        return {c.id: c for c in self.conditioning}


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
    # The global parquet_caption_column / parquet_filename_column stand in for columns the block does not name, as in
    # SimpleTuner's configure_parquet_database. DEVIATION: with neither set, st reads the columns `caption` and
    # `filename` (as SimpleTuner's documentation says), where SimpleTuner's code falls back to `description` and `id`.
    for key, option in (("caption_column", "parquet_caption_column"), ("filename_column", "parquet_filename_column")):
        fallback = getattr(loaded.config, option)
        if kwargs.get(key) is None and fallback is not None:
            kwargs[key] = fallback
        elif kwargs.get(key, "") is None:
            del kwargs[key]
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


# A file name holds at most 255 bytes; the longest st makes of an id is a shard's side index while `st train`
# downloads it from an s3:// cache: `<id>-<12 hex>-<6 digits>.json.part` (30 bytes after the id).
MAX_ID_BYTES = 255 - len("-0123456789ab-000000.json.part")


def check_dataset_id(ident: Any, where: str) -> str:
    """`ident` if it can be a dataset id, else a ConfigError naming it and the rule.

    An id is used verbatim as one file-name part of st's outputs: cache shards `shards/<bucket>/<id>-<hash>-N.tar`,
    prepare's generated datasets `conditioning/<id>/`, downloads `views/<id>/`; and in metric names
    (`eval_loss/<id>`). Never in a shard member name (those are `<sample hex key>.<suffix>`, so webdataset's
    key-ends-at-the-first-dot rule cannot split an id). Dots inside an id are therefore fine, as SimpleTuner allows
    them (`ltxvideo2-2.5-disney-video-768x512-49f`); what would turn the id into a path, a hidden or relative folder,
    or an unprintable name is refused. DEVIATION: SimpleTuner accepts any string."""
    if not isinstance(ident, str) or not ident:
        raise ConfigError(f"{where}: every dataset needs a non-empty string 'id'")
    problem = None
    if "/" in ident or "\\" in ident:
        problem = "contains a path separator ('/' or '\\')"
    elif ident in (".", ".."):
        problem = f"is the folder name {ident!r}"
    elif ident.startswith("."):
        problem = "starts with '.' (a hidden file name)"
    elif any(unicodedata.category(c) in ("Cc", "Cs") for c in ident):  # Cs: a lone surrogate, no UTF-8 file name
        problem = "contains a control character"
    elif len(ident.encode()) > MAX_ID_BYTES:
        problem = f"is longer than {MAX_ID_BYTES} bytes (in UTF-8)"
    if problem:
        raise ConfigError(f"{where}: dataset id {ident!r} {problem}; st names cache shards and folders after dataset "
                          "ids, so an id may not contain '/', '\\' or control characters, be '.' or '..', start with "
                          f"'.', or be longer than {MAX_ID_BYTES} bytes (dots inside are fine); rename the id (and "
                          "the entries that name it)")  # fmt: skip
    return ident


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
                embeds: dict[str, str] | None = None) -> DatasetSpec | ConditioningSpec | None:  # fmt: skip
    """Turn one multidatabackend entry into a DatasetSpec (a ConditioningSpec for `dataset_type: conditioning`); None
    for entries st ignores. `embeds`: `embed_ids` of the whole list."""
    config: Config = loaded.config
    entry = {normalise_key(str(k)): v for k, v in entry.items()}
    if "disable" in entry and "disabled" not in entry:  # SimpleTuner reads either spelling
        entry["disabled"] = entry.pop("disable")
    ident = entry.get("id")
    where = f"{list_path} entry {index}" + (f" (id '{ident}')" if ident else "")
    dataset_type = entry.get("dataset_type", (embeds or {}).get(ident, "image"))
    if dataset_type in IGNORED_DATASET_TYPES:  # before the id checks: st writes no file named by such an id
        log.info("ignoring dataset '%s' (dataset_type %s): %s", ident, dataset_type,
                 IGNORED_DATASET_TYPES[dataset_type])  # fmt: skip
        return None
    if dataset_type not in (*PRIMARY_DATASET_TYPES, "conditioning"):
        raise NotSupportedError(f"{where}: dataset_type '{dataset_type}' is not supported yet (st reads 'image', "
                                "'eval', 'video' and 'conditioning')")  # fmt: skip
    if coerce("disabled", entry.get("disabled", False), bool, where=where):
        log.info("dataset '%s' is disabled; skipping it", ident)
        return None
    storage = entry.get("type", "local")
    if storage != "local" and (storage not in REMOTE_TYPES or dataset_type == "conditioning"):
        # before the other keys: each storage type has keys of its own
        kinds = "type 'local'" if dataset_type == "conditioning" else f"types 'local', {', '.join(REMOTE_TYPES)}"
        raise NotSupportedError(f"{where}: storage type '{storage}' is not supported yet for this dataset; st reads "
                                f"{kinds}")  # fmt: skip
    check_dataset_id(ident, where)
    if "is_regularization_data" in entry and "is_regularisation_data" not in entry:  # SimpleTuner reads either
        entry["is_regularisation_data"] = entry.pop("is_regularization_data")
    if dataset_type == "conditioning":
        return _conditioning_entry(entry, loaded, list_path, ident, where)
    video = _video_settings(entry, dataset_type, storage, loaded, where)
    source = None
    if storage in REMOTE_TYPES:
        source = parse_source(storage, entry, lambda p: loaded.resolve_path(p, base=list_path.parent).resolve(), where)
        if uses_caption_column(storage, entry.get("caption_strategy"), where):  # read as st's parquet captions
            entry["caption_strategy"] = "parquet"
    if "caption_filter_list" in entry:
        raise ConfigError(f"{where}: caption_filter_list is read on a `dataset_type: text_embeds` entry only, as "
                          "SimpleTuner requires; move it to the text_embeds entry this dataset uses (the one its "
                          "`text_embeds` key names, else the default one), whose filters then apply to the captions "
                          "of every dataset using it")  # fmt: skip
    _check_entry_keys(entry, ident, where)
    if "instance_data_dir" not in entry and source is None:
        raise ConfigError(f"{where}: 'instance_data_dir' (the image folder) is required")

    hints = typing.get_type_hints(Config)
    values: dict[str, Any] = {}
    for key in PER_DATASET_OPTIONS:
        if key in entry:
            values[key] = coerce(key, entry[key], hints[key], OPTION_FIELDS[key].metadata["choices"], where)
        else:
            values[key] = getattr(config, key)
    values["crop_aspect_buckets"] = _normalise_aspect_buckets(values["crop_aspect_buckets"], where)
    if source is None:
        root = loaded.resolve_path(str(entry["instance_data_dir"]), base=list_path.parent).resolve()
    else:
        root = Path(f"<{storage} dataset '{ident}': downloaded by st prepare>")
    parquet = _parquet_spec(entry["parquet"], loaded, list_path.parent, where) if "parquet" in entry else None
    if parquet is not None and storage == "aws":  # SimpleTuner reads it from the bucket: a key, not a local file
        parquet = dataclasses.replace(parquet, path=Path(str(entry["parquet"]["path"]).lstrip("/")))
    if source is not None and entry.get("caption_strategy") == "parquet" and parquet is None:
        parquet = SOURCE_CAPTIONS
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
    generators = _generators(entry.get("conditioning"), where)
    linked = _id_list(entry.get("conditioning_data"), "conditioning_data", where)
    linked += tuple(i for i in (_generated_id(ident, g) for g in generators) if i not in linked)
    regularisation = coerce("is_regularisation_data", entry.get("is_regularisation_data", False), bool, where=where)
    return DatasetSpec(id=ident, root=root, parquet=parquet, repeats_explicit=explicit, dataset_type=dataset_type,
                       conditioning_data=linked, conditioning=generators, is_regularisation_data=regularisation,
                       source=source, video=video, schedule=DatasetSchedule.from_entry(entry, where),
                       **_caption_keys(entry, config, where), **_training_keys(entry, dataset_type, where),
                       **values)  # fmt: skip


def _training_keys(entry: dict[str, Any], dataset_type: str, where: str) -> dict[str, Any]:
    """timestep_sampling_offset (any finite number; unset, null or 0: none) and train_batch_size (a whole number in
    the global option's range; unset or null: the global train_batch_size). DEVIATION: SimpleTuner reads an offset
    that is not a number as an error only when training starts, and a NaN offset trains on NaN sigmas; st refuses
    both when the list is read."""
    import math

    out: dict[str, Any] = {}
    raw = entry.get("timestep_sampling_offset")
    if raw is not None and raw != "":
        try:
            if isinstance(raw, bool):
                raise ValueError
            offset = float(raw)
        except (TypeError, ValueError):
            offset = math.nan
        if not math.isfinite(offset):
            raise ConfigError(f"{where}: 'timestep_sampling_offset' must be a finite number (added to the normal draw "
                              f"of the flow schedule; about -1.0 to 1.0 is useful), got {raw!r}")  # fmt: skip
        out["timestep_sampling_offset"] = offset + 0.0  # -0.0 -> 0.0
    size = entry.get("train_batch_size")
    if size is not None and size != "":
        size = coerce("train_batch_size", size, int, where=where)
        check_option_range("train_batch_size", size, where)
        if dataset_type == "eval":  # SimpleTuner sizes eval datasets 1, whatever they set
            log.info("%s: train_batch_size is not read on an eval dataset (evaluated a sample at a time)", where)
        else:
            out["train_batch_size"] = size
    return out


def _caption_keys(entry: dict[str, Any], config: Config, where: str) -> dict[str, Any]:
    """disable_multiline_split, caption_shuffle and max_num_samples, checked as SimpleTuner checks them."""
    out: dict[str, Any] = {}
    out["disable_multiline_split"] = coerce("disable_multiline_split", entry.get("disable_multiline_split") or False,
                                            bool, where=where)  # fmt: skip
    cap = entry.get("max_num_samples")
    if cap is not None and cap != "":
        cap = coerce("max_num_samples", cap, int, where=where)
        if cap < 0:
            raise ConfigError(f"{where}: max_num_samples must be a whole number of samples (0 or unset: no limit), "
                              f"got {cap}")  # fmt: skip
        out["max_num_samples"] = cap or None  # SimpleTuner reads 0 as no limit
    out["caption_shuffle"] = _caption_shuffle(entry.get("caption_shuffle"), config, where)
    return out


def _caption_shuffle(block: Any, config: Config, where: str) -> CaptionShuffle | None:
    """An entry's `caption_shuffle` block; None unless it is enabled. Its seed defaults to the global seed."""
    if not block:
        return None
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: caption_shuffle must be an object such as {{\"enable\": true, \"count\": 2}}, "
                          f"got {block!r}")  # fmt: skip
    for key in block:
        if key not in CAPTION_SHUFFLE_KEYS:
            raise ConfigError(f"{where}: unknown caption_shuffle key '{key}'{suggest(str(key), CAPTION_SHUFFLE_KEYS)}")
    split_on = block.get("split_on", "comma")
    if split_on not in SHUFFLE_SPLITS:
        raise ConfigError(f"{where}: caption_shuffle.split_on must be one of {', '.join(SHUFFLE_SPLITS)}, got "
                          f"{split_on!r}")  # fmt: skip
    count, start = block.get("count", 1), block.get("position_start", 0)
    # SimpleTuner's own checks: a positive whole count, a non-negative whole position_start.
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"{where}: caption_shuffle.count must be a positive whole number, got {count!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ConfigError(f"{where}: caption_shuffle.position_start must be a whole number of tags (0 or more), got "
                          f"{start!r}")  # fmt: skip
    enable = coerce("caption_shuffle.enable", block.get("enable", False), bool, where=where)
    if not enable:
        return None
    seed = block.get("seed", config.seed)
    if seed is not None:
        seed = coerce("caption_shuffle.seed", seed, int, where=where)
    include = coerce("caption_shuffle.include_original", block.get("include_original", True), bool, where=where)
    return CaptionShuffle(count=count, seed=seed, split_on=split_on, position_start=start, include_original=include)


def _text_embed_filters(entries: list[Any], where: str) -> tuple[dict[str, Any], str | None]:
    """The enabled text_embeds entries' `caption_filter_list` values by id, and the id of the default one (marked
    `default: true`, else the first), as SimpleTuner assigns a dataset without a `text_embeds` key."""
    named = embed_ids(entries)
    found: dict[str, Any] = {}
    default = None
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        entry = {normalise_key(str(k)): v for k, v in entry.items()}
        ident = entry.get("id")
        if entry.get("dataset_type", named.get(ident)) != "text_embeds" or not isinstance(ident, str):
            continue
        if coerce("disabled", entry.get("disabled", entry.get("disable", False)), bool, where=where):
            continue
        found[ident] = entry.get("caption_filter_list")
        if default is None and coerce("default", entry.get("default", False), bool, where=where):
            default = ident
    return found, default or next(iter(found), None)


def load_caption_filters(value: Any, loaded: LoadedConfig, list_path: Path, dataset_id: str,
                         text_id: str) -> tuple[str, ...]:  # fmt: skip
    """A text_embeds entry's caption_filter_list: an inline list, a .txt file (one filter a line, kept verbatim but
    for its line break) or a .json file holding a list, as SimpleTuner reads them. Each substitution (`s/search/
    replace/`) is compiled here, so that a broken one stops before any work. DEVIATION: SimpleTuner skips a value of
    another kind (another file type, a JSON file not holding a list) without a word; st refuses it."""
    key = f"caption_filter_list of text_embeds dataset '{text_id}' (used by dataset '{dataset_id}')"
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        path = loaded.resolve_path(value, base=list_path.parent)
        suffix = path.suffix.lower()
        if suffix not in (".txt", ".json"):
            raise ConfigError(f"{list_path}: {key} is {value!r}; it must be a list of filters, or the path of a .txt "
                              "file (one filter a line) or a .json file holding a list")  # fmt: skip
        if not path.is_file():
            raise InputError(f"dataset '{dataset_id}': {key}: {path} does not exist; create the filter file or "
                             "fix the path")  # fmt: skip
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"dataset '{dataset_id}': {key}: cannot read {path}: {exc}") from None
        if suffix == ".json":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"dataset '{dataset_id}': {key}: {path} is not valid JSON: {exc}") from None
            if not isinstance(value, list):
                raise ConfigError(f"dataset '{dataset_id}': {key}: {path} must hold a JSON list of filters")
        else:
            import io

            value = [line.rstrip("\n") for line in io.StringIO(text, newline=None).readlines()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{list_path}: {key} must be a list of strings (filters), got {value!r}")
    filters = tuple(v for v in value if v)  # an empty line filters nothing
    for item in filters:
        sub = substitution(item)
        if sub is not None:
            try:
                re.compile(sub[0]).sub(sub[1], "")
            except re.error as exc:
                raise ConfigError(f"dataset '{dataset_id}': {key}: the substitution {item!r} is not a valid regular "
                                  f"expression: {exc}") from None  # fmt: skip
        else:
            try:
                re.compile(item)
            except re.error:
                log.warning("dataset '%s': caption filter %r is not a regular expression; it only removes that "
                            "exact text", dataset_id, item)  # fmt: skip
    return filters


def substitution(item: str) -> tuple[str, str] | None:
    """(search, replace) of a `s/search/replace` filter; None for a removal filter. SimpleTuner's training code
    takes exactly two slashes; its documentation and its filter tester also write a trailing one
    (`s/search/replace/`). DEVIATION: st reads both forms as a substitution (SimpleTuner's training reads the
    trailing-slash form as text to remove)."""
    if not item.startswith("s/"):
        return None
    if item.count("/") == 2:
        _, search, replace = item.split("/")
        return search, replace
    if item.count("/") == 3 and item.endswith("/"):
        _, search, replace, _ = item.split("/")
        return search, replace
    return None


def _video_settings(entry: dict[str, Any], dataset_type: str, storage: str, loaded: LoadedConfig, where: str) -> Any:
    """A video dataset's `video` block, validated; None for other datasets (SimpleTuner reads the block on video
    datasets only)."""
    if dataset_type != "video":
        if "video" in entry:
            log.info("%s: 'video' is read on dataset_type video only; ignoring it", where)
        return None
    if storage not in ("local", "huggingface"):
        raise NotSupportedError(f"{where}: dataset_type 'video' with storage type '{storage}' is not supported yet; "
                                "download the videos into a folder and use type 'local' with instance_data_dir")
    if entry.get("conditioning"):  # conditioning_data (clips paired by path): Wan VACE, pipeline.families.wan_vace
        raise NotSupportedError(f"{where}: 'conditioning' (generated conditioning images) on a video dataset is not "
                                "supported yet; generate the conditioning clips yourself and link their folder with "
                                "conditioning_data")  # fmt: skip
    from .video_settings import parse_video_block

    config = loaded.config
    return parse_video_block(entry.get("video"), where, framerate=config.framerate,
                             model_family=config.model_family, model_flavour=config.model_flavour)


def _id_list(value: Any, key: str, where: str) -> tuple[str, ...]:
    """An id or a list of ids (SimpleTuner accepts both)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{where}: '{key}' must be a dataset id or a list of dataset ids, got {value!r}")
    if len(set(items)) != len(items):
        raise ConfigError(f"{where}: '{key}' names a dataset twice: {items}")
    return tuple(items)


def _generated_id(source_id: str, generator: Any) -> str:
    from .generator_specs import dataset_id

    return dataset_id(source_id, generator)


def _generators(value: Any, where: str) -> tuple[Any, ...]:
    if value is None:
        return ()
    from .generator_specs import parse_generators

    return parse_generators(value, where)


def _conditioning_entry(entry: dict[str, Any], loaded: LoadedConfig, list_path: Path, ident: Any,
                        where: str) -> ConditioningSpec | None:  # fmt: skip
    """A `dataset_type: conditioning` entry. Image options on it (resolution, crop, captions, ...) are accepted and
    read by nothing: its images take their target's size and crop, and samples keep their target's captions."""
    if coerce("disabled", entry.get("disabled", False), bool, where=where):
        log.info("conditioning dataset '%s' is disabled; skipping it", ident)
        return None
    storage = entry.get("type", "local")
    if storage != "local":
        raise NotSupportedError(f"{where}: storage type '{storage}' is not supported yet; st reads type 'local'")
    check_dataset_id(ident, where)
    followed = []
    for key in entry:
        if key in CONDITIONING_KEYS:
            continue
        if key in ENTRY_KEYS and key not in ("conditioning_data", "conditioning", "is_regularisation_data"):
            followed.append(key)
            continue
        state = DATASET_KEY_STATES.get(key)
        if state is not None and not isinstance(state, Refused):
            continue
        raise ConfigError(f"{where}: key '{key}' does not apply to a conditioning dataset"
                          f"{suggest(key, CONDITIONING_KEYS)}")  # fmt: skip
    if followed:
        log.info("conditioning dataset '%s': %s not read: its images follow their target image's size and crop, "
                 "and samples keep their target's captions", ident, ", ".join(sorted(followed)))  # fmt: skip
    if "instance_data_dir" not in entry:
        raise ConfigError(f"{where}: 'instance_data_dir' (the conditioning image folder) is required")
    kind = entry.get("conditioning_type", "controlnet")
    if kind not in CONDITIONING_TYPES:
        raise ConfigError(f"{where}: conditioning_type {kind!r} is not one of {', '.join(CONDITIONING_TYPES)}"
                          f"{suggest(str(kind), CONDITIONING_TYPES)}")  # fmt: skip
    source = entry.get("source_dataset_id")
    if source is not None and not isinstance(source, str):
        raise ConfigError(f"{where}: source_dataset_id must be a dataset id, got {source!r}")
    root = loaded.resolve_path(str(entry["instance_data_dir"]), base=list_path.parent).resolve()
    return ConditioningSpec(ident, root, kind, source)


def _check_ranges(values: dict[str, Any], where: str) -> None:
    """The global options' ranges apply to an entry's own values too (see config.OPTION_RANGES)."""
    for key in PER_DATASET_OPTIONS:
        check_option_range(key, values[key], where)
    check_resolution(values["resolution"], values["resolution_type"], where)
    lo, hi = values["minimum_aspect_ratio"], values["maximum_aspect_ratio"]
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"{where}: minimum_aspect_ratio {lo} is larger than maximum_aspect_ratio {hi}")


def load_datasets(loaded: LoadedConfig) -> list[DatasetSpec]:
    """Read `data_backend_config` into the enabled image (and eval) datasets, in file order."""
    return load_dataset_list(loaded).images


def load_dataset_list(loaded: LoadedConfig) -> DatasetList:
    """Read `data_backend_config`: the enabled image and eval datasets in file order, their conditioning datasets
    (generated ones included), every link checked."""
    if not loaded.config.data_backend_config:
        raise ConfigError("option 'data_backend_config' is not set; point it at a multidatabackend.json dataset list")
    list_path = loaded.resolve_path(loaded.config.data_backend_config).resolve()
    specs: list[DatasetSpec] = []
    conditioning: list[ConditioningSpec] = []
    seen: set[str] = set()
    entries = read_dataset_list(list_path)
    filter_lists, default_text = _text_embed_filters(entries, str(list_path))
    loaded_filters: dict[str, tuple[str, ...]] = {}
    for index, entry in enumerate(entries):
        spec = parse_entry(entry, loaded, list_path, index, embed_ids(entries))
        if spec is None:
            continue
        text_id = {normalise_key(str(k)): v for k, v in entry.items()}.get("text_embeds")
        text_id = text_id if isinstance(text_id, str) and text_id else default_text
        if isinstance(spec, DatasetSpec) and filter_lists.get(text_id):
            if text_id not in loaded_filters:
                loaded_filters[text_id] = load_caption_filters(filter_lists[text_id], loaded, list_path, spec.id,
                                                               text_id)  # fmt: skip
            spec = dataclasses.replace(spec, caption_filters=loaded_filters[text_id])
        generated = [ConditioningSpec(_generated_id(spec.id, g), None, g.conditioning_type, spec.id, g)
                     for g in getattr(spec, "conditioning", ())]  # fmt: skip
        for item in generated:  # `<id>_conditioning_<type>`: only its length can break the rule
            check_dataset_id(item.id, f"{list_path}: the dataset generated for '{spec.id}'")
        for item in (spec, *generated):
            if item.id in seen:
                raise ConfigError(f"{list_path}: dataset id '{item.id}' is used twice; ids must be unique")
            seen.add(item.id)
        (conditioning if isinstance(spec, ConditioningSpec) else specs).append(spec)
        conditioning.extend(generated)
    if not any(s.dataset_type in ("image", "video") for s in specs):
        raise ConfigError(f"{list_path} has no enabled image or video dataset")
    check_schedules(specs, loaded.config, str(list_path))
    if filter_lists.get(default_text) and (loaded.config.validation_prompt or loaded.config.user_prompt_library):
        # DEVIATION: SimpleTuner also filters the validation prompts with the default text_embeds entry's filters.
        log.warning("the caption_filter_list of text_embeds dataset '%s' rewrites dataset captions only; st encodes "
                    "validation prompts as written (SimpleTuner filters them too): write them as the filters would "
                    "leave them", default_text)  # fmt: skip
    datasets = DatasetList(specs, conditioning)
    specs = _link_sources(datasets, list_path)
    for spec in specs:
        if spec.source is None and not spec.root.is_dir():
            raise InputError(f"dataset '{spec.id}': instance_data_dir {spec.root} does not exist or is not a folder")
    for cond in datasets.conditioning:
        if cond.root is not None and not cond.root.is_dir():
            raise InputError(f"conditioning dataset '{cond.id}': instance_data_dir {cond.root} does not exist or is "
                             "not a folder")  # fmt: skip
    return DatasetList(specs, datasets.conditioning)


def check_schedules(specs: list[DatasetSpec], config: Config, where: str) -> None:
    """SimpleTuner's checks of the training datasets' schedules (`_validate_schedule_windows`): each end at or after
    its start, at least one dataset sampled from the first step; a dataset whose start lies beyond the run is
    reported, as it will never be sampled."""
    training = [s for s in specs if s.dataset_type in ("image", "video")]
    for spec in training:
        sched = spec.schedule
        if sched.end_epoch is not None and sched.end_epoch < sched.start_epoch:
            raise ConfigError(f"{where}: dataset '{spec.id}' has end_epoch {sched.end_epoch} before start_epoch "
                              f"{sched.start_epoch}; set end_epoch >= start_epoch")  # fmt: skip
        if sched.end_step is not None and sched.start_step > 0 and sched.end_step < sched.start_step:
            raise ConfigError(f"{where}: dataset '{spec.id}' has end_step {sched.end_step} before start_step "
                              f"{sched.start_step}; set end_step >= start_step")  # fmt: skip
    if not any(s.schedule.starts_at_start() for s in training):
        starts = ", ".join(f"'{s.id}' (start_epoch {s.schedule.start_epoch}, start_step {s.schedule.start_step})"
                           for s in training)  # fmt: skip
        raise ConfigError(f"{where}: no dataset is sampled at the start of training: {starts}; set start_epoch <= 1 "
                          "and start_step <= 1 on at least one dataset")  # fmt: skip
    for spec in training:
        sched = spec.schedule
        if config.num_train_epochs and not config.max_train_steps and sched.start_epoch > config.num_train_epochs:
            log.warning("dataset '%s' starts at epoch %d, but training ends at epoch %d: it will never be sampled",
                        spec.id, sched.start_epoch, config.num_train_epochs)  # fmt: skip
        if config.max_train_steps and sched.start_step > config.max_train_steps:
            log.warning("dataset '%s' starts at step %d, but training stops at step %d: it will never be sampled",
                        spec.id, sched.start_step, config.max_train_steps)  # fmt: skip


def _link_sources(datasets: DatasetList, list_path: Path) -> list[DatasetSpec]:
    """Check every `conditioning_data` link; a conditioning dataset named by no image dataset is linked to its
    `source_dataset_id`, else it is an error. Returns the image specs with those links added."""
    by_id = datasets.conditioning_by_id()
    images = {s.id: s for s in datasets.images}
    for spec in datasets.images:
        for ident in spec.conditioning_data:
            if ident in by_id:
                continue
            kind = "an image dataset" if ident in images else "no enabled dataset"
            raise ConfigError(f"{list_path}: dataset '{spec.id}' names '{ident}' in conditioning_data, but that is "
                              f"{kind}; name a `dataset_type: conditioning` entry's id")  # fmt: skip
    linked = {i for s in datasets.images for i in s.conditioning_data}
    extra: dict[str, list[str]] = {}
    for cond in datasets.conditioning:
        if cond.id in linked:
            continue
        if cond.source_dataset_id not in images:
            hint = (f"its source_dataset_id '{cond.source_dataset_id}' is no enabled image dataset"
                    if cond.source_dataset_id else "no image dataset names it in conditioning_data")
            raise ConfigError(f"{list_path}: conditioning dataset '{cond.id}' is paired with nothing: {hint}. Add "
                              f"\"conditioning_data\": \"{cond.id}\" to the image dataset it belongs to")  # fmt: skip
        extra.setdefault(cond.source_dataset_id, []).append(cond.id)
    return [dataclasses.replace(s, conditioning_data=s.conditioning_data + tuple(extra[s.id])) if s.id in extra else s
            for s in datasets.images]  # fmt: skip
