"""Upload targets of `st publish`: `publishing_config` (S3 and S3-compatible stores, Backblaze B2, Azure Blob,
Dropbox) and the Hugging Face Hub (`push_to_hub`).

`publishing_config` takes SimpleTuner's forms: JSON text, a dict or list, or the path of a JSON file (relative to the
config file), holding one target object or a list of them, each with a `provider`:

- `s3`: bucket, prefix (or base_path), endpoint_url, region, aws_access_key_id/aws_secret_access_key (or access_key/
  secret_key; else the AWS environment), multipart_threshold_mb, multipart_chunksize_mb, max_concurrency,
  public_base_url, addressing_style, profile. `backblaze_b2` is the same through B2's S3 API (endpoint_url needed).
- `b2` (b2sdk): bucket, prefix, application_key_id, application_key (or B2_APPLICATION_KEY_ID/B2_APPLICATION_KEY).
- `azure_blob` (alias `azure`): container, prefix, connection_string (or AZURE_STORAGE_CONNECTION_STRING) or
  account_url + credential.
- `dropbox`: token (or DROPBOX_TOKEN), or refresh_token + app_key (+ app_secret); prefix; chunk_size_mb.

Every target uploads each file of the folder under its prefix, skips files already there with the same size and
sha256, verifies every file after upload, and gives one record: provider, destination, files, bytes, uploaded,
skipped, verified. Remote calls are retried with st's one retry policy (`retry.py`); `post_upload_script` runs after
each successful upload as a hook (`pipeline.notify.hooks`: no shell, killed after `hook_timeout`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..config import suggest
from ..errors import ConfigError
from . import azure, b2, dropbox, s3
from ..notify.hooks import run_post_upload
from .base import local_files, log, log_record
from .hub import HubTarget, HubUpload, check_hub, upload_checkpoint
from .options import UploadOptions

__all__ = [
    "PROVIDERS", "HubTarget", "HubUpload", "UploadOptions", "check_hub", "check_targets", "make_target",
    "parse_publishing_config", "publish_to_targets", "upload_checkpoint",
]

# provider name -> (module with validate(), target class name, SDK module, pip package)
PROVIDERS: dict[str, tuple[Any, str, str, str]] = {
    "s3": (s3, "S3Target", "boto3", "boto3"),
    "backblaze_b2": (s3, "S3Target", "boto3", "boto3"),
    "b2": (b2, "B2Target", "b2sdk", "b2sdk"),
    "azure_blob": (azure, "AzureBlobTarget", "azure.storage.blob", "azure-storage-blob"),
    "dropbox": (dropbox, "DropboxTarget", "dropbox", "dropbox"),
}
ALIASES = {"azure": "azure_blob", "aws": "s3", "minio": "s3", "r2": "s3"}
_KEY = "publishing_config"


def parse_publishing_config(value: Any, base_dir: Path | str | None = None) -> list[dict]:
    """Normalise `publishing_config` (JSON text, dict, list, or JSON file path) into validated target dicts.

    Checks are offline: provider known, required keys (bucket, container, token, ...) present, value types.
    """
    if value is None or value == "" or value == [] or value == {}:
        return []
    data = value
    if isinstance(value, Path) or (isinstance(value, str) and value.strip()[:1] not in ("{", "[")):
        path = Path(str(value).strip()).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise ConfigError(f"{_KEY}: '{value}' is neither JSON text nor an existing file (looked for {path})")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{_KEY}: cannot read {path} as JSON: {exc}") from None
    elif isinstance(value, str):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{_KEY} is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ConfigError(f"{_KEY} must be a target object or a list of them, not {type(data).__name__}")
    return [_validate_entry(entry, f"{_KEY}[{i}]") for i, entry in enumerate(data)]


def _validate_entry(entry: Any, where: str) -> dict:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be an object with a 'provider', not {type(entry).__name__}")
    known = ", ".join(sorted(PROVIDERS))
    raw = entry.get("provider", entry.get("--provider"))
    if not raw or not isinstance(raw, str):
        raise ConfigError(f"{where}: missing 'provider' (one of {known})")
    provider = ALIASES.get(raw.strip().lower(), raw.strip().lower())
    if provider not in PROVIDERS:
        raise ConfigError(f"{where}: unknown provider '{raw}'{suggest(provider, [*PROVIDERS, *ALIASES])}; "
                          f"known providers: {known} (the Hugging Face Hub is set with push_to_hub)")
    return PROVIDERS[provider][0].validate(entry, where, provider)


def make_target(spec: dict, *, sleep: Callable[[float], None] | None = None):
    """The target object of a validated spec; NotSupportedError (with the pip command) if its SDK is missing."""
    module, cls_name, _, _ = PROVIDERS[spec["provider"]]
    return getattr(module, cls_name)(spec, sleep=sleep)


def check_targets(config: Any, base_dir: Path | str | None = None, *, storage: bool = True,
                  timeout: float = 10.0) -> list[str]:
    """Cheap pre-flight before a long run: config valid, SDKs installed, and (when push_to_hub) the hub online with
    a token that whoami accepts; with `storage`, one quick request per storage target (bucket reachable).

    Raises ConfigError / NotSupportedError / InputError with what to fix; returns one line per checked target.
    """
    options = UploadOptions.from_config(config)
    specs = parse_publishing_config(options.publishing_config, base_dir)
    targets = [make_target(spec) for spec in specs]
    lines = []
    if options.push_to_hub:
        lines.append(HubTarget(options, Path(base_dir) if base_dir else None).check(timeout=timeout))
    if storage:
        lines.extend(target.check() for target in targets)
    for line in lines:
        log.info("pre-flight: %s", line)
    return lines


def publish_to_targets(config: Any, folder: Path | str, base_dir: Path | str | None = None, *,
                       sleep: Callable[[float], None] | None = None) -> list[dict]:
    """Upload every file of `folder` to each `publishing_config` target, and to the hub when `push_to_hub`.

    Returns one verified record per target, in config order, the hub last. With `push_to_hub_background` the hub
    upload runs in a thread alongside the storage targets and is awaited before returning. `post_upload_script`
    runs after each successful upload (failures logged, bounded by `hook_timeout`). The first failing target raises
    (a re-run resumes: objects already uploaded are skipped).
    """
    folder = Path(folder)
    base = Path(base_dir) if base_dir is not None else None
    options = UploadOptions.from_config(config)
    specs = parse_publishing_config(options.publishing_config, base)
    targets = [make_target(spec, sleep=sleep) for spec in specs]
    hub = HubTarget(options, base, sleep=sleep) if options.push_to_hub else None
    if not targets and hub is None:
        log.info("nothing to publish to: no publishing_config and push_to_hub is off")
        return []
    files = local_files(folder)
    if hub is not None:
        for f in files:  # hash once, before any thread starts, so that the targets share the digests
            _ = f.sha256
    handle: HubUpload | None = hub.submit(folder, files=files) if hub is not None and hub.background else None
    records: list[dict] = []
    try:
        for target in targets:
            log.info("publishing %s -> %s", folder, target.destination)
            record = target.upload(folder, files)
            log_record(record)
            records.append(record)
            run_post_upload(options.hooks, None, folder, record["destination"], cwd=base, provider=record["provider"])
    finally:
        if handle is not None and not handle.done():
            log.info("waiting for the background hub upload to %s", handle.description)
            handle.join()
    if hub is not None:
        handle = handle or hub.submit(folder, files=files, background=False)
        records.append(handle.wait())
    return records

