"""The options the notifications and hooks read, as typed groups built once from the config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping


def as_text(value: Any) -> str:
    """A placeholder's value: None becomes ""."""
    return "" if value is None else str(value)


@dataclass(frozen=True)
class HookOptions:
    """The hook scripts, their bound (`hook_timeout`) and the run-wide values their placeholders take."""

    post_checkpoint_script: str | None
    post_upload_script: str | None
    validation_external_script: str | None
    validation_external_background: bool
    validation_method: str
    timeout: float  # hook_timeout
    placeholders: Mapping[str, str]  # tracker names, model family and type, hub path
    validation_options: Mapping[str, str]  # every `validation_*` option, as text

    @classmethod
    def from_config(cls, config: Any) -> "HookOptions":
        model_type = as_text(config.model_type)
        return cls(
            post_checkpoint_script=config.post_checkpoint_script,
            post_upload_script=config.post_upload_script,
            validation_external_script=config.validation_external_script,
            validation_external_background=bool(config.validation_external_background),
            validation_method=config.validation_method,
            timeout=config.hook_timeout,
            placeholders={
                "tracker_run_name": as_text(config.tracker_run_name),
                "tracker_project_name": as_text(config.tracker_project_name),
                "model_family": as_text(config.model_family),
                "model_type": model_type,
                "lora_type": "standard" if model_type == "lora" else "",
                "huggingface_path": as_text(config.hub_model_id),
            },
            validation_options={f.name: as_text(getattr(config, f.name)) for f in dataclasses.fields(config)
                                if f.name.startswith("validation_")},  # fmt: skip
        )


@dataclass(frozen=True)
class WebhookOptions:
    """`webhook_config`, how often progress is sent, and the run name that prefixes chat messages."""

    webhook_config: Any
    reporting_interval: float
    run_name: str | None

    @classmethod
    def from_config(cls, config: Any) -> "WebhookOptions":
        return cls(config.webhook_config, config.webhook_reporting_interval or 0.0,
                   config.tracker_run_name or config.tracker_project_name)
