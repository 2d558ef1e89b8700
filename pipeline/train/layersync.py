"""LayerSync: a transformer block's hidden states pulled towards another block's, inside the same denoiser, with
SimpleTuner's maths (simpletuner/helpers/training/layersync.py).

Forward hooks (CREPA's, `crepa.BlockCapture`) keep the image / video tokens that the student block and the teacher
block output in each training forward pass. Blocks are counted in execution order (Flux: its double blocks, then its
single ones), as SimpleTuner's `layer_<i>` hidden-state buffer counts them. `layersync_student_block` and
`layersync_teacher_block` are LayerSync's 1-based depths: SimpleTuner tries `layer_<idx - 1>` first and always finds
it (its buffer captures idx - 1 and idx), so depth d is block d - 1, and 0 is the first block too. The teacher
defaults to the student (self-similarity: a constant -lambda, no gradient). With the B x S x D tokens (a video's
B x f x hw x D flattened) L2-normalised per token and the teacher's detached,

    loss += -layersync_lambda * mean over batch and tokens of  student_token . teacher_token

and the metrics log `layersync_loss` (that weighted term) and `layersync_similarity` (the mean cosine similarity).
LayerSync has no trained parameters and no state of its own, so a checkpoint needs nothing more.

DEVIATIONS: SimpleTuner turns layersync_lambda 0 into 0.2 (`lambda or 0.2`); st refuses a lambda that is not above 0,
as SimpleTuner's documentation says training does. The similarity is computed in float32 (SimpleTuner: in the
hidden states' dtype, bf16 under mixed precision). LayerSync with a ControlNet (whose residuals SimpleTuner's buffer
includes and a block's output lacks), TREAD routes (routed blocks output fewer tokens) or context parallelism (each
process holds part of the tokens) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import OptionGroup
from ..errors import ConfigError, InputError
from ..log import get_logger
from .crepa import BlockCapture

log = get_logger("train")

# The families LayerSync trains: their block lists in execution order, and which element of a block's output tuple
# holds the image / video tokens (None: the block returns the tokens). Flux and SD3 blocks return (text, image); Flux's
# single blocks too (diffusers splits their joint sequence back), which SimpleTuner's buffer slices to the image part.
FAMILY_BLOCKS: dict[str, tuple[tuple[str, ...], int | None]] = {
    "flux": (("transformer_blocks", "single_transformer_blocks"), 1),
    "sd3": (("transformer_blocks",), 1),
    "pixart_sigma": (("transformer_blocks",), None),
    "sana": (("transformer_blocks",), None),
    "wan": (("blocks",), None),
    "ltxvideo": (("transformer_blocks",), None),
}
# Denoisers whose block outputs are not the hidden states SimpleTuner captures (VACE adds its control hints after
# some blocks).
REFUSED_DENOISERS = {"WanVACETransformer3DModel": "Wan VACE adds its control hints to the hidden states after its "
                                                  "blocks, outside the block outputs LayerSync hooks"}


@dataclass(frozen=True)
class LayerSyncOptions(OptionGroup):
    layersync_enabled: bool
    layersync_student_block: int | None
    layersync_teacher_block: int | None
    layersync_lambda: float

    @property
    def teacher(self) -> int:
        """The teacher depth (default: the student's)."""
        return self.layersync_student_block if self.layersync_teacher_block is None else self.layersync_teacher_block


def options_for(config: Any, family: Any) -> LayerSyncOptions | None:
    """The run's LayerSync options (None when off); ConfigError for a family or combination LayerSync cannot train.
    Called before the model loads, so a refused run stops at once."""
    options = LayerSyncOptions.from_config(config)
    if not options.layersync_enabled:
        return None
    check_family(family.name)
    for key, on, why in (
        ("controlnet", bool(getattr(config, "controlnet", False)),
         "the ControlNet's residuals are added to the hidden states after the blocks LayerSync hooks"),
        ("tread_config", getattr(config, "tread_config", None) is not None,
         "a TREAD route shortens the token sequence of its blocks, so student and teacher tokens would not pair"),
        ("context_parallel_size", int(getattr(config, "context_parallel_size", 1) or 1) > 1,
         "each process holds only part of a block's tokens"),
    ):  # fmt: skip
        if on:
            raise ConfigError(f"layersync_enabled with {key} is not supported: {why}; remove one of them")
    return options


def check_family(family_name: str) -> None:
    if family_name not in FAMILY_BLOCKS:
        raise ConfigError(f"layersync_enabled is true, but st's LayerSync does not train model_family {family_name} "
                          f"yet; it trains {', '.join(sorted(FAMILY_BLOCKS))}: set layersync_enabled false")


# ------------------------------------------------------------------------------------------------------ the maths


def flatten_tokens(hidden: Any) -> Any:
    """B x S x D as is; B x f x hw x D (a video's frames) -> B x (f*hw) x D."""
    if hidden.ndim == 4:
        return hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
    if hidden.ndim == 3:
        return hidden
    raise InputError(f"LayerSync: unsupported hidden-state shape {tuple(hidden.shape)}")


def similarity(student: Any, teacher: Any) -> Any:
    """The mean over batch and tokens of the cosine similarity of student tokens with (detached) teacher tokens."""
    import torch.nn.functional as F

    student = F.normalize(flatten_tokens(student).float(), dim=-1)
    teacher = F.normalize(flatten_tokens(teacher).detach().float(), dim=-1)
    if student.shape != teacher.shape:
        raise InputError(f"LayerSync: the student block output {tuple(student.shape)} and the teacher's "
                         f"{tuple(teacher.shape)} differ in shape")  # fmt: skip
    return (student * teacher).sum(dim=-1).mean()


# ------------------------------------------------------------------------------------------------ in training


def denoiser_blocks(family_name: str, denoiser: Any) -> list:
    """The denoiser's transformer blocks in execution order, as LayerSync counts them."""
    names, _ = FAMILY_BLOCKS[family_name]
    blocks = [block for name in names for block in getattr(denoiser, name, None) or ()]
    if not blocks:
        raise InputError(f"LayerSync: a {type(denoiser).__name__} has no transformer block list ({' or '.join(names)})")
    return blocks


def block_index(depth: int, count: int, key: str, denoiser: Any) -> int:
    """SimpleTuner's resolution of a LayerSync depth: d >= 1 is block d - 1; 0 is block 0."""
    if not 0 <= depth <= count:
        raise ConfigError(f"{key} is {depth}, but this {type(denoiser).__name__} has {count} transformer "
                          f"block{'s' if count != 1 else ''}: "
                          f"LayerSync counts them from 1 (1..{count}; 0 is the first one too); choose one of them")
    return max(depth - 1, 0)


class LayerSync(BlockCapture):
    """LayerSync for one run: hooks on the student and teacher blocks. After each training forward pass, `loss()`
    gives the weighted term to add to the loss."""

    def __init__(self, options: LayerSyncOptions, family_name: str, denoiser: Any) -> None:
        check_family(family_name)
        name = type(denoiser).__name__
        if name in REFUSED_DENOISERS:
            raise ConfigError(f"layersync_enabled is not supported for a {name}: {REFUSED_DENOISERS[name]}; set "
                              "layersync_enabled false")  # fmt: skip
        self.options = options
        blocks = denoiser_blocks(family_name, denoiser)
        self.student = block_index(options.layersync_student_block, len(blocks), "layersync_student_block", denoiser)
        self.teacher = block_index(options.teacher, len(blocks), "layersync_teacher_block", denoiser)
        if self.teacher == self.student:  # SimpleTuner's default teacher: the loss is then -lambda, with no gradient
            log.warning("LayerSync: student and teacher are the same block (%d; layersync_teacher_block defaults to "
                        "the student's depth), so its loss is the constant -layersync_lambda and trains nothing; set "
                        "layersync_teacher_block deeper than layersync_student_block", self.student)  # fmt: skip
        _, self.part = FAMILY_BLOCKS[family_name]
        self.logged: list[dict[str, float]] = []
        self.hook(denoiser, {"student": blocks[self.student], "teacher": blocks[self.teacher]})

    def pick(self, output: Any) -> Any:
        """The image / video tokens of a block's output."""
        return output[self.part] if isinstance(output, (tuple, list)) else output

    def loss(self) -> Any:
        """-layersync_lambda x the mean cosine similarity of the last training forward pass's student and teacher
        tokens."""
        captured = self.take()
        missing = [role for role in ("student", "teacher") if role not in captured]
        if missing:
            raise InputError(f"LayerSync: the {' and '.join(missing)} block did not run in the forward pass")
        mean = similarity(captured["student"], captured["teacher"])
        weighted = -mean * float(self.options.layersync_lambda)
        self.logged.append({"layersync_loss": float(weighted.detach()), "layersync_similarity": float(mean.detach())})
        return weighted

    def metrics(self) -> dict[str, float]:
        """The mean of each LayerSync metric since the last call (empty when none)."""
        logged, self.logged = self.logged, []
        return {key: sum(m[key] for m in logged) / len(logged) for key in logged[0]} if logged else {}


def attach(options: LayerSyncOptions, family: Any, denoiser: Any) -> LayerSync:
    """LayerSync's hooks on `denoiser` (after its adapters are attached, before its blocks are compiled)."""
    layersync = LayerSync(options, family.name, denoiser)
    log.info("LayerSync: block %d -> block %d (depths %d -> %d), lambda %g", layersync.student, layersync.teacher,
             options.layersync_student_block, options.teacher, options.layersync_lambda)  # fmt: skip
    return layersync
