"""Deciding whether a stage must run, and saying why, the way `dvc repro` does."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import ManifestError
from .hashing import sha256_file
from .manifest import MANIFEST_NAME, parse_schema_id, read_manifest


@dataclass
class PreviousOutput:
    """What an output folder already holds, and whether it matches the key just computed."""

    manifest: dict[str, Any] | None
    current: bool
    problem: str | None = None
    damaged: list[str] = field(default_factory=list)


def _outputs_intact(out_dir: Path, manifest: dict[str, Any]) -> list[str]:
    damaged = []
    for entry in manifest.get("outputs", []):
        path = out_dir / entry["path"]
        if not path.is_file():
            damaged.append(f"{entry['path']} is missing")
        elif path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            damaged.append(f"{entry['path']} was modified")
    return damaged


def up_to_date(out_dir: Path, schema: str, key: str) -> PreviousOutput:
    """Compare `out_dir`'s manifest with `key`; a readable manifest is returned even when it is stale."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return PreviousOutput(None, False, f"there is no previous output in {out_dir}")
    stage, version = parse_schema_id(schema) or ("", 0)
    try:
        manifest = read_manifest(path, stage=stage, versions=(version,))
    except ManifestError as exc:
        return PreviousOutput(None, False, f"the previous manifest cannot be used ({exc})")
    damaged = _outputs_intact(out_dir, manifest)
    if damaged:
        return PreviousOutput(manifest, False, "the previous output is damaged: " + "; ".join(damaged), damaged)
    return PreviousOutput(manifest, manifest.get("key") == key)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            changes.append(f"config key {key} is new: {_short(new[key])}")
        elif key not in new:
            changes.append(f"config key {key} is no longer read")
        elif old[key] != new[key]:
            changes.append(f"config key {key} changed: {_short(old[key])} -> {_short(new[key])}")
    return changes


def explain_rerun(
    previous: PreviousOutput, config: dict[str, Any], extra: Iterable[str | None] = (), force: bool = False
) -> list[str]:
    """Human reasons for running a stage: forced, no output, damaged output, config changes, input changes."""
    if force:
        return ["--force was given"]
    if previous.problem:
        return [previous.problem]
    reasons = config_changes(previous.manifest.get("config", {}), config) if previous.manifest else []
    reasons += [r for r in extra if r]
    return reasons or ["its inputs changed (the stage key differs from the recorded one)"]
