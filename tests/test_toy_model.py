"""The shipped toy model and oracle: offline load, generation, oracle accuracy, `ditloc demo`."""

import json

import numpy as np
import pytest
from PIL import Image

import ditloc
from ditloc.toy import load_pipeline, world
from ditloc.toy.oracle import load_oracle


@pytest.fixture(scope="module")
def toy():
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def oracle():
    return load_oracle()


def test_shipped_pipeline_loads_offline_and_generates(toy):
    from diffusers import PixArtAlphaPipeline

    assert isinstance(toy, PixArtAlphaPipeline)
    assert len(toy.transformer.transformer_blocks) >= 12
    out = ditloc.generate(toy, ["a red star on the beach"], num_inference_steps=4, output_type="np", clean_caption=False)
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    again = ditloc.generate(toy, ["a red star on the beach"], num_inference_steps=4, output_type="np", clean_caption=False)
    assert np.array_equal(out, again)  # deterministic


def test_oracle_accuracy_on_fresh_renders(oracle):
    """A fast version of the >= 98% per-head accuracy check (scripts/toy/train_oracle.py reports the full one)."""
    rng = np.random.default_rng(12345)  # scenes never seen in training (different seed stream)
    scenes = [world.sample_scene(rng) for _ in range(300)]
    result = oracle.classify(world.render_batch(scenes))
    for category in ("shape", "color", "style", "place", "character", "hazard"):
        truth = [s.labels()[category] for s in scenes]
        acc = np.mean([a == b for a, b in zip(result.labels[category], truth)])
        assert acc >= 0.98, (category, acc)


def test_demo_fast_end_to_end(tmp_path, capsys, monkeypatch):
    from ditloc.cli import main

    monkeypatch.setenv("TQDM_DISABLE", "0")  # draw the progress bar although stderr is captured
    assert main(["demo", "--fast", "--out", str(tmp_path / "demo")]) == 0
    out, err = capsys.readouterr()
    # a bar over the search's block sets (fast: max K = 2 -> the baseline and 2 sets per step, one more where a
    # set is measured again for its attribution)
    final = [line for line in err.replace("\r", "\n").splitlines() if "5/5" in line or "6/6" in line]
    assert final and "<" in final[-1]  # [elapsed<remaining, rate]
    assert "[6/6] hazard" in err and "since the start" in err
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["categories"]) == {"shape", "color", "style", "place", "character", "hazard"}
    for category, e in summary["categories"].items():
        assert e["k_from_curve"] and e["k"] == (e["auto_k"] or 2)  # K from the curve, else the largest set
        assert e["top_k_blocks"] == e["search_sets"][e["k"] - 1]
        # the search stops at the K whose set halves presence (SearchConfig.stop_drop); else it runs to max_k
        assert len(e["curve"]) == e["k"] and (e["curve"][-1] >= 0.5) == (e["auto_k"] is not None)
        assert all(b in summary["blocks"] for b in e["top_k_blocks"]) and len(e["random_k_blocks"][0]) == e["k"]
        loc = json.loads((tmp_path / "demo" / category / "localization.json").read_text())
        assert loc["settings"]["method"] == "search" and loc["search"]["sets"] == e["search_sets"]
        for key in ("presence_before", "presence_top_k", "presence_random_k"):
            assert 0.0 <= e[key] <= 1.0
        assert (tmp_path / "demo" / category / "localization.json").is_file()
        assert (tmp_path / "demo" / category / "grid.png").is_file()
        assert all(e["concept"] not in c.split() for c in e["clean_prompts"])
        assert category in out
    assert (tmp_path / "demo" / "heatmap.png").is_file()
    for png in [tmp_path / "demo" / "heatmap.png", *(tmp_path / "demo").glob("*/grid.png")]:
        with Image.open(png) as im:
            assert im.format == "PNG" and 400 < im.width < 2500 and 200 < im.height < 1500, (png, im.size)


def test_a_copied_and_resaved_toy_is_still_the_toy(toy, tmp_path):
    """The toy is known by the key in its transformer's config, not by its path: a copy of its
    directory and a `save_pretrained` of it keep its sampling arguments, oracle and probe set."""
    import shutil

    from diffusers import DiffusionPipeline

    from ditloc import registry
    from ditloc.evaluate.toy import ToyOracle
    from ditloc.options import RunOptions

    copy = tmp_path / "copied"
    shutil.copytree(ditloc.toy.MODEL_DIR, copy)
    copied = DiffusionPipeline.from_pretrained(str(copy), local_files_only=True)
    copied.save_pretrained(tmp_path / "resaved", safe_serialization=True)
    resaved = DiffusionPipeline.from_pretrained(str(tmp_path / "resaved"), local_files_only=True)
    for pipe in (copied, resaved):
        assert ditloc.toy.toy_model_of(pipe).name == "toy"
        assert isinstance(registry.default_evaluator(pipe), ToyOracle)
        assert registry.probe_set_name(pipe) == "toy"
        assert RunOptions().resolve(pipe).call_kwargs["clean_caption"] is False  # its own sampling argument
    # without the key it is a PixArt pipeline like any other
    config = json.loads((copy / "transformer" / "config.json").read_text())
    del config[registry.MARKER]
    (copy / "transformer" / "config.json").write_text(json.dumps(config))
    plain = DiffusionPipeline.from_pretrained(str(copy), local_files_only=True)
    assert registry.model_of(plain) is None and registry.default_evaluator(plain) is None
    assert registry.probe_set_name(plain) == "lock"
