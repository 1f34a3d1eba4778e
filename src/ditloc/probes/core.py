"""Probe-set types: concepts, clean-prompt rules, categories, the set.

A template is a prompt with one `{concept}` slot. Filling it and cleaning the
result are the string operations of `ditloc.text`, shared by the shipped set,
the toy set and user files, so every category goes through the same code.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from ..errors import DitlocError
from ..text import find_occurrences, fit_article, substitute, tidy

SLOT = "{concept}"

#: canonical split names; the aliases are what the toy world and users tend to say
SPLITS = ("localization", "evaluation")
_SPLIT_ALIASES = {"train": "localization", "loc": "localization", "eval": "evaluation", "heldout": "evaluation"}


# --------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------


def check_template(template: str) -> str | None:
    """Why `template` is not a usable template (None if it is)."""
    if not isinstance(template, str) or not template.strip():
        return "a template must be a non-empty string"
    n = template.count(SLOT)
    if n == 0:
        return f"template {template!r} has no {SLOT} slot; mark where the concept goes with {SLOT}"
    if n > 1:
        return f"template {template!r} has {n} {SLOT} slots; use exactly one"
    if "{" in template.replace(SLOT, "") or "}" in template.replace(SLOT, ""):
        return f"template {template!r} has a brace outside the {SLOT} slot; {SLOT} is the only slot allowed"
    if "\n" in template:
        return f"template {template!r} spans several lines; write it on one line"
    return None


def fill(template: str, text: str) -> str:
    """The template with its slot filled ("a {concept}" + "owl" -> "an owl")."""
    before, after = template.split(SLOT)
    return fit_article(before, text + after) + text + after


# --------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Concept:
    """One concept of a category.

    `name` is what `ditloc.localize` looks for in a prompt; `text` is what fills
    a template's slot (defaults to `name`; the toy world's places fill "on the
    beach" for the concept "beach"); `replacement` overrides the category's
    clean-prompt replacement for this concept (the unlearning anchor:
    "Snoopy" -> "a dog").
    """

    name: str
    text: str = ""
    replacement: str | None = None

    def __post_init__(self):
        if not self.text:
            object.__setattr__(self, "text", self.name)

    def to_dict(self) -> dict | str:
        """The concept as a file entry: a bare string when only the name is set."""
        if self.text == self.name and self.replacement is None:
            return self.name
        d = {"name": self.name}
        if self.text != self.name:
            d["text"] = self.text
        if self.replacement is not None:
            d["replacement"] = self.replacement
        return d


@dataclass(frozen=True)
class CleanRule:
    """How a category turns a prompt into its clean prompt (the concept gone).

    First every `drop` phrase (a template, e.g. "in the style of {concept}") is
    removed; then any remaining occurrence of the concept is replaced by
    `replacement` ("" removes it). Articles before an edit are fixed ("an owl"
    -> "an animal", "an orange circle" -> "a circle"), spacing and commas tidied.
    """

    replacement: str = ""
    drop: tuple[str, ...] = ()

    def apply(self, prompt: str, text: str, replacement: str | None = None) -> str:
        """The clean version of `prompt`, which must contain `text` (the filled concept)."""
        if not find_occurrences(prompt, text):
            raise DitlocError(f"concept {text!r} is not in prompt {prompt!r}; a clean prompt needs a prompt with the concept")
        out = prompt
        for phrase in self.drop:
            out = substitute(out, fill(phrase, text))
        return tidy(substitute(out, text, self.replacement if replacement is None else replacement))

    def to_dict(self) -> dict:
        return {"replacement": self.replacement, "drop": list(self.drop)}


@dataclass(frozen=True)
class Category:
    """A knowledge category: its concepts, templates (each with one `{concept}`
    slot) for localization and for evaluation, its clean-prompt rule and the
    evaluation text a presence scorer compares images with."""

    name: str
    concepts: tuple[Concept, ...]
    localization_prompts: tuple[str, ...]
    evaluation_prompts: tuple[str, ...]
    clean_rule: CleanRule = field(default_factory=CleanRule)
    eval_text: str = "a photo of {concept}"
    description: str = ""

    def concept(self, name: str | Concept) -> Concept:
        """The concept called `name` (exact, else case-insensitive match); a
        `Concept` passes through, for concepts outside the set."""
        if isinstance(name, Concept):
            return name
        for c in self.concepts:
            if c.name == name:
                return c
        for c in self.concepts:
            if c.name.lower() == str(name).lower():
                return c
        close = difflib.get_close_matches(str(name), [c.name for c in self.concepts], n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; it has {len(self.concepts)} concepts (see .concept_names)"
        raise DitlocError(f"category {self.name!r} has no concept {name!r}{hint}")

    @property
    def concept_names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def templates(self, split: str) -> tuple[str, ...]:
        split = normalize_split(split)
        return self.localization_prompts if split == "localization" else self.evaluation_prompts

    def prompts(self, concept: str | Concept, split: str = "localization") -> list[str]:
        """Every template of the split filled with the concept."""
        c = self.concept(concept)
        return [fill(t, c.text) for t in self.templates(split)]

    def clean_prompt(self, concept: str | Concept, prompt: str) -> str:
        """`prompt` without the concept, by the category's rule."""
        c = self.concept(concept)
        return self.clean_rule.apply(prompt, c.text, c.replacement)

    def clean_prompts(self, concept: str | Concept, split: str = "evaluation") -> list[str]:
        return [self.clean_prompt(concept, p) for p in self.prompts(concept, split)]

    def eval_text_for(self, concept: str | Concept) -> str:
        """The evaluation text filled with the concept's name ("a photo of an owl")."""
        return fill(self.eval_text, self.concept(concept).name)

    def to_dict(self) -> dict:
        return {
            "description": self.description,
            "eval_text": self.eval_text,
            "clean_rule": self.clean_rule.to_dict(),
            "concepts": [c.to_dict() for c in self.concepts],
            "localization_prompts": list(self.localization_prompts),
            "evaluation_prompts": list(self.evaluation_prompts),
        }


@dataclass(frozen=True)
class ProbeSet:
    """Categories of concepts with prompts, clean-prompt rules and evaluation texts.

    `sources` records where it came from ("lock", "toy", file paths), in the
    order they were applied.
    """

    name: str
    categories: tuple[Category, ...]
    sources: tuple[str, ...] = ()

    @property
    def category_names(self) -> list[str]:
        return [c.name for c in self.categories]

    def category(self, name: str) -> Category:
        for c in self.categories:
            if c.name == name:
                return c
        raise DitlocError(f"probe set {self.name!r} has no category {name!r}; it has {', '.join(self.category_names)}")

    __getitem__ = category

    def __iter__(self):
        return iter(self.categories)

    def __len__(self) -> int:
        return len(self.categories)

    def concepts(self, category: str) -> list[str]:
        return self.category(category).concept_names

    def concept(self, category: str, name: str) -> Concept:
        return self.category(category).concept(name)

    def prompts(self, category: str, concept: str, split: str = "localization") -> list[str]:
        """The split's templates filled with the concept ("localization" or "evaluation")."""
        return self.category(category).prompts(concept, split)

    def clean_prompt(self, category: str, concept: str, prompt: str) -> str:
        return self.category(category).clean_prompt(concept, prompt)

    def clean_prompts(self, category: str, concept: str, split: str = "evaluation") -> list[str]:
        return self.category(category).clean_prompts(concept, split)

    def eval_text(self, category: str, concept: str) -> str:
        return self.category(category).eval_text_for(concept)

    def select(self, *names: str) -> "ProbeSet":
        """The same set restricted to some categories (in the order given)."""
        return ProbeSet(self.name, tuple(self.category(n) for n in names), self.sources)

    def to_dict(self) -> dict:
        """The set in the probe-file format (loads back with `load_probe_set`)."""
        return {
            "name": self.name,
            "base": "none",
            "sources": list(self.sources),
            "categories": {c.name: c.to_dict() for c in self.categories},
        }


def normalize_split(split: str) -> str:
    s = _SPLIT_ALIASES.get(split, split)
    if s not in SPLITS:
        raise DitlocError(f"unknown split {split!r}; use 'localization' (alias 'train') or 'evaluation' (alias 'heldout')")
    return s
