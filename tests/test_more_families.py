"""PixArt-Sigma, SD3 Medium and SD3.5 (MMDiT-X dual attention, skip-layer guidance), FLUX.1-schnell:
each is served by its family's adapter and keeps the exact invariants of intervention and measurement."""

import copy
import functools

import numpy as np
import pytest
import torch

import ditloc
from ditloc.adapters import get_adapter
from ditloc.engine import Probe, Session, instrument
from ditloc.options import RunOptions
from ditloc.testing import (
    tiny_flux_pipeline, tiny_flux_schnell_pipeline, tiny_pixart_sigma_pipeline, tiny_sd3_pipeline,
)

PROMPTS = ["a photo of zibbitron in the city", "zibbitron painting of a dog"]  # a concept in several pieces
CLEAN = ["a photo in the city", "painting of a dog"]
CONCEPT = "zibbitron"
SD3_RUN = dict(num_inference_steps=3, height=8, width=8, max_sequence_length=32)
#: skip-layer guidance in steps 1 and 2 of 3 (it reruns the transformer on the conditional rows, block 1 skipped)
SLG = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)

BUILDERS = {
    "sigma": lambda: tiny_pixart_sigma_pipeline(tokenizers="subword"),
    "sd35": lambda: tiny_sd3_pipeline(dual_attention_layers=(0, 1), tokenizers="subword"),  # SD3.5 Medium
    "sd3": lambda: tiny_sd3_pipeline(dual_attention_layers=(), qk_norm=None, tokenizers="subword"),  # SD3 Medium
    "flux_schnell": lambda: tiny_flux_schnell_pipeline(tokenizers="subword"),
}
CASES = {  # name: (pipeline, call arguments, family)
    "sigma": ("sigma", dict(num_inference_steps=3, height=32, width=32, use_resolution_binning=False, clean_caption=False),
              "pixart"),
    "sd35": ("sd35", SD3_RUN, "sd3"),
    "sd35_slg": ("sd35", {**SD3_RUN, **SLG}, "sd3"),
    "sd3": ("sd3", SD3_RUN, "sd3"),
    "flux_schnell": ("flux_schnell", dict(num_inference_steps=3, height=16, width=16, max_sequence_length=32,
                                          guidance_scale=0.0), "flux"),
}
_PIPES = {}


def pipeline(key):
    if key not in _PIPES:
        pipe = BUILDERS[key]()
        pipe.set_progress_bar_config(disable=True)
        _PIPES[key] = pipe
    return _PIPES[key]


@pytest.fixture(params=list(CASES))
def case(request):
    key, run, family = CASES[request.param]
    return request.param, pipeline(key), run


def plain(pipe, prompts, run, output_type="np"):
    """diffusers alone: one generator per image, seed 0."""
    gens = [torch.Generator().manual_seed(0) for _ in prompts]
    return pipe(prompts, generator=gens, output_type=output_type, **run).images


def gen(pipe, run, **kw):
    return ditloc.generate(pipe, PROMPTS, concept=CONCEPT, output_type="np", **{**run, **kw})


def test_adapters_recognise_the_pipelines():
    for name, (key, run, family) in CASES.items():
        assert get_adapter(pipeline(key)).family == family, name
    sigma = get_adapter(pipeline("sigma"))
    assert type(sigma.pipe).__name__ == "PixArtSigmaPipeline" and sigma.call_default("max_sequence_length") == 300
    assert sigma.default_call_kwargs({"clean_caption": False}) == {"use_resolution_binning": False}  # sample size 8
    assert sigma.image_size() == (32, 32)
    # SD3.5 Medium: image-only second attention in the dual-attention blocks, RMS qk norm; SD3 Medium: neither
    blocks = pipeline("sd35").transformer.transformer_blocks
    assert [b.attn2 is not None for b in blocks] == [True, True, False]
    assert all(type(b.attn.norm_q).__name__ == "RMSNorm" for b in blocks)
    assert all(b.attn2 is None and b.attn.norm_q is None for b in pipeline("sd3").transformer.transformer_blocks)
    # FLUX.1-schnell: no guidance embedding, so the pipeline's guidance_scale does nothing and is not recorded
    schnell = get_adapter(pipeline("flux_schnell"))
    assert not schnell.uses_guidance_scale and schnell.transformer.time_text_embed.__class__.__name__ == (
        "CombinedTimestepTextProjEmbeddings")
    run = CASES["flux_schnell"][1]
    assert np.array_equal(plain(schnell.pipe, PROMPTS[:1], run), plain(schnell.pipe, PROMPTS[:1], {**run, "guidance_scale": 3.5}))
    assert RunOptions.of(None, **run).resolve(schnell.pipe).record()["guidance_scale"] is None
    # the word-level builders make the same pipelines
    assert get_adapter(tiny_pixart_sigma_pipeline()).family == "pixart"
    assert not get_adapter(tiny_flux_schnell_pipeline()).uses_guidance_scale
    assert get_adapter(tiny_flux_pipeline()).uses_guidance_scale


def test_withhold_nothing_is_bit_identical(case):
    name, pipe, run = case
    assert np.array_equal(gen(pipe, run, withhold=[]), plain(pipe, PROMPTS, run))


def test_inject_everywhere_is_plain(case):
    name, pipe, run = case
    assert np.array_equal(gen(pipe, run, inject="all"), plain(pipe, PROMPTS, run))


def test_withhold_everywhere_equals_clean_prompt(case):
    name, pipe, run = case
    assert [ditloc.derive_clean_prompt(p, CONCEPT) for p in PROMPTS] == CLEAN
    if name.startswith("sd3"):
        # batched CFG: the clean pass runs the conditional rows alone, whose rounding differs from the
        # reference's full batch; in float64 that difference is below float64 precision
        pipe = copy.deepcopy(pipe).to(torch.float64)
        out = ditloc.generate(pipe, PROMPTS, concept=CONCEPT, withhold="all", output_type="latent", **run)
        want = plain(pipe, CLEAN, run, output_type="latent")
        torch.testing.assert_close(out, want)  # float64 tolerances
        assert (plain(pipe, PROMPTS, run, output_type="latent") - want).abs().max() > 1e-3  # the test can fail
    else:
        want = plain(pipe, CLEAN, run)
        assert np.array_equal(gen(pipe, run, withhold="all"), want)
        assert np.abs(plain(pipe, PROMPTS, run) - want).max() > 1e-3


def test_partial_withhold_is_the_complement_of_inject(case):
    name, pipe, run = case
    names = get_adapter(pipe).block_names()
    some, rest = names[: len(names) // 2], names[len(names) // 2 :]
    withheld = gen(pipe, run, withhold=some)
    assert not np.array_equal(withheld, plain(pipe, PROMPTS, run))
    assert np.array_equal(withheld, gen(pipe, run, inject=rest))


def test_measuring_does_not_change_the_trajectory(case):
    """The probe recomputes each text attention itself: the images equal the stock pipeline's, one
    record per block and denoising step (a skip-layer guidance forward is not measured)."""
    name, pipe, run = case
    adapter = get_adapter(pipe)
    resolved = RunOptions.of(None, **run).resolve(pipe)
    session = Session()
    session.probe = Probe.for_spans([adapter.concept_span(p, CONCEPT, resolved.call_kwargs) for p in PROMPTS],
                                    terms="attn_value_out", out_bias=False)
    before = dict(pipe.transformer.attn_processors)
    with instrument(adapter, session):
        session.begin_call(len(PROMPTS))
        got = pipe(PROMPTS, generator=[torch.Generator().manual_seed(0) for _ in PROMPTS], output_type="np",
                   **resolved.call_kwargs).images
    assert len(session.probe.records) == len(adapter.block_names()) * run["num_inference_steps"]
    assert np.array_equal(got, plain(pipe, PROMPTS, run))
    after = pipe.transformer.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_contribution_localizes_the_concept(case):
    name, pipe, run = case
    loc = ditloc.localize(pipe, PROMPTS, CONCEPT, method="contribution", **run)
    n_blocks = len(get_adapter(pipe).block_names())
    assert loc.per_sample_step.shape == (n_blocks, run["num_inference_steps"], len(PROMPTS))
    assert torch.isfinite(loc.per_sample_step).all() and loc.per_sample_step.abs().min() > 0
    assert sorted(loc.ranking) == sorted(loc.blocks)
    assert all(len(s.positions) > 1 for s in loc.spans)  # the concept's pieces


localize_patch = functools.partial(ditloc.localize, method="patch", clean_prompts=CLEAN)


def test_skip_layer_guidance_takes_the_intervention():
    """SD3.5's skip-layer guidance pass reads the prompt: withholding leaves it out there too; a plain
    run and a patch localization are the same with the guidance pass instrumented."""
    pipe, run = pipeline("sd35"), {**SD3_RUN, **SLG}
    assert not np.array_equal(plain(pipe, PROMPTS, run), plain(pipe, PROMPTS, SD3_RUN))  # the guidance acts
    loc = localize_patch(pipe, PROMPTS, CONCEPT, **run)
    assert loc.per_sample_step.shape == (3, 3, 2) and torch.isfinite(loc.per_sample_step).all()
    # the scores measure the step's own forward: the guidance pass changes only the trajectory
    assert not torch.equal(loc.per_sample_step, localize_patch(pipe, PROMPTS, CONCEPT, **SD3_RUN).per_sample_step)
