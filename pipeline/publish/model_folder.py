"""A full fine-tune as a loadable diffusers folder: the base model's components (hardlinked where the filesystem
allows, else copied) with the trained denoiser in place of the base one. Components the run replaced (a VAE or T5
given by path) come from where the run took them; each must still be what `st train` identified."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import InputError, LineageError, NotSupportedError
from ..families import Family, component_identity
from ..families.hub import hub_offline
from ..log import get_logger
from .lineage import Inputs
from .weights import write_denoiser

log = get_logger("publish")


def base_folder(source: str, revision: str | None, skip: str | None = None) -> Path:
    """The local diffusers folder of the base model: the path itself, or its hub snapshot of every component but
    `skip` (from the hub cache only when offline)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        raise NotSupportedError(f"the base model {source} is a single-file checkpoint; a full fine-tune is "
                                "published as a diffusers folder, so train from a diffusers folder of the base model")
    from huggingface_hub import hf_hub_download, snapshot_download

    offline = hub_offline()
    try:
        index = json.loads(Path(hf_hub_download(source, "model_index.json", revision=revision,
                                                local_files_only=offline)).read_text())  # fmt: skip
        patterns = ["model_index.json", *(f"{name}/*" for name in _components(index) if name != skip)]
        return Path(snapshot_download(source, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:  # hub errors are many types; all mean the same thing here
        raise InputError(f"could not get the base model {source!r} to assemble the full model ({exc}); set "
                         "pretrained_model_name_or_path to a local diffusers folder and re-run `st train`") from None


def _components(index: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0])


def _place(source: Path, target: Path) -> None:
    """Hardlink `source` (symlinks resolved, as in the hub cache) to `target`, or copy it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source.resolve(), target)
    except OSError:
        shutil.copyfile(source, target)


def _overrides(inputs: Inputs, family: Family, base: str) -> dict[str, tuple[dict[str, Any], str]]:
    """Component subfolder -> (identity recorded by st train, the folder to take it from)."""
    model = inputs.train["model"]
    pairs = [(family.vae.subfolder, model["vae"])]
    for spec, enc, tok in zip(family.text_encoders, model["text_encoders"], model.get("tokenizers", [])):
        pairs += [(spec.model.subfolder, enc), (spec.tokenizer.subfolder, tok)]
    found = {}
    for subfolder, identity in pairs:
        if identity.get("source") == base:
            found[subfolder] = (identity, "")
            continue
        folder = Path(identity["source"]) / (identity.get("subfolder") or "")
        if not folder.is_dir():
            raise NotSupportedError(f"the {subfolder} of this run came from {identity['source']}, which is not a local "
                                    "diffusers folder; the full model cannot be assembled from it")  # fmt: skip
        found[subfolder] = (identity, str(folder))
    return found


def _check_identity(subfolder: str, recorded: dict[str, Any], folder: Path) -> None:
    now = component_identity(folder, None, None)
    if now["config_sha256"] != recorded.get("config_sha256") or now["weights_sha256"] != recorded.get("weights_sha256"):
        raise LineageError(f"{folder} is not the {subfolder} `st train` used (its config or weights changed since); "
                           "re-run `st train` with the current model, or restore it")  # fmt: skip


def assemble(inputs: Inputs, family: Family, target: Path) -> None:
    """Write the loadable diffusers folder of a full fine-tune into `target`."""
    denoiser = inputs.train["model"]["denoiser"]
    slot = _trained_slot(inputs, family)
    base = base_folder(denoiser["source"], denoiser.get("revision"), skip=slot)
    index_path = base / "model_index.json"
    if not index_path.is_file():
        raise InputError(f"the base model folder {base} has no model_index.json; it is not a diffusers pipeline folder")
    overrides = _overrides(inputs, family, denoiser["source"])
    trained = _trained_text_encoders(inputs, family)
    _place(index_path, target / "model_index.json")
    for name in _components(json.loads(index_path.read_text())):
        if name == slot:
            continue
        if name in trained:  # train_text_encoder: the encoder as the run trained it
            for file in trained[name]:
                _place(file, target / name / file.relative_to(inputs.train_dir / "final" / name))
            continue
        identity, other = overrides.get(name, (None, ""))
        folder = Path(other) if other else base / name
        if not folder.is_dir():
            raise InputError(f"the base model folder {base} lacks the component {name}/ that model_index.json names")
        if identity is not None:
            _check_identity(name, identity, folder)
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            _place(file, target / name / file.relative_to(folder))
    if slot == family.denoiser.subfolder:
        write_denoiser(inputs, family, target)
    else:  # written under the denoiser's name, then moved to the slot it was trained for
        staging = target / f".{slot}.trained"
        write_denoiser(inputs, family, staging)
        os.replace(staging / family.denoiser.subfolder, target / slot)
        staging.rmdir()
    log.info("publish: assembled the full model from %s with the trained %s", base, slot)


def _trained_slot(inputs: Inputs, family: Family) -> str:
    """The pipeline component the trained denoiser replaces: its subfolder, or the family's `trained_slot` (a Wan 2.2
    A14B stage's expert: the low-noise stage trains `transformer_2`)."""
    slot = None if family.trained_slot is None else family.trained_slot(inputs.train)
    return family.denoiser.subfolder if slot is None else slot


def _trained_text_encoders(inputs: Inputs, family: Family) -> dict[str, list[Path]]:
    """Subfolder -> files of the text encoders a full run trained (train_text_encoder), from train's final."""
    names = [spec.model.subfolder for spec in family.text_encoders]
    found: dict[str, list[Path]] = {}
    for entry in inputs.train["final"]["files"]:
        parts = Path(entry["path"]).parts
        if len(parts) > 2 and parts[1] in names:
            found.setdefault(parts[1], []).append(inputs.train_dir / entry["path"])
    if found and inputs.checkpoint is not None:
        raise NotSupportedError("publishing a checkpoint of a full run that trained the text encoders is not "
                                "supported yet (the checkpoint's encoders are not written as a folder); publish the "
                                "run's final weights (without --checkpoint)")  # fmt: skip
    return found


def base_denoiser_weights(train: dict[str, Any], family: Family):
    """A lazy reader of the base denoiser's weights (`publish.lora.base_weights`) for DoRA's ComfyUI export: the
    local diffusers folder, or its safetensors from the hub (cache first); None for a single-file checkpoint."""
    from .lora import base_weights

    identity = train["model"]["denoiser"]
    source, sub = identity["source"], identity.get("subfolder") or family.denoiser.subfolder
    path = Path(source).expanduser()
    if path.is_dir():
        return base_weights(path / sub)
    if path.is_file():
        return None

    def from_hub():
        from huggingface_hub import snapshot_download

        folder = snapshot_download(source, allow_patterns=[f"{sub}/*.safetensors"], revision=identity.get("revision"),
                                   local_files_only=hub_offline())  # fmt: skip
        return base_weights(Path(folder) / sub)

    reader = None

    def read(module: str) -> Any:  # downloads nothing unless a DoRA export asks for a weight
        nonlocal reader
        reader = reader or from_hub()
        return reader(module)

    return read


def base_denoiser_config(train: dict[str, Any], family: Family) -> dict[str, Any] | None:
    """The base denoiser's config.json (local folder, or the hub cache), or None when it cannot be read."""
    identity = train["model"]["denoiser"]
    source, sub = identity["source"], identity.get("subfolder") or family.denoiser.subfolder
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            return json.loads((path / sub / "config.json").read_text())
        if path.is_file():
            return None
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(source, "config.json", subfolder=sub, revision=identity.get("revision"),
                               local_files_only=hub_offline())  # fmt: skip
        return json.loads(Path(file).read_text())
    except Exception as exc:  # a missing config only loses what needs it (SDXL block names), reported there
        log.warning("publish: cannot read the base %s config of %s (%s)", sub, source, exc)
        return None
