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

import os
import re
import shlex
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Mapping

from ..config import Config, check_option_range
from ..errors import ConfigError
from ..log import get_logger
from .options import HookOptions, as_text

log = get_logger("notify")

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
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
             timeout: float = Config.hook_timeout) -> int | None:  # fmt: skip
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


# ---------------------------------------------------------------------------------------------------------- values


def checkpoint_placeholders(config: Any, step: int, path: str | Path | None, *, remote_path: str | None = None,
                            **extra: Any) -> dict[str, str]:  # fmt: skip
    """Placeholders of post_checkpoint_script / post_upload_script; `extra` adds or overrides any."""
    return _checkpoint_values(HookOptions.from_config(config), step, path, remote_path, extra)


def _checkpoint_values(hooks: HookOptions, step: int | None, path: str | Path | None, remote_path: str | None,
                       extra: Mapping[str, Any]) -> dict[str, str]:  # fmt: skip
    values = dict(hooks.placeholders)
    given = {"local_checkpoint_path": path, "global_step": step, "remote_checkpoint_path": remote_path, **extra}
    values.update({k: as_text(v) for k, v in given.items()})
    return values


def validation_placeholders(config: Any, step: int, checkpoint_path: str | Path | None = None,
                            **extra: Any) -> dict[str, str]:  # fmt: skip
    """Placeholders of validation_external_script: the checkpoint ones plus every `validation_*` option."""
    hooks = HookOptions.from_config(config)
    return _checkpoint_values(hooks, step, checkpoint_path, None, {**hooks.validation_options, **extra})


# ---------------------------------------------------------------------------------------------------------- trainer


def check_hooks(config: Any) -> None:
    """ConfigError for hook options that can never run: broken quoting, a `hook_timeout` outside its range, or
    external validation without a script."""
    hooks = HookOptions.from_config(config)
    scripts = {"post_checkpoint_script": hooks.post_checkpoint_script, "post_upload_script": hooks.post_upload_script,
               "validation_external_script": hooks.validation_external_script}
    for option, script in scripts.items():
        if script:
            try:
                argv = shlex.split(str(script))
            except ValueError as exc:
                raise ConfigError(f"option '{option}' cannot be split into arguments: {exc}") from None
            if not argv:
                raise ConfigError(f"option '{option}' is blank")
    check_option_range("hook_timeout", hooks.timeout)
    if hooks.validation_method == "external-script" and not hooks.validation_external_script:
        raise ConfigError("validation_method 'external-script' needs validation_external_script")


def post_checkpoint(config: Any, step: int, path: str | Path, *, background: bool = True,
                    cwd: str | Path | None = None, **extra: Any) -> int | None:  # fmt: skip
    """Run `post_checkpoint_script` for a checkpoint just written (no-op when unset), by default in the background
    so that training goes on; it is killed after `hook_timeout` seconds."""
    hooks = HookOptions.from_config(config)
    values = _checkpoint_values(hooks, step, path, None, extra)
    return run_hook(hooks.post_checkpoint_script, values, background=background, cwd=cwd,
                    name="post_checkpoint_script", timeout=hooks.timeout)  # fmt: skip


def post_upload(config: Any, step: int | None, path: str | Path | None, remote_path: str | None, *,
                background: bool = False, cwd: str | Path | None = None, **extra: Any) -> int | None:  # fmt: skip
    """Run `post_upload_script` after an upload; `{remote_checkpoint_path}` is where it went (no-op when unset)."""
    return run_post_upload(HookOptions.from_config(config), step, path, remote_path, background=background, cwd=cwd,
                           **extra)  # fmt: skip


def run_post_upload(hooks: HookOptions, step: int | None, path: str | Path | None, remote_path: str | None, *,
                    background: bool = False, cwd: str | Path | None = None, **extra: Any) -> int | None:  # fmt: skip
    """`post_upload` for the upload targets, which hold the hook options. `{local_path}` and `{remote_path}` are
    aliases of the checkpoint placeholders; `{provider}` and `{step}` come in `extra`."""
    values = _checkpoint_values(hooks, step, path, remote_path,
                                {"local_path": path, "remote_path": remote_path, "step": step, **extra})
    return run_hook(hooks.post_upload_script, values, background=background, cwd=cwd, name="post_upload_script",
                    timeout=hooks.timeout)  # fmt: skip


def external_validation(config: Any, step: int, checkpoint_path: str | Path | None, *,
                        cwd: str | Path | None = None, **extra: Any) -> int | None:  # fmt: skip
    """Run `validation_external_script`, in the background when `validation_external_background` is set."""
    hooks = HookOptions.from_config(config)
    values = _checkpoint_values(hooks, step, checkpoint_path, None, {**hooks.validation_options, **extra})
    return run_hook(hooks.validation_external_script, values, background=hooks.validation_external_background,
                    cwd=cwd, name="validation_external_script", timeout=hooks.timeout)  # fmt: skip
