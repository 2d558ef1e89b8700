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


def _learn_merges(words: list[str], count: int) -> list[tuple[str, str]]:
    """Learn `count` BPE merges from `words` (each word ends with a `</w>` symbol, as in CLIP)."""
    corpus = Counter(tuple(word[:-1]) + (word[-1] + "</w>",) for word in words)
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
