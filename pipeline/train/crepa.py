"""CREPA (cross-frame representation alignment) for the video families, with SimpleTuner's maths.

A forward hook takes the output of the video transformer's block `crepa_block_index` (`denoiser.blocks[i]` for
Wan, `denoiser.transformer_blocks[i]` for LTX-Video): B x (f*h*w) x D tokens, reshaped to B x f x (h*w) x D frames.
A projector (LayerNorm then Linear, float32, PyTorch's default initialisation, trained with the adapter at its
learning rate and saved in checkpoints) maps them to the teacher's width. The teacher features are
- by default, the frozen DINOv2 encoder's class token of every frame of the decoded clean latents (the VAE decodes
  the batch's cached latents as the family's pipeline would; `crepa_encoder.py`), frames resized to
  `crepa_encoder_image_size`; the decoded frames (1 + (f - 1) * temporal compression) are subsampled to the
  transformer's f frames at `linspace(0, T - 1, f)` (truncated), as SimpleTuner does;
- with `crepa_use_backbone_features`, the same denoiser's block `crepa_teacher_block_index` output (default: the
  student block), detached.
Token counts that differ are matched by interpolating both to the smaller count (bilinear on square grids, linear
along the sequence otherwise), or with `crepa_spatial_align` false by mean-pooling both to one token. With
projection p and features y L2-normalised per token, sim(f, k) is the mean over tokens of p_f . y_k, and per video

    S = sum_f [ sim(f, f) + sum_{k in K(f)} exp(-|k - f| / tau) sim(f, k) ]      (divided by f if normalize_by_frames)

where K(f) = {f - d, f + d} inside the clip (d = min(crepa_adjacent_distance, frames - 1); with
`crepa_cumulative_neighbors` every distance 1..d). The training loss becomes loss + crepa_lambda * (-mean S over
the batch); the metrics log `crepa_loss` (that weighted term), `crepa_alignment_score` (mean of the summed terms per
frame) and `crepa_similarity_self` (mean sim(f, f)). crepa_lambda 0 adds nothing (nothing is decoded or encoded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import OptionGroup
from ..errors import ConfigError, InputError
from ..log import get_logger
from ..video_settings import check_crepa_family
from .crepa_encoder import FrameEncoder, LatentDecoder
from .seeding import isolated_rng

log = get_logger("train")

BLOCK_LISTS = ("blocks", "transformer_blocks")  # Wan, LTX-Video


@dataclass(frozen=True)
class CrepaOptions(OptionGroup):
    crepa_enabled: bool
    crepa_block_index: int | None
    crepa_lambda: float
    crepa_adjacent_distance: int
    crepa_adjacent_tau: float
    crepa_cumulative_neighbors: bool
    crepa_normalize_by_frames: bool
    crepa_spatial_align: bool
    crepa_model: str
    crepa_use_backbone_features: bool
    crepa_teacher_block_index: int | None
    crepa_encoder_image_size: int

    @property
    def teacher_block(self) -> int | None:
        """The block whose output is the teacher (backbone features only)."""
        if not self.crepa_use_backbone_features:
            return None
        return self.crepa_block_index if self.crepa_teacher_block_index is None else self.crepa_teacher_block_index


def options_for(config: Any, family: Any) -> CrepaOptions | None:
    """The run's CREPA options (None when off); ConfigError for a family CREPA cannot train. Called before the
    model loads, so a refused run stops at once."""
    options = CrepaOptions.from_config(config)
    if not options.crepa_enabled:
        return None
    check_crepa_family(True, family)
    return options  # (crepa_block_index is required when the config loads)


# ------------------------------------------------------------------------------------------------------ the maths


def frames_of(hidden: Any, latent_frames: int, patch_t: int) -> Any:
    """Block output B x (f*h*w) x D -> B x f x (h*w) x D, f = latent frames / temporal patch size."""
    frames = max(1, latent_frames // patch_t)
    batch, tokens, dim = hidden.shape
    if tokens % frames:
        raise InputError(f"CREPA: a block output of {tokens} tokens does not split into {frames} frames")
    return hidden.reshape(batch, frames, tokens // frames, dim)


def align_frames(projected: Any, features: Any) -> tuple[Any, Any]:
    """Subsample the one with more frames to the other's count (indices linspace(0, T - 1, t), truncated)."""
    import torch

    t_proj, t_feat = projected.shape[1], features.shape[1]
    if t_proj == t_feat:
        return projected, features
    if t_feat > t_proj:
        index = torch.linspace(0, t_feat - 1, t_proj, device=features.device).long()
        return projected, features.index_select(1, index)
    index = torch.linspace(0, t_proj - 1, t_feat, device=projected.device).long()
    return projected.index_select(1, index), features


def interpolate_tokens(tokens: Any, count: int) -> Any:
    """B x T x N x D -> B x T x count x D: bilinear when both counts are square grids, else linear along N."""
    import torch.nn.functional as F

    batch, frames, n, dim = tokens.shape
    if n == count:
        return tokens
    flat = tokens.reshape(batch * frames, n, dim).permute(0, 2, 1)
    side, target_side = math.isqrt(n), math.isqrt(count)
    if side * side == n and target_side * target_side == count:
        grid = F.interpolate(flat.reshape(batch * frames, dim, side, side), size=(target_side, target_side),
                             mode="bilinear", align_corners=False)  # fmt: skip
        flat = grid.reshape(batch * frames, dim, count)
    else:
        flat = F.interpolate(flat, size=count, mode="linear", align_corners=False)
    return flat.permute(0, 2, 1).reshape(batch, frames, count, dim)


def align_tokens(projected: Any, features: Any, spatial_align: bool) -> tuple[Any, Any]:
    """Match token counts: both interpolated to the smaller count, or (spatial_align false) both mean-pooled."""
    n_proj, n_feat = projected.shape[2], features.shape[2]
    if n_proj == n_feat:
        return projected, features
    if not spatial_align:
        return projected.mean(dim=2, keepdim=True), features.mean(dim=2, keepdim=True)
    count = min(n_proj, n_feat)
    return interpolate_tokens(projected, count), interpolate_tokens(features, count)


def neighbour_similarity(projected: Any, features: Any, distance: int, tau: float, cumulative: bool) -> tuple[Any, Any]:
    """(B x T summed similarity per frame, B x T self-similarity) of normalised B x T x N x D tensors."""
    self_sim = (projected * features).sum(dim=-1).mean(dim=-1)
    total = self_sim.clone()
    frames = total.shape[1]
    d = min(distance, frames - 1)
    tau = max(tau, 1e-8)
    for offset in (range(1, d + 1) if cumulative else [d] if d > 0 else []):
        weight = math.exp(-float(offset) / tau)
        forward = (projected[:, :-offset] * features[:, offset:]).sum(dim=-1).mean(dim=-1)  # frame f with f + offset
        backward = (projected[:, offset:] * features[:, :-offset]).sum(dim=-1).mean(dim=-1)  # f with f - offset
        total[:, :-offset] += weight * forward
        total[:, offset:] += weight * backward
    return total, self_sim


def alignment(projected: Any, features: Any, options: CrepaOptions) -> tuple[Any, dict[str, float]]:
    """The unweighted CREPA loss (-mean over videos of S) of projections and teacher features (B x T x N x D
    each, before alignment and normalisation) and its metrics."""
    import torch.nn.functional as F

    projected, features = align_frames(projected, features)
    projected, features = align_tokens(projected, features, options.crepa_spatial_align)
    projected, features = F.normalize(projected, dim=-1), F.normalize(features, dim=-1)
    total, self_sim = neighbour_similarity(projected, features, options.crepa_adjacent_distance,
                                           options.crepa_adjacent_tau, options.crepa_cumulative_neighbors)  # fmt: skip
    per_video = total.sum(dim=1)
    if options.crepa_normalize_by_frames:
        per_video = per_video / float(total.shape[1])
    metrics = {"crepa_alignment_score": float(total.mean().detach()),
               "crepa_similarity_self": float(self_sim.mean().detach())}  # fmt: skip
    return -per_video.mean(), metrics


# ------------------------------------------------------------------------------------------------ in training


def video_blocks(denoiser: Any) -> Any:
    """The denoiser's list of transformer blocks (Wan: `blocks`, LTX-Video: `transformer_blocks`)."""
    for name in BLOCK_LISTS:
        blocks = getattr(denoiser, name, None)
        if blocks is not None:
            return blocks
    raise InputError(f"CREPA: a {type(denoiser).__name__} has no transformer block list ({' or '.join(BLOCK_LISTS)})")


def _block(blocks: Any, index: int, key: str, denoiser: Any) -> Any:
    if not 0 <= index < len(blocks):
        raise ConfigError(f"{key} is {index}, but this {type(denoiser).__name__} has {len(blocks)} blocks "
                          f"(0..{len(blocks) - 1}); choose one of them")  # fmt: skip
    return blocks[index]


def _hidden_size(denoiser: Any) -> int:
    config = denoiser.config
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    if not heads or not head_dim:
        raise InputError(f"CREPA: cannot tell the hidden size of a {type(denoiser).__name__}")
    return int(heads) * int(head_dim)


def _temporal_patch(denoiser: Any) -> int:
    """The frames per token of the transformer's patch embedding (Wan: patch_size[0]; LTX: patch_size_t)."""
    config = denoiser.config
    patch = config.get("patch_size", 1)
    if config.get("patch_size_t"):
        return int(config["patch_size_t"])
    return int(patch[0]) if isinstance(patch, (list, tuple)) and len(patch) == 3 else 1


class BlockCapture:
    """Forward hooks that keep named block outputs of the denoiser's training forward passes (CREPA's and
    LayerSync's): a pass with gradients enabled arms them (not evaluation or validation), `take()` disarms them and
    hands over what they kept, so a gradient-checkpointing recomputation overwrites nothing."""

    captured: dict[str, Any]
    armed: bool

    def hook(self, denoiser: Any, blocks: dict[str, Any]) -> None:
        self.captured, self.armed = {}, False
        denoiser.register_forward_pre_hook(self._arm)
        for name, block in blocks.items():
            block.register_forward_hook(self._capture(name))

    def pick(self, output: Any) -> Any:
        """What a hooked block's output holds to keep (the first element of a tuple)."""
        return output[0] if isinstance(output, tuple) else output

    def take(self) -> dict[str, Any]:
        self.armed = False
        captured, self.captured = self.captured, {}
        return captured

    def _arm(self, module: Any, args: Any) -> None:  # noqa: ARG002
        """A denoiser forward pass starts: capture its block outputs if it trains (not evaluation or validation)."""
        import torch

        self.captured.clear()
        self.armed = torch.is_grad_enabled()

    def _capture(self, name: str):
        def hook(module: Any, args: Any, output: Any) -> None:  # noqa: ARG001
            if self.armed:  # not during a gradient-checkpointing recomputation
                self.captured[name] = self.pick(output)

        return hook


class Crepa(BlockCapture):
    """CREPA for one run: hooks on the denoiser, the trained projector and the teacher. After each training forward
    pass, `loss(latents)` gives the weighted term to add to the loss."""

    def __init__(self, options: CrepaOptions, denoiser: Any, projector: Any, encoder: FrameEncoder | None,
                 decoder: LatentDecoder | None) -> None:  # fmt: skip
        self.options, self.projector, self.encoder, self.decoder = options, projector, encoder, decoder
        self.patch_t = _temporal_patch(denoiser)
        self.logged: list[dict[str, float]] = []
        blocks = video_blocks(denoiser)
        hooked = {"student": _block(blocks, options.crepa_block_index, "crepa_block_index", denoiser)}
        if options.teacher_block is not None:
            hooked["teacher"] = _block(blocks, options.teacher_block, "crepa_teacher_block_index", denoiser)
        self.hook(denoiser, hooked)

    def parameters(self) -> list[Any]:
        return list(self.projector.parameters())

    def loss(self, latents: Any) -> Any:
        """crepa_lambda x the CREPA loss of the last forward pass, whose clean latents were `latents`
        (B x C x f x h x w); a zero without gradient when crepa_lambda is 0."""
        import torch

        captured = self.take()
        weight = float(self.options.crepa_lambda)
        if weight == 0:
            return torch.zeros((), device=latents.device)
        if "student" not in captured:
            raise InputError(f"CREPA: block {self.options.crepa_block_index} did not run in the forward pass")
        hidden = frames_of(captured["student"], latents.shape[2], self.patch_t)
        projected = self.projector(hidden.float())
        if self.encoder is None:
            features = frames_of(captured["teacher"], latents.shape[2], self.patch_t).detach().float()
        else:
            features = self.encoder(self.decoder(latents))
        value, metrics = alignment(projected, features.to(projected.device), self.options)
        weighted = value * weight
        self.logged.append({"crepa_loss": float(weighted.detach()), **metrics})
        return weighted

    def metrics(self) -> dict[str, float]:
        """The mean of each CREPA metric since the last call (empty when none)."""
        logged, self.logged = self.logged, []
        return {key: sum(m[key] for m in logged) / len(logged) for key in logged[0]} if logged else {}

    def sync_gradients(self, accelerator: Any) -> None:
        """Average the projector's gradients over processes (it is not wrapped for data parallelism)."""
        if accelerator.num_processes > 1:
            for param in self.parameters():
                if param.grad is not None:
                    param.grad = accelerator.reduce(param.grad, reduction="mean")

    def state(self) -> dict[str, Any]:
        """The projector's weights (a checkpoint's `crepa` part)."""
        return {f"projector.{key}": value.detach() for key, value in self.projector.state_dict().items()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.projector.load_state_dict({key.removeprefix("projector."): value for key, value in state.items()})


def build_projector(hidden_size: int, target_size: int, seed: int, device: Any) -> Any:
    """LayerNorm + Linear (SimpleTuner's CREPA projector), initialised from `seed` without moving the global RNG."""
    import torch

    with isolated_rng(seed=seed):
        projector = torch.nn.Sequential(torch.nn.LayerNorm(hidden_size), torch.nn.Linear(hidden_size, target_size))
    return projector.to(device=device, dtype=torch.float32)


def attach(options: CrepaOptions, family: Any, denoiser: Any, *, source: str, vae_source: str | None,
           base_dir: Path | None, seed: int, device: Any) -> Crepa:  # fmt: skip
    """CREPA on `denoiser` (after its adapters are attached): the encoder and VAE loaded unless the teacher is a
    block of the denoiser, the projector built, the hooks registered."""
    hidden_size = _hidden_size(denoiser)
    encoder = decoder = None
    if options.teacher_block is None:
        with isolated_rng(seed=seed):  # loading must not move the run's random streams
            encoder = FrameEncoder.load(options.crepa_model, options.crepa_encoder_image_size, device, base_dir)
            decoder = LatentDecoder.load(family, source, vae_source, device)
    target = hidden_size if encoder is None else encoder.dim
    projector = build_projector(hidden_size, target, seed, device)
    crepa = Crepa(options, denoiser, projector, encoder, decoder)
    log.info("CREPA: block %d -> %s, lambda %g", options.crepa_block_index,
             f"block {options.teacher_block}" if encoder is None else f"{options.crepa_model} features",
             options.crepa_lambda)  # fmt: skip
    return crepa
