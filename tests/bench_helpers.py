"""Shared by test_bench.py and test_report.py: a tiny saved random PixArt pipeline,
a tiny probe file (words the tiny tokenizer knows; toy-oracle evaluation texts,
which score any 32x32 image) and one uninterrupted reference run, made once."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch

from ditloc.cli import main

PROBES = {
    "base": "none",
    "name": "tiny",
    "categories": {
        "color": {
            "concepts": ["red", "blue"],
            "localization_prompts": ["a photo of a {concept} car", "a {concept} boat on the lake"],
            "evaluation_prompts": ["a painting of a {concept} house", "a {concept} flower in the field"],
            "eval_text": "color: {concept}",
        },
        "place": {
            "concepts": ["beach", "forest"],
            "localization_prompts": ["a dog on the {concept}", "a photo of a cat in the {concept}"],
            "evaluation_prompts": ["a red car at the {concept}", "a man in the {concept} with a dog"],
            "eval_text": "place: {concept}",
        },
    },
}
KS, SEEDS = (1, 2), (0, 1)
#: 2 concepts x (1 localization + 1 baseline + 3 controls x 2 K) units
N_UNITS = 2 * (2 + 3 * len(KS))
#: 2 concepts x (baseline + 3 controls x 2 K) x 2 prompts x 2 seeds
N_ROWS = 2 * (1 + 3 * len(KS)) * 2 * len(SEEDS)

#: every bench in these tests runs on one thread (subprocesses via OMP_NUM_THREADS): same arithmetic everywhere
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

_cache: dict[str, Path] = {}


def setup_files(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny pipeline directory, probe file), written once per session."""
    if "model" not in _cache:
        from ditloc.testing import tiny_pixart_pipeline

        root = tmp_path_factory.mktemp("bench_setup")
        tiny_pixart_pipeline().save_pretrained(root / "pixart")
        (root / "probes.json").write_text(json.dumps(PROBES))
        _cache["model"], _cache["probes"] = root / "pixart", root / "probes.json"
    return _cache["model"], _cache["probes"]


def bench_argv(model, probes, out, *, ks=KS) -> list[str]:
    return ["bench", str(model), "--probes", str(probes), "--concepts-per-category", "1",
            "--k", ",".join(map(str, ks)), "--seeds", ",".join(map(str, SEEDS)), "--evaluator", "toy",
            "--steps", "2", "--out", str(out)]


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run_cli(argv) -> tuple[int, str, str]:
    """`ditloc ARGV` in this process, on one thread: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with one_thread(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted single-process run (made once per session)."""
    if "reference" not in _cache:
        model, probes = setup_files(tmp_path_factory)
        out = tmp_path_factory.mktemp("bench_reference") / "run"
        code, _, err = run_cli(bench_argv(model, probes, out))
        assert code == 0, err
        _cache["reference"] = out
    return _cache["reference"]


def store_lines(run: Path) -> list[str]:
    return [line for path in sorted(run.glob("results.rank*.jsonl")) for line in path.read_text().splitlines()]
