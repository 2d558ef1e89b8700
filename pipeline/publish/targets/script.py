"""`post_upload_script`: a user command run after each successful upload.

The command is split with shlex and run without a shell; `{placeholder}`s in each argument are replaced
(`{local_path}`, `{remote_path}`, `{remote_checkpoint_path}`, `{huggingface_path}`, `{provider}`, `{step}`,
`{global_step}`, `{model_family}`, `{model_type}`, `{tracker_project_name}`, `{tracker_run_name}`); unknown
placeholders are left as written. A failing script is logged, never fatal.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

from .base import log

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
TIMEOUT_S = 3600.0


def fill_placeholders(text: str, values: dict[str, Any]) -> str:
    """Replace `{name}` with `values[name]` where known (None becomes an empty string)."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            return match.group(0)
        value = values[name]
        return "" if value is None else str(value)

    return _PLACEHOLDER.sub(replace, text)


def script_values(config: Any, local_path: Path | str, remote_path: str, *, provider: str,
                  huggingface_path: str | None = None, step: int | None = None) -> dict[str, Any]:
    """The placeholder values for one upload."""
    hub_id = huggingface_path if huggingface_path is not None else getattr(config, "hub_model_id", None)
    return {
        "local_path": str(local_path),
        "local_checkpoint_path": str(local_path),
        "remote_path": remote_path,
        "remote_checkpoint_path": remote_path,
        "huggingface_path": hub_id or "",
        "provider": provider,
        "step": "" if step is None else step,
        "global_step": "" if step is None else step,
        "model_family": getattr(config, "model_family", None) or "",
        "model_type": getattr(config, "model_type", None) or "",
        "lora_type": "standard" if getattr(config, "model_type", None) == "lora" else "",
        "tracker_project_name": getattr(config, "tracker_project_name", None) or "",
        "tracker_run_name": getattr(config, "tracker_run_name", None) or "",
    }


def run_post_upload_script(script: str | None, values: dict[str, Any], base_dir: Path | None = None,
                           timeout: float = TIMEOUT_S) -> int | None:
    """Run `script` with placeholders filled; returns its exit status, or None when it did not run.

    A relative program path is looked up under `base_dir` (the config file's folder) when it exists there.
    """
    if not script:
        return None
    try:
        parts = shlex.split(script)
    except ValueError as exc:
        log.warning("post_upload_script not run: cannot split it into arguments (%s)", exc)
        return None
    if not parts:
        return None
    args = [fill_placeholders(part, values) for part in parts]
    program = Path(args[0]).expanduser()
    if base_dir is not None and not program.is_absolute() and (Path(base_dir) / program).is_file():
        args[0] = str(Path(base_dir) / program)
    try:
        done = subprocess.run(args, shell=False, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        log.warning("post_upload_script %s timed out after %.0f s", args[0], timeout)
        return None
    except OSError as exc:
        log.warning("post_upload_script %s could not start: %s", args[0], exc)
        return None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout or "").strip()[-500:]
        log.warning("post_upload_script %s exited with status %d%s", args[0], done.returncode,
                    f": {tail}" if tail else "")
    else:
        log.info("post_upload_script %s done", args[0])
    return done.returncode
