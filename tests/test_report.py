"""`ditloc report`: the numbers behind the figures, and the page in a real headless browser."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from bench_helpers import reference_run, run_cli
from ditloc.bench import BenchRow, BenchRun
from ditloc.errors import DitlocError
from ditloc.report import build_report
from ditloc.report.data import Z95, k_for_drop, presence_curves, selection_frequency

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return reference_run(tmp_path_factory)


def _browser() -> str:
    """The headless browser's path. Without one the test is skipped, saying how to install it, unless
    DITLOC_REQUIRE_BROWSER=1 (set by .ci/run after installing Chromium): then it fails."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    message = ("Chromium is not installed, and this test renders the report in a real headless browser: "
               "install it with `apt-get install -y chromium` (Debian/Ubuntu), then rerun")
    if os.environ.get("DITLOC_REQUIRE_BROWSER") == "1":
        pytest.fail(message + " (DITLOC_REQUIRE_BROWSER=1 requires it)", pytrace=False)
    pytest.skip(message)


def _row(category, concept, control, k, i, seed, score) -> BenchRow:
    return BenchRow(unit=f"generate/{category}/{concept}/{control}/k{k}", category=category, concept=concept,
                    control=control, k=k, blocks=(), prompt_index=i, prompt="p", clean_prompt=None, seed=seed,
                    eval_text="t", score=score, image="x.png")


def test_k_for_drop_curves_and_selection_by_hand(tmp_path):
    scores = {("baseline", 0): [1.0, 0.8], ("top", 1): [0.7, 0.7], ("top", 2): [0.3, 0.4], ("random", 1): [0.9, 0.9],
              ("random", 2): [0.8, 0.9], ("bottom", 1): [1.0, 0.9], ("bottom", 2): [0.9, 0.8]}
    rows = [_row("style", "monet", control, k, i, 0, s) for (control, k), v in scores.items() for i, s in enumerate(v)]
    rows += [_row("style", "klimt", "baseline", 0, i, 0, 0.5) for i in range(2)]  # no top-K rows: no K reached
    rows += [_row("style", "klimt", "top", k, i, 0, 0.5) for k in (1, 2) for i in range(2)]
    record = {"settings": {"ks": [1, 2], "seeds": [0]}, "concepts": {"style": ["monet", "klimt"]}}
    blocks = ("block.0", "block.1", "block.2")
    rankings = {("style", "monet"): ("block.2", "block.0", "block.1"),
                ("style", "klimt"): ("block.2", "block.1", "block.0")}
    data = BenchRun(tmp_path, record, tuple(rows), blocks, rankings)

    mk = {m.concept: m for m in k_for_drop(data)}  # default: halved, the rule of --k auto
    assert mk["monet"].baseline == pytest.approx(0.9)
    assert mk["monet"].relative == pytest.approx({1: 0.7 / 0.9, 2: 0.35 / 0.9})
    assert mk["monet"].k == 2 and mk["klimt"].k is None  # drops 0.22 and 0.61 of the baseline; klimt none
    assert {m.concept: m.k for m in k_for_drop(data, drop=0.2)} == {"monet": 1, "klimt": None}
    with pytest.raises(DitlocError, match="--drop must be a fraction"):
        k_for_drop(data, drop=1.5)

    points = {(p.control, p.k): p for p in presence_curves(data)}
    top2 = points["top", 2]  # monet 0.3, 0.4 and klimt 0.5, 0.5
    values = np.array([0.3, 0.4, 0.5, 0.5])
    half = Z95 * values.std(ddof=1) / np.sqrt(4)
    assert top2.n == 4 and top2.mean == pytest.approx(values.mean())
    assert (top2.low, top2.high) == pytest.approx((values.mean() - half, values.mean() + half))
    assert points["baseline", 0].n == 4 and ("random", 2) in points

    assert selection_frequency(data, 1) == {"style": [0.0, 0.0, 1.0]}
    assert selection_frequency(data, 2) == {"style": [0.5, 0.5, 1.0]}


def test_report_renders_in_headless_chromium(run, tmp_path):
    browser = _browser()
    report = build_report(run, drop=0.5)
    out = run / "report"
    assert report.html == out / "index.html"
    names = sorted(p.name for p in report.figures)
    assert names == ["curves_color.png", "curves_place.png", "grid_color_red.png", "grid_place_beach.png",
                     "heatmap.png"]
    for path in report.figures:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] == 2 and summary["drop"] == 0.5 and {m["concept"] for m in summary["k_for_drop"]} == {"red", "beach"}

    page = report.html.read_text()
    assert page.count("<img ") == len(report.figures)
    assert page.count('src="data:image/png;base64,') == len(report.figures)
    sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert len(sources) == len(report.figures) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page and "<link" not in page

    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
           report.html.resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    html_tag = re.search(r"<html[^>]*>", dom)
    assert html_tag, f"the browser dumped no page: {dom[:300]!r}"
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', html_tag.group(0)))
    n = str(len(report.figures))
    assert (attrs.get("data-images-total"), attrs.get("data-images-loaded")) == (n, n), html_tag.group(0)
    assert attrs.get("data-report-status") == "ok", html_tag.group(0)
    assert "K for the drop" in dom and "Presence vs K" in dom


def test_report_cli(run, tmp_path):
    code, out, err = run_cli(["report", str(run), "--k", "1", "--drop", "0.1"])
    assert code == 0, err
    assert "K for the drop" in out and ">= 0.1 x baseline" in out and "red" in out and "beach" in out and "index.html" in out
    code, _, err = run_cli(["report", str(tmp_path)])
    assert code == 2 and err.count("\n") == 1 and "is not an output directory of ditloc" in err


def _damaged_copy(run, tmp_path, name):
    copy = tmp_path / name
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "report", ignore_errors=True)
    return copy


def test_torn_results_jsonl_is_rebuilt_from_the_stores(run, tmp_path):
    copy = _damaged_copy(run, tmp_path, "torn")
    data = (copy / "results.jsonl").read_bytes()
    (copy / "results.jsonl").write_bytes(data[: len(data) - 40])  # a last line cut short
    intact = _damaged_copy(run, tmp_path, "intact")
    code, _, err = run_cli(["report", str(copy)])
    assert code == 0, err
    assert run_cli(["report", str(intact)])[0] == 0
    got = json.loads((copy / "report" / "summary.json").read_text())
    want = json.loads((intact / "report" / "summary.json").read_text())
    assert got["curves"] == want["curves"] and got["curves"]  # the same numbers as from the intact run


@pytest.mark.parametrize("damage", ["bench.json", "localization", "results_and_stores"])
def test_damaged_run_files_are_one_line_errors(run, tmp_path, damage):
    copy = _damaged_copy(run, tmp_path, damage)
    if damage == "bench.json":
        text = (copy / "bench.json").read_text()
        (copy / "bench.json").write_text(text[: len(text) // 2])
    elif damage == "localization":
        loc = sorted((copy / "localizations").rglob("*.json"))[0]
        loc.write_text(loc.read_text()[:100])
    else:
        data = (copy / "results.jsonl").read_text()
        (copy / "results.jsonl").write_text(data[:-40])
        for store in copy.glob("results.rank*.jsonl"):
            store.unlink()
    code, _, err = run_cli(["report", str(copy)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "damaged" in lines[0] and "Traceback" not in err, err


# ---- the figures (matplotlib Figure objects, inspected before they are saved) ------------------
def _curve(mean_of, ks=(1, 2, 4, 8), band=0.02) -> list:
    from ditloc.report.data import CurvePoint

    points = [CurvePoint("c", "baseline", 0, 0.5, 0.5 - band, 0.5 + band, 8)]
    for control in ("top", "random", "bottom"):
        points += [CurvePoint("c", control, k, mean_of(control, k), mean_of(control, k) - band,
                              mean_of(control, k) + band, 8) for k in ks]
    return points


def _series(fig) -> dict:
    """label -> the Line2D of each series (the legend's entries), baseline excluded."""
    ax = fig.axes[0]
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_presence_axis_is_fixed_from_0_to_1():
    from ditloc.report.figures import presence_range

    assert presence_range([0.497, 0.5, 0.503]) == (0.0, 1.0)  # a 0.003 drop is drawn as small as it is
    assert presence_range([]) == (0.0, 1.0)
    assert presence_range([-0.05, 1.2]) == (-0.05, 1.2)  # widened only to show values outside [0, 1]


def test_presence_figure_has_the_same_0_to_1_axis_for_a_small_and_a_large_drop():
    """Top-K 0.003 below the controls, and 0.4 below: the same presence axis, covering 0-1
    (an axis fitted to the data drew the small drop as if it were large)."""
    from ditloc.report.figures import curves_figure

    small = curves_figure(_curve(lambda c, k: 0.497 if c == "top" else 0.5), [1, 2, 4, 8], title="t", y_label="p")
    large = curves_figure(_curve(lambda c, k: 0.1 if c == "top" else 0.5), [1, 2, 4, 8], title="t", y_label="p")
    lo, hi = small.axes[0].get_ylim()
    assert lo <= 0.0 and hi >= 1.0 and hi - lo < 1.2
    assert small.axes[0].get_ylim() == large.axes[0].get_ylim()
    assert small.axes[0].get_ylabel() == "p" and "K" in small.axes[0].get_xlabel()
    assert [t.get_text() for t in small.axes[0].get_xticklabels()] == ["0", "1", "2", "4", "8"]


def test_coinciding_series_each_stay_visible():
    """All three controls at one value: each has its own legend entry, a different marker and line
    style, a horizontal offset, and random-K is drawn over bottom-K; rendered, each colour shows."""
    from matplotlib.colors import to_rgb

    from ditloc.report.figures import COLORS, curves_figure

    fig = curves_figure(_curve(lambda c, k: 0.5), [1, 2, 4, 8], title="t", y_label="p")
    lines = _series(fig)
    names = {"top": "top-K withheld", "random": "random-K withheld", "bottom": "bottom-K withheld"}
    assert set(names.values()) <= set(lines)
    styles = {(lines[n].get_marker(), lines[n].get_linestyle()) for n in names.values()}
    assert len(styles) == 3
    xs = {c: tuple(lines[n].get_xdata()) for c, n in names.items()}
    assert len(set(xs.values())) == 3  # dodged: not drawn at the same x
    assert lines[names["random"]].get_zorder() > lines[names["bottom"]].get_zorder()
    legend = fig.axes[0].get_legend()
    assert legend is not None and {t.get_text() for t in legend.get_texts()} >= {*names.values(), "baseline (K = 0)"}
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    for control in names:
        target = np.array([round(255 * v) for v in to_rgb(COLORS[control])])
        assert (np.abs(pixels - target).sum(axis=-1) < 30).sum() > 50, control


def test_confidence_intervals_are_drawn_as_error_bars():
    from matplotlib.collections import LineCollection

    from ditloc.report.figures import curves_figure

    fig = curves_figure(_curve(lambda c, k: 0.5, band=0.1), [1, 2], title="t", y_label="p")
    bars = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    spans = sorted({round(float(abs(seg[1][1] - seg[0][1])), 6) for c in bars for seg in c.get_segments()})
    assert spans == [0.2]  # every interval: low 0.4 to high 0.6


def test_several_methods_each_get_their_own_lines():
    """Top-K of a second method is its own series, own colour (not merged into the first's line)."""
    from ditloc.report.data import CurvePoint
    from ditloc.report.figures import curves_figure

    points = [CurvePoint("c", "baseline", 0, 0.9, 0.88, 0.92, 8)]
    for method, level in (("contribution", 0.7), ("patch", 0.2)):
        for control, mean in (("top", level), ("bottom", 0.9)):
            points += [CurvePoint("c", control, k, mean, mean - 0.02, mean + 0.02, 8, method=method) for k in (1, 2)]
    points += [CurvePoint("c", "random", k, 0.85, 0.83, 0.87, 8) for k in (1, 2)]
    lines = _series(curves_figure(points, [1, 2], title="t", y_label="p"))
    first, second = lines["top-K withheld (contribution)"], lines["top-K withheld (patch)"]
    assert first.get_color() != second.get_color()
    assert list(first.get_ydata()) == [0.9, 0.7, 0.7] and list(second.get_ydata()) == [0.9, 0.2, 0.2]
    assert {"bottom-K withheld (contribution)", "bottom-K withheld (patch)", "random-K withheld"} <= set(lines)


def test_heatmap_names_its_axes_colour_bar_and_marks_the_top_k():
    from ditloc.report.figures import heatmap_figure, top_k_of

    blocks = [f"block.{i}" for i in range(6)]
    values = {"shape": [0.1, 0.9, 0.2, 0.8, 0.0, 0.3], "color": [0.5, 0.0, 0.0, 0.1, 0.7, 0.6]}
    marked = {row: top_k_of(v, blocks, 2) for row, v in values.items()}
    assert marked == {"shape": ["block.1", "block.3"], "color": ["block.4", "block.5"]}
    fig = heatmap_figure(values, blocks, title="Top-2", subtitle="s", quantity="attention contribution",
                         marked=marked, mark_label="top-2 blocks")
    ax, bar = fig.axes
    assert ax.get_xlabel() == "block" and ax.get_ylabel() == "category"
    assert bar.get_ylabel() == "attention contribution"
    assert fig.get_suptitle() == "Top-2"
    ticks = ax.get_xticklabels()
    assert [t.get_text() for t in ticks] == blocks
    assert sorted(t.get_text() for t in ticks if t.get_fontweight() == "bold") == [
        "block.1", "block.3", "block.4", "block.5"]
    outlines = {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in ax.patches}
    assert outlines == {(0, 1), (0, 3), (1, 4), (1, 5)}  # (row, block) of each outlined cell
    (legend,) = fig.legends
    assert "top-2 blocks" in legend.get_texts()[0].get_text()


def test_heatmap_draws_unmeasured_cells_as_not_searched():
    """A NaN (or None) cell was not measured: a hatched grey patch over it and a legend entry, not the
    white of a measured 0; top_k_of never marks it."""
    from ditloc.report.figures import MISSING_LABEL, heatmap_figure, top_k_of
    from ditloc.demo import _scaled

    blocks = ["block.0", "block.1", "block.2", "block.3"]
    values = {"a": [0.0, float("nan"), 0.5, None], "b": [0.2, 0.1, 0.0, 0.3]}
    assert top_k_of(values["a"], blocks, 3) == ["block.2"]
    fig = heatmap_figure(values, blocks, title="t", quantity="q")
    ax = fig.axes[0]
    hatched = {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in ax.patches if p.get_hatch()}
    assert hatched == {(0, 1), (0, 3)}  # (row, block): the measured 0 of block.0 is not hatched
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [MISSING_LABEL] == ["not searched"]
    assert not heatmap_figure({"b": values["b"]}, blocks, title="t", quantity="q").legends  # nothing missing
    scaled = _scaled([float("nan"), 1.0, 3.0, 2.0])  # the demo's per-row scaling keeps NaN
    assert np.isnan(scaled[0]) and scaled[1:] == [0.0, 1.0, 0.5]


def test_top_k_of_includes_ties_and_skips_zeros():
    from ditloc.report.figures import top_k_of

    blocks = ["a", "b", "c", "d"]
    assert top_k_of([0.5, 0.5, 0.2, 0.5], blocks, 2) == ["a", "b", "d"]
    assert top_k_of([0.0, 0.0, 0.3, 0.0], blocks, 2) == ["c"]
    assert top_k_of([0.1, 0.2, 0.3, 0.4], blocks, 9) == ["a", "b", "c", "d"]


def test_grid_labels_each_row_with_its_prompt_and_seed():
    from PIL import Image as PILImage

    from ditloc.report.figures import grid_figure

    images = [[PILImage.new("RGB", (32, 32), (255, 0, 0)), PILImage.new("RGB", (32, 32), (0, 0, 255))]
              for _ in range(2)]
    long_prompt = "a small red star with a striped pattern on the sunny beach near the blue sea at noon"
    fig = grid_figure(images, ["baseline", "top-2 withheld"], [f"p0: {long_prompt}\nseed 0", "p1: a cat\nseed 7"],
                      title="grid")
    axes = fig.axes
    assert len(axes) == 4
    assert [a.get_title() for a in axes[:2]] == ["baseline", "top-2 withheld"]
    first, second = axes[0].get_ylabel(), axes[2].get_ylabel()
    assert first.replace("\n", " ").startswith("p0: a small red star") and first.endswith("seed 0")
    assert max(len(line) for line in first.split("\n")) <= 30  # wrapped
    assert second == "p1: a cat\nseed 7"
    for ax in axes:
        (image,) = ax.get_images()
        assert image.get_interpolation() == "nearest" and image.get_array().shape[:2] == (128, 128)
        assert list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []


def test_saved_png_is_deterministic_and_undated(tmp_path):
    from ditloc.report.figures import curves_figure, save_figure

    paths = [save_figure(curves_figure(_curve(lambda c, k: 0.4), [1, 2], title="t", y_label="p"), tmp_path / f"{i}.png")
             for i in range(2)]
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1]
    assert b"tIME" not in data[0] and b"Software" not in data[0] and b"matplotlib" not in data[0]
    with Image.open(paths[0]) as im:
        assert im.format == "PNG" and 600 < im.width < 1400 and 300 < im.height < 800


# ---- `ditloc report` of a `ditloc localize` output directory ----------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from ditloc.testing import tiny_pixart_pipeline

    path = tmp_path_factory.mktemp("tiny_report") / "pixart"
    tiny_pixart_pipeline().save_pretrained(path)
    return str(path)


LOCALIZE = ["--prompt", "a photo of van gogh", "--prompt", "van gogh painting of a dog", "--steps", "2"]
#: the exhaustive greedy on 2 of the 4 blocks: the other two are not measured
PRUNED = ["--objective", "self", "--max-k", "2", "--candidates", "2", "--search-rank", "generation"]


def _no_model_loads(monkeypatch):
    from ditloc.cli import models

    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("the report loaded a model"))


def _figure_alts(page: str) -> list[str]:
    return re.findall(r'<img src="data:image/png;base64,[^"]*" alt="([^"]*)"', page)


def test_localize_report_of_a_pruned_search_with_images(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "loc"
    code, _, err = run_cli(["localize", tiny_model, "--concept", "van gogh", *LOCALIZE, *PRUNED, "--save-images", "2",
                            "--out", str(out)])
    assert code == 0, err
    d = json.loads((out / "localization.json").read_text())
    not_searched = [b for b, v in zip(d["blocks"], d["scores"]) if v is None]
    assert len(not_searched) == 2 and not set(not_searched) & set(d["settings"]["candidates"])
    shots = json.loads((out / "images.json").read_text())
    assert [sorted(e["images"]) for e in shots["samples"]] == [["1", "2", "original"]] * 2
    assert shots["sets"] == d["search"]["sets"] and shots["num_inference_steps"] == 2

    _no_model_loads(monkeypatch)
    code, stdout, err = run_cli(["report", str(out)])
    assert code == 0, err
    assert "'van gogh': 2 block(s) not searched; images of the searched sets" in stdout
    report = out / "report"
    assert sorted(p.name for p in report.glob("*.png")) == ["curve.png", "images.png", "scores.png"]
    for path in report.glob("*.png"):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 100
    page = (report / "index.html").read_text()
    assert _figure_alts(page) == ["search curve", "block scores", "searched sets withheld"]
    assert f"hatched grey: not searched (2 block(s): {', '.join(not_searched)})" in page
    cells = re.findall(r"<td class=\"\">([^<]*)</td><td class=\"num\">not searched</td>", page)
    assert cells == not_searched  # ranked after every measured block, in model order
    assert "Not measured per step" in page and "Not measured per head" in page
    for k, blocks in enumerate(d["search"]["sets"], 1):
        assert f"<td class=\"num\">{k}</td><td class=\"\">{', '.join(blocks)}</td>" in page


def test_localize_report_of_block_scores_has_step_and_head_maps(tiny_model, tmp_path):
    out = tmp_path / "contribution"
    code, _, err = run_cli(["localize", tiny_model, "--concept", "van gogh", *LOCALIZE, "--localize-method", "contribution",
                            "--out", str(out)])
    assert code == 0, err
    code, stdout, err = run_cli(["report", str(out)])
    assert code == 0, err
    assert "every block scored; no images saved" in stdout
    assert sorted(p.name for p in (out / "report").glob("*.png")) == ["heads.png", "scores.png", "steps.png"]
    page = (out / "report" / "index.html").read_text()
    assert _figure_alts(page) == ["block scores", "blocks x steps", "blocks x heads"]
    assert "not searched" not in page and "Images are not available" in page


def test_localize_report_of_a_concepts_file_run_has_a_section_per_concept(tiny_model, tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("van gogh\ndog\n")
    out = tmp_path / "many"
    code, _, err = run_cli(["localize", tiny_model, "--concepts-file", str(concepts), *LOCALIZE, *PRUNED,
                            "--max-k", "1", "--out", str(out)])
    assert code == 0, err
    code, stdout, err = run_cli(["report", str(out)])
    assert code == 0, err
    assert "'van gogh':" in stdout and "'dog':" in stdout and str(out / "report" / "index.html") in stdout
    page = (out / "report" / "index.html").read_text()
    headings = re.findall(r"<h2>([^<]*)</h2>", page)
    assert headings == ["&#x27;dog&#x27; (dog/)", "&#x27;van gogh&#x27; (van-gogh/)", "Settings"]
    assert _figure_alts(page) == ["search curve", "block scores"] * 2
    assert page.count("Images are not available: this localization saved none") == 2
    names = sorted(p.name for p in (out / "report").glob("*.png"))
    assert names == ["dog_curve.png", "dog_scores.png", "van-gogh_curve.png", "van-gogh_scores.png"]


def test_report_of_an_unknown_or_damaged_directory_is_one_line(tiny_model, tmp_path):
    for path in (tmp_path, tmp_path / "missing"):
        code, _, err = run_cli(["report", str(path)])
        assert code == 2 and err.count("\n") == 1 and "`ditloc report` reads the --out of `ditloc localize`" in err
    (tmp_path / "localization.json").write_text('{"concept": "x"')
    code, _, err = run_cli(["report", str(tmp_path)])
    assert code == 2 and err.count("\n") == 1 and "localization.json" in err and "rerun `ditloc localize`" in err
    code, _, err = run_cli(["localize", tiny_model, "--concept", "van gogh", *LOCALIZE, "--localize-method", "patch",
                            "--save-images", "1", "--out", str(tmp_path / "o")])
    assert code == 2 and err.count("\n") == 1 and "--save-images is a setting of --localize-method search" in err


def test_score_figures_draw_unmeasured_blocks_as_not_searched():
    from ditloc.localization import SetSearch
    from ditloc.report.score_figures import matrix_figure, scores_figure, search_curve_figure

    blocks = ["block.0", "block.1", "block.2", "block.3"]
    fig = scores_figure(blocks, [0.3, float("nan"), -0.1, 0.0], title="t", quantity="q", marked=["block.0"])
    ax = fig.axes[0]
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert [round(p.get_x() + p.get_width() / 2) for p in hatched] == [1]  # block.1 alone; the 0 of block.3 is a bar
    assert "not searched" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert [t.get_text() for t in ax.get_xticklabels() if t.get_fontweight() == "bold"] == ["block.0"]
    fig = matrix_figure([[0.1, float("nan")], [-0.2, 0.3]], blocks[:2], ["0", "1"], title="t", quantity="q")
    assert [(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in fig.axes[0].patches if p.get_hatch()] == [(0, 1)]
    search = SetSearch(objective="evaluator", baseline=0.8, sets=(("block.3",), ("block.3", "block.1")),
                       presence=(0.6, 0.3), evaluated=(((), 0.8), (("block.3",), 0.6), (("block.2",), 0.7),
                                                       (("block.1", "block.3"), 0.3)))  # evaluated: model order
    ax = search_curve_figure(search, threshold=0.5, title="t").axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["S_K withheld (the searched set)"].get_ydata()) == [0.8, 0.6, 0.3]
    assert list(lines["automatic K = 2"].get_xdata()) == [2]
    (others,) = ax.collections
    assert others.get_offsets().tolist() == [[1.0, 0.7]]  # the set the search did not keep, at its size
