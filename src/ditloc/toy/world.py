"""Procedurally drawn "toy world" with fully known attributes.

Every image is a 32x32 RGB ``uint8`` array that shows exactly one foreground
object (an ordinary shape or a named *character*, 16-22 px, centred) on a
*place* background, optionally with a *hazard* sign in a corner.  Because scenes are generated from
explicit attributes, every image has exact labels, which makes the toy world a
ground truth for localization / unlearning experiments.

Categories (``CATEGORIES``)::

    shape      circle square triangle diamond cross star
    color      red green blue yellow purple orange
    style      solid striped dotted checkered outlined
    place      beach forest night desert snow ocean
    character  blip quorra zibbit mokko
    hazard     hazard          (present / absent; phrase "with a hazard sign")

The generic shape word ``"object"`` means "unspecified shape".

Library rules: no global seeding; all randomness comes from an explicit
``numpy.random.Generator``.  ``render`` is a pure function of its ``Scene``.

The world is three modules (`scenes`, `drawing`, `prompts`); this one is their public API (stable):
    CATEGORIES, CHARACTER_BASE_SHAPE, CHARACTER_LOOK, PLACE_PHRASE,
    HAZARD_PHRASE, GENERIC_SHAPE, IMAGE_SIZE, RGB,
    Scene, sample_scene, render, render_batch,
    TRAIN_TEMPLATES, HELDOUT_TEMPLATES, make_prompt, scene_prompt,
    concept_category, concept_span, clean_prompt, vocabulary, tokenize_words.
"""

from .drawing import hazard_box, render, render_batch
from .prompts import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    clean_prompt,
    concept_category,
    concept_span,
    make_prompt,
    scene_prompt,
    tokenize_words,
    vocabulary,
)
from .scenes import (
    BLACK,
    CATEGORIES,
    CHARACTER_BASE_SHAPE,
    CHARACTER_LOOK,
    CHARACTERS,
    COLORS,
    GENERIC_SHAPE,
    GLYPH,
    HAZARD_PHRASE,
    HAZARDS,
    IMAGE_SIZE,
    PLACE_PHRASE,
    PLACES,
    RANDOM_POSITION_SIZE_RANGE,
    RESERVED_WORDS,
    RGB,
    SHAPES,
    SIZE_RANGE,
    STYLES,
    WHITE,
    Scene,
    glyph_scene,
    sample_scene,
)

__all__ = [
    "BLACK", "CATEGORIES", "CHARACTER_BASE_SHAPE", "CHARACTER_LOOK", "CHARACTERS", "COLORS", "GENERIC_SHAPE",
    "GLYPH", "HAZARD_PHRASE", "HAZARDS", "HELDOUT_TEMPLATES", "IMAGE_SIZE", "PLACE_PHRASE", "PLACES",
    "RANDOM_POSITION_SIZE_RANGE", "RESERVED_WORDS", "RGB", "SHAPES", "SIZE_RANGE", "STYLES", "TRAIN_TEMPLATES",
    "WHITE", "Scene", "clean_prompt", "concept_category", "concept_span", "glyph_scene", "hazard_box",
    "make_prompt", "render", "render_batch", "sample_scene", "scene_prompt", "tokenize_words", "vocabulary",
]
