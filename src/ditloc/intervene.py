"""Intervene: generate with a concept withheld from, or injected into, a set of
blocks (method.md §2). Cross-attention models swap the text conditioning that
`attn2` reads in the chosen blocks; everything else runs as usual."""

from __future__ import annotations

import re

import numpy as np
import torch

from .engine import Session, instrument
from .errors import DitlocError
from .options import RunOptions, as_prompt_list, as_seed_list, chunks
from .text import find_occurrences, indefinite_article, substitute, tidy

#: words that need a word after them; removing the concept can leave one dangling ("a painting by")
ARTICLES = ("a", "an", "the")
LINKS = ("of", "by", "in", "on", "at", "with", "from", "for", "to", "into", "onto", "near", "under", "over",
         "like", "as", "and", "or")
_REMOVED = "\x00"  # where the concept was
_WORD_END = r"(?![\w'-])"
_FUNCTION = "|".join(ARTICLES + LINKS)
#: a function word right before the removed concept, when nothing, a punctuation mark, another removal or
#: a preposition / conjunction follows it ("of <> in the city", "a <> on the beach", "dog by <>.")
_DANGLING_BEFORE = re.compile(rf"(?i)(?<![\w'-])(?:{_FUNCTION})\s*{_REMOVED}"
                              rf"(?=\s*(?:$|[,.;:!?{_REMOVED}]|(?:{'|'.join(LINKS)}){_WORD_END}))")
#: a possessive of the removed concept; a conjunction right after it at the start of a clause
_DANGLING_AFTER = re.compile(rf"(?i){_REMOVED}'s{_WORD_END}|(?:^|(?<=[,.;:!?]))(\s*){_REMOVED}\s*(?:and|or){_WORD_END}")


#: "a"/"an" right before a removal and the word that now follows it
_ARTICLE_BEFORE = re.compile(rf"(?i)(?<![\w'-])(a|an)(\s*(?:{_REMOVED}\s*)+)([\w'-]+)")


def _fit(m: re.Match) -> str:
    """The article made to agree with the word that now follows it ("an apple tree" - apple -> "a tree")."""
    article = indefinite_article(m.group(3))
    return (article.capitalize() if m.group(1)[0].isupper() else article) + m.group(2) + m.group(3)


def derive_clean_prompt(prompt: str, concept: str) -> str:
    """The prompt with every occurrence of the concept removed, with the words the
    removal leaves dangling, spacing tidied: "a painting of a dog by Van Gogh" ->
    "a painting of a dog", "a photo of Snoopy, smiling" -> "a photo, smiling" (a model
    reads a broken sentence differently, which would bias the comparison). Only words
    next to a removal are touched. Category-specific rules that replace instead of
    remove belong to the probe set."""
    if not find_occurrences(prompt, concept):
        raise DitlocError(
            f"concept {concept!r} is not in prompt {prompt!r}; give a clean prompt explicitly or fix the concept"
        )
    text = substitute(prompt, concept, _REMOVED, articles=False)
    while True:  # each pass removes a word or is the last
        fixed = _DANGLING_AFTER.sub(lambda m: (m.group(1) or "") + _REMOVED, _DANGLING_BEFORE.sub(_REMOVED, text))
        if fixed == text:
            return tidy(_ARTICLE_BEFORE.sub(_fit, text).replace(_REMOVED, " "))
        text = fixed


def clean_prompt_list(prompts: list[str], concept: str | None, clean_prompts=None) -> list[str]:
    """One clean prompt per prompt: `clean_prompts` as given (checked), else derived
    from `concept` (:func:`derive_clean_prompt`)."""
    if clean_prompts is not None:
        clean = [clean_prompts] if isinstance(clean_prompts, str) else list(clean_prompts)
        if len(clean) != len(prompts):
            raise DitlocError(f"got {len(clean)} clean prompts for {len(prompts)} prompts; give one per prompt")
        return clean
    if concept is None:
        raise DitlocError("an intervention needs the concept or the clean prompts")
    return [derive_clean_prompt(p, concept) for p in prompts]


def _stack(outputs: list, output_type: str):
    if output_type == "pil":
        return [img for out in outputs for img in out]
    if isinstance(outputs[0], np.ndarray):
        return np.concatenate(outputs)
    return torch.cat(outputs)


@torch.no_grad()
def generate(
    pipe,
    prompts,
    *,
    withhold=None,
    inject=None,
    concept: str | None = None,
    clean_prompts=None,
    seed=0,
    output_type: str = "pil",
    batch_size: int | None = None,
    pooled: str | None = None,
    options: RunOptions | None = None,
    **run,
):
    """Images for every (prompt, seed), prompt-major, optionally with the concept
    withheld from (or injected into only) a set of blocks.

    `withhold`/`inject`: block names (or "all"); the blocks in the set see the
    clean prompt (withhold) or the full prompt while all others see the clean one
    (inject). `clean_prompts` (one per prompt) default to the prompt with the
    concept removed. With neither set this is a plain generation.

    `pooled` (models with a pooled text embedding that modulates every block,
    `adapter.has_pooled_text`): "clean" or "full" prompt for that embedding. Default: withheld whenever
    any block sees the clean prompt, so withholding nowhere (or injecting
    everywhere) is the plain generation and withholding everywhere (or injecting
    nowhere) is the clean-prompt generation, exactly.

    `options` (:class:`~ditloc.options.RunOptions`) says how the pipeline is
    called; keyword arguments override its fields or are passed to the pipeline.
    """
    if withhold is not None and inject is not None:
        raise DitlocError("choose either withhold or inject, not both")
    opts = RunOptions.of(options, **run)
    prompts, seeds = as_prompt_list(prompts), as_seed_list(seed)
    resolved = opts.resolve(pipe)
    adapter, kw = resolved.adapter, resolved.call_kwargs
    intervene = withhold is not None or inject is not None
    if pooled not in (None, "clean", "full"):
        raise DitlocError(f"pooled must be 'clean' or 'full', got {pooled!r}")
    swap_blocks: frozenset[str] = frozenset()
    pooled_clean = False
    clean: list[str] = []
    if intervene:
        chosen = adapter.resolve_blocks(withhold if withhold is not None else inject)
        names = adapter.block_names()
        swap_blocks = frozenset(chosen) if withhold is not None else frozenset(b for b in names if b not in chosen)
        pooled_clean = bool(swap_blocks) if pooled is None else pooled == "clean"
        clean = clean_prompt_list(prompts, concept, clean_prompts)
        if concept is not None:
            for p in prompts:  # the concept must be readable by the model, as in localize
                adapter.concept_span(p, concept, kw)

    samples = [(i, s) for i in range(len(prompts)) for s in seeds]
    outputs = []

    def run_chunk(chunk):
        return pipe(
            prompt=[prompts[i] for i, _ in chunk],
            generator=resolved.generators([s for _, s in chunk]),
            output_type=output_type,
            **kw,
        ).images

    if not intervene:
        return _stack([run_chunk(c) for c in chunks(samples, batch_size)], output_type)
    session = Session()
    with instrument(adapter, session):
        for chunk in chunks(samples, batch_size):
            swap = None
            if swap_blocks or (pooled_clean and adapter.has_pooled_text):
                cond = adapter.encode_text([clean[i] for i, _ in chunk], kw)
                swap = adapter.make_swap(swap_blocks, cond, pooled_clean)
            session.begin_call(len(chunk), swap=swap)
            outputs.append(run_chunk(chunk))
    return _stack(outputs, output_type)
