"""`ditloc report`: the numbers behind the figures, and the page in a real headless browser."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from bench_helpers import reference_run, run_cli
from ditloc.bench import BenchRow, BenchRun
from ditloc.report import build_report
from ditloc.report.data import Z95, minimal_k, presence_curves, selection_frequency

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return reference_run(tmp_path_factory)


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed, and the report test renders the page in a real headless browser: "
                "install it with `apt-get install -y chromium` (Debian/Ubuntu), then rerun", pytrace=False)


def _row(category, concept, control, k, i, seed, score) -> BenchRow:
    return BenchRow(unit=f"generate/{category}/{concept}/{control}/k{k}", category=category, concept=concept,
                    control=control, k=k, blocks=(), prompt_index=i, prompt="p", clean_prompt=None, seed=seed,
                    eval_text="t", score=score, image="x.png")


def test_minimal_k_curves_and_selection_by_hand(tmp_path):
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

    mk = {m.concept: m for m in minimal_k(data, threshold=0.5)}
    assert mk["monet"].baseline == pytest.approx(0.9)
    assert mk["monet"].relative == pytest.approx({1: 0.7 / 0.9, 2: 0.35 / 0.9})
    assert mk["monet"].minimal_k == 2 and mk["klimt"].minimal_k is None
    assert {m.concept: m.minimal_k for m in minimal_k(data, threshold=0.8)} == {"monet": 1, "klimt": None}

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
    report = build_report(run, threshold=0.5)
    out = run / "report"
    assert report.html == out / "index.html"
    names = sorted(p.name for p in report.figures)
    assert names == ["curves_color.png", "curves_place.png", "grid_color_red.png", "grid_place_beach.png",
                     "heatmap.png"]
    for path in report.figures:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] == 2 and {m["concept"] for m in summary["minimal_k"]} == {"red", "beach"}

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
    assert "Minimal K" in dom and "Presence vs K" in dom


def test_report_cli(run, tmp_path):
    code, out, err = run_cli(["report", str(run), "--k", "1", "--threshold", "0.9"])
    assert code == 0, err
    assert "minimal K" in out and "red" in out and "beach" in out and "index.html" in out
    code, _, err = run_cli(["report", str(tmp_path)])
    assert code == 2 and err.count("\n") == 1 and "not a `ditloc bench` run directory" in err


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


# ---- the presence-vs-K figure -------------------------------------------------------------
def _curve(mean_of, ks=(1, 2, 4, 8), band=0.02) -> list:
    from ditloc.report.data import CurvePoint

    points = [CurvePoint("c", "baseline", 0, 0.5, 0.5 - band, 0.5 + band, 8)]
    for control in ("top", "random", "bottom"):
        points += [CurvePoint("c", control, k, mean_of(control, k), mean_of(control, k) - band,
                              mean_of(control, k) + band, 8) for k in ks]
    return points


def _plot_pixels(image: Image.Image, color) -> int:
    """Pixels of exactly `color` inside the plot frame (the legend, right of it, excluded)."""
    a = np.asarray(image.convert("RGB"))[48:390, 78:560]  # curves_figure's plot area
    return int((a == np.array(color, dtype=a.dtype)).all(axis=-1).sum())


def test_presence_axis_is_fixed_from_0_to_1():
    from ditloc.report.figures import presence_range

    assert presence_range([0.497, 0.5, 0.503]) == (0.0, 1.0)  # a 0.003 drop is drawn as small as it is
    assert presence_range([]) == (0.0, 1.0)
    assert presence_range([-0.05, 1.2]) == (-0.05, 1.2)  # widened only to show values outside [0, 1]


def test_presence_figure_draws_a_small_drop_small():
    """Top-K 0.003 below the controls: on a fixed 0-1 axis the lines are within a few pixels
    (an axis fitted to the data drew them apart, as if the drop were large)."""
    from ditloc.report.figures import COLORS, curves_figure

    img = curves_figure(_curve(lambda c, k: 0.497 if c == "top" else 0.5), [1, 2, 4, 8], title="t", y_label="p")
    a = np.asarray(img.convert("RGB"))[48:390, 78:560]
    rows = {c: np.nonzero((a == np.array(COLORS[c], dtype=a.dtype)).all(axis=-1).any(axis=1))[0]
            for c in ("top", "bottom")}
    assert abs(float(np.median(rows["top"])) - float(np.median(rows["bottom"]))) < 4


def test_random_k_stays_visible_where_it_coincides_with_bottom_k():
    from ditloc.report.figures import COLORS, curves_figure

    same = curves_figure(_curve(lambda c, k: 0.2 if c == "top" else 0.8), [1, 2, 4, 8], title="t", y_label="p")
    assert _plot_pixels(same, COLORS["random"]) > 300  # drawn over bottom-K, not hidden under it
    assert _plot_pixels(same, COLORS["bottom"]) > 300
    everything = curves_figure(_curve(lambda c, k: 0.5), [1, 2, 4, 8], title="t", y_label="p")  # all three coincide
    assert all(_plot_pixels(everything, COLORS[c]) > 150 for c in ("top", "random", "bottom"))


def test_several_methods_each_get_their_own_lines():
    """Top-K of a second method is drawn in its own colour (not merged into the first's line)."""
    from ditloc.report.data import CurvePoint
    from ditloc.report.figures import COLORS, METHOD_COLORS, curves_figure

    points = [CurvePoint("c", "baseline", 0, 0.9, 0.88, 0.92, 8)]
    for method, level in (("contribution", 0.7), ("patch", 0.2)):
        for control, mean in (("top", level), ("bottom", 0.9)):
            points += [CurvePoint("c", control, k, mean, mean - 0.02, mean + 0.02, 8, method=method) for k in (1, 2)]
    points += [CurvePoint("c", "random", k, 0.85, 0.83, 0.87, 8) for k in (1, 2)]
    img = curves_figure(points, [1, 2], title="t", y_label="p")
    a = np.asarray(img.convert("RGB"))
    plot = a[48:390, 78:560]

    def rows_of(color):
        return np.nonzero((plot == np.array(color, dtype=plot.dtype)).all(axis=-1).any(axis=1))[0]

    first, second = rows_of(COLORS["top"]), rows_of(METHOD_COLORS[0]["top"])
    assert len(first) and len(second)
    assert second.max() - first.max() > 100  # patch's top-K line ends far lower (presence 0.2 vs 0.7)
