"""Small CLIP and T5 tokenizers built offline, for the tiny test models.

The CLIP tokenizer is a byte-level BPE like OpenAI's: the 256 byte-level characters, their `</w>` (end of word)
variants, a few hundred merges learnt here from a short list of common English words, then `<|startoftext|>` and
`<|endoftext|>` as the last two ids. The T5 tokenizer is a unigram model over characters and common subwords marked
with `▁`, like T5's SentencePiece vocab with `<pad>`=0, `</s>`=1, `<unk>`=2.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# A short corpus of common English and captioning words; the merges are learnt from it.
_WORDS = """
a an the of and in on with at by for to from is are was be this that it its as or not no yes one two three
photo photograph picture image painting drawing illustration render portrait landscape closeup close up view
man woman person people boy girl child children dog cat bird horse cow sheep car bus train truck boat plane
bicycle street road city town house building room table chair bed window door wall floor sky cloud clouds sun
moon star stars tree trees forest grass flower flowers field mountain mountains river lake sea ocean beach water
snow rain night day morning evening light dark shadow red green blue yellow white black brown orange pink purple
gray grey gold silver small large big little tall short old young new beautiful pretty cute happy sad standing
sitting walking running holding wearing looking playing eating riding flying lying next near over under behind
front top bottom left right side background foreground style art artist detailed high quality sharp focus
soft lighting cinematic colorful vintage modern abstract digital oil watercolor sketch pencil anime cartoon
realistic studio natural outdoor indoor sunset sunrise shirt dress hat glasses hair face eyes hand hands
""".split()

_MERGES = 300
_T5_SUBWORDS = 160


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 and CLIP use the same one)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _learn_merges(words: list[str], count: int, word_end: str = "</w>") -> list[tuple[str, str]]:
    """Learn `count` BPE merges from `words` (each word's last symbol carries `word_end`: `</w>` in CLIP)."""
    corpus = Counter(tuple(word[:-1]) + (word[-1] + word_end,) for word in words)
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, freq in corpus.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += freq
        corpus = merged
    return merges


@lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], tuple[str, ...]]:
    """The CLIP vocab (token -> id) and merges ("a b" lines) of the tiny tokenizers."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = _learn_merges(_WORDS, _MERGES)
    for left, right in merges:
        tokens.append(left + right)
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, tuple(f"{left} {right}" for left, right in merges)


def write_clip_vocab(folder: str | Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt of the tiny CLIP tokenizer into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab()
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def clip_tokenizer(pad_token: str = EOS, max_length: int = 77):
    """A `CLIPTokenizer` over the tiny vocab. OpenCLIP-trained encoders (SD2, SDXL's second, SD3's CLIP-G) pad
    with "!" (id 0) rather than with `<|endoftext|>`; pass `pad_token="!"` for those."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(line.split(" ")) for line in merges],
        pad_token=pad_token,
        model_max_length=max_length,
    )


@lru_cache(maxsize=1)
def t5_vocab() -> tuple[tuple[str, float], ...]:
    """The `(piece, log-probability)` list of the tiny T5 tokenizer."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"-()/&+%#@*=_[]"
    for char in alphabet:
        pieces.append((char, -8.0))
        pieces.append(("▁" + char, -8.5))
    counts = Counter(_WORDS)
    bigrams: Counter[str] = Counter()
    for word in _WORDS:
        for i in range(len(word) - 1):
            bigrams[word[i : i + 2]] += 1
    # Whole words (with the word-start mark) are more likely than pieces of them, as in a trained unigram model.
    for word, _ in counts.most_common(_T5_SUBWORDS):
        if len(word) > 1:
            pieces.append(("▁" + word, -4.0 - 0.01 * len(pieces)))
    for bigram, _ in bigrams.most_common(80):
        pieces.append((bigram, -6.0 - 0.001 * len(pieces)))
    seen: set[str] = set()
    unique = [(p, s) for p, s in pieces if not (p in seen or seen.add(p))]
    return tuple(unique)


def t5_tokenizer(max_length: int = 512):
    """A T5 tokenizer (`T5TokenizerFast` is the same class in transformers 5) over the tiny unigram vocab."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(t5_vocab()), extra_ids=0, model_max_length=max_length)


GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")


@lru_cache(maxsize=1)
def gemma_vocab() -> tuple[dict[str, int], tuple[str, ...]]:
    """The vocab and merges of the tiny Gemma tokenizer: Gemma's special tokens first (`<pad>`=0, `<eos>`=1,
    `<bos>`=2, `<unk>`=3), the 256 byte-fallback tokens `<0x00>`..`<0xFF>`, single characters with `▁` (the space),
    then BPE merges learnt from `_WORDS` with a leading `▁`, as Gemma's SentencePiece-derived BPE."""
    tokens = list(GEMMA_SPECIALS) + [f"<0x{byte:02X}>" for byte in range(256)]
    tokens += ["▁"] + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"-()/&+%#@*=_[]\n")
    merges = _learn_merges(["▁" + word for word in _WORDS], _MERGES, word_end="")
    tokens += [left + right for left, right in merges]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, tuple(f"{left} {right}" for left, right in merges)


def gemma_tokenizer(max_length: int = 8192, padding_side: str = "left"):
    """A `GemmaTokenizer` (byte-fallback BPE; adds `<bos>`, pads on the left unless told otherwise) over the tiny
    vocab, for the Gemma / Gemma2 text encoders of Sana and Lumina2 (which pads on the right)."""
    from transformers import GemmaTokenizer

    vocab, merges = gemma_vocab()
    return GemmaTokenizer(vocab=dict(vocab), merges=[tuple(line.split(" ")) for line in merges],
                          model_max_length=max_length, add_bos_token=True, add_eos_token=False,
                          padding_side=padding_side)  # fmt: skip


def pile_t5_tokenizer(max_length: int = 512):
    """AuraFlow's tokenizer: a `LlamaTokenizerFast` (Pile-T5's; pad 0, end-of-sequence 1, appended, no
    beginning-of-sequence token, padded on the right) over the tiny byte-fallback BPE vocab."""
    from transformers import LlamaTokenizer

    vocab, merges = gemma_vocab()
    return LlamaTokenizer(vocab=dict(vocab), merges=[tuple(line.split(" ")) for line in merges], unk_token="<unk>",
                          bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos_token=False,
                          add_eos_token=True, padding_side="right", model_max_length=max_length)  # fmt: skip


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The words of Qwen-Image's prompt template: whole tokens in Qwen2's vocab, so the template's system part is 34
# tokens here too (the pipeline drops that many).
_QWEN_TEMPLATE_WORDS = ("system", "user", "assistant", "Describe", "the", "image", "by", "detailing", "color", "shape",
                        "size", "texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and",
                        "background")  # fmt: skip


@lru_cache(maxsize=1)
def qwen_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The vocab and merges of the tiny Qwen2 tokenizer: GPT-2 style byte-level BPE (`Ġ` marks a leading space),
    merged until every corpus word, bare and with `Ġ`, is one token; Qwen's chat special tokens last."""
    space = bytes_to_unicode()[ord(" ")]
    words = sorted(set(_WORDS) | set(_QWEN_TEMPLATE_WORDS))
    merges = _learn_merges(words + [space + word for word in words], 10_000, word_end="")
    tokens = list(bytes_to_unicode().values()) + [left + right for left, right in merges] + list(QWEN_SPECIALS)
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, tuple(merges)


def qwen_tokenizer(max_length: int = 32768):
    """A `Qwen2Tokenizer` (pads with `<|endoftext|>` on the right) over the tiny vocab, for Qwen2.5-VL."""
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab()
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    return tokenizer


def sentencepiece_model(vocab_size: int = 300) -> bytes:
    """A small SentencePiece BPE model (byte fallback, unk 0, bos 1, eos 2, no pad piece; identity normalisation)
    trained in memory on `_WORDS`: the same bytes on every call."""
    import io

    import sentencepiece

    sentences = [" ".join(_WORDS[i : i + 12]) for i in range(0, len(_WORDS), 12)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", num_threads=1, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def chatglm_tokenizer(folder: str | Path, max_length: int = 256):
    """Kolors' `ChatGLMTokenizer` (diffusers.pipelines.kolors; pads on the left, prefixes `[gMASK]` `sop`) over a
    tiny SentencePiece model written to `folder`/tokenizer.model."""
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    path = Path(folder) / "tokenizer.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sentencepiece_model())
    return ChatGLMTokenizer(str(path), model_max_length=max_length)


LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")


def llama3_tokenizer(max_length: int = 131072):
    """A Llama 3.1 Instruct style `PreTrainedTokenizerFast`: byte-level BPE over the tiny Qwen merges (`Ġ` marks a
    leading space), `<|begin_of_text|>` prepended, `<|eot_id|>` as end of sequence, padded on the right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    _, merges = qwen_vocab()
    tokens = list(bytes_to_unicode().values()) + [left + right for left, right in merges] + list(LLAMA3_SPECIALS)
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    backend.add_special_tokens(list(LLAMA3_SPECIALS))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    bos = LLAMA3_SPECIALS[0]
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=LLAMA3_SPECIALS[2],
                                   model_max_length=max_length)  # fmt: skip


# Mistral-3's control tokens in its order: unknown, begin and end of sequence, the chat markers, the image markers
# of its Pixtral vision input, padding.
MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                    "[IMG_BREAK]", "[IMG_END]", "<pad>")  # fmt: skip


def mistral_tokenizer(max_length: int = 131072):
    """A Mistral-3 (Tekken) style `PreTrainedTokenizerFast`: byte-level BPE over the tiny Qwen merges (`Ġ` marks a
    leading space) after Mistral's control tokens, `<s>` prepended, `<pad>` padding (FLUX.2 [dev]'s tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    _, merges = qwen_vocab()
    tokens = list(MISTRAL_SPECIALS) + list(bytes_to_unicode().values()) + [left + right for left, right in merges]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    backend.add_special_tokens(list(MISTRAL_SPECIALS))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    bos = MISTRAL_SPECIALS[1]
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=max_length)  # fmt: skip
