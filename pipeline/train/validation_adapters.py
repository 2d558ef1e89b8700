"""Extra LoRA adapters while validating (`validation_adapter_path` / `validation_adapter_config`), as SimpleTuner's
helpers/training/validation_adapters.py and its validator's `_temporary_validation_adapters` do.

Each validation renders once per adapter *run*: the base run (the weights being trained, as always) and one run per
adapter set, each set loaded into the validation pipeline with diffusers' `load_lora_weights` beside the trained
adapter (which stays active at its own scale), at its strength, and removed after the run, so training continues on
exactly the modules, parameters and `requires_grad` flags it had. `validation_adapter_mode`: adapter_only (the default)
renders only the adapter run, comparison renders the base run and then the adapter run (its files named
`<prompt>__<slug>-...`), none loads nothing. A value is a local .safetensors file or a folder holding one (from the
working folder first, else beside the config, as every st path), or a Hugging Face repo id `org/repo` or
`org/repo:weight_name.safetensors` (default pytorch_lora_weights.safetensors), downloaded through the hub cache.

DEVIATION: SimpleTuner's per-stage adapters (`target_stage`, multi-stage validation) are refused; st validates with
cached prompt embeddings and no text encoder in the pipeline, so an adapter holding text-encoder weights is refused
(SimpleTuner's pipeline would apply them to its text encoder).
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError, InputError
from ..log import get_logger

log = get_logger("train")

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
MODES = ("adapter_only", "comparison", "none")
OPTIONS = ("validation_adapter_path", "validation_adapter_name", "validation_adapter_strength",
           "validation_adapter_mode", "validation_adapter_config")  # fmt: skip
# Raw key prefixes of text-encoder LoRA weights: diffusers' (text_encoder., text_encoder_2.) and kohya's (lora_te_...).
_TEXT_ENCODER_KEY = re.compile(r"^(text_encoder(_\d)?\.|lora_te\d?_|te\d?\.)")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to load: a local safetensors file, or a hub repo id and the file in it."""

    location: str
    weight_name: str | None
    strength: float
    adapter_name: str | None = None
    is_local: bool = True
    option: str = "validation_adapter_path"  # the option that named it, for messages


@dataclass(frozen=True)
class AdapterRun:
    """One rendering pass of a validation: the base run (no extra adapter) or a set of adapters."""

    label: str | None
    slug: str
    adapters: tuple[AdapterSpec, ...]

    @property
    def is_base(self) -> bool:
        return not self.adapters

    @property
    def tag(self) -> str:
        """What the run adds to its files' names (SimpleTuner's `<shortname>__<slug>`)."""
        return f"__{self.slug}" if self.adapters else ""


BASE = AdapterRun(label=None, slug="", adapters=())


def _slugify(value: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", value.strip().lower()).strip("_") or "adapter"


def _stem(value: str) -> str:
    name = Path(value.rstrip("/").split(":", 1)[0]).name
    return Path(name).stem or name or "adapter"


def _strength(value: Any, option: str) -> float:
    try:
        scale = float(1.0 if value is None else value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option}: strength {value!r} is not a number") from None
    if not scale > 0:
        raise ConfigError(f"{option}: strength {value!r} must be greater than zero (SimpleTuner's rule)")
    return scale


def spec(value: Any, strength: float, adapter_name: str | None, base_dir: Path, option: str) -> AdapterSpec:
    """The adapter `value` names: an existing local file or folder, else a hub repo id; ConfigError for a path that
    is neither (a missing file), naming `option`."""
    from ..config import resolve_relative_path

    text = str(value or "").strip()
    if not text:
        raise ConfigError(f"{option}: an adapter path is empty")
    name = (adapter_name or "").strip() or None
    local = resolve_relative_path(text, base_dir)
    if local.exists():
        return AdapterSpec(str(local), _weight_file(local, option).name, strength, name, True, option)
    repo, _, weight = text.partition(":")
    repo, weight = repo.strip(), weight.strip() or DEFAULT_WEIGHT_NAME
    if not _REPO_ID.match(repo) or repo.endswith(".safetensors") or Path(text).expanduser().is_absolute():
        raise ConfigError(f"{option} {text!r}: no such file or folder (looked in the working folder and beside the "
                          f"config), and not a Hugging Face repo id (org/repo or org/repo:weights.safetensors)")
    if not weight.endswith(".safetensors"):
        raise ConfigError(f"{option} {text!r}: st loads only safetensors adapter files, not {weight!r}")
    return AdapterSpec(repo, weight, strength, name, False, option)


def _weight_file(local: Path, option: str) -> Path:
    """The safetensors file of a local adapter: the file itself, or a folder's pytorch_lora_weights.safetensors (else
    its only .safetensors file)."""
    if local.is_file():
        if local.suffix != ".safetensors":
            raise ConfigError(f"{option} {local}: st loads only safetensors adapter files")
        return local
    if (local / DEFAULT_WEIGHT_NAME).is_file():
        return local / DEFAULT_WEIGHT_NAME
    found = sorted(local.glob("*.safetensors"))
    if len(found) != 1:
        raise ConfigError(f"{option} {local}: the folder holds {len(found)} .safetensors files and no "
                          f"{DEFAULT_WEIGHT_NAME}; name the file itself")  # fmt: skip
    return found[0]


def _parse_config(value: Any, base_dir: Path) -> Any:
    """validation_adapter_config as SimpleTuner reads it: a list/dict, inline JSON (or a Python literal), or the path
    of a JSON file."""
    from ..config import resolve_relative_path

    if value in (None, "", "None") or isinstance(value, (list, dict)):
        return value
    text = str(value).strip()
    if text.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError) as error:
                raise ConfigError(f"validation_adapter_config: not JSON ({error})") from None
    path = resolve_relative_path(text, base_dir)
    if not path.is_file():
        raise ConfigError(f"validation_adapter_config {text!r}: no such JSON file, and not inline JSON")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"validation_adapter_config {path}: not JSON ({error})") from None


def _config_run(entry: Any, base_dir: Path) -> tuple[str | None, list[AdapterSpec]]:
    option = "validation_adapter_config"
    if isinstance(entry, str):
        return _stem(entry), [spec(entry, 1.0, None, base_dir, option)]
    if not isinstance(entry, dict):
        raise ConfigError(f"{option}: an entry must be a path or an object, not {entry!r}")
    if "target_stage" in entry or any(isinstance(a, dict) and "target_stage" in a
                                      for a in entry.get("adapters") or entry.get("paths") or []):  # fmt: skip
        raise ConfigError(f"{option}: target_stage (per-stage adapters of multi-stage validation) is not implemented "
                          f"by st; remove it")  # fmt: skip
    label = entry.get("label") or entry.get("name")
    strength = _strength(entry.get("strength", entry.get("scale")), option)
    name = entry.get("adapter_name")
    if "path" in entry and "paths" not in entry and "adapters" not in entry:
        return label or _stem(str(entry["path"])), [spec(entry["path"], strength, name, base_dir, option)]
    items = entry.get("adapters", entry.get("paths"))
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{option}: entry {entry!r} names no adapter (give `path`, or a list as `adapters`/`paths`)")
    specs = []
    for item in items:
        if isinstance(item, str):
            specs.append(spec(item, strength, name, base_dir, option))
        elif isinstance(item, dict) and item.get("path") is not None:
            specs.append(spec(item["path"], _strength(item.get("strength", item.get("scale", strength)), option),
                              item.get("adapter_name") or name, base_dir, option))  # fmt: skip
        else:
            raise ConfigError(f"{option}: adapter {item!r} has no `path`")
    return label or _stem(specs[0].location), specs


def build_runs(options: Any, base_dir: Path | None = None) -> list[AdapterRun]:
    """The runs of each validation (SimpleTuner's build_validation_adapter_runs): [BASE] when no adapter is set.
    ConfigError (exit 2) naming the option for a bad value or a missing file."""
    base_dir = base_dir or Path.cwd()
    path = (getattr(options, "validation_adapter_path", None) or "").strip() or None
    raw_config = getattr(options, "validation_adapter_config", None)
    mode = getattr(options, "validation_adapter_mode", "adapter_only") or "adapter_only"
    if mode not in MODES:
        raise ConfigError(f"validation_adapter_mode {mode!r}: expected one of {', '.join(MODES)}")
    if path and raw_config not in (None, "", [], {}):
        raise ConfigError("Provide either validation_adapter_path or validation_adapter_config, not both")
    strength = _strength(getattr(options, "validation_adapter_strength", 1.0), "validation_adapter_strength")
    name = getattr(options, "validation_adapter_name", None)
    found: list[tuple[str | None, list[AdapterSpec]]] = []
    if path and mode != "none":
        found.append(((name or "").strip() or _stem(path), [spec(path, strength, name, base_dir,
                                                                  "validation_adapter_path")]))  # fmt: skip
    config = _parse_config(raw_config, base_dir)
    if config not in (None, "", [], {}):
        entries = config.get("runs", [config]) if isinstance(config, dict) else config
        if not isinstance(entries, list):
            raise ConfigError("validation_adapter_config must be a list of runs or an object with a `runs` list")
        found += [_config_run(entry, base_dir) for entry in entries]
    runs, slugs = [], set()
    for label, specs in found:
        display = label or specs[0].adapter_name or _stem(specs[0].location)
        slug, n = _slugify(display), 2
        while slug in slugs:
            slug, n = f"{_slugify(display)}_{n}", n + 1
        slugs.add(slug)
        runs.append(AdapterRun(display, slug, tuple(specs)))
    include_base = not (path and mode == "adapter_only")  # a config's runs always follow a base run
    return ([BASE] if include_base or not runs else []) + runs


def check(config: Any, base_dir: Path | None, family: Any) -> None:
    """The adapters as `st train` reads them, and whether the family's validation pipeline can load a LoRA; run
    before any training work."""
    runs = build_runs(config, base_dir)
    if any(not run.is_base for run in runs) and not config.validation_disable:
        pipeline_class = family.load_pipeline_class()
        if not hasattr(pipeline_class, "load_lora_weights"):
            raise ConfigError(f"validation_adapter_path / validation_adapter_config: {pipeline_class.__name__} "
                              f"(model_family {family.name}) cannot load LoRA adapters; remove the option")


def _weights_file(adapter: AdapterSpec) -> Path:
    """The adapter's local safetensors file; a hub adapter is fetched into (or read from) the hub cache."""
    if adapter.is_local:
        local = Path(adapter.location)
        return local if local.is_file() else local / str(adapter.weight_name)
    from huggingface_hub import hf_hub_download

    from ..families.hub import hub_errors, hub_problem

    try:
        return Path(hf_hub_download(adapter.location, str(adapter.weight_name)))
    except hub_errors() as error:  # network, authorisation, a missing file: one message naming the option
        raise InputError(f"{adapter.option} {adapter.location}:{adapter.weight_name}: cannot fetch it from the "
                         f"Hugging Face hub ({hub_problem(error)})") from None


def fetch(runs: list[AdapterRun]) -> dict[AdapterSpec, Path]:
    """Each adapter's safetensors file, fetched (a hub adapter) and checked now, before training starts."""
    files = {}
    for run in runs:
        for adapter in run.adapters:
            if adapter not in files:
                files[adapter] = _weights_file(adapter)
                _check_keys(files[adapter], adapter.option)
    return files


def _check_keys(file: Path, option: str) -> None:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as weights:
        keys = list(weights.keys())
    text = [key for key in keys if _TEXT_ENCODER_KEY.match(key)]
    if text:
        raise InputError(f"{option} {file}: {len(text)} of its weights are text-encoder LoRA weights (e.g. "
                         f"{text[0]!r}); st validates from cached prompt embeddings, without the text encoders, so it "
                         f"cannot apply them: use an adapter of the denoiser only")  # fmt: skip


@contextlib.contextmanager
def attached(pipe: Any, denoiser: Any, run: AdapterRun, files: dict[AdapterSpec, Path] | None = None) -> Iterator[None]:
    """`run`'s adapters loaded into `pipe` (whose denoiser is `denoiser`, the module being trained) beside the active
    adapters, at their strengths; afterwards the denoiser has exactly its modules, active adapters, parameters and
    requires_grad flags back (SimpleTuner's `_temporary_validation_adapter_specs`). `files`: `fetch`'s."""
    if run.is_base:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = {name: list(module.active_adapters) for name, module in denoiser.named_modules()
              if isinstance(module, BaseTunerLayer)}  # fmt: skip
    flags = [(param, param.requires_grad) for param in denoiser.parameters()]
    had_config = "peft_config" in denoiser.__dict__
    loaded_flag = denoiser.__dict__.get("_hf_peft_config_loaded")
    names: list[str] = []
    try:
        for n, adapter in enumerate(run.adapters):
            name = (adapter.adapter_name or (run.slug if len(run.adapters) == 1 else f"{run.slug}_{n}")).strip()
            base, k = name, 2
            while name in names or name in getattr(denoiser, "peft_config", {}):
                name, k = f"{base}_{k}", k + 1
            file = (files or {}).get(adapter) or fetch([AdapterRun(run.label, run.slug, (adapter,))])[adapter]
            try:
                pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name,
                                       use_safetensors=True)  # fmt: skip
            except (ValueError, KeyError, RuntimeError) as error:
                raise InputError(f"{adapter.option} {file}: diffusers cannot load it into {type(denoiser).__name__} "
                                 f"({error})") from None  # fmt: skip
            names.append(name)
            log.info("validation: adapter %s (%s) at strength %g", name, file, adapter.strength)
        strengths = {name: adapter.strength for name, adapter in zip(names, run.adapters)}
        for layer_name, module in denoiser.named_modules():
            if isinstance(module, BaseTunerLayer):
                present = [name for name in names if name in getattr(module, "scaling", {})]
                module.set_adapter(layers.get(layer_name, []) + present)
                for name in present:
                    module.set_scale(name, strengths[name])
        for param, flag in flags:  # peft's set_adapter makes the active adapters trainable
            param.requires_grad_(flag)
        yield
    finally:
        _detach(denoiser, names, layers, had_config, loaded_flag)
        for param, flag in flags:
            param.requires_grad_(flag)


def _detach(denoiser: Any, names: list[str], layers: dict[str, list[str]], had_config: bool,
            loaded_flag: Any) -> None:  # fmt: skip
    """Delete the validation adapters `names`; peft layers the loading created are replaced by their base modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer_name, module in list(denoiser.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        for name in names:
            if name in getattr(module, "scaling", {}):
                module.delete_adapter(name)
        if layer_name in layers:
            module.set_adapter(layers[layer_name])
        else:
            parent_name, _, child = layer_name.rpartition(".")
            setattr(denoiser.get_submodule(parent_name) if parent_name else denoiser, child, module.get_base_layer())
    config = denoiser.__dict__.get("peft_config")
    if config is not None:
        for name in names:
            config.pop(name, None)
        if not had_config and not config:
            del denoiser.peft_config
    if loaded_flag is None:
        denoiser.__dict__.pop("_hf_peft_config_loaded", None)
    else:
        denoiser._hf_peft_config_loaded = loaded_flag
