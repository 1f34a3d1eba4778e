"""Probe sets: concepts per knowledge category, with prompts to localize them,
prompts to evaluate them, a clean-prompt rule and an evaluation text.

    from ditloc.probes import load_probe_set
    probes = load_probe_set("lock")                        # the shipped set (6 categories)
    probes.prompts("style", "Claude Monet", "localization")  # templates filled with the concept
    probes.clean_prompt("style", "Claude Monet", prompt)   # the prompt without it
    probes.eval_text("style", "Claude Monet")              # "a painting in the style of Claude Monet"
    load_probe_set("toy")                                  # the toy world's six categories
    load_probe_set("my_probes.yaml")                       # a user file over its base set

Built-in sets: "lock" (style, place, copyright, animal, celebrity, safety:
our own prompts, LocK-style) and "toy" (`ditloc.toy.world`: shape, color,
style, place, character, hazard).

File format (JSON, or YAML with PyYAML installed; the shipped set is six such
files in `ditloc/probes/data/`; docs/probes.md has the details)::

    base: lock              # the set this file adds to: lock (default), toy or none
    name: my-probes         # optional (default: the file name)
    categories:
      style:                # an existing category: given keys override, concepts are added
        concepts:
          - Ivan Aivazovsky
          - {name: Claude Monet, replacement: an impressionist}
      mascots:              # a new category needs concepts, both prompt lists and eval_text
        description: company mascots
        concepts:
          - Bibendum                                  # a plain name
          - {name: Mr. Peanut, replacement: a peanut} # this concept's clean replacement
          - {name: Michelin Man, text: the Michelin Man}   # `text` fills the slot, contains `name`
        localization_prompts:                         # templates: one line, exactly one
          - a photo of {concept} in a parade          #   {concept} slot, no other braces
          - "{concept} leading a parade"              # quote one that starts with {concept}
        evaluation_prompts:
          - a drawing of {concept} on a wall
        clean_rule:                                   # optional; default: replacement ""
          replacement: a mascot                       # what the concept becomes ("" removes it)
          drop: ["in the style of {concept}"]         # phrases removed whole, first
        eval_text: a photo of {concept}               # what presence scorers compare images with

Merging: a category already in the base keeps what the file does not give;
its `concepts` are appended (an entry with an existing name, case-insensitive,
replaces that concept in place). Filling a template fixes an "a"/"an" right
before the slot ("a {concept}" -> "an owl"); so does cleaning.

A file that cannot be used raises `DitlocError` with one line:
`FILE:LINE: categories.style.localization_prompts[3]: <what is wrong and what to do>`.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..errors import DitlocError
from ..text import indefinite_article, tidy
from .core import SLOT, SPLITS, Category, CleanRule, Concept, ProbeSet, fill
from .files import apply_probe_file, read_probe_file
from .toy import toy_probe_set

DATA_DIR = Path(__file__).resolve().parent / "data"

#: the shipped categories, in the paper's order (one file each in DATA_DIR)
LOCK_CATEGORIES = ("style", "place", "copyright", "animal", "celebrity", "safety")


@functools.lru_cache(maxsize=None)
def lock_probe_set() -> ProbeSet:
    """The shipped LocK-style set: six categories read from `ditloc/probes/data/*.json`."""
    probes = None
    for category in LOCK_CATEGORIES:
        probes = apply_probe_file(DATA_DIR / f"{category}.json", probes, name="lock")
    return ProbeSet("lock", probes.categories, ("lock",))


#: built-in sets by name (factories)
BUILTIN = {"lock": lock_probe_set, "toy": functools.lru_cache(maxsize=None)(toy_probe_set)}


def load_probe_set(name_or_path: str | Path = "lock") -> ProbeSet:
    """A built-in set ("lock", "toy") or a JSON/YAML probe file applied over its `base`."""
    if isinstance(name_or_path, str) and name_or_path in BUILTIN:
        return BUILTIN[name_or_path]()
    path = Path(name_or_path)
    if not path.is_file():
        raise DitlocError(
            f"no probe set {str(name_or_path)!r}: give {' or '.join(map(repr, BUILTIN))} or a .json/.yaml probe file"
        )
    return read_probe_file(path, BUILTIN)


__all__ = [
    "BUILTIN",
    "Category",
    "CleanRule",
    "Concept",
    "DATA_DIR",
    "LOCK_CATEGORIES",
    "ProbeSet",
    "SLOT",
    "SPLITS",
    "fill",
    "indefinite_article",
    "load_probe_set",
    "lock_probe_set",
    "tidy",
    "toy_probe_set",
]
