"""Figures of one localization (`ditloc report` on a `ditloc localize` directory): the
search's presence curve, the block scores as bars, and a score map (blocks x steps or
blocks x heads). A value that was not measured (NaN) is drawn hatched grey and named
"not searched" in the legend, never as a measured 0.

Drawn as `ditloc.report.figures` draws: on the Agg canvas under matplotlib's default
style, each function returning a `matplotlib.figure.Figure`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ..localization import SetSearch
from .figures import (
    COLORS,
    MARK_COLOR,
    MISSING_LABEL,
    MISSING_STYLE,
    _figure,
    _style,
    _wrap,
    missing_patch,
    presence_range,
)

#: bar colours of a positive and a negative block score (colour-blind safe: vermillion, blue)
POSITIVE, NEGATIVE = COLORS["top"], COLORS["random"]
MAP_CMAP = "RdBu_r"  # blue (negative) - white (0) - red (positive)


def search_curve_figure(search: SetSearch, *, threshold: float, title: str) -> Figure:
    """Presence vs K: the baseline (K = 0), S_K withheld for K = 1..max_k, every other set the
    search evaluated (grey, by its size), the automatic K's threshold and the K it picks."""
    ks = list(range(search.max_k + 1))
    curve = [search.baseline, *search.presence]
    kept = {frozenset(s) for s in search.sets}  # evaluated sets are in model order, S_K in the order of entry
    others = [(len(s), p) for s, p in search.evaluated if 0 < len(s) <= search.max_k and frozenset(s) not in kept]
    line = (1 - threshold) * search.baseline
    auto = search.k_for_drop(threshold)
    lo, hi = presence_range(curve + [p for _, p in others] + [line])
    pad = 0.04 * (hi - lo)
    with _style():
        fig = _figure(8.0, 4.4)
        ax = fig.add_subplot()
        ax.grid(axis="y", color="0.9", zorder=0)
        if others:
            ax.scatter([k for k, _ in others], [p for _, p in others], s=14, color="0.6", zorder=2,
                       label="another set evaluated")
        ax.plot(ks, curve, marker="o", color=COLORS["top"], linewidth=1.8, markersize=6, zorder=4,
                label="S_K withheld (the searched set)")
        ax.plot([0], [search.baseline], "o", color="black", markersize=8, zorder=5, label="baseline (K = 0)")
        ax.axhline(line, color="0.35", linestyle=":", linewidth=1.2, zorder=1,
                   label=f"automatic K's threshold ({1 - threshold:g} x baseline)")
        if auto is not None:
            ax.plot([auto], [search.presence[auto - 1]], "o", markersize=15, markerfacecolor="none",
                    markeredgecolor=MARK_COLOR, markeredgewidth=1.5, zorder=6, label=f"automatic K = {auto}")
        ax.set_xlim(-0.5, search.max_k + 0.5)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K = blocks withheld (0: baseline)")
        ax.set_ylabel(f"presence ({search.objective})")
        ax.set_title(title, fontsize=12, loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, fontsize=9)
        if auto is None:
            ax.text(1.02, 0.0, f"no K up to {search.max_k} reaches\nthe threshold", transform=ax.transAxes,
                    fontsize=8, color="0.35", va="bottom", ha="left")
    return fig


def scores_figure(blocks: Sequence[str], scores: Sequence[float], *, title: str, quantity: str,
                  marked: Sequence[str] = (), mark_label: str = "chosen block") -> Figure:
    """A bar per block (positive red, negative blue); a block not measured (NaN or None) gets a
    hatched grey bar over the whole height, named by the legend's "not searched"; `marked` blocks
    are outlined and their tick labels bold."""
    values = np.array([np.nan if v is None else v for v in scores], dtype=float)  # [blocks]
    missing = np.isnan(values)
    finite = values[~missing]
    lo, hi = min(0.0, *finite), max(0.0, *finite)
    if hi - lo <= 0:
        lo, hi = -1.0, 1.0
    pad = 0.06 * (hi - lo)
    marked = set(marked)
    width = min(max(4.0 + 0.28 * len(blocks), 6.5), 24.0)
    with _style():
        fig = _figure(width, 4.2)
        ax = fig.add_subplot()
        ax.grid(axis="y", color="0.9", zorder=0)
        x = np.arange(len(blocks))
        shown = np.where(missing, 0.0, values)
        colors = [POSITIVE if v >= 0 else NEGATIVE for v in shown]
        edges = [MARK_COLOR if b in marked else "none" for b in blocks]
        ax.bar(x[~missing], shown[~missing], width=0.8, color=np.array(colors, dtype=object)[~missing],
               edgecolor=np.array(edges, dtype=object)[~missing], linewidth=1.8, zorder=3)
        for j in np.nonzero(missing)[0]:
            ax.add_patch(Rectangle((j - 0.4, lo - pad), 0.8, hi - lo + 2 * pad, zorder=2, **MISSING_STYLE))
        ax.axhline(0.0, color="0.3", linewidth=0.8, zorder=4)
        ax.set_xlim(-0.6, len(blocks) - 0.4)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(x, list(blocks), rotation=90, fontsize=8)
        for label in ax.get_xticklabels():
            if label.get_text() in marked:
                label.set_fontweight("bold")
        ax.set_xlabel("block")
        ax.set_ylabel(_wrap(quantity, 40), fontsize=9)
        ax.set_title(title, fontsize=12, loc="left")
        handles = [Patch(facecolor=POSITIVE, label="positive score"), Patch(facecolor=NEGATIVE, label="negative score")]
        if marked:
            handles.append(Patch(facecolor="none", edgecolor=MARK_COLOR, linewidth=1.8,
                                 label=f"{mark_label} (bold tick)"))
        if missing.any():
            handles.append(missing_patch())
        fig.legend(handles=handles, loc="outside lower left", frameon=False, fontsize=8, ncols=len(handles))
    return fig


def matrix_figure(values, rows: Sequence[str], columns: Sequence[str], *, title: str, quantity: str,
                  subtitle: str = "", row_axis: str = "block", col_axis: str = "step") -> Figure:
    """A rows x columns map of signed values (blue negative, white 0, red positive, symmetric
    around 0); a NaN cell was not measured: hatched grey, "not searched" in the legend."""
    data = np.asarray(values, dtype=float).reshape(len(rows), len(columns))  # [rows, columns]
    missing = np.isnan(data)
    top = float(np.abs(data[~missing]).max()) if (~missing).any() else 0.0
    top = top if top > 0 else 1.0
    row_chars = max((len(r) for r in rows), default=4)
    width = min(max(3.4 + 0.08 * row_chars + 0.22 * len(columns), 6.0), 20.0)
    height = min(max(2.0 + 0.2 * len(rows), 3.2), 16.0)
    with _style():
        fig = _figure(width, height)
        ax = fig.add_subplot()
        image = ax.imshow(data, cmap=MAP_CMAP, vmin=-top, vmax=top, aspect="auto", interpolation="nearest")
        for i, j in zip(*np.nonzero(missing)):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, zorder=2, **MISSING_STYLE))
        every = max(1, len(columns) // 25)  # at most ~25 column labels
        ax.set_xticks(range(0, len(columns), every), list(columns)[::every], fontsize=8)
        ax.set_yticks(range(len(rows)), list(rows), fontsize=7 if len(rows) > 30 else 8)
        ax.set_xlabel(col_axis)
        ax.set_ylabel(row_axis)
        ax.tick_params(length=2)
        bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
        bar.set_label(_wrap(quantity, 40), fontsize=9)
        bar.ax.tick_params(labelsize=8)
        if missing.any():
            fig.legend(handles=[missing_patch()], loc="outside lower left", frameon=False, fontsize=8)
        fig.suptitle(title, fontsize=12, x=0.02, ha="left")
        if subtitle:
            ax.set_title(_wrap(subtitle, int(width * 14)), fontsize=9, color="0.35", loc="left")
    return fig


__all__ = ["MISSING_LABEL", "matrix_figure", "scores_figure", "search_curve_figure"]
