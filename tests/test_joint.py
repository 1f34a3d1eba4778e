"""Joint-attention DiTs (FLUX, SD3/SD3.5): streaming contributions, intervention
invariants, and concept positions in the text stream the transformer reads."""

import copy
import functools
import numpy as np
import pytest
import torch

import ditloc
from ditloc.adapters import get_adapter
from ditloc.testing import tiny_flux_pipeline, tiny_sd3_pipeline

from test_contribution import naive, naive_rtol

localize_contribution = functools.partial(ditloc.localize, method="contribution")

FLUX_RUN = dict(num_inference_steps=3, height=16, width=16, max_sequence_length=32)
SD3_RUN = dict(num_inference_steps=3, height=8, width=8, max_sequence_length=32)
PROMPTS = ["a photo of van gogh in the city", "van gogh painting of a dog"]
CLEAN = ["a photo in the city", "painting of a dog"]  # derive_clean_prompt of PROMPTS


def _quiet(p):
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def flux():
    return _quiet(tiny_flux_pipeline())


@pytest.fixture(scope="module")
def flux_cfg():
    return _quiet(tiny_flux_pipeline(guidance_embeds=False))


@pytest.fixture(scope="module")
def sd3():
    return _quiet(tiny_sd3_pipeline())


CASES = {
    "flux": (FLUX_RUN, {}),
    "flux_cfg": (FLUX_RUN, {"negative_prompt": "a dog", "true_cfg_scale": 2.0}),  # true CFG: separate calls
    "sd3": (SD3_RUN, {}),
}


@pytest.fixture(params=list(CASES))
def case(request):
    run, extra = CASES[request.param]
    pipe = request.getfixturevalue(request.param)
    return request.param, pipe, {**run, **extra}


def plain(pipe, prompts, run, seeds=None):
    seeds = seeds or [0] * len(prompts)
    return pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np", **run).images


def test_block_names(flux, sd3):
    assert get_adapter(flux).block_names() == ["double.0", "double.1", "single.0", "single.1"]
    assert get_adapter(sd3).block_names() == ["block.0", "block.1", "block.2"]


def test_withhold_nothing_is_bit_identical(case):
    name, pipe, run = case
    out = ditloc.generate(pipe, PROMPTS, withhold=[], concept="van gogh", output_type="np", **run)
    assert np.array_equal(out, plain(pipe, PROMPTS, run))


def test_withhold_everywhere_with_clean_pooled_equals_clean_prompt(case):
    name, pipe, run = case
    if name == "sd3":
        # batched CFG: the clean pass runs the conditional rows alone (half the batch), whose matmul rounding
        # differs from the reference's full batch; in float64 that is ~1e-16 relative per forward, far below 1e-10
        pipe = copy.deepcopy(pipe).to(torch.float64)
        out = ditloc.generate(pipe, PROMPTS, withhold="all", concept="van gogh", output_type="latent", **run)
        want = pipe(CLEAN, generator=[torch.Generator().manual_seed(0) for _ in CLEAN], output_type="latent",
                    **run).images
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    else:
        assert np.array_equal(ditloc.generate(pipe, PROMPTS, withhold="all", concept="van gogh", output_type="np",
                                              **run), plain(pipe, CLEAN, run))
    want = plain(pipe, CLEAN, run)
    assert np.abs(plain(pipe, PROMPTS, run) - want).max() > 1e-3  # the test can fail


def test_inject_everywhere_is_plain(case):
    name, pipe, run = case
    out = ditloc.generate(pipe, PROMPTS, inject="all", concept="van gogh", output_type="np", **run)
    assert np.array_equal(out, plain(pipe, PROMPTS, run))


def test_inject_nowhere_equals_clean_prompt(flux):
    out = ditloc.generate(flux, PROMPTS, inject=[], concept="van gogh", output_type="np", **FLUX_RUN)
    assert np.array_equal(out, plain(flux, CLEAN, FLUX_RUN))


def test_partial_withhold_and_pooled_option(flux):
    base = plain(flux, PROMPTS, FLUX_RUN)
    some = ditloc.generate(flux, PROMPTS, withhold=["double.1", "single.0"], concept="van gogh",
                           output_type="np", **FLUX_RUN)
    some_full_pooled = ditloc.generate(flux, PROMPTS, withhold=["double.1", "single.0"], pooled="full",
                                       concept="van gogh", output_type="np", **FLUX_RUN)
    only_pooled = ditloc.generate(flux, PROMPTS, withhold=[], pooled="clean", concept="van gogh",
                                  output_type="np", **FLUX_RUN)
    for a, b in ((some, base), (some, some_full_pooled), (only_pooled, base), (some_full_pooled, base)):
        assert not np.array_equal(a, b)
    with pytest.raises(ditloc.DitlocError, match="pooled must be"):
        ditloc.generate(flux, PROMPTS, withhold=[], pooled="x", concept="van gogh", **FLUX_RUN)


def _record_sdpa(monkeypatch, transformer):
    """q/k/v of every SDPA call made inside the transformer (not the text encoders)."""
    calls, inside = [], [False]
    real = torch.nn.functional.scaled_dot_product_attention
    transformer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    transformer.register_forward_hook(lambda *a: inside.__setitem__(0, False))

    def spy(*args, **kwargs):
        if not inside[0]:
            return real(*args, **kwargs)
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
        calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def sdpa_calls_of(monkeypatch, transformer, run) -> list:
    """q/k/v of every SDPA call the transformer makes during `run()`; its hooks and SDPA restored after."""
    hooks = dict(transformer._forward_pre_hooks), dict(transformer._forward_hooks)
    calls = _record_sdpa(monkeypatch, transformer)
    try:
        run()
    finally:
        monkeypatch.undo()
        transformer._forward_pre_hooks.clear()
        transformer._forward_pre_hooks.update(hooks[0])
        transformer._forward_hooks.clear()
        transformer._forward_hooks.update(hooks[1])
    return calls


NAIVE_CASES = [(c, v, b) for c in ("flux", "sd3") for v in ("attn", "attn_value", "attn_value_out") for b in (False, True)]
NAIVE_CASES.append(("flux_cfg", "attn_value_out", False))  # true CFG: the cond call of each step is measured


@pytest.mark.parametrize("case_name,terms,out_bias", NAIVE_CASES)
def test_streaming_matches_naive_joint_maps(request, case_name, terms, out_bias, monkeypatch):
    """Record every joint attention's q/k/v in a plain run (same trajectory), materialize the
    maps, and apply the contribution formula with image queries and the concept's text keys."""
    name, pipe = case_name, request.getfixturevalue(case_name)
    run = {**CASES[name][0], **CASES[name][1]}
    prompts = PROMPTS
    loc = localize_contribution(pipe, prompts, "van gogh", contribution_terms=terms, out_bias=out_bias, **run)
    adapter = get_adapter(pipe)
    calls = sdpa_calls_of(monkeypatch, pipe.transformer, lambda: plain(pipe, prompts, run))
    calls = [c for c in calls if c[1].shape[2] > 64]  # joint attentions (SD3.5's attn2 is image-only)
    names = adapter.block_names()
    n = len(prompts)
    per_call = len(names) * (2 if name == "flux_cfg" else 1)  # true CFG: cond call, then uncond call
    assert len(calls) == per_call * run["num_inference_steps"]
    for step in range(run["num_inference_steps"]):
        for b, block in enumerate(names):
            q, k, v = calls[step * per_call + b]  # cond call comes first
            rows = adapter.cond_rows(q.shape[0], n)
            q, k, v = q[rows], k[rows], v[rows]
            total, n_img = k.shape[2], 64  # both tiny models: 8x8 image tokens
            if name.startswith("flux"):  # text first
                img, offset = slice(total - n_img, total), 0
            else:  # SD3: image first
                img, offset = slice(0, n_img), n_img
            positions = [[offset + p for p in s.positions] for s in loc.spans]
            weight, bias = adapter.out_projection(block)()
            t, h = naive(q[:, :, img], k, v, positions, None, weight.detach(),
                         bias.detach() if out_bias else None, terms)
            tol = naive_rtol(q[:, :, img], k, weight, positions)  # the float32 kernel against float64
            torch.testing.assert_close(loc.per_sample_step[b, step].double(), t, rtol=tol, atol=1e-12)
            torch.testing.assert_close(loc.per_head_step[b, step].double(), h, rtol=tol, atol=1e-12)


def test_single_block_projection_is_the_attention_slice(flux):
    adapter = get_adapter(flux)
    w, b = adapter.out_projection("single.0")()
    block = flux.transformer.single_transformer_blocks[0]
    dim = block.attn.heads * block.attn.head_dim
    assert w.shape == (block.proj_out.out_features, dim)
    assert torch.equal(w, block.proj_out.weight[:, :dim]) and b is block.proj_out.bias


def t5_ids_seen_by_transformer(pipe, t5, prompt, run):
    """Replace the T5 encoder's output by its input ids; capture the text the transformer receives."""
    seen = {}

    def t5_hook(module, args, kwargs, out):
        ids = args[0] if args else kwargs["input_ids"]
        out[0].copy_(ids[..., None].to(out[0].dtype).expand_as(out[0]))
        return out

    def tr_hook(module, args, kwargs):
        seen.setdefault("embeds", kwargs["encoder_hidden_states"].clone())

    h1 = t5.register_forward_hook(t5_hook, with_kwargs=True)
    h2 = pipe.transformer.register_forward_pre_hook(tr_hook, with_kwargs=True)
    try:
        pipe(prompt, output_type="latent", **{**run, "num_inference_steps": 2})
    finally:
        h1.remove()
        h2.remove()
    return seen["embeds"]


PROMPT = "the van gogh, at night: van gogh"


def test_flux_positions_index_the_t5_stream(flux):
    span = get_adapter(flux).concept_span(PROMPT, "Van Gogh", {})
    embeds = t5_ids_seen_by_transformer(flux, flux.text_encoder_2, PROMPT, FLUX_RUN)
    # the transformer's text stream is the projected T5 output; ids survive as channel 0 of the raw stream
    raw_ids = flux.tokenizer_2(PROMPT)["input_ids"]
    want = flux.tokenizer_2("van gogh", add_special_tokens=False)["input_ids"]
    assert [raw_ids[p] for p in span.positions] == want * 2
    assert embeds[0, list(span.positions), 0].round().long().tolist() == want * 2
    # the test would catch CLIP positions applied to the T5 stream: they differ here
    clip = flux.tokenizer(PROMPT, return_offsets_mapping=True)
    clip_pos = [i for i, (a, b) in enumerate(clip["offset_mapping"]) if b > a and PROMPT[a:b] in ("van", "gogh")]
    assert clip_pos != list(span.positions)


def test_sd3_positions_index_clip_and_t5_parts(sd3):
    adapter = get_adapter(sd3)
    span = adapter.concept_span(PROMPT, "van gogh", {})
    clip_len = sd3.tokenizer_max_length
    clip_part = [p for p in span.positions if p < clip_len]
    t5_part = [p - clip_len for p in span.positions if p >= clip_len]
    clip_ids = sd3.tokenizer(PROMPT)["input_ids"]
    assert [clip_ids[p] for p in clip_part] == sd3.tokenizer("van gogh", add_special_tokens=False)["input_ids"] * 2
    embeds = t5_ids_seen_by_transformer(sd3, sd3.text_encoder_3, PROMPT, SD3_RUN)
    want = sd3.tokenizer_3("van gogh", add_special_tokens=False)["input_ids"]
    cond = embeds.shape[0] // 2  # [uncond, cond]
    assert embeds[cond, [clip_len + p for p in t5_part], 0].round().long().tolist() == want * 2
    assert clip_part != t5_part


def test_flux_truncated_concept(flux):
    with pytest.raises(ditloc.DitlocError, match="cut off"):
        get_adapter(flux).concept_span("a photo of a dog by van gogh", "van gogh", {"max_sequence_length": 6})


def test_sd3_text_stream_option(sd3):
    both = localize_contribution(sd3, ["a photo of van gogh"], "van gogh", **SD3_RUN)
    t5 = localize_contribution(sd3, ["a photo of van gogh"], "van gogh", adapter_options={"text_stream": "t5"}, **SD3_RUN)
    clip = localize_contribution(sd3, ["a photo of van gogh"], "van gogh", adapter_options={"text_stream": "clip"}, **SD3_RUN)
    clip_len = sd3.tokenizer_max_length
    assert set(both.spans[0].positions) == set(t5.spans[0].positions) | set(clip.spans[0].positions)
    assert all(p >= clip_len for p in t5.spans[0].positions) and all(p < clip_len for p in clip.spans[0].positions)
    assert t5.settings["adapter_options"] == {"text_stream": "t5"}
    with pytest.raises(ditloc.DitlocError, match="text_stream must be one of"):
        localize_contribution(sd3, ["a photo of van gogh"], "van gogh", adapter_options={"text_stream": "x"}, **SD3_RUN)
    with pytest.raises(ditloc.DitlocError, match="sd3 has no option 'bogus'"):
        get_adapter(sd3, bogus=1)
    no_t5 = _quiet(tiny_sd3_pipeline(with_t5=False))
    assert all(p < clip_len for p in get_adapter(no_t5).concept_span("a photo of van gogh", "van gogh", {}).positions)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_cli_on_saved_joint_pipelines(family, tmp_path, capsys):
    from ditloc.cli import main
    from ditloc.testing import main as save

    model = str(tmp_path / family)
    assert save(["save", model, "--family", family]) == 0
    size = ["--steps", "2", "--max-sequence-length", "32"]
    assert main(["localize", model, "--concept", "van gogh", "--prompt", "a photo of van gogh",
                 "--out", str(tmp_path / "loc"), *size]) == 0
    import json

    d = json.loads((tmp_path / "loc" / "localization.json").read_text())
    assert d["settings"]["family"] == family and len(d["blocks"]) == (4 if family == "flux" else 3)
    code = main(["intervene", model, "--concept", "van gogh", "--prompt", "a photo of van gogh", "--k", "1",
                 "--localization", str(tmp_path / "loc" / "localization.json"), "--out", str(tmp_path / "iv"), *size])
    assert code == 0 and (tmp_path / "iv" / "intervened.png").is_file()
    capsys.readouterr()
