"""Webhook notifications (SimpleTuner's `webhook_config`): raw JSON callbacks and Discord channels.

Events are queued by the caller and posted by one background thread, so a dead or slow endpoint never slows training:
the queue is bounded (the oldest event is dropped when it is full, counted and logged once), each request has a short
timeout and is retried with st's retry policy (`pipeline.remote.retry`: WEBHOOK_ATTEMPTS tries, once for an endpoint
already failing; 4xx answers other than 408/429 are not retried), and `close()` flushes what is left within a deadline.

Levels, lowest first: debug < info < warning < error < critical. A target receives the events at or above its
`log_level` (default "info"). Events and their levels: start, progress, validation, checkpoint, finished: info;
error: error. Discord targets receive progress only at log_level "debug" (a chat channel is not a progress bar).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import math
import mimetypes
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import ConfigError
from ..log import get_logger
from ..remote.retry import WEBHOOK_ATTEMPTS, WEBHOOK_MAX_DELAY, retry_call
from .options import WebhookOptions

log = get_logger("notify")

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
EVENT_LEVELS = {
    "start": "info",
    "progress": "info",
    "validation": "info",
    "checkpoint": "info",
    "finished": "info",
    "error": "error",
}
WEBHOOK_TYPES = ("discord", "raw")
JOB_ID_ENV = ("ST_JOB_ID", "SIMPLETUNER_JOB_ID")
DISCORD_MAX_CONTENT = 2000
DISCORD_MAX_FILES = 10
RAW_IMAGE_BYTES_LIMIT = 8 * 1024 * 1024  # base64 image data in a raw validation event, at most (total, before encoding)
_URL_KEYS = ("webhook_url", "callback_url", "url")  # SimpleTuner reads either of the first two for either type
_KNOWN_KEYS = {"webhook_type", "type", "auth_token", "log_level", "message_prefix", "ssl_no_verify", *_URL_KEYS}
_USER_AGENT = "st-notify/1"


@dataclasses.dataclass
class Target:
    """One webhook endpoint."""

    kind: str  # "discord" | "raw"
    url: str
    auth_token: str | None = None
    log_level: str = "info"
    message_prefix: str | None = None
    ssl_no_verify: bool = False
    failing: bool = dataclasses.field(default=False, compare=False, repr=False)

    def accepts(self, event: str, level: str) -> bool:
        """Whether this target wants an event of `level` (see the module docstring)."""
        minimum = LEVELS[self.log_level]
        if self.kind == "discord" and event == "progress":
            return minimum <= LEVELS["debug"]
        return LEVELS.get(level, LEVELS["info"]) >= minimum

    def describe(self) -> str:
        """The URL without query string or credentials, for log lines (Discord URLs hold a secret token)."""
        parts = urllib.parse.urlsplit(self.url)
        path = parts.path if self.kind == "raw" else "/".join(parts.path.split("/")[:4]) + "/..."
        return f"{self.kind} {parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{path}"


# ---------------------------------------------------------------------------------------------------------- config


def parse_webhook_config(value: Any, base_dir: str | Path | None = None) -> list[Target]:
    """Validate `webhook_config` (JSON text, a dict or list, or a JSON file path) into targets; [] when unset."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return []
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("{", "["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"webhook_config is not valid JSON: {exc}") from None
        else:
            path = Path(text).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if not path.is_file():
                raise ConfigError(
                    f"webhook_config {text!r} is neither JSON text nor an existing file (looked for {path})"
                )
            try:
                value = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError(f"webhook_config file {path} is not valid JSON: {exc}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"webhook_config must be a webhook object or a list of them, not {type(value).__name__}")
    return [_parse_target(item, i, len(value)) for i, item in enumerate(value)]


def _parse_target(item: Any, index: int, count: int) -> Target:
    where = "webhook_config" if count == 1 else f"webhook_config[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be an object with webhook_type and a URL, not {type(item).__name__}")
    kind = item.get("webhook_type", item.get("type"))
    if kind not in WEBHOOK_TYPES:
        got = "missing" if kind is None else repr(kind)
        raise ConfigError(f"{where}: webhook_type is {got}; it must be one of: {', '.join(WEBHOOK_TYPES)}")
    url = next((item[k] for k in _URL_KEYS if item.get(k)), None)
    if url is None:
        wanted = "webhook_url" if kind == "discord" else "callback_url"
        raise ConfigError(f"{where}: a {kind} webhook needs '{wanted}'")
    if not isinstance(url, str):
        raise ConfigError(f"{where}: the webhook URL must be a string, not {type(url).__name__}")
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: webhook URL {url!r} must be an http:// or https:// URL with a host")
    level = item.get("log_level") or "info"
    if not isinstance(level, str) or level.lower() not in LEVELS:
        raise ConfigError(f"{where}: log_level {level!r} is not one of: {', '.join(LEVELS)}")
    token = item.get("auth_token")
    if token is not None and not isinstance(token, str):
        raise ConfigError(f"{where}: auth_token must be a string")
    prefix = item.get("message_prefix")
    unknown = sorted(set(item) - _KNOWN_KEYS)
    if unknown:
        log.info("%s: ignoring unknown key(s) %s", where, ", ".join(unknown))
    return Target(
        kind=kind,
        url=url.strip(),
        auth_token=token or None,
        log_level=level.lower(),
        message_prefix=None if prefix is None else str(prefix),
        ssl_no_verify=str(item.get("ssl_no_verify", False)).strip().lower() in ("true", "1", "yes"),
    )


def job_id_from_env() -> str | None:
    """The job id a scheduler gave this run: ST_JOB_ID, else SIMPLETUNER_JOB_ID."""
    for name in JOB_ID_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


# ---------------------------------------------------------------------------------------------------------- events


@dataclasses.dataclass
class _Event:
    name: str
    level: str
    message: str
    body: dict[str, Any]  # the raw JSON body
    images: list[Path] = dataclasses.field(default_factory=list)


def _jsonable(value: Any) -> Any:
    """Plain JSON values: paths and objects as strings, tensors/numpy scalars as numbers, NaN/inf as null."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary(items: dict[str, Any] | None) -> str:
    """`k=v, k=v` of the scalar entries of a dict."""
    if not items:
        return ""
    scalars = {k: v for k, v in items.items() if isinstance(v, (str, int, float, bool, Path)) and v != ""}
    return ", ".join(f"{k}={_fmt(v)}" for k, v in scalars.items())


# ---------------------------------------------------------------------------------------------------------- notifier


class Notifier:
    """Sends stage events to the configured webhook targets without ever blocking the caller.

    With no targets every method is a cheap no-op. Use as a context manager or call `close()` at the end.
    """

    def __init__(
        self,
        targets: Iterable[Target] = (),
        *,
        stage: str,
        job_id: str | None = None,
        interval: float = 60.0,
        prefix: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = 5.0,
        max_queue: int = 256,
    ) -> None:
        self.targets = list(targets)
        self.stage = stage
        self.job_id = job_id
        self.interval = float(interval or 0.0)
        self.prefix = prefix
        self.timeout = timeout
        self.dropped = 0
        self._lost = 0  # messages given up on at close()
        self._clock = clock
        self._last_progress: float | None = None
        self._max_queue = max(1, int(max_queue))
        self._queue: collections.deque[_Event] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._closed = False
        self._abandon = False
        self._deadline: float | None = None

    @classmethod
    def from_config(
        cls,
        config: Any,
        base_dir: str | Path | None = None,
        *,
        stage: str,
        clock: Callable[[], float] = time.monotonic,
        main_process: bool = True,
        **kwargs: Any,
    ) -> "Notifier":
        """A notifier for `config.webhook_config` (ConfigError when it is invalid); a no-op one when it is unset or
        when `main_process` is False (other ranks of a multi-process run validate the config but send nothing)."""
        options = WebhookOptions.from_config(config)
        targets = parse_webhook_config(options.webhook_config, base_dir)
        return cls(
            targets if main_process else [],
            stage=stage,
            job_id=job_id_from_env(),
            interval=options.reporting_interval,
            prefix=options.run_name,
            clock=clock,
            **kwargs,
        )

    @property
    def enabled(self) -> bool:
        """Whether any target is configured."""
        return bool(self.targets)

    # -- events

    def start(self, info: dict[str, Any] | None = None) -> None:
        """The stage started; `info` (run name, model, steps, ...) goes into the event."""
        details = _summary(info)
        self.send("start", f"{self.stage} started" + (f": {details}" if details else ""), info=info or {})

    def progress(self, step: int, total: int | None, metrics: dict[str, Any] | None = None) -> bool:
        """Training progress, sent at most once every `webhook_reporting_interval` seconds; True when queued."""
        if not self.targets:
            return False
        now = self._clock()
        if self._last_progress is not None and now - self._last_progress < self.interval:
            return False
        self._last_progress = now
        pct = f" ({100.0 * step / total:.0f}%)" if total else ""
        details = _summary(metrics)
        message = f"step {step}/{total if total else '?'}{pct}" + (f": {details}" if details else "")
        return self.send("progress", message, step=step, total=total, metrics=metrics or {})

    def validation(self, step: int, image_paths: Iterable[str | Path] = (), prompts: Iterable[str] = ()) -> None:
        """Validation images were written; Discord targets get them attached, raw targets get paths and base64."""
        paths = [Path(p) for p in image_paths]
        prompts = [str(p) for p in prompts]
        lines = [f"validation at step {step} ({len(paths)} image{'s' if len(paths) != 1 else ''})"]
        lines += [f"- {p}" for p in prompts]
        self.send("validation", "\n".join(lines), images=paths, step=step, image_paths=paths, prompts=prompts)

    def checkpoint(self, step: int, path: str | Path) -> None:
        """A checkpoint was saved."""
        self.send("checkpoint", f"checkpoint saved at step {step}: {path}", step=step, path=path)

    def finished(self, summary: dict[str, Any] | None = None) -> None:
        """The stage finished successfully."""
        details = _summary(summary)
        self.send("finished", f"{self.stage} finished" + (f": {details}" if details else ""), summary=summary or {})

    def error(self, message: str) -> None:
        """The stage failed."""
        self.send("error", f"{self.stage} failed: {message}", error=str(message))

    def send(self, event: str, message: str, *, level: str | None = None, images: Iterable[Path] = (),
             **data: Any) -> bool:  # fmt: skip
        """Queue any event for the targets that accept its level; True when queued. Never blocks, never raises."""
        level = level or EVENT_LEVELS.get(event, "info")
        if not any(t.accepts(event, level) for t in self.targets):
            return False
        if self._closing:
            log.debug("notifier closed; not sending %s event", event)
            return False
        body = {
            "job_id": self.job_id,
            "stage": self.stage,
            "event": event,
            "message_type": event,  # SimpleTuner's name for the event type
            "level": level,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "message": message,
        }
        body.update({k: _jsonable(v) for k, v in data.items() if k not in body})
        item = _Event(event, level, message, body, [Path(p) for p in images])
        with self._cond:
            if len(self._queue) >= self._max_queue:
                self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("webhook queue is full (%d events): dropping the oldest events; the endpoint is slow "
                                "or down", self._max_queue)  # fmt: skip
            self._queue.append(item)
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"st-notify-{self.stage}", daemon=True)
                self._thread.start()
        return True

    # -- shutdown

    def close(self, timeout: float = 5.0) -> None:
        """Deliver the queued events for at most `timeout` seconds, then stop; undelivered ones are logged."""
        with self._cond:
            if self._closed:
                return
            self._closing = self._closed = True
            self._deadline = time.monotonic() + max(0.0, timeout)
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(max(0.0, timeout))
            with self._cond:
                if thread.is_alive():
                    self._abandon = True
                    self._lost += len(self._queue)
                    self._queue.clear()
                    self._cond.notify_all()
                lost = self._lost
            if lost:
                log.warning("webhooks: %d message(s) not delivered within close()'s %.1f s", lost, timeout)
        if self.dropped:
            log.warning("webhooks: %d event(s) were dropped because the queue was full", self.dropped)

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    # -- sender thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or self._abandon:
                    return
                item = self._queue.popleft()
            for target in self.targets:
                if self._abandon:
                    return
                if target.accepts(item.name, item.level):
                    try:
                        self._deliver(target, item)
                    except Exception as exc:  # noqa: BLE001 - the sender thread must survive anything
                        log.warning("webhook %s: could not send %s event: %s", target.describe(), item.name, exc)

    def _time_left(self) -> float:
        """Seconds the current request may take: the timeout, or less when close()'s deadline is nearer."""
        if self._deadline is None:
            return self.timeout
        return min(self.timeout, self._deadline - time.monotonic())

    def _deliver(self, target: Target, item: _Event) -> None:
        """POST each request of `item` with the shared retry policy (one try for a target already failing); the
        pauses between tries end early when close() abandons the queue."""
        for body, headers in _build_requests(target, item, self.prefix):
            try:
                retry_call(lambda: self._post_once(target, body, headers), what=f"webhook {target.describe()}",
                           attempts=1 if target.failing else WEBHOOK_ATTEMPTS, max_delay=WEBHOOK_MAX_DELAY,
                           sleep=self._pause, quiet=True)  # fmt: skip
            except _OutOfTime:
                self._lost += 1
                return
            except WebhookError as exc:
                level = log.debug if target.failing else log.warning
                level("webhook %s: %s event not delivered: %s", target.describe(), item.name, exc)
                target.failing = True
                continue
            if target.failing:
                log.info("webhook %s: delivering again", target.describe())
                target.failing = False

    def _post_once(self, target: Target, body: bytes, headers: dict[str, str]) -> None:
        budget = self._time_left()
        if self._abandon or budget <= 0:
            raise _OutOfTime()
        _post(target, body, headers, budget)

    def _pause(self, seconds: float) -> None:
        """A backoff that close() cuts short."""
        with self._cond:
            self._cond.wait_for(lambda: self._abandon, timeout=min(seconds, max(0.0, self._time_left())))


class _OutOfTime(Exception):
    """close()'s deadline passed, or the queue was abandoned: the message is lost (never retried)."""


class WebhookError(Exception):
    """A webhook request that failed; `status_code` is None when the endpoint could not be reached."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class WebhookUnreachable(WebhookError, ConnectionError):
    """No HTTP answer (refused, reset, timed out): transient, retried."""


def _build_requests(target: Target, item: _Event, default_prefix: str | None):
    """(body, headers) of each POST for one event; Discord events with >10 images take several messages."""
    headers = {"User-Agent": _USER_AGENT}
    if target.auth_token:
        headers["Authorization"] = f"Bearer {target.auth_token}"
    if target.kind == "raw":
        body = dict(item.body)
        if item.images:
            body["images"] = _base64_images(item.images)
        yield json.dumps(body).encode(), {**headers, "Content-Type": "application/json"}
        return
    prefix = target.message_prefix if target.message_prefix is not None else default_prefix
    content = (f"`({prefix})` " if prefix else "") + item.message
    if len(content) > DISCORD_MAX_CONTENT:
        content = content[: DISCORD_MAX_CONTENT - 1] + "…"
    images = [p for p in item.images if _readable(p)]
    if not images:
        yield json.dumps({"content": content}).encode(), {**headers, "Content-Type": "application/json"}
        return
    for start in range(0, len(images), DISCORD_MAX_FILES):
        chunk = images[start : start + DISCORD_MAX_FILES]
        body, content_type = _discord_multipart(content, chunk)
        yield body, {**headers, "Content-Type": content_type}


def _readable(path: Path) -> bool:
    if path.is_file():
        return True
    log.warning("webhooks: validation image %s does not exist; not attaching it", path)
    return False


def _base64_images(paths: list[Path]) -> list[dict[str, str]]:
    out, total = [], 0
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("webhooks: cannot read validation image %s: %s", path, exc)
            continue
        total += len(data)
        if total > RAW_IMAGE_BYTES_LIMIT:
            log.debug("webhooks: validation images exceed %d bytes; sending paths only", RAW_IMAGE_BYTES_LIMIT)
            break
        out.append({"path": str(path), "data": base64.b64encode(data).decode("ascii")})
    return out


def _discord_multipart(content: str, images: list[Path]) -> tuple[bytes, str]:
    """Discord's multipart form: `payload_json` (content and attachments) and one `files[n]` part per image."""
    boundary = f"st-{uuid.uuid4().hex}"
    attachments = [{"id": i, "filename": p.name} for i, p in enumerate(images)]
    parts = [(b'Content-Disposition: form-data; name="payload_json"\r\nContent-Type: application/json\r\n\r\n',
              json.dumps({"content": content, "attachments": attachments}).encode())]  # fmt: skip
    for i, path in enumerate(images):
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        filename = path.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        disposition = f'Content-Disposition: form-data; name="files[{i}]"; filename="{filename}"'
        parts.append((f"{disposition}\r\nContent-Type: {mime}\r\n\r\n".encode(), path.read_bytes()))
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + head + data + b"\r\n" for head, data in parts)
    return body + b"--" + boundary.encode() + b"--\r\n", f"multipart/form-data; boundary={boundary}"


def _post(target: Target, body: bytes, headers: dict[str, str], timeout: float) -> None:
    """POST once; WebhookError unless the answer is 2xx (WebhookUnreachable when there is none)."""
    request = urllib.request.Request(target.url, data=body, headers=headers, method="POST")
    context = None
    if target.ssl_no_verify and target.url.startswith("https"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, timeout=max(timeout, 0.05), context=context) as response:
            response.read(65536)
            status = response.status
    except urllib.error.HTTPError as exc:
        raise WebhookError(f"HTTP {exc.code} {exc.reason}", exc.code) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WebhookUnreachable(str(reason) or type(exc).__name__) from None
    if not 200 <= status < 300:
        raise WebhookError(f"HTTP {status}", status)
