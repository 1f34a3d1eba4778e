"""Report of a `ditloc ground-truth` directory: one self-contained HTML page.

Figures: a heat map of the presence drop when each single block is withheld
(concepts x blocks, the ground truth; the best single block outlined), and one
of each method's block scores scaled to [0, 1] per concept (its top block
outlined, so the rows can be compared with the ground truth by eye). Tables:
the search per concept, every method per concept, and the per-method summary
with 95% confidence intervals (`ditloc.bench.ground_truth.summary_tables`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .._io import write_atomic
from ..localization import none_to_nan
from ..bench.ground_truth import (
    SETTINGS_FILE,
    ranking,
    summarize_ground_truth,
    summary_tables,
)
from .figures import heatmap_figure, save_figure
from .html import Figure, render_page, table


@dataclass(frozen=True)
class GroundTruthReport:
    html: Path
    figures: tuple[Path, ...]
    summary: dict


def is_ground_truth_dir(path) -> bool:
    return (Path(path) / SETTINGS_FILE).is_file()


def _scaled(values: list[float]) -> list[float]:
    """Values scaled to [0, 1] by the row's largest (negatives shown as 0; NaN, not measured, kept)."""
    top = max((v for v in values if not math.isnan(v)), default=0.0)
    return [v if math.isnan(v) else max(v, 0.0) / top if top > 0 else 0.0 for v in values]


def build_ground_truth_report(run) -> GroundTruthReport:
    """Write RUN/report/ (index.html and PNG figures) for a ground-truth directory."""
    from ..bench.ground_truth import read_localizations

    run = Path(run)
    summary = summarize_ground_truth(run)  # also rewrites summary.json / summary.md
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    blocks = summary["blocks"]
    label = {(e["category"], e["concept"]): f"{e['category']}/{e['concept']}" for e in summary["concepts"]}
    figures = []
    drops = {label[e["category"], e["concept"]]: [max(0.0, min(1.0, d)) for d in e["oracle"]["single_drops"]]
             for e in summary["concepts"]}
    if drops:
        best = {label[e["category"], e["concept"]]: e["oracle"]["best_singles"] for e in summary["concepts"]}
        path = save_figure(heatmap_figure(
            drops, blocks, title="Ground truth: presence drop with one block withheld",
            subtitle="baseline presence - presence with the block withheld (oracle, held-out images)",
            quantity="presence drop (negative shown as 0)", marked=best, mark_label="best single block",
            row_axis="concept"), out / "drops.png")
        figures.append(Figure(path, "single-block drops", "cell: presence drop when the concept is withheld from "
                              "that block alone (negative drops shown as 0); outlined: the best single block(s)"))
    locs = read_localizations(run)
    for method in summary["methods"]:
        rows, top = {}, {}
        for key, name in label.items():
            rec = locs.get((*key, method))
            if rec is not None:
                # NaN: not measured
                scores = [float(none_to_nan(rec["scores"][rec["blocks"].index(b)])) for b in blocks]
                rows[name] = _scaled(scores)
                top[name] = [b for b in ranking(blocks, scores)[:1] if not math.isnan(scores[blocks.index(b)])]
        if rows:
            path = save_figure(heatmap_figure(
                rows, blocks, title=f"{method}: block scores, scaled per concept",
                subtitle="score / the concept's largest score (negative scores shown as 0)",
                quantity="score / the concept's largest", marked=top, mark_label=f"{method}'s top block",
                row_axis="concept"), out / f"scores_{method}.png")
            figures.append(Figure(path, f"{method} scores", "compare with the ground truth's drops above; "
                                  "outlined: the method's top block; hatched grey: not searched"))
    intro, tables = summary_tables(summary)
    sections = [("Ground truth and methods", intro, figures)]
    for heading, text, header, rows in tables:
        sections.append((heading, text, [table(header, [[(c, "") for c in r] for r in rows])]))
    if summary["incomplete"]:
        sections.append(("Incomplete", "Not in the tables yet; rerun the same `ditloc ground-truth` command to "
                         "finish.", [table(["concept", "missing"], [[(f"{i['category']}/{i['concept']}", ""),
                                                                    (i.get("missing", ""), "")]
                                                                   for i in summary["incomplete"]])]))
    s = summary["settings"]
    meta = (f"{len(summary['concepts'])} concept(s) · methods {', '.join(summary['methods'])} · "
            f"{s['n_images']} images per condition · {s['steps']} steps · blocks {len(blocks)}")
    page = render_page(title=f"ditloc ground truth: {run.name}", meta=meta, sections=sections,
                       settings={"settings": s, "definitions": summary["definitions"]})
    html_path = out / "index.html"
    write_atomic(html_path, page)
    return GroundTruthReport(html_path, tuple(f.path for f in figures), summary)
