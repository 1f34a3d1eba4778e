"""The `ditloc` command line: files, messages and exit codes."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ditloc.localization import score_mass_k
from ditloc.testing import tiny_pixart_pipeline
from cli_helpers import run_main as run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "pixart"
    tiny_pixart_pipeline().save_pretrained(path)
    return str(path)


COMMON = ["--steps", "2"]


def test_localize_writes_json_and_table(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\nvan gogh at night\n\n")
    out = tmp_path / "loc"
    code, stdout, err = run(["localize", model_dir, "--concept", "Van Gogh", "--prompt", "a photo of van gogh",
                             "--prompts-file", str(prompts), "--k", "2", "--localize-method", "contribution",
                             "--out", str(out), *COMMON], capsys)
    assert code == 0, err
    d = json.loads((out / "localization.json").read_text())
    assert d["blocks"] == ["block.0", "block.1", "block.2", "block.3"]
    assert len(d["scores"]) == 4 and len(d["per_step"]) == 4 and len(d["per_step"][0]) == 2
    assert sorted(d["ranking"]) == d["blocks"]
    assert d["settings"]["prompts"] == ["a photo of van gogh", "van gogh at night"]
    assert d["settings"]["k"] == 2 and d["settings"]["k_rule"] == "given" and d["settings"]["num_inference_steps"] == 2
    lines = [line for line in stdout.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]
    assert [line.split()[1] for line in lines] == d["ranking"][:2]
    assert "localize: 2/2 prompts" in err


def test_localize_search_prints_the_curve_and_resumes(model_dir, tmp_path, capsys):
    out = tmp_path / "search"
    argv = ["localize", model_dir, "--concept", "van gogh", "--prompt", "a photo of van gogh",
            "--localize-method", "search", "--objective", "self", "--max-k", "2", "--k", "auto", "--out", str(out),
            *COMMON]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    d = json.loads((out / "localization.json").read_text())
    assert d["settings"]["method"] == "search" and len(d["search"]["sets"]) == 2
    assert [len(s) for s in d["search"]["sets"]] == [1, 2] and d["search"]["objective"] == "self"
    rows = [line.split() for line in stdout.splitlines() if line.strip()[:2] in ("1 ", "2 ")]
    assert [float(r[1]) for r in rows] == pytest.approx(d["search"]["presence"], abs=1e-3)
    assert "search: " in err and "block sets" in err
    # no halving set found by the forward search: the line says what else to try
    assert ("none up to 2 halves presence" in stdout and "--direction both" in stdout) == (d["search"]["auto_k"] is None)
    k = d["search"]["auto_k"] or 2  # --k auto: the curve's first halving K, else the largest set
    assert d["settings"]["k"] == k and d["settings"]["k_rule"] == "auto"
    sets = len((out / "search.jsonl").read_text().splitlines())
    code, stdout, err = run(argv, capsys)  # the same command again: every set comes from the checkpoint
    assert code == 0 and "(0 generated now" in stdout
    assert len((out / "search.jsonl").read_text().splitlines()) == sets
    iv = tmp_path / "iv"  # intervene --k auto reads K from the search's curve, by the same rule
    code, _, err = run(["intervene", model_dir, "--concept", "van gogh", "--prompt", "a photo of van gogh",
                        "--k", "auto", "--localization", str(out / "localization.json"), "--out", str(iv), *COMMON],
                       capsys)
    assert code == 0, err
    rec = json.loads((iv / "intervention.json").read_text())
    assert rec["blocks"] == sorted(d["search"]["sets"][k - 1]) and rec["k"] == k and rec["k_rule"] == "auto"


def test_intervene_from_localization(model_dir, tmp_path, capsys):
    out = tmp_path / "loc"
    assert run(["localize", model_dir, "--concept", "van gogh", "--prompt", "a photo of van gogh",
                "--localize-method", "contribution", "--out", str(out), *COMMON], capsys)[0] == 0
    iv = tmp_path / "iv"
    code, stdout, err = run(["intervene", model_dir, "--concept", "van gogh", "--prompt", "a photo of van gogh",
                             "--k", "2", "--localization", str(out / "localization.json"),
                             "--out", str(iv), *COMMON], capsys)
    assert code == 0, err
    assert Image.open(iv / "original.png").size == (32, 32)
    assert Image.open(iv / "intervened.png").size == (32, 32)
    rec = json.loads((iv / "intervention.json").read_text())
    top2 = json.loads((out / "localization.json").read_text())["ranking"][:2]
    assert rec["blocks"] == top2 and rec["k"] == 2 and rec["k_rule"] == "given"  # best first, as ranked
    assert rec["clean_prompt"] == "a photo" and rec["mode"] == "withhold"  # no dangling "of"


def test_intervene_explicit_blocks_inject(model_dir, tmp_path, capsys):
    code, _, err = run(["intervene", model_dir, "--concept", "van gogh", "--prompt", "a photo of van gogh",
                        "--blocks", "block.3,block.1", "--mode", "inject", "--clean-prompt", "a photo of a dog",
                        "--out", str(tmp_path / "iv"), *COMMON], capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "iv" / "intervention.json").read_text())
    assert rec["blocks"] == ["block.1", "block.3"] and rec["mode"] == "inject"


def test_localize_causal_method_with_auto_k_feeds_intervene(model_dir, tmp_path, capsys):
    out = tmp_path / "loc"
    code, stdout, err = run(["localize", model_dir, "--concept", "van gogh", "--prompt", "a photo of van gogh",
                             "--prompt", "van gogh at night", "--localize-method", "patch",
                             "--clean-prompt", "a photo of a dog", "--clean-prompt", "a dog at night",
                             "--k", "auto", "--out", str(out), *COMMON], capsys)
    assert code == 0, err
    d = json.loads((out / "localization.json").read_text())
    assert d["settings"]["method"] == "patch"
    assert d["settings"]["clean_prompts"] == ["a photo of a dog", "a dog at night"]
    # block scores: --k auto is the smallest top K holding half the positive score mass
    assert d["settings"]["k_rule"] == "auto" and d["settings"]["k"] == score_mass_k(d["scores"])
    assert f"automatic K = {d['settings']['k']}" in stdout and "method patch" in stdout
    iv = tmp_path / "iv"
    code, _, err = run(["intervene", model_dir, "--concept", "van gogh", "--prompt", "a photo of van gogh",
                        "--k", "auto", "--localization", str(out / "localization.json"), "--out", str(iv), *COMMON],
                       capsys)
    assert code == 0, err
    assert json.loads((iv / "intervention.json").read_text())["blocks"] == d["ranking"][: d["settings"]["k"]]


BAD = [
    (["--concept", "snoopy", "--prompt", "a photo of van gogh"], "not in prompt"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--localize-method", "gradient"], "invalid choice"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--localize-method", "contribution",
      "--clean-prompt", "a photo"], "patch, attribution or search"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--localize-method", "patch", "--clean-prompt", "a",
      "--clean-prompt", "b"], "one per prompt"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--localize-method", "patch", "--block-batch", "0"],
     "--block-batch"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--max-sequence-length", "4"], "cut off"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--k", "0"], "--k must be at least 1"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--k", "most"],
     "--k takes a number of blocks or auto"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--k", "9", "--localize-method", "contribution"],
     "between 1 and 4"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--k", "9", "--max-k", "2"], "between 1 and 4"),
    (["--concept", "van gogh"], "no prompts"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--localize-method", "search", "--max-k", "0"],
     "--max-k must be at least 1"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--localize-method", "search", "--max-k", "5"],
     "max_k must be between 1 and 4"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--localize-method", "search", "--max-k", "3",
      "--candidates", "2"], "must be at least max_k"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--localize-method", "search", "--objective", "judge"],
     "unknown objective 'judge'"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--localize-method", "search", "--objective", "evaluator"],
     "needs --evaluator"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--localize-method", "patch", "--max-k", "3"],
     "setting of --localize-method search"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--search-rank", "sideways"],
     "unknown search ranking"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--search-rank", "gradient", "--evaluator", "vlm"],
     "not differentiable"),
    (["--concept", "van gogh", "--prompt", "a photo of van gogh", "--localize-method", "search", "--evaluator", "toy"],
     "'van gogh' is not a toy concept"),
    (["--concept", "van gogh", "--prompts-file", "/nonexistent/prompts.txt"], "cannot read prompts file"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_localize_bad_input(model_dir, tmp_path, capsys, args, message):
    code, _, err = run(["localize", model_dir, *args, "--out", str(tmp_path / "o"), *COMMON], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ditloc: error:") and message in lines[0], err
    assert "Traceback" not in err


BAD_INTERVENE = [
    (["--blocks", "block.7"], "unknown block 'block.7'"),
    (["--blocks", ","], "--blocks is empty"),
    (["--k", "2"], "--k 2 needs --localization"),
    ([], "either --blocks"),
    (["--blocks", "block.1", "--k", "2"], "either --blocks"),
    (["--k", "2", "--localization", "/nonexistent.json"], "does not exist"),
    (["--k", "auto"], "--k auto needs --localization"),
    (["--k", "0"], "--k must be at least 1"),
]


@pytest.mark.parametrize("args,message", BAD_INTERVENE)
def test_intervene_bad_input(model_dir, tmp_path, capsys, args, message):
    code, _, err = run(["intervene", model_dir, "--concept", "van gogh", "--prompt", "a photo of van gogh",
                        *args, "--out", str(tmp_path / "o"), *COMMON], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_unsupported_pipeline_and_missing_path(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    code, _, err = run(["localize", str(tmp_path / "ddpm"), "--concept", "x", "--prompt", "x",
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "unsupported model DDPMPipeline" in err and "pixart" in err and "sana" in err
    code, _, err = run(["localize", str(tmp_path / "missing"), "--concept", "x", "--prompt", "x",
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_entry_point_subprocess(model_dir, tmp_path):
    """The installed console script: exit status 2 and one line, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "ditloc.cli", "localize", model_dir, "--concept", "snoopy",
                        "--prompt", "a photo of van gogh", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("ditloc: error: concept 'snoopy' is not in prompt")


def test_localize_searches_by_default_and_says_its_objective(model_dir, tmp_path, capsys):
    """No --localize-method: the set-level search; on a model without an evaluator the self objective,
    said in one line before the run."""
    out = tmp_path / "loc"
    code, stdout, err = run(["localize", model_dir, "--concept", "van gogh", "--prompt", "a photo of van gogh",
                             "--max-k", "2", "--verify", "1", "--out", str(out), *COMMON], capsys)
    assert code == 0, err
    assert stdout.splitlines()[0].startswith("search objective: self")
    d = json.loads((out / "localization.json").read_text())
    assert d["settings"]["method"] == "search" and d["search"]["objective"] == "self"
    assert d["settings"]["search"]["rank"] == "gradient" and len(d["search"]["sets"]) == 2


def test_localize_concepts_file_searches_each_concept_on_its_prompts(model_dir, tmp_path, capsys):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("# the list\nvan gogh\ndog\n")
    out = tmp_path / "many"
    code, stdout, err = run(["localize", model_dir, "--concepts-file", str(concepts), "--prompt", "a photo of van gogh",
                             "--prompt", "van gogh painting of a dog", "--max-k", "1", "--verify", "1",
                             "--out", str(out), *COMMON], capsys)
    assert code == 0, err
    van_gogh = json.loads((out / "van-gogh" / "localization.json").read_text())
    dog = json.loads((out / "dog" / "localization.json").read_text())
    assert van_gogh["concept"] == "van gogh" and dog["concept"] == "dog"
    assert van_gogh["settings"]["prompts"] == ["a photo of van gogh", "van gogh painting of a dog"]
    assert dog["settings"]["prompts"] == ["van gogh painting of a dog"]  # only the prompts that hold it
    assert "[1/2] 'van gogh'" in stdout and "[2/2] 'dog'" in stdout


@pytest.mark.parametrize("text,extra,message", [
    ("van gogh\ncat\n", [], "'cat' of"),
    ("dog\ndog\n", [], "listed twice"),
    ("# nothing\n", [], "lists no concept"),
    ("dog\n", ["--concept", "dog"], "not both"),
    ("dog\n", ["--localize-method", "patch"], "use it with --localize-method search"),
    ("dog\n", ["--k", "2"], "apply to one concept"),
])
def test_localize_concepts_file_bad_input(model_dir, tmp_path, capsys, text, extra, message):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text(text)
    code, _, err = run(["localize", model_dir, "--concepts-file", str(concepts), "--prompt", "van gogh painting of a dog",
                        *extra, "--out", str(tmp_path / "o"), *COMMON], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
