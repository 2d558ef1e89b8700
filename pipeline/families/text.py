"""Text-encoding pieces shared by the family modules: tokenising as the diffusers pipelines do, splitting a batch
into per-prompt items, and collating items back into the batch a denoiser receives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.errors import ConfigError

T5_PADDING = ("unmodified", "zero")


def check_t5_padding(value: str) -> str:
    """Validate the SimpleTuner `t5_padding` option."""
    if value not in T5_PADDING:
        raise ConfigError(f"t5_padding must be one of {', '.join(T5_PADDING)}, got {value!r}")
    return value


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """A list of prompt strings (a bare string is a mistake: it would be split into characters)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be a list of strings")
    return list(prompts)


def chat_turns(tokenizer: Any, prompts: Sequence[str], **template_options: Any) -> list[str]:
    """Each prompt as one user turn of the tokenizer's chat template with the generation prompt (the Qwen3-encoded
    pipelines: Z-Image, FLUX.2 [klein]); `template_options` go to the template (`enable_thinking`)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                          **template_options) for p in check_prompts(prompts)]  # fmt: skip


def check_max_length(max_length: int | None, default: int, limit: int | None = None, what: str = "text") -> int:
    """Resolve a `tokenizer_max_length` override against the default and the encoder's position limit."""
    length = default if max_length is None else int(max_length)
    if length < 1:
        raise ConfigError(f"tokenizer_max_length must be positive, got {length}")
    if limit is not None and length > limit:
        raise ConfigError(f"tokenizer_max_length {length} exceeds the {limit} positions of the {what} encoder")
    return length


def tokenize(tokenizer: Any, prompts: list[str], max_length: int, device: Any):
    """Token ids and attention mask padded to `max_length` and truncated, exactly as the pipelines call it."""
    inputs = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return inputs.input_ids.to(device), inputs.attention_mask.to(device)


def zero_padding(embeds: Any, mask: Any) -> Any:
    """Set the embeddings of padded token positions (mask 0) to zero."""
    return embeds.masked_fill(mask.unsqueeze(-1) == 0, 0.0)


def split(batch: dict[str, Any], keep: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Per-prompt dicts (no batch dim, own storage) from batched tensors; `keep[i]` trims `prompt_embeds` of item i."""
    size = next(iter(batch.values())).shape[0]
    items = []
    for i in range(size):
        item = {}
        for key, value in batch.items():
            row = value[i]
            if keep is not None and key == "prompt_embeds":
                row = row[: keep[i]]
            item[key] = row.detach().clone()
        items.append(item)
    return items


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-prompt dicts into a batch. Where items carry an `attention_mask`, trimmed `prompt_embeds` are padded
    with zeros up to the mask length (and shorter masks with 0), giving the tensors the denoiser received."""
    import torch
    import torch.nn.functional as F

    if not items:
        raise ConfigError("collate_text needs at least one item")
    keys = set(items[0])
    for item in items[1:]:
        if set(item) != keys:
            raise ConfigError(f"text items have different keys: {sorted(keys)} and {sorted(item)}")
    out: dict[str, Any] = {}
    if "attention_mask" in keys:
        length = max(int(item["attention_mask"].shape[0]) for item in items)
        masks, embeds = [], []
        for item in items:
            mask, embed = item["attention_mask"], item["prompt_embeds"]
            if embed.shape[0] > length:
                raise ConfigError(f"prompt_embeds has {embed.shape[0]} tokens but the mask only {length}")
            masks.append(F.pad(mask, (0, length - mask.shape[0]), value=0))
            embeds.append(F.pad(embed, (0, 0, 0, length - embed.shape[0]), value=0.0))
        out["prompt_embeds"] = torch.stack(embeds)
        out["attention_mask"] = torch.stack(masks)
    for key in sorted(keys - set(out)):
        tensors = [item[key] for item in items]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ConfigError(f"text items disagree on the shape of {key}: {sorted(shapes)}")
        out[key] = torch.stack(tensors)
    return out
