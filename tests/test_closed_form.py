"""Closed-form localized unlearning: the solve is the stated
least-squares optimum, only the chosen blocks' text projections change, the edit
saves and loads, every family, and bad input is refused before any work."""

from __future__ import annotations

import json

import pytest
import torch

from ditloc.adapters import get_adapter
from ditloc.cli import main as cli_main
from ditloc.edit import ClosedFormConfig, load_edit, unlearn
from ditloc.edit.closed_form import _Moments, align
from ditloc.errors import DitlocError
from ditloc.testing import (
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
)

PROMPTS = ["a red dog on the beach", "a photo of a dog", "a blue dog in the forest"]
PRESERVE = ["a red cat on the beach", "a blue bird in the forest", "a photo of a car"]


def _weights(pipe):
    return {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}


def test_align_maps_replaced_deleted_and_equal_tokens():
    changed, same = align([1, 2, 3, 4, 0, 0], [1, 7, 3, 4, 0, 0])  # one word replaced
    assert changed == [(1, 1)] and same == [(0, 0), (2, 2), (3, 3), (4, 4), (5, 5)]
    changed, same = align([1, 2, 8, 9, 3, 0, 0], [1, 2, 3, 0, 0, 0, 0])  # a phrase dropped
    assert changed == [(2, 2), (3, 2)]  # both map to the token now at the deletion point
    assert (4, 2) in same
    changed, _ = align([1, 5, 6, 3], [1, 7, 3])  # two tokens replaced by one
    assert changed == [(1, 1), (2, 1)]
    changed, _ = align([1, 5, 6, 3], [1, 7, 8, 9, 3])  # "at night" -> "in the forest": ends to ends
    assert changed == [(1, 1), (2, 3)]
    changed, _ = align([1, 5, 3], [1, 7, 8, 3])  # "zibbit" -> "green triangle": to the head word
    assert changed == [(1, 2)]


def test_solve_is_the_least_squares_optimum():
    """W' = W M satisfies the normal equations of
    mean|W'c - Wa|^2 + lam mean|W'd - Wd|^2 + mu'|W' - W|^2 (gradient zero), and is
    better than nearby matrices."""
    g = torch.Generator().manual_seed(0)
    dim, out = 6, 5
    c, a, d = (torch.randn(n, dim, generator=g, dtype=torch.float64) for n in (9, 9, 20))
    w = torch.randn(out, dim, generator=g, dtype=torch.float64)
    m = _Moments(dim, "cpu")
    m.add_pairs(c, a)
    m.add_preserve(d)
    lam, mu = 0.7, 1e-2
    M = m.solve(lam, mu)
    ridge = mu * float(torch.trace(c.T @ c / 9 + lam * d.T @ d / 20)) / dim

    def objective(wp):
        return ((c @ wp.T - a @ w.T).pow(2).sum(1).mean() + lam * (d @ wp.T - d @ w.T).pow(2).sum(1).mean()
                + ridge * (wp - w).pow(2).sum())

    wp = (w @ M).requires_grad_(True)
    grad, = torch.autograd.grad(objective(wp), wp)
    assert grad.abs().max() < 1e-10
    for _ in range(5):
        assert objective(wp.detach() + 1e-3 * torch.randn(out, dim, generator=g, dtype=torch.float64)) > objective(wp)


@pytest.mark.parametrize("make, blocks, kw", [
    (tiny_pixart_pipeline, "block.1,block.2", {}),
    (tiny_sana_pipeline, "block.1", {"height": 32, "width": 32, "use_resolution_binning": False}),
    (tiny_flux_pipeline, "double.0,double.1", {"height": 16, "width": 16}),
    (tiny_sd3_pipeline, "block.0,block.2", {"height": 8, "width": 8}),
])
def test_closed_form_edits_only_text_projections_and_maps_concept_to_anchor(tmp_path, make, blocks, kw):
    pipe = make()
    adapter = get_adapter(pipe)
    before = _weights(pipe)
    call = {"max_sequence_length": 16}
    text = {k: v.detach() for k, v in adapter.encode_text([PROMPTS[0], "a red cat on the beach", PRESERVE[1]],
                                                          call).items()}
    chosen = adapter.resolve_blocks(blocks)
    projections = [p for b in chosen for p in adapter.text_projections(b)]
    res = unlearn(pipe, "dog", "cat", prompts=PROMPTS, preserve=PRESERVE, blocks=blocks, out=tmp_path,
                  config=ClosedFormConfig(timesteps=2, preserve_weight=1.0), num_inference_steps=2,
                  pipeline_kwargs=kw, **call)
    after = _weights(pipe)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {f"{p}.weight" for p in projections}  # nothing else, not even biases
    # the fit: concept rows land near their anchors, preserved rows barely move
    for path, fit in res.details["fit"].items():
        assert fit["concept_residual"] < 0.5, (path, fit)
        assert fit["preserve_change"] < 0.05, (path, fit)
    # the edit as the block reads it: the projected concept states approach the anchor's
    named = dict(pipe.transformer.named_modules())
    first = projections[0]
    if not adapter.text_states_depend_on_image:  # cross-attention: the states are the projected embeddings
        block = adapter.block_module(chosen[0])
        states = _cross_states(pipe, adapter, block, text)
        w0 = before[f"{first}.weight"]
        w1 = named[first].weight.detach()
        span_c = adapter.concept_span(PROMPTS[0], "dog", call).positions
        span_a = adapter.concept_span("a red cat on the beach", "cat", call).positions
        c, a = states[0, list(span_c)], states[1, list(span_a)]
        gap0 = (c @ w0.T - a @ w0.T).norm()
        gap1 = (c @ w1.T - a @ w0.T).norm()
        assert gap1 < 0.5 * gap0
    # saved as the changed weights only; load_edit reproduces them on a fresh pipeline
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "blocks.safetensors"))
    assert set(saved) == moved
    fresh = make()
    record = load_edit(fresh, tmp_path)
    assert record["config"]["method"] == "closed-form"
    for k, v in _weights(fresh).items():
        assert torch.equal(v, after[k]), k


def _cross_states(pipe, adapter, block, text):
    """What attn2.to_k of `block` reads for `text` (one forward, recorded)."""
    seen = {}
    handle = block.attn2.to_k.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    try:
        from ditloc.edit.jobs import _blank_latents

        x = _blank_latents(pipe, {"height": 32, "width": 32}).expand(len(text["embeds"]), -1, -1, -1)
        with torch.no_grad():
            adapter.denoise(x, torch.full((len(x),), 500.0), text)
    finally:
        handle.remove()
    return seen["x"]


def test_closed_form_is_deterministic_and_fast_path_needs_no_images(tmp_path):
    runs = []
    for i in range(2):
        pipe = tiny_pixart_pipeline()
        unlearn(pipe, "dog", "cat", prompts=PROMPTS, blocks="block.0", config=ClosedFormConfig(),
                out=tmp_path / str(i), num_inference_steps=2)
        runs.append(pipe.transformer.transformer_blocks[0].attn2.to_v.weight.detach().clone())
        assert not (tmp_path / str(i) / "anchor_latents.safetensors").exists()  # cross-attention: no sampling
    assert torch.equal(runs[0], runs[1])


def test_auto_blocks_skip_flux_single_stream(tmp_path):
    pipe = tiny_flux_pipeline()
    res = unlearn(pipe, "dog", "cat", prompts=PROMPTS[:2], blocks="auto", k=2, out=tmp_path,
                  config=ClosedFormConfig(timesteps=1), num_inference_steps=2, height=16, width=16,
                  max_sequence_length=16)
    assert all(b.startswith("double.") for b in res.blocks) and len(res.blocks) == 2
    loc = json.loads((tmp_path / "localization.json").read_text())
    assert len(loc["blocks"]) == 4  # localized over every block, chose among the editable ones


@pytest.mark.parametrize("kwargs, message", [
    (dict(blocks="single.0"), "single-stream block"),
    (dict(anchor="a dog"), "contains the concept"),
    (dict(preserve=[]), "preservation set is empty"),
    (dict(preserve=["a dog at night"]), "preservation prompt 1"),
    (dict(anchor_prompts=["a dog", "a photo of a dog"]), "still contains the concept"),
])
def test_bad_input_refused_before_work(tmp_path, kwargs, message, monkeypatch):
    pipe = tiny_flux_pipeline()
    before = _weights(pipe)
    from ditloc.edit import jobs

    monkeypatch.setattr(jobs, "_generate_latents", lambda *a, **k: pytest.fail("sampled before refusing"))
    args = dict(anchor="cat", prompts=PROMPTS[:2], blocks="double.0", config=ClosedFormConfig(), out=tmp_path)
    args.update(kwargs)
    anchor = args.pop("anchor")
    with pytest.raises(DitlocError, match=message):
        unlearn(pipe, "dog", anchor, **args)
    assert all(torch.equal(v, before[k]) for k, v in _weights(pipe).items())


def test_config_checks():
    with pytest.raises(DitlocError, match="--ridge must be > 0"):
        ClosedFormConfig(ridge=0)
    with pytest.raises(DitlocError, match="positions must be one of"):
        ClosedFormConfig(positions="some")
    with pytest.raises(DitlocError, match="preserve-mode must be one of"):
        ClosedFormConfig(preserve_mode="orthogonal")
    with pytest.raises(DitlocError, match="need --edit-method closed-form or --preserve-target teacher"):
        unlearn(tiny_pixart_pipeline(), "dog", "cat", prompts=PROMPTS, preserve=PRESERVE)
    with pytest.raises(DitlocError, match="--preserve-target applies to trained unlearning"):
        unlearn(tiny_pixart_pipeline(), "dog", "cat", prompts=PROMPTS, config=ClosedFormConfig(),
                preserve_target="teacher")


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pixart")
    tiny_pixart_pipeline().save_pretrained(d)
    return d


def _cli(argv):
    try:
        return cli_main(argv)
    except SystemExit as e:
        return int(e.code)


def test_cli_closed_form(tmp_path, capsys, pixart_dir):
    pres = tmp_path / "keep.txt"
    pres.write_text("\n".join(PRESERVE) + "\n")
    code = _cli(["unlearn", str(pixart_dir), "--concept", "dog", "--anchor", "cat", "--prompt", PROMPTS[0],
                 "--prompt", PROMPTS[1], "--edit-method", "closed-form", "--blocks", "block.1", "--preserve-file", str(pres),
                 "--out", str(tmp_path / "ok")])
    out = capsys.readouterr().out
    assert code == 0 and "unlearn: closed-form edit of 2 projection(s) in block.1" in out, out
    rec = json.loads((tmp_path / "ok" / "ditloc_edit.json").read_text())
    assert rec["details"]["preserve"] == PRESERVE
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code = _cli(["unlearn", str(pixart_dir), "--concept", "dog", "--anchor", "cat", "--prompt", PROMPTS[0],
                 "--edit-method", "closed-form", "--preserve-file", str(empty), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "preservation set is empty" in err and len(err.strip().splitlines()) == 1
    code = _cli(["unlearn", str(pixart_dir), "--concept", "dog", "--anchor", "cat", "--prompt", PROMPTS[0],
                 "--preserve", "a cat", "--out", str(tmp_path / "l")])
    err = capsys.readouterr().err
    assert code == 2 and "or with --preserve-target teacher" in err


def test_k_gap_keeps_the_smallest_top_k_that_closes_the_gap(tmp_path):
    pipe = tiny_pixart_pipeline()
    before = _weights(pipe)
    res = unlearn(pipe, "dog", "cat", prompts=PROMPTS, preserve=PRESERVE, blocks="auto", k="gap",
                  config=ClosedFormConfig(gap_fraction=0.8), out=tmp_path, num_inference_steps=2)
    gaps = res.details["k_gaps"]  # block (in ranking order) -> gap with the top K up to it edited
    ranking = list(gaps)
    assert len(ranking) == 4 and sorted(ranking) == sorted(get_adapter(pipe).block_names())
    values = list(gaps.values())
    k = len(res.blocks)
    assert list(res.blocks) == ranking[:k]
    best = max(1 - v for v in values)
    assert best > 0  # editing moves the prediction toward the anchor
    assert 1 - values[k - 1] >= 0.8 * best
    assert all(1 - v < 0.8 * best for v in values[: k - 1])
    moved = {n for n, v in _weights(pipe).items() if not torch.equal(v, before[n])}
    adapter = get_adapter(pipe)
    assert moved == {f"{p}.weight" for b in res.blocks for p in adapter.text_projections(b)}
    assert (tmp_path / "probe_latents.safetensors").exists()


@pytest.mark.parametrize("extra, message", [
    (["--k", "gap"], "--k gap works with --edit-method closed-form"),
    (["--k", "gap", "--edit-method", "closed-form", "--blocks", "block.1"], "pass --blocks auto"),
    (["--preserve", "a cat"], "used by --edit-method closed-form, or with --preserve-target teacher"),
    (["--edit-method", "closed-form", "--k", "gap", "--gap-fraction", "2"], "--gap-fraction must be in (0, 1]"),
    (["--edit-method", "closed-form", "--gap-fraction", "0.5"], "pass --k gap too"),
    (["--edit-method", "closed-form", "--k", "gap", "--concept", "bird", "--anchor", "a fish"],
     "--k gap measures one concept's edit"),
])
def test_cli_closed_form_bad_input_before_load(tmp_path, capsys, monkeypatch, extra, message):
    from ditloc import cli

    monkeypatch.setattr(cli.models, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    code = _cli(["unlearn", "toy", "--concept", "dog", "--anchor", "cat", "--prompt", PROMPTS[0],
                 "--out", str(tmp_path / "x"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_cli_anchor_with_the_concept_refused_before_load(tmp_path, capsys, monkeypatch):
    from ditloc import cli

    monkeypatch.setattr(cli.models, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    code = _cli(["unlearn", "toy", "--concept", "dog", "--anchor", "a small dog", "--prompt", PROMPTS[0],
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "contains the concept" in err


def test_blocks_from_a_saved_search_and_its_k(tmp_path):
    """`--blocks loc.json`: search once, edit many times; K defaults to the search's own."""
    import ditloc
    from ditloc.localization import SearchConfig

    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    loc = ditloc.localize(pipe, PROMPTS[:2], "dog", method="search", search=SearchConfig(max_k=2, objective="self"),
                          num_inference_steps=2)
    path = loc.save(tmp_path / "loc.json")
    said = []
    res = unlearn(pipe, "dog", "cat", prompts=PROMPTS, preserve=PRESERVE, blocks=str(path),
                  config=ClosedFormConfig(), out=tmp_path / "edit", progress=said.append, num_inference_steps=2)
    weak = loc.search.k_for_drop() is None  # the tiny random model: the set may not halve presence
    # the smallest set that removes 90% of presence is edited; none (a spread concept): every editable block
    erase_k = loc.search.k_for_drop(0.9)
    assert list(res.blocks) == (get_adapter(pipe).block_names() if erase_k is None else loc.top(erase_k))
    assert not any(m.startswith("localizing") for m in said)  # no second localization
    assert any(m.startswith("warning:") for m in said) == weak
    res = unlearn(tiny_pixart_pipeline(), "dog", "cat", prompts=PROMPTS, preserve=PRESERVE, blocks=loc, k=1,
                  config=ClosedFormConfig(), num_inference_steps=2)
    assert list(res.blocks) == loc.top(1)


def test_weak_blocks_are_said_before_the_edit(tmp_path):
    from ditloc.edit.jobs import choose_blocks
    from ditloc.localization import Localization, SetSearch

    pipe = tiny_pixart_pipeline()
    names = tuple(get_adapter(pipe).block_names())
    per = torch.zeros(len(names), 1, 1)
    search = SetSearch(objective="evaluator", baseline=1.0, sets=(("block.2",), ("block.2", "block.0")),
                       presence=(0.9, 0.3))
    loc = Localization(concept="dog", blocks=names, per_sample_step=per, per_head_step=per.new_zeros(4, 1, 1, 0),
                       spans=(), settings={"method": "search"}, search=search)
    said = []
    assert choose_blocks(pipe, loc, 1, PROMPTS, "dog", progress=said.append)[0] == ["block.2"]
    assert len(said) == 1 and said[0].startswith("warning:") and "K = 2 would" in said[0]
    said.clear()
    assert choose_blocks(pipe, loc, None, PROMPTS, "dog", progress=said.append)[0] == ["block.2", "block.0"]
    assert said == []  # its own K halves presence: nothing to say
    weaker = Localization(concept="dog", blocks=names, per_sample_step=per, per_head_step=loc.per_head_step,
                          spans=(), settings={}, search=SetSearch("evaluator", 1.0, (("block.1",),), (0.8,)))
    choose_blocks(pipe, weaker, None, PROMPTS, "dog", progress=said.append)
    assert "no K up to 1 does" in said[0]
    other = Localization(concept="dog", blocks=("block.0",), per_sample_step=per[:1],
                         per_head_step=per.new_zeros(1, 1, 1, 0), spans=())
    with pytest.raises(DitlocError, match="other blocks"):
        choose_blocks(pipe, other, None, PROMPTS, "dog")


def test_a_spread_concept_is_erased_in_every_editable_block():
    """When no searched set halves the concept's presence, the edit takes every editable block
    (an edit of the searched set would leave the concept), says so, and records it."""
    from ditloc.localization import Localization, SetSearch

    pipe = tiny_flux_pipeline()  # its single-stream blocks are not editable in closed form
    names = tuple(get_adapter(pipe).block_names())
    per = torch.zeros(len(names), 1, 1)
    spread = Localization(concept="dog", blocks=names, per_sample_step=per,
                          per_head_step=per.new_zeros(len(names), 1, 1, 0), spans=(), settings={"method": "search"},
                          search=SetSearch("evaluator", 1.0, (("double.0",),), (0.9,)))
    said = []
    res = unlearn(pipe, "dog", "cat", prompts=PROMPTS, preserve=PRESERVE, blocks=spread,
                  config=ClosedFormConfig(timesteps=1), progress=said.append, num_inference_steps=2,
                  height=16, width=16, max_sequence_length=16)
    editable = [b for b in names if b.startswith("double.")]
    assert list(res.blocks) == editable
    assert any("no set of up to 1 blocks removes 90% of its presence (best 10%)" in m for m in said)
    assert res.details["concepts"][0]["spread"] is True
    res = unlearn(tiny_flux_pipeline(), "dog", "cat", prompts=PROMPTS, preserve=PRESERVE, blocks=spread, k=1,
                  config=ClosedFormConfig(timesteps=1), num_inference_steps=2, height=16, width=16,
                  max_sequence_length=16)
    assert list(res.blocks) == ["double.0"]  # an explicit K is the user's choice
    # a set that halves presence but leaves 40% of it is not enough to erase: the set that removes 90%
    pixart = tiny_pixart_pipeline()
    names = tuple(get_adapter(pixart).block_names())
    per = torch.zeros(len(names), 1, 1)
    halves = Localization(concept="dog", blocks=names, per_sample_step=per,
                          per_head_step=per.new_zeros(len(names), 1, 1, 0), spans=(), settings={"method": "search"},
                          search=SetSearch("evaluator", 1.0, (("block.2",), ("block.2", "block.0")), (0.4, 0.05)))
    res = unlearn(pixart, "dog", "cat", prompts=PROMPTS, preserve=PRESERVE, blocks=halves,
                  config=ClosedFormConfig(), num_inference_steps=2)
    assert list(res.blocks) == ["block.2", "block.0"]


def test_closed_form_preserves_the_concepts_category_by_default():
    from ditloc.edit.jobs import neighbour_prompts
    from ditloc.toy import load_pipeline

    toy = load_pipeline()
    prompts = neighbour_prompts(toy, "zibbit")
    assert len(prompts) == 18 and not any("zibbit" in p for p in prompts)
    assert {c for c in ("blip", "quorra", "mokko") if any(c in p for p in prompts)} == {"blip", "quorra", "mokko"}
    assert neighbour_prompts(toy, "no such concept") == []


def test_cli_missing_localization_refused_before_load(tmp_path, capsys, monkeypatch):
    from ditloc import cli

    monkeypatch.setattr(cli.models, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    code = _cli(["unlearn", "toy", "--concept", "dog", "--anchor", "cat", "--edit-method", "closed-form",
                 "--blocks", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("make, blocks, kw", [
    (tiny_flux_pipeline, "double.0", {"height": 16, "width": 16}),
    (tiny_sd3_pipeline, "block.0", {"height": 8, "width": 8}),
])
@pytest.mark.parametrize("mode", ["weighted", "nullspace"])
def test_pooled_edit_maps_the_pooled_vector_to_the_anchor_and_keeps_the_preserved(tmp_path, make, blocks, kw, mode):
    """``pooled=True``: the pooled vector's projection is solved too. The concept prompts' projected
    pooled vectors move toward their anchors'; with the null-space mode the preserved prompts' do not
    move at all; nothing but that projection and the blocks' text projections changes; it saves and loads."""
    pipe = make()
    adapter = get_adapter(pipe)
    path = adapter.pooled_projection()
    call = {"max_sequence_length": 16}
    anchors = [p.replace("dog", "cat") for p in PROMPTS]
    pooled = adapter.encode_text(PROMPTS + anchors + PRESERVE, call)["pooled"].detach().double()  # [9, D]
    c, a, d = pooled[:3], pooled[3:6], pooled[6:]
    before = _weights(pipe)
    res = unlearn(pipe, "dog", "cat", prompts=PROMPTS, preserve=PRESERVE, blocks=blocks, out=tmp_path,
                  config=ClosedFormConfig(timesteps=2, pooled=True, preserve_mode=mode), num_inference_steps=2,
                  pipeline_kwargs=kw, **call)
    after = _weights(pipe)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    projections = [p for b in adapter.resolve_blocks(blocks) for p in adapter.text_projections(b)]
    assert moved == {f"{p}.weight" for p in projections} | {f"{path}.weight"}
    assert path in res.config["projections"] and res.config["pooled"] is True
    w0, w1 = before[f"{path}.weight"].double(), after[f"{path}.weight"].double()
    gap0 = (c @ w0.T - a @ w0.T).norm()
    gap1 = (c @ w1.T - a @ w0.T).norm()
    assert gap1 < 0.5 * gap0, (gap0, gap1)  # 3 rows in a wider space: nearly exact up to the ridge
    drift = (d @ w1.T - d @ w0.T).norm() / (d @ w0.T).norm()
    assert drift < (1e-6 if mode == "nullspace" else 0.2), drift
    assert res.details["fit"][path]["concept_residual"] < 0.5
    fresh = make()
    load_edit(fresh, tmp_path)
    assert torch.equal(fresh.transformer.state_dict()[f"{path}.weight"], after[f"{path}.weight"])


def test_pooled_edit_refused_where_there_is_no_pooled_vector(tmp_path, capsys):
    pipe = tiny_pixart_pipeline()
    before = _weights(pipe)
    with pytest.raises(DitlocError, match="no pooled text vector"):
        unlearn(pipe, "dog", "cat", prompts=PROMPTS, blocks="block.1", config=ClosedFormConfig(pooled=True),
                num_inference_steps=2)
    assert all(torch.equal(v, before[k]) for k, v in _weights(pipe).items())
    code = _cli(["unlearn", "toy", "--concept", "dog", "--anchor", "cat", "--prompt", PROMPTS[0],
                 "--pooled-edit", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--pooled-edit works with --edit-method closed-form" in err and len(err.strip().splitlines()) == 1
