"""Where each component of a model is read from: the model itself, or, for a text encoder the model does not ship
(HiDream's Llama), the hub repository its `TextEncoderSpec.source` names. Loading, identity and `st check` agree
through `component_origin`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError
from pipeline.families.hub import hub_has_folder, hub_problem
from pipeline.families.spec import Component, Family

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")


@dataclass(frozen=True)
class Origin:
    """A component's source (folder, file or hub id), its subfolder there and the revision to read."""

    source: str
    subfolder: str | None
    revision: str | None
    fallback: bool = False  # read from the family's `source` because the model lacks it


def has_component(folder: Path, component: Component) -> bool:
    """Whether `folder` (the component's own folder) holds what `component` needs to load."""
    if component.class_name.endswith(("Tokenizer", "TokenizerFast")):
        return any((folder / name).is_file() for name in _TOKENIZER_FILES)
    if component.class_name.endswith("Scheduler"):
        return (folder / "scheduler_config.json").is_file()
    if component.class_name.endswith("Processor"):  # an image processor and its tokenizer (Qwen-Image-Edit)
        return (folder / "preprocessor_config.json").is_file() and any((folder / n).is_file() for n in _TOKENIZER_FILES)
    return (folder / "config.json").is_file()


def fallback_source(family: Family, component: Component) -> str | None:
    """The hub repository that holds `component` when the model lacks it (None: the model must have it)."""
    return next((s.source for s in family.text_encoders if component in (s.model, s.tokenizer)), None)


def component_origin(family: Family, model: str, component: Component, revision: str | None = None) -> Origin:
    """Where `component` of the model `model` is read from: the model when it has the component's subfolder (or is a
    single file), else the family's fallback source for it (SimpleTuner's repository; `revision` is the model's and
    does not apply there)."""
    own = Origin(model, component.subfolder, revision)
    fallback = fallback_source(family, component)
    if fallback is None:
        return own
    path = Path(model).expanduser()
    if path.is_file():
        return own
    present = (has_component(path / component.subfolder, component) if path.is_dir()
               else hub_has_folder(model, component.subfolder, revision))  # fmt: skip
    return own if present else Origin(fallback, component.subfolder, None, fallback=True)


def unreachable_fallback(family: Family, model: str, origin: Origin, error: BaseException) -> InputError:
    """The error for a part the model lacks and its fallback repository could not provide: what is missing, where st
    looked and the fixes."""
    sub = origin.subfolder
    return InputError(
        f"the {family.name} model {model!r} has no {sub}/ and st could not read it from the hub repository "
        f"{origin.source} ({sub}/), where SimpleTuner loads it: {hub_problem(error)}. Copy {sub}/ into the model "
        f"folder, or download {origin.source} where there is network so that the hub cache holds it"
    )
