"""The options `st publish` reads, as one typed group built once from the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import OptionGroup
from ..hashing import sha256_json


@dataclass(frozen=True)
class PublishOptions(OptionGroup):
    """The weight format, the model card's options, and the upload targets (as far as the stage itself reads them;
    the targets read theirs through `pipeline.remote.UploadOptions`)."""

    lora_format: str
    hub_model_id: str | None
    license: str
    model_card_note: str | None
    model_card_private: bool
    model_card_safe_for_work: bool
    user_prompt_library: str | None
    publishing_config: Any
    push_to_hub: bool

    def targets_fingerprint(self) -> str | None:
        """What identifies the upload targets (None without any): a published folder is sent again when it changes."""
        if not (self.publishing_config or self.push_to_hub):
            return None
        return sha256_json({"publishing_config": self.publishing_config, "push_to_hub": self.push_to_hub,
                            "hub_model_id": self.hub_model_id})  # fmt: skip
