"""Interventions around the user's own pipeline call (`ditloc.withheld` / `ditloc.injected`) and
head- and step-level withholding, on tiny pipelines of every family in float64 (exact comparisons)."""

import json

import numpy as np
import pytest
import torch

import ditloc
from ditloc import DitlocError
from ditloc.evaluate.base import Evaluator
from ditloc.testing import (
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
)

from conftest import DEVICE
from cli_helpers import run_main as run_cli

PROMPTS = ["a photo of van gogh in the city", "van gogh painting of a dog"]
CONCEPT = "van gogh"
CROSS_RUN = dict(num_inference_steps=3, height=32, width=32, use_resolution_binning=False)
FAMILIES = {
    "pixart": (tiny_pixart_pipeline, CROSS_RUN),
    "sana": (tiny_sana_pipeline, CROSS_RUN),
    "flux": (tiny_flux_pipeline, dict(num_inference_steps=3, height=16, width=16, max_sequence_length=32)),
    "sd3": (tiny_sd3_pipeline, dict(num_inference_steps=3, height=8, width=8, max_sequence_length=32)),
}
_PIPES = {}


def _family(name):
    """(pipeline in float64, run settings, block names, heads per block), built once per module."""
    if name not in _PIPES:
        build, run = FAMILIES[name]
        pipe = build().to(DEVICE, torch.float64)
        pipe.set_progress_bar_config(disable=True)
        adapter = ditloc.get_adapter(pipe)
        names = adapter.block_names()
        _PIPES[name] = pipe, run, names, adapter.text_attention(names[0]).heads
    return _PIPES[name]


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return _family(request.param)


def generators(seeds=(0, 0)):
    return [torch.Generator().manual_seed(s) for s in seeds]


def call(pipe, run, prompts=PROMPTS, seeds=(0, 0), **kw):
    """The user's own pipeline call."""
    return pipe(prompt=prompts, generator=generators(seeds), output_type="np", **{**run, **kw}).images


def gen(pipe, run, **kw):
    return ditloc.generate(pipe, PROMPTS, concept=CONCEPT, output_type="np", **run, **kw)


def state(pipe):
    """Everything an intervention installs: processor objects, transformer hooks, the pipeline's own attributes."""
    t = pipe.transformer
    return ([m.processor for m in t.modules() if hasattr(m, "processor")],
            [dict(m._forward_pre_hooks) for m in t.modules()], [dict(m._forward_hooks) for m in t.modules()],
            sorted(vars(pipe)))


def same_state(a, b):
    return all(x is y for x, y in zip(a[0], b[0])) and len(a[0]) == len(b[0]) and a[1:] == b[1:]


# ---- the context is ditloc.generate ------------------------------------------------------------------------

def test_context_equals_generate(family):
    pipe, run, names, n_heads = family
    blocks, heads, steps = names[1:3], {names[1]: [0], names[2]: [n_heads - 1]}, [0, 2]
    plain = call(pipe, run)
    with ditloc.withheld(pipe, blocks, CONCEPT, heads=heads, steps=steps) as record:
        inside = call(pipe, run)
    assert np.array_equal(inside, gen(pipe, run, withhold=blocks, heads=heads, steps=steps))
    assert np.abs(inside - plain).max() > 1e-4  # the intervention changes the image (the test can fail)
    assert record.clean_prompts == ["a photo in the city", "painting of a dog"] and record.calls == 1
    with ditloc.injected(pipe, blocks, CONCEPT, heads=[0], steps=steps):
        inside = call(pipe, run)
    assert np.array_equal(inside, gen(pipe, run, inject=blocks, heads=[0], steps=steps))
    assert np.abs(inside - plain).max() > 1e-4


def test_context_with_images_per_prompt_and_clean_prompt():
    pipe, run, names, _ = _family("pixart")
    with ditloc.withheld(pipe, names[:2], clean_prompt="a photo of a dog", heads=[1]):
        inside = pipe(prompt=PROMPTS[0], num_images_per_prompt=2, generator=generators((3, 4)), output_type="np",
                      **run).images
    want = ditloc.generate(pipe, PROMPTS[0], withhold=names[:2], clean_prompts=["a photo of a dog"], heads=[1],
                           seed=[3, 4], output_type="np", **run)
    assert np.array_equal(inside, want)


def test_context_with_flux_true_cfg():
    """A negative prompt encoded in a second `encode_prompt` call is not taken for the prompt."""
    pipe = tiny_flux_pipeline(guidance_embeds=False).to(DEVICE, torch.float64)
    pipe.set_progress_bar_config(disable=True)
    run = {**FAMILIES["flux"][1], "negative_prompt": "a dog", "true_cfg_scale": 2.0}
    with ditloc.withheld(pipe, ["double.1", "single.0"], CONCEPT, heads=[1], steps=[1]):
        inside = call(pipe, run)
    assert np.array_equal(inside, gen(pipe, run, withhold=["double.1", "single.0"], heads=[1], steps=[1]))


# ---- heads and steps: their limits are the whole block, the whole run and the plain run --------------------

def test_all_heads_is_the_whole_block(family):
    pipe, run, names, n_heads = family
    every = list(range(n_heads))
    whole = gen(pipe, run, withhold=names[1:3])
    assert np.array_equal(gen(pipe, run, withhold=names[1:3], heads=every), whole)
    assert np.array_equal(gen(pipe, run, withhold=names[1:3], heads=[every, every]), whole)  # one list per block
    one = gen(pipe, run, withhold=names[1:3], heads=[0])
    assert np.abs(one - whole).max() > 1e-6 and np.abs(one - call(pipe, run)).max() > 1e-6  # between the two
    assert np.array_equal(gen(pipe, run, inject=names[1:3], heads=every), gen(pipe, run, inject=names[1:3]))


def test_all_steps_is_the_whole_run(family):
    pipe, run, names, _ = family
    steps = range(run["num_inference_steps"])
    assert np.array_equal(gen(pipe, run, withhold=names[:2], steps=steps), gen(pipe, run, withhold=names[:2]))
    assert np.array_equal(gen(pipe, run, inject=names[:2], steps=steps), gen(pipe, run, inject=names[:2]))
    first = gen(pipe, run, withhold=names[:2], steps=[0])
    assert np.abs(first - gen(pipe, run, withhold=names[:2])).max() > 1e-6


def test_no_heads_no_steps_no_blocks_is_the_plain_run(family):
    pipe, run, names, _ = family
    plain = call(pipe, run)
    for kw in ({"heads": []}, {"steps": []}, {"heads": {names[0]: []}}):
        blocks = names[:1] if "heads" in kw and isinstance(kw["heads"], dict) else names
        with ditloc.withheld(pipe, blocks, CONCEPT, **kw):
            assert np.array_equal(call(pipe, run), plain), kw
    with ditloc.withheld(pipe, [], CONCEPT):
        assert np.array_equal(call(pipe, run), plain)


def test_injected_mirrors(family):
    """Injecting into no head, at no step or into no block is the clean prompt's run."""
    pipe, run, names, _ = family
    clean = gen(pipe, run, withhold="all")
    for kw in ({"heads": []}, {"steps": []}):
        with ditloc.injected(pipe, names[:2], CONCEPT, **kw):
            assert np.array_equal(call(pipe, run), clean), kw
    with ditloc.injected(pipe, [], CONCEPT):
        assert np.array_equal(call(pipe, run), clean)
    plain = call(pipe, run)
    with ditloc.injected(pipe, "all", CONCEPT):
        assert np.array_equal(call(pipe, run), plain)
    # withholding B in head 0 == injecting into the other heads of B and into every head of the other blocks
    n_heads = family[3]
    others = [b for b in names if b not in names[:2]]
    heads = {**{b: list(range(1, n_heads)) for b in names[:2]}, **{b: list(range(n_heads)) for b in others}}
    withheld = gen(pipe, run, withhold=names[:2], heads=[0])
    with ditloc.injected(pipe, names, CONCEPT, heads=heads):
        assert np.array_equal(call(pipe, run), withheld)


# ---- everything installed is undone -------------------------------------------------------------------------

def test_restored_after_exit_exception_and_refused_nesting(family):
    pipe, run, names, _ = family
    before = state(pipe)
    with ditloc.withheld(pipe, names[:1], CONCEPT, heads=[0], steps=[1]):
        assert not same_state(state(pipe), before)
        call(pipe, run)
    assert same_state(state(pipe), before)
    with pytest.raises(RuntimeError, match="user code"), ditloc.injected(pipe, names[:1], CONCEPT):
        call(pipe, run)
        raise RuntimeError("user code failed inside the context")
    assert same_state(state(pipe), before)
    with ditloc.withheld(pipe, names[:1], CONCEPT):
        inside = state(pipe)
        with pytest.raises(DitlocError, match="do not nest"), ditloc.withheld(pipe, names[1:2], CONCEPT):
            pass
        assert same_state(state(pipe), inside)  # the refused inner context changed nothing
    assert same_state(state(pipe), before)
    assert np.array_equal(call(pipe, run), gen(pipe, run))  # the pipeline runs as it did before


def test_error_inside_a_call_restores():
    pipe, run, names, _ = _family("sana")
    before = state(pipe)
    with pytest.raises(DitlocError, match="not in prompt"), ditloc.withheld(pipe, names, CONCEPT):
        call(pipe, run, prompts=["a photo of a dog"])
    assert same_state(state(pipe), before)


# ---- calls the context cannot read, and bad values ----------------------------------------------------------

def test_unreadable_calls_are_refused(family):
    pipe, run, names, _ = family
    adapter = ditloc.get_adapter(pipe)
    text = adapter.encode_text(PROMPTS, {k: v for k, v in run.items() if k == "max_sequence_length"})
    with ditloc.withheld(pipe, names[:1], CONCEPT):
        with pytest.raises(DitlocError, match="call the pipeline with prompt="):
            kw = ({"prompt_embeds": text["embeds"], "pooled_prompt_embeds": text["pooled"]} if "pooled" in text
                  else {"prompt_embeds": text["embeds"], "prompt_attention_mask": text["mask"],
                        "negative_prompt": ""})
            pipe(generator=generators(), output_type="np", **run, **kw)
        with pytest.raises(DitlocError, match="could not read this call's prompt"):
            latents = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
            pipe.transformer(latents, encoder_hidden_states=text["embeds"][:1], timestep=torch.zeros(1))


def test_bad_heads_and_steps(family):
    pipe, run, names, n_heads = family
    with pytest.raises(DitlocError, match=rf"head {n_heads} is out of range: {names[0]} has {n_heads} heads"), \
            ditloc.withheld(pipe, names[:1], CONCEPT, heads=[0, n_heads]):
        pass
    with pytest.raises(DitlocError, match="step 3 is out of range: the run has 3 denoising steps"):
        gen(pipe, run, withhold=names[:1], steps=[3])
    before = state(pipe)
    with ditloc.withheld(pipe, names[:1], CONCEPT, steps=[0, 5]), \
            pytest.raises(DitlocError, match="step 5 is out of range: the run has 3 denoising steps"):
        call(pipe, run)
    assert same_state(state(pipe), before)


@pytest.mark.parametrize("kw,message", [
    ({"heads": [-1]}, "0 or more"),
    ({"heads": [0.5]}, "whole numbers"),
    ({"heads": [[0], [0], [0]]}, "3 head lists for 2 blocks"),
    ({"heads": {"block.3": [0]}}, "block.3, which is not intervened on"),
    ({"heads": {"block.9": [0]}}, "unknown block 'block.9'"),
    ({"steps": [True]}, "whole numbers"),
    ({"steps": "0,x"}, "comma-separated list of numbers"),
])
def test_bad_values_are_one_line_errors(kw, message):
    pipe, run, _, _ = _family("pixart")
    with pytest.raises(DitlocError, match=message):
        gen(pipe, run, withhold=["block.0", "block.1"], **kw)
    with pytest.raises(DitlocError, match="narrow an intervention"):
        gen(pipe, run, heads=[0])


# ---- presence --------------------------------------------------------------------------------------------------

class MeanRed(Evaluator):
    """A stand-in evaluator: each image's mean red value in [0, 1]."""

    def _score_batch(self, images, texts):
        return np.array([np.asarray(im, dtype=np.float64)[..., 0].mean() / 255 for im in images])


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_presence_with_heads_and_steps_scores_the_generated_images(name):
    pipe, run, names, _ = _family(name)
    evaluator = MeanRed()
    heads, steps = {names[1]: [1]}, [1, 2]
    result = ditloc.presence(pipe, PROMPTS, CONCEPT, [names[:2]], evaluator=evaluator, heads=heads, steps=steps,
                             **run)
    images = ditloc.generate(pipe, PROMPTS, withhold=names[:2], concept=CONCEPT, heads=heads, steps=steps, **run)
    assert np.array_equal(result.per_image[1], evaluator.score(images, CONCEPT))
    assert result.settings["heads"] == {names[1]: [1]} and result.settings["steps"] == [1, 2]
    with pytest.raises(DitlocError, match="need objective='evaluator'"):
        ditloc.presence(pipe, PROMPTS, CONCEPT, [names[:1]], objective="self", steps=[0], **run)


# ---- command line ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "pixart"
    tiny_pixart_pipeline().save_pretrained(path)
    return str(path)


INTERVENE = ["intervene", "--concept", "van gogh", "--prompt", "a photo of van gogh", "--blocks", "block.1",
             "--steps", "2"]


def test_cli_withhold_heads_and_steps(model_dir, tmp_path, capsys):
    out = tmp_path / "iv"
    code, stdout, err = run_cli([*INTERVENE[:1], model_dir, *INTERVENE[1:], "--withhold-heads", "2,0",
                                 "--withhold-steps", "1", "--out", str(out)], capsys)
    assert code == 0, err
    rec = json.loads((out / "intervention.json").read_text())
    assert rec["heads"] == [0, 2] and rec["steps"] == [1]
    assert "(heads 0,2) at steps 1" in stdout


@pytest.mark.parametrize("args,message", [
    (["--withhold-heads", "4"], "head 4 is out of range: block.1 has 4 heads"),
    (["--withhold-heads", "a"], "--withhold-heads takes 0-based heads"),
    (["--withhold-heads", ","], "--withhold-heads is empty"),
    (["--withhold-steps", "2"], "--withhold-steps 2 is out of range: the run has --steps 2"),
    (["--withhold-steps", "-1"], "--withhold-steps takes 0-based steps"),
])
def test_cli_bad_heads_and_steps(model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "o"
    code, _, err = run_cli([*INTERVENE[:1], model_dir, *INTERVENE[1:], *args, "--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ditloc: error:") and message in lines[0], err
    assert not out.exists() or not any(out.iterdir())  # refused before any image was generated
