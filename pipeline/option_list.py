"""What `st options` and `st config show` report: every option with its SimpleTuner state, and the effective config
with where each value came from.

Both read the option declarations (`pipeline.config.Config`) and the state table (`pipeline.simpletuner`) only; no
model code is imported, so both commands are instant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (
    CACHE,
    OPTION_FIELDS,
    PREPARE,
    PUBLISH,
    SET_ORIGIN,
    TRAIN,
    Config,
    load_config,
    normalise_key,
    parse_set,
    read_config_file,
)
from .console import show_value
from .errors import ConfigError
from .simpletuner import OPTION_STATES, UNUSED_FIELDS, Accepted, Alias, OptionState, Refused

STAGES = (PREPARE, CACHE, TRAIN, PUBLISH)
IMPLEMENTED = "implemented"


# --------------------------------------------------------------------------------------------------- st options


@dataclass(frozen=True)
class OptionInfo:
    """One row of `st options`. `state` is implemented, `alias of X`, accepted or refused; `notes` holds the help
    text and choices, the alias's value mapping, the reason an option is accepted or the feature a refusal names."""

    name: str
    type: str
    default: Any
    stages: tuple[str, ...]
    in_key: str
    state: str
    notes: str

    def matches(self, word: str) -> bool:
        word = word.lower()
        return word in self.name.lower() or word in self.notes.lower() or word in self.state.lower()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _in_key(field: dataclasses.Field) -> str:
    """yes, no, or the stages whose key it enters (see `pipeline.config.opt`)."""
    key = field.metadata["key"]
    if key is True:
        return "yes"
    return ",".join(stage for stage in STAGES if stage in key) if key else "no"


def _stages(field: dataclasses.Field) -> tuple[str, ...]:
    return tuple(stage for stage in STAGES if stage in field.metadata["stages"])


def _implemented(field: dataclasses.Field, default: Any) -> OptionInfo:
    unused = UNUSED_FIELDS.get(field.name)
    if unused is not None:  # loaded, read by nothing
        return OptionInfo(field.name, str(field.type), default, _stages(field), _in_key(field), "accepted",
                          f"ignored: {unused.reason}.")  # fmt: skip
    choices = field.metadata["choices"]
    notes = " ".join(part for part in (
        field.metadata["help"],
        f"choices: {', '.join(show_value(c) for c in choices)}." if choices else "",
    ) if part)  # fmt: skip
    return OptionInfo(field.name, str(field.type), default, _stages(field), _in_key(field), IMPLEMENTED, notes)


def _reference_only(name: str, state: OptionState) -> OptionInfo:
    if isinstance(state, Alias):
        target = OPTION_FIELDS[state.target]
        mapping = "" if state.values is None else ", ".join(
            f"{show_value(given)} -> {state.target}={show_value(value) if value is not None else '(unchanged)'}"
            for given, value in state.values.items())  # fmt: skip
        default = getattr(Config(), state.target) if state.values is None else None
        kind = str(target.type) if state.values is None else "bool"
        return OptionInfo(name, kind, default, _stages(target), _in_key(target), f"alias of {state.target}",
                          mapping or f"SimpleTuner's other name for {state.target}.")  # fmt: skip
    if isinstance(state, Refused):
        return OptionInfo(name, "-", state.default, (), "-", "refused",
                          f"feature st lacks: {state.feature}; any value but the default stops with exit 2.")
    assert isinstance(state, Accepted)
    return OptionInfo(name, "-", None, (), "-", "accepted", f"ignored: {state.reason}.")


def all_options() -> list[OptionInfo]:
    """Every option st knows: its Config fields and SimpleTuner's other names, sorted by name."""
    defaults = Config()
    rows = [_implemented(field, getattr(defaults, name)) for name, field in OPTION_FIELDS.items()]
    rows += [_reference_only(name, state) for name, state in OPTION_STATES.items() if name not in OPTION_FIELDS]
    return sorted(rows, key=lambda row: row.name)


def list_options(stage: str | None = None, search: str | None = None) -> list[OptionInfo]:
    """The options a stage reads (all with `stage` None; accepted and refused ones are read by no stage), whose
    name, help or state contains `search`."""
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"--stage {stage!r} is not a stage; choose one of {', '.join(STAGES)}")
    return [row for row in all_options()
            if (stage is None or stage in row.stages) and (not search or row.matches(search))]  # fmt: skip


# ----------------------------------------------------------------------------------------------- st config show


@dataclass(frozen=True)
class EffectiveOption:
    """An option's value after loading, and where it came from: default, file, --set, `alias X (file)`,
    `alias X (--set)`, or derived (computed from other options while loading)."""

    name: str
    value: Any
    origin: str
    default: Any

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "origin": self.origin, "default": self.default}


@dataclass(frozen=True)
class SetAside:
    """A SimpleTuner option the config carries that st reads nowhere (accepted, or refused at its default)."""

    name: str
    value: Any
    origin: str
    reason: str


@dataclass(frozen=True)
class EffectiveConfig:
    config: Path
    options: list[EffectiveOption]
    set_aside: list[SetAside]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": str(self.config),
            "options": {o.name: o.to_dict() for o in self.options},
            "ignored": {s.name: {"value": s.value, "origin": s.origin, "reason": s.reason} for s in self.set_aside},
        }


def _given(path: Path, sets: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options the file and the --set list name, keys normalised: (file, --set)."""
    from_file = {normalise_key(str(k)): v for k, v in read_config_file(path).items()}
    return from_file, dict(parse_set(item) for item in sets)


def _alias_origin(target: str, given: dict[str, Any], where: str) -> str | None:
    """`alias X (where)` when an alias in `given` sets `target` (use_8bit_adam false sets nothing)."""
    for name, value in given.items():
        state = OPTION_STATES.get(name)
        sets_target = isinstance(state, Alias) and state.target == target
        if sets_target and (state.values is None or state.target_value(value) is not None):
            return f"alias {name} ({where})"
    return None


def _origin(name: str, from_file: dict[str, Any], from_set: dict[str, Any], explicit: frozenset[str]) -> str | None:
    """Where `name`'s value came from, following `build_config`'s order: --set, an alias in --set, the file, an alias
    in the file; None when nothing named it."""
    if name in from_set:
        return SET_ORIGIN
    by_alias = _alias_origin(name, from_set, SET_ORIGIN)
    if by_alias:
        return by_alias
    if name in from_file:
        return "file"
    return _alias_origin(name, from_file, "file") or ("file" if name in explicit else None)


def _set_aside_reason(state: OptionState) -> str:
    if isinstance(state, Refused):
        return f"at its default; st does not implement {state.feature}"
    assert isinstance(state, Accepted)
    return state.reason


def effective_config(path: Path, sets: Sequence[str] = (), everything: bool = False) -> EffectiveConfig:
    """The loaded config's options that were given or differ from their default (all of them with `everything`),
    with their origins, and the SimpleTuner options it sets aside. Loading errors stop here as in every stage."""
    loaded = load_config(path, sets)
    from_file, from_set = _given(Path(path), sets)
    defaults = Config()
    options = []
    for name in OPTION_FIELDS:
        value, default = getattr(loaded.config, name), getattr(defaults, name)
        origin = _origin(name, from_file, from_set, loaded.explicit)
        if origin is None:
            origin = "default" if value == default else "derived"
        if everything or origin != "default":
            options.append(EffectiveOption(name, value, origin, default))
    set_aside = [SetAside(name, value, SET_ORIGIN if name in from_set else "file",
                          _set_aside_reason(OPTION_STATES[name]))
                 for name, value in sorted(loaded.ignored.items())]  # fmt: skip
    return EffectiveConfig(loaded.path or Path(path), options, set_aside)
