"""Prompt text: find a concept, substitute it, tidy what is left.

Every place that looks for a concept in a prompt (token positions, probe files,
unlearning, the toy world) or rewrites a prompt without it (clean prompts,
probe-set clean rules, unlearning anchors) goes through these functions, so all
agree on what an occurrence is: case-insensitive, any whitespace where the
concept has a space, never part of a longer word.
"""

from __future__ import annotations

import re

from .errors import ConceptNotFound, DitlocError

Span = tuple[int, int]

_AN_PREFIXES = ("hour", "honest", "honor", "honour", "heir")
_A_PREFIXES = ("uni", "use", "usu", "uti", "eu", "one", "once")
_ARTICLE_AT_END = re.compile(r"(?<![\w'-])(a|an)(\s+)$", re.IGNORECASE)
_FIRST_WORD = re.compile(r"\s*([\w'-]+)")


def find_occurrences(text: str, concept: str) -> list[Span]:
    """Character spans of every occurrence of `concept` in `text`.

    Case-insensitive; any run of whitespace matches a space in the concept; a
    concept that starts (ends) with a word character does not match after
    (before) another word character, so "dog" is not found in "dogma".
    """
    concept = concept.strip()
    if not concept:
        return []
    pattern = r"\s+".join(re.escape(part) for part in concept.split())
    if re.match(r"\w", concept[0]):
        pattern = r"(?<!\w)" + pattern
    if re.match(r"\w", concept[-1]):
        pattern = pattern + r"(?!\w)"
    return [(m.start(), m.end()) for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


def tidy(text: str) -> str:
    """One space between words, none before punctuation, no doubled or dangling
    commas, semicolons or colons ("a photo of , smiling ," -> "a photo of, smiling")."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(\s*[,;:])+", r"\1", text)
    return text.strip().strip(",;:").strip()


def indefinite_article(word: str) -> str:
    """"a" or "an" for the word that follows it (the vowel rule, with the usual exceptions)."""
    w = word.lower()
    if w.startswith(_AN_PREFIXES):
        return "an"
    if w.startswith(_A_PREFIXES):
        return "a"
    return "an" if w[:1] in ("a", "e", "i", "o", "u") else "a"


def fit_article(before: str, after: str) -> str:
    """`before` with a trailing "a "/"an " made to agree with the first word of
    `after`, or dropped when no word follows ("a cat" minus "cat")."""
    m, word = _ARTICLE_AT_END.search(before), _FIRST_WORD.match(after)
    if m is None:
        return before
    if word is None:
        return before[: m.start()]
    article = indefinite_article(word.group(1))
    if m.group(1)[0].isupper():
        article = article.capitalize()
    return before[: m.start()] + article + m.group(2)


def _replace_spans(text: str, spans: list[Span], replacement: str, articles: bool) -> str:
    """Replace each (sorted, disjoint) span by `replacement`; with `articles`, fit the article before it."""
    out, last = "", 0
    for a, b in spans:
        out += text[last:a]
        if articles:
            out = fit_article(out, replacement if replacement.strip() else text[b:])
        out += replacement
        last = b
    return out + text[last:]


def substitute(text: str, concept: str, replacement: str = "", *, articles: bool = True) -> str:
    """`text` with every occurrence of `concept` (see `find_occurrences`) replaced
    by `replacement`; a blank replacement removes the concept.

    Removing repeats until no occurrence is left (taking "van gogh" out of "van
    van gogh gogh" joins a new one; each pass shortens the text or is the last).
    With `articles`, an "a"/"an" right before an occurrence is made to agree with
    the word that now follows it ("an owl" -> "a dog"), or dropped when none does.
    Spacing is left as it is: see `tidy`.
    """
    spans = find_occurrences(text, concept)
    if replacement.strip():
        return _replace_spans(text, spans, replacement, articles)
    while spans:
        text = _replace_spans(text, spans, replacement, articles)
        spans = find_occurrences(text, concept)
    return text


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
        raise ConceptNotFound(
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
