"""The toy world's renderer: `render` draws a `Scene` as a 32 x 32 RGB ``uint8`` array, a
pure function of the scene. The public names are `ditloc.toy.world`'s."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .scenes import BLACK, IMAGE_SIZE, RGB, WHITE, Scene

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
