"""One flag vocabulary across the commands: --seeds, --k N|auto (one rule per purpose), --localize-method(s),
--edit-method, --lora-rank, --search-rank, --contribution-terms, diffusers' --variant / --revision; the flags
they replaced are refused in one line naming their successor, before any model loads."""

import json

import pytest
import torch
from PIL import Image

from ditloc import cli
from ditloc.cli import main
from ditloc.edit import erase_k
from ditloc.localization import Localization, SetSearch
from ditloc.testing import tiny_pixart_pipeline
from cli_helpers import run_main as run

BLOCKS = ("block.0", "block.1", "block.2", "block.3")  # the tiny PixArt's
#: a search whose sets lower presence by 0.3, 0.6 and 0.95 of the baseline: --k auto acts on K = 2 (the first
#: that halves presence), an erasure takes K = 3 (the first that removes 90%)
SEARCH = SetSearch(objective="evaluator", baseline=1.0, sets=(("block.2",), ("block.2", "block.0"),
                                                              ("block.2", "block.0", "block.3")),
                   presence=(0.7, 0.4, 0.05))
PROMPT = "a photo of a dog"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "pixart"
    tiny_pixart_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture()
def searched(tmp_path):
    per = torch.zeros(len(BLOCKS), 1, 1)
    loc = Localization(concept="dog", blocks=BLOCKS, per_sample_step=per, per_head_step=per.new_zeros(4, 1, 1, 0),
                       spans=(), settings={"method": "search"}, search=SEARCH)
    return loc.save(tmp_path / "loc.json")


def one_error_line(code, err) -> str:
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ditloc: error: "), err
    return lines[0]


RETIRED = [
    (["localize", "M", "--seed", "1"], "--seed is retired; use --seeds"),
    (["localize", "M", "--seed=1"], "--seed is retired; use --seeds"),
    (["localize", "M", "--top-k", "2"], "--top-k is retired; use --k N"),
    (["localize", "M", "--auto-k"], "--auto-k is retired; use --k auto"),
    (["localize", "M", "--method", "patch"], "--method is retired; use --localize-method"),
    (["localize", "M", "--rank", "generation"], "--rank is retired; use --search-rank"),
    (["localize", "M", "--variant", "attn_value"], "--variant attn_value is retired; use --contribution-terms attn_value"),
    (["intervene", "M", "--seed", "0"], "--seed is retired; use --seeds"),
    (["intervene", "M", "--top-k", "1"], "--top-k is retired; use --k N"),
    (["intervene", "M", "--auto-k"], "--auto-k is retired; use --k auto"),
    (["personalize", "M", "--seed", "3"], "--seed is retired; use --seeds"),
    (["personalize", "M", "--method", "full"], "--method is retired; use --edit-method lora|full"),
    (["personalize", "M", "--rank", "8"], "--rank is retired; use --lora-rank"),
    (["unlearn", "M", "--auto-k"], "--auto-k is retired; use --k gap"),
    (["unlearn", "M", "--auto-k-fraction", "0.8"], "--auto-k-fraction is retired; use --gap-fraction"),
    (["unlearn", "M", "--method", "closed-form"], "--method is retired; use --edit-method lora|full|closed-form"),
    (["unlearn", "M", "--rank", "8"], "--rank is retired; use --lora-rank"),
    (["unlearn", "M", "--seed", "0"], "--seed is retired; use --seeds"),
    (["unlearn", "M", "--variant", "attn"], "--variant attn is retired; use --contribution-terms attn"),
    (["bench", "M", "--method", "patch"], "--method is retired; use --localize-methods"),
    (["bench", "M", "--seed", "0"], "--seed is retired; use --seeds"),
    (["bench", "M", "--localize-seed", "0"], "--localize-seed is retired; use --localize-seeds"),
    (["bench", "M", "--variant", "attn_value_out"], "--variant attn_value_out is retired; use --contribution-terms"),
    (["ground-truth", "--methods", "patch"], "--methods is retired; use --localize-methods"),
    (["report", "RUN", "--threshold", "0.8"], "--threshold is retired; use --drop"),
]


@pytest.mark.parametrize("argv, message", RETIRED)
def test_retired_flag_is_refused_naming_its_successor(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(cli.models, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    code, _, err = run(argv + ["--out", str(tmp_path / "o")], capsys)
    assert message in one_error_line(code, err)


def test_unknown_flag_is_one_line(tmp_path, capsys):
    code, _, err = run(["localize", "toy", "--concept", "zibbit", "--prompt", "a zibbit", "--sead", "1",
                        "--out", str(tmp_path / "o")], capsys)
    assert "unrecognized arguments: --sead 1" in one_error_line(code, err)


def test_the_cli_names_the_librarys_methods_and_terms():
    from ditloc.cli.common import CONTRIBUTION_TERMS, LOCALIZE_METHODS
    from ditloc.engine import CONTRIBUTION_TERMS as ENGINE_TERMS
    from ditloc.localization import METHODS

    assert CONTRIBUTION_TERMS == ENGINE_TERMS and set(LOCALIZE_METHODS) == set(METHODS)


# --- --seeds ---------------------------------------------------------------------------------------------------

def test_localize_seeds_are_each_a_trajectory(model_dir, tmp_path, capsys):
    """--seeds 0,1: two samples per prompt in the record, each the trajectory its seed alone gives."""
    common = ["--concept", "dog", "--prompt", PROMPT, "--localize-method", "contribution", "--batch-size", "1",
              "--steps", "2"]
    assert run(["localize", model_dir, *common, "--seeds", "0,1", "--out", str(tmp_path / "two")], capsys)[0] == 0
    assert run(["localize", model_dir, *common, "--seeds", "1", "--out", str(tmp_path / "one")], capsys)[0] == 0
    two = json.loads((tmp_path / "two" / "localization.json").read_text())
    one = json.loads((tmp_path / "one" / "localization.json").read_text())
    assert two["settings"]["seeds"] == [0, 1] and one["settings"]["seeds"] == [1]
    per = torch.tensor(two["per_sample_step"])  # [blocks, steps, samples]
    assert per.shape == (4, 2, 2)
    assert torch.equal(per[:, :, 1], torch.tensor(one["per_sample_step"])[:, :, 0])  # seed 1, batch of one both times
    assert not torch.equal(per[:, :, 0], per[:, :, 1])


def test_intervene_seeds_write_one_pair_per_seed(model_dir, tmp_path, capsys):
    code, out, err = run(["intervene", model_dir, "--concept", "dog", "--prompt", PROMPT, "--blocks", "block.1",
                          "--seeds", "0,1", "--steps", "2", "--out", str(tmp_path / "iv")], capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "iv" / "intervention.json").read_text())
    assert rec["seeds"] == [0, 1] and [i["seed"] for i in rec["images"]] == [0, 1]
    pixels = [Image.open(tmp_path / "iv" / i["original"]).tobytes() for i in rec["images"]]
    assert all((tmp_path / "iv" / i["intervened"]).is_file() for i in rec["images"])
    assert pixels[0] != pixels[1]  # each seed its own image
    assert "2 seed(s)" in out


@pytest.mark.parametrize("seeds, message", [
    ("0,0", "--seeds lists a seed twice"),
    ("zero", "--seeds takes comma-separated integers"),
    (",", "--seeds is empty"),
])
def test_bad_seeds(tmp_path, capsys, monkeypatch, seeds, message):
    monkeypatch.setattr(cli.models, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    for argv in (["localize", "toy", "--concept", "zibbit", "--prompt", "a zibbit"],
                 ["unlearn", "toy", "--concept", "zibbit", "--anchor", "a triangle"],
                 ["bench", "toy", "--evaluator", "toy"]):
        code, _, err = run(argv + ["--seeds", seeds, "--out", str(tmp_path / "o")], capsys)
        assert message in one_error_line(code, err)


@pytest.mark.parametrize("argv, flag", [
    (["localize", "toy", "--concept", "zibbit", "--prompt", "a zibbit", "--seeds", "0", "--seeds", "1"], "--seeds"),
    (["unlearn", "toy", "--concept", "zibbit", "--anchor", "a triangle", "--k", "2", "--k", "auto"], "--k"),
    (["bench", "toy", "--evaluator", "toy", "--localize-seeds", "0", "--localize-seeds", "1"], "--localize-seeds"),
])
def test_a_vocabulary_flag_given_twice_is_refused(tmp_path, capsys, monkeypatch, argv, flag):
    """argparse would keep the last silently; a comma list says every seed at once."""
    monkeypatch.setattr(cli.models, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    code, _, err = run(argv + ["--out", str(tmp_path / "o")], capsys)
    assert f"{flag} given twice; give it once" in one_error_line(code, err)


# --- --k N|auto --------------------------------------------------------------------------------------------------

def test_k_auto_and_k_n_on_intervene_and_unlearn(model_dir, searched, tmp_path, capsys):
    """One saved search, two purposes: intervene's --k auto acts on the set that halves presence (K = 2),
    unlearn's --k auto (its default) erases with the set that removes 90% (K = 3); --k N takes S_N on both."""
    loc = Localization.load(searched)
    assert loc.k_auto() == 2 and erase_k(loc) == 3
    for k, want in (("auto", loc.top(2)), ("1", loc.top(1))):
        code, _, err = run(["intervene", model_dir, "--concept", "dog", "--prompt", PROMPT, "--k", k,
                            "--localization", str(searched), "--steps", "2", "--out", str(tmp_path / f"iv{k}")], capsys)
        assert code == 0, err
        assert json.loads((tmp_path / f"iv{k}" / "intervention.json").read_text())["blocks"] == want
    edit = ["unlearn", model_dir, "--concept", "dog", "--anchor", "a cat", "--prompt", PROMPT, "--preserve",
            "a photo of a car", "--edit-method", "closed-form", "--blocks", str(searched), "--steps", "2"]
    for k, want in (("auto", loc.top(3)), (None, loc.top(3)), ("2", loc.top(2))):
        out = tmp_path / f"edit{k}"
        code, stdout, err = run(edit + (["--k", k] if k else []) + ["--out", str(out)], capsys)
        assert code == 0, err
        assert json.loads((out / "ditloc_edit.json").read_text())["blocks"] == want
        assert f"in {', '.join(want)} for 1 concept(s)" in stdout


@pytest.mark.parametrize("argv, message", [
    (["unlearn", "toy", "--concept", "zibbit", "--anchor", "a triangle", "--k", "many"],
     "--k takes a number of blocks or auto or gap"),
    (["unlearn", "toy", "--concept", "zibbit", "--anchor", "a triangle", "--k", "0"], "--k must be at least 1"),
    (["personalize", "toy", "--images", "x", "--token", "sks", "--class-word", "dog", "--k", "gap"],
     "--k takes a number of blocks or auto, got 'gap'"),
    (["demo", "--k", "sometimes"], "--k takes a number of blocks or auto"),
    (["localize", "toy", "--concept", "zibbit", "--prompt", "a zibbit", "--k", "13"],
     "--k must be between 1 and 12 (the number of blocks), got 13"),
    (["unlearn", "toy", "--concept", "zibbit", "--anchor", "a triangle", "--k", "13"], "--k must be between 1 and 12"),
])
def test_bad_k(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(cli.models, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    code, _, err = run(argv + ["--out", str(tmp_path / "o")], capsys)
    assert message in one_error_line(code, err)


def test_erase_k_without_a_curve_is_the_score_mass_rule():
    per = torch.tensor([0.1, 0.6, 0.3, 0.0]).view(4, 1, 1)
    loc = Localization(concept="dog", blocks=BLOCKS, per_sample_step=per, per_head_step=per.new_zeros(4, 1, 1, 0),
                       spans=())
    assert erase_k(loc) == loc.k_auto() == 1  # block.1 holds 0.6 of the mass


# --- diffusers' --variant and --revision ---------------------------------------------------------------------------

class Loaded(Exception):
    """Raised by the fake loader: the command got as far as loading MODEL."""


@pytest.fixture()
def fake_hub(monkeypatch):
    """DiffusionPipeline.from_pretrained, recording its arguments (no network)."""
    from diffusers import DiffusionPipeline

    calls = []

    def from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        if kwargs.get("revision") == "stop":
            raise Loaded
        return tiny_pixart_pipeline()

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", from_pretrained)
    return calls


def test_variant_and_revision_reach_from_pretrained(fake_hub, tmp_path, capsys):
    base = ["localize", "someone/tiny-pixart", "--concept", "dog", "--prompt", PROMPT, "--localize-method",
            "contribution", "--steps", "2"]
    code, _, err = run(base + ["--variant", "fp16", "--revision", "v1.0", "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    code, _, err = run(base + ["--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    assert fake_hub == [("someone/tiny-pixart", {"variant": "fp16", "revision": "v1.0"}),
                        ("someone/tiny-pixart", {})]  # neither given: diffusers' defaults


def test_every_command_that_loads_a_model_passes_them(fake_hub, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(images / "a.png")
    model = "someone/tiny-pixart"
    commands = {
        "localize": ["localize", model, "--concept", "dog", "--prompt", PROMPT],
        "intervene": ["intervene", model, "--concept", "dog", "--prompt", PROMPT, "--blocks", "block.1"],
        "personalize": ["personalize", model, "--images", str(images), "--token", "sks", "--class-word", "dog"],
        "unlearn": ["unlearn", model, "--concept", "dog", "--anchor", "a cat", "--prompt", PROMPT],
        "bench": ["bench", model, "--probes", "toy", "--evaluator", "toy"],
        "ground-truth": ["ground-truth", "--model", model],
    }
    for name, argv in commands.items():
        fake_hub.clear()
        with pytest.raises(Loaded):
            main(argv + ["--variant", "fp16", "--revision", "stop", "--out", str(tmp_path / name)])
        capsys.readouterr()
        assert fake_hub == [(model, {"variant": "fp16", "revision": "stop"})], name


@pytest.mark.parametrize("model, flags, message", [
    ("toy", ["--variant", "fp16"], "--variant selects the files of a diffusers checkpoint"),
    ("toy", ["--revision", "main"], "--revision selects the files of a diffusers checkpoint"),
    ("LOCAL", ["--revision", "main"], "is a local directory"),
    ("someone/model", ["--revision", " "], "--revision is empty"),
])
def test_variant_and_revision_refused_where_they_cannot_apply(model_dir, tmp_path, capsys, monkeypatch, model,
                                                                flags, message):
    monkeypatch.setattr(cli.models, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    model = model_dir if model == "LOCAL" else model
    code, _, err = run(["localize", model, "--concept", "dog", "--prompt", PROMPT, *flags,
                        "--out", str(tmp_path / "o")], capsys)
    assert message in one_error_line(code, err)


# --- --contribution-terms -------------------------------------------------------------------------------------------

def test_contribution_terms_recorded_and_old_files_read(model_dir, tmp_path, capsys):
    code, _, err = run(["localize", model_dir, "--concept", "dog", "--prompt", PROMPT, "--localize-method",
                        "contribution", "--contribution-terms", "attn", "--steps", "2", "--out", str(tmp_path / "l")],
                       capsys)
    assert code == 0, err
    path = tmp_path / "l" / "localization.json"
    d = json.loads(path.read_text())
    assert d["settings"]["contribution_terms"] == "attn" and "variant" not in d["settings"]
    d["settings"]["variant"] = d["settings"].pop("contribution_terms")  # as written before the rename
    path.write_text(json.dumps(d))
    assert Localization.load(path).settings["contribution_terms"] == "attn"
