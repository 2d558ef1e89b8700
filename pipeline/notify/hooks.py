"""User scripts run after a checkpoint, after an upload, and for external validation (SimpleTuner's hooks).

A script option is a command line: it is split with `shlex.split`, then `{placeholder}`s are replaced inside each
argument, so a value with spaces stays one argument and nothing is interpreted by a shell (no `;`, `$VAR`, globs).
Placeholders that are not known are left as written. A hook that fails is logged; it never stops the stage.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import threading
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from ..log import get_logger

log = get_logger("notify")

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
SCRIPT_OPTIONS = ("post_checkpoint_script", "post_upload_script", "validation_external_script")


def expand(arg: str, placeholders: Mapping[str, Any]) -> str:
    """Replace the known `{name}`s in one argument (None becomes ""); others stay as they are."""

    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name not in placeholders:
            return match.group(0)
        value = placeholders[name]
        return "" if value is None else str(value)

    return _PLACEHOLDER.sub(sub, arg)


def build_command(script: str, placeholders: Mapping[str, Any]) -> list[str]:
    """The argv of `script` with placeholders substituted; ValueError when its quoting is broken."""
    argv = [expand(arg, placeholders) for arg in shlex.split(script)]
    if argv:
        argv[0] = os.path.expanduser(argv[0])
    return argv


def run_hook(script: str | None, placeholders: Mapping[str, Any] | None = None, *, background: bool = False,
             cwd: str | Path | None = None, name: str = "hook") -> int | None:  # fmt: skip
    """Run `script` without a shell; its exit code, or None when it could not start, is empty, or runs in the
    background (`background=True` returns at once and logs the outcome later). Never raises."""
    if not script or not str(script).strip():
        return None
    try:
        argv = build_command(str(script), placeholders or {})
    except ValueError as exc:
        log.error("%s %r cannot be parsed: %s", name, script, exc)
        return None
    if not argv:
        return None
    log.info("running %s: %s", name, shlex.join(argv))
    try:
        process = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL)
    except OSError as exc:  # missing executable, not executable, bad cwd
        log.error("%s could not start %r: %s", name, argv[0], exc)
        return None
    if background:
        threading.Thread(target=_wait, args=(process, name), name=f"st-{name}", daemon=True).start()
        return None
    return _wait(process, name)


def _wait(process: subprocess.Popen, name: str) -> int:
    code = process.wait()
    if code != 0:
        log.warning("%s exited with code %d: %s", name, code, shlex.join(map(str, process.args)))
    else:
        log.debug("%s finished", name)
    return code


# ---------------------------------------------------------------------------------------------------------- values


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def base_placeholders(config: Any) -> dict[str, str]:
    """The run-wide placeholders: tracker names, model family and type, LoRA type, hub path."""
    model_type = _text(getattr(config, "model_type", ""))
    return {
        "tracker_run_name": _text(getattr(config, "tracker_run_name", None)),
        "tracker_project_name": _text(getattr(config, "tracker_project_name", None)),
        "model_family": _text(getattr(config, "model_family", None)),
        "model_type": model_type,
        "lora_type": _text(getattr(config, "lora_type", None) or ("standard" if model_type == "lora" else "")),
        "huggingface_path": _text(getattr(config, "hub_model_id", None)),
    }


def checkpoint_placeholders(config: Any, step: int, path: str | Path | None, *, remote_path: str | None = None,
                            **extra: Any) -> dict[str, str]:  # fmt: skip
    """Placeholders of post_checkpoint_script / post_upload_script; `extra` adds or overrides any."""
    values = base_placeholders(config)
    values.update(
        local_checkpoint_path=_text(path),
        global_step=_text(step),
        remote_checkpoint_path=_text(remote_path),
    )
    values.update({k: _text(v) for k, v in extra.items()})
    return values


def validation_placeholders(config: Any, step: int, checkpoint_path: str | Path | None = None,
                            **extra: Any) -> dict[str, str]:  # fmt: skip
    """Placeholders of validation_external_script: the checkpoint ones plus every `validation_*` option."""
    values = checkpoint_placeholders(config, step, checkpoint_path)
    if dataclasses.is_dataclass(config):
        options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        options = dict(vars(config))
    values.update({k: _text(v) for k, v in options.items() if k.startswith("validation_")})
    values.update({k: _text(v) for k, v in extra.items()})
    return values


# ---------------------------------------------------------------------------------------------------------- trainer


def check_hooks(config: Any) -> None:
    """ConfigError for hook options that can never run: broken quoting, or external validation without a script."""
    for option in SCRIPT_OPTIONS:
        script = getattr(config, option, None)
        if script:
            try:
                argv = shlex.split(str(script))
            except ValueError as exc:
                raise ConfigError(f"option '{option}' cannot be split into arguments: {exc}") from None
            if not argv:
                raise ConfigError(f"option '{option}' is blank")
    if getattr(config, "validation_method", None) == "external-script" and not getattr(
        config, "validation_external_script", None
    ):
        raise ConfigError("validation_method 'external-script' needs validation_external_script")


def post_checkpoint(config: Any, step: int, path: str | Path, *, background: bool = False,
                    cwd: str | Path | None = None, **extra: Any) -> int | None:  # fmt: skip
    """Run `post_checkpoint_script` for a checkpoint just written (no-op when unset)."""
    values = checkpoint_placeholders(config, step, path, **extra)
    return run_hook(getattr(config, "post_checkpoint_script", None), values, background=background, cwd=cwd,
                    name="post_checkpoint_script")  # fmt: skip


def post_upload(config: Any, step: int, path: str | Path | None, remote_path: str | None, *,
                background: bool = False, cwd: str | Path | None = None, **extra: Any) -> int | None:  # fmt: skip
    """Run `post_upload_script` after an upload; `{remote_checkpoint_path}` is where it went (no-op when unset)."""
    values = checkpoint_placeholders(config, step, path, remote_path=remote_path, **extra)
    return run_hook(getattr(config, "post_upload_script", None), values, background=background, cwd=cwd,
                    name="post_upload_script")  # fmt: skip


def external_validation(config: Any, step: int, checkpoint_path: str | Path | None, *,
                        cwd: str | Path | None = None, **extra: Any) -> int | None:  # fmt: skip
    """Run `validation_external_script`, in the background when `validation_external_background` is set."""
    values = validation_placeholders(config, step, checkpoint_path, **extra)
    return run_hook(getattr(config, "validation_external_script", None), values,
                    background=bool(getattr(config, "validation_external_background", False)), cwd=cwd,
                    name="validation_external_script")  # fmt: skip
