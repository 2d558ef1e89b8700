"""User scripts run after a checkpoint, after an upload, and for external validation (SimpleTuner's hooks).

A script option is a command line: it is split with `shlex.split`, then `{placeholder}`s are replaced inside each
argument, so a value with spaces stays one argument and nothing is interpreted by a shell (no `;`, `$VAR`, globs).
Placeholders that are not known are left as written. A hook that fails is logged; it never stops the stage.

No hook can hold a stage forever: each runs in its own process group and is killed, with everything it started,
`hook_timeout` seconds (default one hour) after it began. `post_checkpoint_script` runs in the background, so training
goes on while it runs; at the end of the stage st waits for hooks still running (each up to its own deadline), so the
script for the last checkpoint gets to finish and none outlives the stage.
"""

from __future__ import annotations

import dataclasses
import os
import math
import os
import re
import shlex
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from ..log import get_logger

log = get_logger("notify")

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
SCRIPT_OPTIONS = ("post_checkpoint_script", "post_upload_script", "validation_external_script")
DEFAULT_TIMEOUT_S = 3600.0
KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL

_background_lock = threading.Lock()
_background: list[tuple[threading.Thread, subprocess.Popen]] = []


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
             cwd: str | Path | None = None, name: str = "hook",
             timeout: float = DEFAULT_TIMEOUT_S) -> int | None:  # fmt: skip
    """Run `script` without a shell; its exit code, or None when it could not start, is empty, was killed after
    `timeout` seconds, or runs in the background (`background=True` returns at once and logs the outcome later;
    `wait_for_hooks` waits for it). Never raises."""
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
        # A process group of its own: a timeout kills the script together with anything it started.
        process = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:  # missing executable, not executable, bad cwd
        log.error("%s could not start %r: %s", name, argv[0], exc)
        return None
    if background:
        thread = threading.Thread(target=_wait, args=(process, name, timeout), name=f"st-{name}", daemon=True)
        with _background_lock:
            _background.append((thread, process))
        thread.start()
        return None
    return _wait(process, name, timeout)


def _kill(process: subprocess.Popen) -> None:
    """SIGTERM to the hook's process group, SIGKILL if it is still there after KILL_GRACE_S."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait(process: subprocess.Popen, name: str, timeout: float) -> int | None:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        log.warning("%s was still running after %g s (hook_timeout) and was killed: %s", name, timeout,
                    shlex.join(map(str, process.args)))  # fmt: skip
        return None
    if code != 0:
        log.warning("%s exited with code %d: %s", name, code, shlex.join(map(str, process.args)))
    else:
        log.debug("%s finished", name)
    return code


def wait_for_hooks(*, kill: bool = False) -> None:
    """Wait for the background hooks still running (each ends by its own deadline); `kill` stops them now."""
    with _background_lock:
        running = list(_background)
        _background.clear()
    for thread, process in running:
        if thread.is_alive():
            if kill:
                _kill(process)
            else:
                log.info("waiting for %s (pid %d) to finish; it is killed once it has run hook_timeout seconds",
                         thread.name.removeprefix("st-"), process.pid)  # fmt: skip
        thread.join()


def hook_timeout(config: Any) -> float:
    """The `hook_timeout` option (seconds)."""
    return float(getattr(config, "hook_timeout", DEFAULT_TIMEOUT_S))


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
    timeout = getattr(config, "hook_timeout", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(f"option 'hook_timeout' must be a number of seconds > 0, got {timeout!r}; it bounds how "
                          f"long a hook script may run (default {DEFAULT_TIMEOUT_S:g})")  # fmt: skip
    if getattr(config, "validation_method", None) == "external-script" and not getattr(
        config, "validation_external_script", None
    ):
        raise ConfigError("validation_method 'external-script' needs validation_external_script")


def post_checkpoint(config: Any, step: int, path: str | Path, *, background: bool = True,
                    cwd: str | Path | None = None, **extra: Any) -> int | None:  # fmt: skip
    """Run `post_checkpoint_script` for a checkpoint just written (no-op when unset), by default in the background
    so that training goes on; it is killed after `hook_timeout` seconds."""
    values = checkpoint_placeholders(config, step, path, **extra)
    return run_hook(getattr(config, "post_checkpoint_script", None), values, background=background, cwd=cwd,
                    name="post_checkpoint_script", timeout=hook_timeout(config))  # fmt: skip


def post_upload(config: Any, step: int, path: str | Path | None, remote_path: str | None, *,
                background: bool = False, cwd: str | Path | None = None, **extra: Any) -> int | None:  # fmt: skip
    """Run `post_upload_script` after an upload; `{remote_checkpoint_path}` is where it went (no-op when unset)."""
    values = checkpoint_placeholders(config, step, path, remote_path=remote_path, **extra)
    return run_hook(getattr(config, "post_upload_script", None), values, background=background, cwd=cwd,
                    name="post_upload_script", timeout=hook_timeout(config))  # fmt: skip


def external_validation(config: Any, step: int, checkpoint_path: str | Path | None, *,
                        cwd: str | Path | None = None, **extra: Any) -> int | None:  # fmt: skip
    """Run `validation_external_script`, in the background when `validation_external_background` is set."""
    values = validation_placeholders(config, step, checkpoint_path, **extra)
    return run_hook(getattr(config, "validation_external_script", None), values,
                    background=bool(getattr(config, "validation_external_background", False)), cwd=cwd,
                    name="validation_external_script", timeout=hook_timeout(config))  # fmt: skip
