"""The toy world's prompts: templates (a training and a held-out split), a scene's prompt,
where a concept's word sits in a prompt, and the prompt without it. The public names are
`ditloc.toy.world`'s."""

from __future__ import annotations

import re
from typing import Iterable, Optional

import numpy as np

from ..text import find_occurrences, indefinite_article, substitute, tidy
from .scenes import CATEGORIES, GENERIC_SHAPE, HAZARD_PHRASE, PLACE_PHRASE, Scene

#: Training prompt templates.  Slots: ``{a}`` article for the noun phrase,
#: ``{np}`` noun phrase ("red striped circle" / "zibbit"), ``{place}`` place
#: phrase (may be empty), ``{hz}`` hazard phrase (may be empty).
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{a} {np} {place} {hz}",
    "a picture of {a} {np} {place} {hz}",
    "a photo of {a} {np} {hz} {place}",
    "{place} , {a} {np} {hz}",
    "an image showing {a} {np} {place} {hz}",
    "a drawing of {a} {np} {place} {hz}",
    "there is {a} {np} {hz} {place}",
    "this is {a} {np} {place} {hz}",
)

#: Held-out templates: new phrasings / word orders, built only from words that
#: also occur in training templates.
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "{place} there is {a} {np} {hz}",
    "a photo showing {a} {np} {place} {hz}",
    "an image of {a} {np} {hz} {place}",
    "a drawing showing {a} {np} {place} {hz}",
    "{place} , a picture of {a} {np} {hz}",
)

_TEMPLATES = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES}


def scene_prompt(
    scene: Scene,
    template: str,
    *,
    show_shape: bool = True,
    show_color: bool = True,
    show_style: bool = True,
    show_place: bool = True,
) -> str:
    """Fill ``template`` for ``scene``; ``show_*=False`` omits that attribute
    (shape -> the generic word ``"object"``).  The hazard phrase is always
    present iff the scene has a hazard (absence in the prompt means absence in
    the image)."""
    if scene.character is not None:
        words = [scene.character]
    else:
        words = []
        if show_color:
            words.append(scene.color)
        if show_style:
            words.append(scene.style)
        words.append(scene.shape if show_shape else GENERIC_SHAPE)
    np_ = " ".join(words)
    text = template.format(
        a=indefinite_article(words[0]),
        np=np_,
        place=PLACE_PHRASE[scene.place] if show_place else "",
        hz=HAZARD_PHRASE if scene.hazard else "",
    )
    return tidy(text)


def make_prompt(
    scene: Scene,
    rng: np.random.Generator,
    split: str = "train",
    drop_prob: float = 0.15,
) -> str:
    """Random prompt for ``scene`` from the given template split.

    Each of shape/color/style/place is omitted independently with probability
    ``drop_prob`` (the image still shows *some* value, so the label is known).
    Use ``drop_prob=0`` for fully specified prompts (e.g. held-out evaluation).
    Caption dropout to "" for classifier-free guidance is the trainer's job.
    """
    templates = _TEMPLATES[split]
    t = templates[int(rng.integers(len(templates)))]
    d = rng.random(4) < drop_prob
    return scene_prompt(
        scene, t, show_shape=not d[0], show_color=not d[1], show_style=not d[2], show_place=not d[3]
    )


def concept_category(concept: str) -> str:
    for cat, vals in CATEGORIES.items():
        if concept in vals:
            return cat
    raise KeyError(f"unknown concept {concept!r}")


_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def tokenize_words(text: str) -> list[tuple[str, int, int]]:
    """Split like the toy tokenizer's pre-tokenizer: (word, start, end)."""
    return [(m.group(0).lower(), m.start(), m.end()) for m in _WORD_RE.finditer(text)]


def _phrase(concept: str) -> Optional[str]:
    cat = concept_category(concept)
    if cat == "place":
        return PLACE_PHRASE[concept]
    if cat == "hazard":
        return HAZARD_PHRASE
    return None


def concept_span(prompt: str, concept: str, *, phrase: bool = False) -> Optional[tuple[int, int]]:
    """Character span ``(start, end)`` of ``concept``'s word in ``prompt``
    (e.g. "beach", "hazard", "zibbit"); with ``phrase=True`` the whole phrase
    ("on the beach", "with a hazard sign").  ``None`` if absent.  The first
    occurrence, found by `ditloc.text.find_occurrences`."""
    target = _phrase(concept) if phrase else None
    spans = find_occurrences(prompt, target or concept)
    return spans[0] if spans else None


def clean_prompt(prompt: str, category: str, concept: str) -> str:
    """Prompt with ``concept`` removed.

    color/style: drop the word; place/hazard: drop the phrase ("on the beach",
    "with a hazard sign"); shape/character: replace the word by ``"object"``.
    The article before an edit is fixed and spacing and commas tidied (`ditloc.text`).
    """
    if concept not in CATEGORIES[category]:
        raise ValueError(f"{concept!r} is not a {category}")
    replacement = GENERIC_SHAPE if category in ("shape", "character") else ""
    return tidy(substitute(prompt, _phrase(concept) or concept, replacement))


def _all_template_words(templates: Iterable[str]) -> set[str]:
    words: set[str] = set()
    for t in templates:
        t = re.sub(r"\{\w+\}", " ", t)
        words.update(w for w, _, _ in tokenize_words(t))
    return words


def vocabulary(split: Optional[str] = None) -> list[str]:
    """Sorted list of every word a prompt can contain (``split=None``: both
    splits; "train"/"heldout": only that split's templates)."""
    tmpl = TRAIN_TEMPLATES + HELDOUT_TEMPLATES if split is None else _TEMPLATES[split]
    words = _all_template_words(tmpl)
    words.update({"a", "an", GENERIC_SHAPE})
    for vals in CATEGORIES.values():
        words.update(vals)
    for ph in list(PLACE_PHRASE.values()) + [HAZARD_PHRASE]:
        words.update(w for w, _, _ in tokenize_words(ph))
    return sorted(words)
