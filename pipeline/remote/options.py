"""The options the upload targets read, as one typed group built once from the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..notify.options import HookOptions


@dataclass(frozen=True)
class UploadOptions:
    """`publishing_config`, the hub repo (`push_to_hub`, `hub_model_id`, `model_card_private`,
    `push_to_hub_background`) and the hooks run after each upload (`post_upload_script`)."""

    publishing_config: Any
    push_to_hub: bool
    hub_model_id: str | None
    private: bool
    background: bool
    hooks: HookOptions

    @classmethod
    def from_config(cls, config: Any) -> "UploadOptions":
        return cls(config.publishing_config, bool(config.push_to_hub), config.hub_model_id,
                   bool(config.model_card_private), bool(config.push_to_hub_background),
                   HookOptions.from_config(config))
