"""The report's and the demo's figures, drawn with matplotlib: a heat map
(rows x blocks, marked cells, cells not measured hatched grey), presence-vs-K
curves with 95% confidence intervals, and image grids.

Each function returns a `matplotlib.figure.Figure` (inspectable: its axes,
tick labels and artists); `save_figure` writes it as a PNG. Figures are built
on the non-interactive Agg canvas directly, never through `pyplot`: nothing is
shown, nothing touches the user's backend or pyplot's figure registry, so there
is nothing to close and a figure is freed with its last reference (matplotlib's
advice for figures made in a library or server). Every figure is drawn and saved
under matplotlib's default style at a fixed dpi and without a date in the PNG,
so one run's figures are the same bytes each time, whatever the user's
matplotlibrc says.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from PIL import Image

from .._io import write_atomic
from .data import CurvePoint

DPI = 100
#: PNG text chunks: none (matplotlib would write its version; no date is written either way)
PNG_METADATA = {"Software": None}
#: line colours of the conditions (colour-blind safe: vermillion, blue, bluish green)
COLORS = {"top": "#D55E00", "random": "#0072B2", "bottom": "#009E73"}
LABELS = {"top": "top-K withheld", "random": "random-K withheld", "bottom": "bottom-K withheld"}
#: how each condition is drawn. The controls often coincide (and top-K with them where withholding does
#: nothing), so each differs in marker, line style and width, is drawn over the wider one (zorder) and is
#: shifted slightly along K: where lines coincide, every one stays visible
STYLES = {
    "bottom": {"marker": "^", "linestyle": "-", "linewidth": 3.5, "markersize": 9, "zorder": 2},
    "random": {"marker": "s", "linestyle": "--", "linewidth": 2.5, "markersize": 7, "zorder": 3},
    "top": {"marker": "o", "linestyle": "-", "linewidth": 1.6, "markersize": 5, "zorder": 4},
}
#: top-K / bottom-K colour, marker and line style of a second and third localization method (the first: COLORS)
METHOD_STYLES = [
    {"top": ("#CC79A7", "D", ":"), "bottom": ("#56B4E9", "v", "-.")},
    {"top": ("#783C14", "P", (0, (5, 1.5))), "bottom": ("#96963C", "X", (0, (1, 1)))},
]
HEAT_CMAP = "Reds"  # white (0) to red (1)
MARK_COLOR = "#111111"  # outline of a marked heat-map cell
#: how a value that was not measured (NaN) is drawn: a hatched grey cell or bar, named in the legend
MISSING_STYLE = {"facecolor": "#d9d9d9", "edgecolor": "#8c8c8c", "hatch": "///", "linewidth": 0.0}
MISSING_LABEL = "not searched"
CI_NOTE = "error bars: 95% CI, normal approximation\n(mean ± 1.96 s / √n)\nover prompts × seeds × concepts"


@contextmanager
def _style():
    """matplotlib's defaults (not the user's matplotlibrc), so a figure looks the same everywhere."""
    with matplotlib.style.context("default"):
        yield


def _figure(width: float, height: float) -> Figure:
    """An empty figure on the Agg canvas (inches at `DPI`), laid out by the constrained-layout engine."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained", facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path) -> Path:
    """Write `fig` as a PNG at `path` (atomically); the same figure gives the same bytes."""
    buf = io.BytesIO()
    with _style():
        fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_METADATA, facecolor="white",
                    bbox_inches="tight", pad_inches=0.15)
    return write_atomic(path, buf.getvalue())


def _wrap(text: str, width: int, max_lines: int | None = None) -> str:
    """Each line of `text` wrapped to `width` characters (at most `max_lines` lines each, then '…')."""
    return "\n".join(textwrap.fill(line, width, max_lines=max_lines, placeholder=" …") if line else ""
                     for line in text.split("\n"))


# ---- heat map ---------------------------------------------------------------------------
def missing_patch(label: str = MISSING_LABEL) -> Patch:
    """The legend entry of a value not measured (`MISSING_STYLE`)."""
    return Patch(label=label, **MISSING_STYLE)


def heatmap_figure(values: Mapping[str, Sequence[float]], blocks: Sequence[str], *, title: str, subtitle: str = "",
                   quantity: str, marked: Mapping[str, Sequence[str]] | None = None, mark_label: str = "top-K block",
                   row_axis: str = "category", col_axis: str = "block", missing_label: str = MISSING_LABEL) -> Figure:
    """Rows x blocks, each cell a value in [0, 1] (white 0, red 1; the colour bar names `quantity`).

    `marked`: row -> blocks outlined in that row (e.g. its top-K); a block marked in any row gets a
    bold tick label, and the outline is explained by a legend entry `mark_label`. A NaN (or None)
    cell was not measured: hatched grey, named by a legend entry `missing_label`, never white (0)."""
    marked = {row: set(bs) for row, bs in (marked or {}).items()}
    unknown = sorted({b for bs in marked.values() for b in bs} - set(blocks))
    if unknown:
        raise ValueError(f"marked blocks {unknown} are not among the heat map's blocks")
    rows = list(values)
    data = np.array([[np.nan if v is None else v for v in values[r]] for r in rows],
                    dtype=float).reshape(len(rows), len(blocks))  # [rows, blocks]
    missing = np.isnan(data)  # [rows, blocks]
    label_chars = max((len(r) for r in rows), default=4)
    block_chars = max((len(b) for b in blocks), default=4)
    width = min(max(3.2 + 0.08 * label_chars + 0.3 * len(blocks), 6.0), 24.0)
    height = 1.9 + 0.36 * len(rows) + 0.07 * block_chars
    with _style():
        fig = _figure(width, height)
        ax = fig.add_subplot()
        image = ax.imshow(data, cmap=HEAT_CMAP, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(blocks)), list(blocks), rotation=90, fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=9)
        ax.set_xlabel(col_axis)
        ax.set_ylabel(row_axis)
        ax.tick_params(length=2)
        if len(blocks) <= 24:  # values written in the cells while they fit
            for i, j in np.ndindex(*data.shape):
                v = data[i, j]
                if v > 0:
                    ax.text(j, i, "1" if v >= 1 else f"{v:.2f}".lstrip("0"), ha="center", va="center",
                            fontsize=7, color="white" if v > 0.55 else "black")
        for i, j in zip(*np.nonzero(missing)):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, zorder=2, **MISSING_STYLE))
        for i, row in enumerate(rows):
            for j, block in enumerate(blocks):
                if block in marked.get(row, ()):
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=MARK_COLOR,
                                           linewidth=2.0, zorder=3))
        bold = {b for bs in marked.values() for b in bs}
        for label in ax.get_xticklabels():
            if label.get_text() in bold:
                label.set_fontweight("bold")
        bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, shrink=min(1.0, 0.4 + 0.1 * len(rows)))
        bar.set_label(_wrap(quantity, 40), fontsize=9)
        bar.ax.tick_params(labelsize=8)
        handles = [Patch(facecolor="none", edgecolor=MARK_COLOR, linewidth=2.0,
                         label=f"{mark_label} (bold tick: marked in a row)")] if marked else []
        if missing.any():
            handles.append(missing_patch(missing_label))
        if handles:  # below the plot, clear of the title and the colour bar
            fig.legend(handles=handles, loc="outside lower left", frameon=False, fontsize=8,
                       ncols=len(handles))
        fig.suptitle(title, fontsize=12, x=0.02, ha="left")
        if subtitle:
            ax.set_title(_wrap(subtitle, int(width * 14)), fontsize=9, color="0.35", loc="left")
    return fig


def top_k_of(row: Sequence[float], blocks: Sequence[str], k: int) -> list[str]:
    """The blocks of `row`'s k largest values, ties at the k-th value included; none of value <= 0,
    none not measured (NaN or None)."""
    values = [v for v in row if v is not None and not np.isnan(v)]
    if k < 1 or not values:
        return []
    kth = sorted(values, reverse=True)[min(k, len(values)) - 1]
    return [b for b, v in zip(blocks, row) if v is not None and not np.isnan(v) and v >= kth and v > 0]


# ---- presence vs K ------------------------------------------------------------------------
def presence_range(values: Sequence[float]) -> tuple[float, float]:
    """The presence axis: 0 to 1 (presence is a fraction or a probability), widened only to
    show values outside it. Fixed, so that a 0.003 drop looks as small as it is."""
    return min([0.0, *values]), max([1.0, *values])


def _series_style(control: str, method_index: int) -> dict:
    style = dict(STYLES[control])
    if method_index == 0 or control == "random":
        style["color"] = COLORS[control]
    else:
        color, marker, linestyle = METHOD_STYLES[(method_index - 1) % len(METHOD_STYLES)][control]
        style.update(color=color, marker=marker, linestyle=linestyle)
    return style


def curves_figure(points: Sequence[CurvePoint], ks: Sequence[int], *, title: str, y_label: str) -> Figure:
    """Presence vs K for one category: a line per (control, localization method), each starting at
    the baseline (K = 0), with 95% confidence intervals as error bars. K values sit at even
    spacing; the presence axis is fixed (`presence_range`); the legend sits right of the plot."""
    xs = [0, *ks]
    base = next((p for p in points if p.control == "baseline"), None)
    methods = list(dict.fromkeys(p.method for p in points if p.control in ("top", "bottom")))
    series = {}  # (control, method) -> points by K, in drawing order
    for control in STYLES:
        for method in ([""] if control == "random" else methods):
            pts = sorted((p for p in points if p.control == control and p.method == method and p.k in ks),
                         key=lambda p: p.k)
            if pts:
                series[control, method] = pts
    n = len(series)
    dodge = min(0.07, 0.35 / max(n, 1))  # in K positions: coinciding series sit side by side
    lo, hi = presence_range([v for p in points for v in (p.low, p.high)])
    pad = 0.04 * (hi - lo)
    with _style():
        fig = _figure(8.6, 4.6)
        ax = fig.add_subplot()
        ax.grid(axis="y", color="0.9", zorder=0)
        for j, ((control, method), pts) in enumerate(series.items()):
            style = _series_style(control, methods.index(method) if method in methods else 0)
            shift = (j - (n - 1) / 2) * dodge
            line = ([base] if base is not None else []) + pts
            label = LABELS[control] + (f" ({method})" if method and len(methods) > 1 else "")
            ax.plot([xs.index(p.k) + shift for p in line], [p.mean for p in line], label=label,
                    markeredgecolor="white", markeredgewidth=0.8, **style)
            x = [xs.index(p.k) + shift for p in pts]
            y = np.array([p.mean for p in pts])
            err = np.array([[p.mean - p.low for p in pts], [p.high - p.mean for p in pts]])  # [2, points]
            ax.errorbar(x, y, yerr=np.clip(err, 0, None), fmt="none", ecolor=style["color"], elinewidth=1.2,
                        capsize=3, zorder=style["zorder"])
        if base is not None:
            ax.errorbar([0], [base.mean], yerr=[[base.mean - base.low], [base.high - base.mean]], fmt="o",
                        color="black", markersize=8, capsize=4, zorder=5, label="baseline (K = 0)")
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(range(len(xs)), [str(k) for k in xs])
        ax.set_xlabel("K = blocks withheld (0: baseline)")
        ax.set_ylabel(y_label)
        ax.set_title(title, fontsize=12, loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, fontsize=9)
        ax.text(1.02, 0.0, CI_NOTE, transform=ax.transAxes, fontsize=8, color="0.35", va="bottom", ha="left")
    return fig


# ---- image grid -----------------------------------------------------------------------------
def _tile(image, size: int) -> Image.Image:
    """An image scaled to `size` px on its long side (nearest to enlarge pixel art, Lanczos to shrink)."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    w, h = image.size
    scale = size / max(w, h)
    method = Image.NEAREST if scale >= 1 else Image.LANCZOS
    return image.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), method)


def grid_figure(rows: Sequence[Sequence], column_titles: Sequence[str], row_titles: Sequence[str],
                *, title: str, tile: int = 128) -> Figure:
    """A table of images: one row per sample, one column per condition. `row_titles`: each row's
    label, e.g. its prompt and seed (long lines are wrapped; a newline starts a new line)."""
    if len(row_titles) != len(rows):
        raise ValueError(f"{len(rows)} image rows but {len(row_titles)} row titles")
    n_rows, n_cols = len(rows), len(column_titles)
    side = tile / DPI  # inches per image
    with _style():
        fig = _figure(1.9 + n_cols * (side + 0.08), 0.7 + n_rows * (side + 0.1))
        axes = fig.subplots(n_rows, n_cols, squeeze=False)
        for r, (images, label) in enumerate(zip(rows, row_titles)):
            for c in range(n_cols):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c < len(images):
                    ax.imshow(np.asarray(_tile(images[c], tile)), interpolation="nearest")
                if r == 0:
                    ax.set_title(_wrap(column_titles[c], 18), fontsize=9)
            axes[r][0].set_ylabel(_wrap(label, 30, max_lines=5), rotation=0, ha="right", va="center",
                                  fontsize=8, labelpad=6)
        fig.suptitle(title, fontsize=11)
    return fig


__all__ = ["COLORS", "DPI", "curves_figure", "grid_figure", "heatmap_figure", "presence_range", "save_figure",
           "top_k_of"]
