"""Training at scale: `accelerate launch` (2 CPU processes, gloo) and bf16 mixed precision.

Data parallelism: N processes with --batch-size B train what one process with N x B trains (every process
draws the same global batch and computes its rows; accelerate averages the gradients), only process 0
writes, and an interrupted run resumes to the uninterrupted result. Mixed precision: frozen weights bf16,
trainable weights and Adam moments float32, bad input refused before the model loads."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bench_helpers import ENV, run_cli, setup_files
from conftest import f32_rtol
from ditloc.adapters import get_adapter
from ditloc.edit import LocalizedTrainer, TrainConfig, load_edit, personalize
from ditloc.edit import precision
from ditloc.errors import DitlocError
from ditloc.testing import tiny_pixart_pipeline
from ditloc._state import load_state

LORA = "pytorch_lora_weights.safetensors"
#: the runs compared across process counts load the tiny model in float64: a process's rows then train what
#: the same rows train in one process's larger batch up to float64 rounding (~1e-16 relative per operation;
#: 3 Adam steps of lr 1e-3 move a weight by at most ~3e-3), on any CPU. In float32 another batch size changes
#: the matmul blocking, hence the gradients' last bits, by CPU vendor.
F64 = ["--dtype", "float64"]
F64_ATOL = 1e-12  # on weights <= ~3e-3: 1e-9 relative, far above float64 rounding, far below any real change


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unlearn_argv(model, out, batch: int, *, f64: bool = True) -> list[str]:
    return ["unlearn", str(model), "--concept", "dog", "--anchor", "cat", "--prompt", "a red dog",
            "--prompt", "a dog on the beach", "--blocks", "block.1,block.2", "--images-per-prompt", "2",
            "--steps", "2", "--train-steps", "3", "--lr", "1e-3", "--checkpoint-every", "1",
            "--batch-size", str(batch), "--out", str(out)] + (F64 if f64 else [])


def launch(argv, *, script=None) -> subprocess.CompletedProcess:
    """`accelerate launch` with 2 processes on this machine's CPUs (its torchrun launcher; gloo)."""
    target = [str(script)] if script else ["-m", "ditloc.cli"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *target, *argv]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def lora(out: Path) -> dict:
    return load_file(str(out / LORA))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return setup_files(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def two(model, tmp_path_factory):
    """An uninterrupted 2-process run, --batch-size 2: (out, completed process)."""
    out = tmp_path_factory.mktemp("scale") / "two"
    proc = launch(unlearn_argv(model, out, 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_two_processes_train_what_one_trains_with_twice_the_batch(model, two, tmp_path):
    out2, proc = two
    code, _, err = run_cli(unlearn_argv(model, tmp_path / "one", 4))
    assert code == 0, err
    a, b = lora(out2), lora(tmp_path / "one")
    assert a.keys() == b.keys()
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-3  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=F64_ATOL)
    rec2 = json.loads((out2 / "ditloc_edit.json").read_text())
    rec1 = json.loads((tmp_path / "one" / "ditloc_edit.json").read_text())
    assert rec2["config"]["processes"] == 2 and rec2["config"]["batch_size"] == 2 and rec1["config"]["processes"] == 1
    # the global batch's mean, which the trainer takes in float32: a mean over M = 4 rows x the latent's elements
    # (terms >= 0: within sqrt(M) * eps32 relative of the float64 value, k = 2 for the loss's two terms), each
    cfg = json.loads((model / "transformer" / "config.json").read_text())
    tol = 2 * f32_rtol(4 * cfg["in_channels"] * cfg["sample_size"] ** 2, k=2)
    np.testing.assert_allclose(rec2["losses"], rec1["losses"], rtol=tol, atol=0)
    # one writer: the same files as a single process, one report
    assert sorted(p.name for p in out2.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert proc.stdout.count("wrote ") == 1 and proc.stderr.count("step 3/3") == 1
    assert json.loads((out2 / "checkpoint.json").read_text())["processes"] == 2
    # the batch matters: one process with the per-process batch trains something else
    code, _, err = run_cli(unlearn_argv(model, tmp_path / "small", 2))
    assert code == 0, err
    small = lora(tmp_path / "small")
    assert max(float((small[k] - a[k]).abs().max()) for k in a) > 1e-4


INTERRUPT = """import sys
from ditloc import _progress
from ditloc.cli import main

_write = _progress.write


def write(message):
    if message.startswith("step 2/"):  # Ctrl-C in the main process after step 2
        raise KeyboardInterrupt
    _write(message)


_progress.write = write
sys.exit(main(sys.argv[1:]))
"""


def test_two_process_resume_equals_uninterrupted(model, two, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT)
    proc = launch(unlearn_argv(model, out, 2), script=script)
    assert proc.returncode != 0 and "interrupted at step 2" in proc.stderr
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["step"] == 2 and meta["processes"] == 2
    assert not (out / LORA).exists()
    # another number of processes would train something else: refused
    code, _, err = run_cli(unlearn_argv(model, out, 2))
    last = err.strip().splitlines()[-1]  # (after the progress lines)
    assert code == 2 and last.startswith("ditloc: error: ") and "2 process(es)" in last and "--num_processes 2" in last
    proc = launch(unlearn_argv(model, out, 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at step 2/3" in proc.stderr
    a, b = lora(out), lora(two[0])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "ditloc_edit.json").read_text())["losses"] == \
        json.loads((two[0] / "ditloc_edit.json").read_text())["losses"]


# ---- mixed precision ------------------------------------------------------------------------
def _images(n=2, side=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, side, side, generator=g) * 2 - 1


@pytest.mark.parametrize("method, lr, saved", [("lora", 3e-3, LORA), ("full", 1e-3, "blocks.safetensors")])
def test_bf16_mixed_precision_keeps_trainable_state_float32(tmp_path, method, lr, saved):
    pipe = tiny_pixart_pipeline().to(torch.bfloat16)
    res = personalize(pipe, _images(), "sks", "cat", blocks="block.2", out=tmp_path,
                      config=TrainConfig(method=method, steps=30, batch_size=2, lr=lr, mixed_precision="bf16"))
    assert np.mean(res.losses[-5:]) < 0.9 * np.mean(res.losses[:5])  # it learns
    assert res.config["mixed_precision"] == "bf16"
    tensors, _ = load_state(tmp_path / "checkpoint")
    trainable = {k: v for k, v in tensors.items() if k.startswith("param.")}
    moments = {k: v for k, v in tensors.items() if k.startswith("opt.") and k.endswith(("exp_avg", "exp_avg_sq"))}
    assert trainable and moments and {v.dtype for v in (*trainable.values(), *moments.values())} == {torch.float32}
    params = dict(pipe.transformer.named_parameters())
    if method == "lora":  # base bf16, the adapter float32 (also after training)
        assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
        assert {p.dtype for n, p in params.items() if "lora_" not in n} == {torch.bfloat16}
    else:  # the trained blocks' float32 master weights go back to the base dtype in the pipeline
        assert {p.dtype for p in params.values()} == {torch.bfloat16}
    state = load_file(str(tmp_path / saved))
    assert {v.dtype for v in state.values()} == {torch.float32}  # saved at full precision
    for base in (torch.bfloat16, torch.float32):  # loads into either: the saved weights in the pipeline's dtype
        fresh = tiny_pixart_pipeline().to(base)
        load_edit(fresh, tmp_path)
        loaded = {n.replace(".ditloc", ""): p for n, p in fresh.transformer.named_parameters()}
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in state.items())
        with torch.no_grad():  # the edited pipeline runs
            fresh("a sks cat", num_inference_steps=2, height=32, width=32, use_resolution_binning=False,
                  output_type="latent", generator=torch.Generator().manual_seed(0))


def test_cli_bf16_loads_base_in_bf16_and_saves_float32(tmp_path):
    model = tmp_path / "pixart"
    tiny_pixart_pipeline().save_pretrained(model)
    argv = unlearn_argv(model, tmp_path / "out", 2, f64=False) + ["--mixed-precision", "bf16"]
    code, _, err = run_cli(argv)
    assert code == 0, err
    rec = json.loads((tmp_path / "out" / "ditloc_edit.json").read_text())
    assert rec["config"]["mixed_precision"] == "bf16" and rec["config"]["base_dtype"] == "bfloat16"
    assert {v.dtype for v in lora(tmp_path / "out").values()} == {torch.float32}
    tensors, meta = load_state(tmp_path / "out" / "checkpoint")
    assert meta["identity"]["config"]["mixed_precision"] == "bf16"
    assert {v.dtype for k, v in tensors.items() if k.startswith(("param.", "opt."))} - {torch.float32} <= {
        torch.int64}  # (step counters aside)


def test_bf16_support_check_is_injectable():
    precision.check_device("bf16", "cpu", supported=lambda device: None)
    with pytest.raises(DitlocError, match="needs bf16 support on cpu: no bf16 here"):
        precision.check_device("bf16", "cpu", supported=lambda device: "no bf16 here")
    precision.check_device("no", "cpu", supported=lambda device: "never asked")
    assert precision.bf16_supported("cpu") is None  # PyTorch computes bf16 on every x86 CPU


def _no_model(monkeypatch):
    import ditloc.cli.models

    def refuse(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(ditloc.cli.models, "load_pipeline", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--mixed-precision", "bf16"], "--mixed-precision bf16 needs bf16 support on cpu: simulated"),
    (["--mixed-precision", "fp16"], "--mixed-precision fp16 is not supported (it needs loss scaling)"),
    (["--mixed-precision", "bf16", "--dtype", "float16"], "drop --dtype float16"),
    (["--mixed-precision", "bf16", "--edit-method", "closed-form"], "not to --edit-method closed-form"),
])
def test_cli_mixed_precision_bad_input_one_line_before_the_model(tmp_path, monkeypatch, extra, message):
    _no_model(monkeypatch)
    monkeypatch.setattr(precision, "bf16_supported", lambda device: "simulated device without bf16")
    code, out, err = run_cli(unlearn_argv(tmp_path / "absent-model", tmp_path / "out", 2, f64=False) + extra)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_env_mixed_precision_from_accelerate_launch(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision fp16
    code, _, err = run_cli(unlearn_argv(tmp_path / "m", tmp_path / "out", 2, f64=False))
    assert code == 2 and "fp16 is not supported" in err


def test_train_config_refuses_fp16_and_unknown():
    with pytest.raises(DitlocError, match="fp16 is not supported"):
        TrainConfig(mixed_precision="fp16")
    with pytest.raises(DitlocError, match="choose one of no, bf16"):
        TrainConfig(mixed_precision="fp8")


def test_bf16_over_float16_base_refused_before_the_model_is_touched():
    pipe = tiny_pixart_pipeline().to(torch.float16)
    before = sorted(n for n, _ in pipe.transformer.named_parameters())
    with pytest.raises(DitlocError, match="the model is float16"):
        LocalizedTrainer(pipe, get_adapter(pipe), ["block.1"], TrainConfig(mixed_precision="bf16"))
    assert sorted(n for n, _ in pipe.transformer.named_parameters()) == before  # no adapter injected


def test_two_processes_personalize_with_captions_and_teacher_prior(model, tmp_path):
    """Captions (a text row per image) and the teacher prior term are sharded with the
    rows: 2 processes x batch 2 train what one process with batch 4 trains."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, caption in (("a", "a sks cat on the beach"), ("b", "a green sks cat"), ("c", "a sks cat")):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)

    def argv(out, batch):
        return ["personalize", str(model), "--images", str(folder), "--token", "sks", "--class-word", "cat",
                "--captions", "--prior-preservation", "--num-class-images", "3", "--prior-target", "teacher",
                "--prior-weight", "2", "--blocks", "block.1,block.2", "--steps", "2", "--train-steps", "3",
                "--lr", "1e-3", "--batch-size", str(batch), "--out", str(out), *F64]

    proc = launch(argv(tmp_path / "two", 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, _, err = run_cli(argv(tmp_path / "one", 4))
    assert code == 0, err
    a, b = lora(tmp_path / "two"), lora(tmp_path / "one")
    assert a.keys() == b.keys() and max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=F64_ATOL)
    rec = json.loads((tmp_path / "two" / "ditloc_edit.json").read_text())
    assert rec["config"]["processes"] == 2 and rec["details"]["prior_target"] == "teacher"


def search_argv(model, out) -> list[str]:
    return ["localize", str(model), "--concept", "dog", "--prompt", "a red dog", "--prompt", "a dog on the beach",
            "--seeds", "0", "--steps", "2", "--search-steps", "2", "--max-k", "2", "--objective", "self",
            "--out", str(out), *F64]


def test_search_under_two_processes_finds_what_one_finds_and_resumes(model, tmp_path):
    """`accelerate launch` splits the search's pipeline calls over 2 processes: the same sets and
    presence as one process, one checkpoint written by the main process, resumed after a kill."""
    code, _, err = run_cli(search_argv(model, tmp_path / "one"))
    assert code == 0, err
    one = json.loads((tmp_path / "one" / "localization.json").read_text())
    proc = launch(search_argv(model, tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "localization.json").read_text())
    assert two["search"]["sets"] == one["search"]["sets"]
    assert two["search"]["presence"] == pytest.approx(one["search"]["presence"], rel=1e-10, abs=1e-12)
    assert two["search"]["cost"]["generations"] == one["search"]["cost"]["generations"]
    lines = (tmp_path / "two" / "search.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "one" / "search.jsonl").read_text().splitlines())  # one writer
    # killed after two sets: the rerun keeps them and generates the rest
    (tmp_path / "two" / "search.jsonl").write_text("\n".join(lines[:3]) + "\n")
    proc = launch(search_argv(model, tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "two" / "localization.json").read_text())
    assert again["search"]["sets"] == one["search"]["sets"]
    assert again["search"]["cost"]["generations"] == one["search"]["cost"]["generations"]  # the checkpoint's counted
    total = one["search"]["cost"]["generations"]
    assert f"({total - 2} generated now, {total} in all" in proc.stdout  # the two kept sets were not generated
