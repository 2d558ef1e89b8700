"""The families whose text encoders st can train (`train_text_encoder`), and how each turns token ids into the
embeddings its denoiser reads.

SimpleTuner trains the CLIP text encoders of SD 1.x and SDXL. For them `st cache` stores, beside each caption's
embeddings, the token ids and attention mask of every tokenizer (`token_ids_<i>`, `token_mask_<i>`), and `st train`
runs the encoders on those ids with the same code that produced the cached embeddings (`sd1x.embed_clip_last`,
`sdxl.embed_tokens`), so an untrained encoder gives exactly the cached values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError
from pipeline.families import sd1x, sdxl

TOKEN_PREFIXES = ("token_ids_", "token_mask_")
OPTION = "train_text_encoder"


@dataclass(frozen=True)
class TrainableText:
    """How a family's prompts become token ids, and token ids become the embeddings its denoiser reads."""

    tokenize: Callable[..., dict[str, Any]]
    embed: Callable[[Any, dict[str, Any]], dict[str, Any]]


TRAINABLE: dict[str, TrainableText] = {
    "sd1x": TrainableText(sd1x.tokenize_clip, sd1x.embed_clip_last),
    "sdxl": TrainableText(sd1x.tokenize_clip, sdxl.embed_tokens),
}


def trainable_text(family: str | None) -> TrainableText:
    """The family's entry, or ConfigError naming the families whose text encoders st trains."""
    found = TRAINABLE.get(family or "")
    if found is None:
        raise ConfigError(f"{OPTION} is true, but st trains the text encoders of model_family "
                          f"{' and '.join(sorted(TRAINABLE))} only (as SimpleTuner), not {family!r}; set "
                          f"{OPTION} false")  # fmt: skip
    return found


def is_token_key(name: str) -> bool:
    return name.startswith(TOKEN_PREFIXES)


def token_items(family: str, tokenizers: Any, text_encoders: Any, prompts: list[str],
                max_length: int | None) -> list[dict[str, Any]]:  # fmt: skip
    """Per prompt, the token ids and masks `st cache` stores for text-encoder training (on the CPU)."""
    from pipeline.families import text

    limits = sd1x.position_limits(text_encoders)
    return text.split(trainable_text(family).tokenize(tokenizers, prompts, max_length=max_length, limits=limits))
