"""Learned input vectors in place of placeholder tokens: how the tokens and inversion attacks
reach every text encoder of a family through the pipeline's own text encoding.

A prompt carries ``k`` copies of a placeholder word (``"a picture of x in the forest"``, or
``"x x x a picture of a zibbit ..."`` for a prefix). While :func:`injected` is open, a forward
hook on each text encoder's token embedding layer (the adapter lists them,
:meth:`~ditloc.adapters.base.Adapter.text_encoders`) replaces the input vectors at the
placeholder's ``k`` positions of every row by the attack's vectors; rows without the placeholder
(a negative prompt) pass unchanged. The pipeline tokenizes, pads, prepends (SANA's instruction)
and pools (CLIP) as it always does, so a plain ``pipe(prompt)`` inside the context generates
with the learned tokens, and ``adapter.encode_text`` inside it is differentiable in them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import DitlocError
from ..text import find_occurrences, substitute

#: placeholder words tried first (one token per copy in the usual tokenizers); then the vocabulary's words
PLACEHOLDER_WORDS = ("x", "z", "q", "j", "v", "w", "y", "k")
#: at most this many words are tried as the placeholder
MAX_TRIES = 48


@dataclass(frozen=True)
class Placeholder:
    """`k` copies of `word`, and the token id each text encoder reads for one copy (by encoder name)."""

    word: str
    k: int
    ids: dict

    @property
    def phrase(self) -> str:
        return " ".join([self.word] * self.k)

    def to_dict(self) -> dict:
        return {"word": self.word, "k": self.k, "ids": dict(self.ids)}


def slotted(prompts: list[str], concept: str, placement: str, phrase: str) -> list[str]:
    """The prompts with `phrase` where the attack's tokens go: in the concept's place (its
    article kept: the concept's own prompt but for the concept) or before the prompt."""
    if placement == "prefix":
        return [f"{phrase} {p}" for p in prompts]
    return [substitute(p, concept, phrase, articles=False) for p in prompts]


def _context_id(tokenizer, word: str) -> int | None:
    """The id `tokenizer` gives `word` after a space (as inside a prompt), or None where it takes several."""
    lead = tokenizer("a", add_special_tokens=False)["input_ids"]
    ids = tokenizer(f"a {word}", add_special_tokens=False)["input_ids"]
    if len(ids) != len(lead) + 1 or ids[: len(lead)] != lead:
        return None
    return int(ids[-1])


def _candidates(adapter):
    yield from PLACEHOLDER_WORDS
    _, _, tokenizer, _ = adapter.text_encoders()[0]
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    for piece, _ in vocab:
        word = piece.replace("\u2581", "").replace("</w>", "").strip()
        if word.isalpha() and word.islower() and word not in PLACEHOLDER_WORDS:
            yield word


@torch.no_grad()
def find_placeholder(adapter, call_kwargs: dict, prompts: list[str], concept: str, placement: str,
                     k: int) -> Placeholder:
    """The first placeholder word that every text encoder reads as exactly `k` tokens of one id in every
    slotted prompt (and nowhere else in it: not in the prompt, not in an instruction the pipeline
    prepends). Checked by encoding the prompts, so it holds for the pipeline's own tokenization."""
    encoders = adapter.text_encoders()
    if not encoders:
        raise DitlocError(f"this {adapter.family} pipeline has no text encoder to attack")
    words = {w.lower() for p in prompts for w in p.split()}
    for tries, word in enumerate(_candidates(adapter)):
        if tries >= MAX_TRIES:
            break
        if word in words or find_occurrences(concept, word):
            continue
        ids = {name: _context_id(tokenizer, word) for name, _, tokenizer, _ in encoders}
        if any(i is None for i in ids.values()):
            continue
        candidate = Placeholder(word, k, ids)
        counts = _counts(adapter, call_kwargs, slotted(prompts, concept, placement, candidate.phrase), ids)
        if all(c and all(n == k for n in c) for c in counts.values()):
            return candidate
    raise DitlocError(f"no placeholder word reads as {k} single tokens in every text encoder of this "
                      f"{adapter.family} pipeline; use fewer --tokens or prompts without the words x, z, q")


def _counts(adapter, call_kwargs, prompts, ids) -> dict[str, list[int]]:
    """Per encoder: how many placeholder tokens each row of each call held."""
    seen: dict[str, list[int]] = {name: [] for name in ids}

    def recorder(name):
        def hook(module, args, output):
            seen[name].extend((args[0] == ids[name]).sum(1).tolist())
        return hook

    handles = [layer.register_forward_hook(recorder(name))
               for name, _, _, layers in adapter.text_encoders() for layer in layers]
    try:
        adapter.encode_text(prompts, call_kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


@contextlib.contextmanager
def injected(adapter, placeholder: Placeholder, vectors: dict):
    """While open, each text encoder reads `vectors[name]` ([k, d] in its embedding space) at the
    `k` placeholder positions of every row that holds them (see the module doc). Removed on exit."""
    k = placeholder.k

    def replacer(name, layer):
        token = placeholder.ids[name]
        scaled = _scaling(layer)

        def hook(module, args, output):
            match = args[0] == token  # [B, L]
            counts = match.sum(1)  # [B]
            if bool(((counts != 0) & (counts != k)).any()):
                raise DitlocError(f"a prompt holds the placeholder {placeholder.word!r} other than {k} times; "
                                  "it must appear only where the attack put it")
            if not bool(match.any()):
                return output
            rows, cols = match.nonzero(as_tuple=True)  # row-major: each row's k positions in order
            out = output.clone()
            vec = scaled(vectors[name].to(device=out.device, dtype=module.weight.dtype)).to(out.dtype)  # [k, d]
            out[rows, cols] = vec.repeat(rows.numel() // k, 1)  # [rows * k, d]
            return out
        return hook

    handles = []
    try:
        for name, _, _, layers in adapter.text_encoders():
            if name not in vectors:
                raise DitlocError(f"the attack has no vectors for text encoder {name!r}")
            handles += [layer.register_forward_hook(replacer(name, layer)) for layer in layers]
        yield
    finally:
        for h in handles:
            h.remove()


def _scaling(layer: torch.nn.Embedding):
    """What the layer does to a table row: nothing (``nn.Embedding``), or a scale (transformers' scaled
    word embeddings, e.g. Gemma's, multiply by ``embed_scale``): the vectors live in the table's space."""
    if type(layer).forward is torch.nn.Embedding.forward:
        return lambda v: v
    scale = getattr(layer, "embed_scale", None)
    if scale is None:
        from ..errors import UnsupportedModel

        raise UnsupportedModel(f"{type(layer).__name__} changes the token vectors it looks up in a way the attack "
                               "cannot reproduce; its learned tokens cannot be fed")
    return lambda v: v * torch.as_tensor(scale).to(device=v.device, dtype=v.dtype)


def embedding_table(encoder) -> torch.Tensor:
    """The encoder's token embedding table [V, d] (detached)."""
    return encoder.get_input_embeddings().weight.detach()


def token_ids(tokenizer, text: str) -> list[int]:
    """Every id `text` takes, alone and after a space (what a prompt may hold for it)."""
    alone = tokenizer(text, add_special_tokens=False)["input_ids"]
    lead = tokenizer("a", add_special_tokens=False)["input_ids"]
    inside = tokenizer(f"a {text}", add_special_tokens=False)["input_ids"][len(lead):]
    return sorted(set(alone) | set(inside))


def vocabulary(tokenizer, table: torch.Tensor, exclude=()) -> torch.Tensor:
    """Ids a discrete attack may pick [C]: the tokenizer's, less its special tokens and `exclude`."""
    n = min(len(tokenizer), table.shape[0])
    banned = set(tokenizer.all_special_ids) | set(exclude)
    ids = [i for i in range(n) if i not in banned]
    if not ids:
        raise DitlocError("the tokenizer has no ordinary token to choose from")
    return torch.tensor(ids)


def nearest(vectors: torch.Tensor, table: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The candidate id nearest (cosine) to each vector [k, d] -> ids [k]."""
    rows = torch.nn.functional.normalize(table[candidates].float(), dim=-1)  # [C, d]
    sims = torch.nn.functional.normalize(vectors.float(), dim=-1) @ rows.T  # [k, C]
    return candidates[sims.argmax(-1).cpu()]


def decode(tokenizer, ids) -> str:
    """The words of `ids`, one per token, as a prompt would hold them."""
    words = [tokenizer.decode([int(i)]).replace("\u2581", " ").replace("</w>", "").strip() for i in ids]
    return " ".join(w for w in words if w)
