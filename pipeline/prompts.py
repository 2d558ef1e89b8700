"""The validation prompts of a run, computed in one place for every stage that needs them.

`st cache` encodes them into the shared embeddings, `st train` renders them (and checks the cache holds them), and
`st publish` captions the validation images with them. The set is `validation_prompt` (named "validation") plus the
entries of `user_prompt_library` (a JSON object {shortname: prompt}); `validation_negative_prompt` is encoded too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ConfigError
from .hashing import sha256_bytes


@dataclass(frozen=True)
class ValidationPrompt:
    name: str  # file-name safe: the validation image files are named after it
    text: str


def prompt_key(text: str) -> str:
    """The id of a prompt's embeddings in a cache's shared embeds file."""
    return sha256_bytes(text.encode())[:16]


def _safe_name(name: object) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(name))


def read_prompt_library(path: Path) -> dict[str, str]:
    """`user_prompt_library` as {shortname: prompt}; ConfigError naming the file when it cannot be used."""
    try:
        library = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"user_prompt_library {path} cannot be read as JSON: {exc}") from None
    if not isinstance(library, dict):
        raise ConfigError(f"user_prompt_library {path} must be a JSON object of shortname -> prompt")
    return {str(name): str(text) for name, text in library.items()}


def validation_prompts(validation_prompt: str | None, user_prompt_library: str | None,
                       resolve: Callable[[str], Path]) -> list[ValidationPrompt]:  # fmt: skip
    """validation_prompt plus the entries of user_prompt_library (its path resolved by `resolve`: the loaded config's
    `resolve_path`, so that it is found where every other relative path of the config is)."""
    found = []
    if validation_prompt:
        found.append(ValidationPrompt("validation", validation_prompt))
    if user_prompt_library:
        path = resolve(user_prompt_library)
        found += [ValidationPrompt(_safe_name(name), text) for name, text in read_prompt_library(path).items()]
    return found


def texts_to_encode(prompts: list[ValidationPrompt], negative_prompt: str | None) -> list[str]:
    """Every prompt text validation renders with: the prompts, then the negative prompt (when one is set)."""
    texts = [p.text for p in prompts]
    if negative_prompt is not None:
        texts.append(negative_prompt)
    return texts
