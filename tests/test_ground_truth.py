"""The ground-truth benchmark: its metrics on synthetic presences, and
one tiny end-to-end run on the toy model (4 blocks, 2 steps, 2 images)."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch

from bench_helpers import run_cli
from ditloc.bench import ground_truth as gt
from ditloc.bench.ground_truth import run as gt_run
from ditloc.bench.ground_truth import (GroundTruthSettings, greedy_sets, method_metrics,
                                       oracle_result, paired_regrets, run_ground_truth, samples, spearman,
                                       summarize_ground_truth, summarize_methods)
from ditloc.errors import DitlocError
from ditloc.localization import Localization

BLOCKS = ("b0", "b1", "b2", "b3", "b4")


def synthetic(baseline=1.0, single=None, pair_bonus=None, extra=None) -> dict:
    """Presence of every condition up to size 5: baseline minus the blocks' additive
    effects, plus an interaction for listed pairs (and `extra` overrides)."""
    single = single or {"b0": 0.05, "b1": 0.40, "b2": 0.30, "b3": 0.10, "b4": 0.0}
    pair_bonus = pair_bonus or {}
    presence = {}
    for k in range(len(BLOCKS) + 1):
        for s in itertools.combinations(BLOCKS, k):
            drop = sum(single[b] for b in s) + sum(v for p, v in pair_bonus.items() if set(p) <= set(s))
            presence[frozenset(s)] = baseline - drop
    presence.update(extra or {})
    return presence


def scores_for(order: list[str]) -> list[float]:
    """Scores that rank BLOCKS as `order` (best first)."""
    return [float(len(order) - order.index(b)) for b in BLOCKS]


# --------------------------------------------------------------------------
# Metrics on synthetic data
# --------------------------------------------------------------------------


def test_oracle_search_and_minimal_k():
    presence = synthetic(pair_bonus={("b0", "b3"): 0.6})  # b0+b3 together drop 0.75: the best pair
    o = oracle_result(presence, BLOCKS)
    assert o.best_singles == ("b1",) and o.best_single_drop == pytest.approx(0.4)
    assert o.best_pair == ("b0", "b3") and o.best_pair_drop == pytest.approx(0.75)
    # greedy: b1 first, then b1 + b2 (0.70, the best pair *containing b1*), then + b3 (0.80), then + b0
    assert o.greedy == (("b1",), ("b1", "b2"), ("b1", "b2", "b3"), ("b0", "b1", "b2", "b3"))
    assert o.greedy_drops == pytest.approx((0.4, 0.7, 0.8, 1.45))
    assert o.minimal_k == 2
    assert oracle_result(presence, BLOCKS, threshold=0.28).minimal_k == 2  # the exhaustive pair (0.25), not greedy's (0.30)
    assert oracle_result(presence, BLOCKS, threshold=0.22).minimal_k == 3  # greedy 3: 0.20
    weak = synthetic(single={b: 0.01 for b in BLOCKS})
    assert oracle_result(weak, BLOCKS).minimal_k is None  # > 4
    assert oracle_result(synthetic(baseline=0.0), BLOCKS).minimal_k is None  # no positive baseline


def test_method_metrics_hit_regret_rank_pair():
    presence = synthetic(pair_bonus={("b0", "b3"): 0.6})
    good = method_metrics("m", presence, BLOCKS, scores_for(["b1", "b2", "b3", "b0", "b4"]), auto_k=2)
    assert good.top == ("b1", "b2", "b3", "b0") and good.top_drops == pytest.approx((0.4, 0.7, 0.8, 1.45))
    assert good.hit_at_1 and good.regret[1] == pytest.approx(0.0)
    assert good.regret[2] == pytest.approx(0.05)  # best pair b0+b3 (0.75) against its b1+b2 (0.70)
    assert good.regret[4] == pytest.approx(0.0)  # its top-4 is the greedy set
    assert good.pair_rank == 2 and good.n_pairs == 10
    assert good.k_match is True and good.k_diff == 0 and good.oracle_k == 2
    wrong = method_metrics("m", presence, BLOCKS, scores_for(["b4", "b0", "b3", "b2", "b1"]), auto_k=4)
    assert not wrong.hit_at_1
    assert wrong.regret[1] == pytest.approx(0.40)  # best 0.4 against b4's 0.0
    assert wrong.regret[2] == pytest.approx(0.75 - 0.05)  # its pair b4+b0
    assert wrong.regret[4] == pytest.approx(1.45 - 1.05)  # its top-4 b4, b0, b3, b2
    assert wrong.pair_rank == 10  # b0+b4 (0.05) is the worst of the 10 pairs
    assert wrong.spearman < 0 < good.spearman
    assert wrong.k_match is False and wrong.k_diff == 2


def test_hit_at_1_counts_ties():
    presence = synthetic(single={"b0": 0.3, "b1": 0.3 + 5e-10, "b2": 0.1, "b3": 0.0, "b4": 0.0})
    o = oracle_result(presence, BLOCKS)
    assert set(o.best_singles) == {"b0", "b1"}
    m = method_metrics("m", presence, BLOCKS, scores_for(["b0", "b1", "b2", "b3", "b4"]), auto_k=1, oracle=o)
    assert m.hit_at_1 and m.regret[1] == pytest.approx(0.0, abs=1e-9)


def test_spearman_average_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # constant side
    # ties: average ranks [1.5, 1.5, 3, 4] against [1, 2, 3, 4]; Pearson of the ranks
    x, y = np.array([1.5, 1.5, 3, 4]), np.array([1, 2, 3, 4.0])
    expected = np.corrcoef(x, y)[0, 1]
    assert spearman([5, 5, 7, 9], [1, 2, 3, 4]) == pytest.approx(expected)


def test_paired_regrets_pair_each_method_with_the_reference_on_the_same_concepts():
    def entry(**regrets):  # method -> (regret@1, regret@2, regret@4), or None: not measured
        return {"methods": {m: None if r is None else {"regret": dict(zip(("1", "2", "4"), r))}
                            for m, r in regrets.items()}}

    concepts = [entry(search=(0.0, 0.1, 0.2), patch=(0.0, 0.3, 0.5)),
                entry(search=(0.0, 0.0, 0.1), patch=(0.0, 0.2, 0.3)),
                entry(search=(0.2, 0.4, 0.4), patch=(0.1, 0.4, 0.4)),
                entry(search=None, patch=(0.9, 0.9, 0.9))]  # the reference is missing: not paired
    p = paired_regrets(concepts, "search")
    assert set(p) == {"patch"}
    r2, r4, r1 = p["patch"]["regret_2"], p["patch"]["regret_4"], p["patch"]["regret_1"]
    assert r2["n"] == 3 and r2["mean"] == pytest.approx(0.4 / 3)
    half = 1.959964 * np.std([0.2, 0.2, 0.0], ddof=1) / np.sqrt(3)
    assert r2["low"] == pytest.approx(0.4 / 3 - half) and r2["high"] == pytest.approx(0.4 / 3 + half)
    assert (r2["worse"], r2["better"]) == (2, 0)  # the third concept ties
    assert r4["mean"] == pytest.approx(0.5 / 3) and (r4["worse"], r4["better"]) == (2, 0)
    assert (r1["worse"], r1["better"]) == (0, 1) and r1["mean"] == pytest.approx(-0.1 / 3)


def test_greedy_stops_where_data_ends():
    presence = synthetic()
    partial = {s: v for s, v in presence.items() if len(s) <= 2}
    assert len(greedy_sets(partial, BLOCKS, 4)) == 2
    with pytest.raises(DitlocError, match="incomplete"):
        oracle_result(partial, BLOCKS)
    without_top3 = {s: v for s, v in presence.items() if s != frozenset({"b0", "b3", "b4"})}  # not a greedy set
    with pytest.raises(DitlocError, match="top-3 set b0, b3, b4"):
        method_metrics("m", without_top3, BLOCKS, scores_for(["b4", "b3", "b0", "b1", "b2"]), auto_k=1)


def test_summary_over_concepts():
    strong = synthetic(pair_bonus={("b0", "b3"): 0.6})
    weak = synthetic(single={"b0": 0.1, "b1": 0.0, "b2": 0.0, "b3": 0.0, "b4": 0.0})
    rows = []
    for presence, order, k in ((strong, ["b1", "b2", "b3", "b0", "b4"], 2), (weak, ["b4", "b0", "b1", "b2", "b3"], 3)):
        o = oracle_result(presence, BLOCKS)
        rows.append((o, method_metrics("m", presence, BLOCKS, scores_for(order), auto_k=k, oracle=o)))
    s = summarize_methods(rows)["m"]
    assert s["concepts"] == 2
    # only the strong concept (best drop >= 0.3) counts; 1 of 1: Wilson 95% interval [0.207, 1]
    assert s["hit_at_1"]["rate"] == 1.0 and s["hit_at_1"]["n"] == 1
    assert s["hit_at_1"]["low"] == pytest.approx(0.2065, abs=1e-4) and s["hit_at_1"]["high"] == 1.0
    assert s["regret_1"]["n"] == 2 and s["regret_1"]["mean"] == pytest.approx((0.0 + 0.1) / 2)
    half = 1.959964 * np.std([0.0, 0.1], ddof=1) / np.sqrt(2)
    assert s["regret_1"]["low"] == pytest.approx(0.05 - half) and s["regret_1"]["high"] == pytest.approx(0.05 + half)
    assert s["auto_k_match"]["rate"] == 1.0 and s["auto_k_match"]["n"] == 1  # the weak concept's oracle K is > 4
    assert s["auto_k_miss"]["mean_abs"] == 0.0 and s["auto_k_miss"]["n"] == 1


def test_samples_fill_with_seeds():
    assert samples(15, 32) == [(p, s) for p in range(15) for s in (0, 1)] + [(0, 2), (1, 2)]
    assert samples(15, 4) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert len(set(samples(15, 32))) == 32


def test_sample_calls_generate_the_samples_in_their_order():
    (c,) = gt.plan_ground_truth(GroundTruthSettings(concepts=("triangle",)))
    for n in (32, 15, 4):
        made = [(c.evaluation_prompts.index(p), seed) for plan, seeds in gt.sample_calls(c, n)
                for p in plan.evaluation_prompts for seed in seeds]  # prompt-major within each call
        assert made == samples(len(c.evaluation_prompts), n)
        for plan, _ in gt.sample_calls(c, n):
            assert plan.clean_prompts == c.clean_prompts[:len(plan.evaluation_prompts)]


def test_settings_validated():
    with pytest.raises(DitlocError, match="unknown method 'nope'"):
        GroundTruthSettings(methods=("nope",))
    with pytest.raises(DitlocError, match="n-images"):
        GroundTruthSettings(n_images=0)
    with pytest.raises(DitlocError, match="no concept 'unicorn'"):
        gt.plan_ground_truth(GroundTruthSettings(concepts=("unicorn",), methods=("contribution",)))
    with pytest.raises(DitlocError, match="no concept 'red' of the categories shape"):
        gt.plan_ground_truth(GroundTruthSettings(categories=("shape",), concepts=("red",), methods=("contribution",)))
    with pytest.raises(DitlocError, match="unknown category 'animal'"):
        gt.plan_ground_truth(GroundTruthSettings(categories=("animal",), methods=("contribution",)))
    plan = gt.plan_ground_truth(GroundTruthSettings(methods=("contribution",)))
    assert len(plan) == 28


# --------------------------------------------------------------------------
# End to end on the toy model
# --------------------------------------------------------------------------

TINY = dict(concepts=("triangle",), methods=("contribution", "patch", "attribution"), steps=2, n_images=2,
            blocks=("block.0", "block.1", "block.2", "block.3"))


@pytest.fixture(scope="module")
def toy_pipe():
    import torch

    import ditloc

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in every run of this module
    pipe = ditloc.toy.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_run(toy_pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("gt") / "run"
    result = run_ground_truth(toy_pipe, out, GroundTruthSettings(**TINY))
    return out, result


def test_run_writes_every_condition_once(tiny_run):
    out, result = tiny_run
    lines = [json.loads(line) for line in (out / gt.STORE_FILE).read_text().splitlines()]
    conditions = [frozenset(r["blocks"]) for r in lines]
    assert len(conditions) == len(set(conditions)) == result.conditions_run
    blocks = TINY["blocks"]
    singles_pairs = {frozenset(s) for k in (0, 1, 2) for s in itertools.combinations(blocks, k)}
    assert singles_pairs <= set(conditions)  # baseline, 4 singles, 6 pairs
    assert frozenset(blocks) in set(conditions)  # greedy 4 (all four)
    assert 2 <= sum(len(s) == 3 for s in conditions) <= 2 + len(TINY["methods"])  # greedy triples + methods' top-3
    for r in lines:
        assert r["category"] == "shape" and r["concept"] == "triangle" and len(r["scores"]) == 2
        assert r["presence"] == pytest.approx(np.mean(r["scores"]))
    record = json.loads((out / gt.SETTINGS_FILE).read_text())
    assert record["settings"]["steps"] == 2 and record["blocks"] == list(blocks)
    assert record["concepts"][0]["samples"] == [[0, 0], [1, 0]]
    assert record["model"]["pipeline"] == "PixArtAlphaPipeline"
    assert record["joint"] is False and not (out / gt.joint.JOINT_FILE).exists()  # no pooled text vector
    for method in TINY["methods"]:
        assert (out / "localizations" / "shape" / f"triangle.{method}.json").is_file()
    assert result.localizations_run == len(TINY["methods"])
    locs = [json.loads(line) for line in (out / gt.LOCALIZATIONS_FILE).read_text().splitlines()]
    assert [loc["method"] for loc in locs] == list(TINY["methods"])
    for loc in locs:
        assert len(loc["scores"]) == 12 and 1 <= loc["auto_k"] <= 12
    patch = Localization.load(out / "localizations" / "shape" / "triangle.patch.json")
    assert patch.method == "patch" and "triangle" not in " ".join(patch.settings["clean_prompts"])


def test_summary_files(tiny_run):
    out, result = tiny_run
    summary = json.loads((out / gt.SUMMARY_JSON).read_text())
    assert summary == json.loads(json.dumps(result.summary))
    (concept,) = summary["concepts"]
    m = concept["methods"]["contribution"]
    assert set(m["regret"]) == {"1", "2", "4"} and m["n_pairs"] == 6 and 1 <= m["pair_rank"] <= 6
    assert summary["summary"]["contribution"]["regret_1"]["n"] == 1 and not summary["incomplete"]
    md = (out / gt.SUMMARY_MD).read_text()
    assert "| shape | triangle | contribution |" in md and "## Per method" in md
    before = (out / gt.SUMMARY_JSON).read_text()
    (out / gt.SUMMARY_JSON).unlink()
    (out / gt.SUMMARY_MD).unlink()
    code, stdout, err = run_cli(["ground-truth", "--out", str(out), "--report-only"])  # no model
    assert code == 0, err
    assert (out / gt.SUMMARY_JSON).read_text() == before and "summary.md" in stdout
    import shutil

    copy = out.parent / "committed"  # what is committed: all but the full localizations
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("localizations", "summary.*"))
    code, _, err = run_cli(["ground-truth", "--out", str(copy), "--report-only"])
    assert code == 0, err
    assert (copy / gt.SUMMARY_JSON).read_text() == before
    assert json.loads(json.dumps(summarize_ground_truth(copy))) == json.loads(before)


def test_summary_pairs_the_methods_with_the_reference(tiny_run, tmp_path, monkeypatch):
    import shutil

    from ditloc.bench.ground_truth import summary as gt_summary
    from ditloc.bench.ground_truth.settings import TIE

    out, _ = tiny_run
    assert "paired" not in json.loads((out / gt.SUMMARY_JSON).read_text())  # no `search` in this run: no reference
    copy = tmp_path / "paired"
    shutil.copytree(out, copy)
    monkeypatch.setattr(gt_summary, "PAIRED_REFERENCE", "contribution")
    summary = summarize_ground_truth(copy)
    (concept,) = summary["concepts"]
    assert summary["paired"]["reference"] == "contribution" and set(summary["paired"]["methods"]) == {"patch", "attribution"}
    for method in ("patch", "attribution"):
        for k in ("1", "2", "4"):
            d = summary["paired"]["methods"][method][f"regret_{k}"]
            diff = concept["methods"][method]["regret"][k] - concept["methods"]["contribution"]["regret"][k]
            assert d["n"] == 1 and d["mean"] == pytest.approx(diff) and d["worse"] + d["better"] == int(abs(diff) > TIE)
    md = (copy / gt.SUMMARY_MD).read_text()
    assert "## Against `contribution`, paired over concepts" in md
    starts = [line.split(" |")[0] for line in md.splitlines()]
    assert starts.count("| patch") == 2 and starts.count("| attribution") == 2  # the per-method table and the paired one


def test_rerun_generates_nothing(tiny_run, toy_pipe, monkeypatch):
    out, first = tiny_run
    calls = []
    real = gt_run.generate_scored
    monkeypatch.setattr(gt_run, "generate_scored", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = run_ground_truth(toy_pipe, out, GroundTruthSettings(**TINY))
    assert calls == [] and result.conditions_run == 0 and result.localizations_run == 0
    assert result.conditions_reused == first.conditions_run


def test_other_settings_refused(tiny_run, toy_pipe):
    out, _ = tiny_run
    store = (out / gt.STORE_FILE).read_bytes()
    with pytest.raises(DitlocError, match="other settings .*steps: 2 there, 3 here"):
        run_ground_truth(toy_pipe, out, GroundTruthSettings(**{**TINY, "steps": 3}))
    code, _, err = run_cli(["ground-truth", "--out", str(out), "--concepts", "triangle", "--localize-methods", "contribution"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "other settings" in err
    assert (out / gt.STORE_FILE).read_bytes() == store


def test_torn_store_line_is_cut_and_recomputed(tiny_run, toy_pipe, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_run[0], out)
    lines = (out / gt.STORE_FILE).read_text().splitlines(keepends=True)
    (out / gt.STORE_FILE).write_text("".join(lines[:-1]) + lines[-1][:20])  # a kill mid-append
    loc_record = (out / gt.LOCALIZATIONS_FILE).read_text()
    (out / gt.LOCALIZATIONS_FILE).unlink()  # a kill between saving the localization and recording it
    result = run_ground_truth(toy_pipe, out, GroundTruthSettings(**TINY))
    assert result.conditions_run == 1 and result.localizations_run == 0
    assert (out / gt.LOCALIZATIONS_FILE).read_text() == loc_record
    assert (out / gt.STORE_FILE).read_text().splitlines(keepends=True) == lines  # the same numbers again


def test_second_writer_refused(tiny_run, toy_pipe):
    from ditloc._io import OutputLock

    out, _ = tiny_run
    with OutputLock(out):
        with pytest.raises(DitlocError, match="another ditloc process"):
            run_ground_truth(toy_pipe, out, GroundTruthSettings(**TINY))


# --------------------------------------------------------------------------
# CLI: bad input is one line, exit 2, before the model loads
# --------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--concepts", "unicorn"], "no concept 'unicorn'"),
    (["--categories", "animal"], "unknown category 'animal'"),
    (["--localize-methods", "contribution,vibes"], "unknown method 'vibes'"),
    (["--localize-methods", ""], "methods must be distinct"),
    (["--steps", "0", "--localize-methods", "contribution"], "steps must be at least 1"),
    (["--n-images", "-1", "--localize-methods", "contribution"], "n-images must be at least 1"),
    (["--screen", "0", "--localize-methods", "contribution"], "screen must be between 1 and n-images - 1 (31)"),
    (["--screen", "32", "--localize-methods", "contribution"], "screen must be between 1 and n-images - 1 (31)"),
])
def test_cli_bad_input(tmp_path, monkeypatch, extra, message):
    import ditloc.cli.models

    monkeypatch.setattr(ditloc.cli.models, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    code, _, err = run_cli(["ground-truth", "--out", str(tmp_path / "gt"), *extra])
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "gt").exists()


def test_cli_report_only_without_a_run(tmp_path):
    code, _, err = run_cli(["ground-truth", "--out", str(tmp_path), "--report-only"])
    assert code == 2 and "not a ground-truth directory" in err and len(err.strip().splitlines()) == 1


def test_another_concept_adds_to_the_directory(tiny_run, toy_pipe, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_run[0], out)
    result = run_ground_truth(toy_pipe, out, GroundTruthSettings(**{**TINY, "concepts": ("triangle", "hazard")}))
    assert result.conditions_reused == tiny_run[1].conditions_run and result.localizations_run == len(TINY["methods"])
    record = json.loads((out / gt.SETTINGS_FILE).read_text())
    assert [c["concept"] for c in record["concepts"]] == ["triangle", "hazard"]
    assert [e["concept"] for e in result.summary["concepts"]] == ["triangle", "hazard"]
    assert result.summary["summary"]["contribution"]["concepts"] == 2


def test_report_of_a_ground_truth_directory(tiny_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_run[0], out)
    code, stdout, err = run_cli(["report", str(out)])
    assert code == 0, err
    page = (out / "report" / "index.html").read_text()
    for method in TINY["methods"]:
        assert (out / "report" / f"scores_{method}.png").is_file() and method in stdout
    assert (out / "report" / "drops.png").is_file()
    assert "Per method" in page and "triangle" in page and "hit@1" in page
    assert page.count("<table>") == 3


# --------------------------------------------------------------------------
# Screening: pairs and greedy sets raced on a few images first
# --------------------------------------------------------------------------


def test_screen_images_and_margin():
    idx = gt.screen_indices(32, 8)
    assert idx == sorted(set(idx)) and len(idx) == 8 and 0 <= idx[0] and idx[-1] < 32
    assert gt.screen_indices(32, 8) == idx and gt.screen_indices(32, 9) != idx  # fixed, one draw per size
    # Hoeffding: exp(-2 n m^2) = delta
    m = gt.screen_margin(8)
    assert np.exp(-2 * 8 * m * m) == pytest.approx(gt.SCREEN_DELTA)
    assert gt.screen_margin(32) == pytest.approx(m / 2)


class _FakeConcept:
    category, concept = "shape", "triangle"


def _fake_run(tmp_path, table: dict, screen, n=16):
    """A run whose generations are read from `table` (condition -> per-image scores), recording
    which images each call asked for."""
    run = gt_run._Run(None, tmp_path, GroundTruthSettings(n_images=n, screen=screen, methods=("contribution",)),
                      None, list(BLOCKS), lambda m: None, 1)
    calls = []

    def generate(c, condition, pooled=None, indices=None):
        calls.append((condition, None if indices is None else tuple(indices)))
        v = table[condition]
        return list(v) if indices is None else [v[i] for i in indices]

    run._generate = generate
    return run, calls


def _pair_table(n=16, erasing=True):
    """Baseline 1, singles b1 and b3 at 0.6; most pairs remove nothing. `erasing`: the pair
    b1 + b3 erases (mean 0.1) and b0 + b4 reads 0.5, within the screen's margin of it."""
    rng = np.random.default_rng(1)
    pairs = [frozenset(p) for p in itertools.combinations(BLOCKS, 2)]
    table = {frozenset(): [1.0] * n} | {frozenset({b}): [0.6 if b in ("b1", "b3") else 1.0] * n for b in BLOCKS}
    table |= {p: list(rng.uniform(0.85, 1.0, n).round(6)) for p in pairs}
    if erasing:
        table[frozenset({"b1", "b3"})] = [0.0] * (n // 2) + [0.2] * (n // 2)
        table[frozenset({"b0", "b4"})] = [0.5] * n
    return pairs, table


def _raced(tmp_path, table, pairs, screen=4):
    run, calls = _fake_run(tmp_path, table, screen=screen)
    run.measure(_FakeConcept, [frozenset()] + [frozenset({b}) for b in BLOCKS], "baseline and singles")
    del calls[:]
    return run.race(_FakeConcept, pairs, "pairs"), calls


def test_race_completes_only_what_can_be_best(tmp_path):
    pairs, table = _pair_table()
    presence, calls = _raced(tmp_path, table, pairs)
    screen = tuple(gt.screen_indices(16, 4))
    # the three most promising by the singles' drops first, on all images: b1 + b3, then b1 or b3 with b0
    first = [frozenset({"b1", "b3"}), frozenset({"b0", "b1"}), frozenset({"b0", "b3"})]
    assert calls[:3] == [(p, None) for p in first]
    assert [c for c in calls if c[1] == screen] == [(p, screen) for p in pairs if p not in first]  # screened once
    completed = [c for c, idx in calls[3:] if idx != screen]
    assert completed == [frozenset({"b0", "b4"})]  # within the margin of the best (0.5 - 0.49 < 0.1)
    assert [idx for c, idx in calls[3:] if idx != screen] == [tuple(sorted(set(range(16)) - set(screen)))]
    assert min(presence, key=presence.get) == frozenset({"b1", "b3"}) and presence[frozenset({"b1", "b3"})] == 0.1
    # the store holds screens and the completion; read back, a completed pair has all its images
    screened = {}
    stored = gt.read_conditions(tmp_path, screened)[("shape", "triangle")]
    full = set(first) | set(completed)
    assert all(stored[p] == table[p] for p in full)
    assert {s for _, s in screened} == set(pairs) - full
    assert all(stored[p] == [table[p][i] for i in screen] for p in set(pairs) - full)
    # a later step that needs a screened pair on all its images completes it, from the store after a restart
    run2, calls2 = _fake_run(tmp_path, table, screen=4)
    p = frozenset({"b2", "b4"})
    run2.measure(_FakeConcept, [p], "a method's top pair")
    assert calls2 == [(p, tuple(sorted(set(range(16)) - set(screen))))]
    assert gt.read_conditions(tmp_path)[("shape", "triangle")][p] == table[p]
    # without a screen the same step measures every pair on all its images; the best is the same
    run3, calls3 = _fake_run(tmp_path / "plain", table, screen=None)
    plain = run3.race(_FakeConcept, pairs, "pairs")
    assert len(calls3) == len(pairs) and all(idx is None for _, idx in calls3)
    assert min(plain, key=plain.get) == frozenset({"b1", "b3"})


def test_a_long_batch_says_how_far_it_is(tmp_path, monkeypatch):
    """Inside a batch of conditions a line comes at most every PROGRESS_EVERY seconds (here: every condition)."""
    pairs, table = _pair_table()
    run, _ = _fake_run(tmp_path, table, screen=None)
    said = []
    run.say = said.append
    monkeypatch.setattr(gt_run, "PROGRESS_EVERY", 0.0)
    run.measure(_FakeConcept, pairs[:4], "pairs")
    assert len(said) == 4  # three lines inside the batch, then the batch's own line
    for i, line in enumerate(said[:3], 1):
        assert line.startswith(f"ground-truth shape/triangle: pairs, {i}/4 condition(s) in "), line
    assert said[3].startswith("ground-truth shape/triangle: pairs, 4 condition(s) in ")
    said.clear()
    monkeypatch.setattr(gt_run, "PROGRESS_EVERY", 3600.0)
    run.measure(_FakeConcept, pairs[4:8], "pairs")
    assert len(said) == 1  # a quick batch: its own line only


def test_race_without_an_erasing_pair_screens_nothing(tmp_path):
    """No pair reads below 1 - margin: a screen could stop none, so none is screened."""
    pairs, table = _pair_table(erasing=False)
    presence, calls = _raced(tmp_path, table, pairs)
    assert sorted(map(sorted, (c for c, _ in calls))) == sorted(map(sorted, pairs))
    assert all(idx is None for _, idx in calls)
    assert presence == {s: pytest.approx(np.mean(v)) for s, v in table.items()}


def test_screened_images_score_as_the_full_measurement(toy_pipe, tmp_path):
    """On the toy model: a condition's images measured in parts (a screen, then the rest)
    score as they do measured at once."""
    settings = GroundTruthSettings(**{**TINY, "n_images": 5, "screen": 2})
    (c,) = gt.plan_ground_truth(settings)
    from ditloc.evaluate import get_evaluator

    # float64 generation: the two batch compositions give the same pixels on any CPU (in float32 a
    # different matmul blocking can move a pixel across a rounding step); what remains is the
    # float32 oracle (~1e-7) and the stored scores' 6 decimals (5e-7 each)
    pipe = copy.deepcopy(toy_pipe).to(torch.float64)
    run = gt_run._Run(pipe, tmp_path, settings, get_evaluator("toy"), list(TINY["blocks"]), lambda m: None, 1)
    cond = frozenset({"block.1", "block.2"})
    full = run._generate(c, cond)
    idx = gt.screen_indices(5, 2)
    part = run._generate(c, cond, indices=idx)
    rest = [i for i in range(5) if i not in idx]
    assert part == pytest.approx([full[i] for i in idx], abs=2e-6)
    assert run._generate(c, cond, indices=rest) == pytest.approx([full[i] for i in rest], abs=2e-6)


def test_summary_says_what_was_screened(tiny_run):
    out, result = tiny_run
    summary = json.loads(json.dumps(result.summary))
    (entry,) = summary["concepts"]
    assert entry["screened"] == 0 and entry["conditions"] == result.conditions_run
    intro, _ = gt.summary_tables(summary)
    assert "Screened" not in intro
    entry["screened"] = 3
    intro, _ = gt.summary_tables(summary)
    assert f"Screened: 3 of {result.conditions_run} conditions" in intro and "screened mean" in intro
