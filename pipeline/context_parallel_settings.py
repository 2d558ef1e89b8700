"""context_parallel_size / context_parallel_comm_strategy: what st refuses before any model loads (`st check` and
`st train`). Training with context parallelism is pipeline.train.context_parallel."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

OPTION = "context_parallel_size"
STRATEGY = "context_parallel_comm_strategy"
STRATEGIES = ("allgather", "alltoall")
# Families whose CP training st has verified against a one-process run (tests/stages/test_context_parallel.py).
# Others whose transformer has a `_cp_plan` are refused until verified. LTX-Video trains with st's own plan
# (pipeline.train.context_parallel `_ltx_plan`): diffusers' splits the text too, which its cross-attention cannot take.
VERIFIED_FAMILIES = ("wan", "flux", "qwen_image", "flux2", "ltxvideo")


# ------------------------------------------------------------------------------------------------------- checks


def check(config: Any, family_name: str, denoiser_class: str | None = None, world: int | None = None,
          takes_reference: bool = False) -> None:  # fmt: skip
    """Refuse, before any model loads, a CP setting st cannot train. `world`: the processes launched (`st train`);
    without it (`st check`, before any launch) num_processes counts when it is set above 1. `takes_reference`: the
    run trains a reference-image variant (Flux Kontext, FLUX.2 on paired datasets; known once the cache is read)."""
    size = int(config.context_parallel_size or 1)
    if size < 1:
        raise ConfigError(f"{OPTION} must be 1 or more, got {size}")
    if size == 1:
        return
    processes = int(world if world is not None else config.num_processes)
    if (world is not None or processes > 1) and processes % size:
        raise ConfigError(f"{OPTION} {size} must divide the {processes} process(es) of the run (each "
                          f"context-parallel group is {size} processes); launch a multiple of {size} processes "
                          f"(num_processes) or change {OPTION}")  # fmt: skip
    strategy = strategy_of(config)
    if strategy not in STRATEGIES:
        raise ConfigError(f"{STRATEGY} '{strategy}' is not one of {', '.join(STRATEGIES)}")
    if family_name == "wan" and str(getattr(config, "model_flavour", None) or "").startswith("vace"):
        denoiser_class = "WanVACETransformer3DModel"  # the VACE flavours' transformer (pipeline.families.wan_vace)
    if family_name not in VERIFIED_FAMILIES or _has_cp_plan(denoiser_class) is False:
        plan = _has_cp_plan(denoiser_class)
        why = (f"its transformer ({denoiser_class}) has no context-parallel plan (`_cp_plan`)" if plan is False else
               "st has not verified its context-parallel training yet")  # fmt: skip
        raise ConfigError(f"{OPTION} {size} is not supported for model_family {family_name}: {why}; st's context "
                          f"parallelism trains model_family {', '.join(VERIFIED_FAMILIES)} (Wan: not the VACE "
                          f"flavours). Set {OPTION} to 1")  # fmt: skip
    _check_family(config, family_name, size)
    if takes_reference:
        raise ConfigError(f"{OPTION} {size} is not supported for model_family {family_name} trained on reference "
                          "images (paired conditioning datasets / an edit flavour): st has not verified the "
                          f"reference-image tokens under context parallelism; set {OPTION} to 1")  # fmt: skip
    combos = {
        "tread_config": getattr(config, "tread_config", None) is not None,
        "crepa_enabled": bool(getattr(config, "crepa_enabled", False)),
        "controlnet": bool(getattr(config, "controlnet", False)),
        "train_text_encoder": bool(getattr(config, "train_text_encoder", False)),
    }
    why = {
        "tread_config": "TREAD drops tokens of the whole sequence, which CP has split across processes "
                        "(SimpleTuner refuses it too)",
        "crepa_enabled": "CREPA reads a block's full token grid, which CP has split across processes",
        "controlnet": "the ControlNet's residuals are added to every token of the full sequence",
        "train_text_encoder": "the text encoders' gradients are synchronised outside DDP, unscaled for CP",
    }  # fmt: skip
    for name, on in combos.items():
        if on:
            raise ConfigError(f"{OPTION} {size} with {name} is not supported: {why[name]}; remove one of them")
    from .speed import check_context_parallel_attention, dynamo_backend

    check_context_parallel_attention(config)
    backend = dynamo_backend(config)
    if backend is not None:
        raise ConfigError(f"{OPTION} {size} with dynamo_backend {backend} is not supported yet: st has "
                          "not verified compiled blocks around diffusers' context-parallel attention; set "
                          f"dynamo_backend no or {OPTION} 1")  # fmt: skip


def _check_family(config: Any, family_name: str, size: int) -> None:
    """What a verified family feeds its transformer that the `_cp_plan` does not split consistently."""
    flavour = str(getattr(config, "model_flavour", None) or "")
    if family_name == "qwen_image" and flavour.startswith("edit"):
        raise ConfigError(f"{OPTION} {size} is not supported for model_flavour {flavour}: st has not verified "
                          f"Qwen-Image-Edit's reference-image tokens under context parallelism; set {OPTION} to "
                          "1")  # fmt: skip
    length = getattr(config, "tokenizer_max_length", None)
    if family_name in ("flux", "flux2") and length and int(length) % size:
        # Their text is padded to tokenizer_max_length without a mask, and the plan splits it with the image tokens.
        raise ConfigError(f"{OPTION} {size} with tokenizer_max_length {length}: {family_name}'s text sequence "
                          f"({length} tokens) must split evenly across the {size} processes; use a multiple of "
                          f"{size}")  # fmt: skip
    if family_name != "flux":
        return
    if flavour == "kontext":
        raise ConfigError(f"{OPTION} {size} is not supported for model_flavour kontext: st has not verified the "
                          f"reference-image tokens under context parallelism; set {OPTION} to 1")  # fmt: skip
    if bool(getattr(config, "control", False)):
        raise ConfigError(f"{OPTION} {size} with control (Flux channel-wise control) is not supported: st has not "
                          f"verified it; remove one of them")  # fmt: skip
    if bool(getattr(config, "flux_attention_masked_training", False)):
        # The joint text + image mask goes to every attention whole (joint_attention_kwargs), while the plan splits
        # the text and image tokens it masks (SimpleTuner's Flux does not split it either).
        raise ConfigError(f"{OPTION} {size} with flux_attention_masked_training is not supported: the joint "
                          "attention mask covers the whole text + image sequence, which context parallelism splits "
                          "across processes; remove one of them")  # fmt: skip


def _has_cp_plan(class_name: str | None) -> bool | None:
    """Whether diffusers' class `class_name` declares a `_cp_plan` (None: unknown)."""
    if not class_name:
        return None
    try:
        import diffusers

        cls = getattr(diffusers, class_name)
    except (ImportError, AttributeError):
        return None
    return getattr(cls, "_cp_plan", None) is not None


def strategy_of(config: Any) -> str:
    return str(getattr(config, STRATEGY, None) or "allgather").strip().lower()
