"""Subword tokenizers for the tiny pipelines, trained offline on a small built-in corpus.

The word-level tokenizers of `ditloc.testing` give every word one token. Real checkpoints
split words into pieces, so concept positions must also be right where one word is several
tokens. These are the real transformers classes (`T5Tokenizer`, `GemmaTokenizer`,
`CLIPTokenizer`), each built with its checkpoint's normalizer, pre-tokenizer, decoder and
special-token template; only the vocabulary is learned here, by BPE on the corpus as the
`tokenizers` library normalizes and pre-tokenizes it for that tokenizer:

- T5 (PixArt, FLUX, SD3): a Unigram model (SentencePiece style) with the "▁" word-start marker,
  cased, `</s>` appended.
- Gemma (SANA): byte-fallback BPE over "▁"-joined text (SentencePiece BPE), `<bos>` prepended,
  no prefix space.
- CLIP (FLUX, SD3): byte-level BPE, lowercased, punctuation split off, "</w>" marking the end of
  a word, `<|startoftext|> ... <|endoftext|>`, 77 tokens.

Words outside the corpus ("zibbit") split into several pieces. Learning is deterministic and
cached per tuple of extra words, so a builder called twice gets the same token ids.
"""

from __future__ import annotations

import functools
import math
from collections import Counter

CORPUS = (
    "a photo of a dog in the city at night",
    "a painting of a cat on the beach at sunset",
    "van gogh painting of a man with a red hat",
    "a portrait of a woman by monet, in the style of monet",
    "The Eiffel Tower at night, a photo in the rain",
    "a photo of the eiffel tower with a blue sky",
    "snoopy on the beach with a dog and a cat",
    "A green forest with a river and a bridge",
    "a castle on a mountain near a lake in the snow",
    "a cake with an apple on a table in a house",
    "a red car and a blue boat on the river",
    "a tree with a flower in a field, spring",
    "Starry night over the city, van gogh style",
    "a man and a woman walking in the park at sunset",
    "an apple tree in a field of flowers",
    "a photograph of a house by the lake.",
    "a picture of a bridge over a river in the city",
    "A painting of mountains, rivers and forests!",
    "a dog running on the beach; a cat sleeping in the house",
    "the sky at sunset over the sea with boats",
    "portrait of Snoopy, a cartoon dog",
    "Monet painted a bridge over a pond with flowers",
    "a photo of a cat with blue eyes",
    "a blue car in the snow near the mountains",
    "a woman with a red umbrella in the rain",
    "a green field with trees and a house at night",
    "the city at night with lights on the river",
    "a boat on a lake at sunrise, misty morning",
    "a cute dog sitting on a chair in the garden",
    "an old castle in the forest, fantasy art",
    "a bowl of fruit: apples, pears and grapes",
    "a still life painting of flowers in a vase",
    "two cats playing with a ball of wool",
    "a beautiful landscape with mountains and a river",
    "a child holding a balloon at the beach",
    "a train crossing a bridge in the mountains",
    "a lighthouse on the coast during a storm",
    "a city street in the rain with people and cars",
    "a horse running in a field at dawn",
    "a bird flying over the sea at sunset",
    "Paris, France: the Eiffel Tower and the Seine river",
    "a close-up photo of a flower with rain drops",
    "the moon over a snowy mountain village",
    "a sketch of a tree in black and white",
    "an oil painting of a ship on stormy water",
    "a dog's toy on the floor of the house",
    "it's a sunny day in the park, isn't it?",
    "a photo taken in 2020 with 3 dogs and 12 cats",
    "a watercolor of boats in the harbour",
    "a snowman in front of a house in winter",
)

#: every character a prompt may use, so none maps to the unknown token
ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    ",.;:!?'\"()-_/&+*#%@$[]{}<>=|~`^\\"
)


def _pre_tokenized(normalizer, pre_tokenizer, words: tuple[str, ...]) -> Counter:
    """How often each word of the corpus occurs, as `pre_tokenizer` splits it (a tuple of symbols)."""
    counts: Counter = Counter()
    for line in (*CORPUS, " ".join(words)):
        text = normalizer.normalize_str(line) if normalizer is not None else line
        for word, _ in pre_tokenizer.pre_tokenize_str(text):
            counts[tuple(word)] += 1
    return counts


def _learn_merges(counts: Counter, limit: int, suffix: str = "") -> tuple[list[tuple[str, str]], Counter]:
    """BPE: merge the most frequent adjacent pair (ties: the first in string order) while one occurs
    twice or more, at most `limit` times. `suffix` marks each word's last symbol ("</w>"). Returns the
    merges in order and how often each final piece occurs. (The `tokenizers` trainers order tied pairs
    by hash-map order, which changes between processes; this does not.)"""
    words = Counter({w[:-1] + (w[-1] + suffix,): c for w, c in counts.items() if w})
    merges: list[tuple[str, str]] = []
    while len(merges) < limit:
        pairs: Counter = Counter()
        for word, c in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += c
        best = min(pairs, key=lambda p: (-pairs[p], p), default=None)
        if best is None or pairs[best] < 2:
            break
        merges.append(best)
        merged: Counter = Counter()
        for word, c in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    pieces: Counter = Counter()
    for word, c in words.items():
        for piece in word:
            pieces[piece] += c
    return merges, pieces


@functools.lru_cache(maxsize=8)
def _unigram_vocab(words: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """Unigram pieces and their log-probabilities, specials first (<pad> 0, </s> 1, <unk> 2, as in T5).

    The pieces are learned by BPE on T5's pre-tokenization (words start with "▁"; as SentencePiece
    splits by script, no piece mixes letters with punctuation); each piece's score is the log of its
    smoothed frequency in the corpus segmented into them."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    merges, counts = _learn_merges(_pre_tokenized(None, pre, words), limit=400)
    pieces = list(dict.fromkeys(["▁", *ALPHABET, *(a + b for a, b in merges)]))
    total = sum(counts.values()) + len(pieces)
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    return tuple(specials + [(p, math.log((counts[p] + 1) / total)) for p in pieces])


@functools.lru_cache(maxsize=8)
def _gemma_bpe(words: tuple[str, ...]) -> tuple[dict, tuple[tuple[str, str], ...]]:
    """Gemma-style BPE vocabulary and merges: specials, the 256 byte-fallback tokens, the alphabet,
    then each merge's result; merges are learned within words ("▁" starts every word but the first)
    and never across punctuation."""
    from tokenizers import normalizers, pre_tokenizers

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    merges, _ = _learn_merges(_pre_tokenized(normalizers.Replace(" ", "▁"), pre, words), limit=400)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab: dict[str, int] = {}
    for piece in [*specials, "▁", *ALPHABET, *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    return vocab, tuple(merges)


@functools.lru_cache(maxsize=8)
def _clip_bpe(words: tuple[str, ...]) -> tuple[dict, tuple[tuple[str, str], ...]]:
    """CLIP's layout: the 256 byte characters, the same with "</w>", each merge's result in merge
    order, then <|startoftext|> and <|endoftext|> last. Merges are learned on CLIP's normalization
    (lowercase) and pre-tokenization (letters, digits and punctuation apart; byte level)."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    merges, _ = _learn_merges(_pre_tokenized(norm, pre, words), limit=600, suffix="</w>")
    base = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    vocab: dict[str, int] = {}
    for piece in [*base, *(c + "</w>" for c in base), *(a + b for a, b in merges),
                  "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(piece, len(vocab))
    return vocab, tuple(merges)


def t5_tokenizer(words: tuple[str, ...] = (), *, model_max_length: int = 512):
    """A T5 tokenizer (`T5Tokenizer`, Unigram) with a trained vocabulary; `words` join the corpus."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_unigram_vocab(tuple(words))), extra_ids=0, model_max_length=model_max_length)


def gemma_tokenizer(words: tuple[str, ...] = (), *, model_max_length: int = 4096):
    """A Gemma tokenizer (`GemmaTokenizer`, byte-fallback BPE, `<bos>` first) with a trained vocabulary."""
    from transformers import GemmaTokenizer

    vocab, merges = _gemma_bpe(tuple(words))
    return GemmaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True, add_eos_token=False,
                          model_max_length=model_max_length)


def clip_tokenizer(words: tuple[str, ...] = (), *, pad_token: str = "<|endoftext|>"):
    """A CLIP tokenizer (`CLIPTokenizer`, byte-level BPE with "</w>") with a trained vocabulary, 77 tokens.
    `pad_token="!"` is SD3's second CLIP tokenizer."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe(tuple(words))
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token,
                         model_max_length=77)
