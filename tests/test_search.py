"""Set-level presence and search on tiny random pipelines of every family:
presence of batched block sets equals explicit `generate(withhold=S)` + evaluator calls;
the search with a full beam finds the exhaustive best pair; the self objective reads 1 on
the unedited images and 0 on the clean prompt's; a search resumes from its checkpoint
without evaluating a set twice; bad settings are refused before any work."""

import functools
import itertools
import json
import math

import numpy as np
import pytest
import torch

import ditloc
from ditloc import DitlocError, SearchConfig
from ditloc._io import OutputLock
from ditloc.evaluate.base import Evaluator
from ditloc.localization import Localization, PresenceRunner, SetSearch
from test_causal import CASES as CAUSAL_CASES  # same directory

localize_contribution = functools.partial(ditloc.localize, method="contribution")

PROMPTS = ["a photo of van gogh in the city", "van gogh painting of a dog"]
CONCEPT = "van gogh"

#: the causal tests' tiny pipelines and run settings, one per family (FLUX's true-CFG variant left out)
CASES = {name: case for name, case in CAUSAL_CASES.items() if name != "flux_cfg"}
_PIPES = {}
#: float64 pipelines: a set's images do not depend on how sets are batched into pipeline calls, nor on the
#: path (presence, generate, search, gradient ranking), beyond float64 rounding (~1e-16 per operation), on any
#: CPU; in float32 another matmul blocking (batch size, CPU vendor) moves latents by ~1e-6 relative
F64_RTOL = 1e-10  # float64 rounding, ~1e-16 relative per forward, grown over 3 steps of a few blocks: far below


def _pipe(name):
    if name not in _PIPES:
        pipe = CASES[name][0]().to(torch.float64)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[name] = pipe
    return _PIPES[name], CASES[name][1]


class MeanChannel(Evaluator):
    """A stand-in evaluator: the mean of one color channel in [0, 1] (soft, deterministic)."""

    def __init__(self, channel: int = 0):
        super().__init__()
        self.channel = channel

    def _score_batch(self, images, texts):
        return np.array([np.asarray(im, dtype=np.float64)[..., self.channel].mean() / 255 for im in images])


@pytest.mark.parametrize("family", list(CASES))
def test_presence_equals_explicit_withholding(family, monkeypatch):
    """Batched sets (rows of one call, per-image withheld sets) give the final latents that
    `generate(withhold=S)` gives set by set: each image is read by a fixed random linear
    functional of its latents (well conditioned, unlike a ratio, so a relative tolerance is meaningful)."""
    pipe, run = _pipe(family)
    names = ditloc.get_adapter(pipe).block_names()
    sets = [frozenset([names[0]]), frozenset(names[:2]), frozenset([names[-1]]), frozenset(names)]
    weights = {}

    def project(latents):  # [m, C, h, w] -> [m]
        flat = latents.flatten(1).double()
        if flat.shape[1] not in weights:
            weights[flat.shape[1]] = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.float64)
        return (flat @ weights[flat.shape[1]]).numpy()

    monkeypatch.setattr(PresenceRunner, "_score", lambda self, result, *a: project(self.adapter.unpack_latents(result)))
    runner = PresenceRunner(pipe, PROMPTS, CONCEPT, objective="self", seed=[0, 1], block_batch=3, **run)
    batched = runner.raw([frozenset()] + sets)  # [5, 4]
    for row, s in enumerate([None] + sets):
        latents = ditloc.generate(pipe, PROMPTS, withhold=sorted(s) if s else None, concept=CONCEPT, seed=[0, 1],
                                  output_type="latent", **run)
        expected = project(runner.adapter.unpack_latents(latents))
        np.testing.assert_allclose(batched[row], expected, rtol=F64_RTOL, atol=F64_RTOL * np.abs(expected).max())
    # the sets change the images, by far more than the comparisons' tolerance
    assert np.ptp(batched.mean(1)) > 1e-5 * np.abs(batched).max()
    # a different grouping of the sets into pipeline calls gives the same numbers
    again = PresenceRunner(pipe, PROMPTS, CONCEPT, objective="self", seed=[0, 1], block_batch=1, **run)
    np.testing.assert_allclose(again.raw([frozenset()] + sets), batched, rtol=F64_RTOL,
                               atol=F64_RTOL * np.abs(batched).max())


def test_presence_scores_images_with_the_evaluator():
    pipe, run = _pipe("pixart")
    names = ditloc.get_adapter(pipe).block_names()
    sets = [[names[0]], names]
    result = ditloc.presence(pipe, PROMPTS, CONCEPT, sets=sets, evaluator=MeanChannel(), seed=[0, 1], **run)
    assert [list(s) for s in result.sets] == [[]] + sets  # the baseline first, then the sets in order
    for row, s in enumerate([None] + sets):
        images = ditloc.generate(pipe, PROMPTS, withhold=s, concept=CONCEPT, seed=[0, 1], **run)
        # float64 trajectories: the same 8-bit images, hence the same scores
        np.testing.assert_array_equal(result.per_image[row], MeanChannel().score(images, "x"))


@pytest.mark.parametrize("family", list(CASES))
def test_self_objective_reads_one_unedited_and_zero_clean(family):
    pipe, run = _pipe(family)
    names = ditloc.get_adapter(pipe).block_names()
    result = ditloc.presence(pipe, PROMPTS, CONCEPT, sets=[names[:1], "all"], objective="self", seed=[0, 1], **run)
    assert np.isfinite(result.per_image).all()
    assert result.baseline == pytest.approx(1.0, abs=1e-9)
    # withholding every block (pooled text included) is the clean prompt's generation: presence 0
    assert result.of(names) == pytest.approx(0.0, abs=1e-9)  # float64 pipelines: the same generation


def test_search_with_full_beam_finds_the_exhaustive_best_pair():
    pipe, run = _pipe("pixart")
    names = ditloc.get_adapter(pipe).block_names()
    evaluator = MeanChannel(channel=1)
    config = SearchConfig(max_k=2, beam=len(names), rank="generation", search_steps=None)
    loc = ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", search=config, evaluator=evaluator, seed=[0, 1],
                          **run)
    pairs = [list(p) for p in itertools.combinations(names, 2)]
    exhaustive = ditloc.presence(pipe, PROMPTS, CONCEPT, sets=[[b] for b in names] + pairs, evaluator=evaluator,
                                 seed=[0, 1], **run)
    pair_means = exhaustive.mean[1 + len(names):]
    best_pair = set(pairs[int(np.argmin(pair_means))])
    assert set(loc.top(2)) == best_pair
    assert loc.search.presence[1] == pytest.approx(pair_means.min(), rel=F64_RTOL)  # the same images
    best_single = names[int(np.argmin(exhaustive.mean[1 : 1 + len(names)]))]
    assert loc.top(1) == [best_single]
    assert loc.search.curve == pytest.approx([exhaustive.baseline - p for p in loc.search.presence])
    assert loc.method == "search" and loc.search.objective == "evaluator"


def test_search_result_round_trips_and_k_from_the_curve(tmp_path):
    search = SetSearch(objective="evaluator", baseline=0.8, sets=(("block.1",), ("block.1", "block.3")),
                       presence=(0.6, 0.3), evaluated=((("block.1",), 0.6),), cost={"generations": 9})
    per = torch.zeros(4, 1, 2)
    loc = Localization(concept="c", blocks=tuple(f"block.{i}" for i in range(4)), per_sample_step=per,
                       per_head_step=per.new_zeros(4, 1, 2, 0), spans=(), settings={"method": "search"}, search=search)
    assert loc.top(1) == ["block.1"] and loc.top(2) == ["block.1", "block.3"]
    assert loc.top(3)[:2] == ["block.1", "block.3"] and len(set(loc.top(3))) == 3  # beyond max_k: the ranking's next
    assert loc.k_auto() == 2 and search.k_for_drop() == 2  # 0.3 <= half of 0.8; 0.6 is not
    assert search.k_for_drop(0.2) == 1 and search.k_for_drop(0.7) is None
    back = Localization.load(loc.save(tmp_path / "loc.json"))
    assert back.search == search and back.top(2) == loc.top(2)
    assert json.loads((tmp_path / "loc.json").read_text())["search"]["curve"] == pytest.approx([0.2, 0.5])
    weak = SetSearch(objective="evaluator", baseline=0.8, sets=search.sets, presence=(0.7, 0.6))
    assert weak.k_for_drop() is None  # no set halves presence: --k auto takes the largest set
    assert Localization(concept="c", blocks=loc.blocks, per_sample_step=per, per_head_step=loc.per_head_step,
                        spans=(), search=weak).k_auto() == 2
    with pytest.raises(DitlocError, match="drop must be a fraction"):
        search.k_for_drop(0)


def _spy_measure(monkeypatch) -> list:
    """The block sets every later pipeline call generates, in order."""
    measured = []
    real = PresenceRunner._measure

    def spy(self, group, gradient=False):
        measured.extend(group)
        return real(self, group, gradient)

    monkeypatch.setattr(PresenceRunner, "_measure", spy)
    return measured


def test_search_resumes_without_evaluating_a_set_twice(tmp_path, monkeypatch):
    pipe, run = _pipe("pixart")
    evaluator = MeanChannel()
    config = SearchConfig(max_k=2, rank="generation")
    path = tmp_path / "search.jsonl"
    first = ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", search=config, evaluator=evaluator,
                            checkpoint=path, **run)
    lines = path.read_text().splitlines()
    n_sets = len(lines) - 1  # a header, then one line per evaluated set
    assert n_sets == first.search.cost["sets_evaluated"]
    measured = _spy_measure(monkeypatch)
    again = ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", search=config, evaluator=evaluator,
                            checkpoint=path, **run)
    assert measured == [] and again.search.sets == first.search.sets
    # killed mid-run: the last set's line torn, two sets lost; only those are evaluated again
    path.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:10])
    again = ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", search=config, evaluator=evaluator,
                            checkpoint=path, **run)
    assert len(measured) == 2 and again.search.sets == first.search.sets
    assert again.search.presence == pytest.approx(first.search.presence)
    # other settings are refused, and so is a second writer
    with pytest.raises(DitlocError, match="other settings"):
        ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", search=config, evaluator=evaluator, seed=1,
                        checkpoint=path, **run)
    with OutputLock(tmp_path, name=path.name + ".lock"):
        with pytest.raises(DitlocError, match="another ditloc process"):
            ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", search=config, evaluator=evaluator,
                            checkpoint=path, **run)


def test_candidates_restrict_the_search():
    pipe, run = _pipe("pixart")
    loc = ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", evaluator=MeanChannel(),
                          search=SearchConfig(max_k=2, candidates=2, candidate_method="contribution", rank="generation"), **run)
    cheap = localize_contribution(pipe, PROMPTS, CONCEPT, **run)
    assert set(loc.settings["candidates"]) == set(cheap.ranking[:2])
    assert set(loc.top(2)) == set(cheap.ranking[:2])
    assert all(set(s) <= set(cheap.ranking[:2]) for s, _ in loc.search.evaluated)


def _strict_json(path):
    """The file as JSON, refusing the NaN / Infinity literals JSON does not have."""
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


def test_blocks_outside_the_candidates_are_not_measured(tmp_path):
    """The exhaustive greedy on pruned candidates scores the candidates alone: every other
    block is NaN (not measured), never 0 (measured, no effect), in memory, in the saved file
    (null) and read back; the ranking puts them after every measured block."""
    pipe, run = _pipe("pixart")
    loc = ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", evaluator=MeanChannel(),
                          search=SearchConfig(max_k=2, candidates=2, rank="generation"), **run)
    names, candidates = list(loc.blocks), loc.settings["candidates"]
    outside = [b for b in names if b not in candidates]
    assert loc.settings["scores"] == "single-block presence drop" and len(outside) == 2
    assert loc.measured.tolist() == [b in candidates for b in names]
    assert all(math.isnan(loc.scores[names.index(b)]) for b in outside)
    assert bool(torch.isnan(loc.per_step[[names.index(b) for b in outside]]).all())
    # a candidate's score is its single-block drop: the baseline's presence minus its own
    presence = dict(loc.search.evaluated)
    tol = 4 * len(loc.settings["seeds"]) * len(PROMPTS) * float(np.finfo(np.float32).eps)  # float32 per-image drops
    for b in candidates:
        assert float(loc.scores[names.index(b)]) == pytest.approx(presence[()] - presence[(b,)], abs=tol)
    assert loc.ranking[len(candidates):] == outside and loc.top(len(names))[len(candidates):] == outside

    d = _strict_json(loc.save(tmp_path / "loc.json"))
    assert [d["scores"][names.index(b)] for b in outside] == [None, None]
    assert all(d["per_step"][names.index(b)] == [None] for b in outside)
    back = Localization.load(tmp_path / "loc.json")
    assert back.measured.tolist() == loc.measured.tolist() and back.ranking == loc.ranking
    torch.testing.assert_close(back.per_sample_step, loc.per_sample_step, equal_nan=True, rtol=0, atol=0)
    # a file saved before unmeasured blocks were NaN holds 0 there: it loads with them NaN
    old = tmp_path / "old.json"
    zeros = {key: json.loads(json.dumps(d[key]).replace("null", "0.0")) for key in ("scores", "per_step",
                                                                                   "per_sample_step")}
    old.write_text(json.dumps({**d, **zeros}))
    assert Localization.load(old).measured.tolist() == loc.measured.tolist()


def test_the_default_search_scores_every_block_by_its_attribution(tmp_path):
    """The gradient-ranked search on pruned candidates still measures every block: its scores are
    the attribution at the baseline, taken on all of them."""
    pipe, run = _pipe("pixart")
    loc = ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", evaluator=MeanChannel(),
                          search=SearchConfig(max_k=2, candidates=3), **run)
    outside = [b for b in loc.blocks if b not in loc.settings["candidates"]]
    assert loc.settings["scores"].startswith("attribution at the baseline") and len(outside) == 1
    assert bool(loc.measured.all()) and bool(torch.isfinite(loc.scores).all())
    assert all(set(s) <= set(loc.settings["candidates"]) for s in loc.search.sets)
    d = _strict_json(loc.save(tmp_path / "loc.json"))
    assert None not in d["scores"] and Localization.load(tmp_path / "loc.json").measured.all()


def test_top_never_picks_an_unmeasured_block_before_a_measured_one():
    blocks = tuple(f"block.{i}" for i in range(5))
    scores = torch.tensor([math.nan, 0.2, math.nan, -0.1, 0.0])  # a negative or zero score was measured
    per = scores[:, None, None].expand(5, 1, 2).clone()
    plain = Localization(concept="c", blocks=blocks, per_sample_step=per, per_head_step=per.new_zeros(5, 1, 2, 0),
                         spans=())
    assert plain.ranking == ["block.1", "block.4", "block.3", "block.0", "block.2"]
    assert plain.top(3) == ["block.1", "block.4", "block.3"] and plain.k_auto() == 1
    search = SetSearch(objective="evaluator", baseline=1.0, sets=(("block.1",),), presence=(0.5,))
    searched = Localization(concept="c", blocks=blocks, per_sample_step=per, per_head_step=plain.per_head_step,
                            spans=(), settings={"method": "search"}, search=search)
    assert searched.top(4) == ["block.1", "block.4", "block.3", "block.0"]


def test_stop_drop_ends_the_search_at_the_first_set_that_removes_that_much():
    pipe, run = _pipe("pixart")
    evaluator = MeanChannel(channel=1)
    full = ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", search=SearchConfig(max_k=3, rank="generation"), evaluator=evaluator,
                           seed=[0, 1], **run)
    rel = full.search.relative_curve
    # a stop between the first and second sizes' drops: the search ends at the size that first reaches it
    target = (rel[0] + rel[1]) / 2 if rel[1] > rel[0] else rel[0]
    stopped = ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", evaluator=evaluator, seed=[0, 1],
                              search=SearchConfig(max_k=3, stop_drop=target, rank="generation"), **run)
    k = next(i for i, r in enumerate(rel, 1) if r >= target)
    assert stopped.search.max_k == k and stopped.search.sets == full.search.sets[:k]
    assert stopped.search.presence == pytest.approx(full.search.presence[:k])
    assert stopped.search.cost["sets_evaluated"] < full.search.cost["sets_evaluated"] or k == 3


@pytest.mark.parametrize("config, message", [
    (SearchConfig(max_k=0), "max_k must be a positive integer"),
    (SearchConfig(max_k=9), "max_k must be between 1 and 4"),
    (SearchConfig(max_k=3, candidates=2), "candidates .2. must be at least max_k .3."),
    (SearchConfig(objective="clip"), "unknown objective 'clip'"),
    (SearchConfig(direction="sideways"), "unknown search direction"),
    (SearchConfig(beam=0), "beam must be a positive integer"),
    (SearchConfig(candidate_method="oracle"), "unknown candidate method"),
    (SearchConfig(stop_drop=1.5), "stop_drop must be in"),
    (SearchConfig(stop_drop=0.5, direction="both"), "stop_drop stops a forward search"),
    (SearchConfig(rank="random"), "unknown search ranking"),
    (SearchConfig(verify=0), "verify must be a positive integer"),
    (SearchConfig(gradient_steps=0), "gradient_steps must be a positive integer"),
    (SearchConfig(gradient_gate=1.0), "gradient_gate must be in"),
])
def test_bad_search_settings_are_refused_before_work(config, message, monkeypatch):
    pipe, run = _pipe("pixart")
    monkeypatch.setattr(PresenceRunner, "_measure", lambda *a: pytest.fail("generated before refusing"))
    with pytest.raises(DitlocError, match=message):
        ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", search=config, evaluator=MeanChannel(), **run)


def test_no_evaluator_is_refused_and_self_is_the_fallback(monkeypatch):
    pipe, run = _pipe("pixart")
    monkeypatch.setattr(PresenceRunner, "_measure", lambda *a: pytest.fail("generated before refusing"))
    with pytest.raises(DitlocError, match="no evaluator for this model"):
        ditloc.presence(pipe, PROMPTS, CONCEPT, sets=[["block.0"]], **run)
    runner = PresenceRunner(pipe, PROMPTS, CONCEPT, objective="self", **run)
    assert runner.judge is not None and runner.evaluator is None


@pytest.mark.parametrize("family", list(CASES))
def test_attribution_at_a_set_leaves_its_images_unchanged(family):
    """A set generated with conditional attribution (extra forwards after each of the
    pipeline's own) gives the images it gives without: the extra forwards restore the call's
    own withholding."""
    pipe, run = _pipe(family)
    names = ditloc.get_adapter(pipe).block_names()
    sets = [frozenset(names[:2])]
    plain = PresenceRunner(pipe, PROMPTS, CONCEPT, evaluator=MeanChannel(), seed=[0, 1], **run).raw(sets)
    runner = PresenceRunner(pipe, PROMPTS, CONCEPT, evaluator=MeanChannel(), seed=[0, 1], **run)
    ranked = runner.raw(sets, gradient=True)
    np.testing.assert_array_equal(ranked, plain)  # float64: the same 8-bit images
    score = runner.gradient(names[:2])
    assert set(score) == set(names) and all(np.isfinite(v) for v in score.values())


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_gradient_search_generates_verify_sets_per_step_whatever_the_blocks(family):
    pipe, run = _pipe(family)
    names = ditloc.get_adapter(pipe).block_names()
    config = SearchConfig(max_k=2, verify=1, search_steps=None)
    loc = ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", search=config, evaluator=MeanChannel(),
                          seed=[0, 1], **run)
    # the baseline, then one set per step: no set of a block the ranking did not propose
    assert loc.search.cost["sets_evaluated"] == 1 + config.max_k * config.verify
    assert len(loc.search.sets) == 2 and set(loc.search.sets[0]) < set(loc.search.sets[1])
    assert loc.search.cost["gradient_generations"] >= 2 and len(names) >= 3


def test_gradient_search_resumes_with_its_rankings(tmp_path, monkeypatch):
    """A gradient-ranked search's checkpoint keeps each set's attribution: a rerun measures nothing
    and proposes the same sets."""
    pipe, run = _pipe("pixart")
    config = SearchConfig(max_k=2, search_steps=None)
    path = tmp_path / "search.jsonl"
    first = ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", search=config, evaluator=MeanChannel(),
                            checkpoint=path, **run)
    assert any("gradient" in json.loads(line) for line in path.read_text().splitlines()[1:])
    measured = _spy_measure(monkeypatch)
    again = ditloc.localize(pipe, PROMPTS, CONCEPT, method="search", search=config, evaluator=MeanChannel(),
                            checkpoint=path, **run)
    assert measured == [] and again.search.sets == first.search.sets
    assert again.search.presence == pytest.approx(first.search.presence)


@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_predicted_clean_sample_inverts_the_noising(scheduler):
    """`NoiseRule.x0` (what the gradient-ranked search decodes) recovers x0 from x_t and the exact target."""
    import diffusers

    from ditloc.noise import NoiseRule

    rule = NoiseRule.from_scheduler(getattr(diffusers, scheduler)())
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_t, t, target = rule.noised(x0, torch.tensor([0.1, 0.5, 0.9]), noise)
    torch.testing.assert_close(rule.x0(x_t, t.double(), target), x0, rtol=0, atol=1e-9)
