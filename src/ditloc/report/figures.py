"""The report's figures, drawn with PIL (no plotting library needed): a heat map,
presence-vs-K curves with confidence bands, and image grids. Each function
returns a PIL image; the caller saves it."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from .data import CurvePoint

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (20, 20, 20), (110, 110, 110), (225, 225, 225)
#: line colours of the conditions (colour-blind safe: vermillion, blue, bluish green)
COLORS = {"top": (213, 94, 0), "random": (0, 114, 178), "bottom": (0, 158, 115)}
LABELS = {"top": "top-K withheld", "random": "random-K withheld", "bottom": "bottom-K withheld"}
#: how each condition is drawn, in drawing order (later on top). The controls often coincide (and top-K
#: with them where withholding does nothing), so each line is narrower than the one under it: bottom-K wide
#: and solid with large triangles, random-K dashed with squares, top-K thin with small circles; where lines
#: coincide, every one stays visible
STYLES = {
    "bottom": {"width": 10, "dash": None, "marker": "triangle", "size": 8},
    "random": {"width": 6, "dash": (10, 6), "marker": "square", "size": 5},
    "top": {"width": 2, "dash": None, "marker": "circle", "size": 3},
}
#: top-K / bottom-K colours of a second and third localization method (the first uses COLORS)
METHOD_COLORS = [
    {"top": (204, 121, 167), "bottom": (86, 180, 233)},
    {"top": (120, 60, 20), "bottom": (150, 150, 60)},
]
HEAT = (178, 24, 43)  # the colour of 1.0 in the heat map (0.0 is white)


def font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, f) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    return right - left, bottom - top


def _vertical_text(text: str, f, fill=BLACK) -> Image.Image:
    """`text` rotated to read bottom-up, on a transparent tile."""
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    w, h = _text_size(probe, text, f)
    tile = Image.new("RGBA", (w + 4, h + 6), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((2, 0), text, font=f, fill=fill)
    return tile.rotate(90, expand=True)


def _mix(color: tuple[int, int, int], v: float) -> tuple[int, int, int]:
    """White (v = 0) to `color` (v = 1)."""
    v = min(max(v, 0.0), 1.0)
    return tuple(int(round(255 + (c - 255) * v)) for c in color)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n - 1, 1)
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-6:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def presence_range(values: Sequence[float]) -> tuple[float, float]:
    """The presence axis: 0 to 1 (presence is a fraction or a probability), widened only to
    show values outside it. Fixed, so that a 0.003 drop looks as small as it is."""
    return min([0.0, *values]), max([1.0, *values])


def _dashed(d: ImageDraw.ImageDraw, xy: list[tuple[float, float]], fill, width: int, dash: tuple[int, int]) -> None:
    """A polyline drawn `dash` = (on, off) pixels at a time; the pattern runs on across vertices."""
    on, off = dash
    phase = 0.0  # position within the on+off period
    for (x0, y0), (x1, y1) in itertools.pairwise(xy):
        length = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < length:
            in_on = phase < on
            step = min((on - phase) if in_on else (on + off - phase), length - pos)
            if in_on:
                a, b = pos / length, (pos + step) / length
                d.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                       fill=fill, width=width)
            pos += step
            phase = (phase + step) % (on + off)


def _marker(d: ImageDraw.ImageDraw, x: float, y: float, shape: str, r: int, fill) -> None:
    if shape == "square":
        d.rectangle([x - r, y - r, x + r, y + r], fill=fill, outline=WHITE)
    elif shape == "triangle":
        d.polygon([(x, y - r - 1), (x - r, y + r - 1), (x + r, y + r - 1)], fill=fill, outline=WHITE)
    else:
        d.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=WHITE)


def _series_line(d: ImageDraw.ImageDraw, xy: list[tuple[float, float]], control: str, markers=None,
                 color=None) -> None:
    """A condition's line in its style, with its markers at `markers` (default: every vertex)."""
    style = STYLES[control]
    color = color or COLORS[control]
    if len(xy) > 1:
        if style["dash"]:
            _dashed(d, xy, color, style["width"], style["dash"])
        else:
            d.line(xy, fill=color, width=style["width"], joint="curve")
    for x, y in xy if markers is None else markers:
        _marker(d, x, y, style["marker"], style["size"], color)


def _format_tick(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-9 else "0"


def heatmap_figure(freq: dict[str, Sequence[float]], blocks: Sequence[str], *, title: str,
                   subtitle: str) -> Image.Image:
    """Rows (e.g. categories) x blocks, each cell a value in [0, 1] (white 0, red 1)."""
    f, small, title_font = font(14), font(11), font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    n = len(blocks)
    cell_w = max(18, min(44, 1000 // max(n, 1)))
    cell_h = 34
    label_w = max(_text_size(probe, c, f)[0] for c in freq) + 16
    block_labels = [_vertical_text(b, small) for b in blocks]
    label_h = max(t.height for t in block_labels) + 8
    left, top = label_w, 60
    bar_x = left + n * cell_w + 24
    text_w = max(_text_size(probe, title, title_font)[0], _text_size(probe, subtitle, small)[0]) + 20
    width, height = max(bar_x + 60, text_w), top + len(freq) * cell_h + label_h + 40
    img = Image.new("RGB", (width, height), WHITE)
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, font=title_font, fill=BLACK)
    d.text((10, 30), subtitle, font=small, fill=GREY)
    for i, (category, values) in enumerate(freq.items()):
        y = top + i * cell_h
        tw, th = _text_size(d, category, f)
        d.text((label_w - tw - 8, y + (cell_h - th) // 2 - 2), category, font=f, fill=BLACK)
        for j, v in enumerate(values):
            x = left + j * cell_w
            d.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=_mix(HEAT, v), outline=LIGHT)
            if cell_w >= 30:
                text = f"{v:.2f}".lstrip("0") if v < 1 else "1"
                text = text if v > 0 else ""
                tw, th = _text_size(d, text, small)
                d.text((x + (cell_w - 2 - tw) // 2, y + (cell_h - 2 - th) // 2 - 2), text, font=small,
                       fill=WHITE if v > 0.55 else BLACK)
    y_labels = top + len(freq) * cell_h + 4
    for j, tile in enumerate(block_labels):
        img.paste(tile, (left + j * cell_w + (cell_w - tile.width) // 2, y_labels), tile)
    d.text((left, y_labels + label_h), "block", font=f, fill=GREY)
    # colour bar: 1 at the top, 0 at the bottom
    bar_top, bar_h = top, max(len(freq) * cell_h - 2, 60)
    for y in range(bar_h):
        d.line([bar_x, bar_top + y, bar_x + 16, bar_top + y], fill=_mix(HEAT, 1 - y / max(bar_h - 1, 1)))
    d.rectangle([bar_x, bar_top, bar_x + 16, bar_top + bar_h], outline=GREY)
    d.text((bar_x + 22, bar_top - 6), "1", font=small, fill=BLACK)
    d.text((bar_x + 22, bar_top + bar_h - 8), "0", font=small, fill=BLACK)
    return img


def curves_figure(points: Sequence[CurvePoint], ks: Sequence[int], *, title: str, y_label: str) -> Image.Image:
    """Presence vs K for one category: a line per control (top-K and bottom-K per
    localization method), each starting at the baseline (K = 0), with its 95% confidence band. K values sit at even spacing;
    the presence axis is fixed (`presence_range`)."""
    f, small, title_font = font(14), font(12), font(16)
    n_methods = len({p.method for p in points if p.control in ("top", "bottom")})
    extra = max(0, n_methods - 1)  # room for the other methods' legend lines
    width, height = 760 + (110 if extra else 0), 460 + 48 * extra
    left, right, top, bottom = 78, 200 + (110 if extra else 0), 48, 70
    img = Image.new("RGB", (width, height), WHITE)
    d = ImageDraw.Draw(img)
    d.text((12, 12), title, font=title_font, fill=BLACK)
    xs = [0] + list(ks)
    plot_w, plot_h = width - left - right, height - top - bottom

    def x_of(k: int) -> float:
        return left + 20 + xs.index(k) * (plot_w - 40) / max(len(xs) - 1, 1)

    ticks = _nice_ticks(*presence_range([v for p in points for v in (p.low, p.high)]))
    y0, y1 = ticks[0], ticks[-1]

    def y_of(v: float) -> float:
        return top + plot_h - (v - y0) / (y1 - y0) * plot_h

    # axes, grid and ticks
    for t in ticks:
        y = y_of(t)
        d.line([left, y, left + plot_w, y], fill=LIGHT)
        label = _format_tick(t)
        tw, th = _text_size(d, label, small)
        d.text((left - tw - 8, y - th // 2 - 2), label, font=small, fill=BLACK)
    for k in xs:
        x = x_of(k)
        d.line([x, top + plot_h, x, top + plot_h + 5], fill=BLACK)
        label = str(k)
        tw, _ = _text_size(d, label, small)
        d.text((x - tw / 2, top + plot_h + 8), label, font=small, fill=BLACK)
    d.rectangle([left, top, left + plot_w, top + plot_h], outline=BLACK)
    x_title = "K = blocks withheld (0: baseline)"
    tw, _ = _text_size(d, x_title, f)
    d.text((left + (plot_w - tw) / 2, top + plot_h + 32), x_title, font=f, fill=BLACK)
    tile = _vertical_text(y_label, f)
    img.paste(tile, (8, top + (plot_h - tile.height) // 2), tile)

    # bands first (translucent), then lines and markers
    base = next((p for p in points if p.control == "baseline"), None)
    # one series per (control, method): random-K has no method; top-K and bottom-K one per localization method
    methods = list(dict.fromkeys(p.method for p in points if p.control in ("top", "bottom")))
    colors = {(c, m): (COLORS[c] if i == 0 else METHOD_COLORS[(i - 1) % len(METHOD_COLORS)][c])
              for i, m in enumerate(methods) for c in ("top", "bottom")}
    colors[("random", "")] = COLORS["random"]
    series = {}
    for control in STYLES:  # drawing order
        for method in ([""] if control == "random" else methods):
            pts = sorted((p for p in points if p.control == control and p.method == method), key=lambda p: p.k)
            if pts:
                series[control, method] = ([base] if base is not None else []) + pts
    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    od = ImageDraw.Draw(overlay)
    for key, pts in series.items():
        if len(pts) > 1:
            upper = [(x_of(p.k), y_of(p.high)) for p in pts]
            lower = [(x_of(p.k), y_of(p.low)) for p in reversed(pts)]
            od.polygon(upper + lower, fill=colors[key] + (45,))
    img.paste(Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB"))
    d = ImageDraw.Draw(img)
    for (control, method), pts in series.items():
        _series_line(d, [(x_of(p.k), y_of(p.mean)) for p in pts], control, color=colors[control, method])
    if base is not None:
        x, y = x_of(0), y_of(base.mean)
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=BLACK)

    # legend: top, random, bottom; a method's name where several are compared
    lx, ly = left + plot_w + 16, top + 6
    for control in COLORS:
        for (c, method) in (k for k in series if k[0] == control):
            _series_line(d, [(lx, ly + 8), (lx + 30, ly + 8)], c, markers=[(lx + 15, ly + 8)],
                         color=colors[c, method])
            label = LABELS[c] + (f" ({method})" if method and len(methods) > 1 else "")
            d.text((lx + 38, ly), label, font=small, fill=BLACK)
            ly += 24
    d.ellipse([lx + 9, ly + 3, lx + 19, ly + 13], fill=BLACK)
    d.text((lx + 34, ly), "baseline", font=small, fill=BLACK)
    ly += 30
    notes = ("bands: 95% CI,", "normal approximation", "(mean ± 1.96 s / sqrt(n))", "over prompts x seeds",
             "x concepts")
    for line in notes:
        d.text((lx, ly), line, font=small, fill=GREY)
        ly += 17
    return img


def _tile(image: Image.Image, size: int) -> Image.Image:
    """An image scaled to `size` px on its long side (nearest for pixel art, Lanczos to shrink)."""
    w, h = image.size
    scale = size / max(w, h)
    method = Image.NEAREST if scale >= 1 else Image.LANCZOS
    return image.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), method)


def grid_figure(rows: Sequence[Sequence[Image.Image]], column_titles: Sequence[str], row_titles: Sequence[str],
                *, title: str, tile: int = 128) -> Image.Image:
    """A table of images: one row per sample, one column per condition."""
    f, small = font(14), font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 6
    label_w = max(_text_size(probe, t, small)[0] for t in row_titles) + 2 * pad
    head = 52
    width = label_w + len(column_titles) * (tile + pad) + pad
    height = head + len(rows) * (tile + pad) + pad
    img = Image.new("RGB", (width, height), WHITE)
    d = ImageDraw.Draw(img)
    d.text((pad, 6), title, font=f, fill=BLACK)
    for c, name in enumerate(column_titles):
        tw, _ = _text_size(d, name, small)
        d.text((label_w + c * (tile + pad) + (tile - tw) // 2, 32), name, font=small, fill=BLACK)
    for r, (images, name) in enumerate(zip(rows, row_titles)):
        y = head + r * (tile + pad)
        _, th = _text_size(d, name, small)
        d.text((pad, y + (tile - th) // 2), name, font=small, fill=BLACK)
        for c, image in enumerate(images):
            t = _tile(image, tile)
            img.paste(t, (label_w + c * (tile + pad) + (tile - t.width) // 2, y + (tile - t.height) // 2))
    return img
