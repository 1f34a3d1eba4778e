"""The toy world's attributes and scenes: what an image can show (`CATEGORIES`, the characters'
looks, the place and hazard phrases) and `Scene`, drawn by `sample_scene` from an explicit
``numpy.random.Generator``. The public names are `ditloc.toy.world`'s."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

IMAGE_SIZE = 32

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
STYLES = ("solid", "striped", "dotted", "checkered", "outlined")
PLACES = ("beach", "forest", "night", "desert", "snow", "ocean")
CHARACTERS = ("blip", "quorra", "zibbit", "mokko")
HAZARDS = ("hazard",)

CATEGORIES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "style": STYLES,
    "place": PLACES,
    "character": CHARACTERS,
    "hazard": HAZARDS,
}

GENERIC_SHAPE = "object"
#: words in the toy tokenizer that no training prompt contains (their embeddings
#: keep their random initialisation): rare tokens to bind a new subject to
#: ("a sks object"), as DreamBooth does with real T5/CLIP vocabularies
RESERVED_WORDS = ("sks", "olis", "vrek", "tuml", "kapo", "wyx")

#: Saturated object colors.
RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 25),
    "green": (40, 200, 40),
    "blue": (30, 60, 235),
    "yellow": (245, 225, 20),
    "purple": (150, 40, 210),
    "orange": (250, 135, 10),
}
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

#: Fixed look of every character: (base shape, color, style).  Characters also
#: have two eyes and a mouth, which ordinary objects never have.
CHARACTER_LOOK: dict[str, tuple[str, str, str]] = {
    "blip": ("circle", "yellow", "solid"),
    "quorra": ("square", "purple", "solid"),
    "zibbit": ("triangle", "green", "solid"),
    "mokko": ("diamond", "red", "solid"),
}
#: Base shape of each character (the natural unlearning anchor).
CHARACTER_BASE_SHAPE: dict[str, str] = {k: v[0] for k, v in CHARACTER_LOOK.items()}

#: Prepositional phrase used for every place.
PLACE_PHRASE: dict[str, str] = {
    "beach": "on the beach",
    "forest": "in the forest",
    "night": "at night",
    "desert": "in the desert",
    "snow": "in the snow",
    "ocean": "in the ocean",
}
HAZARD_PHRASE = "with a hazard sign"

#: a shape the renderer can draw but no training scene contains: the subject a
#: user teaches the toy model with `ditloc personalize` (see glyph_scene)
GLYPH = "heart"

SIZE_RANGE = (16, 22)  # inclusive object bounding-box side in pixels
#: Objects are centred in the image.  With the object at a random
#: position, the small toy DiT never learned to draw outlines: every token must
#: then locate the object before it can tell inside from outside, and after
#: 11,000 steps shape fidelity was still at chance (0.23).  A centred object
#: turns the outline into a per-position pattern (see PROVENANCE.md).
#: ``sample_scene(..., random_position=True)`` gives the earlier world: random
#: position, sizes in RANDOM_POSITION_SIZE_RANGE.
RANDOM_POSITION_SIZE_RANGE = (14, 22)


# --------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """All attributes and geometry of one image.

    For character scenes ``shape``/``color``/``style`` hold the character's
    fixed look (so they are still valid labels).
    """

    shape: str
    color: str
    style: str
    place: str
    character: Optional[str]  # None = ordinary object
    hazard: bool
    size: int  # bounding-box side (px)
    x0: int  # bounding-box top-left
    y0: int
    bg_seed: int  # seeds the background details (stars, trunks, waves, ...)

    def labels(self) -> dict[str, str]:
        """Per-category string labels (``character`` -> "none" if absent,
        ``hazard`` -> "present"/"absent")."""
        return {
            "shape": self.shape,
            "color": self.color,
            "style": self.style,
            "place": self.place,
            "character": self.character or "none",
            "hazard": "present" if self.hazard else "absent",
        }

    def to_dict(self) -> dict:
        return asdict(self)


def sample_scene(
    rng: np.random.Generator,
    *,
    p_character: float = 0.2,
    p_hazard: float = 0.3,
    random_position: bool = False,
    **fixed,
) -> Scene:
    """Sample a random scene.  Keyword arguments in ``fixed`` (e.g.
    ``place="beach"``, ``character="zibbit"``, ``hazard=True``) pin attributes;
    ``character=None`` forces an ordinary object."""
    # Always draw the same number of random values so that pinning one
    # attribute does not change the others.
    u_char = rng.random()
    char = CHARACTERS[rng.integers(len(CHARACTERS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = COLORS[rng.integers(len(COLORS))]
    style = STYLES[rng.integers(len(STYLES))]
    place = PLACES[rng.integers(len(PLACES))]
    hazard = bool(rng.random() < p_hazard)
    lo, hi = RANDOM_POSITION_SIZE_RANGE if random_position else SIZE_RANGE
    size = int(rng.integers(lo, hi + 1))
    fx, fy = rng.random(), rng.random()
    bg_seed = int(rng.integers(0, 2**31 - 1))

    character: Optional[str] = char if u_char < p_character else None
    if "character" in fixed:
        character = fixed.pop("character")
    if character is not None:
        if character not in CHARACTERS:
            raise ValueError(f"unknown character {character!r}")
        shape, color, style = CHARACTER_LOOK[character]
        size = max(size, 17)  # room for the face
        for k in ("shape", "color", "style"):
            fixed.pop(k, None)
    shape = fixed.pop("shape", shape)
    color = fixed.pop("color", color)
    style = fixed.pop("style", style)
    place = fixed.pop("place", place)
    hazard = bool(fixed.pop("hazard", hazard))
    size = int(fixed.pop("size", size))
    if fixed:
        raise TypeError(f"unknown scene attributes {sorted(fixed)}")
    for cat, val in (("shape", shape), ("color", color), ("style", style), ("place", place)):
        if val not in CATEGORIES[cat]:
            raise ValueError(f"unknown {cat} {val!r}")
    if random_position:
        x0 = int(fx * (IMAGE_SIZE - size + 1))
        y0 = int(fy * (IMAGE_SIZE - size + 1))
    else:  # centred; fx, fy are still drawn so that the other attributes keep their stream
        x0 = y0 = (IMAGE_SIZE - size) // 2
    return Scene(shape, color, style, place, character, hazard, size, x0, y0, bg_seed)


def glyph_scene(rng: np.random.Generator, **fixed) -> Scene:
    """A scene whose object is the unseen :data:`GLYPH` (no character); other
    attributes random or pinned as in :func:`sample_scene`."""
    base = sample_scene(rng, character=None, **fixed)
    return Scene(GLYPH, base.color, base.style, base.place, None, base.hazard, base.size, base.x0, base.y0,
                 base.bg_seed)
