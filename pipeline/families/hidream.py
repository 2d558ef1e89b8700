"""HiDream-I1: a sparse (mixture-of-experts) DiT over 16-channel latents, conditioned on CLIP-L and CLIP-G pooled
outputs, T5-XXL and the hidden states of every Llama 3.1 layer.

Text, as `HiDreamImagePipeline.encode_prompt` with `max_sequence_length` 128 (SimpleTuner's default and the most it
allows without `i_know_what_i_am_doing`): `pooled_prompt_embeds` are the two CLIPs' projected pooled outputs side by
side (both padded to min(128, 218) tokens); `prompt_embeds_t5` is T5's last hidden state over its padded sequence
(run with the attention mask, padded positions kept); `prompt_embeds_llama3` is the stack of Llama's hidden states
after each layer (layers x tokens x dim per prompt, padded with `<|eot_id|>`, run with the attention mask). The keys
are the pipeline's own argument names. `collate_text` puts a batch's Llama stack as the pipeline hands it over,
layers first (layers x batch x tokens x dim).

Denoiser: the pipeline passes B x C x h x w latents, the scheduler's timestep (sigma * 1000) and the three text
tensors; the transformer patchifies itself (square latents as they are; non-square ones padded to its `max_seq`
tokens with `img_sizes`, `img_ids` and a token mask it builds) and predicts the negated flow velocity, which the
pipeline negates back. In training mode it returns its patches (B x C x tokens x p*p), which `predict` folds back.

HiDream-ai's repositories do not ship the Llama encoder (diffusers' example loads it separately); SimpleTuner always
loads `text_encoder_4` / `tokenizer_4` from terminusresearch/HiDream-I1-Llama-3.1-8B-Instruct. st does so when the
model folder (or hub repository) lacks those subfolders (`TextEncoderSpec.source`), and uses the model's own copy
when it has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.families import text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import EOS, clip_tokenizer, llama3_tokenizer, t5_tokenizer
from pipeline.log import get_logger

log = get_logger("families")

MAX_LENGTH = 128  # the pipeline's max_sequence_length default; SimpleTuner caps tokenizer_max_length to it
CLIP_LIMIT = 218  # the pipeline pads the CLIP prompts to min(max_sequence_length, 218)
CLIP_POSITIONS = 248  # HiDream's CLIP encoders have 248 positions (more than the pipeline ever uses)
# SimpleTuner's DEFAULT_LORA_TARGET is to_k, to_q, to_v, to_out.0; HiDream's `to_out` is a plain Linear, so
# "to_out.0" matches no module and peft trains the image stream's q/k/v projections only: st names those three.
LORA_TARGETS = ("to_k", "to_q", "to_v")
# Where SimpleTuner loads text_encoder_4 / tokenizer_4 from (HiDream-ai's repositories do not ship them).
LLAMA_REPO = "terminusresearch/HiDream-I1-Llama-3.1-8B-Instruct"

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "CLIPTextModelWithProjection", "transformers"),
        tokenizer=Component("tokenizer", "CLIPTokenizer", "transformers"),
        max_length=MAX_LENGTH,
        kind="clip",
    ),
    TextEncoderSpec(
        model=Component("text_encoder_2", "CLIPTextModelWithProjection", "transformers"),
        tokenizer=Component("tokenizer_2", "CLIPTokenizer", "transformers"),
        max_length=MAX_LENGTH,
        kind="clip",
    ),
    TextEncoderSpec(
        model=Component("text_encoder_3", "T5EncoderModel", "transformers"),
        tokenizer=Component("tokenizer_3", "T5Tokenizer", "transformers"),
        max_length=MAX_LENGTH,
        kind="t5",
    ),
    TextEncoderSpec(
        model=Component("text_encoder_4", "LlamaForCausalLM", "transformers"),
        tokenizer=Component("tokenizer_4", "PreTrainedTokenizerFast", "transformers"),
        max_length=MAX_LENGTH,
        kind="llama3",
        source=LLAMA_REPO,
    ),
)


def _sequence_length(max_length: int | None) -> int:
    """`tokenizer_max_length` as SimpleTuner reads it for HiDream: unset -> 128, more than 128 -> 128 (a warning)."""
    length = text.check_max_length(max_length, MAX_LENGTH)
    if length > MAX_LENGTH:
        log.warning("tokenizer_max_length %d: HiDream was trained on %d tokens; using %d, as SimpleTuner does",
                    length, MAX_LENGTH, MAX_LENGTH)  # fmt: skip
        length = MAX_LENGTH
    return length


def encode_prompts(
    text_encoders: Any,
    tokenizers: Any,
    prompts: list[str],
    *,
    max_length: int | None = None,
    t5_padding: str = "unmodified",
    device: Any = "cpu",
) -> list[dict[str, Any]]:
    """Per prompt, `pooled_prompt_embeds` (CLIP-L + CLIP-G dims), `prompt_embeds_t5` (tokens x T5 dim) and
    `prompt_embeds_llama3` (layers x tokens x Llama dim), as `HiDreamImagePipeline.encode_prompt`. `max_length` is
    its `max_sequence_length`; `t5_padding="zero"` zeroes T5's outputs at padded positions."""
    import torch

    text.check_t5_padding(t5_padding)
    prompts = text.check_prompts(prompts)
    clip_l, clip_g, t5, llama = tuple(text_encoders)
    tok_l, tok_g, tok_t5, tok_llama = tuple(tokenizers)
    length = _sequence_length(max_length)
    if tok_llama.pad_token != tok_llama.eos_token:
        tok_llama.pad_token = tok_llama.eos_token  # as the pipeline sets it when it is built
    with torch.no_grad():
        pooled = []
        for tokenizer, encoder in ((tok_l, clip_l), (tok_g, clip_g)):
            ids, _ = text.tokenize(tokenizer, prompts, min(length, CLIP_LIMIT), device)
            pooled.append(encoder(ids, output_hidden_states=True)[0])
        ids, t5_mask = text.tokenize(tok_t5, prompts, min(length, tok_t5.model_max_length), device)
        t5_embeds = t5(ids, attention_mask=t5_mask)[0]
        ids, mask = text.tokenize(tok_llama, prompts, min(length, tok_llama.model_max_length), device)
        hidden = llama(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True).hidden_states
    if t5_padding == "zero":
        t5_embeds = text.zero_padding(t5_embeds, t5_mask)
    layers = torch.stack(hidden[1:], dim=1)  # batch x layers x tokens x dim: split per prompt
    return text.split({"pooled_prompt_embeds": torch.cat(pooled, dim=-1), "prompt_embeds_t5": t5_embeds,
                       "prompt_embeds_llama3": layers})  # fmt: skip


def collate_text(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`text.collate`, with the Llama stack layers first (layers x batch x tokens x dim) as the pipeline passes it."""
    batch = text.collate(items)
    batch["prompt_embeds_llama3"] = batch["prompt_embeds_llama3"].transpose(0, 1).contiguous()
    return batch


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`HiDreamImagePipeline`'s denoiser call: latents as they are, the timestep on the 0..1000 scale, the T5,
    Llama and pooled embeddings; the output negated (the transformer predicts -velocity). Non-square latents must
    fit the transformer's `max_seq` tokens (it pads them to that many)."""
    b, c, h, w = latents.shape
    patch = transformer.config.patch_size
    if h % patch or w % patch:
        raise InputError(f"HiDream packs {patch}x{patch} latent patches: latent height and width must be multiples "
                         f"of {patch}, got {h} x {w}")  # fmt: skip
    tokens = (h // patch) * (w // patch)
    if h != w and tokens > transformer.max_seq:
        size = transformer.config.max_resolution
        raise InputError(f"a {w}x{h} latent is {tokens} patches; HiDream takes non-square images of at most "
                         f"{transformer.max_seq} patches (max_resolution {size[0]}x{size[1]} latent pixels): use "
                         "smaller buckets")  # fmt: skip
    out = transformer(
        hidden_states=latents,
        timesteps=timesteps,
        encoder_hidden_states_t5=text["prompt_embeds_t5"],
        encoder_hidden_states_llama3=text["prompt_embeds_llama3"],
        pooled_embeds=text["pooled_prompt_embeds"],
        return_dict=False,
    )[0]
    if out.shape != latents.shape:  # training mode: B x C x tokens x (p1 p2), non-square padded to max_seq tokens
        grid = out[:, :, :tokens].reshape(b, c, h // patch, w // patch, patch, patch)
        out = grid.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)
    return -out


def llama_encoder(tokenizer: Any, hidden: int = 32) -> Any:
    """A tiny `LlamaForCausalLM` (2 layers, grouped-query attention) whose ids match `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny HiDream-I1 diffusers folder: one double- and one single-stream block (4 routed experts, 2
    active), a 2-layer Llama whose two hidden states feed the two blocks, Flux's VAE factors (0.3611 / 0.1159)
    and a flow-matching Euler scheduler with SimpleTuner's shift of 3. The pipeline always renders 128 x 128
    latents (HiDream's 1024 px area at the real VAE factor), so the tiny VAE has no mid-block attention."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel

    tokenizer = clip_tokenizer(pad_token=EOS, max_length=CLIP_POSITIONS)
    tokenizer_2 = clip_tokenizer(pad_token="!", max_length=CLIP_POSITIONS)
    tokenizer_3 = t5_tokenizer()
    tokenizer_4 = llama3_tokenizer()
    tiny_parts.seed_everything(seed)
    text_encoder = tiny_parts.clip_text(tokenizer, projection=True)
    tiny_parts.seed_everything(seed + 1)
    text_encoder_2 = tiny_parts.clip_text(tokenizer_2, projection=True, hidden_act="gelu", hidden=48)
    tiny_parts.seed_everything(seed + 2)
    text_encoder_3 = tiny_parts.t5_encoder(tokenizer_3, d_model=48)
    tiny_parts.seed_everything(seed + 3)
    text_encoder_4 = llama_encoder(tokenizer_4)
    tiny_parts.seed_everything(seed + 4)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_channels=[text_encoder_3.config.d_model, text_encoder_4.config.hidden_size],
        text_emb_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(8, 4, 4),
        # Non-square latents are padded to max_seq = 32 x 32 patches (the real model: 64 x 64, what its pipeline
        # renders); square ones are not, so validation (always 128 x 128 latents here) renders square sizes only.
        max_resolution=(64, 64),
        llama_layers=[0, 1],
    ).eval()
    tiny_parts.seed_everything(seed + 5)
    vae = tiny_parts.vae(16, 0.3611, 0.1159, quant_conv=False, mid_attention=False)
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        text_encoder_4=text_encoder_4,
        tokenizer_4=tokenizer_4,
        transformer=transformer,
    )
    tiny_parts.save(pipe, out_dir, clip_tokenizers=("tokenizer", "tokenizer_2"))


# SimpleTuner's HiDream flavours (models/hidream/model.py HUGGINGFACE_PATHS); its default is "full".
FLAVOURS = (
    Flavour("dev", "HiDream-ai/HiDream-I1-Dev"),
    Flavour("full", "HiDream-ai/HiDream-I1-Full"),
    Flavour("fast", "HiDream-ai/HiDream-I1-Fast"),
)

FAMILY = Family(
    name="hidream",
    pipeline_class="HiDreamImagePipeline",
    denoiser=Component("transformer", "HiDreamImageTransformer2DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKL", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "FlowMatchEulerDiscreteScheduler", "diffusers"),
    latent_channels=16,
    bucket_alignment=64,  # SimpleTuner overrides aspect_bucket_alignment to 64 for HiDream
    prediction_type="flow_matching",
    lora_targets=LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=collate_text,
    predict=predict,
    single_file=False,
    default_flow_shift=3.0,  # SimpleTuner's flow_schedule_shift default
    flavours=FLAVOURS,
    default_flavour="full",
)
