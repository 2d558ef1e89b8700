"""Text-encoder training (`train_text_encoder`, SD 1.x and SDXL): a LoRA on each CLIP text encoder (model_type
lora) or the whole encoders (model_type full), run on the token ids `st cache` stored, trained beside the denoiser.

As SimpleTuner (and diffusers' DreamBooth LoRA scripts) do, the text-encoder LoRA has the denoiser LoRA's rank and
alpha, gaussian initialisation (its up matrix is zero, so training starts from the cached embeddings) and targets the
attention projections `q_proj k_proj v_proj out_proj`. Its parameters are an own optimizer group at `text_encoder_lr`
(default: learning_rate); after `text_encoder_limit` optimizer steps the encoders run without gradients and stop
changing. Checkpoints store its weights under the encoder's subfolder name (`text_encoder.` / `text_encoder_2.`); the
final LoRA file holds them in diffusers' layout next to the denoiser's, and a full run's final folder holds the trained
encoders as diffusers subfolders.

The encoders are held in the run's training dtype, as SimpleTuner holds them (`load_text_encoder` loads them with
`torch_dtype=weight_dtype` and moves them to the device in it; peft then creates their LoRA in that dtype): under
mixed_precision bf16 their frozen weights, their LoRA and (model_type full) all their weights are bf16, trained and
saved in bf16; under `no` everything is fp32 (`encoder_dtypes`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import OptionGroup
from ..errors import InputError
from ..families import Family, load_components
from ..families.text_training import OPTION, is_token_key, trainable_text
from ..log import get_logger

log = get_logger("train")

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ATTRIBUTE = "_st_text_encoders"  # set on the denoiser, so that saving its final weights finds the text encoders


@dataclass(frozen=True)
class TextEncoderOptions(OptionGroup):
    train_text_encoder: bool
    model_type: str
    text_encoder_lr: float | None
    text_encoder_limit: int
    lora_rank: int
    lora_alpha: float | None
    mixed_precision: str
    revision: str | None
    variant: str | None
    ramtorch: bool
    ramtorch_text_encoder: bool
    ramtorch_target_modules: str | None


def check_cache(manifest: dict[str, Any], where: Path | str) -> None:
    """Refuse a cache that lacks the token ids text-encoder training runs the encoders on."""
    if not manifest["text"].get("token_ids"):
        raise InputError(f"{OPTION} is true, but the cache {where} stores no token ids (it was built with "
                         f"{OPTION} false); re-run `st cache` with {OPTION} true")


def encoder_dtypes(mixed_precision: str, full: bool) -> tuple[str, str]:
    """(the frozen weights' dtype, the trained weights' dtype) of trained text encoders, torch dtype names.

    SimpleTuner's `weight_dtype` (bf16, fp16, or fp32 for mixed_precision no) for both, as the denoiser's adapters
    (quantise.adapter_dtype) and full training (quantise.BasePrecision) hold theirs. DEVIATION, as for those: with fp16
    the trained weights (the LoRA, or the whole encoders of a full run) are fp32, since accelerate's fp16 gradient
    scaler cannot unscale fp16 gradients; a LoRA run's frozen weights are fp16 there, as SimpleTuner's."""
    frozen = {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision, "float32")
    trained = "bfloat16" if mixed_precision == "bf16" else "float32"
    return (trained if full else frozen), trained


class TextEncoders:
    """The family's text encoders (with a LoRA each, or whole in a full run) on `device`, training until
    `text_encoder_limit` steps; held in `encoder_dtypes`."""

    def __init__(self, family: Family, source: str, options: TextEncoderOptions, device: Any) -> None:
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        self.embed_tokens = trainable_text(family.name).embed
        self.options, self.device = options, device
        self.names = [spec.model.subfolder for spec in family.text_encoders]
        parts = load_components(family, source, which=("text_encoders",), revision=options.revision,
                                variant=options.variant)  # fmt: skip
        rank = options.lora_rank
        self.lora_config = LoraConfig(r=rank, lora_alpha=options.lora_alpha or rank, init_lora_weights="gaussian",
                                      target_modules=list(LORA_TARGETS))  # fmt: skip
        self.full = options.model_type == "full"
        frozen, trained = (getattr(torch, name) for name in encoder_dtypes(options.mixed_precision, self.full))
        self.encoders = []
        self.ramtorch: list[dict[str, Any]] | None = None  # ramtorch_text_encoder: what each encoder streams
        for number, encoder in enumerate(parts["text_encoders"], start=1):
            encoder.to(dtype=frozen)
            if self.full:
                encoder.requires_grad_(True)
            else:
                encoder.requires_grad_(False)
                # peft creates the LoRA in its base layers' dtype (its gaussian A drawn in fp32, then rounded)
                inject_adapter_in_model(self.lora_config, encoder)  # transformers' add_adapter wants a newer peft
                for name, param in encoder.named_parameters():
                    if "lora_" in name and param.dtype != trained:
                        param.data = param.data.to(trained)
            if options.ramtorch and options.ramtorch_text_encoder:  # the frozen layers, before the move to the GPU
                from ..ramtorch_layers import parse_targets, stream_text_encoder

                streamed = stream_text_encoder(encoder, number, parse_targets(options.ramtorch_target_modules), device)
                self.ramtorch = [*(self.ramtorch or []), streamed]
            self.encoders.append(encoder.to(device).train())

    def parameters(self) -> list[Any]:
        return [p for encoder in self.encoders for p in encoder.parameters() if p.requires_grad]

    def param_group(self) -> dict[str, Any]:
        """The optimizer group of the encoders' LoRA (its own learning rate when text_encoder_lr is set)."""
        group: dict[str, Any] = {"params": self.parameters()}
        if self.options.text_encoder_lr is not None:
            group["lr"] = self.options.text_encoder_lr
        return group

    def trains_at(self, step: int) -> bool:
        """Whether the optimizer step after `step` completed steps updates the encoders."""
        return step < self.options.text_encoder_limit

    def embed(self, collated: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """`collated` (a batch of cached text) with its embeddings recomputed by the encoders from its token ids;
        without gradients once `step` reaches text_encoder_limit (or when `step` is None: validation)."""
        import torch

        tokens = {k: v.to(self.device) for k, v in collated.items() if is_token_key(k)}
        if not tokens:
            raise InputError(f"{OPTION}: a cached caption has no token ids; re-run `st cache` with {OPTION} true")
        grad = step is not None and self.trains_at(step) and torch.is_grad_enabled()
        with contextlib.nullcontext() if grad else torch.no_grad():
            embeds = self.embed_tokens(self.encoders, tokens)
        return {**{k: v for k, v in collated.items() if not is_token_key(k)}, **embeds}

    def train(self, mode: bool = True) -> None:
        for encoder in self.encoders:
            encoder.train(mode)

    def sync_gradients(self, accelerator) -> None:
        """Average the encoders' gradients over processes (they are not wrapped for data parallelism)."""
        if accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        for param in self.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= accelerator.num_processes

    # ------------------------------------------------------------------------------------- weights and files

    def state(self) -> dict[str, Any]:
        """The trained weights (LoRA, or all in a full run) by `<encoder subfolder>.<canonical parameter name>`:
        what a checkpoint stores."""
        return {f"{name}.{canonical(key)}": param.detach() for name, encoder in zip(self.names, self.encoders)
                for key, param in encoder.named_parameters() if self.full or "lora_" in key}  # fmt: skip

    def split(self, weights: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A checkpoint's weights as (the denoiser's, the encoders')."""
        prefixes = tuple(f"{name}." for name in self.names)
        mine = {k: v for k, v in weights.items() if k.startswith(prefixes)}
        return {k: v for k, v in weights.items() if k not in mine}, mine

    def load_state(self, state: dict[str, Any]) -> None:
        import torch

        expected = self.state()
        if set(state) != set(expected):
            missing = sorted(set(expected) - set(state))[:3]
            raise InputError(f"the checkpoint lacks text-encoder LoRA weights such as {missing}; was it trained with "
                             f"{OPTION} false?")  # fmt: skip
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(state[key].to(param.dtype))

    def save_full(self, out_dir: Path) -> list[Path]:
        """A full run's trained encoders as diffusers subfolders of `out_dir` (`text_encoder/`, `text_encoder_2/`)."""
        from ..tensorfile import normalise_file

        written = []
        for name, encoder in zip(self.names, self.encoders):
            encoder.save_pretrained(out_dir / name, safe_serialization=True)
            for weights in (out_dir / name).rglob("*.safetensors"):
                normalise_file(weights)
            written += sorted(p for p in (out_dir / name).rglob("*") if p.is_file())
        return written

    def lora_layers(self) -> dict[str, Any]:
        """`save_lora_weights` keyword arguments: each encoder's peft LoRA state dict and LoraConfig metadata."""
        from peft import get_peft_model_state_dict

        metadata = adapter_metadata(self.lora_config)
        out: dict[str, Any] = {}
        for name, encoder in zip(self.names, self.encoders):
            layers = get_peft_model_state_dict(encoder)
            out[f"{name}_lora_layers"] = {canonical(k): v.detach().contiguous() for k, v in layers.items()}
            out[f"{name}_lora_adapter_metadata"] = metadata
        return out


def canonical(name: str) -> str:
    """A CLIP parameter name as checkpoints and LoRA files spell it (`text_model.encoder.layers...`): transformers 5
    drops the `text_model.` level from the module tree, and diffusers' loader accepts both spellings."""
    return name if name.startswith("text_model.") else f"text_model.{name}"


def attach(denoiser, family: Family, source: str, config, cache_manifest: dict[str, Any], cache_where: Path | str,
           device: Any) -> TextEncoders | None:  # fmt: skip
    """The trained text encoders when `train_text_encoder` is on (after checking the cache), else None; they are
    recorded on `denoiser` for `save_lora` (call inside the run's seeded RNG scope: the LoRA init draws from it)."""
    options = TextEncoderOptions.from_config(config)
    if not options.train_text_encoder:
        return None
    trainable_text(family.name)
    check_cache(cache_manifest, cache_where)
    encoders = TextEncoders(family, source, options, device)
    setattr(denoiser, ATTRIBUTE, encoders)
    how = "whole" if encoders.full else f"with a rank-{options.lora_rank} LoRA"
    log.info("training %d text encoder(s) %s for %d step(s)", len(encoders.encoders), how, options.text_encoder_limit)
    return encoders


def of(denoiser) -> TextEncoders | None:
    return getattr(denoiser, ATTRIBUTE, None)


def adapter_metadata(config) -> dict[str, Any]:
    """A LoraConfig as JSON-ready adapter metadata, as diffusers' training scripts store it."""
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}


def save_lora(family: Family, out_dir: Path, encoders: TextEncoders, denoiser_state: dict[str, Any],
              denoiser_config) -> Path:  # fmt: skip
    """diffusers' `pytorch_lora_weights.safetensors` with the denoiser's and the text encoders' LoRA (keys
    `unet.*`, `text_encoder.*`, `text_encoder_2.*`), as the pipeline's `save_lora_weights` writes it."""
    from ..families.lora import LORA_WEIGHT_NAME

    prefix = family.denoiser.subfolder
    out_dir.mkdir(parents=True, exist_ok=True)
    family.load_pipeline_class().save_lora_weights(
        str(out_dir), **{f"{prefix}_lora_layers": {k: v.detach().contiguous() for k, v in denoiser_state.items()},
                         f"{prefix}_lora_adapter_metadata": adapter_metadata(denoiser_config)},
        **encoders.lora_layers(), safe_serialization=True,
    )  # fmt: skip
    return out_dir / LORA_WEIGHT_NAME
