"""Telling a local path from a Hugging Face hub id, and hub failures in words (used by loading and identity)."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for no network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_like_path(source: str) -> bool:
    """Whether a string that does not exist was meant as a path (not an `org/name` hub id)."""
    text = source.replace("\\", "/")
    return (
        text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or (len(text) > 1 and text[1] == ":")
        or text.endswith((".safetensors", ".ckpt", ".bin", ".pt"))
    )


def hub_problem(error: BaseException) -> str:
    """Why a hub load failed, in words: unreachable (offline, no network) or something else."""
    text = str(error)
    unreachable = (
        hub_offline()
        or isinstance(error, (ConnectionError, TimeoutError))
        or any(word in text.lower() for word in ("connect", "outgoing traffic", "offline", "resolve host", "timed out"))
    )
    if unreachable:
        return f"the hub could not be reached (no network or HF_HUB_OFFLINE=1) and it is not cached ({text})"
    return f"the hub did not provide it ({text})"


@cache
def hub_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a hub or local `from_pretrained` raises for a missing or unreachable model."""
    from huggingface_hub import errors

    names = ("HfHubHTTPError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "RepositoryNotFoundError")
    return (OSError, ConnectionError, TimeoutError, *(getattr(errors, n) for n in names if hasattr(errors, n)))


def hub_has_folder(repo: str, folder: str, revision: str | None = None) -> bool:
    """Whether the hub repository `repo` has files under `folder/`: from the hub cache when HF_HUB_OFFLINE=1, else
    from the repository's file list. An unreachable or unknown repository counts as not having it."""
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        if hub_offline():
            root = snapshot_download(repo, revision=revision, allow_patterns=[f"{folder}/*"], local_files_only=True)
            return (Path(root) / folder).is_dir()
        return any(name.startswith(f"{folder}/") for name in list_repo_files(repo, revision=revision))
    except hub_errors():
        return False


def model_json(source: str, name: str) -> dict[str, Any] | None:
    """The JSON file `name` (e.g. "model_index.json", "transformer/config.json") of a diffusers model folder, or of a
    hub id in the local hub cache (nothing is downloaded); None for a single-file checkpoint or when not found."""
    import json

    path = Path(str(source)).expanduser()
    if path.is_dir():
        found: Any = path / name
    elif path.exists():
        return None  # a single-file checkpoint
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(str(source), name)
        except ValueError:  # not a repository id
            return None
        if not isinstance(found, str):
            return None
    try:
        loaded = json.loads(Path(found).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def model_index_of(source: str) -> dict[str, Any] | None:
    """The `model_index.json` of a model folder or of a hub id in the local cache (`model_json`)."""
    return model_json(source, "model_index.json")
