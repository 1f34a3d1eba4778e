"""Faults a user can cause: concurrent writers, kills, and bad CLI input (exit 2, one line, no traceback)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ditloc import _state
from ditloc._io import LOCK_FILE, OutputLock, write_atomic
from ditloc.errors import DitlocError

SRC = Path(__file__).resolve().parents[1] / "src"
#: subprocesses run in tmp_path: this checkout's src first (a relative PYTHONPATH=src, or an editable install of
#: another checkout, would otherwise test other code)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_concurrent_atomic_writes_never_collide(tmp_path):
    target = tmp_path / "f.json"
    errors = []

    def writer(i):
        for j in range(50):
            try:
                write_atomic(target, f"{i}-{j}" * 100)
            except Exception as e:  # noqa: BLE001 - any failure is the bug
                errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    text = target.read_text()
    head = text.split("-")[0]
    assert text == (text[: len(text) // 100]) * 100 and head.isdigit()  # one writer's whole content
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporaries left behind


HOLD = "import sys, time; from ditloc._io import OutputLock; l = OutputLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(60)"


def test_second_writer_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DitlocError, match=f"another ditloc process \\(PID {holder.pid}\\)"):
            with OutputLock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with OutputLock(tmp_path):  # the kernel released the killed holder's lock
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())


KILL_WRITER = """
import sys, torch
from ditloc import _state
stem = sys.argv[1]
for step in range(1, 10**6):
    _state.save_state(stem, {"w": torch.full((256, 256), float(step))}, {"step": step})
    print(step, flush=True)
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
def test_checkpoint_survives_kill_at_any_instant(tmp_path, delay):
    """kill -9 while checkpoints are being replaced: what is on disk is a whole checkpoint."""
    stem = tmp_path / "checkpoint"
    proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(stem)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "1"  # at least one complete save
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _state.state_exists(stem)
    tensors, meta = _state.load_state(stem)
    assert torch.equal(tensors["w"], torch.full((256, 256), float(meta["step"])))  # tensors and meta of one save


def test_checkpoint_needs_no_sidecar(tmp_path):
    stem = tmp_path / "ck"
    _state.save_state(stem, {"a": torch.arange(3)}, {"step": 7})
    Path(f"{stem}.json").unlink()  # a kill right after the tensor file was replaced
    tensors, meta = _state.load_state(stem)
    assert meta["step"] == 7 and tensors["a"].tolist() == [0, 1, 2]


def _cli(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "ditloc.cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=tmp_path, timeout=300)


NO_MODEL = "./no_such_model"
BAD = [
    # (argv, expected text in the one error line)
    (["localize", "toy", "--concept", "red", "--prompt", "a red star", "--out", "FILE"], "is a file"),
    (["intervene", "toy", "--concept", "red", "--prompt", "a red star", "--blocks", "block.1", "--out", "FILE"],
     "is a file"),
    (["bench", "toy", "--evaluator", "nope", "--out", "o"], "invalid choice"),
    (["localize", "toy", "--concept", "red", "--prompt", "a red star", "--steps", "1", "--out", "o"],
     "cannot sample 1 step"),
    (["localize", "toy", "--concept", "red", "--prompt", "a red star", "--adapter-option", "oops", "--out", "o"],
     "KEY=VALUE"),
    (["localize", "toy", "--concept", "red", "--prompt", "a red star", "--adapter-option", "x=1", "--out", "o"],
     "pixart has no option 'x' (its options: none)"),
    (["localize", "toy", "--concept", "blue", "--prompt", "a red star", "--out", "o"], "is not in prompt"),
    (["localize", "toy", "--concept", "red", "--out", "o"], "no prompts"),
    (["unlearn", "toy", "--concept", "red", "--anchor", "blue", "--train-steps", "0", "--out", "o"],
     "--train-steps"),
    (["personalize", "toy", "--images", "FILE", "--token", "sks", "--class-word", "star", "--blocks", "block.1",
      "--out", "o"], "is a file; --images takes a folder"),
    (["report", "missing_run"], "missing_run does not exist: `ditloc report` reads the --out of"),
    (["intervene", "toy", "--concept", "red", "--prompt", "a red star", "--blocks", "block.99", "--out", "o"],
     "unknown block"),
    (["frobnicate"], "invalid choice"),
    (["localize", "toy", "--concept", "red", "--prompt", "a red star", "--pipeline-arg", "bogus=1", "--out", "o"],
     "takes no argument 'bogus'"),
    (["intervene", "toy", "--concept", "red", "--prompt", "a red star", "--blocks", "block.1", "--height", "0",
      "--out", "o"], "--height must be positive"),
    # the MODEL of these does not exist: each must be refused before a model would load
    (["localize", NO_MODEL, "--concept", "red", "--prompt", "a red star", "--batch-size", "0", "--out", "o"],
     "--batch-size must be at least 1, got 0"),
    (["localize", NO_MODEL, "--concept", "red", "--prompt", "a red star", "--k", "-2", "--out", "o"],
     "--k must be at least 1, got -2"),
    (["localize", NO_MODEL, "--concept", "red", "--prompt", "a red star", "--steps", "0", "--out", "o"],
     "--steps must be at least 1, got 0"),
    (["localize", NO_MODEL, "--concept", "blue", "--prompt", "a red star", "--out", "o"],
     "concept 'blue' is not in prompt 'a red star'"),
    (["localize", NO_MODEL, "--concept", "red", "--prompt", "", "--out", "o"], "--prompt is empty"),
    (["localize", NO_MODEL, "--concept", " ", "--prompt", "a red star", "--out", "o"], "--concept is empty"),
    (["localize", NO_MODEL, "--concept", "red", "--prompts-file", "DIR", "--out", "o"],
     "cannot read prompts file 'DIR'"),
    (["localize", NO_MODEL, "--concept", "red", "--prompt", "a red star", "--out", "FILE/run"],
     "lies under"),
    (["localize", NO_MODEL, "--concept", "red", "--prompt", "a red star", "--device", "gpu0", "--out", "o"],
     "unknown device 'gpu0'"),
    (["localize", NO_MODEL, "--concept", "red", "--prompt", "a red star", "--pipeline-arg", "num_inference_steps=4",
      "--out", "o"], "ditloc sets it itself; use --steps"),
    (["intervene", NO_MODEL, "--concept", "red", "--prompt", "a red star", "--blocks", " , ", "--out", "o"],
     "--blocks is empty"),
    (["bench", NO_MODEL, "--probes", "toy", "--evaluator", "toy", "--k=-1", "--out", "o"],
     "K values must be distinct positive integers"),
    (["bench", NO_MODEL, "--probes", "toy", "--evaluator", "toy", "--seeds", "0,one", "--out", "o"],
     "--seeds takes comma-separated integers"),
    (["bench", NO_MODEL, "--probes", "toy", "--evaluator", "toy", "--width", "-8", "--out", "o"],
     "--width must be positive"),
    (["bench", NO_MODEL, "--probes", "toy", "--evaluator", "style", "--evaluator-model", "DIR", "--references",
      "no_refs", "--out", "o"], "references directory 'no_refs' does not exist"),
    (["bench", NO_MODEL, "--probes", "toy", "--evaluator", "clip", "--evaluator-model", "./no_clip", "--out", "o"],
     "evaluator model directory './no_clip' does not exist"),
    (["report", "DIR"], "DIR is not an output directory of ditloc"),
    (["personalize", NO_MODEL, "--images", "DIR", "--token", "sks", "--class-word", "star", "--out", "o"],
     "no images"),
    (["personalize", NO_MODEL, "--images", "DIR", "--token", "sks", "--class-word", "star", "--k", "0",
      "--out", "o"], "--k must be at least 1"),
    (["unlearn", NO_MODEL, "--concept", "snoopy", "--anchor", "a dog", "--prompt", "a red cat", "--out", "o"],
     "prompt 1 ('a red cat') does not contain the concept 'snoopy'"),
    (["demo", "--fast", "--steps", "0", "--out", "o"], "--steps must be at least 1"),
    # adapter options, checked against the family its model_index.json names before the model loads (SD3: a
    # directory holding only that file, so a load would fail with another message; a hub id not in the cache:
    # against every family's options)
    (["localize", "SD3", "--concept", "red", "--prompt", "a red star", "--adapter-option", "text_stream=bogus",
      "--out", "o"], "sd3 option text_stream must be one of both, clip, t5; got 'bogus'"),
    (["intervene", "SD3", "--concept", "red", "--prompt", "a red star", "--blocks", "block.1", "--adapter-option",
      "stream=t5", "--out", "o"], "sd3 has no option 'stream' (its options: text_stream (both, clip, t5))"),
    (["bench", "SD3", "--probes", "toy", "--evaluator", "toy", "--adapter-option", "stream=t5", "--out", "o"],
     "sd3 has no option 'stream'"),
    (["unlearn", "toy", "--concept", "red", "--anchor", "blue", "--prompt", "a red star", "--adapter-option",
      "text_stream=t5", "--out", "o"], "pixart has no option 'text_stream' (its options: none)"),
    (["personalize", "SD3", "--images", "DIR", "--token", "sks", "--class-word", "star", "--adapter-option",
      "text_stream=", "--out", "o"], "expected KEY=VALUE"),
    (["localize", "nobody/not-cached", "--concept", "red", "--prompt", "a red star", "--adapter-option", "x=1",
      "--out", "o"], "no model family has option 'x' (options by family: sd3: text_stream)"),
    (["localize", "nobody/not-cached", "--concept", "red", "--prompt", "a red star", "--adapter-option",
      "text_stream=t6", "--out", "o"], "option text_stream must be one of both, clip, t5; got 't6'"),
]
SD3_INDEX = '{"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}'


@pytest.mark.parametrize("argv, expected", BAD, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, expected):
    (tmp_path / "FILE").write_text("not a directory")
    (tmp_path / "DIR").mkdir()  # an empty directory
    (tmp_path / "SD3").mkdir()  # a model directory with only its model_index.json: no weights to load
    (tmp_path / "SD3" / "model_index.json").write_text(SD3_INDEX)
    res = _cli(argv, tmp_path)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert len(lines) == 1 and lines[0].startswith("ditloc: error:"), res.stderr
    assert expected in lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["localize", "toy", "--concept", "red", "--prompt", "a red star", "--adapter-option", "x=1"],
     "pixart has no option 'x'"),
    (["intervene", "toy", "--concept", "red", "--prompt", "a red star", "--blocks", "block.1", "--adapter-option",
      "text_stream=t5"], "pixart has no option 'text_stream'"),
    (["bench", "SD3", "--probes", "toy", "--evaluator", "toy", "--adapter-option", "text_stream=bogus"],
     "sd3 option text_stream must be one of"),
    (["unlearn", "SD3", "--concept", "red", "--anchor", "blue", "--prompt", "a red star", "--adapter-option",
      "stream=t5"], "sd3 has no option 'stream'"),
], ids=["localize", "intervene", "bench", "unlearn"])
def test_adapter_options_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, argv, expected):
    from ditloc import cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter options were checked")

    monkeypatch.setattr(cli.models, "load_pipeline", no_load)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SD3").mkdir()
    (tmp_path / "SD3" / "model_index.json").write_text(SD3_INDEX)
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "o").exists()


def test_second_bench_on_the_same_out_is_refused(tmp_path):
    """Two `ditloc bench` processes on one --out: the second is refused with one line naming the
    first's PID (and writes nothing); the first keeps running."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "ditloc.cli", "bench", "toy", "--probes", "toy", "--evaluator", "toy",
            "--categories", "shape,color,style", "--k", "1,2", "--steps", "4", "--out", str(out)]
    first = subprocess.Popen(argv, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = out / f"{LOCK_FILE}.rank0"
        deadline = time.monotonic() + 300
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first bench never took its lock"
            time.sleep(0.2)
        second = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"another ditloc process (PID {first.pid})" in lines[0] and "Traceback" not in second.stderr
        assert first.poll() is None  # the holder is unaffected
    finally:
        first.kill()
        first.wait()
