"""`st check`: every problem of a config, its dataset list and its model, found at once without running a stage.

Each check runs on its own; a `UserError` it raises becomes one problem in the report (its message says what failed
and the fix), and the next check still runs. Only a config that cannot be read at all stops the rest. Nothing is
decoded or downloaded: dataset folders are listed, model folders are read through their metadata.

What the config needs of the machine (a CUDA GPU, a compute capability, a GPU-only package: `pipeline.machine`) is
decided against this machine, as `st train` would decide it here. With `any_machine` (`st check --any-machine`, for a
config written on one machine and trained on another) those needs are collected and listed apart; they are not
problems, and the checks they occur in go on to find the config's own problems.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .config import (
    LoadedConfig,
    build_config,
    load_config,
    normalise_key,
    parse_set,
    read_config_file,
    set_problem,
)
from .errors import InputError, MachineError, UserError
from .machine import ANY_MACHINE_HINT, deferred_machine_needs

if TYPE_CHECKING:
    from .datasets import ConditioningSpec, DatasetSpec


@dataclass
class CheckReport:
    """The problems found (each a message with its fix) and what was checked, in words."""

    config: Path
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    rejected_options: set[str] = field(default_factory=set)  # options already reported, left unset for the rest
    machine_needs: list[str] = field(default_factory=list)  # with any_machine: what the training machine needs

    @property
    def ok(self) -> bool:
        return not self.problems

    def attempt(self, check: Callable[..., None], *args: object) -> None:
        """Run one check; a user error it raises is recorded as a problem instead of stopping the others."""
        try:
            check(*args)
        except MachineError as exc:  # (raised only without any_machine)
            self.problems.append(f"{exc} {ANY_MACHINE_HINT}")
        except UserError as exc:
            self.problems.append(str(exc))


def run_check(config_path: Path, sets: Sequence[str] = (), any_machine: bool = False,
              stage_checks: Sequence[Callable[[LoadedConfig], None]] = ()) -> CheckReport:  # fmt: skip
    """Load the config, then check its model, its datasets and its prompt library, each independently.
    `any_machine`: list what the config needs of the machine in `machine_needs` instead of as problems.
    `stage_checks`: the stages' own checks of the loaded config (`st check` passes `pipeline.train.checks`')."""
    if not any_machine:
        return _run_check(config_path, sets, stage_checks)
    with deferred_machine_needs() as needs:
        report = _run_check(config_path, sets, stage_checks)
    report.machine_needs = needs
    return report


def _run_check(config_path: Path, sets: Sequence[str],
               stage_checks: Sequence[Callable[[LoadedConfig], None]]) -> CheckReport:  # fmt: skip
    report = CheckReport(config_path)
    loaded = _load(config_path, sets, report)
    if loaded is None:
        return report
    report.checked.append(f"config {loaded.path}")
    report.attempt(_check_model, loaded, report)
    report.attempt(_check_datasets, loaded, report)
    report.attempt(_check_prompt_library, loaded)
    report.attempt(_check_lycoris_settings, loaded)
    report.attempt(_check_base_precision, loaded)
    report.attempt(_check_crepa, loaded)
    report.attempt(_check_tread, loaded)
    report.attempt(_check_context_parallel, loaded)
    report.attempt(_check_attention, loaded)
    for check in stage_checks:  # the stages' own config checks (pipeline.train.checks), composed by the CLI
        report.attempt(check, loaded)
    return report


def _check_attention(loaded: LoadedConfig) -> None:
    """attention_mechanism as `st train` decides it before loading the model: the value, the family's transformer,
    and the packages and device its kernel needs (machine needs: a CUDA kernel needs a CUDA GPU, as
    base_model_precision's CUDA presets do)."""
    from .speed import check_attention_settings

    check_attention_settings(loaded.config)


def _check_context_parallel(loaded: LoadedConfig) -> None:
    """context_parallel_size, as `st train` checks it before loading the model."""
    from .families import get_family
    from .context_parallel_settings import check

    family = loaded.config.model_family
    if family is not None:
        check(loaded.config, family, get_family(family).denoiser.class_name)


def _check_tread(loaded: LoadedConfig) -> None:
    """TREAD routes the families st has routing for, as `st train` checks before loading the model."""
    from .tread_settings import check_family

    family, flavour = loaded.config.model_family, loaded.config.model_flavour
    if family is not None:  # Flux's kontext flavour trains as flux_kontext
        check_family(loaded.config.tread_config, "flux_kontext" if (family, flavour) == ("flux", "kontext") else family,
                     flavour)


def _check_crepa(loaded: LoadedConfig) -> None:
    """CREPA is for the video families, as `st train` checks before loading the model."""
    from .families import get_family
    from .video_settings import check_crepa_family

    if loaded.config.model_family is not None:
        check_crepa_family(bool(loaded.config.crepa_enabled), get_family(loaded.config.model_family))


def _check_lycoris_settings(loaded: LoadedConfig) -> None:
    """The lycoris_config file of a LyCORIS run, as `st train` reads it."""
    from .lycoris_settings import key_content

    key_content(loaded.config, loaded.base_dir)


def _check_base_precision(loaded: LoadedConfig) -> None:
    """Whether st can run base_model_precision and the text encoders' precisions, and what they need of the
    machine, as `st train` and `st cache` check before any work."""
    from .families import get_family
    from .quantise import check
    from .quantise_modules import check_text_encoder_precisions, text_encoder_precisions

    config = loaded.config
    if config.model_family is None:  # a missing or rejected model_family is the model check's problem
        return
    check(config, base_dir=loaded.base_dir)
    check_text_encoder_precisions(text_encoder_precisions(config), get_family(config.model_family),
                                  trained=config.train_text_encoder)  # fmt: skip


def _load(path: Path, sets: Sequence[str], report: CheckReport) -> LoadedConfig | None:
    """The loaded config; when it fails, every option that fails on its own is a problem, and the options that pass
    still make a config for the other checks (None when not even that can be built)."""
    try:
        return load_config(path, sets)
    except UserError as exc:
        failure = str(exc)
    loaded, problems = _salvage(path, sets, report.rejected_options)
    report.problems.extend(problems or [failure])
    return loaded


def _salvage(path: Path, sets: Sequence[str], rejected: set[str]) -> tuple[LoadedConfig | None, list[str]]:
    """Validate the file's options and each `--set` one at a time: (a config of those that pass, the failures)."""
    try:
        raw = {normalise_key(str(k)): v for k, v in read_config_file(path.resolve()).items()}
    except UserError:
        return None, []
    problems, good = [], {}
    for key, value in raw.items():
        try:
            build_config({key: value}, where=str(path))
            good[key] = value
        except UserError as exc:
            problems.append(str(exc))
            rejected.add(key)
    for item in sets:
        try:
            problem = set_problem(item)
        except UserError as exc:  # not key=value at all
            problem = str(exc)
        if problem is None:
            key, value = parse_set(item)
            good[key] = value
        else:
            problems.append(problem)
    try:
        config, _ = build_config(good, where=str(path))
    except UserError as exc:
        return None, [*problems, str(exc)]
    return LoadedConfig(config=config, path=path.resolve()), problems


def _check_model(loaded: LoadedConfig, report: CheckReport) -> None:
    """model_family is set and known; a local model exists and is of that family; a hub id is noted (not fetched)."""
    from .families import check_model_family, get_family
    from .families.hub import hub_offline, looks_like_path
    from .families.identity import model_sources

    if loaded.config.model_family is None and "model_family" in report.rejected_options:
        return  # its value was reported already; "is not set" would be a second problem for one cause
    sources = model_sources(loaded)
    family = get_family(loaded.config.model_family)
    model = Path(sources.model)
    if model.exists():
        check_model_family(family, sources.model)
        family.for_run(loaded.config.model_flavour, sources.model)  # a flavour of another pipeline than the folder's
        report.checked.append(f"model {model} ({family.name})")
    elif looks_like_path(sources.model):
        raise InputError(f"pretrained_model_name_or_path {loaded.resolve_path(sources.model)} does not exist; point "
                         "it at a diffusers folder, a .safetensors checkpoint or a hub id")  # fmt: skip
    else:
        offline = ", which HF_HUB_OFFLINE=1 allows only from the hub cache" if hub_offline() else ""
        report.checked.append(f"model {sources.model} ({family.name}; a hub id, downloaded by `st cache`{offline})")
    for option, source in (("pretrained_vae_model_name_or_path", sources.vae),
                           ("pretrained_t5_model_name_or_path", sources.t5)):  # fmt: skip
        if source is not None and not Path(source).exists() and looks_like_path(source):
            raise InputError(f"{option} {loaded.resolve_path(source)} does not exist; point it at a local folder or "
                             "a hub id, or remove the option")  # fmt: skip
    if family.check_config is not None:  # what the family trains otherwise in SimpleTuner (flux's flavours, FLUX.2)
        family.check_config(loaded.config, family)
    _check_sourced_parts(family, sources.model, report)


def _check_sourced_parts(family, model: str, report: CheckReport) -> None:
    """Text encoders the family may read from another hub repository (HiDream's Llama): where `st cache` will load
    each from. With HF_HUB_OFFLINE=1, one the model lacks must be in the hub cache. Nothing is fetched."""
    from .families.hub import hub_has_folder, hub_offline
    from .families.sources import has_component

    for spec in (s for s in family.text_encoders if s.source):
        parts = (spec.model, spec.tokenizer)
        names = ", ".join(f"{c.subfolder}/" for c in parts)
        if not Path(model).is_dir():
            report.checked.append(f"{names}: from the hub repository {model} when it has them, else from {spec.source}")
            continue
        missing = [c.subfolder for c in parts if not has_component(Path(model, c.subfolder), c)]
        if not missing:
            report.checked.append(f"{names}: from the model folder")
            continue
        where = f"the hub repository {spec.source} ({', '.join(f'{m}/' for m in missing)})"
        if not hub_offline():
            report.checked.append(f"{names}: not in the model folder; `st cache` loads them from {where}")
        elif all(hub_has_folder(spec.source, m) for m in missing):
            report.checked.append(f"{names}: not in the model folder; from {where}, in the hub cache")
        else:
            raise InputError(f"the {family.name} model {model} has no {', '.join(f'{m}/' for m in missing)} and "
                             f"HF_HUB_OFFLINE=1 while the hub cache lacks {where}: copy them into the model folder, "
                             f"or download {spec.source} where there is network")  # fmt: skip


def _check_datasets(loaded: LoadedConfig, report: CheckReport) -> None:
    """The dataset list by the stages' own rules; when they refuse it, each entry on its own, so that every bad
    entry and every missing folder is listed. Each image folder must be a readable folder."""
    from .datasets import load_dataset_list

    try:
        lists = load_dataset_list(loaded)
    except UserError:
        if not _each_entry(loaded, report):
            raise
        return
    specs = lists.images
    for spec in [*(s for s in specs if s.source is None), *(c for c in lists.conditioning if c.root is not None)]:
        report.attempt(_check_folder, spec)
    report.checked.append(f"{len(specs)} dataset(s): {', '.join(spec.id for spec in specs)}")
    for spec in (s for s in specs if s.source is not None):
        report.checked.append(f"dataset '{spec.id}': {spec.source.location()} (downloaded by st prepare)")
    if lists.conditioning:
        named = [f"{c.id} ({c.conditioning_type}{', generated by st prepare' if c.generator else ''})"
                 for c in lists.conditioning]  # fmt: skip
        report.checked.append(f"{len(named)} conditioning dataset(s): {', '.join(named)}")


def _each_entry(loaded: LoadedConfig, report: CheckReport) -> bool:
    """Check every entry of the dataset list and its folder separately; whether that found any problem."""
    from .datasets import embed_ids, parse_entry, read_dataset_list

    if not loaded.config.data_backend_config:
        return False
    list_path = loaded.resolve_path(loaded.config.data_backend_config).resolve()
    before = len(report.problems)
    try:
        entries = read_dataset_list(list_path)
    except UserError as exc:
        report.problems.append(str(exc))
        return True
    for index, entry in enumerate(entries):
        try:
            spec = parse_entry(entry, loaded, list_path, index, embed_ids(entries))
        except UserError as exc:
            report.problems.append(str(exc))
            continue
        if spec is not None and spec.root is not None and getattr(spec, "source", None) is None:
            report.attempt(_check_folder, spec)
    return len(report.problems) > before


def _check_folder(spec: DatasetSpec | ConditioningSpec) -> None:
    """The image folder exists and can be listed; a parquet caption file exists (no image is opened)."""
    if not spec.root.is_dir():
        raise InputError(f"dataset '{spec.id}': instance_data_dir {spec.root} does not exist or is not a folder; "
                         "create it or fix instance_data_dir in the dataset list")  # fmt: skip
    try:
        with os.scandir(spec.root) as entries:
            next(entries, None)
    except OSError as exc:
        raise InputError(f"dataset '{spec.id}': cannot read instance_data_dir {spec.root} ({exc.strerror}); give "
                         "this user read access to it") from None  # fmt: skip
    parquet = getattr(spec, "parquet", None)  # conditioning datasets have none
    if parquet is not None and not parquet.path.is_file():
        raise InputError(f"dataset '{spec.id}': parquet file {parquet.path} does not exist; fix parquet.path "
                         "in the dataset list")  # fmt: skip


def _check_prompt_library(loaded: LoadedConfig) -> None:
    """user_prompt_library, when set, is a readable prompt file."""
    from .prompts import validation_prompts

    config = loaded.config
    if config.user_prompt_library:
        validation_prompts(None, config.user_prompt_library, loaded.resolve_path)
