"""Causal localization: `patch` equals an explicit loop of
single-block withholding predictions made the way `generate` makes them, and
`attribution` equals finite differences of the same metric, for every family."""

import functools
import json

import pytest
import torch

import ditloc
from ditloc.engine import CausalProbe, Session, instrument
from ditloc.localization import Localization, score_mass_k
from ditloc.options import RunOptions
from ditloc.testing import (
    tiny_flux_pipeline, tiny_flux_schnell_pipeline, tiny_pixart_pipeline, tiny_pixart_sigma_pipeline, tiny_sana_pipeline,
    tiny_sd3_pipeline,
)

from conftest import EPS32

localize_contribution = functools.partial(ditloc.localize, method="contribution")

PROMPTS = ["a photo of van gogh in the city", "van gogh painting of a dog"]
CLEAN = ["a photo in the city", "painting of a dog"]
CONCEPT = "van gogh"

CASES = {
    "pixart": (tiny_pixart_pipeline, dict(num_inference_steps=3, height=32, width=32, use_resolution_binning=False)),
    "sana": (tiny_sana_pipeline, dict(num_inference_steps=3, height=32, width=32, use_resolution_binning=False)),
    "flux": (tiny_flux_pipeline, dict(num_inference_steps=3, height=16, width=16, max_sequence_length=32)),
    "flux_cfg": (lambda: tiny_flux_pipeline(guidance_embeds=False),
                 dict(num_inference_steps=3, height=16, width=16, max_sequence_length=32,
                      negative_prompt="a dog", true_cfg_scale=2.0)),  # true CFG: separate negative forwards
    "sd3": (tiny_sd3_pipeline, dict(num_inference_steps=3, height=8, width=8, max_sequence_length=32)),
    # PixArt-Sigma; SD3.5 with skip-layer guidance (a guidance forward per step, not measured); FLUX.1-schnell
    "sigma": (lambda: tiny_pixart_sigma_pipeline(tokenizers="subword"),
              dict(num_inference_steps=3, height=32, width=32, use_resolution_binning=False, clean_caption=False)),
    "sd35_slg": (lambda: tiny_sd3_pipeline(dual_attention_layers=(0, 1), tokenizers="subword"),
                 dict(num_inference_steps=3, height=8, width=8, max_sequence_length=32, skip_guidance_layers=[1],
                      skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)),
    "flux_schnell": (lambda: tiny_flux_schnell_pipeline(tokenizers="subword"),
                     dict(num_inference_steps=3, height=16, width=16, max_sequence_length=32, guidance_scale=0.0)),
}
_PIPES = {}


@pytest.fixture(params=list(CASES))
def case(request):
    """(name, the tiny pipeline in float64, run settings). In float64 the forwards' rounding, which the batch
    layout and the path change, is ~1e-16 relative: what the comparisons see is the probe's float32 metric
    (`_f32_metric_tol`), on any CPU."""
    make, run = CASES[request.param]
    if request.param not in _PIPES:
        pipe = make().to(torch.float64)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[request.param] = pipe
    return request.param, _PIPES[request.param], run


def _metric(full, eps, clean):
    """E = <full - eps, full - clean> / |full - clean|^2 per sample (rows)."""
    full, eps, clean = (x.flatten(1).double() for x in (full, eps, clean))
    d = full - clean
    return ((full - eps) * d).sum(1) / (d * d).sum(1)


def _f32_metric_tol(full, eps, clean):
    """Per sample, how far the probe's metric, computed in float32 from these predictions, may be from E.
    Rounding full, eps and clean to float32 (eps32 / 2 relative each) moves full - eps by up to
    eps32 * (|full_i| + |eps_i|) per element, hence <full - eps, d> by eps32 * (|full| + |eps|) * |d|
    (Cauchy-Schwarz) and |d|^2 by 2 eps32 * |clean| * |d|, so E by eps32 * (|full| + |eps| + |clean|) / |d| *
    (1 + |E|); the E-term float32 sums add eps32 * sqrt(E) * |full - eps| / |d| (a random walk of E roundings).
    A factor 2 for what was dropped. Large where the prompt and the clean prompt predict almost the same
    (|d| << |full|), as late in sampling."""
    full, eps, clean = (x.flatten(1).double() for x in (full, eps, clean))
    d = (full - clean).norm(dim=1)
    cast = (full.norm(dim=1) + eps.norm(dim=1) + clean.norm(dim=1)) / d * (1 + _metric(full, eps, clean).abs())
    sums = full.shape[1] ** 0.5 * (full - eps).norm(dim=1) / d
    return 2 * EPS32 * (cast + sums)


def _within(got, want, tol):
    err = (got.double() - want.double()).abs()
    assert bool((err <= tol).all()), f"off by up to {float(err.max()):.3g}, allowed {float(tol.min()):.3g}.."


def _explicit_patch(pipe, run):
    """[blocks, steps, n]: each block withheld alone, one forward per (block, step),
    through the ordinary swap path that `generate(withhold=[block])` uses."""
    resolved = RunOptions.of(None, **run).resolve(pipe)
    adapter, kw = resolved.adapter, resolved.call_kwargs
    names = adapter.block_names()
    n = len(PROMPTS)
    session = Session()
    inputs = []
    with instrument(adapter, session):
        def keep(module, args, kwargs):
            if session.context.active and session.context.measured:  # not a negative prompt's or a guidance pass
                inputs.append((args, dict(kwargs)))

        handle = pipe.transformer.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            session.begin_call(n)
            pipe(prompt=PROMPTS, generator=resolved.generators([0, 0]), output_type="latent", **kw)
        finally:
            handle.remove()
        clean_text = adapter.encode_text(CLEAN, kw)

        def predict(args, kwargs, blocks, pooled_clean):
            swap = adapter.make_swap(frozenset(blocks), clean_text, pooled_clean) if blocks or pooled_clean else None
            session.begin_call(n, swap=swap)
            with torch.no_grad():
                out = pipe.transformer(*args, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            return adapter.prediction(out, hidden)[adapter.cond_rows(hidden.shape[0], n)]

        scores = torch.zeros(len(names), len(inputs), n, dtype=torch.float64)
        tol = torch.zeros_like(scores)
        for t, (args, kwargs) in enumerate(inputs):
            full = predict(args, kwargs, [], False)
            clean = predict(args, kwargs, names, True)  # withheld everywhere = the clean prompt's prediction
            for b, name in enumerate(names):
                eps = predict(args, kwargs, [name], False)
                scores[b, t], tol[b, t] = _metric(full, eps, clean), _f32_metric_tol(full, eps, clean)
    return scores, tol


def test_patch_equals_explicit_single_block_predictions(case):
    name, pipe, run = case
    expected, tol = _explicit_patch(pipe, run)
    loc = ditloc.localize(pipe, PROMPTS, CONCEPT, method="patch", clean_prompts=CLEAN, seed=0, **run)
    assert loc.per_sample_step.shape == expected.shape
    assert loc.method == "patch" and loc.settings["clean_prompts"] == CLEAN
    assert expected.abs().max() > 1e-3  # the tiny model reads the concept: the comparison is not 0 == 0
    assert (expected.abs() / tol).median() > 10  # and the tolerance mostly far below the scores
    _within(loc.per_sample_step, expected, tol)  # the probe's float32 metric against float64's
    # batching the block variants differently gives the same scores: two float32 metrics of equal predictions
    one = ditloc.localize(pipe, PROMPTS, CONCEPT, method="patch", clean_prompts=CLEAN, block_batch=1, **run)
    _within(one.per_sample_step, loc.per_sample_step, 2 * tol)


def _metric_at(pipe, run, alpha):
    """m(alpha) [steps, n] on the plain trajectory (CausalProbe with fixed mixing weights)."""
    resolved = RunOptions.of(None, **run).resolve(pipe)
    adapter, kw = resolved.adapter, resolved.call_kwargs
    session = Session()
    with instrument(adapter, session):
        probe = CausalProbe(adapter, session, "attribution", adapter.encode_text(CLEAN, kw), alpha=alpha)
        session.begin_call(len(PROMPTS))
        with probe.installed(), torch.no_grad():
            pipe(prompt=PROMPTS, generator=resolved.generators([0, 0]), output_type="latent", **kw)
        return probe.stacked(len(adapter.block_names()), session.forwards)[0].double()


def test_attribution_equals_finite_differences(case):
    name, pipe, run = case
    loc = ditloc.localize(pipe, PROMPTS, CONCEPT, method="attribution", clean_prompts=CLEAN, **run)
    n_blocks = len(loc.blocks)
    # m(0) = 0: the mixed forward at alpha = 0 is the full prediction. In float32 the two would differ by the
    # rounding of a forward at another batch size (the pipeline's CFG batch vs the probe's conditional rows):
    # about 1e-7 x |eps_full| / |eps_full - eps_clean|, up to 1.6e-5 on the tiny PixArt, whose prompt and clean
    # prompt predict almost the same. In float64 that rounding (~1e-16) vanishes in the probe's float32 metric.
    zero = _metric_at(pipe, run, torch.zeros(n_blocks))
    assert zero.abs().max() < 1e-9
    h = 1e-2
    for b in range(n_blocks):
        e = torch.zeros(n_blocks)
        e[b] = h
        fd = (_metric_at(pipe, run, e) - _metric_at(pipe, run, -e)) / (2 * h)  # [steps, n]
        torch.testing.assert_close(loc.per_sample_step[b].double(), fd, atol=2e-3, rtol=3e-2)
    # at alpha = e_b the mixed forward is block b withheld alone: m(e_b) is the patch score
    patch = ditloc.localize(pipe, PROMPTS, CONCEPT, method="patch", clean_prompts=CLEAN, **run)
    e = torch.zeros(n_blocks)
    e[0] = 1.0
    _within(_metric_at(pipe, run, e), patch.per_sample_step[0], 2 * _explicit_patch(pipe, run)[1][0])


def test_causal_localization_round_trips_and_derives_clean_prompts(tmp_path):
    pipe, run = _PIPES.get("pixart") or tiny_pixart_pipeline(), CASES["pixart"][1]
    pipe.set_progress_bar_config(disable=True)
    loc = ditloc.localize(pipe, PROMPTS, CONCEPT, method="attribution", **run)
    assert loc.settings["clean_prompts"] == CLEAN  # derived, kept grammatical
    assert loc.per_head_step.shape[-1] == 0 and "contribution_terms" not in loc.settings
    back = Localization.load(loc.save(tmp_path / "loc.json"))
    assert back.method == "attribution" and back.ranking == loc.ranking
    torch.testing.assert_close(back.per_sample_step, loc.per_sample_step)
    assert json.loads((tmp_path / "loc.json").read_text())["settings"]["method"] == "attribution"


@pytest.mark.parametrize("bad, message", [
    (dict(method="gradient"), "unknown method"),
    (dict(method="patch", block_batch=0), "block_batch"),
    (dict(method="patch", clean_prompts=["only one"]), "clean prompts"),
])
def test_bad_causal_arguments_are_refused_before_work(bad, message):
    pipe = _PIPES.get("pixart") or tiny_pixart_pipeline()
    with pytest.raises(ditloc.DitlocError, match=message):
        localize_contribution(pipe, PROMPTS, CONCEPT, **bad, **CASES["pixart"][1])


def _loc(scores):
    scores = torch.tensor(scores, dtype=torch.float32)
    per = scores.view(-1, 1, 1)
    return Localization(concept="c", blocks=tuple(f"block.{i}" for i in range(len(scores))), per_sample_step=per,
                        per_head_step=per.new_zeros(*per.shape, 0), spans=())


@pytest.mark.parametrize("scores, fraction, k", [
    ([0.0, 0.9, 0.05, 0.05], 0.5, 1),
    ([0.3, 0.3, 0.3, 0.1], 0.5, 2),
    ([0.3, 0.3, 0.3, 0.1], 0.9, 3),
    ([0.25, 0.25, 0.25, 0.25], 1.0, 4),
    ([0.5, -2.0, 0.5, 0.0], 0.5, 1),  # negative scores hold no mass
    ([-1.0, -1.0], 0.5, 1),  # nothing positive: the top block
])
def test_score_mass_k(scores, fraction, k):
    assert score_mass_k(_loc(scores).scores, fraction) == k
    if fraction == 0.5:  # without a search, --k auto is this rule at half the mass
        assert _loc(scores).k_auto() == k


def test_score_mass_k_refuses_bad_fraction():
    with pytest.raises(ditloc.DitlocError, match="fraction"):
        score_mass_k([1.0], 0)
