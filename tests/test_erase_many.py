"""Erasing several concepts at once: the concepts' plan (pure text, refused before any model
loads), one joint closed-form solve per block, the null-space variant, the closed-form edit
exported as a LoRA plain diffusers loads, and trained unlearning with the teacher target on
preserved prompts."""

from __future__ import annotations

import json

import pytest
import torch

from ditloc.adapters import get_adapter
from ditloc.edit import (
    ClosedFormConfig,
    TrainConfig,
    factorize,
    load_edit,
    plan_erasures,
    read_concepts_file,
    unlearn,
)
from ditloc.edit.closed_form import record_moments
from ditloc.edit.jobs import _blank_latents
from ditloc.errors import DitlocError
from ditloc.testing import (
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
)

PROMPTS = ["a red dog on the beach", "a photo of a dog", "a blue car in the forest", "a car at night",
           "a dog next to a car"]
PRESERVE = ["a red cat on the beach", "a blue bird in the forest", "a photo of a house"]
PAIRS = [("dog", "cat"), ("car", "house")]


def _weights(pipe):
    return {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}


# ----------------------------------------------------------------------------- the plan
def test_prompts_are_assigned_to_every_concept_they_hold():
    dog, car = plan_erasures(PAIRS, PROMPTS)
    assert dog.prompts == ("a red dog on the beach", "a photo of a dog", "a dog next to a car")
    assert car.prompts == ("a blue car in the forest", "a car at night", "a dog next to a car")
    # a prompt with both concepts anchors both
    assert dog.anchor_prompts[2] == car.anchor_prompts[2] == "a cat next to a house"
    assert car.anchor_prompts[0] == "a blue house in the forest"
    # without prompts: two per concept (the one-concept default)
    assert plan_erasures(PAIRS)[1].prompts == ("a picture of car", "car")


@pytest.mark.parametrize("pairs, prompts, message", [
    ([("dog", "cat"), ("Dog", "bird")], None, "the concept 'Dog' is listed twice"),
    ([("dog", "a small dog")], None, "the anchor 'a small dog' contains the concept 'dog'"),
    ([("dog", "car"), ("car", "house")], None, "the anchor 'car' of 'dog' contains the erased concept 'car'"),
    ([("dog", "cat"), ("bird", "fish")], PROMPTS, "prompt 3 ('a blue car in the forest') contains none of"),
    ([("dog", "cat"), ("car", "house"), ("boat", "raft")], PROMPTS, "the concept 'boat' occurs in none of the prompts"),
    ([("dog", None)], None, "no anchor for 'dog'"),
    ([], None, "no concept to erase"),
])
def test_bad_plans_are_one_line(pairs, prompts, message):
    with pytest.raises(DitlocError) as e:
        plan_erasures(pairs, prompts)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_concepts_file(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# erase these\ndog = cat\n\ncar   # takes --anchor\nbird=fish  # trailing comment\n")
    assert read_concepts_file(f, "thing") == [("dog", "cat"), ("car", "thing"), ("bird", "fish")]
    for text, message in [("", "lists no concept"), ("# only\n", "lists no concept"),
                          ("dog=cat=bird\n", "has two '='"), ("=cat\n", "names no concept"),
                          ("dog=\n", "has an empty anchor")]:
        f.write_text(text)
        with pytest.raises(DitlocError, match=message):
            read_concepts_file(f, "thing")
    with pytest.raises(DitlocError, match="not found"):
        read_concepts_file(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- the joint solve
def test_each_block_gathers_the_rows_of_exactly_its_concepts():
    """A block in both concepts' sets sums both concepts' moments; a block in one set has
    only that concept's rows; the preserved rows reach every block. In float64: the concepts' prompts run in
    other batches together than alone, which in float32 moves the activations' last bits by CPU."""
    pipe = tiny_pixart_pipeline().to(torch.float64)

    def same(got, want):  # float64 rounding (~1e-16 relative per operation): far below 1e-10
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    adapter = get_adapter(pipe)
    kw = {"max_sequence_length": 16}
    dog, car = plan_erasures(PAIRS, PROMPTS)
    cfg = ClosedFormConfig()
    x0 = _blank_latents(pipe, {"height": 32, "width": 32})
    both, _ = record_moments(pipe, adapter, [dog.with_blocks(["block.1", "block.2"]), car.with_blocks(["block.2"])],
                             PRESERVE, kw, cfg, x0=x0)
    alone = {c.concept: record_moments(pipe, adapter, [c.with_blocks(["block.1", "block.2"])], PRESERVE, kw, cfg,
                                       x0=x0)[0] for c in (dog, car)}
    assert set(both) == {"block.1", "block.2"}
    for name in ("C", "A", "D"):
        same(getattr(both["block.2"], name),
             getattr(alone["dog"]["block.2"], name) + getattr(alone["car"]["block.2"], name)
             - (getattr(alone["car"]["block.2"], name) if name == "D" else 0))
        assert torch.equal(getattr(both["block.1"], name), getattr(alone["dog"]["block.1"], name))
    assert both["block.2"].nc == alone["dog"]["block.2"].nc + alone["car"]["block.2"].nc
    # one block records per block; several share each concept's moments (same states): same numbers
    single, _ = record_moments(pipe, adapter, [dog.with_blocks(["block.2"])], PRESERVE, kw, cfg, x0=x0)
    for name in ("C", "A", "AA", "D"):
        same(getattr(single["block.2"], name), getattr(alone["dog"]["block.2"], name))


def test_joint_edit_records_every_concept_and_loads_exactly(tmp_path):
    pipe = tiny_pixart_pipeline()
    before = _weights(pipe)
    res = unlearn(pipe, concepts=PAIRS, prompts=PROMPTS, preserve=PRESERVE,
                  blocks={"dog": "block.1,block.2", "car": "block.2"}, config=ClosedFormConfig(), out=tmp_path,
                  num_inference_steps=2, max_sequence_length=16)
    assert list(res.blocks) == ["block.1", "block.2"]
    adapter = get_adapter(pipe)
    moved = {k for k, v in _weights(pipe).items() if not torch.equal(v, before[k])}
    assert moved == {f"{p}.weight" for b in res.blocks for p in adapter.text_projections(b)}
    record = json.loads((tmp_path / "ditloc_edit.json").read_text())
    concepts = {c["concept"]: c for c in record["details"]["concepts"]}
    assert concepts["dog"]["anchor"] == "cat" and concepts["dog"]["blocks"] == ["block.1", "block.2"]
    assert concepts["car"]["blocks"] == ["block.2"] and concepts["car"]["prompts"] == 3
    fresh = tiny_pixart_pipeline()
    load_edit(fresh, tmp_path)
    after = _weights(pipe)
    assert all(torch.equal(v, after[k]) for k, v in _weights(fresh).items())


def test_nullspace_edit_leaves_the_preserved_states_exactly():
    """W' d = W d for every preserved text state d (the weighted solve moves them), and the
    concept rows still move toward their anchors."""
    pipe = tiny_pixart_pipeline()
    adapter = get_adapter(pipe)
    kw = {"max_sequence_length": 16}
    erasures = [e.with_blocks(["block.1"]) for e in plan_erasures(PAIRS, PROMPTS)]
    x0 = _blank_latents(pipe, {"height": 32, "width": 32})
    moments, _ = record_moments(pipe, adapter, erasures, PRESERVE[:1], kw, ClosedFormConfig(), x0=x0)
    m = moments["block.1"]
    D = m.D / m.nd
    assert torch.linalg.matrix_rank(D) < D.shape[0]  # the preserved states leave directions free
    null = m.solve_nullspace(1e-3, 1e-4)
    weighted = m.solve(1.0, 1e-3)
    w = adapter.block_module("block.1").attn2.to_k.weight.detach().double()
    change = lambda M: float(torch.trace((w @ (M - torch.eye(len(M), dtype=M.dtype))) @ D
                                         @ (w @ (M - torch.eye(len(M), dtype=M.dtype))).T))
    scale = float(torch.trace(w @ D @ w.T))
    assert change(null) / scale < 1e-8 < change(weighted) / scale
    C, A, AA = m.C / m.nc, m.A / m.nc, m.AA / m.nc
    gap = lambda M: float(torch.trace(w @ (M @ C @ M.T - M @ A.T - A @ M.T + AA) @ w.T))
    assert gap(null) < 0.5 * gap(torch.eye(len(null), dtype=null.dtype))


def test_nullspace_mode_through_unlearn(tmp_path):
    pipe = tiny_pixart_pipeline()
    res = unlearn(pipe, concepts=PAIRS, prompts=PROMPTS, preserve=PRESERVE[:1], blocks="block.1",
                  config=ClosedFormConfig(preserve_mode="nullspace"), num_inference_steps=2, max_sequence_length=16)
    assert res.config["preserve_mode"] == "nullspace"
    assert all(f["preserve_change"] < 1e-8 for f in res.details["fit"].values())
    assert all(f["concept_residual"] < 0.5 for f in res.details["fit"].values())


# ----------------------------------------------------------------------------- the LoRA export
def test_factorize_takes_the_smallest_rank_within_tolerance():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(5, 30, generator=g, dtype=torch.float64)
    delta = u @ v + 1e-6 * torch.randn(40, 30, generator=g, dtype=torch.float64)
    b, a, err = factorize(delta, 1e-3)
    assert b.shape == (40, 5) and a.shape == (5, 30) and err <= 1e-3
    assert (delta - b @ a).norm() / delta.norm() == pytest.approx(err, rel=1e-6)
    b4, _, _ = factorize(delta, 1e-12)
    assert b4.shape[1] > 5  # a tighter tolerance needs the noise's directions too
    assert factorize(torch.zeros(4, 3), 1e-3)[0].shape == (4, 0)


@pytest.mark.parametrize("make, blocks, kw, pooled", [
    (tiny_sana_pipeline, "block.1", {"height": 32, "width": 32, "use_resolution_binning": False}, False),
    (tiny_flux_pipeline, "double.0,double.1", {"height": 16, "width": 16}, True),  # the pooled projection's edit too
    (tiny_sd3_pipeline, "block.0,block.2", {"height": 8, "width": 8}, True),
])
def test_diffusers_loads_the_closed_form_edit_as_lora(tmp_path, make, blocks, kw, pooled):
    """The exported LoRA, loaded by plain diffusers (`pipe.load_lora_weights`, no ditloc),
    draws what the exact edit (`load_edit`) draws."""
    pipe = make()
    unlearn(pipe, concepts=PAIRS, prompts=PROMPTS, preserve=PRESERVE, blocks=blocks,
            config=ClosedFormConfig(timesteps=2, export_tol=1e-6, pooled=pooled), out=tmp_path, num_inference_steps=2,
            pipeline_kwargs=kw, max_sequence_length=16)
    record = json.loads((tmp_path / "ditloc_edit.json").read_text())
    export = record["details"]["lora_export"]
    assert export and all(r["error"] <= 1e-6 and r["rank"] >= 1 for r in export.values())
    assert ("time_text_embed.text_embedder.linear_1" in export) == pooled
    exact, lora, base = make(), make(), make()
    load_edit(exact, tmp_path)
    lora.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")

    def draw(p):
        p.set_progress_bar_config(disable=True)
        return p(["a dog on the beach"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="latent", max_sequence_length=16, **kw).images

    x_exact, x_lora, x_base = draw(exact), draw(lora), draw(base)
    moved = (x_exact - x_base).abs().max()
    assert moved > 1e-4  # the edit changes the image
    assert (x_lora - x_exact).abs().max() < 1e-4 * float(moved)


# ----------------------------------------------------------------------------- trained, with a teacher
def test_lora_unlearning_with_teacher_preservation(tmp_path):
    """Two concepts in one adapter; the preserved prompts' images are drawn once and kept;
    the preserved prompts' predictions at noisy versions of those images (what the teacher
    term holds) move less than without it."""
    from ditloc import _state

    kw = dict(concepts=PAIRS, prompts=PROMPTS, blocks="block.1,block.2", num_inference_steps=2,
              max_sequence_length=16, images_per_prompt=1)
    cfg = TrainConfig(steps=20, batch_size=2, lr=1e-2, rank=2, checkpoint_every=20, seed=1)
    pipes = {}
    for name, extra in [("teacher", dict(preserve=PRESERVE, preserve_target="teacher")), ("plain", {})]:
        pipes[name] = tiny_pixart_pipeline()
        res = unlearn(pipes[name], config=cfg, out=tmp_path / name, **kw, **extra)
        assert {c["concept"] for c in res.details["concepts"]} == {"dog", "car"}
    keep = _state.load_state(tmp_path / "teacher" / "preserve_latents")[0]["latents"]  # [3, C, h, w]
    x = keep.repeat(4, 1, 1, 1) + 0.5 * torch.randn((12, *keep.shape[1:]), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([100.0, 400.0, 700.0, 900.0]).repeat_interleave(3)

    def predict(pipe):
        adapter = get_adapter(pipe)
        text = {k: v.repeat(4, *[1] * (v.ndim - 1)) for k, v in
                adapter.encode_text(PRESERVE, {"max_sequence_length": 16}).items()}
        with torch.no_grad():
            return adapter.denoise(x, t, text)

    frozen = predict(tiny_pixart_pipeline())
    drift = {name: float((predict(p) - frozen).pow(2).mean()) for name, p in pipes.items()}
    assert 0 < drift["teacher"] < 0.5 * drift["plain"], drift
    with pytest.raises(DitlocError, match="--preserve-weight must be >= 0"):
        unlearn(tiny_pixart_pipeline(), config=cfg, preserve_target="teacher", preserve_weight=-1, **kw)


# ----------------------------------------------------------------------------- the command line
def _cli(argv) -> int:
    from ditloc.cli import main

    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


@pytest.mark.parametrize("extra, file_text, message", [
    (["--concept", "dog", "--anchor", "cat", "--concept", "dog", "--anchor", "bird"], None,
     "the concept 'dog' is listed twice"),
    (["--concept", "dog", "--anchor", "a dog"], None, "the anchor 'a dog' contains the concept 'dog'"),
    (["--concept", "dog", "--anchor", "car", "--concept", "car", "--anchor", "house"], None,
     "contains the erased concept 'car'"),
    (["--concept", "dog", "--concept", "bird", "--anchor", "cat", "--prompt", "a dog on the beach"], None,
     "the concept 'bird' occurs in none of the prompts"),
    (["--concept", "dog", "--concept", "car", "--concept", "bird", "--anchor", "cat", "--anchor", "house"], None,
     "3 --concept for 2 --anchor"),
    (["--anchor", "cat"], "", "lists no concept"),
    (["--anchor", "cat"], "dog=cat=bird\n", "has two '='"),
    ([], "dog\n", "no anchor for 'dog'"),
    (["--concept", "dog", "--anchor", "cat", "--concept", "car", "--anchor", "house", "--blocks", "loc.json"], None,
     "a localization file holds one concept"),
    (["--concept", "dog", "--anchor", "cat", "--edit-method", "closed-form", "--preserve-target", "teacher"], None,
     "--preserve-target applies to --edit-method lora or full"),
    (["--concept", "dog", "--anchor", "cat", "--preserve", "a cat"], None, "or with --preserve-target teacher"),
], ids=["duplicate", "own anchor", "other's anchor", "in no prompt", "anchor count", "empty file", "two =",
        "no anchor", "loc file", "teacher closed-form", "preserve without teacher"])
def test_cli_bad_concepts_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, extra, file_text, message):
    from ditloc.cli import models

    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    monkeypatch.chdir(tmp_path)
    if "loc.json" in extra:
        from ditloc.localization import (
            Localization,  # taken as a valid file: the refusal is about the concepts
        )

        monkeypatch.setattr(Localization, "load", staticmethod(lambda path: None))
    argv = ["unlearn", "toy", *extra, "--out", str(tmp_path / "o")]
    if file_text is not None:
        (tmp_path / "c.txt").write_text(file_text)
        argv += ["--concepts-file", str(tmp_path / "c.txt")]
    code = _cli(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_cli_erases_a_concepts_file_in_one_solve(tmp_path, capsys):
    from ditloc.testing import main as save

    model = str(tmp_path / "pixart")
    assert save(["save", model, "--family", "pixart"]) == 0
    (tmp_path / "c.txt").write_text("# two concepts\ndog=cat\ncar   # the default anchor\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    code = _cli(["unlearn", model, "--concepts-file", str(tmp_path / "c.txt"), "--anchor", "house",
                 "--prompts-file", str(prompts), "--edit-method", "closed-form", "--blocks", "block.1,block.2",
                 "--preserve-mode", "nullspace", "--out", str(tmp_path / "o"), "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "'dog' -> 'cat': block.1, block.2" in out and "'car' -> 'house'" in out
    assert "for 2 concept(s)" in out
    assert "pipe.load_lora_weights" not in out  # PixArt has no diffusers LoRA loader: not offered
    rec = json.loads((tmp_path / "o" / "ditloc_edit.json").read_text())
    assert rec["config"]["preserve_mode"] == "nullspace"
    assert [c["concept"] for c in rec["details"]["concepts"]] == ["dog", "car"]
    assert (tmp_path / "o" / "pytorch_lora_weights.safetensors").exists()
