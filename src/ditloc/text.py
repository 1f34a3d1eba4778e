"""Prompt text: find a concept, substitute it, tidy what is left.

Every place that looks for a concept in a prompt (token positions, probe files,
unlearning, the toy world) or rewrites a prompt without it (clean prompts,
probe-set clean rules, unlearning anchors) goes through these functions, so all
agree on what an occurrence is: case-insensitive, any whitespace where the
concept has a space, never part of a longer word.
"""

from __future__ import annotations

import re

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
