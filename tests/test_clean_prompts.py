"""Clean prompts derived from a prompt and a concept read as English.

Every causal score compares the prompt with its clean prompt, so a broken clean prompt
("there is in the ocean", "a dog in style") biases all of them. Each row is a form users
write: (prompt, concept, expected clean prompt)."""

import re

import pytest

from ditloc import DitlocError, derive_clean_prompt

FORMS = [
    # existentials: the place phrase is kept as the scene, "there is" goes with the concept
    ("there is a zibbit", "zibbit", ""),
    ("there is a zibbit in the ocean", "zibbit", "in the ocean"),
    ("in the ocean there is a zibbit", "zibbit", "in the ocean"),
    ("there's an owl in the sky", "owl", "in the sky"),
    ("this is a zibbit with a hazard sign", "zibbit", "with a hazard sign"),
    ("there is a zibbit dog in the ocean", "zibbit", "there is a dog in the ocean"),  # a modifier: only it goes
    ("there is a zibbit and a cat in the ocean", "zibbit", "there is a cat in the ocean"),
    # styles
    ("a dog in the style of van gogh", "van gogh", "a dog"),
    ("a dog in style of van gogh", "van gogh", "a dog"),
    ("a tower in the style of Van  Gogh.", "van gogh", "a tower."),
    ("a dog, van gogh style", "van gogh", "a dog"),
    ("a dog in van gogh style", "van gogh", "a dog"),
    ("van gogh style portrait of a woman", "van gogh", "portrait of a woman"),
    ("a Van Gogh-style painting of a dog", "van gogh", "a painting of a dog"),
    ("a cubist-style portrait, oil on canvas", "cubist", "a portrait, oil on canvas"),
    ("a dog, style: van gogh", "van gogh", "a dog"),
    ("a crowded market square in Claude Monet's style", "claude monet", "a crowded market square"),
    ("a dog in the style of van gogh and monet", "van gogh", "a dog in the style of monet"),
    # makers
    ("a painting of a dog by van gogh", "van gogh", "a painting of a dog"),
    ("a dog painted by Van Gogh in a field", "van gogh", "a dog in a field"),
    ("a starry night by van gogh in the style of van gogh", "van gogh", "a starry night"),  # the concept twice
    # the concept as the object of a picture
    ("a photo of Snoopy", "snoopy", "a photo"),
    ("a painting of an owl", "owl", "a painting"),
    ("photo of snoopy, highly detailed", "snoopy", "photo, highly detailed"),
    ("a photo of the Eiffel Tower at night", "eiffel tower", "a photo at night"),  # a multi-word concept
    ("an image showing a zibbit in the ocean", "zibbit", "an image in the ocean"),
    ("a dog next to snoopy", "snoopy", "a dog"),
    # the concept as the subject of a verb
    ("a zibbit sitting on a bench", "zibbit", "sitting on a bench"),
    ("Snoopy surfing a big wave", "snoopy", "surfing a big wave"),
    # the concept as a modifier: the article agrees with the word that now follows it
    ("a van gogh painting of a dog", "van gogh", "a painting of a dog"),
    ("an apple tree on a hill", "apple", "a tree on a hill"),
    ("a zibbit owl in the ocean", "zibbit", "an owl in the ocean"),
    ("An owl hat", "owl", "A hat"),
    # lists
    ("a cat, snoopy and a dog", "snoopy", "a cat and a dog"),
    ("a cat, snoopy, and a dog", "snoopy", "a cat and a dog"),
    ("snoopy, a cat and a dog", "snoopy", "a cat and a dog"),
    ("a cat and snoopy", "snoopy", "a cat"),
    ("a dog, a cat and Snoopy", "snoopy", "a dog, a cat"),
    ("Snoopy and a cat from under the bed", "snoopy", "a cat from under the bed"),
    ("a photo of a zibbit and a cat", "zibbit", "a photo of a cat"),
    # possessives: the possessive becomes "the"
    ("van gogh's sunflowers", "van gogh", "the sunflowers"),
    ("a portrait of van gogh's dog", "van gogh", "a portrait of the dog"),
    ("Snoopy's house at night", "snoopy", "the house at night"),
    ("a painting of van gogh's", "van gogh", "a painting"),
    # the concept at the start, at the end, capitalised, twice, inside other words
    ("Snoopy on the moon", "snoopy", "on the moon"),
    ("a red on the beach", "red", "on the beach"),
    ("a red car on the beach", "red", "a car on the beach"),
    ("a catalog of cat toys", "cat", "a catalog of toys"),  # "catalog" is not "cat"
    ("a catalog of cats and a cat", "cat", "a catalog of cats"),
    ("a painting by VAN GOGH", "van gogh", "a painting"),
    ("Snoopy and snoopy", "Snoopy", ""),
    ('"Snoopy" on a beach', "snoopy", "on a beach"),
]


@pytest.mark.parametrize(("prompt", "concept", "clean"), FORMS, ids=[f"{p} - {c}" for p, c, _ in FORMS])
def test_clean_prompt_forms(prompt, concept, clean):
    assert derive_clean_prompt(prompt, concept) == clean


def test_table_covers_the_common_prompt_forms():
    assert len(FORMS) >= 30
    prompts = " | ".join(p.lower() for p, _, _ in FORMS)
    for form in ("there is a", "in the style of", "in style of", " style", "-style", " by ", "a photo of",
                 "a painting of", ", ", " and ", "'s ", "an "):
        assert form in prompts, form


def words(text: str) -> set[str]:
    return set(re.sub(r"[,.;:\"]", " ", text.lower()).split())


@pytest.mark.parametrize(("prompt", "concept", "clean"), FORMS, ids=[f"{p} - {c}" for p, c, _ in FORMS])
def test_no_trace_of_the_concept_and_nothing_added(prompt, concept, clean):
    """The clean prompt has no occurrence of the concept, and no word the prompt did not
    have but the "the" a possessive becomes and an article made to agree."""
    assert concept.lower() not in words(clean) and not (" " in concept and concept.lower() in clean.lower())
    assert words(clean) - words(prompt) <= {"the", "a", "an"}


def test_concept_not_in_prompt():
    with pytest.raises(DitlocError, match="not in prompt"):
        derive_clean_prompt("a dog", "cat")
    with pytest.raises(DitlocError, match="not in prompt"):
        derive_clean_prompt("a catalog", "cat")
