"""The toy-flux model by name (`ditloc.toy.load_pipeline("toy-flux")`, MODEL `toy-flux` on the command line),
on a tiny random export made by the training scripts' own code: the shipped model is not needed."""

import ditloc
import functools
import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ditloc.toy
from ditloc.errors import DitlocError
from ditloc.options import RunOptions
from cli_helpers import run_main as _cli

localize_contribution = functools.partial(ditloc.localize, method="contribution")

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "toy"
FLUX_CALL = {"height": 32, "width": 32, "max_sequence_length": 32, "true_cfg_scale": 4.0, "negative_prompt": ""}


def _script(name: str):
    """A module of scripts/toy/ (not a package: loaded by path)."""
    import importlib.util
    import sys

    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(SCRIPTS / f"{name}.py"):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _export_tiny_toy_flux(out: Path, work: Path) -> None:
    """What `train_dit.py --family flux` trains (`families.Flux.build`, 1 double + 1 single block), saved as its
    EMA checkpoint and exported by `export_pipeline.build_pipeline`: the real export path, random weights."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(SCRIPTS))  # the scripts import each other by name
        common, export_pipeline, families = (_script(n) for n in ("common", "export_pipeline", "families"))

        try:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                flux = families.Flux()
                args = SimpleNamespace(layers=1, single_layers=1, heads=1, head_dim=32)
                _, models = flux.build(args, families.FLUX_LATENT_CHANNELS)
                vae = common.make_vae(families.FLUX_LATENT_CHANNELS, levels=families.FLUX_VAE_LEVELS)
            vae.register_to_config(shift_factor=0.0)
            vae.save_pretrained(work / "vae")
            common.save_dit_ckpt({"step": 0, "args": {"family": "flux"},
                                  **{"ema_" + k: m.state_dict() for k, m in models.items()},
                                  **{k + "_config": families._config_dict(m) for k, m in models.items()}},
                                 work / "ema_0")
            pipe, _ = export_pipeline.build_pipeline(work / "ema_0", str(work / "vae"))
            pipe.save_pretrained(out, safe_serialization=True)
        finally:
            for name in ("common", "export_pipeline", "families"):
                sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_flux") / "model_flux"
    _export_tiny_toy_flux(out, tmp_path_factory.mktemp("toy_flux_run"))
    return out


@pytest.fixture
def toy_flux(flux_dir, monkeypatch):
    """toy-flux points at the tiny export (the shipped directory's constant, as a later ship fills it)."""
    monkeypatch.delenv(ditloc.toy.FLUX_DIR_ENV, raising=False)
    monkeypatch.setattr(ditloc.toy, "FLUX_MODEL_DIR", flux_dir)
    return flux_dir


def test_load_pipeline_by_name(toy_flux):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = ditloc.toy.load_pipeline("toy-flux")
    assert isinstance(pipe, FluxPipeline) and isinstance(pipe.transformer, FluxTransformer2DModel)
    assert ditloc.toy.is_toy_pipeline(pipe) and ditloc.toy.toy_model_of(pipe).name == "toy-flux"
    assert pipe.default_sample_size * pipe.vae_scale_factor == 32  # its native size, not FLUX.1's 1024 px


def test_sampled_as_trained_unless_the_caller_says(toy_flux):
    pipe = ditloc.toy.load_pipeline("toy-flux")
    resolved = RunOptions().resolve(pipe)
    assert FLUX_CALL.items() <= resolved.call_kwargs.items()
    assert resolved.effective("max_sequence_length") == 32 and resolved.adapter.image_size() == (32, 32)
    own = RunOptions(max_sequence_length=16, pipeline_kwargs={"true_cfg_scale": 1.0, "height": 64}).resolve(pipe)
    assert own.call_kwargs["max_sequence_length"] == 16 and own.call_kwargs["true_cfg_scale"] == 1.0
    assert own.call_kwargs["height"] == 64 and own.call_kwargs["width"] == 32
    # ditloc's guidance (--guidance) is its true-CFG scale: guidance_scale would feed an embedding it lacks
    cfg = RunOptions(guidance_scale=2.5).resolve(pipe)
    assert cfg.call_kwargs["true_cfg_scale"] == 2.5 and "guidance_scale" not in cfg.call_kwargs
    assert cfg.record()["guidance_scale"] is None and cfg.record()["pipeline_kwargs"]["true_cfg_scale"] == 2.5
    images = ditloc.generate(pipe, ["a zibbit on the beach", "a red star"], seed=0, num_inference_steps=2,
                             output_type="np")
    assert images.shape == (2, 32, 32, 3)


def test_the_environment_variable_points_it_elsewhere(flux_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ditloc.toy, "FLUX_MODEL_DIR", tmp_path / "not_shipped")
    monkeypatch.setenv(ditloc.toy.FLUX_DIR_ENV, str(flux_dir))
    assert ditloc.toy.model_dir("toy-flux") == flux_dir
    assert ditloc.toy.is_toy_pipeline(ditloc.toy.load_pipeline("toy-flux"))


def test_the_toy_models_and_other_pipelines():
    from ditloc.testing import tiny_flux_pipeline

    assert ditloc.toy.model_dir() == ditloc.toy.MODEL_DIR  # load_pipeline() is still the PixArt toy
    assert not ditloc.toy.is_toy_pipeline(tiny_flux_pipeline()) and ditloc.registry.call_defaults(object()) == {}
    with pytest.raises(DitlocError, match="unknown toy model 'toy-sd3'; the toy models are toy, toy-flux"):
        ditloc.toy.load_pipeline("toy-sd3")


def test_missing_model_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ditloc.toy.FLUX_DIR_ENV, raising=False)
    monkeypatch.setattr(ditloc.toy, "FLUX_MODEL_DIR", tmp_path / "model_flux")
    with pytest.raises(DitlocError, match="FLUX_TRAINING.md"):
        ditloc.toy.load_pipeline("toy-flux")
    code, _, err = _cli(["localize", "toy-flux", "--concept", "zibbit", "--prompt", "a zibbit on the beach",
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the toy-flux model is not in" in err and "scripts/toy/FLUX_TRAINING.md" in err
    code, _, err = _cli(["demo", "--model", "toy-flux", "--fast", "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "FLUX_TRAINING.md" in err, err


def test_cli_localize_search_uses_the_toy_oracle_and_settings(toy_flux, tmp_path, capsys):
    out = tmp_path / "search"
    code, stdout, err = _cli(["localize", "toy-flux", "--concept", "zibbit", "--prompt", "a zibbit on the beach",
                              "--localize-method", "search", "--max-k", "1", "--steps", "2", "--out", str(out)], capsys)
    assert code == 0, err
    d = json.loads((out / "localization.json").read_text())
    assert d["blocks"] == ["double.0", "single.0"]
    assert d["search"]["objective"] == "evaluator" and d["settings"]["evaluator"] == "ToyOracle"
    assert d["settings"]["eval_text"] == "character: zibbit"  # the oracle's name for the concept
    assert d["settings"]["max_sequence_length"] == 32
    assert FLUX_CALL.items() <= d["settings"]["pipeline_kwargs"].items()
    assert "presence unedited" in stdout
    # no single block halves zibbit (a set concept): the line names the backward search
    assert d["search"]["auto_k"] is None
    assert "none up to 1 halves presence" in stdout and "--direction both" in stdout


def test_cli_closed_form_unlearning_with_the_pooled_edit(toy_flux, tmp_path, capsys):
    """`--pooled-edit` from the command line: the double-stream block's text projections and the pooled
    vector's projection are saved, and nothing else; the line says so; the single-stream block is refused."""
    from safetensors.torch import load_file

    out = tmp_path / "edit"
    args = ["unlearn", "toy-flux", "--concept", "zibbit", "--anchor", "triangle", "--prompt", "a zibbit on the beach",
            "--edit-method", "closed-form", "--pooled-edit", "--steps", "2", "--out"]
    code, stdout, err = _cli(args + [str(out), "--blocks", "double.0"], capsys)
    assert code == 0, err
    assert set(load_file(str(out / "blocks.safetensors"))) == {
        "transformer_blocks.0.attn.add_k_proj.weight", "transformer_blocks.0.attn.add_v_proj.weight",
        "time_text_embed.text_embedder.linear_1.weight"}
    assert "in double.0 and the pooled projection" in stdout
    code, _, err = _cli(args + [str(tmp_path / "single"), "--blocks", "single.0"], capsys)
    assert code == 2 and "single-stream block" in err and len(err.strip().splitlines()) == 1

# --------------------------------------------------------------------------
# The ground truth's joint-attention conditions (bench/ground_truth/joint.py)
# --------------------------------------------------------------------------


def test_joint_conditions_and_pooled_share_on_synthetic_scores():
    from ditloc.bench.ground_truth import joint, oracle_result

    blocks = ["double.0", "double.1", "single.0", "single.1"]
    drops = {"double.0": 0.1, "double.1": 0.5, "single.0": 0.0, "single.1": 0.2}
    presence = {}
    for k in range(5):
        for s in itertools.combinations(blocks, k):
            presence[frozenset(s)] = 1.0 - min(1.0, sum(drops[b] for b in s))
    oracle = oracle_result(presence, blocks)
    conds = joint.joint_conditions(blocks, oracle)
    labels = [c.label for c in conds]
    assert labels[0] == "pooled only" and conds[0].blocks == frozenset() and conds[0].pooled == "clean"
    assert {"best block, text only", "best pair, text only", "all double", "all double, text only", "all single",
            "all single, text only", "all blocks", "all blocks, text only"} <= set(labels)
    assert {c.key for c in conds if c.label in ("greedy 4, text only", "all blocks, text only")} == {
        (frozenset(blocks), "full")}  # greedy 4 is every block here: one key, two labels
    assert joint.streams(blocks) == {"double": blocks[:2], "single": blocks[2:]}
    assert joint.streams(["block.0", "block.1"]) == {}  # one kind of block: no stream table
    # per-image scores: 4 images; text-only conditions keep 0.25 more presence than the default, image by image
    n = 4
    measured = {s: [p] * n for s, p in presence.items()}
    stored = {}
    for c in conds:
        if c.pooled == "clean" and c.blocks and c.blocks in measured:
            continue  # read from the ordinary conditions
        p = 0.9 if not c.blocks else presence.get(c.blocks, 0.0)
        stored[c.key] = [min(1.0, p + (0.25 if c.pooled == "full" else 0.0))] * n
    summary = joint.joint_summary(blocks, oracle, measured[frozenset()], measured, stored)
    rows = {r["label"]: r for r in summary["conditions"]}
    assert rows["pooled only"]["drop"]["mean"] == pytest.approx(0.1)
    assert rows["best pair, text only"]["pooled_share"]["mean"] == pytest.approx(0.25)
    assert rows["best pair, text only"]["drop"]["n"] == n
    assert summary["best_block_stream"] == "double"
    assert summary["streams"]["double"]["all_withheld_drop"]["mean"] == pytest.approx(0.6)
    assert summary["streams"]["single"]["max_single_drop"] == pytest.approx(0.2)
    missing = dict(stored)
    missing.pop(conds[0].key)
    assert joint.joint_summary(blocks, oracle, measured[frozenset()], measured, missing) is None


def test_ground_truth_on_toy_flux_measures_the_pooled_vector_and_streams(toy_flux, tmp_path, monkeypatch):
    from ditloc.bench.ground_truth import (
        GroundTruthSettings,
        joint,
        read_conditions,
        run_ground_truth,
        summarize_ground_truth,
    )

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = ditloc.toy.load_pipeline("toy-flux")
        pipe.set_progress_bar_config(disable=True)
        settings = GroundTruthSettings(model="toy-flux", concepts=("zibbit",), methods=("contribution",), steps=2,
                                       n_images=2)
        out = tmp_path / "gt"
        first = run_ground_truth(pipe, out, settings)
        record = json.loads((out / "ground_truth.json").read_text())
        assert record["joint"] is True and record["blocks"] == ["double.0", "single.0"]
        lines = [json.loads(x) for x in (out / joint.JOINT_FILE).read_text().splitlines()]
        keys = [(frozenset(r["blocks"]), r["pooled"]) for r in lines]
        assert len(keys) == len(set(keys))
        plain = read_conditions(out)[("character", "zibbit")]
        # every joint condition is measured once, here or (withheld with the clean pooled vector) as an ordinary one
        from ditloc.bench.ground_truth import oracle_result
        from ditloc.bench.ground_truth.store import _presences

        oracle = oracle_result(_presences(plain), record["blocks"])
        for c in joint.joint_conditions(record["blocks"], oracle):
            assert (c.key in keys) != bool(c.pooled == "clean" and c.blocks and c.blocks in plain), c
        assert (frozenset(), "clean") in keys and (frozenset(record["blocks"]), "full") in keys
        for r in lines:
            assert len(r["scores"]) == 2 and r["presence"] == pytest.approx(sum(r["scores"]) / 2)
        summary = summarize_ground_truth(out)
        entry = summary["concepts"][0]
        assert entry["joint"] is not None and not summary["incomplete"]
        share = {r["label"]: r for r in entry["joint"]["conditions"]}["all blocks, text only"]["pooled_share"]
        full = next(r["scores"] for r in lines if r["pooled"] == "full" and len(r["blocks"]) == 2)
        clean = plain[frozenset(record["blocks"])]
        assert share["mean"] == pytest.approx(sum(f - c for f, c in zip(full, clean)) / 2)
        md = (out / "summary.md").read_text()
        assert "Joint attention: the pooled vector" in md and "which stream holds each concept" in md
        # a rerun generates nothing
        from ditloc.bench.ground_truth import run as gt_run

        monkeypatch.setattr(gt_run, "generate_scored", lambda *a, **k: pytest.fail("generated again"))
        again = run_ground_truth(pipe, out, settings)
        assert again.conditions_run == 0 and first.conditions_run > 0
    finally:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------
# The shipped toy-flux (src/ditloc/toy/model_flux): the exact invariants of random FLUX weights hold on
# learned ones (tests/test_joint.py proves them on tiny random pipelines)
# --------------------------------------------------------------------------

SHIPPED_PROMPTS = ["a red star on the beach", "a red striped circle in the forest"]
SHIPPED_CLEAN = ["a star on the beach", "a striped circle in the forest"]
SHIPPED_RUN = dict(num_inference_steps=2)


@pytest.fixture(scope="module")
def shipped_flux():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ditloc.toy.FLUX_DIR_ENV, raising=False)
        pipe = ditloc.toy.load_pipeline("toy-flux")
    assert pipe.name_or_path and Path(pipe.name_or_path).resolve() == ditloc.toy.FLUX_MODEL_DIR.resolve()
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(n)


def _plain(pipe, prompts):
    kw = RunOptions(**SHIPPED_RUN).resolve(pipe).call_kwargs
    return pipe(prompts, generator=[torch.Generator().manual_seed(0) for _ in prompts], output_type="np",
                **kw).images


def test_shipped_toy_flux_interventions_are_exact(shipped_flux):
    pipe = shipped_flux
    plain, clean = _plain(pipe, SHIPPED_PROMPTS), _plain(pipe, SHIPPED_CLEAN)
    assert np.abs(plain - clean).max() > 0.05  # the learned model draws "red": the comparisons below can fail
    gen = dict(concept="red", output_type="np", seed=0, **SHIPPED_RUN)
    assert np.array_equal(ditloc.generate(pipe, SHIPPED_PROMPTS, withhold=[], **gen), plain)
    assert np.array_equal(ditloc.generate(pipe, SHIPPED_PROMPTS, inject="all", **gen), plain)
    assert np.array_equal(ditloc.generate(pipe, SHIPPED_PROMPTS, withhold="all", **gen), clean)
    assert np.array_equal(ditloc.generate(pipe, SHIPPED_PROMPTS, inject=[], **gen), clean)
    # text tokens withheld everywhere but the pooled vector full: neither the plain nor the clean image
    text_only = ditloc.generate(pipe, SHIPPED_PROMPTS, withhold="all", pooled="full", **gen)
    assert not np.array_equal(text_only, clean) and not np.array_equal(text_only, plain)


def test_shipped_toy_flux_contributions_match_naive_joint_maps(shipped_flux, monkeypatch):
    from test_contribution import naive, naive_rtol
    from test_joint import sdpa_calls_of

    from ditloc.adapters import get_adapter

    pipe = shipped_flux
    loc = localize_contribution(pipe, SHIPPED_PROMPTS, "red", contribution_terms="attn_value_out", **SHIPPED_RUN)
    adapter = get_adapter(pipe)
    calls = sdpa_calls_of(monkeypatch, pipe.transformer, lambda: _plain(pipe, SHIPPED_PROMPTS))
    names = adapter.block_names()
    per_call = 2 * len(names)  # true CFG: the conditional call, then the negative prompt's
    assert len(calls) == per_call * SHIPPED_RUN["num_inference_steps"]
    n_img = 64  # 32 px -> 16 x 16 latents -> 8 x 8 packed tokens
    for step in range(SHIPPED_RUN["num_inference_steps"]):
        for b, block in enumerate(names):
            q, k, v = calls[step * per_call + b]
            total = k.shape[2]
            assert total == 32 + n_img  # text first (max_sequence_length 32), then the image
            weight, bias = adapter.out_projection(block)()
            positions = [list(s.positions) for s in loc.spans]
            t, h = naive(q[:, :, total - n_img:], k, v, positions, None, weight.detach(), None, "attn_value_out")
            tol = naive_rtol(q[:, :, total - n_img:], k, weight, positions)  # the float32 kernel against float64
            torch.testing.assert_close(loc.per_sample_step[b, step].double(), t, rtol=tol, atol=1e-12)
            torch.testing.assert_close(loc.per_head_step[b, step].double(), h, rtol=tol, atol=1e-12)
    assert loc.scores.abs().max() > 0
