"""TREAD token routing (`tread_config`) while training, with SimpleTuner's router (helpers/training/tread.py).

For each route, before block `start_layer_idx` a seeded draw keeps `S - round(S * selection_ratio)` of the S image /
video tokens (uniform noise per token, argsort, the lowest first: SimpleTuner's `get_mask` with `l1_reg` 0, as its
transformers call it); the kept tokens, in that shuffled order, go through the blocks up to `end_layer_idx`; then
the full sequence is rebuilt with the skipped tokens as they were before the route. Text tokens are never routed,
and the rotary embeddings are gathered with the same permutation, so attention sees each kept token at its own
position. Routing runs only while the denoiser is in training mode with gradients on: evaluation losses and
validation images see every token.

How: hooks on the diffusers transformer, no copy of it. A forward pre-hook on the transformer opens a new routing
record for each training forward; a block's forward pre-hook at a route's start draws the mask once per forward (a
gradient-checkpointed block that recomputes its forward during the backward finds the draw already made and routes
the same tokens), and swaps the block's hidden states and rotary embeddings; the forward hook of a route's last block
restores the full sequence. One training forward is followed by its backward before the next training forward (as
st's trainer does): the record is that of the latest training forward.

The router's `torch.Generator` lives on the training device, seeded with `seed or 42` as in SimpleTuner; its state is
saved in checkpoints (`state` / `load_state`) so that a resumed run draws the masks an uninterrupted one draws.

Families (LAYOUTS): Wan (Wan 2.1 and 2.2 t2v / i2v, and Wan 2.2 TI2V, whose per-token time embeddings go with the
tokens), Flux (and Kontext, whose reference tokens follow the target's and are routed alike), FLUX.2 (klein and dev),
Chroma, AuraFlow, Qwen-Image (Edit 2511's per-token modulation index too), Z-Image, SD3, PixArt Sigma, Sana, HiDream
and LTX-Video. Blocks are counted in execution order (double / joint blocks, then single ones; Z-Image: its main
layers); in single-stream blocks, which take the text and image tokens as one sequence, only the image part is routed
(Z-Image: the caption tokens are force-kept). Sana, HiDream and LTX-Video route as SimpleTuner's transformers for them
do: each block of a route draws its own tokens (`Layout.per_block`).

Masked loss (mask / segmentation datasets), Flux, FLUX.2, Chroma and Wan: as SimpleTuner's model_predict does, the
tokens under the mask (the mask image's channel mean mapped to [0, 1], resized to the token grid - trilinear for Wan,
area for the others - above 0.5) are never dropped; the keep budget grows to the largest force-kept count of the
batch. SimpleTuner's SD3, PixArt, AuraFlow, Qwen-Image and Z-Image model_predict pass no such mask, so there masked
tokens are routed like the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..log import get_logger
from ..tread_settings import OPTION, SUPPORTED_FAMILIES, Route, check_family, parse_routes, resolve
from .block_swap import BLOCK_LISTS

log = get_logger("train")


# --------------------------------------------------------------------------------------------------- the router


@dataclass
class MaskInfo:
    """One route's draw: `ids_shuffle` puts the kept tokens first; `keep` of them go through the route."""

    ids_shuffle: Any  # B x S
    ids_restore: Any  # B x S, the inverse permutation
    keep: int


class Router:
    """SimpleTuner's TREADRouter, with the importance term that its transformers weight 0 left out."""

    def __init__(self, seed: int, device: Any) -> None:
        import torch

        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def get_mask(self, x, ratio: float, force_keep=None, routable: int | None = None) -> MaskInfo:
        """The draw for tokens `x` (B x S x D): one uniform number per token (in `x`'s dtype, as SimpleTuner draws
        it), force-kept tokens ranked first, then the lowest numbers. `routable`: the count the ratio applies to,
        when only part of the sequence may be dropped (Z-Image's image tokens); default all S."""
        import torch

        with torch.no_grad():
            batch, seq = x.shape[:2]
            keep = seq - int(round((seq if routable is None else routable) * float(ratio)))
            noise = torch.rand((batch, seq), dtype=x.dtype, device=x.device, generator=self.generator)
            if force_keep is not None:
                force_keep = force_keep.to(device=x.device, dtype=torch.bool)
                keep = max(keep, int(force_keep.sum(1).max()))
                noise = noise.masked_fill(force_keep, -1.0)
            ids_shuffle = torch.argsort(noise, dim=1)
            ids_restore = torch.argsort(ids_shuffle, dim=1)
        return MaskInfo(ids_shuffle, ids_restore, keep)

    @staticmethod
    def start_route(x, info: MaskInfo):
        """The kept tokens of `x` (B x S x D), in shuffled order: B x keep x D."""
        import torch

        shuffled = torch.take_along_dim(x, info.ids_shuffle.unsqueeze(-1), dim=1)
        return shuffled[:, : info.keep]

    @staticmethod
    def end_route(routed, info: MaskInfo, original):
        """The full sequence again: the routed tokens where they came from, the skipped ones from `original`."""
        import torch

        skipped = torch.take_along_dim(original, info.ids_shuffle[:, info.keep :].unsqueeze(-1), dim=1)
        shuffled = torch.cat([routed, skipped.to(routed.dtype)], dim=1)
        return torch.take_along_dim(shuffled, info.ids_restore.unsqueeze(-1), dim=1)


# ----------------------------------------------------------------------------------------------- block layouts


def _gather_tokens(table, info: MaskInfo, batch: int):
    """`table` (1 x S x ..., the same for every sample) gathered per sample to the kept tokens: B x keep x ..."""
    import torch

    rest = tuple(table.shape[2:])
    expanded = table.expand(batch, *table.shape[1:])
    index = info.ids_shuffle[:, : info.keep].to(table.device).reshape(batch, info.keep, *([1] * len(rest)))
    return torch.gather(expanded, 1, index.expand(batch, info.keep, *rest))


@dataclass(frozen=True)
class Layout:
    """Where a family's blocks take their image tokens and rotary embeddings, and where they return the tokens."""

    hidden: tuple[int, str]  # (position, keyword) of the image / video hidden states
    rope: tuple[int, str] | None  # (position, keyword) of the rotary embeddings (None: positions added before)
    text: tuple[int, str] | None  # (position, keyword) of the text hidden states (Flux: rope rows come first)
    output_index: int | None  # index of the hidden states in a tuple output (None: the output is them)
    keeps_masked: bool = True  # SimpleTuner's model_predict passes masked-loss tokens as force-keep (Flux, Wan)
    # The hidden states (and the output) are the text tokens, then the image tokens, in one sequence (single-stream
    # blocks of FLUX.2, Chroma, AuraFlow): only the image part is routed, the text rows stay.
    joint: bool = False
    mask: tuple[int, str] | None = None  # a B x (text + image) attention mask argument (Chroma), cut when routed
    joint_kwargs: tuple[int, str] | None = None  # Flux's joint_attention_kwargs (its masked-training mask)
    single: Layout | None = None  # the layout of the `single_transformer_blocks`, where it differs
    text_prefix: str | None = None  # a parameter whose tokens precede the text in joint blocks (AuraFlow's registers)
    complex_rope: bool = False  # Qwen-Image: (image, text) complex frequency tables; the image one is routed
    refused: tuple[int, str] | None = None  # an argument TREAD cannot route when set (Qwen-Image's modulate_index)
    refused_why: str = ""  # what that argument is, for the refusal
    # Z-Image: the hidden states are each sample's image tokens, then its caption tokens, padded to one length; the
    # rotary table (B x L x D/2) and the mask (B x L) are per token and gathered with them, and the caption and padding
    # are force-kept. Each sample's image length comes from the first block of this list (its mask, else its width).
    unified: str | None = None
    # Arguments (position, keyword, ndim) with a token axis (dim 1) whose first S rows belong to the S routed tokens,
    # gathered with the kept ones when the argument has that ndim and at least S rows: Wan 2.2 TI2V's per-token time
    # embedding, LTX-Video's per-token temb, Qwen-Image Edit 2511's modulate_index, HiDream's image mask and rotary
    # table (its text rows follow the image's and stay).
    per_token: tuple[tuple[int, str, int], ...] = ()
    # Each block of a route draws its own tokens and puts the skipped ones back after itself (SimpleTuner's Sana,
    # HiDream and LTX-Video transformers route so), instead of one draw carried through the route's blocks.
    per_block: bool = False
    # The hidden states (and the output) are the image tokens, then the text tokens (HiDream's single blocks): only
    # the first S rows are routed, S being the image token count of the first block of `image_len_from`.
    image_first: bool = False
    image_len_from: str | None = None
    # Sana: the (height, width) arguments of the block's Mix-FFN token grid; the kept tokens are convolved at their
    # own grid positions (see `Tread._ff_scatter`).
    grid: tuple[tuple[int, str], tuple[int, str]] | None = None

    def route_rope(self, rope, info: MaskInfo, batch: int, text_len: int):
        """Wan: (cos, sin), each 1 x S x 1 x D -> B x keep x 1 x D. Flux: (cos, sin), each (T + S) x D for T text and
        S image rows -> B x (T + keep) x D (the text rows unrouted)."""
        import torch

        if self.unified is not None:  # one B x L x D/2 table of the whole sequence
            return _gather_tokens(rope, info, batch)
        if self.complex_rope:  # (S x D/2 image, T x D/2 text) -> (B x keep x D/2, the text table)
            image, text = rope
            return _gather_tokens(image.unsqueeze(0), info, batch), text
        if self.text is None and not self.joint:
            return tuple(_gather_tokens(r, info, batch) for r in rope)
        routed = []
        for r in rope:
            text_rows = r[:text_len].unsqueeze(0).expand(batch, -1, -1)
            image_rows = _gather_tokens(r[text_len:].unsqueeze(0), info, batch)
            routed.append(torch.cat([text_rows, image_rows], dim=1))
        return tuple(routed)


# Wan: block(hidden_states, encoder_hidden_states, temb, rotary_emb) -> hidden_states, positionally in both of
# diffusers' loops. Flux: block(hidden_states=, encoder_hidden_states=, temb=, image_rotary_emb=, ...) ->
# (encoder_hidden_states, hidden_states), by keyword (positionally under gradient checkpointing); diffusers' single
# blocks take the text and image tokens apart too, so only the image tokens are routed there as well.
# SD3: block(hidden_states=, encoder_hidden_states=, temb=, joint_attention_kwargs=) -> (text, image); PixArt:
# block(hidden_states, attention_mask=None, encoder_hidden_states=, ...) -> hidden_states. Neither has rotary
# embeddings (positions are added at the patch embedding), and SimpleTuner's model_predict of both passes no
# force-keep mask, so their masked-loss tokens may be routed like any other (as there).
# FLUX.2, Chroma and AuraFlow: double (joint) blocks as Flux's (FLUX.2 under checkpointing: hidden, text, two
# modulations, rotary, ...; Chroma: hidden, text, temb, rotary, attention_mask); their single blocks take the text
# tokens then the image tokens in one sequence (FLUX.2: hidden, None, modulation, rotary; Chroma: hidden, temb,
# rotary, attention_mask; AuraFlow: hidden, temb) and return that sequence: only its image part is routed, and a
# route that spans the double / single boundary carries its kept image tokens over (the transformer joins them to
# the text). FLUX.2 and Chroma take one rotary table over text and image rows, routed as Flux's. AuraFlow adds its
# positions at the patch embedding and puts its 8 register tokens before the text. SimpleTuner's AuraFlow
# model_predict passes no force-keep mask; its FLUX.2 and Chroma ones do (area-resized, as Flux's).
# DEVIATION (FLUX.2): SimpleTuner's FLUX.2 transformer calls `route` / `unroute` methods its TREADRouter does not
# have (helpers/training/tread.py has get_mask / start_route / end_route), so a routed FLUX.2 step stops there; its
# intent is to restore the image tokens at the double / single boundary and draw again over text + image in the
# single blocks with the text force-kept. st routes FLUX.2 as SimpleTuner routes Chroma and AuraFlow: one draw per
# route over the image tokens, carried across the boundary.
# Qwen-Image: block(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb,
# joint_attention_kwargs, modulate_index) -> (text, image); its rotary tables are complex (image S x D/2, text
# T x D/2), applied right after the q / k norms as Flux's, so routed ones go through `_ComplexRotaryAfterNorm`.
# DEVIATION: SimpleTuner's Qwen-Image transformer routes the tokens but passes the full image table on (which does
# not fit the kept tokens); st gathers each kept token's own frequencies. Its model_predict passes no force-keep
# mask. The per-token modulation of the zero_cond_t (Edit 2511) models is not routed there: refused.
# Z-Image: its main `layers` (the refiners before them are not counted), layer(x, attn_mask, freqs_cis, adaln_input,
# noise_mask, ...) -> x over one sequence per sample: image tokens, then caption tokens, padded. As SimpleTuner does,
# the whole sequence is routed with the caption (and padding) force-kept; the per-token rotary table goes with the
# tokens. DEVIATIONS: SimpleTuner applies selection_ratio to the whole sequence (keep L - round(L * ratio) tokens, the
# caption among them, so a long caption takes the image tokens' places); st drops round(S * ratio) of the S image
# tokens, as every other family does. SimpleTuner sets the routed attention mask to all ones (padding becomes
# visible); st gathers the mask with the tokens, so padding stays masked. Its model_predict passes no force-keep
# mask; omni mode (per-token noise_mask) is refused.
# Wan 2.2 TI2V (5B) embeds one timestep per token: its blocks take a B x S x 6 x D temb, gathered with the kept tokens.
# DEVIATION: SimpleTuner's Wan transformer passes the full per-token temb to the routed blocks, whose shapes then do
# not match (a routed TI2V step stops there); st routes each kept token with its own time embedding.
# Qwen-Image Edit 2511 (zero_cond_t): modulate_index (B x S, 0 for the target's tokens, 1 for the references') picks
# each token's modulation; it is gathered with the kept tokens. DEVIATION: SimpleTuner passes the full index with the
# kept tokens (shapes that do not match); st routes it.
# Sana: block(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep, height, width)
# -> hidden_states; linear self-attention (no positions: none added, or added at the patch embedding), cross-attention
# to the text, and a Mix-FFN whose 3 x 3 depthwise convolution runs over the height x width token grid. As
# SimpleTuner's Sana transformer does, each block of a route draws its own tokens (get_mask on that block's input,
# start_route, the block, end_route with the skipped tokens as they entered it). DEVIATION: SimpleTuner's block
# reshapes the kept tokens to a (keep x 1) column in their shuffled order, so its convolution mixes each token with
# randomly drawn others; st convolves each kept token at its own place in the grid, the dropped places as zero padding
# (as the grid's border is). Its model_predict passes no force-keep mask.
# HiDream: double blocks block(hidden_states, hidden_states_masks, encoder_hidden_states, temb, image_rotary_emb) ->
# (image, text); single blocks take the image tokens, then the text tokens (T5, Llama, the block's own Llama layer) in
# one sequence and return it; the rotary table (B x (S + T) x 1 x D/2 x 2 x 2) and the image mask (non-square
# images: B x max_seq, ones over the real tokens) have the image rows first. As SimpleTuner's HiDream transformer
# intends, each block of a route routes its own draw of the image tokens (its MoE feed-forward sees the kept ones
# only); the rotary rows and the mask go with them. DEVIATIONS: SimpleTuner's HiDream transformer calls
# `get_mask(token_count, ..., force_keep_mask=...)`, which its TREADRouter does not take (a routed step stops there),
# and passes the full rotary table and mask; st routes both. One draw per route could not run here: diffusers cuts
# the single blocks' sequence to the length it had before the route.
# LTX-Video (0.9.x): block(hidden_states, encoder_hidden_states, temb, image_rotary_emb, encoder_attention_mask) ->
# hidden_states; the rotary tables (cos, sin) are B x S x D and the temb is per token (B x S x 6D) when the first
# frame is a condition (frame_timestep_scale), else B x 1 x 6D. DEVIATION: SimpleTuner's LTX-Video model has no
# tread_init (a tread_config stops with NotImplementedError) and its transformer's routing code calls get_mask as
# HiDream's does; st routes LTX-Video as that code lays out: each block of a route draws its own video tokens, the
# rotary tables and a per-token temb go with them. No force-keep mask (SimpleTuner has no LTX-Video model_predict
# for it).
LAYOUTS = {
    "wan": Layout(hidden=(0, "hidden_states"), rope=(3, "rotary_emb"), text=None, output_index=None,
                  per_token=((2, "temb", 4),)),
    "flux": Layout(hidden=(0, "hidden_states"), rope=(3, "image_rotary_emb"), text=(1, "encoder_hidden_states"),
                   output_index=1, joint_kwargs=(4, "joint_attention_kwargs")),
    "flux2": Layout(hidden=(0, "hidden_states"), rope=(4, "image_rotary_emb"), text=(1, "encoder_hidden_states"),
                    output_index=1,
                    single=Layout(hidden=(0, "hidden_states"), rope=(3, "image_rotary_emb"), text=None,
                                  output_index=None, joint=True)),
    "chroma": Layout(hidden=(0, "hidden_states"), rope=(3, "image_rotary_emb"), text=(1, "encoder_hidden_states"),
                     output_index=1, mask=(4, "attention_mask"),
                     single=Layout(hidden=(0, "hidden_states"), rope=(2, "image_rotary_emb"), text=None,
                                   output_index=None, joint=True, mask=(3, "attention_mask"))),
    "qwen_image": Layout(hidden=(0, "hidden_states"), rope=(4, "image_rotary_emb"), text=(1, "encoder_hidden_states"),
                         output_index=1, keeps_masked=False, complex_rope=True,
                         per_token=((6, "modulate_index", 2),)),
    "z_image": Layout(hidden=(0, "x"), rope=(2, "freqs_cis"), text=None, output_index=None, mask=(1, "attn_mask"),
                      keeps_masked=False, refused=(4, "noise_mask"), unified="noise_refiner",
                      refused_why="Z-Image's omni mode modulates each token by its own noise mask"),
    "auraflow": Layout(hidden=(0, "hidden_states"), rope=None, text=(1, "encoder_hidden_states"), output_index=1,
                       keeps_masked=False, text_prefix="register_tokens",
                       single=Layout(hidden=(0, "hidden_states"), rope=None, text=None, output_index=None,
                                     joint=True, keeps_masked=False)),
    "sd3": Layout(hidden=(0, "hidden_states"), rope=None, text=None, output_index=1, keeps_masked=False),
    "pixart_sigma": Layout(hidden=(0, "hidden_states"), rope=None, text=None, output_index=None, keeps_masked=False),
    "sana": Layout(hidden=(0, "hidden_states"), rope=None, text=None, output_index=None, keeps_masked=False,
                   per_block=True, grid=((5, "height"), (6, "width"))),
    "hidream": Layout(hidden=(0, "hidden_states"), rope=None, text=None, output_index=0, keeps_masked=False,
                      per_block=True, image_len_from="double_stream_blocks",
                      per_token=((1, "hidden_states_masks", 2), (4, "image_rotary_emb", 6)),
                      single=Layout(hidden=(0, "hidden_states"), rope=None, text=None, output_index=None,
                                    keeps_masked=False, image_first=True,
                                    per_token=((1, "hidden_states_masks", 2), (4, "image_rotary_emb", 6)))),
    "ltxvideo": Layout(hidden=(0, "hidden_states"), rope=(3, "image_rotary_emb"), text=None, output_index=None,
                       keeps_masked=False, per_block=True, per_token=((2, "temb", 3),)),
}
LAYOUTS["wan_i2v"] = LAYOUTS["wan"]
LAYOUTS["flux_kontext"] = LAYOUTS["flux"]  # the reference image's tokens follow the target's, routed alike
assert set(LAYOUTS) == set(SUPPORTED_FAMILIES)


def _get(args: tuple, kwargs: dict, where: tuple[int, str]):
    position, name = where
    return kwargs[name] if name in kwargs else args[position]


def _set(args: tuple, kwargs: dict, where: tuple[int, str], value) -> tuple:
    position, name = where
    if name in kwargs:
        kwargs[name] = value
        return args
    return args[:position] + (value,) + args[position + 1 :]


def _get_optional(args: tuple, kwargs: dict, where: tuple[int, str]):
    position, name = where
    return kwargs.get(name) if name in kwargs else (args[position] if len(args) > position else None)


def _route_rows(value, info: MaskInfo):
    """`value` (B or 1 x L x ..., L >= S) with the S routed tokens' rows first: those rows gathered to the kept tokens
    (B x keep x ...), the rows after them as they are."""
    import torch

    batch, seq = info.ids_shuffle.shape
    kept = _gather_tokens(value[:, :seq], info, batch)
    if value.shape[1] == seq:
        return kept
    rest = value[:, seq:]
    return torch.cat([kept, rest.expand(batch, *rest.shape[1:])], dim=1)


def _shorten_attention_mask(args: tuple, kwargs: dict, where: tuple[int, str], length: int) -> tuple:
    """Flux's `flux_attention_masked_training` mask (B x 1 x 1 x (text + image), in joint_attention_kwargs), cut
    to the routed sequence: the kept image tokens are still all ones."""
    joint = _get_optional(args, kwargs, where)
    mask = (joint or {}).get("attention_mask")
    if mask is None or mask.shape[-1] == length:
        return args
    return _set(args, kwargs, where, {**joint, "attention_mask": mask[..., :length]})


def _shorten_mask_argument(args: tuple, kwargs: dict, where: tuple[int, str], length: int) -> tuple:
    """Chroma's B x (text + image) attention mask argument (the T5 padding mask, ones over the image tokens), cut to
    the routed sequence: the kept image tokens keep their ones. DEVIATION: SimpleTuner's Chroma transformer, when a
    route starts or ends in its single blocks, replaces the image part of this mask with zeros for the rest of the
    forward (`cat(mask[:, :txt_len], zeros)`); with the mask applied to queries and keys alike, that takes every
    image token out of attention in those blocks, a side effect st does not copy."""
    mask = _get_optional(args, kwargs, where)
    if mask is None or mask.shape[-1] == length:
        return args
    return _set(args, kwargs, where, mask[:, :length])


# ------------------------------------------------------------------------------------------- batched rotary (Flux)


class _RotaryAfterNorm:
    """`attn` seen through a processor call with per-sample rotary embeddings: diffusers' Flux processor applies
    (S x D) rotary tables, shared by the batch, right after the q / k norms; routed tokens need B x S x D ones. This
    view applies them inside the norms instead (text rows in `norm_added_*`, the rest in `norm_*`), with diffusers'
    own formula, and the processor runs with no rotary of its own. Everything else is `attn` itself."""

    def __init__(self, attn, cos, sin, text_len: int) -> None:
        self._attn, self._cos, self._sin, self._text_len = attn, cos, sin, text_len

    def __getattr__(self, name: str):
        value = getattr(self._attn, name)
        if name in ("norm_q", "norm_k"):
            joint = getattr(self._attn, "added_kv_proj_dim", None) is not None
            rows = slice(self._text_len, None) if joint else slice(None)
            return lambda x: _rotate(value(x), self._cos[:, rows], self._sin[:, rows])
        if name in ("norm_added_q", "norm_added_k"):
            rows = slice(None, self._text_len)
            return lambda x: _rotate(value(x), self._cos[:, rows], self._sin[:, rows])
        return value


def _rotate(x, cos, sin):
    """diffusers' apply_rotary_emb (use_real, unbind dim -1, sequence_dim 1) with B x S x D tables."""
    import torch

    cos, sin = cos[:, :, None, :].to(x.device), sin[:, :, None, :].to(x.device)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


class _ComplexRotaryAfterNorm:
    """As `_RotaryAfterNorm` for Qwen-Image's complex tables: the image query / key (`norm_q` / `norm_k`) rotate with
    per-sample B x S x D/2 frequencies, diffusers' `apply_rotary_emb_qwen(use_real=False)` formula; the processor
    then applies an identity table to them, and the text's own table to the text rows."""

    def __init__(self, attn, freqs) -> None:
        self._attn, self._freqs = attn, freqs

    def __getattr__(self, name: str):
        value = getattr(self._attn, name)
        if name in ("norm_q", "norm_k"):
            if value is None:
                raise ConfigError(f"{OPTION}: this Qwen-Image transformer has no q / k norms to route rotary "
                                  "embeddings through")  # fmt: skip
            return lambda x: _rotate_complex(value(x), self._freqs)
        return value


def _rotate_complex(x, freqs):
    import torch

    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs[:, :, None, :].to(x.device)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class ComplexRotaryProcessor:
    """Wraps Qwen-Image's attention processor: unrouted (2-D) image tables go to it unchanged, routed (3-D) ones
    through `_ComplexRotaryAfterNorm`."""

    def __init__(self, inner) -> None:
        import inspect

        self.inner = inner
        self._signature = inspect.signature(inner.__call__)

    def __call__(self, attn, *args, **kwargs):
        import torch

        bound = self._signature.bind(attn, *args, **kwargs)
        rope = bound.arguments.get("image_rotary_emb")
        if rope is None or rope[0].ndim == 2:
            return self.inner(attn, *args, **kwargs)
        image, text = rope
        bound.arguments["attn"] = _ComplexRotaryAfterNorm(attn, image)
        bound.arguments["image_rotary_emb"] = (torch.ones_like(image[0]), text)  # x * (1 + 0i) is x exactly
        return self.inner(*bound.args, **bound.kwargs)


def _wrap_processor(wrapper, inner, *extra):
    """`wrapper(inner, *extra)`, as an instance of a subclass whose `__call__` shows `inner`'s signature: diffusers'
    attention modules pass a processor only the keyword arguments its `__call__` names."""
    import inspect

    def __call__(self, *args, **kwargs):
        return wrapper.__call__(self, *args, **kwargs)

    __call__.__signature__ = inspect.signature(type(inner).__call__)
    return type(wrapper.__name__, (wrapper,), {"__call__": __call__})(inner, *extra)


class BatchedRotaryProcessor:
    """Wraps a Flux-style attention processor (Flux, FLUX.2, Chroma; FLUX.2's single-block processor takes no
    `encoder_hidden_states`): 2-D rotary tables go to it unchanged; routed (3-D) ones through `_RotaryAfterNorm`."""

    def __init__(self, inner, text_len_of) -> None:
        import inspect

        self.inner = inner
        self.text_len_of = text_len_of  # the text length of the current block call
        self._signature = inspect.signature(inner.__call__)

    def __call__(self, attn, *args, **kwargs):
        bound = self._signature.bind(attn, *args, **kwargs)
        rope = bound.arguments.get("image_rotary_emb")
        if rope is None or rope[0].ndim == 2:
            return self.inner(attn, *args, **kwargs)
        cos, sin = rope
        bound.arguments["attn"] = _RotaryAfterNorm(attn, cos, sin, self.text_len_of())
        bound.arguments["image_rotary_emb"] = None
        return self.inner(*bound.args, **bound.kwargs)


# ------------------------------------------------------------------------------------------------------ routing


@dataclass
class _RouteDraw:
    info: MaskInfo | None = None
    original: Any = None  # the full hidden states entering the route
    rope: Any = None


@dataclass
class _Forward:
    """The routing of one training forward."""

    draws: list[_RouteDraw]
    force_keep: Any = None
    text_len: int = 0
    image_lengths: Any = None  # Z-Image: each sample's image token count (B)
    image_len: int = 0  # HiDream: the image token count, which its single blocks' sequences start with
    grid: Any = None  # Sana: (draw, height, width) of the routed block running now


@dataclass
class Tread:
    """The routes of a run, the router and the hooks on the denoiser."""

    routes: list[Route]
    depth: int
    seed: int
    layout: Layout
    router: Router
    pending_force_keep: Any = None
    current: _Forward | None = None
    handles: list = field(default_factory=list)
    # The routes the hooks run: the routes themselves, or one route per block of each (`Layout.per_block`).
    spans: list[Route] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.spans:
            self.spans = ([Route(r.selection_ratio, i, i) for r in self.routes
                           for i in range(r.start_layer_idx, r.end_layer_idx + 1)]
                          if self.layout.per_block else list(self.routes))  # fmt: skip

    def record(self) -> dict[str, Any]:
        """What the train manifest records: the routes with block indices counted from 0."""
        return {"routes": [r.as_dict() for r in self.routes], "blocks": self.depth, "seed": self.seed}

    def state(self) -> dict[str, Any]:
        from .state_io import generator_state

        return generator_state(self.router.generator)

    def load_state(self, state: dict[str, Any]) -> None:
        from .state_io import set_generator_state

        set_generator_state(self.router.generator, state)

    # --------------------------------------------------------------------------------------- force-keep (masks)

    def keep_masked(self, mask_pixels, mask_kind: str | None, latents, denoiser_config) -> None:
        """The tokens the next training forward must not drop: those under a mask / segmentation image
        (SimpleTuner's model_predict), or none. Called before each training forward, after the previous backward:
        the previous forward's routing (and the hidden states it holds) is let go."""
        import torch
        import torch.nn.functional as F

        self.current = None
        self.pending_force_keep = None
        if mask_pixels is None or mask_kind not in ("mask", "segmentation") or not self.layout.keeps_masked:
            return
        with torch.no_grad():
            pixels = mask_pixels.to(device=latents.device, dtype=torch.float32)
            image = (pixels.mean(1, keepdim=True) + 1) / 2
            if latents.ndim == 5:  # Wan: B x C x T x H x W latents, patch (t, h, w)
                if image.ndim == 4:
                    image = image.unsqueeze(2)
                patch = tuple(denoiser_config.patch_size)
                grid = tuple(latents.shape[2 + i] // patch[i] for i in range(3))
                tokens = F.interpolate(image, size=grid, mode="trilinear", align_corners=False)
            else:  # Flux: B x C x H x W latents packed 2 x 2
                grid = (latents.shape[2] // 2, latents.shape[3] // 2)
                tokens = F.interpolate(image, size=grid, mode="area")
            self.pending_force_keep = tokens.flatten(1) > 0.5

    # --------------------------------------------------------------------------------------------------- hooks

    def install(self, denoiser, blocks: list) -> None:
        starts = {r.start_layer_idx: k for k, r in enumerate(self.spans)}
        ends = {r.end_layer_idx: k for k, r in enumerate(self.spans)}
        inside = {i: k for k, r in enumerate(self.spans) for i in range(r.start_layer_idx, r.end_layer_idx + 1)}
        single = {id(b) for name in ("single_transformer_blocks", "single_stream_blocks")
                  for b in getattr(denoiser, name, None) or ()}  # fmt: skip
        self.handles.append(denoiser.register_forward_pre_hook(self._begin, with_kwargs=True))
        if self.layout.unified is not None:
            first = getattr(denoiser, self.layout.unified)[0]
            self.handles.append(first.register_forward_pre_hook(self._image_lengths, with_kwargs=True))
        if self.layout.image_len_from is not None:  # before the block's own routing hook, which may need it
            first = getattr(denoiser, self.layout.image_len_from)[0]
            self.handles.append(first.register_forward_pre_hook(self._image_len, with_kwargs=True))
        for i, block in enumerate(blocks):
            if i not in inside:
                continue
            layout = self.layout.single if self.layout.single is not None and id(block) in single else self.layout
            self.handles.append(block.register_forward_pre_hook(
                self._pre_hook(inside[i], i in starts, layout), with_kwargs=True))  # fmt: skip
            if i in ends:
                self.handles.append(block.register_forward_hook(self._post_hook(ends[i], layout)))
            if layout.grid is not None:  # Sana's Mix-FFN: the kept tokens convolved at their grid places
                self.handles += [block.ff.conv_inverted.register_forward_hook(self._ff_scatter),
                                 block.ff.conv_depth.register_forward_hook(self._ff_gather)]
            attn = getattr(block, "attn", None)
            rows_with_text = layout.text is not None or layout.joint
            if layout.rope is not None and rows_with_text and attn is not None and hasattr(attn, "set_processor"):
                attn.set_processor(_wrap_processor(ComplexRotaryProcessor, attn.processor) if layout.complex_rope
                                   else _wrap_processor(BatchedRotaryProcessor, attn.processor,
                                                        lambda: self.current.text_len))  # fmt: skip

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _begin(self, module, args, kwargs):  # noqa: ARG002
        import torch

        if module.training and torch.is_grad_enabled():
            self.current = _Forward([_RouteDraw() for _ in self.spans], force_keep=self.pending_force_keep)
            self.pending_force_keep = None
            if self.layout.single is not None and self.layout.single.joint:
                # single blocks see text then image tokens: the text length (after any prefix tokens) splits them
                text = _get_optional(args, kwargs, (1, "encoder_hidden_states"))
                prefix = getattr(module, self.layout.text_prefix) if self.layout.text_prefix else None
                self.current.text_len = text.shape[1] + (prefix.shape[1] if prefix is not None else 0)

    def _image_lengths(self, block, args, kwargs) -> None:
        """Z-Image: each sample's image token count, from the first image refiner block's input (x, attn_mask)."""
        import torch

        if not self._active(block):
            return
        x, mask = _get(args, kwargs, (0, "x")), _get_optional(args, kwargs, (1, "attn_mask"))
        self.current.image_lengths = (mask.sum(1) if mask is not None else
                                      torch.full((x.shape[0],), x.shape[1], device=x.device))  # fmt: skip

    def _image_len(self, block, args, kwargs) -> None:
        """HiDream: the image token count, from the first double block's hidden states."""
        if self._active(block):
            self.current.image_len = _get(args, kwargs, (0, "hidden_states")).shape[1]

    def _active(self, block) -> bool:
        import torch

        return self.current is not None and block.training and torch.is_grad_enabled()

    def _pre_hook(self, k: int, starts: bool, layout: Layout):
        import torch

        route = self.spans[k]

        def hook(block, args, kwargs):
            if not self._active(block):
                return None
            draw = self.current.draws[k]
            if layout.text is not None:
                self.current.text_len = _get(args, kwargs, layout.text).shape[1]
            text_len = self.current.text_len
            if starts:
                joined = _get(args, kwargs, layout.hidden)
                image_len = self.current.image_len
                hidden = (joined[:, text_len:] if layout.joint else joined[:, :image_len] if layout.image_first
                          else joined)  # fmt: skip
                if draw.info is None:  # once per forward: a checkpointed recompute reuses the draw
                    self._check_tokens(hidden)
                    if layout.refused and _get_optional(args, kwargs, layout.refused) is not None:
                        raise ConfigError(f"{OPTION}: {layout.refused_why} ({layout.refused[1]}), which TREAD does "
                                          f"not route; remove {OPTION}")  # fmt: skip
                    force_keep = self.current.force_keep
                    if layout.unified is not None:  # the caption and padding after each sample's image tokens
                        positions = torch.arange(hidden.shape[1], device=hidden.device)
                        force_keep = positions[None, :] >= self.current.image_lengths.to(hidden.device)[:, None]
                    if force_keep is not None and force_keep.shape[1] < hidden.shape[1]:
                        # Kontext: the mask covers the target's tokens; its reference tokens follow, routed freely
                        # (SimpleTuner's shapes do not match there)
                        extra = hidden.shape[1] - force_keep.shape[1]
                        force_keep = torch.nn.functional.pad(force_keep, (0, extra), value=False)
                    if force_keep is not None and force_keep.shape != hidden.shape[:2]:
                        raise ConfigError(f"{OPTION}: the loss mask covers {force_keep.shape[1]} tokens but the "
                                          f"transformer routes {hidden.shape[1]}")  # fmt: skip
                    routable = None
                    if layout.unified is not None:  # the ratio drops a share of the image tokens (the fewest's)
                        routable = int(self.current.image_lengths.min())
                    draw.info = self.router.get_mask(hidden, route.selection_ratio, force_keep, routable)
                    draw.original = hidden
                    if layout.rope is not None:
                        draw.rope = layout.route_rope(_get(args, kwargs, layout.rope), draw.info, hidden.shape[0],
                                                      self.current.text_len)  # fmt: skip
                routed = Router.start_route(hidden, draw.info)
                if layout.joint:
                    routed = torch.cat([joined[:, :text_len], routed], dim=1)
                elif layout.image_first:
                    routed = torch.cat([routed, joined[:, image_len:]], dim=1)
                args = _set(args, kwargs, layout.hidden, routed)
            if draw.info is None:
                raise RuntimeError(f"TREAD route {k} reached block {route.end_layer_idx} without its start")
            if layout.rope is not None:
                args = _set(args, kwargs, layout.rope, draw.rope)
            if layout.joint_kwargs is not None:
                args = _shorten_attention_mask(args, kwargs, layout.joint_kwargs, text_len + draw.info.keep)
            if layout.mask is not None and layout.unified is not None:  # each block gets the full-sequence mask
                mask = _get_optional(args, kwargs, layout.mask)
                if mask is not None:
                    args = _set(args, kwargs, layout.mask, _gather_tokens(mask, draw.info, mask.shape[0]))
            elif layout.mask is not None:
                args = _shorten_mask_argument(args, kwargs, layout.mask, text_len + draw.info.keep)
            for position, name, ndim in layout.per_token:
                value = _get_optional(args, kwargs, (position, name))
                if value is not None and value.ndim == ndim and value.shape[1] >= draw.info.ids_shuffle.shape[1]:
                    args = _set(args, kwargs, (position, name), _route_rows(value, draw.info))
            if layout.grid is not None:  # the block's grid becomes keep x 1 (its depthwise convolution: the real one)
                height, width = (int(_get(args, kwargs, where)) for where in layout.grid)
                self.current.grid = (draw.info, height, width)
                args = _set(args, kwargs, layout.grid[0], draw.info.keep)
                args = _set(args, kwargs, layout.grid[1], 1)
            return args, kwargs

        return hook

    def _post_hook(self, k: int, layout: Layout):
        import torch

        def hook(block, args, output):  # noqa: ARG001
            if not self._active(block):
                return None
            draw = self.current.draws[k]
            self.current.grid = None
            if layout.image_first:  # the routed image rows, then the text rows
                keep = draw.info.keep
                image = Router.end_route(output[:, :keep], draw.info, draw.original)
                return torch.cat([image, output[:, keep:]], dim=1)
            if layout.joint:  # text rows, then the routed image rows
                text_len = self.current.text_len
                image = Router.end_route(output[:, text_len:], draw.info, draw.original)
                return torch.cat([output[:, :text_len], image], dim=1)
            if layout.output_index is None:
                return Router.end_route(output, draw.info, draw.original)
            output = list(output)
            output[layout.output_index] = Router.end_route(output[layout.output_index], draw.info, draw.original)
            return tuple(output)

        return hook

    # ------------------------------------------------------------------------------------------ Sana's Mix-FFN

    def _ff_scatter(self, conv, args, output):  # noqa: ARG002
        """After the Mix-FFN's first 1 x 1 convolution (which, like the last one, runs on the kept tokens only, as
        the routed block shapes them: B x C x keep x 1): its output put at the kept tokens' own places of the
        height x width grid, zeros elsewhere, for the 3 x 3 depthwise convolution. The SiLU between them keeps the
        zeros, so the dropped places are what the grid's zero-padded border is to that convolution."""
        if self.current is None or self.current.grid is None:
            return None
        info, height, width = self.current.grid
        batch, channels = output.shape[:2]
        index = info.ids_shuffle[:, : info.keep].to(output.device)
        grid = output.new_zeros(batch, channels, height * width)
        grid = grid.scatter(2, index[:, None, :].expand(batch, channels, info.keep), output.flatten(2))
        return grid.view(batch, channels, height, width)

    def _ff_gather(self, conv, args, output):  # noqa: ARG002
        """After the depthwise convolution: the kept tokens' places again, B x C x keep x 1 in their routed order."""
        import torch

        if self.current is None or self.current.grid is None:
            return None
        info = self.current.grid[0]
        batch, channels = output.shape[:2]
        index = info.ids_shuffle[:, : info.keep].to(output.device)
        return torch.gather(output.flatten(2), 2, index[:, None, :].expand(batch, channels, info.keep)).unsqueeze(-1)

    @staticmethod
    def _check_tokens(hidden) -> None:
        if hidden.ndim != 3:
            raise ConfigError(f"{OPTION}: expected B x tokens x width hidden states, got {tuple(hidden.shape)}")


# ------------------------------------------------------------------------------------------------------- set-up


def check(config, family_name: str) -> None:
    """Refuse, before the model loads, a bad `tread_config` or one this run cannot route."""
    routes = parse_routes(config.tread_config)
    if routes is None:
        return
    check_family(config.tread_config, family_name, getattr(config, "model_flavour", None))
    if getattr(config, "controlnet", False):
        raise ConfigError(f"{OPTION} with controlnet: true is not supported: the ControlNet's residuals are added to "
                          "every image token of the routed blocks; remove one of them")  # fmt: skip
    if getattr(config, "crepa_enabled", False):
        raise ConfigError(f"{OPTION} with crepa_enabled is not supported: CREPA reads a block's full token grid, "
                          "which a route shortens; remove one of them")  # fmt: skip
    from ..speed import dynamo_backend

    if dynamo_backend(config) is not None:
        raise ConfigError(f"{OPTION} with dynamo_backend {config.dynamo_backend} is not supported yet: the routing "
                          "hooks are not compiled with the blocks; set dynamo_backend no or remove "
                          f"{OPTION}")  # fmt: skip


# The block lists routes count, in execution order: block swap's (Flux: double blocks, then single ones; Wan:
# `blocks`), AuraFlow's joint blocks, which run before its single ones, and Z-Image's main `layers`.
# HiDream: its double-stream blocks, then its single-stream ones.
TREAD_BLOCK_LISTS = ("joint_transformer_blocks", "double_stream_blocks", "single_stream_blocks", *BLOCK_LISTS, "layers")


def transformer_blocks_of(denoiser) -> list:
    """The blocks routes count, in execution order (Flux: its double blocks, then its single ones)."""
    return [block for name in TREAD_BLOCK_LISTS for block in getattr(denoiser, name, None) or ()]


def attach(config, family_name: str, denoiser, device) -> Tread | None:
    """TREAD on `denoiser`'s blocks when `tread_config` is set, else None."""
    routes = parse_routes(config.tread_config)
    if routes is None:
        return None
    check(config, family_name)
    blocks = transformer_blocks_of(denoiser)
    resolved = resolve(routes, len(blocks))
    seed = config.seed or 42  # SimpleTuner: TREADRouter(seed=seed or 42, device=accelerator.device)
    tread = Tread(resolved, len(blocks), seed, LAYOUTS[family_name], Router(seed, device))
    tread.install(denoiser, blocks)
    log.info("TREAD token routing: %s over %d blocks (seed %d)",
             ", ".join(f"blocks {r.start_layer_idx}..{r.end_layer_idx} drop {r.selection_ratio:g}"
                       for r in resolved), len(blocks), seed)  # fmt: skip
    return tread
