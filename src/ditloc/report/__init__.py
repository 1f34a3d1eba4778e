"""Reports: PNG figures and one self-contained HTML page of a `ditloc bench` run (here), a
`ditloc ground-truth` directory (`ditloc.report.ground_truth`) or a `ditloc localize` output
directory (`ditloc.report.localization`); `run_kind` tells them apart by their files.

    from ditloc.report import build_report
    report = build_report("runs/bench")      # -> runs/bench/report/index.html, *.png, summary.json

Figures: a heat map of how often each block is in a concept's top-K, per
category (categories x blocks); presence-vs-K curves per category (top-K,
random-K, bottom-K, 95% confidence intervals by the normal approximation); image
grids per concept (baseline, then top-K withheld for each K). A table gives
each concept's K for a presence drop (default: halved). Definitions: `ditloc.report.data`.
"""

from __future__ import annotations

from .._io import write_atomic, write_json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..bench import BASELINE, BenchRun, read_run, slugify
from ..bench import SETTINGS_FILE as BENCH_FILE
from ..bench.ground_truth import SETTINGS_FILE as GROUND_TRUTH_FILE
from ..errors import DitlocError
from ..localization import AUTO_K_DROP
from .data import ConceptK, CurvePoint, k_for_drop, presence_curves, selection_frequency
from .figures import curves_figure, grid_figure, heatmap_figure, save_figure, top_k_of
from .html import Figure, render_page, table
from .localization import LOCALIZATION_FILE, LocalizationReport, build_localization_report, is_localization_dir

#: the output directories `ditloc report` reads, by the command that wrote them
RUN_KINDS = ("bench", "ground-truth", "localize")


def run_kind(path) -> str | None:
    """What wrote the directory, by its files: "bench" (bench.json), "ground-truth" (ground_truth.json),
    "localize" (localization.json, or one per concept in its subdirectories); None: none of them."""
    path = Path(path)
    if (path / BENCH_FILE).is_file():
        return "bench"
    if (path / GROUND_TRUTH_FILE).is_file():
        return "ground-truth"
    if is_localization_dir(path):
        return "localize"
    return None


def unknown_run_message(path) -> str:
    """The one line for a directory `run_kind` does not know."""
    what = "does not exist" if not Path(path).exists() else "is not an output directory of ditloc"
    return (f"{path} {what}: `ditloc report` reads the --out of `ditloc localize` ({LOCALIZATION_FILE}), "
            f"`ditloc bench` ({BENCH_FILE}) or `ditloc ground-truth` ({GROUND_TRUTH_FILE})")

CI_METHOD = "normal approximation: mean ± 1.96 s / sqrt(n) over every image (concept x prompt x seed)"


@dataclass(frozen=True)
class Report:
    html: Path
    figures: tuple[Path, ...]
    k: int  # of the heat map
    drop: float  # of the K-for-a-drop table
    curves: tuple[CurvePoint, ...]
    selection: dict  # category -> [blocks] fraction
    k_for_drop: tuple[ConceptK, ...]

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "drop": self.drop,
            "ci": CI_METHOD,
            "curves": [p.to_dict() for p in self.curves],
            "selection": self.selection,
            "k_for_drop": [m.to_dict() for m in self.k_for_drop],
        }


def _method_name(data: BenchRun) -> str:
    """The localization method of the heat map and grids (a bench run's first)."""
    method = data.methods[0]
    if method != "contribution":
        return method
    return f"attention contribution, {data.settings.get('contribution_terms', 'attn_value_out')}"


def _grid_samples(data: BenchRun, category: str, concept: str, n: int) -> list[tuple[int, int]]:
    """(prompt index, seed) of the grid's rows: distinct prompts first (first seed), then more seeds."""
    seeds = list(data.settings["seeds"])
    base = sorted({(r.prompt_index, r.seed) for r in data.rows
                   if r.category == category and r.concept == concept and r.control == BASELINE},
                  key=lambda ps: (seeds.index(ps[1]) if ps[1] in seeds else len(seeds), ps[0]))
    return base[:n]


def _load_image(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _grids(data: BenchRun, out: Path, n: int) -> list[Figure]:
    """One grid per concept: rows = (prompt, seed) samples, columns = baseline then top-K withheld per K."""
    images = {(r.category, r.concept, r.control, r.k, r.prompt_index, r.seed): r for r in data.rows
              if r.ranked_by in ("", data.methods[0])}  # the first method's top-K
    missing = Image.new("RGB", (32, 32), (240, 240, 240))  # a unit not finished yet
    figures = []
    for category, concepts in data.record["concepts"].items():
        for concept in concepts:
            samples = _grid_samples(data, category, concept, n)
            if not samples:
                continue
            ks = [k for k in data.ks if any((category, concept, "top", k, p, s) in images for p, s in samples)]
            columns = [(BASELINE, 0, "baseline")] + [("top", k, f"top-{k} withheld") for k in ks]
            rows = [[_load_image(data.path / images[key].image) if key in images else missing
                     for key in ((category, concept, control, k, p, s) for control, k, _ in columns)]
                    for p, s in samples]
            baseline = [images[(category, concept, BASELINE, 0, p, s)] for p, s in samples]
            prompts = tuple(dict.fromkeys(f"p{r.prompt_index}: {r.prompt}" for r in baseline))
            fig = grid_figure(rows, [c[2] for c in columns],
                              [f"p{r.prompt_index}: {r.prompt}\nseed {r.seed}" for r in baseline],
                              title=f"{category} / {concept}: baseline and top-K withheld")
            path = save_figure(fig, out / f"grid_{slugify(category)}_{slugify(concept)}.png")
            figures.append(Figure(path, f"{category} / {concept}",
                                  f"rows: prompt p and its seed; withheld blocks from the concept's localization; "
                                  f"evaluation text {baseline[0].eval_text!r}", prompts))
    return figures


def build_report(run, *, k: int | None = None, drop: float = AUTO_K_DROP, grid_samples: int = 4) -> Report:
    """Write RUN/report/ (index.html, PNG figures, summary.json) for a bench run, finished or partial."""
    if grid_samples < 1:
        raise DitlocError(f"grid samples must be at least 1, got {grid_samples}")
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 < drop <= 1:
        raise DitlocError(f"--drop must be a fraction of the baseline in (0, 1], got {drop!r}")
    data = read_run(run)
    out = data.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    k = k if k is not None else min(max(data.ks), len(data.blocks) or max(data.ks))
    settings = data.settings

    selection = selection_frequency(data, k)
    heat_path = out / "heatmap.png"
    subtitle = f"fraction of each category's concepts whose top-{k} blocks include the block"
    marked = {category: top_k_of(row, data.blocks, k) for category, row in selection.items()}
    save_figure(heatmap_figure(selection, data.blocks, title=f"Top-{k} selection frequency", subtitle=subtitle,
                               quantity=f"fraction of concepts with the block in their top-{k}", marked=marked,
                               mark_label=f"the category's {k} most often selected blocks"), heat_path)
    heat = Figure(heat_path, f"top-{k} selection frequency",
                  f"cell: fraction of the category's concepts whose top-{k} blocks ({_method_name(data)}) "
                  f"include the block; outlined: the category's {k} most often selected blocks (ties included)")

    curves = presence_curves(data)
    curve_figures = []
    for category in data.categories:
        pts = [p for p in curves if p.category == category]
        if not pts:
            continue
        n_concepts = len(data.record["concepts"][category])
        path = out / f"curves_{slugify(category)}.png"
        save_figure(curves_figure(pts, data.ks, title=f"{category}: presence vs K ({n_concepts} concept(s))",
                                  y_label=f"presence ({settings['evaluator']})"), path)
        curve_figures.append(Figure(path, f"{category}: presence vs K",
                                    f"mean presence; error bars: 95% CI, {CI_METHOD}"))

    minimal = k_for_drop(data, drop)
    several = len(data.methods) > 1
    header = (["category", "concept"] + (["method"] if several else []) + ["baseline"]
              + [f"top-{k_} / baseline" for k_ in data.ks] + [f"K (drop >= {drop:g})"])
    rows = []
    for m in minimal:
        cells = [(m.category, ""), (m.concept, "")] + ([(m.method, "")] if several else [])
        cells += [(f"{m.baseline:.4g}", "num")]
        cells += [(f"{m.relative[k_]:.3f}" if m.relative.get(k_) is not None else "–", "num") for k_ in data.ks]
        cells.append((str(m.k) if m.k is not None else "none", "num" if m.k else "none"))
        rows.append(cells)
    minimal_table = table(header, rows)

    grids = _grids(data, out, grid_samples)
    n_done = len({r.unit for r in data.rows})
    state = "complete" if data.complete else f"partial: {n_done} of {data.n_generation_units} generation units"
    meta = (f"model {settings['model']} · probes {settings['probes']} · evaluator {settings['evaluator']} · "
            f"K {', '.join(map(str, data.ks))} · seeds {', '.join(map(str, settings['seeds']))} · "
            f"{settings['steps']} steps · {len(data.rows)} images scored · {state}")
    sections = [
        ("Where the concepts are localized", "", [heat]),
        ("Presence vs K", "Withholding a concept from its top-K blocks should remove it at small K; random-K "
         "and bottom-K withholding should not. K = 0 is the unmodified generation.", curve_figures),
        ("K for the drop", f"The smallest K whose top-K withholding lowers the concept's mean presence by at "
         f"least {drop:g} x its baseline mean presence; 'none' if no K tested does.", [minimal_table]),
        ("Image grids", "Baseline and top-K withheld, same prompt and seed per row.", grids),
    ]
    page = render_page(title=f"ditloc bench report: {data.path.name}", meta=meta, sections=sections,
                       settings=data.record)
    html_path = out / "index.html"
    write_atomic(html_path, page)
    report = Report(html_path, tuple([heat.path] + [f.path for f in curve_figures] + [g.path for g in grids]),
                    k, float(drop), tuple(curves), selection, tuple(minimal))
    write_json(out / "summary.json", report.to_dict())
    return report


__all__ = ["CI_METHOD", "RUN_KINDS", "LocalizationReport", "Report", "build_localization_report", "build_report",
           "k_for_drop", "presence_curves", "run_kind", "selection_frequency", "unknown_run_message"]
