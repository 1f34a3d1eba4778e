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
from .scope import Scope
from .text import find_occurrences, indefinite_article, substitute, tidy

# ---------------------------------------------------------------------------------------------------------
# Clean prompts (derive_clean_prompt). The concept is first replaced by a marker; each rule below then
# either widens the marker over the words that belong to the concept's phrase ("in the style of <>",
# "<>-style", "there is a <>") or deletes it with the one word that would be left broken ("<> and");
# what is left of the marker is removed at the end. Rules are tried in the order of _CLEAN_RULES.
# ---------------------------------------------------------------------------------------------------------

#: determiners that need a noun after them ("a <> in the ocean" -> the "a" goes)
ARTICLES = ("a", "an", "the", "some")
#: words that need a word after them; removing the concept can leave one dangling ("a painting by")
LINKS = ("of", "by", "in", "on", "at", "with", "from", "for", "to", "into", "onto", "near", "under", "over",
         "like", "as", "and", "or")
#: longer phrases that need the concept after them: existentials, prepositions of more than one word and
#: verbs that introduce what a picture shows ("there is <>", "next to <>", "an image showing <>")
_LEADS = ("there is", "there are", "there's", "there was", "here is", "this is", "it is",
          "next to", "in front of", "on top of", "close to", "together with", "along with",
          "showing", "depicting", "featuring", "behind", "beside", "above", "below", "around")
#: participles that make "<participle> by <>" one phrase ("a dog painted by Van Gogh" -> "a dog")
_MAKERS = ("painted", "drawn", "illustrated", "photographed", "created", "made", "designed", "inspired",
           "rendered", "sculpted")
#: verbs that start a predicate: after one the concept was a whole noun phrase ("a <> sitting on a bench"
#: -> "sitting on a bench"), where after a noun it is a modifier ("a <> painting" -> "a painting")
_ACTIONS = ("sitting", "standing", "walking", "running", "riding", "playing", "holding", "reading", "eating",
            "drinking", "swimming", "flying", "sleeping", "smiling", "jumping", "looking", "waving", "lying",
            "dancing", "singing", "resting", "wearing", "searching", "splashing", "stretching", "crossing",
            "surfing", "skiing", "climbing", "hiding", "floating", "carrying", "driving", "posing", "leaning",
            "hanging", "chasing", "grazing", "perched", "seen", "caught", "curled", "made")
_REMOVED = "\x00"  # where the concept was
_M = _REMOVED
_WORD_START = r"(?<![\w'-])"
_WORD_END = r"(?![\w'-])"


def _words(words) -> str:
    """A regex alternation of whole words or phrases (longest first, any whitespace between words)."""
    return "(?:" + "|".join(r"\s+".join(map(re.escape, w.split())) for w in sorted(words, key=len, reverse=True)) + ")"


_ARTICLE = _words(ARTICLES)
_LINK = _words(LINKS)
_LEAD = _words(LINKS + _LEADS)
#: what may follow the concept when it is a whole noun phrase (not a modifier of the next word): the end,
#: a punctuation mark, another removal, a preposition / conjunction or a verb
_ENDS_PHRASE = rf"(?=\s*(?:$|[,.;:!?{_M}]|{_words(LINKS + _LEADS + _ACTIONS)}{_WORD_END}))"

#: quotes around the concept ('"Snoopy" on a beach')
_QUOTED = re.compile(rf"[\"“‘']\s*{_M}\s*[\"”’']")
#: a possessive before a noun becomes "the" ("a portrait of <>'s dog" -> "a portrait of the dog");
#: one before no noun goes with the concept ("a painting of <>'s"); an article before it goes too ("a <>'s toy")
_POSSESSIVE = re.compile(rf"(?i)(?:{_WORD_START}{_ARTICLE}\s+)?{_M}['’]s{_WORD_END}"
                         rf"(\s+(?!{_LINK}{_WORD_END}|{_ARTICLE}{_WORD_END})(?=\w))?")
#: hyphenated words the concept is part of ("a <>-style painting", "a <>-inspired poster", "anti-<>")
_COMPOUND = re.compile(rf"(?:[\w']+-)+{_M}|{_M}(?:-[\w']+)+")
#: "<> style" as a modifier or a tag ("a <> style painting", "a dog, <> style", "in <>'s style")
_STYLE_AFTER = re.compile(rf"(?i){_M}(?:['’]s)?\s+(?:style|styled|inspired){_WORD_END}")
#: an article before the concept as a whole noun phrase ("there is a <> in the ocean")
_DANGLING_ARTICLE = re.compile(rf"(?i){_WORD_START}{_ARTICLE}\s*{_M}{_ENDS_PHRASE}")
#: the concept between a comma and a conjunction: the list keeps its conjunction ("a cat, <> and a dog",
#: "a cat, <>, and a dog")
_LIST_MIDDLE = re.compile(rf"(?i)\s*,\s*{_M}\s*,?\s*(?=(?:and|or){_WORD_END})")
#: the concept and the conjunction after it, where a noun phrase starts (the start of a clause, after a
#: preposition or an existential): "<> and a cat", "a photo of <> and a cat", "there is <> and a cat"
_FIRST_CONJUNCT = re.compile(rf"(?i)((?:^|[,.;:!?]|{_WORD_START}{_LEAD})\s*){_M}\s*(?:and|or){_WORD_END}\s*")
#: the phrase that attributes a style or a maker: "in the style of <>", "in style of <>", "style: <>",
#: "painted by <>"
_STYLE_BEFORE = re.compile(rf"(?i)(?:{_WORD_START}in\s+)?(?:{_WORD_START}the\s+)?{_WORD_START}(?:style|manner)"
                           rf"\s+of\s+{_M}|{_WORD_START}style\s*:\s*{_M}|{_WORD_START}{_words(_MAKERS)}\s+by\s+{_M}")
#: a preposition, conjunction or existential left with no noun phrase after it ("a dog by <>",
#: "there is <> in the ocean", "a photo of <>, smiling", "a cat and <>")
_DANGLING_LEAD = re.compile(rf"(?i){_WORD_START}{_LEAD}\s*{_M}{_ENDS_PHRASE}")

#: (pattern, replacement), tried in this order; each pass applies the first that matches
_CLEAN_RULES = (
    (_QUOTED, _M),
    (_COMPOUND, _M),
    (_STYLE_AFTER, _M),
    (_POSSESSIVE, lambda m: "the " if m.group(1) else _M),
    (_DANGLING_ARTICLE, _M),
    (_LIST_MIDDLE, " "),
    (_FIRST_CONJUNCT, r"\1"),
    (_STYLE_BEFORE, _M),
    (_DANGLING_LEAD, _M),
)

#: "a"/"an" right before a removal and the word that now follows it
_ARTICLE_BEFORE = re.compile(rf"(?i)(?<![\w'-])(a|an)(\s*(?:{_REMOVED}\s*)+)([\w'-]+)")


def _fit(m: re.Match) -> str:
    """The article made to agree with the word that now follows it ("an apple tree" - apple -> "a tree")."""
    article = indefinite_article(m.group(3))
    return (article.capitalize() if m.group(1)[0].isupper() else article) + m.group(2) + m.group(3)


def derive_clean_prompt(prompt: str, concept: str) -> str:
    """The prompt with every occurrence of the concept removed, and with it the words
    that only make sense with it, so that what is left reads as English (a model reads
    a broken sentence differently, which would bias every causal score). Nothing is
    added but "the" for a possessive; words away from the concept are kept.

    Rules (X the concept, case-insensitive, never part of a longer word):

    - the phrase that carries X goes whole: "in (the) style of X", "style: X", "X style",
      "in X style", "X-style" and other hyphenated words with X, "by X", "painted by X",
      quotes around X: "a dog in the style of Van Gogh" -> "a dog";
    - X as a whole noun phrase goes with its article and the word that leads to it
      (a preposition, "and"/"or", "there is", "showing", ...) when no noun it modifies
      follows (the end, a punctuation mark, a preposition or a verb such as "sitting"):
      "a photo of X" -> "a photo", "a photo of X, smiling" -> "a photo, smiling",
      "a X sitting on a bench" -> "sitting on a bench"; "there is a X in the ocean" ->
      "in the ocean" (the place phrase is kept as the scene, as "a X on the beach" ->
      "on the beach"; no placeholder such as "something" is added, which a model may not
      know and which would draw an object); "there is a X" -> "";
    - X as a modifier goes alone and the article agrees with the next word:
      "a X painting of a dog" -> "a painting of a dog", "an X hat" -> "a hat";
    - lists keep their conjunction: "a cat, X and a dog" and "X, a cat and a dog" ->
      "a cat and a dog"; "X and a cat" -> "a cat"; "a photo of X and a cat" ->
      "a photo of a cat"; a removed last item takes its "and": "a dog, a cat and X" ->
      "a dog, a cat";
    - a possessive becomes "the": "a portrait of X's dog" -> "a portrait of the dog";
    - spacing and commas tidied: "photo of X, highly detailed" -> "photo, highly detailed".

    Category-specific rules that replace instead of remove ("the Eiffel Tower" -> "a tower")
    belong to the probe set (:class:`~ditloc.probes.core.CleanRule`).
    """
    if not find_occurrences(prompt, concept):
        raise DitlocError(
            f"concept {concept!r} is not in prompt {prompt!r}; give a clean prompt explicitly or fix the concept"
        )
    text = substitute(prompt, concept, _REMOVED, articles=False)
    while True:  # each pass removes words or is the last
        for pattern, replacement in _CLEAN_RULES:
            fixed = pattern.sub(replacement, text)
            if fixed != text:
                text = fixed
                break
        else:
            return tidy(_ARTICLE_BEFORE.sub(_fit, text).replace(_REMOVED, " "))


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
    heads=None,
    steps=None,
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

    `heads`: only these attention heads of the blocks take part (one list for every
    block, one list per block in the order named, or a dict block -> list); `steps`:
    only at these denoising step indices (0-based). Withholding leaves every other
    head and step plain; injection gives them the clean prompt (`ditloc.scope`).

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
    intervene = withhold is not None or inject is not None
    if not intervene and (heads is not None or steps is not None):
        raise DitlocError("heads= and steps= narrow an intervention; give withhold= or inject= too")
    opts = RunOptions.of(options, **run)
    prompts, seeds = as_prompt_list(prompts), as_seed_list(seed)
    resolved = opts.resolve(pipe)
    adapter, kw = resolved.adapter, resolved.call_kwargs
    if pooled not in (None, "clean", "full"):
        raise DitlocError(f"pooled must be 'clean' or 'full', got {pooled!r}")
    scope = None
    clean: list[str] = []
    if intervene:
        mode = "withhold" if withhold is not None else "inject"
        scope = Scope.resolve(adapter, mode, withhold if withhold is not None else inject, heads=heads, steps=steps,
                              pooled=pooled)
        scope.check_steps(int(resolved.effective("num_inference_steps")))
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

    if scope is None:
        return _stack([run_chunk(c) for c in chunks(samples, batch_size)], output_type)
    session = Session()
    with instrument(adapter, session):
        for chunk in chunks(samples, batch_size):
            swap = schedule = None
            if scope.acts(adapter):
                cond = adapter.encode_text([clean[i] for i, _ in chunk], kw)
                swap, schedule = scope.swaps(adapter, cond)
            session.begin_call(len(chunk), swap=swap, schedule=schedule)
            outputs.append(run_chunk(chunk))
    return _stack(outputs, output_type)
