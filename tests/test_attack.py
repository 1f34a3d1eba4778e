"""`ditloc attack`: every family and attack runs and writes replayable artifacts, a replay gives the same
scores, an interrupted attack resumes to the same result, the pipeline leaves as it came, the
conditioning attack brings back a concept the closed form erased on the toy model, and bad input is one
line (exit 2) before any model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ditloc
from ditloc import cli
from ditloc.adapters import get_adapter
from ditloc.attacks import AttackConfig, attack, find_placeholder, injected, replay
from ditloc.attacks import params
from ditloc.errors import DitlocError
from ditloc.evaluate import get_evaluator
from ditloc.testing import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sana_pipeline, tiny_sd3_pipeline

MAKE = {"pixart": tiny_pixart_pipeline, "sana": tiny_sana_pipeline, "flux": tiny_flux_pipeline,
        "sd3": tiny_sd3_pipeline}
#: small sampling settings; 32 px, the toy oracle's size (the evaluator of these tests)
RUN = {"num_inference_steps": 2, "height": 32, "width": 32, "max_sequence_length": 16}
SANA_RUN = {"use_resolution_binning": False}  # the tiny model's 32 px would be binned to 512 px buckets
CLI_RUN = ["--steps", "2", "--height", "32", "--width", "32", "--max-sequence-length", "16"]
ORACLE = ["--evaluator", "toy", "--eval-text", "shape: star"]


def _run(family: str) -> dict:
    return {**RUN, **(SANA_RUN if family == "sana" else {})}


def _cli_run(family: str) -> list[str]:
    return CLI_RUN + (["--pipeline-arg", "use_resolution_binning=false"] if family == "sana" else [])


def _cli(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:
        return int(e.code)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _exact(family: str):
    """A tiny pipeline in float64: a replay or a resume repeats every pixel on any CPU (float32 matmuls may
    be blocked differently from one call to the next and move a pixel across a rounding step)."""
    return _quiet(MAKE[family]().to(torch.float64))


def _erase_dog(model_dir, out, family) -> None:
    """A real closed-form erasure of "dog" in one block (small settings, one preserved prompt)."""
    block = "double.0" if family == "flux" else "block.1"
    code = _cli(["unlearn", str(model_dir), "--concept", "dog", "--anchor", "cat", "--prompt", "a dog",
                 "--preserve", "a cat", "--edit-method", "closed-form", "--blocks", block, "--steps", "2",
                 "--height", "16", "--width", "16", "--out", str(out)]
                + (["--pipeline-arg", "use_resolution_binning=false"] if family == "sana" else []))
    assert code == 0


@pytest.fixture(scope="module")
def erased(tmp_path_factory):
    """{family: (model directory, edit directory)}, made once."""
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            MAKE[family]().save_pretrained(root / "model")
            _erase_dog(root / "model", root / "edit", family)
            made[family] = (root / "model", root / "edit")
        return made[family]

    return get


# ---- every family, every attack ------------------------------------------------------------------------------
@pytest.mark.parametrize("family, kind", [("pixart", "conditioning"), ("sana", "tokens"), ("flux", "inversion"),
                                          ("sd3", "tokens")])
def test_cli_attack_writes_artifacts_that_replay_to_the_same_scores(tmp_path, capsys, erased, family, kind):
    model, edit = erased(family)
    out = tmp_path / "atk"
    code = _cli(["attack", str(model), "--edit", str(edit), "--concept", "dog", "--attack", kind,
                 "--budget-steps", "2", "--n-images", "2", "--train-images", "2", "--batch-size", "2",
                 *ORACLE, *_cli_run(family), "--dtype", "float64", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "| unedited |" in printed and "| edited |" in printed
    record = json.loads((out / "attack.json").read_text())
    assert [(c["model"], c["condition"]) for c in record["cells"]] == [
        ("unedited", "plain"), ("unedited", "attack"), ("edited", "plain"), ("edited", "attack")]
    assert all(c["n"] == 2 and len(c["scores"]) == 2 for c in record["cells"])
    for model_name in ("unedited", "edited"):
        assert (out / model_name / "adversarial.safetensors").is_file()
        assert record["optimization"][model_name]["steps"] == 2
    if kind == "tokens":  # the chosen tokens, per text encoder, as words
        encoders = {name for name, *_ in get_adapter(MAKE[family]()).text_encoders()}
        assert set(record["artifacts"]["edited"]["tokens"]) == encoders
    code = _cli(["attack", "--replay", str(out)])
    assert code == 0 and "the scores are equal to the recorded ones" in capsys.readouterr().out
    again = json.loads((out / "replay.json").read_text())
    assert [c["scores"] for c in again["cells"]] == [c["scores"] for c in record["cells"]]


@pytest.mark.parametrize("kind", ["prompts", "tokens", "inversion", "conditioning"])
@pytest.mark.parametrize("family", ["pixart", "sana", "flux", "sd3"])
def test_every_attack_on_every_family_replays(tmp_path, family, kind):
    pipe = _exact(family)
    oracle = get_evaluator("toy")
    budget = {} if kind == "prompts" else {"steps": 2, "train_images": 2, "batch_size": 2}
    res = attack(pipe, "dog", kind=kind, n_images=2, evaluator=oracle, eval_text="shape: star", out=tmp_path,
                 **budget, **_run(family))
    assert res.models == ["given"] and [c.condition for c in res.cells] == ["plain", "attack"]
    if kind == "prompts":  # every template of the category, both splits
        assert set(res.artifacts["given"]["prompts"]) == set(res.settings["carriers"]["train"]) | \
            set(res.settings["carriers"]["held_out"])
    again = replay(pipe, tmp_path, evaluator=oracle)
    assert [c.scores for c in again.cells] == [c.scores for c in res.cells]


# ---- the mechanisms -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["pixart", "sana", "flux", "sd3"])
def test_injected_concept_vectors_read_as_the_concept(family):
    """The placeholder's positions carrying the concept's own token vectors encode exactly as the concept."""
    pipe = MAKE[family]()
    adapter = get_adapter(pipe)
    kw = {"max_sequence_length": 16}
    prompts = ["a red dog on the beach", "a dog"]
    placeholder = find_placeholder(adapter, kw, prompts, "dog", "replace", 1)  # "dog": one token in each
    vectors = {}
    for name, encoder, tokenizer, _ in adapter.text_encoders():
        ids = tokenizer("a dog", add_special_tokens=False)["input_ids"][1:]
        vectors[name] = encoder.get_input_embeddings().weight[torch.tensor(ids)]
    with torch.no_grad():
        plain = adapter.encode_text(prompts, kw)
        with injected(adapter, placeholder, vectors):
            slotted = adapter.encode_text([p.replace("dog", placeholder.phrase) for p in prompts], kw)
        moved = adapter.encode_text([p.replace("dog", placeholder.phrase) for p in prompts], kw)
    assert plain.keys() == slotted.keys() and all(torch.equal(plain[k], slotted[k]) for k in plain)
    assert not torch.equal(plain["embeds"], moved["embeds"])  # without the vectors the placeholder reads as itself


@pytest.mark.parametrize("family", ["pixart", "sana", "flux", "sd3"])
def test_conditioning_without_change_is_the_plain_generation(family):
    """The conditioning attack hands the pipeline its own text states: unchanged, the images are the prompt's."""
    from ditloc.options import RunOptions

    pipe = _quiet(MAKE[family]())
    resolved = RunOptions.of(None, **_run(family)).resolve(pipe)  # the call arguments every attack makes
    adapter, kw = resolved.adapter, resolved.call_kwargs
    method = params.Conditioning(adapter, kw, "dog", ["a red dog on the beach"])
    zero = {k: torch.zeros_like(v) for k, v in method.init(torch.Generator()).items()}
    generator = lambda: [torch.Generator().manual_seed(3)]  # noqa: E731
    with torch.no_grad():
        plain = pipe(prompt=["a red dog on the beach"], generator=generator(), output_type="np", **kw).images
        _, kwargs = method.call(["a red dog on the beach"], zero)
        same = pipe(**kwargs, generator=generator(), output_type="np", **kw).images
        _, kwargs = method.call(["a red dog on the beach"], {k: v + 1.0 for k, v in zero.items()})
        moved = pipe(**kwargs, generator=generator(), output_type="np", **kw).images
    assert np.array_equal(plain, same) and not np.array_equal(plain, moved)


def test_pipeline_leaves_as_it_came(tmp_path, erased):
    """Attacking with an edit folder applies the edit for the edited model only, and takes it out again."""
    model, edit = erased("pixart")
    pipe = _quiet(ditloc.cli.models.load_pipeline(str(model)))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    attack(pipe, "dog", edit=edit, kind="prompts", n_images=1, evaluator=get_evaluator("toy"),
           eval_text="shape: star", **RUN)
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", ["pixart", "sana"])  # peft injected by ditloc; diffusers' own LoRA loader
def test_lora_edit_is_taken_out_again(tmp_path, family):
    from ditloc.attacks.edits import applied, read_edit
    from ditloc.edit import TrainConfig, unlearn

    run = {"num_inference_steps": 2, "height": 32, "width": 32, "use_resolution_binning": False}
    pipe = _quiet(MAKE[family]())
    unlearn(pipe, "dog", "cat", prompts=["a dog"], blocks="block.1", images_per_prompt=1,
            config=TrainConfig(steps=2, batch_size=1, lr=1e-2), out=tmp_path, **run)
    fresh = _quiet(MAKE[family]())
    image = lambda: fresh(["a dog"], generator=torch.Generator().manual_seed(0), output_type="np",  # noqa: E731
                          **run).images
    names = [n for n, _ in fresh.transformer.named_modules()]
    state = {k: v.clone() for k, v in fresh.transformer.state_dict().items()}
    first = image()
    with applied(fresh, read_edit(tmp_path)):
        edited = image()
    assert not np.array_equal(first, edited)
    after = fresh.transformer.state_dict()
    assert [n for n, _ in fresh.transformer.named_modules()] == names and not getattr(fresh.transformer,
                                                                                      "peft_config", None)
    assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)


def test_resume_after_interruption_gives_the_same_result(tmp_path):
    def job(out, progress=None):
        pipe = _exact("pixart")
        return attack(pipe, "dog", kind="inversion", steps=6, n_images=2, train_images=2, batch_size=2,
                      checkpoint_every=1, evaluator=get_evaluator("toy"), eval_text="shape: star", out=out,
                      progress=progress, **RUN)

    whole = job(tmp_path / "a")

    def interrupt(message):
        if message.startswith("given: step 3/6"):
            raise KeyboardInterrupt

    with pytest.raises(DitlocError, match="interrupted at step 3; rerun"):
        job(tmp_path / "b", progress=interrupt)
    messages = []
    resumed = job(tmp_path / "b", progress=messages.append)
    assert "given: resumed at step 3/6" in messages
    assert resumed.optimization["given"]["losses"] == whole.optimization["given"]["losses"]
    assert [c.scores for c in resumed.cells] == [c.scores for c in whole.cells]
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "given" / "adversarial.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_another_attack_in_the_same_out_is_refused(tmp_path):
    pipe = _quiet(tiny_pixart_pipeline())
    oracle = get_evaluator("toy")
    attack(pipe, "dog", kind="prompts", n_images=1, evaluator=oracle, eval_text="shape: star", out=tmp_path, **RUN)
    with pytest.raises(DitlocError, match="holds another attack"):
        attack(pipe, "cat", kind="prompts", n_images=1, evaluator=oracle, eval_text="shape: star", out=tmp_path,
               **RUN)


# ---- on the toy model: a real behavioural check ------------------------------------------------------------
def test_conditioning_attack_brings_back_zibbit_after_a_closed_form_erasure(tmp_path):
    """The closed form (every block) erases zibbit from the plain prompt; its text states, moved by the
    attack with the edited model's own denoising loss, draw it again."""
    from ditloc.edit import ClosedFormConfig, unlearn

    pipe = _quiet(ditloc.toy.load_pipeline())
    sampling = {"num_inference_steps": 10}
    prompts = ["a picture of a zibbit in the forest", "a zibbit at night"]
    images = ditloc.generate(pipe, prompts, seed=[100, 101, 102, 103], output_type="pt", **sampling)  # [8, 3, 32, 32]
    unlearn(pipe, "zibbit", "triangle", blocks="all", config=ClosedFormConfig())
    res = attack(pipe, "zibbit", kind="conditioning", steps=40, n_images=8, images=images * 2 - 1,
                 captions=[p for p in prompts for _ in range(4)], **sampling)
    plain, hit = res.cell("given", "plain"), res.cell("given", "attack")
    assert res.settings["eval_text"] == "character: zibbit"
    assert plain.presence <= 0.25 and hit.presence >= 0.75, (plain.scores, hit.scores)


# ---- bad input: one line, exit 2, no model -----------------------------------------------------------------
def _fake_edit(path, concept="zibbit", weights=True, kind="unlearn"):
    path.mkdir(parents=True, exist_ok=True)
    if weights:
        (path / "blocks.safetensors").write_bytes(b"")
    (path / "ditloc_edit.json").write_text(json.dumps({"kind": kind, "details": {"concept": concept}}))
    return path


def _images(folder, size):
    folder.mkdir()
    Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


BAD = [
    (lambda t: ["--edit", str(t / "nothing")], "is not a directory"),
    (lambda t: ["--edit", str(_fake_edit(t / "e", weights=False))], "holds no edit"),
    (lambda t: ["--edit", str(_fake_edit(t / "e", concept="striped"))], "erased 'striped', not 'zibbit'"),
    (lambda t: ["--edit", str(_fake_edit(t / "e", kind="personalize"))], "not an erasure"),
    (lambda t: ["--budget-steps", "0"], "--budget-steps must be a positive integer"),
    (lambda t: ["--n-images", "-3"], "--n-images must be a positive integer"),
    (lambda t: ["--lr", "0"], "--lr must be > 0"),
    (lambda t: ["--images", str(_images(t / "imgs", 16))], "is 16x16; the model generates 32x32"),
    (lambda t: ["--images", str(t / "missing")], "does not exist"),
    (lambda t: ["--attack", "jailbreak"], "invalid choice: 'jailbreak'"),
    (lambda t: ["--attack", "prompts", "--budget-steps", "5"], "the prompts attack has none"),
    (lambda t: ["--attack", "inversion", "--mode", "prefix"], "--mode prefix is the tokens attack's"),
    (lambda t: ["--eval-text", "shape: hexagon"], "'hexagon' is not a toy shape"),
    (lambda t: ["--captions"], "--captions are the captions of --images"),
    (lambda t: ["--images", str(_images(t / "imgs", 32)), "--captions"], "a.png has no caption file a.txt"),
    (lambda t: ["--prompts-file", str(t / "none.txt")], "cannot read prompts file"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_input_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(cli.models, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    args = ["attack", "toy", "--concept", "zibbit", "--attack", "conditioning", "--out", str(tmp_path / "out")]
    code = _cli(args + extra(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ditloc: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_replay_of_an_unfinished_attack_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.models, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    code = _cli(["attack", "--replay", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds no finished attack" in err[0]
    code = _cli(["attack", "--replay", str(tmp_path), "--concept", "zibbit"])
    assert code == 2 and "leave out --concept" in capsys.readouterr().err


def test_captions_are_one_per_image_with_the_concept():
    pipe = tiny_pixart_pipeline()
    images = torch.zeros(2, 3, 32, 32)
    common = {"kind": "inversion", "images": images, "evaluator": get_evaluator("toy"), "eval_text": "shape: star"}
    with pytest.raises(DitlocError, match="1 captions for 2 images"):
        attack(pipe, "dog", captions=["a dog"], **common)
    with pytest.raises(DitlocError, match="does not contain the concept 'dog'"):
        attack(pipe, "dog", captions=["a dog", "a cat"], **common)
    with pytest.raises(DitlocError, match="pass the images too"):
        attack(pipe, "dog", kind="tokens", captions=["a dog"])


def test_config_refuses_budgets_that_spend_nothing():
    for bad in ({"steps": 0}, {"n_images": 0}, {"train_images": 0}, {"batch_size": 0}, {"tokens": 0},
                {"tokens": -1}, {"lr": -1.0}, {"threshold": 1.0}, {"steps": True}):
        with pytest.raises(DitlocError):
            AttackConfig(**{"kind": "tokens", **bad})
    cfg = AttackConfig(kind="tokens")
    assert cfg.total_steps == 200 and cfg.n_tokens == 5 and cfg.placement == "prefix"
    assert AttackConfig(kind="inversion").placement == "replace" and AttackConfig(kind="prompts").budget() == {
        "n_images": 64}
