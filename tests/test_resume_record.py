"""A resumed run records what an uninterrupted one records, times aside: the search's generations
(those of its checkpoint included), the training's steps and losses, every file of the run.

Each command runs uninterrupted, then into the same --out again from scratch, interrupted by a spy
(Ctrl-C in the middle of the search's generations, or after a training step), then resumed; every
JSON and JSON-lines file of the two runs is compared with its time fields removed."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from bench_helpers import run_cli, setup_files
from PIL import Image

from ditloc import _progress
from ditloc.localization.presence import PresenceRunner

#: the record's fields that hold durations (a resumed run's are its runs' together, never equal)
TIME_FIELDS = {"seconds", "candidate_seconds", "wall_seconds", "solve_seconds"}


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIME_FIELDS}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def record(out: Path) -> dict:
    """Every JSON / JSON-lines file of a run directory (the lock files aside), times removed."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = str(path.relative_to(out))
        if path.suffix == ".json":
            files[rel] = _untimed(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            files[rel] = [_untimed(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
        elif path.is_file() and ".lock" not in path.name:
            files[rel] = "present"
    return files


def interrupt_search(monkeypatch, after: int) -> list:
    """Ctrl-C when the search is about to generate its (after + 1)-th group of sets; -> the groups generated."""
    calls = []
    real = PresenceRunner._measure

    def spy(self, group, gradient=False):
        if len(calls) == after:
            raise KeyboardInterrupt
        calls.append(list(group))
        return real(self, group, gradient)

    monkeypatch.setattr(PresenceRunner, "_measure", spy)
    return calls


def interrupt_training(monkeypatch, step: int) -> None:
    """Ctrl-C when the training reports step `step` (its checkpoint of that step is written first)."""
    real = _progress.write

    def write(message):
        if message.startswith(f"step {step}/"):
            raise KeyboardInterrupt
        real(message)

    monkeypatch.setattr(_progress, "write", write)


def count_generations(monkeypatch) -> list:
    """The groups of sets every later search generates."""
    calls = []
    real = PresenceRunner._measure

    def spy(self, group, gradient=False):
        calls.append(list(group))
        return real(self, group, gradient)

    monkeypatch.setattr(PresenceRunner, "_measure", spy)
    return calls


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    model, probes = setup_files(tmp_path_factory)
    images = tmp_path_factory.mktemp("resume_images")
    rgb = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    for name in ("a", "b"):
        Image.fromarray(rgb).save(images / f"{name}.png")
    return model, probes, images


def _argv(command, model, probes, images, out) -> list[str]:
    if command == "localize":
        return ["localize", str(model), "--concept", "red", "--prompt", "a red car", "--prompt", "a red boat",
                "--localize-method", "search", "--max-k", "2", "--steps", "2", "--out", str(out)]
    if command == "personalize":
        return ["personalize", str(model), "--images", str(images), "--token", "sks", "--class-word", "cat",
                "--k", "2", "--train-steps", "3", "--checkpoint-every", "1", "--steps", "2", "--out", str(out)]
    if command == "unlearn":
        return ["unlearn", str(model), "--concept", "dog", "--anchor", "cat", "--prompt", "a dog on the beach",
                "--images-per-prompt", "1", "--edit-method", "closed-form", "--k", "2", "--steps", "2", "--out", str(out)]
    return ["bench", str(model), "--probes", str(probes), "--categories", "color", "--concepts-per-category", "1",
            "--localization-prompts", "1", "--evaluation-prompts", "1", "--k", "1,2", "--seeds", "0",
            "--evaluator", "toy", "--localize-methods", "search", "--steps", "2", "--out", str(out)]


@pytest.mark.parametrize("command, stop", [
    ("localize", "search"),
    ("personalize", "search"),
    ("personalize", "training"),
    ("unlearn", "search"),
    ("bench", "search"),
])
def test_a_resumed_run_records_what_an_uninterrupted_one_records(files, tmp_path, monkeypatch, command, stop):
    model, probes, images = files
    out, reference = tmp_path / "out", tmp_path / "reference"
    argv = _argv(command, model, probes, images, out)
    with monkeypatch.context() as m:
        generated = count_generations(m)
        code, _, err = run_cli(argv)
    assert code == 0, err
    uninterrupted = len(generated)
    out.rename(reference)  # the resumed run writes into the same path (the records name it)

    with monkeypatch.context() as m:
        if stop == "search":
            interrupt_search(m, after=2)
        else:
            interrupt_training(m, step=2)
        code, _, err = run_cli(argv)
    assert code == 130 and "rerun the same command to resume" in err, err
    with monkeypatch.context() as m:
        generated = count_generations(m)
        code, _, err = run_cli(argv)
    assert code == 0, err
    if stop == "search":  # it resumed: the sets the checkpoint held were not generated again
        assert 0 < len(generated) < uninterrupted
    else:
        assert generated == [] and "resumed at step 2/3" in err

    expected, got = record(reference), record(out)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name
    searched = [v for v in expected.values() if isinstance(v, dict) and "search" in v and v["search"]]
    assert searched and all(v["search"]["cost"]["generations"] > 0 for v in searched)


def test_a_resumed_search_adds_its_earlier_runs_time(files, tmp_path, monkeypatch):
    """The search's seconds are its runs' together: the resumed record's are at least the time its
    checkpoint holds from the interrupted run."""
    model, probes, images = files
    out = tmp_path / "out"
    argv = _argv("localize", model, probes, images, out)
    with monkeypatch.context() as m:
        interrupt_search(m, after=2)
        assert run_cli(argv)[0] == 130
    earlier = sum(json.loads(line).get("seconds", 0.0) for line in (out / "search.jsonl").read_text().splitlines())
    assert earlier > 0
    code, stdout, err = run_cli(argv)
    assert code == 0, err
    cost = json.loads((out / "localization.json").read_text())["search"]["cost"]
    assert cost["seconds"] >= round(earlier, 3)
    assert f"generated now, {cost['generations']} in all" in stdout
    shutil.rmtree(out)
