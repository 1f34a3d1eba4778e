"""Report of a `ditloc localize` directory: one self-contained HTML page and its PNGs.

    from ditloc.report import build_localization_report
    report = build_localization_report("runs/loc")   # -> runs/loc/report/index.html, *.png

The directory holds one localization (``localization.json``) or, from ``ditloc localize
--concepts-file``, one per concept (``<concept>/localization.json``): the page has a
section per concept. Each section: the search's presence vs K (method search), the block
scores as bars (a block not measured is hatched grey, "not searched"), the blocks x steps
and blocks x heads maps where the localization measured them, and the searched sets'
images beside the original where ``ditloc localize --save-images N`` saved them. Nothing
is generated here and no model loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .._io import write_atomic
from ..bench import slugify
from ..errors import DitlocError
from ..localization import AUTO_K_DROP, Localization
from .figures import MISSING_LABEL, grid_figure, save_figure
from .html import Figure, render_page, table
from .score_figures import matrix_figure, scores_figure, search_curve_figure
from .search_images import read_search_images

LOCALIZATION_FILE = "localization.json"
#: what a block-score method's scores are
QUANTITIES = {"contribution": "attention contribution of the concept's tokens",
              "patch": "causal effect of withholding the block alone (patch)",
              "attribution": "first-order estimate of the causal effect (attribution)"}


@dataclass(frozen=True)
class LocalizationReport:
    html: Path
    figures: tuple[Path, ...]
    concepts: tuple[str, ...]
    not_searched: dict  # concept -> blocks not measured
    images: dict  # concept -> whether its searched sets' images are shown


def localization_dirs(path) -> list[Path]:
    """The localization directories under `path`: itself where it holds a localization.json,
    else its subdirectories that do (a --concepts-file run), in name order; [] for neither."""
    path = Path(path)
    if (path / LOCALIZATION_FILE).is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(d for d in path.iterdir() if d.is_dir() and (d / LOCALIZATION_FILE).is_file())


def is_localization_dir(path) -> bool:
    return bool(localization_dirs(path))


def _load(directory: Path) -> Localization:
    try:
        return Localization.load(directory / LOCALIZATION_FILE)
    except DitlocError as e:
        raise DitlocError(f"{directory / LOCALIZATION_FILE}: {e}; rerun `ditloc localize` into it") from None


def _quantity(loc: Localization) -> str:
    if loc.method == "search":
        how = loc.settings.get("scores")
        return how if how else "none: no block was scored on its own"
    return QUANTITIES.get(loc.method, loc.method)


def _chosen(loc: Localization) -> tuple[int, list[str]]:
    """The K the localization chose (its saved --k, else `--k auto`'s rule) and its blocks."""
    k = loc.settings.get("k") or loc.k_auto()
    k = max(1, min(int(k), len(loc.blocks)))
    return k, loc.top(k)


def _score_text(value: float) -> str:
    return MISSING_LABEL if math.isnan(value) else f"{value:.4g}"


def _search_items(loc: Localization, out: Path, prefix: str, title: str) -> tuple[list, list[Path]]:
    s = loc.search
    threshold = AUTO_K_DROP
    auto = s.k_for_drop(threshold)
    path = save_figure(search_curve_figure(s, threshold=threshold, title=f"{title}: presence vs K"),
                       out / f"{prefix}curve.png")
    cost = s.cost
    caption = (f"presence ({s.objective}) with the searched set S_K withheld, K = 0 the unedited generation; grey: "
               f"every other set evaluated; {cost.get('sets_evaluated', len(s.evaluated))} sets evaluated at "
               f"{cost.get('search_steps', '?')} steps")
    rows = [[(str(k), "num"), (", ".join(blocks), ""), (f"{p:.3f}", "num"), (f"{s.baseline - p:.3f}", "num"),
             (f"{r:.2f}", "num"), ("automatic K" if k == auto else "", "")]
            for k, (blocks, p, r) in enumerate(zip(s.sets, s.presence, s.relative_curve), 1)]
    sets = table(["K", "S_K (in the order the blocks entered)", "presence", "drop", "relative drop", ""], rows)
    note = "" if auto is not None else (f"<p>No K up to {s.max_k} brings presence to {1 - threshold:g} x the "
                                        "baseline.</p>")
    return ["<h3>Search: presence vs K</h3>", Figure(path, "search curve", caption), sets + note], [path]


def _images_items(loc: Localization, directory: Path, out: Path, prefix: str, title: str) -> tuple[list, list[Path]]:
    head = "<h3>Images: the searched sets withheld</h3>"
    if loc.search is None:
        return [head, "<p>Images are not available: only a search (--localize-method search) saves its sets' images.</p>"], []
    saved = read_search_images(directory)
    if saved is None:
        return [head, "<p>Images are not available: this localization saved none (rerun `ditloc localize` with "
                      "--save-images N to save the first N prompts' images).</p>"], []
    if saved.sets != loc.search.sets:
        return [head, "<p>Images are not available: the saved images show other sets than this search's (an "
                      "earlier run); rerun `ditloc localize` with --save-images N.</p>"], []
    ks = list(range(1, len(saved.sets) + 1))
    columns = ["original"] + [f"S_{k} withheld: {', '.join(saved.sets[k - 1])}" for k in ks]
    rows = []
    for _, _, files in saved.samples:
        row = []
        for key in ["original"] + [str(k) for k in ks]:
            with Image.open(files[key]) as im:
                row.append(im.convert("RGB"))
        rows.append(row)
    labels = [f"p{i}: {prompt}\nseed {seed}" for i, (prompt, seed, _) in enumerate(saved.samples)]
    path = save_figure(grid_figure(rows, columns, labels, title=f"{title}: original and searched sets withheld"),
                       out / f"{prefix}images.png")
    caption = f"each row one prompt and seed at {saved.steps} steps; each column withholds the concept from S_K"
    return [head, Figure(path, "searched sets withheld", caption)], [path]


def _concept_items(loc: Localization, directory: Path, out: Path, prefix: str) -> tuple[list, list[Path]]:
    """The HTML items (sub-headings, figures, tables, notes) of one localization, and its PNGs."""
    title = loc.concept
    items, paths = [], []
    if loc.search is not None:
        more, more_paths = _search_items(loc, out, prefix, title)
        items += more
        paths += more_paths

    k, chosen = _chosen(loc)
    scores = loc.scores.tolist()
    unmeasured = [b for b, v in zip(loc.blocks, scores) if math.isnan(v)]
    path = save_figure(scores_figure(loc.blocks, scores, title=f"{title}: block scores ({loc.method})",
                                     quantity=_quantity(loc), marked=chosen, mark_label=f"the K = {k} chosen"),
                       out / f"{prefix}scores.png")
    paths.append(path)
    caption = f"{_quantity(loc)}; outlined: the K = {k} blocks chosen ({', '.join(chosen)})"
    if unmeasured:
        caption += f"; hatched grey: {MISSING_LABEL} ({len(unmeasured)} block(s): {', '.join(unmeasured)})"
    ranked = table(["rank", "block", "score"], [[(str(r), "num"), (b, ""), (_score_text(scores[loc.blocks.index(b)]),
                                                                          "num")]
                                                for r, b in enumerate(loc.ranking, 1)])
    items += ["<h3>Block scores</h3>", Figure(path, "block scores", caption),
              "<details><summary>every block, ranked</summary>" + ranked + "</details>"]

    per_step = loc.per_step  # [blocks, steps]
    items.append("<h3>Blocks x steps</h3>")
    if per_step.shape[1] > 1:
        path = save_figure(matrix_figure(per_step.tolist(), loc.blocks, [str(t) for t in range(per_step.shape[1])],
                                         title=f"{title}: score per denoising step", quantity=_quantity(loc),
                                         subtitle="mean over prompts and seeds"), out / f"{prefix}steps.png")
        paths.append(path)
        items.append(Figure(path, "blocks x steps", "each block's score at each denoising step (0: the first)"))
    else:
        items.append("<p>Not measured per step: "
                     + ("a search scores each block once." if loc.method == "search" else "one step only.") + "</p>")

    per_head = loc.per_head  # [blocks, heads]
    items.append("<h3>Blocks x heads</h3>")
    if per_head.shape[1] > 0:
        path = save_figure(matrix_figure(per_head.tolist(), loc.blocks, [str(h) for h in range(per_head.shape[1])],
                                         title=f"{title}: score per attention head", quantity=_quantity(loc),
                                         subtitle="mean over steps, prompts and seeds", col_axis="head"),
                           out / f"{prefix}heads.png")
        paths.append(path)
        items.append(Figure(path, "blocks x heads", "each block's score split by attention head"))
    else:
        items.append("<p>Not measured per head: only the contribution method splits its scores by head.</p>")

    more, more_paths = _images_items(loc, directory, out, prefix, title)
    return items + more, paths + more_paths


def _summary(loc: Localization) -> str:
    k, chosen = _chosen(loc)
    s = loc.settings
    n = sum(1 for v in loc.scores.tolist() if math.isnan(v))
    text = (f"method {loc.method} · {len(s.get('prompts', []))} prompt(s) x {len(s.get('seeds', []))} seed(s) · "
            f"{s.get('num_inference_steps', '?')} steps · K = {k}: {', '.join(chosen)}")
    return text + (f" · {n} of {len(loc.blocks)} blocks {MISSING_LABEL}" if n else "")


def build_localization_report(run) -> LocalizationReport:
    """Write RUN/report/ (index.html and PNG figures) for a `ditloc localize` output directory."""
    run = Path(run)
    dirs = localization_dirs(run)
    if not dirs:
        raise DitlocError(f"{run} holds no {LOCALIZATION_FILE}; pass the --out of `ditloc localize`")
    locs = [(d, _load(d)) for d in dirs]
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    several = len(locs) > 1 or dirs[0] != run
    sections, paths, not_searched, images = [], [], {}, {}
    for d, loc in locs:
        prefix = f"{slugify(d.name)}_" if several else ""
        items, figure_paths = _concept_items(loc, d, out, prefix)
        sections.append((f"{loc.concept!r}" + (f" ({d.name}/)" if several else ""), _summary(loc), items))
        paths += figure_paths
        not_searched[loc.concept] = [b for b, v in zip(loc.blocks, loc.scores.tolist()) if math.isnan(v)]
        images[loc.concept] = any(p.name == f"{prefix}images.png" for p in figure_paths)
    first = locs[0][1].settings.get("model", {})
    model = first.get("name_or_path", "?") if isinstance(first, dict) else str(first)
    meta = f"model {model} · {len(locs)} concept(s): {', '.join(repr(loc.concept) for _, loc in locs)}"
    settings = {loc.concept: {**loc.settings, **({"search_cost": loc.search.cost} if loc.search else {})}
                for _, loc in locs}
    title = f"ditloc localization report: {run.resolve().name}"
    page = render_page(title=title, meta=meta, sections=sections, settings=settings)
    html_path = write_atomic(out / "index.html", page)
    return LocalizationReport(html_path, tuple(paths), tuple(loc.concept for _, loc in locs), not_searched, images)
