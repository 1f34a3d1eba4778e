"""Concept -> text-token positions, in the text the tokenizer actually sees.

The pipelines rewrite the prompt before tokenizing it (some lowercase it,
optionally clean it, or prepend an instruction). The adapter returns that
exact text; here the concept found in it (`ditloc.text.find_occurrences`) is
mapped from character spans to token positions through the tokenizer's offsets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from .errors import ConceptNotFound, DitlocError
from .text import find_occurrences  # noqa: F401  (the adapters import it from here)


class ConceptCutOff(ConceptNotFound):
    """Every occurrence of the concept lies past the tokens a text encoder reads."""


@dataclass(frozen=True)
class ConceptSpan:
    """Where a concept sits in one prompt, as the model reads it.

    `positions` index the text sequence the transformer receives (after any
    re-indexing the pipeline applies, e.g. an instruction prefix cropped off); `tokens`
    are the token strings at those positions, for a human to check.
    """

    prompt: str
    concept: str
    text: str  # the text the tokenizer saw (after the pipeline's preprocessing)
    char_spans: tuple[tuple[int, int], ...]  # every occurrence in `text`
    positions: tuple[int, ...]
    tokens: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "concept": self.concept,
            "text": self.text,
            "char_spans": [list(s) for s in self.char_spans],
            "positions": list(self.positions),
            "tokens": list(self.tokens),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ConceptSpan":
        return cls(
            prompt=d["prompt"],
            concept=d["concept"],
            text=d["text"],
            char_spans=tuple(tuple(s) for s in d["char_spans"]),
            positions=tuple(d["positions"]),
            tokens=tuple(d.get("tokens", ())),
        )


def token_positions(
    tokenizer,
    text: str,
    char_spans: list[tuple[int, int]],
    *,
    max_length: int,
    prompt: str,
    concept: str,
) -> tuple[list[list[int]], list[str]]:
    """Token indices (in the truncated tokenization of `text`) covering each span.

    Returns one list of indices per surviving occurrence and the token strings.
    Occurrences cut off by truncation are dropped with a warning; if none
    survives, this is an error (`ConceptCutOff`).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DitlocError(
            "concept positions need a fast tokenizer with character offsets; "
            "load the pipeline with its *TokenizerFast (the default for T5/Gemma/CLIP)"
        )
    def overlapping(enc, start, end):
        special = set(tokenizer.all_special_ids)
        return [
            t
            for t, ((a, b), i) in enumerate(zip(enc["offset_mapping"], enc["input_ids"]))
            if i not in special and b > a and a < end and b > start
        ]

    full = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, truncation=False)
    # Exactly what the pipeline keeps (truncation leaves room for an end token, if any).
    seen = tokenizer(
        text, add_special_tokens=True, return_offsets_mapping=True, truncation=True, max_length=max_length
    )
    kept: list[list[int]] = []
    cut = 0
    for start, end in char_spans:
        want = overlapping(full, start, end)
        got = overlapping(seen, start, end)
        if not want:
            continue
        if len(got) < len(want):
            cut += 1
            continue
        kept.append(got)
    if not kept:
        if cut:
            raise ConceptCutOff(
                f"concept {concept!r} is cut off by max_sequence_length={max_length} in prompt "
                f"{prompt!r}; shorten the prompt or raise --max-sequence-length"
            )
        raise ConceptNotFound(
            f"concept {concept!r} maps to no text token in prompt {prompt!r}; check the spelling"
        )
    if cut:
        warnings.warn(
            f"{cut} occurrence(s) of {concept!r} in {prompt!r} are cut off by "
            f"max_sequence_length={max_length}; using the {len(kept)} that survive",
            stacklevel=3,
        )
    ids = seen["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens([ids[t] for occ in kept for t in occ])
    return kept, list(tokens)
