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

Public API (stable):
    CATEGORIES, CHARACTER_BASE_SHAPE, CHARACTER_LOOK, PLACE_PHRASE,
    HAZARD_PHRASE, GENERIC_SHAPE, IMAGE_SIZE, RGB,
    Scene, sample_scene, render, render_batch,
    TRAIN_TEMPLATES, HELDOUT_TEMPLATES, make_prompt, scene_prompt,
    concept_category, concept_span, clean_prompt, vocabulary, tokenize_words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, asdict
from typing import Iterable, Optional, Sequence

import numpy as np

from ..text import find_occurrences, indefinite_article, substitute, tidy

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
#: Objects are centred in the image (session 4).  With the object at a random
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


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
_PX = _XX + 0.5  # pixel centers
_PY = _YY + 0.5


def _background(place: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = IMAGE_SIZE
    img = np.zeros((n, n, 3), np.float32)

    def fill(mask, rgb):
        img[mask] = rgb

    if place == "beach":
        horizon = int(rng.integers(11, 17))
        fill(_YY < horizon, (120, 180, 235))  # sky
        fill(_YY >= horizon, (228, 208, 150))  # sand
        fill(_YY == horizon, (190, 170, 120))  # wet sand line
    elif place == "forest":
        fill(np.ones((n, n), bool), (22, 72, 32))
        xs = rng.choice(np.arange(1, n - 2), size=4, replace=False)
        for x in xs:
            fill((_XX >= x) & (_XX < x + 2) & (_YY >= int(rng.integers(0, 8))), (100, 62, 28))
        # a few lighter leaves
        for _ in range(6):
            y, x = rng.integers(0, n, size=2)
            fill((_YY == y) & (np.abs(_XX - x) <= 1), (45, 110, 50))
    elif place == "night":
        fill(np.ones((n, n), bool), (12, 16, 48))
        for _ in range(int(rng.integers(10, 16))):
            y, x = rng.integers(0, n, size=2)
            img[y, x] = (240, 240, 255)
    elif place == "desert":
        fill(np.ones((n, n), bool), (220, 180, 120))
        phase = rng.uniform(0, 2 * np.pi)
        base = rng.uniform(17, 22)
        dune = base + 4.0 * np.sin(_PX * 2 * np.pi / 24 + phase)
        fill(_PY > dune, (185, 135, 80))
    elif place == "snow":
        fill(np.ones((n, n), bool), (236, 240, 246))
        phase = rng.uniform(0, 2 * np.pi)
        ground = rng.uniform(18, 23) + 2.0 * np.sin(_PX * 2 * np.pi / 20 + phase)
        fill(_PY > ground, (200, 206, 218))
        for _ in range(8):
            y, x = rng.integers(0, n, size=2)
            img[y, x] = (185, 192, 205)
    elif place == "ocean":
        fill(np.ones((n, n), bool), (25, 100, 140))
        off = int(rng.integers(0, 6))
        phase = rng.uniform(0, 2 * np.pi)
        for r0 in range(off, n, 6):
            wy = np.round(r0 + 1.2 * np.sin(_PX[0] * 2 * np.pi / 10 + phase + r0)).astype(int)
            for x in range(n):
                if 0 <= wy[x] < n:
                    img[wy[x], x] = (95, 175, 210)
    else:
        raise ValueError(f"unknown place {place!r}")
    return img


def _shape_mask(shape: str, size: int, x0: int, y0: int) -> np.ndarray:
    s = float(size)
    cx, cy = x0 + s / 2, y0 + s / 2
    dx, dy = _PX - cx, _PY - cy
    h = s / 2
    if shape == "circle":
        m = dx * dx + dy * dy <= h * h
    elif shape == "square":
        m = (np.abs(dx) <= h * 0.85) & (np.abs(dy) <= h * 0.85)
    elif shape == "triangle":
        t = (_PY - y0) / s  # 0 at apex, 1 at base
        m = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * h)
    elif shape == "diamond":
        m = np.abs(dx) + np.abs(dy) <= h
    elif shape == "cross":
        a = max(s / 6.0, 2.0)
        m = ((np.abs(dx) <= a) & (np.abs(dy) <= h)) | ((np.abs(dy) <= a) & (np.abs(dx) <= h))
    elif shape == "star":
        ang = np.arctan2(dy, dx) + np.pi / 2  # 0 = pointing up
        r = np.sqrt(dx * dx + dy * dy)
        # radius of a 5-pointed star boundary as a function of angle
        k = np.mod(ang, 2 * np.pi / 5) / (2 * np.pi / 5)  # 0..1 within a spike
        tri = np.abs(k - 0.5) * 2  # 1 at tip, 0 at valley
        r_out, r_in = h, h * 0.45
        # piecewise-linear in angle between inner and outer radii
        m = r <= r_in + (r_out - r_in) * tri**1.5
        # shift star down slightly so it is centered visually
    elif shape == "heart":  # GLYPH: never in the training data (personalization subject)
        x, y = dx / (h * 0.9), -(dy + h * 0.1) / (h * 0.9)
        m = (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(k):
        m = out
        e = m.copy()
        e[1:, :] &= m[:-1, :]
        e[:-1, :] &= m[1:, :]
        e[:, 1:] &= m[:, :-1]
        e[:, :-1] &= m[:, 1:]
        e[0, :] = e[-1, :] = False
        e[:, 0] = e[:, -1] = False
        out = e
    return out


def _style_pattern(style: str, x0: int, y0: int) -> np.ndarray:
    """True where the object color shows (False -> white) for textured styles."""
    lx, ly = _XX - x0, _YY - y0
    if style == "striped":
        return (ly // 2) % 2 == 0  # horizontal stripes, 4-px period
    if style == "dotted":
        return ~(((lx % 5) >= 2) & ((lx % 5) <= 3) & ((ly % 5) >= 2) & ((ly % 5) <= 3))
    if style == "checkered":
        return ((lx // 3) + (ly // 3)) % 2 == 0
    return np.ones_like(lx, dtype=bool)


_HAZARD_BITMAP = [
    "....K....",
    "...KYK...",
    "...KKK...",
    "..KYKYK..",
    ".KYYKYYK.",
    ".KYYYYYK.",
    "KYYYKYYYK",
    "KKKKKKKKK",
]
_HZ_H, _HZ_W = len(_HAZARD_BITMAP), len(_HAZARD_BITMAP[0])


def hazard_box(scene: Scene) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the hazard sign: the corner farthest from the object;
    between equally far corners (a centred object), the scene's ``bg_seed`` picks."""
    cx = scene.x0 + scene.size / 2
    cy = scene.y0 + scene.size / 2
    m = 1  # margin
    corners = [
        (m, m),
        (m, IMAGE_SIZE - m - _HZ_W),
        (IMAGE_SIZE - m - _HZ_H, m),
        (IMAGE_SIZE - m - _HZ_H, IMAGE_SIZE - m - _HZ_W),
    ]

    def dist(c):
        yy, xx = c[0] + _HZ_H / 2, c[1] + _HZ_W / 2
        return -round((yy - cy) ** 2 + (xx - cx) ** 2, 6)

    far = min(dist(c) for c in corners)
    ties = [c for c in corners if dist(c) == far]
    y, x = ties[scene.bg_seed % len(ties)]
    return y, x, y + _HZ_H, x + _HZ_W


def _draw_face(img: np.ndarray, scene: Scene) -> None:
    s = scene.size
    cx = scene.x0 + s / 2
    cy = scene.y0 + s / 2
    if scene.shape == "triangle":
        cy += s / 6  # center of mass is lower
    ey = int(round(cy - s / 7)) - 1
    for ex in (int(round(cx - s / 5)) - 1, int(round(cx + s / 5)) - 2):
        img[ey : ey + 3, ex : ex + 3] = WHITE
        img[ey + 1, ex + 1] = BLACK
    my = ey + 5
    mx0, mx1 = int(round(cx - s / 6)), int(round(cx + s / 6))
    img[my, mx0:mx1] = BLACK


def render(scene: Scene) -> np.ndarray:
    """Render a scene to a 32x32x3 ``uint8`` array (pure function)."""
    img = _background(scene.place, scene.bg_seed)
    mask = _shape_mask(scene.shape, scene.size, scene.x0, scene.y0)
    col = np.array(RGB[scene.color], np.float32)
    if scene.style == "outlined":
        ring = mask & ~_erode(mask, 2)
        img[ring] = col
    else:
        pat = _style_pattern(scene.style, scene.x0, scene.y0)
        img[mask & pat] = col
        img[mask & ~pat] = WHITE
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if scene.character is not None:
        _draw_face(out, scene)
    if scene.hazard:
        y0, x0, y1, x1 = hazard_box(scene)
        pal = {"K": BLACK, "Y": (255, 205, 0)}
        for r, row in enumerate(_HAZARD_BITMAP):
            for c, ch in enumerate(row):
                if ch in pal:
                    out[y0 + r, x0 + c] = pal[ch]
    return out


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """Render many scenes -> ``uint8`` array [N, 32, 32, 3]."""
    return np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, 32, 32, 3), np.uint8)


# --------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------

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
